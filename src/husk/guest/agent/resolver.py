"""The embedded DNS resolver of containers on user-defined networks (as Docker's 127.0.0.11).

Runs on the agent's loop, UDP only, in the VM's network namespace (which the container
shares). A and other queries for a name of the table are answered here (case-insensitive,
with or without the final dot; a name with no address of that type gets an empty
NOERROR answer); every other query goes to the upstream servers, one at a time, each
from a fresh socket (a random source port), with a deadline. At most MAX_IN_FLIGHT
forwarded queries wait at once; beyond that, and when every upstream failed, the
client gets SERVFAIL. A packet that cannot be read gets FORMERR (or nothing, when it
has no header): a workload can make this resolver answer, never make it fail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

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


class _Pending:
    """A query forwarded upstream, waiting for its answer."""

    __slots__ = ("client", "ident", "query", "raw", "sock", "timer", "upstreams")

    def __init__(self, query: dnswire.Query, raw: bytes, client: tuple[str, int]) -> None:
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

    def stop(self) -> None:
        for fd in list(self._pending):
            self._finish(fd, None)
        sock, self._sock = self._sock, None
        if sock is not None:
            self.loop.forget(sock.fileno())
            sock.close()

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
            reply = self.handle(packet, client)
            if reply is not None:
                self._send(reply, client)

    def _send(self, reply: bytes, client: tuple[str, int]) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):  # a full buffer or a gone client: drop it
            self._sock.sendto(reply, client)

    def handle(self, packet: bytes, client: tuple[str, int]) -> bytes | None:
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
            self._send(dnswire.failure(pending.query), pending.client)

    def _finish(self, fd: int, reply: bytes | None) -> None:
        pending = self._close_upstream(fd)
        if pending is not None and reply is not None:
            self._send(reply, pending.client)

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
