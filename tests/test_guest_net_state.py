"""The NETWORK message's body and reply: checked on the host, and again in the guest."""

from __future__ import annotations

import json
from typing import Any

import pytest

from husk.agent import messages
from husk.errors import InvalidArgument
from husk.guest import netstate, protocol
from husk.guest.netconfig import LAN_MTU
from husk.guest.protocol import MsgType


def full_body() -> dict[str, Any]:
    return {
        "egress": False,
        "lans": [
            {"slot": 1, "mac": "02:42:AC:12:00:02", "address": "172.18.0.2/16", "mtu": 1500},
            {
                "slot": 3,
                "mac": "02:42:ac:13:00:05",
                "address": "172.19.0.5/16",
                "gateway": "172.19.0.1",
            },
        ],
        "unreachable": ["172.20.0.0/16", "172.20.1.0/16", "10.9.8.7/8"],
        "names": {"Web": ["172.18.0.3"], "web.": ["172.18.0.9", "172.18.0.3"], "db": []},
        "dns": {"servers": ["1.1.1.1", "2001:db8::1"], "search": ["corp"], "options": ["ndots:2"]},
        "hosts": {"hostname": "abc", "address": "172.18.0.2", "extra": ["host:1.2.3.4"]},
    }


def test_a_full_state_is_normalised() -> None:
    state = netstate.check(full_body())
    assert state["egress"] is False
    assert state["lans"] == [
        {
            "slot": 1,
            "mac": "02:42:ac:12:00:02",
            "address": "172.18.0.2/16",
            "mtu": 1500,
            "gateway": None,
            "routes": [],
        },
        {
            "slot": 3,
            "mac": "02:42:ac:13:00:05",
            "address": "172.19.0.5/16",
            "mtu": LAN_MTU,
            "gateway": "172.19.0.1",
            "routes": [],
        },
    ]
    assert state["unreachable"] == ["172.20.0.0/16", "10.0.0.0/8"]
    # Names are keyed lower case without the final dot; duplicates merge.
    assert state["names"] == {"web": ["172.18.0.3", "172.18.0.9"], "db": []}
    assert state["dns"] == {
        "servers": ["1.1.1.1", "2001:db8::1"],
        "search": ["corp"],
        "options": ["ndots:2"],
    }
    hosts = {"hostname": "abc", "address": "172.18.0.2", "extra": ["1.2.3.4\thost"]}
    assert state["hosts"] == hosts


def test_an_empty_state_means_everything_off_but_egress() -> None:
    assert netstate.check({}) == {
        "egress": True,
        "lans": [],
        "unreachable": [],
        "names": None,
        "dns": {"servers": [], "search": [], "options": []},
        "hosts": None,
    }


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"egress": "yes"}, "egress"),
        ({"lans": {"slot": 1}}, "lans must be a list"),
        ({"lans": [{"slot": 0, "mac": "02:00:00:00:00:01", "address": "1.2.3.4/8"}]}, "slot"),
        ({"lans": [{"slot": 5, "mac": "02:00:00:00:00:01", "address": "1.2.3.4/8"}]}, "slot"),
        ({"lans": [{"slot": True, "mac": "02:00:00:00:00:01", "address": "1.2.3.4/8"}]}, "slot"),
        ({"lans": [{"slot": 1, "mac": "01:00:5e:00:00:01", "address": "1.2.3.4/8"}]}, "multicast"),
        ({"lans": [{"slot": 1, "mac": "02:00:00:00:01", "address": "1.2.3.4/8"}]}, "MAC"),
        ({"lans": [{"slot": 1, "mac": "02:00:00:00:00:01", "address": "1.2.3.4"}]}, "prefix"),
        ({"lans": [{"slot": 1, "mac": "02:00:00:00:00:01", "address": "fd00::1/64"}]}, "IPv4"),
        (
            {"lans": [{"slot": 1, "mac": "02:00:00:00:00:01", "address": "1.2.3.4/8", "mtu": 9}]},
            "mtu",
        ),
        (
            {
                "lans": [
                    {"slot": 2, "mac": "02:00:00:00:00:01", "address": "1.2.3.4/8"},
                    {"slot": 2, "mac": "02:00:00:00:00:02", "address": "1.2.3.5/8"},
                ]
            },
            "twice",
        ),
        (
            {
                "lans": [
                    {"slot": 1, "mac": "02:00:00:00:00:01", "address": "1.2.3.4/8", "gateway": "x"}
                ]
            },
            "gateway",
        ),
        ({"unreachable": ["nowhere"]}, "IPv4 network"),
        ({"unreachable": "10.0.0.0/8"}, "list"),
        ({"names": ["web"]}, "object"),
        ({"names": {"bad name": ["1.2.3.4"]}}, "DNS name"),
        ({"names": {"web": ["not-an-ip"]}}, "IPv4"),
        ({"names": {"web": "1.2.3.4"}}, "list"),
        ({"dns": {"servers": ["dns.example"]}}, "IP address"),
        ({"dns": {"search": ["two words"]}}, "one word"),
        ({"hosts": {"hostname": "a b", "address": "1.2.3.4"}}, "one word"),
        ({"hosts": {"hostname": "a", "address": "1.2.3.4", "extra": ["x\nevil"]}}, "lines"),
        ({"hosts": {"hostname": "a", "address": "1.2.3.4", "extra": ["nocolon"]}}, "neither"),
        ({"hosts": {"hostname": "a", "address": "1.2.3.4", "extra": ["x:999.1.1.1"]}}, "IP"),
        ({"lans": [None] * 5}, "more than"),
    ],
)
def test_bad_states_name_the_field(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        netstate.check(change)
    # The host's client refuses the same body before sending it, as InvalidArgument.
    with pytest.raises(InvalidArgument, match="invalid container network state"):
        messages.network_body(change)


def test_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError, match="object"):
        netstate.check([1, 2])


def _reply(body: Any) -> protocol.Frame:
    return protocol.Frame(MsgType.OK, 3, json.dumps(body).encode())


def test_the_reply_names_interfaces_by_slot() -> None:
    assert messages.network_config_reply(_reply({"interfaces": {"1": "eth1", "4": "eth4"}})) == {
        "interfaces": {"1": "eth1", "4": "eth4"}
    }


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"interfaces": ["eth1"]},
        {"interfaces": {"9": "eth9"}},
        {"interfaces": {"1": "eth1; rm -rf /"}},
        {"interfaces": {"1": 5}},
        {"interfaces": {str(i): f"eth{i}" for i in range(1, 7)}},
    ],
)
def test_a_malformed_reply_is_a_guest_fault(body: dict[str, Any]) -> None:
    with pytest.raises(messages.MalformedMessage):
        messages.network_config_reply(_reply(body))


# -- a routed LAN (an engine's network namespace, husk.ociruntime.netns) --------------------
def routed(*routes: Any, egress: bool = False, slot: int = 1) -> dict[str, Any]:
    lan = {"slot": slot, "mac": "0a:58:0a:58:00:02", "address": "10.88.0.2/16", "mtu": 1500}
    return {"egress": egress, "lans": [{**lan, "routes": list(routes)}]}


def test_a_routed_lan_keeps_its_routes_in_order() -> None:
    state = netstate.check(
        routed(
            {"destination": "169.254.1.1/32"},
            {"destination": "0.0.0.0/0", "gateway": "169.254.1.1"},
            {"destination": "10.99.0.0/24", "gateway": "10.88.0.1"},
        )
    )
    assert state["lans"][0]["routes"] == [
        {"destination": "169.254.1.1/32", "gateway": None},
        {"destination": "0.0.0.0/0", "gateway": "169.254.1.1"},
        {"destination": "10.99.0.0/24", "gateway": "10.88.0.1"},
    ]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (routed({"destination": "0.0.0.0/0", "gateway": "10.88.0.1"}, egress=True), "egress false"),
        (
            {
                "egress": False,
                "lans": [
                    routed({"destination": "0.0.0.0/0", "gateway": "10.88.0.1"})["lans"][0],
                    {
                        **routed({"destination": "0.0.0.0/0", "gateway": "10.88.0.1"}, slot=2)[
                            "lans"
                        ][0],
                        "mac": "0a:58:0a:58:00:03",
                    },
                ],
            },
            "more than one LAN",
        ),
        (routed("10.0.0.0/8"), r"routes\[0\] must be an object"),
        (routed({"destination": "10.0.0.1/8"}), "not an IPv4 network"),
        (routed({"destination": "fd00::/8"}), "not an IPv4 network"),
        (routed({"destination": None}), "non-empty string"),
        (routed({"destination": "127.0.0.0/8"}), "cannot be routed"),
        (routed({"destination": "224.0.0.0/4"}), "cannot be routed"),
        (routed({"destination": "0.0.0.0/1"}), "cannot be routed"),
        (routed({"destination": "10.9.0.0/16", "gateway": "127.0.0.1"}), "cannot be a gateway"),
        (routed({"destination": "10.9.0.0/16", "gateway": "10.88.0.2"}), "cannot be a gateway"),
        (routed({"destination": "10.9.0.0/16", "gateway": "255.255.255.255"}), "gateway"),
        (routed({"destination": "10.9.0.0/16", "gateway": "fd00::1"}), "IPv4 address"),
        (routed({"destination": "10.9.0.0/16"}, {"destination": "10.9.0.0/16"}), "twice"),
        (routed(*[{"destination": f"10.{n}.0.0/16"} for n in range(65)]), "more than 64"),
    ],
)
def test_bad_routes_name_the_field(body: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        netstate.check(body)
