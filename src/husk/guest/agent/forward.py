"""Port forwarding: a channel tunnelled to a TCP or UDP port inside the guest.

The host listens on its own address and opens one FORWARD channel per
connection (or per UDP peer); the guest side connects to the port on its
loopback, where the workload listens (it shares the guest's network namespace).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable

from husk.guest import protocol
from husk.guest.agent.loop import Loop
from husk.guest.protocol import MsgType

_READ_SIZE = 64 * 1024
_CONNECT_TIMEOUT = 10.0


class Tunnel:
    def __init__(
        self,
        loop: Loop,
        send: Callable[[bytes], None],
        channel: int,
        port: int,
        transport: str,
        on_closed: Callable[[Tunnel], None],
        sock: socket.socket | None = None,
    ) -> None:
        """Connects to ``port`` on the guest's loopback, or carries ``sock`` (connected)."""
        self.loop = loop
        self._send = send
        self.channel = channel
        self.transport = transport
        self._on_closed = on_closed
        self._outgoing = bytearray()
        self._host_done = False
        self._guest_done = False
        self.paused = False
        self.connected = False
        self._timer = loop.call_later(_CONNECT_TIMEOUT, self._connect_timed_out)
        if sock is not None:
            self.sock = sock
            self.sock.setblocking(False)
            self._connected()
            return
        kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setblocking(False)
        err = self.sock.connect_ex(("127.0.0.1", port))
        if err in (0, errno.EISCONN):
            self._connected()
        elif err in (errno.EINPROGRESS, errno.EAGAIN):
            loop.add_writer(self.sock.fileno(), self._connect_done)
        else:
            self._fail(os.strerror(err))

    @classmethod
    def adopt(
        cls,
        loop: Loop,
        send: Callable[[bytes], None],
        channel: int,
        sock: socket.socket,
        on_closed: Callable[[Tunnel], None],
    ) -> Tunnel:
        """A tunnel for a stream connection the guest accepted (a bound unix socket)."""
        return cls(loop, send, channel, 0, "tcp", on_closed, sock=sock)

    def _connect_done(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(os.strerror(err))
        else:
            self._connected()

    def _connect_timed_out(self) -> None:
        if not self.connected:
            self._fail("connection timed out")

    def _connected(self) -> None:
        self._timer.cancel()
        self.connected = True
        self._send(protocol.encode_json(MsgType.OK, self.channel, {}))
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self._flush()

    def _fail(self, reason: str) -> None:
        self._timer.cancel()
        self._send(protocol.encode_error(self.channel, reason, "forward_failed"))
        self._close()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
            if self.transport == "udp":
                return  # ICMP refusal of one datagram does not end a UDP tunnel
        if not data and self.transport == "tcp":
            self.loop.remove_reader(self.sock.fileno())
            self._guest_done = True
            self._send(protocol.encode_json(MsgType.CLOSE, self.channel))
            self._maybe_close()
            return
        for frame in protocol.encode_data(MsgType.DATA, self.channel, data):
            self._send(frame)

    def set_paused(self, paused: bool) -> None:
        if paused == self.paused or not self.connected or self._guest_done:
            return
        self.paused = paused
        if paused:
            self.loop.remove_reader(self.sock.fileno())
        else:
            self.loop.add_reader(self.sock.fileno(), self._readable)

    def from_host(self, data: bytes) -> None:
        if self.transport == "udp":
            try:
                self.sock.send(data)
            except ConnectionRefusedError:
                # The refusal belongs to an earlier datagram (ICMP port unreachable is
                # reported on the next send): this one has not been sent yet.
                with contextlib.suppress(OSError):
                    self.sock.send(data)
            except OSError:
                pass
            return
        self._outgoing += data
        if self.connected:
            self._flush()

    def host_closed(self) -> None:
        self._host_done = True
        if self.transport == "udp":
            self._guest_done = True
        if self.connected:
            self._flush()
        self._maybe_close()

    def _flush(self) -> None:
        fd = self.sock.fileno()
        while self._outgoing:
            try:
                sent = self.sock.send(self._outgoing)
            except BlockingIOError:
                break
            except OSError:
                self._outgoing.clear()
                break
            del self._outgoing[:sent]
        if self._outgoing:
            self.loop.add_writer(fd, self._flush)
            return
        self.loop.remove_writer(fd)
        if self._host_done and self.transport == "tcp":
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._host_done and self._guest_done and not self._outgoing:
            self._close()

    def _close(self) -> None:
        self._timer.cancel()
        with contextlib.suppress(ValueError, KeyError):
            self.loop.forget(self.sock.fileno())
        self.sock.close()
        self._on_closed(self)
