"""Container stdio on the client side: demultiplexing, stdin forwarding, raw terminals.

Docker's multiplexed stream (non-tty attach, exec and logs) prefixes every
payload with 8 bytes: the stream (0 stdin, 1 stdout, 2 stderr, 3 an error from
the daemon), three zero bytes, and the payload size as a big-endian u32. A tty
session carries raw bytes instead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import Any

from husk import errors
from husk.client.http import HijackedStream
from husk.detachkeys import DetachScanner

STDIN, STDOUT, STDERR, SYSTEM_ERROR = 0, 1, 2, 3
EXIT_STATUS = 4
"""husk's own frame after an exec's output, ``{"ExitCode": N}``, sent only to a client that
asked for it (``X-Husk-Exit-Status: frame``, :mod:`husk.daemon.docker.exec`)."""
HEADER_SIZE = 8
_READ_SIZE = 64 * 1024


class FrameDecoder:
    """Incremental decoder of the multiplexed stream: feed bytes, get whole frames."""

    def __init__(self, *, exit_status: bool = False) -> None:
        self._buffer = bytearray()
        self._last_stream = EXIT_STATUS if exit_status else SYSTEM_ERROR

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer
        buffer += data
        frames = []
        position, end = 0, len(buffer)
        # Walked with an offset and cut once: a chunk holds many small frames.
        while end - position >= HEADER_SIZE:
            stream = buffer[position]
            if stream > self._last_stream or any(buffer[position + 1 : position + 4]):
                raise errors.Internal(
                    "the husk daemon sent a malformed stream header "
                    f"{bytes(buffer[position : position + HEADER_SIZE]).hex()}"
                )
            size = int.from_bytes(buffer[position + 4 : position + HEADER_SIZE], "big")
            frame_end = position + HEADER_SIZE + size
            if frame_end > end:
                break
            frames.append((stream, bytes(buffer[position + HEADER_SIZE : frame_end])))
            position = frame_end
        del buffer[:position]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still waiting for the rest."""
        return len(self._buffer)


def encode_frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


class OutputSink:
    """Writes a session's output to the right file descriptors."""

    def __init__(
        self,
        multiplexed: bool,
        stdout_fd: int = 1,
        stderr_fd: int = 2,
        *,
        exit_status: bool = False,
    ) -> None:
        """``exit_status``: an EXIT_STATUS frame may end the stream (an exec whose client
        asked for one); its code is kept in :attr:`exit_code`."""
        self._decoder = FrameDecoder(exit_status=exit_status) if multiplexed else None
        self._fds = {STDOUT: stdout_fd, STDERR: stderr_fd, STDIN: stdout_fd}
        self.daemon_errors: list[str] = []
        self.exit_code: int | None = None

    def feed(self, data: bytes) -> None:
        if self._decoder is None:
            write_all(self._fds[STDOUT], data)
            return
        # Consecutive frames of one stream go out in one write.
        pending: list[bytes] = []
        pending_fd = -1
        for stream, payload in self._decoder.feed(data):
            if stream == SYSTEM_ERROR:
                self.daemon_errors.append(payload.decode("utf-8", "replace").strip())
                continue
            if stream == EXIT_STATUS:
                self.exit_code = _exit_status(payload)
                continue
            fd = self._fds[stream]
            if fd != pending_fd and pending:
                write_all(pending_fd, b"".join(pending))
                pending.clear()
            pending_fd = fd
            pending.append(payload)
        if pending:
            write_all(pending_fd, b"".join(pending))

    def finish(self) -> None:
        """The stream ended: an error the daemon sent in-band becomes a husk error."""
        if self._decoder is not None and self._decoder.pending:
            raise errors.Internal("the output stream from the husk daemon ended mid-frame")
        if self.daemon_errors:
            raise errors.Internal(self.daemon_errors[-1])


def _exit_status(payload: bytes) -> int:
    try:
        code = json.loads(payload).get("ExitCode")
    except (ValueError, AttributeError):
        code = None
    if type(code) is not int:
        raise errors.Internal(f"the husk daemon sent a malformed exit status {payload[:80]!r}")
    return code


class SignalPipe:
    """Turns signals into bytes on a pipe, so one poll loop sees them with the streams.

    Also keeps them from interrupting the loop with the default behaviour
    (SIGINT's KeyboardInterrupt), since the loop decides what each one means.
    """

    def __init__(self, signals: Sequence[int]) -> None:
        self.signals = list(signals)
        self.read_fd = -1
        self._write_fd = -1
        self._old_wakeup = -1
        self._old_handlers: dict[int, signal.Handlers | Callable[..., object] | int | None] = {}

    def __enter__(self) -> SignalPipe:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._old_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self.signals:
            self._old_handlers[signum] = signal.signal(signum, _ignore_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self.read_fd)
        os.close(self._write_fd)

    def received(self) -> list[int]:
        try:
            data = os.read(self.read_fd, 256)
        except BlockingIOError:
            return []
        return [signum for signum in data if signum in self.signals]


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """Python-level handler: the wakeup fd already carries the signal to the loop."""


class RawTerminal:
    """Puts a terminal in raw mode for an interactive session, and always restores it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    def __enter__(self) -> RawTerminal:
        if os.isatty(self.fd):
            # lazy: CLI start-up (only a session on a terminal needs them)
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._saved is not None:
            import termios  # imported by __enter__ already

            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


def terminal_size(fd: int) -> tuple[int, int] | None:
    """(rows, columns) of the terminal on ``fd``, or None when it is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


def pump(
    stream: HijackedStream,
    sink: OutputSink,
    *,
    stdin_fd: int | None = None,
    signals: SignalPipe | None = None,
    on_signal: Callable[[int], None] | None = None,
    detach_keys: bytes | None = None,
) -> bool:
    """Copy output to ``sink`` and stdin to the stream until the output ends.

    When stdin ends, the write half of the connection is closed (the daemon
    closes the workload's stdin) and output keeps flowing. With ``detach_keys``
    (a terminal session), typing them ends the session at once, the keys unsent:
    True is returned then (detached), False when the output ended.
    """
    scanner = DetachScanner(detach_keys) if detach_keys and stdin_fd is not None else None
    if stream.has_buffered():
        sink.feed(stream.recv())
    poller = select.poll()
    sock_fd = stream.sock.fileno()
    poller.register(sock_fd, select.POLLIN)
    if stdin_fd is not None:
        poller.register(stdin_fd, select.POLLIN)
    if signals is not None:
        poller.register(signals.read_fd, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == sock_fd:
                data = stream.recv()
                if not data:
                    sink.finish()
                    return False
                sink.feed(data)
            elif fd == stdin_fd:
                received = _read_stdin(stdin_fd)
                if received is None:
                    continue
                if received and scanner is not None:
                    received, detached = scanner.feed(received)
                    if received:
                        _send_stdin(stream, received)
                    if detached:
                        return True
                elif received:
                    _send_stdin(stream, received)
                else:  # the end of stdin
                    if scanner is not None and (held := scanner.flush()):
                        _send_stdin(stream, held)
                    poller.unregister(stdin_fd)
                    stdin_fd = None
                    stream.close_write()
            elif signals is not None and fd == signals.read_fd:
                for signum in signals.received():
                    if on_signal is not None:
                        on_signal(signum)


def _read_stdin(fd: int) -> bytes | None:
    """Some input, ``b""`` at its end, None when a non-blocking stdin has nothing yet."""
    try:
        return os.read(fd, _READ_SIZE)
    except BlockingIOError:
        return None
    except OSError as err:
        if err.errno == errno.EIO:  # the terminal went away
            return b""
        raise


def _send_stdin(stream: HijackedStream, data: bytes) -> None:
    # The session may end while input is pending; its output says the rest.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stream.send(data)
