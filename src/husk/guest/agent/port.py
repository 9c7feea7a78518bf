"""The guest end of the virtio-serial channel.

The host side (QEMU's socket) may go away and come back, e.g. when the daemon
restarts. While it is away the port polls HUP and writes would fail, so output
is kept in a bounded buffer; when it is full the sessions stop reading their
processes' pipes (``on_congestion``), which blocks the processes instead of
losing output.
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections import deque
from collections.abc import Callable

from husk.guest import protocol
from husk.guest.agent.loop import Loop, log
from husk.guest.protocol import Frame, FrameError

HIGH_WATER = 8 * 1024 * 1024
LOW_WATER = 1 * 1024 * 1024
_RECONNECT_POLL = 0.05
_WRITE_MAX = 32 * 1024  # virtio_console takes at most this much per write()
_READ_BATCH = 1024 * 1024
_READ_PIECE = 4096  # virtio_console's receive buffers are a page each
_WRITE_BATCH = 32  # pieces of _WRITE_MAX per writev(): 1 MiB per system call


def find_port(name: str) -> str | None:
    """The /dev node of the virtio-serial port called ``name``, if it exists yet."""
    base = "/sys/class/virtio-ports"
    try:
        entries = os.listdir(base)
    except FileNotFoundError:
        return None
    for entry in entries:
        try:
            with open(f"{base}/{entry}/name") as fh:
                if fh.read().strip() == name:
                    return f"/dev/{entry}"
        except OSError:
            continue
    return None


class Port:
    def __init__(
        self,
        loop: Loop,
        path: str,
        on_frame: Callable[[Frame], None],
        on_bad_frame: Callable[[FrameError], None],
        on_congestion: Callable[[bool], None],
    ) -> None:
        self._loop = loop
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._on_frame = on_frame
        self._on_bad_frame = on_bad_frame
        self._on_congestion = on_congestion
        self._decoder = protocol.Decoder()
        self._out: deque[memoryview] = deque()
        self._read_buffer = bytearray(_READ_BATCH)
        self._read_view = memoryview(self._read_buffer)
        self._read_pieces = [
            self._read_view[start : start + _READ_PIECE]
            for start in range(0, _READ_BATCH, _READ_PIECE)
        ]
        self.buffered = 0
        self.congested = False
        self.connected = False
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN | select.POLLOUT)
        self._check_connection()

    # -- connection state -------------------------------------------------
    def _host_connected(self) -> bool:
        return all(not events & select.POLLHUP for _fd, events in self._poller.poll(0))

    def _check_connection(self) -> None:
        if self._host_connected():
            self.connected = True
            self._decoder = protocol.Decoder()  # a new peer starts at a frame boundary
            self._loop.add_reader(self._fd, self._readable)
            if self._out:
                self._loop.add_writer(self._fd, self._flush)
        else:
            self._loop.call_later(_RECONNECT_POLL, self._check_connection)

    def _disconnected(self) -> None:
        if not self.connected:
            return
        self.connected = False
        self._loop.forget(self._fd)
        log("host disconnected from the agent port; buffering output")
        self._loop.call_later(_RECONNECT_POLL, self._check_connection)

    # -- reading ----------------------------------------------------------
    def _readable(self) -> None:
        # virtio_console hands out one receive buffer (a page) per read(); readv with
        # page-sized pieces takes one buffer per piece, up to _READ_BATCH per system call
        # (the kernel stops at the first piece a buffer did not fill), so a MiB from the
        # host costs a few calls and a decode each, not 256 loop turns.
        # Each batch goes straight from the read buffer into the decoder's (one copy per
        # byte, not three: a bytes() of the piece and a join of the batch were two more).
        items: list[Frame | FrameError] = []
        received = 0
        while received < _READ_BATCH:
            try:
                count = os.readv(self._fd, self._read_pieces)
            except BlockingIOError:
                break
            except OSError as exc:
                log(f"port read failed: {exc}")
                self._disconnected()
                break
            if not count:
                self._disconnected()
                break
            items += self._decoder.feed(self._read_view[:count])
            received += count
        for item in items:
            if isinstance(item, FrameError):
                self._on_bad_frame(item)
            else:
                self._on_frame(item)

    # -- writing ----------------------------------------------------------
    def send(self, data: bytes) -> None:
        if not data:
            return
        self._out.append(memoryview(data))
        self.buffered += len(data)
        if self.connected:
            self._flush()
        if not self.congested and self.buffered > HIGH_WATER:
            self.congested = True
            self._on_congestion(True)

    def send_all(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.send(frame)

    def discard_pending(self) -> None:
        """Drops output not yet written: a resuming host asks for it again by offset."""
        self._out.clear()
        self.buffered = 0
        if self.connected:
            self._loop.remove_writer(self._fd)
        if self.congested:
            self.congested = False
            self._on_congestion(False)

    def _flush(self) -> None:
        while self._out:
            # virtio_console takes _WRITE_MAX per write(); writev() of such pieces makes
            # it take up to _WRITE_BATCH of them in one system call (stopping early, with
            # what it took, once the host's queue is full).
            pieces: list[memoryview] = []
            for chunk in self._out:
                for start in range(0, len(chunk), _WRITE_MAX):
                    pieces.append(chunk[start : start + _WRITE_MAX])
                    if len(pieces) == _WRITE_BATCH:
                        break
                if len(pieces) == _WRITE_BATCH:
                    break
            try:
                written = os.writev(self._fd, pieces)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ENODEV, errno.EPIPE):
                    if not self._host_connected():
                        self._disconnected()
                    break
                raise
            self.buffered -= written
            self._consume(written)
            if written < sum(len(piece) for piece in pieces):
                break  # the host's queue is full: wait until the port is writable
        if self.connected:
            if self._out:
                self._loop.add_writer(self._fd, self._flush)
            else:
                self._loop.remove_writer(self._fd)
        if self.congested and self.buffered < LOW_WATER:
            self.congested = False
            self._on_congestion(False)

    def _consume(self, written: int) -> None:
        """Drops ``written`` bytes from the front of the output queue."""
        while written:
            chunk = self._out[0]
            if written >= len(chunk):
                written -= len(chunk)
                self._out.popleft()
            else:
                self._out[0] = chunk[written:]
                written = 0

    def flush_blocking(self, timeout: float) -> None:
        """Best effort to get buffered frames out before powering off."""
        if not self._out or not self.connected:
            return
        self._poller.poll(0)

        deadline = time.monotonic() + timeout
        while self._out and time.monotonic() < deadline:
            self._poller.poll(int(max(0.0, deadline - time.monotonic()) * 1000))
            self._flush()
