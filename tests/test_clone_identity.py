"""A restore's HELLO carries the clone's identity: the host's side against a fake agent.

A clone wakes up with two requests instead of four (its entropy and MAC in the
HELLO, then SET_TIME); an agent that does not take them that way still gets the three
requests.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fake_agent import FakeAgent
from husk.agent.client import AgentClient
from husk.agent.messages import MalformedMessage
from husk.errors import GuestError
from husk.guest import protocol
from husk.guest.protocol import MsgType
from husk.sandbox import template_boot
from husk.vm.machine import MachineConfig, NetConfig

MAC = "02:11:22:33:44:55"
PERSONAL = (MsgType.ENTROPY, MsgType.SET_TIME, MsgType.OVERLAY_CONFIG)


def machine(tmp_path: Path, net: bool = True) -> MachineConfig:
    return MachineConfig(
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd",
        state_dir=tmp_path / "vm",
        net=NetConfig(MAC) if net else None,
    )


def answering_with_identity(agent: FakeAgent) -> None:
    """The fake READY reports what a current agent sets from the HELLO's identity."""
    original = agent._answer

    def answer(frame: Any) -> None:
        if frame.type is MsgType.HELLO:
            body = frame.json()
            applied: dict[str, Any] = {"entropy_bytes": len(body["identity"]["entropy"]) // 2}
            if "mac" in body.get("identity", {}):
                applied["mac"] = body["identity"]["mac"]
            agent.ready = {"version": protocol.PROTOCOL_VERSION, "identity": applied}
        original(frame)

    agent._answer = answer  # type: ignore[method-assign]


def connect_and_make_own(
    agent: FakeAgent, config: MachineConfig, identity: Callable[[], Awaitable[dict[str, Any]]]
) -> AgentClient:
    async def main() -> AgentClient:
        client = await AgentClient.connect(agent.path, timeout=5.0, identity=identity)
        try:
            await template_boot.make_own(client, config)
        finally:
            await client.close()
        return client

    return asyncio.run(main())


async def fresh(config: MachineConfig) -> dict[str, Any]:
    return template_boot.identity_body(config)


def test_the_hello_carries_entropy_and_mac_and_only_the_clock_follows(tmp_path: Path) -> None:
    config = machine(tmp_path)
    with FakeAgent(tmp_path / "agent.sock") as agent:
        answering_with_identity(agent)
        client = connect_and_make_own(agent, config, lambda: fresh(config))
        assert agent.hello is not None
        sent = agent.hello["identity"]
        assert len(bytes.fromhex(sent["entropy"])) == template_boot.ENTROPY_BYTES
        assert sent["mac"] == MAC
        assert "unix_ns" not in sent  # stale by the time a waking guest would read it
        assert client.identity == {"entropy_bytes": 64, "mac": MAC}
        requests = [f.type for f in agent.received if f.type in PERSONAL]
        assert requests == [MsgType.SET_TIME]
        before = time.time_ns()
        (clock,) = agent.frames_of(MsgType.SET_TIME)
        assert 0 < before - clock.json()["unix_ns"] < 10**10  # sent after READY, just now


def test_each_clone_gets_its_own_entropy(tmp_path: Path) -> None:
    config = machine(tmp_path)
    drawn = {template_boot.identity_body(config)["entropy"] for _ in range(3)}
    assert len(drawn) == 3
    assert "mac" not in template_boot.identity_body(machine(tmp_path, net=False))


def test_an_agent_that_ignores_the_identity_gets_the_three_requests(tmp_path: Path) -> None:
    config = machine(tmp_path)
    with FakeAgent(tmp_path / "agent.sock") as agent:  # READY without "identity"
        client = connect_and_make_own(agent, config, lambda: fresh(config))
        assert client.identity is None
        sent = {f.type for f in agent.received if f.type in PERSONAL}
        assert sent == set(PERSONAL)
        (mac_request,) = agent.frames_of(MsgType.OVERLAY_CONFIG)
        assert mac_request.json() == {"mac": MAC}


def test_a_guest_that_set_another_mac_fails_the_restore(tmp_path: Path) -> None:
    config = machine(tmp_path)
    with FakeAgent(tmp_path / "agent.sock") as agent:
        agent.ready = {
            "version": protocol.PROTOCOL_VERSION,
            "identity": {"entropy_bytes": 64, "mac": "02:00:00:00:00:01"},
        }
        with pytest.raises(GuestError, match="set MAC '02:00:00:00:00:01' instead of"):
            connect_and_make_own(agent, config, lambda: fresh(config))


def test_a_malformed_identity_in_ready_is_refused(tmp_path: Path) -> None:
    config = machine(tmp_path)
    with FakeAgent(tmp_path / "agent.sock") as agent:
        agent.ready = {"version": protocol.PROTOCOL_VERSION, "identity": {"entropy_bytes": "64"}}
        with pytest.raises(MalformedMessage, match=r"identity\.entropy_bytes"):
            connect_and_make_own(agent, config, lambda: fresh(config))


def test_an_identity_that_never_comes_ends_the_handshake_at_its_deadline(tmp_path: Path) -> None:
    async def never() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}

    async def main() -> None:
        await AgentClient.connect(tmp_path / "agent.sock", timeout=0.3, identity=never)

    with FakeAgent(tmp_path / "agent.sock") as agent:
        started = time.monotonic()
        with pytest.raises(GuestError, match=r"identity was not ready within 0\.3s"):
            asyncio.run(main())
        assert time.monotonic() - started < 5
        assert agent.hello is None


def test_identity_entropy_comes_from_the_host_rng(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "urandom", lambda n: b"\x07" * n)
    assert template_boot.identity_body(machine(tmp_path))["entropy"] == "07" * 64
