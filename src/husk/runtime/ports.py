"""Published ports: host listeners whose connections are tunnelled to the guest by the agent.

Unlike the reference (which binds every container port on loopback), the host
address and port the user asked for are honoured; port 0 means "pick one".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import cast

from husk.agent.client import AgentClient, Tunnel
from husk.errors import Conflict, GuestError, InvalidArgument
from husk.runtime.gateway import Gateway
from husk.runtime.lograte import LogLimiter
from husk.runtime.pumps import pump_to_guest, pump_to_host
from husk.runtime.socket_relay import SocketRelay
from husk.spec import PortBinding

log = logging.getLogger(__name__)

UDP_IDLE_TIMEOUT = 60.0
MAX_TCP_CONNECTIONS = 4096
"""Connections of one container's published TCP ports at once: each is a descriptor of
the daemon (DESCRIPTOR_LIMIT, 65536, for every container and client together), and
anyone who reaches a published port may open them without end. Past it a new
connection is closed at once (a client retries, as against a full backlog)."""
MAX_UDP_PEERS = 1024
"""Host peers (source addresses) of one published UDP port with a tunnel at once: each
is a guest channel and a task; a new peer's datagrams beyond are dropped."""
MAX_UDP_QUEUED = 64
"""Datagrams of one peer waiting for the guest; more are dropped, as a network drops them."""
MAX_UDP_QUEUED_BYTES = 4 << 20
"""Bytes waiting for the guest, all peers of one published UDP port together."""
# A VM takes seconds, not milliseconds, from "started" to its process listening: a
# connection that arrives meanwhile (testcontainers dials Ryuk's port as soon as the start
# call returns and sends its one filter line) waits for the port instead of being closed.
STARTUP_GRACE = 30.0
RETRY_INTERVAL = 0.1


def _family(host_ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host_ip else socket.AF_INET


UNPRIVILEGED_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"


def privileged_port_hint() -> str:
    """Why binding a low port was refused, and what to do (an unprivileged daemon)."""
    try:
        with open(UNPRIVILEGED_PORT_START, encoding="ascii") as stream:
            start = int(stream.read())
    except (OSError, ValueError):
        start = 1024
    return (
        f"ports below {start} need root on this host; publish a port from {start} up "
        "(e.g. -p 8080:80), or have root run "
        "`sysctl net.ipv4.ip_unprivileged_port_start=0`"
    )


def reserve(binding: PortBinding) -> socket.socket:
    """Binds the host side now, so a port in use fails before the VM boots."""
    host_ip = binding.host_ip or "0.0.0.0"
    kind = socket.SOCK_STREAM if binding.protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(_family(host_ip), kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host_ip, binding.host_port))
    except OSError as exc:
        sock.close()
        where = f"{host_ip}:{binding.host_port}/{binding.protocol}"
        if exc.errno == errno.EADDRINUSE:
            raise Conflict(f"cannot publish port {where}: address already in use") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise InvalidArgument(f"cannot publish port {where}: no such host address") from None
        if exc.errno == errno.EACCES:
            hint = privileged_port_hint()
            raise InvalidArgument(f"cannot publish port {where}: {hint}") from None
        raise InvalidArgument(f"cannot publish port {where}: {exc.strerror}") from None
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    sock.setblocking(False)
    return sock


class PortPublisher:
    """Serves the published ports of one running container."""

    def __init__(
        self,
        get_client: Callable[[], AgentClient | None],
        gateway: Gateway | None = None,
        container_id: str = "",
    ) -> None:
        """``gateway``: where this container's TCP ports are offered to the daemon's VMs
        (and, once the VM joined it under ``container_id``, which it leaves on close)."""
        self._get_client = get_client
        self._gateway = gateway
        self._container_id = container_id
        self._servers: list[asyncio.AbstractServer] = []
        self._transports: list[asyncio.DatagramTransport] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._relays: list[SocketRelay] = []
        self._grace_end = asyncio.get_running_loop().time() + STARTUP_GRACE
        self._refusals = LogLimiter(log)  # a client's connections, the guest's refusals

    def relay_socket(self, client: AgentClient, listener: int, host_path: str) -> None:
        """Serves a unix-socket bind: the guest's ``listener`` leads to ``host_path``."""
        self._relays.append(SocketRelay(client, listener, host_path))

    async def publish(
        self, binding: PortBinding, sock: socket.socket
    ) -> asyncio.DatagramTransport | None:
        """Serves ``binding`` on ``sock``; a UDP port's transport is returned (to close it
        before the container stops, as the overlay's listen port is when detached)."""
        if binding.protocol == "tcp":
            server = await asyncio.start_server(
                lambda r, w: self._serve_tcp(binding.container_port, r, w), sock=sock
            )
            self._servers.append(server)
            if self._gateway is not None:
                host_ip, host_port = sock.getsockname()[:2]
                await self._gateway.publish(self, host_port, host_ip)
            return None
        else:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpRelay(self._get_client, binding.container_port), sock=sock
            )
            self._transports.append(transport)
            return transport

    async def _serve_tcp(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self._writers) >= MAX_TCP_CONNECTIONS:
            self._refusals.info(
                "connection to container port %d closed: %d connections already open",
                port,
                len(self._writers),
            )
            writer.close()
            return
        self._writers.add(writer)
        try:
            tunnel = await self._open_tunnel(port, writer)
            if tunnel is None:
                return
            try:
                await asyncio.gather(pump_to_guest(reader, tunnel), pump_to_host(tunnel, writer))
            finally:
                tunnel.release()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._writers.discard(writer)

    async def _open_tunnel(self, port: int, writer: asyncio.StreamWriter) -> Tunnel | None:
        """The tunnel to the guest's ``port``; refusals are retried until the startup
        grace ends (or the connection is closed), then the connection is dropped as
        Docker's proxy drops one to a port nothing listens on."""
        loop = asyncio.get_running_loop()
        while True:
            client = self._get_client()
            if client is not None:
                try:
                    return await client.forward(port, "tcp")
                except GuestError as exc:
                    refusal = str(exc)
            else:
                refusal = "the container is not running"
            if loop.time() >= self._grace_end or writer.is_closing():
                self._refusals.info("connection to container port %d refused: %s", port, refusal)
                return None
            await asyncio.sleep(RETRY_INTERVAL)

    async def close(self) -> None:
        if self._gateway is not None:
            await self._gateway.unpublish(self)
            await self._gateway.leave(self._container_id)
        for relay in self._relays:
            await relay.close()
        self._relays.clear()
        for server in self._servers:
            server.close()
        for transport in self._transports:
            transport.close()
        for writer in list(self._writers):
            writer.close()  # ends both pumps of each open connection
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self._servers.clear()
        self._transports.clear()


class _UdpRelay(asyncio.DatagramProtocol):
    """One tunnel per host peer, so replies go back to the right sender.

    Anyone who can reach the port sends at the rate they like, from as many source
    addresses as they like, and the guest reads at its own pace: peers and waiting
    datagrams are bounded (MAX_UDP_PEERS, MAX_UDP_QUEUED, MAX_UDP_QUEUED_BYTES) and what
    does not fit is dropped, never queued without end."""

    def __init__(self, get_client: Callable[[], AgentClient | None], port: int) -> None:
        self._get_client = get_client
        self._port = port
        self._peers: dict[tuple[str, int], asyncio.Queue[bytes]] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._failures = LogLimiter(log)
        self._queued = 0  # bytes waiting in every peer's queue

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        queue = self._peers.get(addr)
        if queue is None:
            if len(self._peers) >= MAX_UDP_PEERS:
                return
            queue = self._peers[addr] = asyncio.Queue(MAX_UDP_QUEUED)
            asyncio.get_running_loop().create_task(self._relay(addr, queue))
        if queue.full() or self._queued + len(data) > MAX_UDP_QUEUED_BYTES:
            return
        queue.put_nowait(data)
        self._queued += len(data)

    async def _relay(self, addr: tuple[str, int], queue: asyncio.Queue[bytes]) -> None:
        client = self._get_client()
        try:
            if client is None:
                return
            tunnel = await client.forward(self._port, "udp")
            back = asyncio.get_running_loop().create_task(self._replies(tunnel, addr))
            try:
                while True:
                    data = await asyncio.wait_for(queue.get(), UDP_IDLE_TIMEOUT)
                    self._queued -= len(data)
                    await tunnel.send(data)
            except TimeoutError:
                pass
            finally:
                back.cancel()
                await tunnel.send_eof()
                tunnel.release()
        except GuestError as exc:
            self._failures.info("UDP relay to container port %d failed: %s", self._port, exc)
        finally:
            self._peers.pop(addr, None)
            while not queue.empty():
                self._queued -= len(queue.get_nowait())

    async def _replies(self, tunnel: Tunnel, addr: tuple[str, int]) -> None:
        while data := await tunnel.receive():
            if self._transport is not None:
                self._transport.sendto(data, addr)
