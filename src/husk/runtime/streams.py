"""Live output of containers: a broadcast bus, and the stream handle attach/exec return."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

Chunk = tuple[str, bytes]


class OutputBus:
    """Fans a running workload's output out to every attached client."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Chunk | None]] = set()
        self.closed = False

    def subscribe(self) -> asyncio.Queue[Chunk | None]:
        queue: asyncio.Queue[Chunk | None] = asyncio.Queue()
        if self.closed:
            queue.put_nowait(None)
        else:
            self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Chunk | None]) -> None:
        self._subscribers.discard(queue)

    def publish(self, stream: str, data: bytes) -> None:
        for queue in self._subscribers:
            queue.put_nowait((stream, data))

    def close(self) -> None:
        self.closed = True
        for queue in self._subscribers:
            queue.put_nowait(None)
        self._subscribers.clear()


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
