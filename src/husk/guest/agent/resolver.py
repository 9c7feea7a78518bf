"""The embedded DNS resolver of containers on user-defined networks (as Docker's 127.0.0.11).

Runs on the agent's loop, over UDP and TCP, in the VM's network namespace (which the
container shares). A and other queries for a name of the table are answered here (case-insensitive,
with or without the final dot; a name with no address of that type gets an empty
NOERROR answer); every other query goes to the upstream servers, one at a time, each
from a fresh socket (a random source port), with a deadline. At most MAX_IN_FLIGHT
forwarded queries wait at once; beyond that, and when every upstream failed, the
client gets SERVFAIL. A packet that cannot be read gets FORMERR (or nothing, when it
has no header): a workload can make this resolver answer, never make it fail. TCP
clients (length-prefixed messages, RFC 7766) are bounded in number, buffer and idle time;
their forwarded queries still go upstream over UDP.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import struct
from collections.abc import Callable

from husk.guest.agent import dnswire
from husk.guest.agent.loop import Loop, Timer, log
from husk.guest.netconfig import EMBEDDED_DNS, GUEST_DNS

PORT = 53
MAX_IN_FLIGHT = 64
UPSTREAM_TIMEOUT = 2.0
"""Per upstream server; a query gives up after trying each once."""
MAX_UPSTREAMS = 3
MAX_PACKET = 65535
PACKETS_PER_WAKEUP = 64
TTL = 600
MAX_TCP_CLIENTS = 16
TCP_IDLE = 10.0
MAX_TCP_BUFFER = 2 + 65535
"""One length-prefixed message at most, either way, per TCP client."""

Reply = Callable[[bytes], None]


class _Pending:
    """A query forwarded upstream, waiting for its answer."""

    __slots__ = ("client", "ident", "query", "raw", "sock", "timer", "upstreams")

    def __init__(self, query: dnswire.Query, raw: bytes, client: Reply) -> None:
        self.query = query
        self.raw = raw
        self.client = client
        self.upstreams: list[str] = []
        self.sock: socket.socket | None = None
        self.timer: Timer | None = None
        self.ident = 0


class Resolver:
    def __init__(self, loop: Loop, address: str = EMBEDDED_DNS, port: int = PORT) -> None:
        self.loop = loop
        self.address = address
        self.port = port
        self.table: dict[str, list[str]] = {}
        self.upstreams: list[str] = [GUEST_DNS]
        self.upstream_port = PORT
        self._sock: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._tcp_clients: dict[int, _TcpClient] = {}
        self._pending: dict[int, _Pending] = {}  # by the upstream socket's fd

    @property
    def running(self) -> bool:
        return self._sock is not None

    def update(self, table: dict[str, list[str]], upstreams: list[str]) -> None:
        """The names to answer (keys lower case, no final dot) and where the rest go."""
        self.table = {name.lower().rstrip("."): list(addrs) for name, addrs in table.items()}
        self.upstreams = list(upstreams[:MAX_UPSTREAMS]) or [GUEST_DNS]

    def start(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.address, self.port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.loop.add_reader(sock.fileno(), self._readable)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.address, self.port))
            listener.listen(MAX_TCP_CLIENTS)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            log(f"dns: no TCP on {self.address}:{self.port}: {exc}")
            return
        self._listener = listener
        self.loop.add_reader(listener.fileno(), self._accept)

    def stop(self) -> None:
        for fd in list(self._pending):
            self._finish(fd, None)
        for client in list(self._tcp_clients.values()):
            client.close()
        for sock in (self._sock, self._listener):
            if sock is not None:
                self.loop.forget(sock.fileno())
                sock.close()
        self._sock = self._listener = None

    # -- serving ----------------------------------------------------------------------
    def _readable(self) -> None:
        sock = self._sock
        for _ in range(PACKETS_PER_WAKEUP):
            if sock is None:
                return
            try:
                packet, client = sock.recvfrom(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log(f"dns: receive failed: {exc}")
                return
            reply = self.handle(packet, functools.partial(self._send, client=client))
            if reply is not None:
                self._send(reply, client)

    def _send(self, reply: bytes, client: tuple[str, int]) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):  # a full buffer or a gone client: drop it
            self._sock.sendto(reply, client)

    def _accept(self) -> None:
        if self._listener is None:
            return
        try:
            sock, _peer = self._listener.accept()
        except OSError:
            return
        if len(self._tcp_clients) >= MAX_TCP_CLIENTS:
            sock.close()
            return
        client = _TcpClient(self, sock)
        self._tcp_clients[sock.fileno()] = client

    def handle(self, packet: bytes, client: Reply) -> bytes | None:
        """The immediate reply to ``packet``, or None (forwarded, or not worth an answer)."""
        try:
            query = dnswire.parse_query(packet)
        except dnswire.DnsError:
            return dnswire.error_reply(packet, dnswire.FORMERR)
        addresses = self.lookup(query.name)
        if addresses is not None:
            if query.qtype == dnswire.TYPE_A:
                return dnswire.answer(query, addresses, ttl=TTL)
            return dnswire.answer(query, [])
        if len(self._pending) >= MAX_IN_FLIGHT:
            return dnswire.failure(query)
        pending = _Pending(query, packet, client)
        pending.upstreams = list(self.upstreams)
        return None if self._forward(pending) else dnswire.failure(query)

    def lookup(self, name: str) -> list[str] | None:
        """The table's addresses for ``name`` (None: not a name of the table)."""
        return self.table.get(name.lower().rstrip("."))

    # -- forwarding -------------------------------------------------------------------
    def _forward(self, pending: _Pending) -> bool:
        """Sends ``pending`` to its next upstream; False when none is left to try."""
        while pending.upstreams:
            upstream = pending.upstreams.pop(0)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.setblocking(False)
                sock.connect((upstream, self.upstream_port))
                pending.ident = int.from_bytes(os.urandom(2), "big")
                sock.send(dnswire.forward_request(pending.query, pending.ident, pending.raw))
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED):
                    log(f"dns: cannot forward to {upstream}: {exc}")
                continue
            self._wait_for(pending, sock)
            return True
        return False

    def _wait_for(self, pending: _Pending, sock: socket.socket) -> None:
        fd = sock.fileno()
        pending.sock = sock
        self._pending[fd] = pending
        self.loop.add_reader(fd, lambda: self._upstream_readable(fd))
        pending.timer = self.loop.call_later(UPSTREAM_TIMEOUT, lambda: self._timed_out(fd))

    def _upstream_readable(self, fd: int) -> None:
        pending = self._pending.get(fd)
        if pending is None or pending.sock is None:
            return
        try:
            packet = pending.sock.recv(MAX_PACKET)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            packet = b""  # e.g. ICMP port unreachable: try the next one
        if packet and not dnswire.is_reply_to(packet, pending.ident, pending.query.question):
            return  # not ours (a stray or spoofed datagram): keep waiting
        if packet:
            self._finish(fd, dnswire.relay_reply(packet, pending.query.ident))
        else:
            self._retry(fd)

    def _timed_out(self, fd: int) -> None:
        if fd in self._pending:
            self._retry(fd)

    def _retry(self, fd: int) -> None:
        pending = self._close_upstream(fd)
        if pending is None:
            return
        if not self._forward(pending):
            pending.client(dnswire.failure(pending.query))

    def _finish(self, fd: int, reply: bytes | None) -> None:
        pending = self._close_upstream(fd)
        if pending is not None and reply is not None:
            pending.client(reply)

    def _close_upstream(self, fd: int) -> _Pending | None:
        pending = self._pending.pop(fd, None)
        if pending is None:
            return None
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        if pending.sock is not None:
            self.loop.forget(fd)
            pending.sock.close()
            pending.sock = None
        return pending


class _TcpClient:
    """One TCP connection: length-prefixed queries in, replies out, never blocking."""

    def __init__(self, resolver: Resolver, sock: socket.socket) -> None:
        self.resolver = resolver
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.inbox = bytearray()
        self.outbox = bytearray()
        sock.setblocking(False)
        self.timer: Timer = resolver.loop.call_later(TCP_IDLE, self.close)
        resolver.loop.add_reader(self.fd, self.readable)

    def readable(self) -> None:
        if self.sock is None:
            return
        try:
            data = self.sock.recv(MAX_TCP_BUFFER - len(self.inbox))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._touch()
        self.inbox += data
        while len(self.inbox) >= 2 and self.sock is not None:
            (length,) = struct.unpack_from(">H", self.inbox)
            if len(self.inbox) < 2 + length:
                break
            message = bytes(self.inbox[2 : 2 + length])
            del self.inbox[: 2 + length]
            reply = self.resolver.handle(message, self.send)
            if reply is not None:
                self.send(reply)
        if len(self.inbox) >= MAX_TCP_BUFFER:
            self.close()

    def send(self, reply: bytes) -> None:
        if self.sock is None:
            return
        self.outbox += struct.pack(">H", len(reply)) + reply
        if len(self.outbox) > 4 * MAX_TCP_BUFFER:
            self.close()  # a client that does not read its answers
            return
        self.writable()

    def writable(self) -> None:
        if self.sock is None:
            return
        try:
            sent = self.sock.send(self.outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        del self.outbox[:sent]
        if self.outbox:
            self.resolver.loop.add_writer(self.fd, self.writable)
        else:
            self.resolver.loop.remove_writer(self.fd)

    def _touch(self) -> None:
        self.timer.cancel()
        self.timer = self.resolver.loop.call_later(TCP_IDLE, self.close)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self.timer.cancel()
        self.resolver.loop.forget(self.fd)
        self.resolver._tcp_clients.pop(self.fd, None)
        sock.close()
