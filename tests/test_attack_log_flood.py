"""A guest floods the daemon's log: guest-caused events are logged at most once per
interval for each VM or relay, with the count of those left out.

A guest that connects in a loop to a port the host publishes but nothing answers (the
gateway relays each connection to the host), or to a unix-socket bind whose host end is
gone, made one log line per connection: thousands a second, rotating the daemon's log
(10 MiB, two backups) past everything else in it within seconds. No VM: the gateway's
relay of one connection, driven with a socket pair as the guest's end."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from husk.runtime import gateway
from husk.runtime.lograte import LogLimiter

ATTEMPTS = 200


def _closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _guest_connections(relay: gateway.Gateway, member: object, port: int) -> None:
    for _ in range(ATTEMPTS):
        guest, ours = socket.socketpair()
        with guest:
            reader, writer = await asyncio.open_connection(sock=ours)
            await relay._relay(member, port, reader, writer)  # type: ignore[arg-type]


def test_a_guests_connection_loop_to_an_unanswered_port_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = _closed_port()
    relay = gateway.Gateway()
    relay._published["a container"] = {port: "127.0.0.1"}
    member = gateway._Member(netns_fd=-1)
    with caplog.at_level(logging.INFO, logger="husk.runtime.gateway"):
        asyncio.run(_guest_connections(relay, member, port))
    lines = [r.getMessage() for r in caplog.records if r.name == "husk.runtime.gateway"]
    assert lines and "did not answer on the host" in lines[0], lines
    assert len(lines) == 1, f"{len(lines)} log lines for {ATTEMPTS} guest connections"


def test_the_limiter_counts_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limiter = LogLimiter(logging.getLogger("husk.test"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="husk.test"):
        for second in range(25):
            now[0] = 100.0 + second
            limiter.info("event %d", second)
    assert [r.getMessage() for r in caplog.records] == [
        "event 0",
        "event 10 (9 more like it in the last 10s not logged)",
        "event 20 (9 more like it in the last 10s not logged)",
    ]
