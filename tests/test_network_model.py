"""The network model without a daemon: IPAM, records, the store, names and the guest body."""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from husk.errors import Conflict, InvalidArgument, NotSupported
from husk.guest import netstate
from husk.network import ipam
from husk.network.model import Endpoint, Member, Network, endpoints_from_json, mac_for
from husk.network.names import dns_names, guest_network_body, names_table, unreachable
from husk.network.store import NetworkStore

# -- IPAM ---------------------------------------------------------------------------------


def test_subnets_come_from_dockers_pools_and_skip_taken_ones() -> None:
    assert ipam.choose_subnet([]) == IPv4Network("172.18.0.0/16")
    taken = [IPv4Network("172.17.0.0/16"), IPv4Network("172.18.0.0/16")]
    assert ipam.choose_subnet(taken) == IPv4Network("172.19.0.0/16")
    # A user subnet inside 172.20/16 makes that whole pool entry unusable.
    assert ipam.choose_subnet([*taken, IPv4Network("172.19.5.0/24")]) == IPv4Network(
        "172.20.0.0/16"
    )
    every_16 = [IPv4Network(f"172.{n}.0.0/16") for n in range(17, 32)]
    assert ipam.choose_subnet(every_16) == IPv4Network("192.168.0.0/20")
    assert ipam.choose_subnet([*every_16, IPv4Network("192.168.0.0/20")]) == IPv4Network(
        "192.168.16.0/20"
    )
    everything = [*every_16, IPv4Network("192.168.0.0/16")]
    with pytest.raises(Conflict, match="non-overlapping"):
        ipam.choose_subnet(everything)


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ("10.1.0.0", InvalidArgument, "prefix length is missing"),
        ("banana/16", InvalidArgument, "invalid subnet"),
        ("10.1.0.0/33", InvalidArgument, "invalid subnet"),
        ("10.1.2.3/16", InvalidArgument, "it should be 10.1.0.0/16"),
        ("10.1.0.0/31", InvalidArgument, "too small"),
        ("10.0.2.0/24", InvalidArgument, "husk's VMs use themselves"),
        ("10.0.0.0/8", InvalidArgument, "husk's VMs use themselves"),
        ("10.0.3.128/25", InvalidArgument, "husk's VMs use themselves"),
        ("127.1.0.0/16", InvalidArgument, "overlaps 127.0.0.0/8"),
        ("fd00::/64", NotSupported, "IPv6"),
    ],
)
def test_bad_subnets_are_refused_with_the_reason(
    text: str, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        ipam.parse_subnet(text)


def test_a_subnet_overlapping_another_network_is_refused() -> None:
    subnet = ipam.parse_subnet("172.18.128.0/20")
    with pytest.raises(Conflict, match=re.escape("overlaps 172.18.0.0/16 of network web")):
        ipam.check_free(subnet, [("web", IPv4Network("172.18.0.0/16"))])
    ipam.check_free(subnet, [("db", IPv4Network("172.19.0.0/16"))])


def test_gateways_must_be_host_addresses_of_the_subnet() -> None:
    subnet = IPv4Network("10.10.0.0/24")
    assert ipam.check_gateway(subnet, "10.10.0.254") == IPv4Address("10.10.0.254")
    for bad, words in (
        ("10.11.0.1", "not in subnet"),
        ("10.10.0.0", "network or broadcast"),
        ("10.10.0.255", "network or broadcast"),
        ("nope", "not an IP address"),
    ):
        with pytest.raises(InvalidArgument, match=words):
            ipam.check_gateway(subnet, bad)
    assert ipam.default_gateway(subnet) == IPv4Address("10.10.0.1")


def test_addresses_start_at_two_skip_the_used_and_honour_a_wanted_one() -> None:
    subnet, gateway = IPv4Network("10.10.0.0/29"), IPv4Address("10.10.0.1")
    assert str(ipam.allocate_address(subnet, gateway, set())) == "10.10.0.2"
    assert str(ipam.allocate_address(subnet, gateway, {"10.10.0.2"})) == "10.10.0.3"
    # A gateway elsewhere in the subnet frees .1 and takes its own address.
    other_gateway = IPv4Address("10.10.0.6")
    assert str(ipam.allocate_address(subnet, other_gateway, set())) == "10.10.0.1"
    assert str(ipam.allocate_address(subnet, gateway, set(), "10.10.0.5")) == "10.10.0.5"
    with pytest.raises(Conflict, match=re.escape("Address already in use: 10.10.0.5")):
        ipam.allocate_address(subnet, gateway, {"10.10.0.5"}, "10.10.0.5")
    with pytest.raises(InvalidArgument, match="not in the subnet"):
        ipam.allocate_address(subnet, gateway, set(), "10.10.1.5")
    for reserved in ("10.10.0.0", "10.10.0.1", "10.10.0.7"):
        with pytest.raises(InvalidArgument, match="reserved"):
            ipam.allocate_address(subnet, gateway, set(), reserved)
    full = {f"10.10.0.{n}" for n in range(2, 7)}
    with pytest.raises(Conflict, match="full"):
        ipam.allocate_address(subnet, gateway, full)


# -- records ----------------------------------------------------------------------------------


def test_macs_are_dockers_02_42_and_the_address() -> None:
    assert mac_for("172.18.0.2") == "02:42:ac:12:00:02"
    assert mac_for("192.168.16.255") == "02:42:c0:a8:10:ff"


def _endpoint(network: Network, address: str, slot: int = 1, **extra: object) -> Endpoint:
    return Endpoint(
        network_id=network.id,
        network_name=network.name,
        slot=slot,
        address=address,
        prefix_len=network.prefix_len,
        gateway=network.gateway,
        mac=mac_for(address),
        **extra,  # type: ignore[arg-type]
    )


def test_endpoints_survive_a_json_round_trip_and_bad_ones_are_refused() -> None:
    net = Network(id="a" * 64, name="web", subnet="172.18.0.0/16", gateway="172.18.0.1")
    endpoint = _endpoint(net, "172.18.0.7", aliases=["api"])
    data = json.loads(json.dumps({"web": endpoint.to_json()}))
    assert endpoints_from_json(data) == {"web": endpoint}
    assert endpoints_from_json(None) == {}
    with pytest.raises(ValueError):
        endpoints_from_json([1])
    with pytest.raises(ValueError):
        endpoints_from_json({"web": {**endpoint.to_json(), "address": "nope"}})


# -- the store --------------------------------------------------------------------------------


def test_the_store_makes_the_predefined_networks_once_and_keeps_their_ids(
    tmp_path: Path,
) -> None:
    store = NetworkStore(tmp_path)
    names = [n.name for n in store.all()]
    assert names == ["bridge", "host", "none"]
    bridge = store.find_by_name("bridge")
    assert bridge is not None and (bridge.subnet, bridge.gateway) == (
        "172.17.0.0/16",
        "172.17.0.1",
    )
    assert not bridge.user_defined and bridge.driver == "bridge"
    none = store.find_by_name("none")
    assert none is not None and none.driver == "null" and not none.addressed
    user = Network(id="b" * 64, name="web", subnet="172.18.0.0/16", gateway="172.18.0.1")
    store.save(user)
    again = NetworkStore(tmp_path)
    assert again.find_by_name("bridge") == bridge
    assert again.find("b" * 64) == user
    again.delete(user.id)
    assert NetworkStore(tmp_path).find(user.id) is None
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_unreadable_network_file_costs_only_that_network(tmp_path: Path) -> None:
    NetworkStore(tmp_path)
    (tmp_path / ("c" * 64 + ".json")).write_text("{not json")
    store = NetworkStore(tmp_path)
    assert [n.name for n in store.all()] == ["bridge", "host", "none"]


# -- names and the guest body -------------------------------------------------------------------

BRIDGE = Network(id="0" * 64, name="bridge", subnet="172.17.0.0/16", gateway="172.17.0.1")
WEB = Network(id="1" * 64, name="web", subnet="172.18.0.0/16", gateway="172.18.0.1")
BACK = Network(
    id="2" * 64,
    name="back",
    subnet="172.19.0.0/16",
    gateway="172.19.0.1",
    internal=True,
    options={"com.docker.network.driver.mtu": "1400"},
)
OTHER = Network(id="3" * 64, name="other", subnet="172.20.0.0/16", gateway="172.20.0.1")
NETWORKS = {n.id: n for n in (BRIDGE, WEB, BACK, OTHER)}


def _member(cid: str, name: str, *endpoints: Endpoint, running: bool = True) -> Member:
    return Member(
        id=cid * 64,
        name=name,
        running=running,
        endpoints={e.network_name: e for e in endpoints},
    )


def test_dns_names_are_name_aliases_short_id_and_hostname_on_user_networks_only() -> None:
    member = _member("a", "api", _endpoint(WEB, "172.18.0.2", aliases=["svc", "api"]))
    member.hostname = "apihost"
    assert dns_names(member, WEB, member.endpoints["web"]) == [
        "api",
        "svc",
        "a" * 12,
        "apihost",
    ]
    on_bridge = _member("a", "api", _endpoint(BRIDGE, "172.17.0.2"))
    assert dns_names(on_bridge, BRIDGE, on_bridge.endpoints["bridge"]) is None


def test_names_table_holds_running_members_of_shared_user_networks() -> None:
    me = _member("a", "client", _endpoint(WEB, "172.18.0.2", 1), _endpoint(BACK, "172.19.0.2", 2))
    web = _member("b", "web", _endpoint(WEB, "172.18.0.3", aliases=["www"]))
    db = _member("c", "DB", _endpoint(BACK, "172.19.0.3", aliases=["www"]))
    stopped = _member("d", "old", _endpoint(WEB, "172.18.0.4"), running=False)
    elsewhere = _member("e", "far", _endpoint(OTHER, "172.20.0.2"))
    table = names_table(me, [me, web, db, stopped, elsewhere], NETWORKS)
    assert table is not None
    assert table["client"] == ["172.18.0.2", "172.19.0.2"]
    assert table["web"] == ["172.18.0.3"] and table["b" * 12] == ["172.18.0.3"]
    assert table["db"] == ["172.19.0.3"]  # lowercase: DNS names ignore case
    assert table["www"] == ["172.18.0.3", "172.19.0.3"]  # in the order of my slots
    assert "old" not in table and "far" not in table and "e" * 12 not in table


def test_default_bridge_and_none_resolve_no_names() -> None:
    me = _member("a", "solo", _endpoint(BRIDGE, "172.17.0.2"))
    peer = _member("b", "peer", _endpoint(BRIDGE, "172.17.0.3"))
    assert names_table(me, [me, peer], NETWORKS) is None
    isolated = Member(id="f" * 64, name="alone", network_mode="none")
    body = guest_network_body(isolated, [me, peer], NETWORKS)
    assert body["names"] is None and body["lans"] == [] and body["egress"] is False
    # what the guest accepts: no address for its own name (no line in /etc/hosts)
    assert netstate.check(body)["hosts"]["address"] is None


def test_unreachable_lists_every_other_husk_subnet() -> None:
    me = _member("a", "client", _endpoint(WEB, "172.18.0.2"))
    assert unreachable(me, NETWORKS.values()) == [
        "172.17.0.0/16",
        "172.19.0.0/16",
        "172.20.0.0/16",
    ]


def test_the_guest_body_follows_the_contract() -> None:
    me = _member("a", "client", _endpoint(BACK, "172.19.0.2", 2), _endpoint(WEB, "172.18.0.2", 1))
    me.dns, me.dns_search, me.dns_options = ["9.9.9.9"], ["example.org"], ["ndots:2"]
    me.extra_hosts = ["host:1.2.3.4"]
    web = _member("b", "web", _endpoint(WEB, "172.18.0.3"))
    body = guest_network_body(me, [web], NETWORKS)
    assert body == {
        "egress": True,
        "lans": [
            {
                "slot": 1,
                "mac": "02:42:ac:12:00:02",
                "address": "172.18.0.2/16",
                "mtu": 65520,
                "gateway": "172.18.0.1",  # the host, as on Docker's bridge
            },
            # an internal network's gateway leads nowhere
            {"slot": 2, "mac": "02:42:ac:13:00:02", "address": "172.19.0.2/16", "mtu": 1400},
        ],
        "unreachable": ["172.17.0.0/16", "172.20.0.0/16"],
        "names": {
            "client": ["172.18.0.2", "172.19.0.2"],
            "a" * 12: ["172.18.0.2", "172.19.0.2"],
            "web": ["172.18.0.3"],
            "b" * 12: ["172.18.0.3"],
        },
        "dns": {"servers": ["9.9.9.9"], "search": ["example.org"], "options": ["ndots:2"]},
        "hosts": {"hostname": "a" * 12, "address": "172.18.0.2", "extra": ["host:1.2.3.4"]},
    }
    json.dumps(body)  # it travels as JSON


def test_egress_needs_a_network_that_is_not_internal() -> None:
    internal_only = _member("a", "x", _endpoint(BACK, "172.19.0.2"))
    assert guest_network_body(internal_only, [], NETWORKS)["egress"] is False
    nothing = _member("a", "x")
    assert guest_network_body(nothing, [], NETWORKS)["egress"] is False
    both = _member("a", "x", _endpoint(BACK, "172.19.0.2"), _endpoint(BRIDGE, "172.17.0.2", 2))
    assert guest_network_body(both, [], NETWORKS)["egress"] is True
