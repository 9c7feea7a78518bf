"""The host end of the guest channel: frames over QEMU's unix socket, routed by channel id.

This layer knows framing and routing, not what messages mean (that is the client's job).
The guest is untrusted, so the rules here bound what it can make the host hold:

- A frame is queued only on a channel the host opened (``new_channel``/``open_channel``).
  Frames on any other id (never opened, already released, or a future id the host
  has not opened yet) are dropped and counted (:class:`TrafficCounters`) with a
  rate-limited log line. Before the handshake only the control channel is open.
- Every inbox is bounded in bytes (:data:`INBOX_LIMIT`). When one is full the
  connection stops reading the socket: QEMU stops taking the guest's writes, the
  agent's buffer fills and it pauses its sessions, so the workload blocks.
  Nothing beyond one inbox's bound (plus one read) is held for it on the host.
- Stopping the reader stops *every* channel of this VM, since they share one byte
  stream and the wire protocol has no per-channel credit. So that one stalled
  consumer (an exec client stopped with ^Z, a paused download through a published
  port) cannot hold the host's own requests (STATS, SHUTDOWN, a new EXEC) hostage,
  a consumer that takes *nothing* from its full inbox for :data:`STALL_TIMEOUT`
  seconds is dropped: its buffered frames are freed, its next ``get()`` raises
  :class:`ConsumerStalled`, the agent is told CLOSE, and reading resumes. A slow
  consumer that keeps taking frames is never dropped; it only slows this VM's
  other channels. STALL_TIMEOUT is well below every request deadline (10 s and
  more), so a request waiting behind a stalled channel still gets its answer.
  The workload's channel is the exception (:data:`WORKLOAD_STALL_TIMEOUT`): its
  consumer is the daemon's own log pump, which waits on slow attach clients only
  for a bounded time, and dropping it would end the container.
  (Per-channel credit would avoid dropping anyone, but needs a new guest message.)
- All inboxes of one connection together hold at most :data:`TOTAL_INBOX_LIMIT`: a
  guest can open many channels without the host asking for each (every connection
  its workload makes to a bound unix socket is one, 64 per bind), and stopping each
  just below its own bound pinned 4 MiB apiece in the daemon (256 MiB per bind).
  Past the total the reader stops as for a full inbox; when no consumer takes
  anything for the stall timeout, the fullest inbox whose own timeout has passed
  is dropped as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from husk.errors import GuestError
from husk.guest import protocol
from husk.guest.protocol import Frame, FrameError, MsgType

log = logging.getLogger(__name__)

INBOX_LIMIT = 4 * 1024 * 1024
"""Bytes one channel may hold on the host before the connection stops reading."""
TOTAL_INBOX_LIMIT = 16 * 1024 * 1024
"""Bytes all channels of one connection may hold together before it stops reading."""
FRAME_COST = 128
"""Bookkeeping charged per queued frame on top of its payload (so empty frames count)."""
STALL_TIMEOUT = 5.0
"""Seconds a consumer may take nothing from its full inbox before its channel is dropped."""
WORKLOAD_STALL_TIMEOUT = 60.0
"""The same for the workload's channel (its consumer is the daemon's log pump)."""
SEND_TIMEOUT = 30.0
"""Seconds a write may wait for the guest to take bytes before it is given up."""
WRITE_BUFFER_LIMIT = 1024 * 1024
"""Bytes of earlier, given-up writes after which a new write first waits for room."""
_READ_SIZE = 256 * 1024
_FEED_SIZE = 16 * 1024  # bytes decoded at once: bounds the frames decoded ahead of routing
_RECENT_RELEASES = 4096
_LOG_INTERVAL = 10.0
_CLOSE_TIMEOUT = 2.0


class ChannelClosed(GuestError):
    """The connection to the guest agent went away."""


class ConsumerStalled(GuestError):
    """The host-side reader of a channel stopped taking its frames, so the channel was dropped."""


@dataclass
class TrafficCounters:
    """What the connection refused to keep; readable by the runtime and diagnostics."""

    unknown_frames: int = 0
    """Frames on channel ids the host never opened (including future ids)."""
    unknown_bytes: int = 0
    late_frames: int = 0
    """Frames on channels the host released (normal: output after the host stopped caring)."""
    late_bytes: int = 0
    early_frames: int = 0
    """Frames on other channels before the handshake completed."""
    bad_frames: int = 0
    """Frames the decoder rejected (oversized, unknown type)."""
    stalled_channels: int = 0
    paused_seconds: float = 0.0
    """Time the reader spent waiting for a full inbox to make room."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class Inbox:
    """Frames received on one channel, in order, bounded in bytes.

    The end of the channel (connection closed, channel dropped) is an error that
    ``get()`` raises once the frames before it have been taken.
    """

    def __init__(self, channel: int, limit: int, stall_timeout: float | None = None) -> None:
        self.channel = channel
        self.limit = limit
        self.stall_timeout = stall_timeout
        """Overrides the connection's stall timeout for this channel."""
        self.buffered = 0
        self.taken = 0
        self._frames: deque[Frame] = deque()
        self._end: tuple[type[GuestError], str] | None = None
        self._readable = asyncio.Event()
        self._progress = asyncio.Event()
        self.on_progress: Callable[[], None] | None = None
        """Told whenever a frame is taken (the connection's wait for total room)."""

    @property
    def full(self) -> bool:
        return self.buffered >= self.limit

    @property
    def ended(self) -> bool:
        return self._end is not None

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: Frame) -> None:
        self._frames.append(frame)
        self.buffered += len(frame.payload) + FRAME_COST
        self._readable.set()

    def end(self, kind: type[GuestError], message: str) -> None:
        """No more frames will come; frames already queued are still delivered."""
        if self._end is None:
            self._end = (kind, message)
        self._readable.set()
        self._progress.set()

    def abort(self, kind: type[GuestError], message: str) -> None:
        """Ends the channel now, dropping what it holds."""
        self._frames.clear()
        self.buffered = 0
        self._end = (kind, message)
        self._readable.set()
        self._progress.set()

    async def get(self, timeout: float | None = None) -> Frame:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._frames:
            if self._end is not None:
                kind, message = self._end
                raise kind(message)
            self._readable.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise GuestError(
                    f"guest agent did not answer on channel {self.channel} within {timeout:.1f}s"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._readable.wait(), remaining)
        frame = self._frames.popleft()
        self.buffered -= len(frame.payload) + FRAME_COST
        self.taken += 1
        self._progress.set()
        if self.on_progress is not None:
            self.on_progress()
        return frame

    async def wait_for_room(self, stall_timeout: float) -> bool:
        """Waits until the inbox is below its limit; False if its consumer took nothing
        for ``stall_timeout`` seconds."""
        while self.full and not self.ended:
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), stall_timeout)
            except TimeoutError:
                return False
        return True


class AgentConnection:
    """One connection to the agent's virtio-serial port (QEMU is the socket server)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        inbox_limit: int | None = None,
        stall_timeout: float | None = None,
        send_timeout: float | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.inbox_limit = INBOX_LIMIT if inbox_limit is None else inbox_limit
        self.stall_timeout = STALL_TIMEOUT if stall_timeout is None else stall_timeout
        self.send_timeout = SEND_TIMEOUT if send_timeout is None else send_timeout
        self._decoder = protocol.Decoder()
        self._inboxes: dict[int, Inbox] = {}
        self._released: dict[int, None] = {}  # insertion-ordered set, bounded
        self._next_channel = 1
        self._write_lock = asyncio.Lock()
        self._handshake_done = asyncio.Event()
        self._undecoded = 0
        self._next_warning = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self.total_limit = TOTAL_INBOX_LIMIT
        self._taken_anywhere = asyncio.Event()
        self.counters = TrafficCounters()
        self.paused = False
        """True while the reader waits for a full inbox (back-pressure on the guest)."""
        self.closed = asyncio.Event()
        self.open_channel(protocol.CONTROL_CHANNEL)  # the handshake's
        self._pump = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(cls, socket_path: Path) -> AgentConnection:
        reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=_READ_SIZE)
        return cls(reader, writer)

    # -- channels ------------------------------------------------------------
    def open_channel(self, channel: int, *, stall_timeout: float | None = None) -> Inbox:
        """Accepts frames on ``channel`` from now on (a session the host started or adopts).

        ``stall_timeout`` replaces the connection's for this channel (see the module doc).
        """
        box = self._inboxes.get(channel)
        if box is not None and stall_timeout is not None:
            box.stall_timeout = stall_timeout
        if box is None:
            if not 0 <= channel <= protocol.MAX_CHANNEL:
                raise GuestError(f"channel {channel} is out of range")
            box = self._inboxes[channel] = Inbox(channel, self.inbox_limit, stall_timeout)
            box.on_progress = self._taken_anywhere.set
            self._released.pop(channel, None)
            self._next_channel = max(self._next_channel, channel + 1)
            if self.closed.is_set():
                box.end(ChannelClosed, "connection to the guest agent closed")
        return box

    def reserve_ids(self, highest: int) -> None:
        """Ids up to ``highest`` are in use already (sessions of an earlier connection)."""
        self._next_channel = max(self._next_channel, highest + 1)

    def new_channel(self, *, stall_timeout: float | None = None) -> Inbox:
        """A fresh channel id for a new session; ids are never reused on one connection."""
        if self._next_channel > protocol.MAX_CHANNEL:
            raise GuestError("no channel ids left on this connection to the guest agent")
        return self.open_channel(self._next_channel, stall_timeout=stall_timeout)

    def release(self, channel: int) -> None:
        """Stops accepting frames on ``channel``; what it still holds is freed."""
        box = self._inboxes.pop(channel, None)
        if box is None:
            return
        box.abort(ChannelClosed, f"channel {channel} was released")
        self._taken_anywhere.set()  # what it held no longer counts against the total
        self._released[channel] = None
        if len(self._released) > _RECENT_RELEASES:
            del self._released[next(iter(self._released))]

    def complete_handshake(self, sessions: Iterable[int] = ()) -> None:
        """READY was accepted: open the ``sessions`` being adopted, then route everything."""
        for channel in sessions:
            self.open_channel(channel)
        self._handshake_done.set()

    @property
    def open_channels(self) -> list[int]:
        return sorted(self._inboxes)

    @property
    def buffered_bytes(self) -> int:
        """Bytes from the guest held here: queued frames, a partial frame, undecoded input."""
        queued = sum(box.buffered for box in self._inboxes.values())
        partial = len(self._decoder._buffer)  # what the decoder holds (not bytes it skips)
        return queued + partial + self._undecoded

    # -- sending -------------------------------------------------------------
    async def send(self, frames: bytes | Iterable[bytes]) -> None:
        """Writes whole frames, waiting (at most ``send_timeout``) for the guest to take them."""
        if self.closed.is_set():
            raise ChannelClosed("connection to the guest agent closed")
        data = frames if isinstance(frames, bytes) else b"".join(frames)
        deadline = time.monotonic() + self.send_timeout
        try:
            await asyncio.wait_for(self._write_lock.acquire(), self.send_timeout)
        except TimeoutError:
            raise self._not_reading() from None
        try:
            transport = self._writer.transport
            if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                # An earlier write gave up waiting: do not pile more behind it.
                await asyncio.wait_for(self._writer.drain(), deadline - time.monotonic())
            self._writer.write(data)
            await asyncio.wait_for(self._writer.drain(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise self._not_reading() from None
        except (ConnectionError, OSError) as exc:
            self._mark_closed()
            raise ChannelClosed(f"connection to the guest agent lost: {exc}") from None
        finally:
            self._write_lock.release()

    def _not_reading(self) -> GuestError:
        return GuestError(
            f"guest agent took none of the host's messages for {self.send_timeout:.0f}s"
        )

    async def send_json(
        self, frame_type: MsgType, channel: int, body: dict[str, object] | None = None
    ) -> None:
        await self.send(protocol.encode_json(frame_type, channel, body))

    async def request(
        self,
        build: Callable[[int], bytes | Iterable[bytes]],
        *,
        stall_timeout: float | None = None,
    ) -> Inbox:
        """Opens a fresh channel and sends ``build(channel)`` on it; the caller releases it.

        The channel is opened only now, so nothing the guest sent on that id before
        (guessing the next id) and the host already read can be taken for a reply.
        """
        box = self.new_channel(stall_timeout=stall_timeout)
        try:
            await self.send(build(box.channel))
        except BaseException:
            self.release(box.channel)
            raise
        return box

    # -- receiving -----------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    break
                for start in range(0, len(data), _FEED_SIZE):
                    self._undecoded = max(0, len(data) - start - _FEED_SIZE)
                    for item in self._decoder.feed(data[start : start + _FEED_SIZE]):
                        await self._route(item)
                self._undecoded = 0
        except (ConnectionError, OSError) as exc:
            log.debug("agent connection read failed: %s", exc)
        finally:
            self._mark_closed()

    async def _route(self, item: Frame | FrameError) -> None:
        if isinstance(item, FrameError):
            self.counters.bad_frames += 1
            if self._warning_due():
                self._warn(f"bad frame on channel {item.channel}: {item.reason}")
            return
        handshaking = not self._handshake_done.is_set()
        if handshaking and item.channel != protocol.CONTROL_CHANNEL:
            # A resumed agent replays session output after READY; anything before is stale.
            self.counters.early_frames += 1
            return
        box = self._inboxes.get(item.channel)
        if box is None:
            self._drop(item)
            return
        box.put(item)
        if handshaking and item.type is MsgType.READY:
            # Hold everything behind READY until the client has read it and opened the
            # channels of the sessions it adopts (their replayed output follows at once).
            await self._handshake_done.wait()
        if box.full:
            await self._wait_for_room(box)
        elif self._queued_bytes() >= self.total_limit:
            await self._wait_for_total_room()

    def _drop(self, frame: Frame) -> None:
        size = len(frame.payload)
        if frame.channel in self._released:
            self.counters.late_frames += 1
            self.counters.late_bytes += size
            return
        self.counters.unknown_frames += 1
        self.counters.unknown_bytes += size
        if self._warning_due():
            self._warn(
                f"guest sent {frame.type.name} on channel {frame.channel}, which the host did "
                f"not open; dropped ({self.counters.unknown_frames} such frames, "
                f"{self.counters.unknown_bytes} bytes so far)"
            )

    def _warning_due(self) -> bool:
        """At most one warning per interval: a hostile guest must not flood the log."""
        now = time.monotonic()
        if now < self._next_warning:
            return False
        self._next_warning = now + _LOG_INTERVAL
        return True

    @staticmethod
    def _warn(message: str) -> None:
        log.warning("%s (further reports suppressed for %.0fs)", message, _LOG_INTERVAL)

    async def _wait_for_room(self, box: Inbox) -> None:
        began = time.monotonic()
        stall_timeout = self.stall_timeout if box.stall_timeout is None else box.stall_timeout
        self.paused = True
        try:
            if await box.wait_for_room(stall_timeout):
                return
        finally:
            self.paused = False
            self.counters.paused_seconds += time.monotonic() - began
        if self._inboxes.get(box.channel) is not box:
            return  # released meanwhile
        self._drop_stalled(box, stall_timeout)

    def _queued_bytes(self) -> int:
        return sum(box.buffered for box in self._inboxes.values())

    async def _wait_for_total_room(self) -> None:
        """Reading stops while all inboxes together hold :attr:`total_limit` (none full).

        A consumer that takes a frame gives the guest room again; when none takes
        anything, the fullest inbox whose stall timeout has passed is dropped."""
        began = quiet_since = time.monotonic()
        self.paused = True
        try:
            while self._queued_bytes() >= self.total_limit and not self.closed.is_set():
                self._taken_anywhere.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._taken_anywhere.wait(), 0.5)
                    quiet_since = time.monotonic()  # progress: every stall clock restarts
                    continue
                waited = time.monotonic() - quiet_since
                stalled = [
                    box
                    for channel, box in self._inboxes.items()
                    if channel != protocol.CONTROL_CHANNEL
                    and box.buffered
                    and waited
                    >= (self.stall_timeout if box.stall_timeout is None else box.stall_timeout)
                ]
                if stalled:
                    box = max(stalled, key=lambda candidate: candidate.buffered)
                    self._drop_stalled(box, waited)
        finally:
            self.paused = False
            self.counters.paused_seconds += time.monotonic() - began

    def _drop_stalled(self, box: Inbox, stall_timeout: float) -> None:
        self.counters.stalled_channels += 1
        log.warning(
            "channel %d: its reader took nothing for %.0fs with %d bytes waiting; dropped it "
            "so the guest's other channels keep moving",
            box.channel,
            stall_timeout,
            box.buffered,
        )
        self.release(box.channel)
        box.abort(
            ConsumerStalled,
            f"output on channel {box.channel} was dropped: its reader took nothing "
            f"for {stall_timeout:.0f}s",
        )
        self._in_background(self._tell_closed(box.channel))

    async def _tell_closed(self, channel: int) -> None:
        with contextlib.suppress(GuestError):
            await self.send_json(MsgType.CLOSE, channel)

    def _in_background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _mark_closed(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for box in self._inboxes.values():
            box.end(ChannelClosed, "connection to the guest agent closed")

    async def close(self) -> None:
        self._mark_closed()
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), _CLOSE_TIMEOUT)
        except TimeoutError:
            self._writer.transport.abort()  # a guest that does not read would hold it open
        except Exception as exc:
            log.debug("closing the agent connection: %s", exc)
        self._pump.cancel()
        for task in list(self._background):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._pump
