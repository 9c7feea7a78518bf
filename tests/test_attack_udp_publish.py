"""A published UDP port (``-p 53:53/udp``) flooded from the network while its guest
reads slowly or not at all: the daemon holds a bounded number of datagrams and peers.

The relay queued every datagram of a peer until the guest's tunnel took it, and made a
tunnel (a guest channel and a task) for every new source address: anyone who can reach
the port grew the daemon's memory without bound (1 KiB datagrams from one peer: 10 MB
per 10,000). Datagrams beyond the bounds are dropped, as a network drops them. No VM:
the relay with a fake agent whose tunnels never take anything."""

from __future__ import annotations

import asyncio
from typing import Any

from husk.runtime import ports


class _StuckTunnel:
    """A guest that does not read: each send waits for ever."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, data: bytes) -> None:
        self.sent += 1
        await asyncio.Event().wait()

    async def receive(self) -> bytes:
        await asyncio.Event().wait()
        return b""

    async def send_eof(self) -> None:
        pass

    def release(self) -> None:
        pass


class _Agent:
    def __init__(self) -> None:
        self.tunnels: list[_StuckTunnel] = []

    async def forward(self, port: int, transport: str) -> _StuckTunnel:
        tunnel = _StuckTunnel()
        self.tunnels.append(tunnel)
        return tunnel


class _Transport:
    def sendto(self, data: bytes, addr: Any) -> None:
        pass


async def _flood(peers: int, per_peer: int) -> tuple[_Agent, Any]:
    agent = _Agent()
    relay = ports._UdpRelay(lambda: agent, 53)  # type: ignore[arg-type,return-value]
    relay.connection_made(_Transport())  # type: ignore[arg-type]
    for index in range(per_peer):
        for peer in range(peers):
            relay.datagram_received(bytes(1024), ("192.0.2.1", 1024 + peer))
        if index % 64 == 0:
            await asyncio.sleep(0)  # the relay's tasks run now and then, as on a real loop
    await asyncio.sleep(0.05)
    return agent, relay


def test_one_peers_flood_is_held_to_a_bounded_queue() -> None:
    async def main() -> int:
        _, relay = await _flood(peers=1, per_peer=10_000)
        return sum(queue.qsize() for queue in relay._peers.values())

    held = asyncio.run(main())
    assert held <= ports.MAX_UDP_QUEUED, f"{held} datagrams held for one peer"


def test_new_source_addresses_make_a_bounded_number_of_tunnels() -> None:
    async def main() -> tuple[int, int]:
        agent, relay = await _flood(peers=5_000, per_peer=1)
        return len(agent.tunnels), len(relay._peers)

    tunnels, peers = asyncio.run(main())
    assert tunnels <= ports.MAX_UDP_PEERS and peers <= ports.MAX_UDP_PEERS, (tunnels, peers)
