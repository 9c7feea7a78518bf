"""Live output of containers: a broadcast bus, and the stream handle attach/exec return.

Bounded fan-out. Each attached client (a subscription) holds at most
:data:`SUBSCRIBER_BUFFER` bytes of output it has not taken yet. When one is full,
:meth:`OutputBus.publish` waits for it, so the container's own output stops being
read and back-pressure reaches the workload (Docker blocks a container's output on
a slow attached client in the same way); its log file, written before publishing,
never loses a byte. A client that takes nothing for :data:`STALL_TIMEOUT` seconds is
dropped (its stream ends with :class:`OutputStalled`) and the workload runs on: one
stopped ``attach`` cannot freeze a container, nor grow the daemon's memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from husk.errors import HuskError

Chunk = tuple[str, bytes]

SUBSCRIBER_BUFFER = 1024 * 1024
STALL_TIMEOUT = 10.0


class OutputStalled(HuskError):
    """An attached client took no output for too long and was disconnected from it."""

    http_status = 408
    kind = "output_stalled"


class Subscription:
    """One attached client's pending output, bounded by bytes (one chunk may overshoot)."""

    def __init__(self, limit: int = SUBSCRIBER_BUFFER) -> None:
        self.limit = limit
        self._chunks: deque[Chunk] = deque()
        self._bytes = 0
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._ended = False
        self._failure: HuskError | None = None

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    @property
    def full(self) -> bool:
        return self._bytes >= self.limit and not self._ended

    def put(self, chunk: Chunk) -> None:
        if self._ended:
            return
        self._chunks.append(chunk)
        self._bytes += len(chunk[1])
        self._readable.set()
        if self._bytes >= self.limit:
            self._room.clear()

    def end(self, failure: HuskError | None = None) -> None:
        """No more output: the client gets what is queued, then the end (or ``failure``)."""
        if self._ended:
            return
        self._ended = True
        self._failure = failure
        if failure is not None:
            self._chunks.clear()  # nobody is taking it: let the memory go now
            self._bytes = 0
        self._readable.set()
        self._room.set()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    async def get(self) -> Chunk | None:
        """The next chunk; ``None`` at the end; raises the failure that ended it, if any."""
        while not self._chunks:
            if self._ended:
                if self._failure is not None:
                    raise self._failure
                return None
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        self._bytes -= len(chunk[1])
        if self._bytes < self.limit:
            self._room.set()
        return chunk


class OutputBus:
    """Fans a running workload's output out to every attached client, with back-pressure."""

    def __init__(
        self, *, buffer: int = SUBSCRIBER_BUFFER, stall_timeout: float = STALL_TIMEOUT
    ) -> None:
        self._subscribers: set[Subscription] = set()
        self._buffer = buffer
        self._stall_timeout = stall_timeout
        self.closed = False
        self.dropped = 0

    def subscribe(self) -> Subscription:
        subscription = Subscription(self._buffer)
        if self.closed:
            subscription.end()
        else:
            self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """The client left: forget it (a publisher waiting for its room goes on)."""
        self._subscribers.discard(subscription)
        subscription.end()

    async def publish(self, stream: str, data: bytes) -> None:
        """Queue ``data`` for every client, then wait until each has room again.

        The wait is what slows the workload down; it is bounded: a client still full
        after ``stall_timeout`` seconds is dropped.
        """
        subscribers = list(self._subscribers)
        for subscription in subscribers:
            subscription.put((stream, data))
        full = [s for s in subscribers if s.full]
        if not full:
            return
        waits = {asyncio.ensure_future(s.wait_for_room()): s for s in full}
        try:
            _, stalled = await asyncio.wait(waits, timeout=self._stall_timeout)
        finally:
            for task in waits:
                task.cancel()
        for task in stalled:
            subscription = waits[task]
            if subscription in self._subscribers and subscription.full:
                self._drop(subscription)

    def _drop(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        self.dropped += 1
        subscription.end(
            OutputStalled(
                f"the attached client read no output for {self._stall_timeout:g} s; "
                "disconnected (the container's log keeps everything)"
            )
        )

    def close(self) -> None:
        self.closed = True
        for subscription in self._subscribers:
            subscription.end()
        self._subscribers.clear()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


class ProcessStream:
    """What attach and exec hand to API layers: output, stdin, resize, exit code."""

    def __init__(
        self,
        *,
        tty: bool,
        output: Callable[[], AsyncIterator[Chunk]],
        write_stdin: Callable[[bytes], Awaitable[None]],
        close_stdin: Callable[[], Awaitable[None]],
        resize: Callable[[int, int], Awaitable[None]],
        exit_code: Callable[[], int | None],
    ) -> None:
        self.tty = tty
        self._output = output
        self._write_stdin = write_stdin
        self._close_stdin = close_stdin
        self._resize = resize
        self._exit_code = exit_code

    def output(self) -> AsyncIterator[Chunk]:
        return self._output()

    async def write_stdin(self, data: bytes) -> None:
        await self._write_stdin(data)

    async def close_stdin(self) -> None:
        await self._close_stdin()

    async def resize(self, rows: int, cols: int) -> None:
        await self._resize(rows, cols)

    @property
    def exit_code(self) -> int | None:
        return self._exit_code()
