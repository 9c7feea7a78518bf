"""A restored clone's identity carried by the HELLO: the agent's side, without a VM.

The kernel calls (RNDADDENTROPY, clock_settime, SIOCSIFHWADDR) are replaced by
recorders; the real ones run in tests/test_templates.py's clones.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from husk.guest import protocol
from husk.guest.agent import identity, system
from husk.guest.agent.loop import Loop
from husk.guest.agent.main import Agent
from husk.guest.protocol import Decoder, Frame, MsgType

GOOD = {"entropy": "ab" * 64, "mac": "02:00:00:aa:bb:cc"}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """The kernel calls identity.apply makes, in order."""
    made: list[tuple[str, Any]] = []
    monkeypatch.setattr(system, "add_entropy", lambda data: made.append(("entropy", data)))
    monkeypatch.setattr(system, "set_clock", lambda ns: made.append(("clock", ns)))
    monkeypatch.setattr(
        system, "set_mac", lambda mac, interface="eth0": made.append(("mac", (mac, interface)))
    )
    return made


def test_an_identity_is_applied_entropy_first_then_the_mac_and_never_the_clock(
    calls: list[tuple[str, Any]],
) -> None:
    waited: list[bool] = []
    # A clock in the HELLO would be stale by the time a waking clone reads it: ignored.
    body = {**GOOD, "unix_ns": 1_700_000_000_000_000_000}
    applied = identity.apply(identity.parse(body), lambda: waited.append(True))
    assert calls == [
        ("entropy", bytes.fromhex(GOOD["entropy"])),
        ("mac", ("02:00:00:aa:bb:cc", "eth0")),
    ]
    assert waited == [True]  # the boot-time eth0 setup is waited for before the MAC
    assert applied == {"entropy_bytes": 64, "mac": "02:00:00:aa:bb:cc"}


def test_an_identity_without_a_mac_leaves_the_interface_alone(
    calls: list[tuple[str, Any]],
) -> None:
    body = {k: v for k, v in GOOD.items() if k != "mac"}
    applied = identity.apply(identity.parse(body), lambda: pytest.fail("waited for eth0"))
    assert [name for name, _ in calls] == ["entropy"]
    assert applied == {"entropy_bytes": 64}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("ab", "must be an object"),
        ({**GOOD, "entropy": "zz" * 32}, "not hex"),
        ({**GOOD, "entropy": "ab" * 8}, "at least 16 bytes"),
        ({**GOOD, "entropy": "ab" * 513}, "at most 512 bytes"),
        ({**GOOD, "entropy": 7}, "hex string"),
        ({k: v for k, v in GOOD.items() if k != "entropy"}, "hex string"),
        ({**GOOD, "mac": 5}, "mac must be a string"),
    ],
)
def test_a_malformed_identity_is_refused(body: Any, problem: str) -> None:
    with pytest.raises(identity.IdentityError, match=problem):
        identity.parse(body)


class Wire:
    """What the agent sends, decoded."""

    def __init__(self) -> None:
        self.decoder = Decoder()
        self.frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        for item in self.decoder.feed(data):
            assert isinstance(item, Frame)
            self.frames.append(item)


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Agent, Wire]]:
    loop = Loop()
    try:
        agent = Agent(loop)
        wire = Wire()
        monkeypatch.setattr(agent, "send", wire.send)
        yield agent, wire
    finally:
        signal.set_wakeup_fd(-1)


def hello(body: dict[str, Any]) -> Frame:
    payload = json.dumps(body).encode()
    return Frame(MsgType.HELLO, protocol.CONTROL_CHANNEL, payload)


def test_a_hello_with_an_identity_sets_it_before_ready_says_so(
    agent: tuple[Agent, Wire], calls: list[tuple[str, Any]]
) -> None:
    server, wire = agent
    server.on_frame(hello({"version": protocol.PROTOCOL_VERSION, "identity": GOOD}))
    assert [name for name, _ in calls] == ["entropy", "mac"]
    (ready,) = wire.frames
    assert ready.type is MsgType.READY
    assert ready.json()["identity"] == {"entropy_bytes": 64, "mac": GOOD["mac"]}


def test_a_hello_without_an_identity_changes_nothing(
    agent: tuple[Agent, Wire], calls: list[tuple[str, Any]]
) -> None:
    server, wire = agent
    server.on_frame(hello({"version": protocol.PROTOCOL_VERSION}))
    assert calls == []
    (ready,) = wire.frames
    assert ready.type is MsgType.READY and "identity" not in ready.json()


def test_a_hello_with_a_bad_identity_is_refused_and_sets_nothing(
    agent: tuple[Agent, Wire], calls: list[tuple[str, Any]]
) -> None:
    server, wire = agent
    bad = {**GOOD, "entropy": "not hex"}
    server.on_frame(hello({"version": protocol.PROTOCOL_VERSION, "identity": bad}))
    assert calls == []
    (error,) = wire.frames
    assert error.type is MsgType.ERROR and "not hex" in error.json()["message"]
