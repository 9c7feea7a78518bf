"""The host end of the guest channel: frames over QEMU's unix socket, routed by channel id.

This layer knows framing and routing, not what messages mean (that is the client's job).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

from husk.errors import GuestError
from husk.guest import protocol
from husk.guest.protocol import Frame, FrameError, MsgType

log = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024


class ChannelClosed(GuestError):
    """The connection to the guest agent went away."""


class Inbox:
    """Frames received on one channel, in order. ``None`` marks the connection's end."""

    def __init__(self, channel: int) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[Frame | None] = asyncio.Queue()

    async def get(self, timeout: float | None = None) -> Frame:
        try:
            frame = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise GuestError(
                f"guest agent did not answer on channel {self.channel} within {timeout:.1f}s"
            ) from None
        if frame is None:
            self.queue.put_nowait(None)  # every later get() sees the end too
            raise ChannelClosed("connection to the guest agent closed")
        return frame


class AgentConnection:
    """One connection to the agent's virtio-serial port (QEMU is the socket server)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = protocol.Decoder()
        self._inboxes: dict[int, Inbox] = {}
        self._next_channel = 1
        self._write_lock = asyncio.Lock()
        self.closed = asyncio.Event()
        # While resuming, session frames that were already under way when the host
        # said HELLO are dropped: the agent replays them from our offsets after READY.
        self.discard_until_ready = False
        self._pump = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(cls, socket_path: Path) -> AgentConnection:
        reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=_READ_SIZE)
        return cls(reader, writer)

    def inbox(self, channel: int) -> Inbox:
        box = self._inboxes.get(channel)
        if box is None:
            box = self._inboxes[channel] = Inbox(channel)
            if self.closed.is_set():
                box.queue.put_nowait(None)
        return box

    def new_channel(self, start_at: int | None = None) -> Inbox:
        """A fresh channel id for a new session; ids are never reused on one connection."""
        if start_at is not None:
            self._next_channel = max(self._next_channel, start_at)
        channel = self._next_channel
        self._next_channel += 1
        return self.inbox(channel)

    def release(self, channel: int) -> None:
        self._inboxes.pop(channel, None)

    async def send(self, frames: bytes | Iterable[bytes]) -> None:
        if self.closed.is_set():
            raise ChannelClosed("connection to the guest agent closed")
        data = frames if isinstance(frames, bytes) else b"".join(frames)
        async with self._write_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                self._mark_closed()
                raise ChannelClosed(f"connection to the guest agent lost: {exc}") from None

    async def send_json(
        self, frame_type: MsgType, channel: int, body: dict[str, object] | None = None
    ) -> None:
        await self.send(protocol.encode_json(frame_type, channel, body))

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    break
                for item in self._decoder.feed(data):
                    if isinstance(item, FrameError):
                        log.warning("guest sent a bad frame on channel %d: %s", *vars_of(item))
                        continue
                    if self.discard_until_ready:
                        if item.channel != protocol.CONTROL_CHANNEL:
                            continue
                        if item.type is MsgType.READY:
                            self.discard_until_ready = False
                    self.inbox(item.channel).queue.put_nowait(item)
        except (ConnectionError, OSError) as exc:
            log.debug("agent connection read failed: %s", exc)
        finally:
            self._mark_closed()

    def _mark_closed(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for box in self._inboxes.values():
            box.queue.put_nowait(None)

    async def close(self) -> None:
        self._mark_closed()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._pump


def vars_of(error: FrameError) -> tuple[int, str]:
    return error.channel, error.reason
