"""Published TCP ports while the container's process is still starting (no VM).

testcontainers dials Ryuk's mapped port as soon as the start call returns and sends its
one filter line; in a VM the process listens seconds later. The host side must hold such
a connection until the guest port opens, within a bounded grace, and drop it after.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import pytest

from husk.agent.client import AgentClient
from husk.errors import GuestError
from husk.runtime import ports
from husk.runtime.ports import PortPublisher, reserve
from husk.spec import PortBinding


class _EchoAckTunnel:
    """The guest end of a Ryuk connection: every line received is answered with ACK."""

    def __init__(self) -> None:
        self.received = b""
        self._replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def send(self, data: bytes) -> None:
        self.received += data
        for _ in range(data.count(b"\n")):
            await self._replies.put(b"ACK\n")

    async def send_eof(self) -> None:
        await self._replies.put(b"")

    async def receive(self) -> bytes:
        return await self._replies.get()

    def release(self) -> None:
        pass


class _SlowToListenClient:
    """Refuses the first ``refusals`` forwards, as an agent does before the port opens."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.attempts = 0
        self.tunnel = _EchoAckTunnel()

    async def forward(self, port: int, transport: str = "tcp") -> _EchoAckTunnel:
        self.attempts += 1
        if self.attempts <= self.refusals:
            raise GuestError(f"cannot reach port {port}/{transport} in the guest: refused")
        return self.tunnel


async def _dial_and_send(refusals: int) -> tuple[bytes, _SlowToListenClient]:
    client = _SlowToListenClient(refusals)
    publisher = PortPublisher(lambda: cast(AgentClient, cast(Any, client)))
    sock = reserve(PortBinding(8080, "tcp", "127.0.0.1", 0))
    host_port = sock.getsockname()[1]
    await publisher.publish(PortBinding(8080, "tcp", "127.0.0.1", 0), sock)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
        writer.write(b"label=org.testcontainers.session-id=abc\r\n")
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(100), 10)
        except ConnectionResetError:  # closed with the filter line unread
            answer = b""
        writer.close()
        return answer, client
    finally:
        await publisher.close()


def test_connection_waits_for_a_port_that_opens_during_start_up() -> None:
    answer, client = asyncio.run(_dial_and_send(refusals=5))
    assert answer == b"ACK\n"
    assert client.attempts == 6
    assert client.tunnel.received == b"label=org.testcontainers.session-id=abc\r\n"


def test_refused_connection_is_dropped_once_the_grace_is_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ports, "STARTUP_GRACE", 0.0)
    answer, client = asyncio.run(_dial_and_send(refusals=1))
    assert answer == b""  # closed as Docker's proxy closes it
    assert client.attempts == 1


class _HoldingClient:
    """A guest whose port accepts every connection and never answers."""

    def __init__(self) -> None:
        self.forwards = 0

    async def forward(self, port: int, transport: str = "tcp") -> _EchoAckTunnel:
        self.forwards += 1
        return _EchoAckTunnel()


def test_a_flood_of_connections_to_a_published_port_holds_a_bounded_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anyone who reaches a published port (0.0.0.0:80) opened connections without end,
    each a descriptor of the daemon (65536 at most, for every container and client):
    past the container's share the host closes new ones at once."""
    monkeypatch.setattr(ports, "MAX_TCP_CONNECTIONS", 20, raising=False)
    flood = 50

    async def main() -> tuple[int, int, int]:
        client = _HoldingClient()
        publisher = PortPublisher(lambda: cast(AgentClient, cast(Any, client)))
        binding = PortBinding(8080, "tcp", "127.0.0.1", 0)
        sock = reserve(binding)
        host_port = sock.getsockname()[1]
        await publisher.publish(binding, sock)
        connections = []
        try:
            for _ in range(flood):
                connections.append(await asyncio.open_connection("127.0.0.1", host_port))
            await asyncio.sleep(0.3)
            held = len(publisher._writers)
            closed = 0
            for reader, _ in connections:
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(1), 0.05) == b"":
                        closed += 1
            return held, closed, client.forwards
        finally:
            for _, writer in connections:
                writer.close()
            await publisher.close()

    held, closed, forwards = asyncio.run(main())
    assert held <= 20 and forwards <= 20, (held, forwards)
    assert closed == flood - held, (closed, held)
