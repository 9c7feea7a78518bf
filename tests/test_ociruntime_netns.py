"""husk.ociruntime.netns without a VM: parsing what a namespace holds, the LAN slots on
taps (QEMU's command line, LanPorts), and the plumbing in namespaces the test creates."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from husk.errors import CreateFailed, InvalidArgument, NotSupported
from husk.guest.netconfig import LAN_SLOTS, lan_boot_mac
from husk.ociruntime import netns
from husk.sandbox.config import SandboxConfig, machine_config
from husk.sandbox.lan import LanPorts
from husk.vm.machine import DiskConfig, MachineConfig, NetConfig
from husk.vm.qemu_argv import build_command

root_only = pytest.mark.usefixtures("as_root")


def link(name: str = "eth0", **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "ifindex": 2,
        "ifname": name,
        "mtu": 1500,
        "link_type": "ether",
        "address": "0a:58:0a:58:00:02",
        "addr_info": [
            {"family": "inet", "local": "10.88.0.2", "prefixlen": 16, "scope": "global"},
            {"family": "inet6", "local": "fe80::858:aff:fe58:2", "prefixlen": 64, "scope": "link"},
        ],
    }
    entry.update(changes)
    return entry


LO = {"ifname": "lo", "link_type": "loopback", "address": "00:00:00:00:00:00", "mtu": 65536}


# -- what the namespace holds ------------------------------------------------------------
def test_the_engine_interfaces_are_read_lo_tunnels_and_husk_taps_left_out() -> None:
    tunnel = {"ifname": "tunl0", "link_type": "ipip", "address": "0.0.0.0", "mtu": 1480}
    tap = link("husktap0", addr_info=[])
    found = netns.parse_interfaces([LO, tunnel, link(), tap])
    assert found == [netns.Interface("eth0", "0a:58:0a:58:00:02", 1500, "10.88.0.2/16")]
    assert netns.parse_interfaces([LO, tunnel]) == []


@pytest.mark.parametrize(
    ("entry", "error", "problem"),
    [
        (link(ifname="eth0; rm -rf /"), CreateFailed, "not an interface name"),
        (link(ifname="-help"), CreateFailed, "not an interface name"),
        (link(ifname=["x"]), CreateFailed, "not an interface name"),
        (link(address="ff:ff:ff:ff:ff:ff"), CreateFailed, "multicast"),
        (link(address="zz"), CreateFailed, "not a MAC"),
        (link(mtu=10), CreateFailed, "MTU"),
        (link(mtu="1500"), CreateFailed, "MTU"),
        (link(addr_info="x"), CreateFailed, "not a list"),
        (
            link(addr_info=[{"family": "inet", "local": "10.1.2.3", "prefixlen": 99}]),
            CreateFailed,
            "bad IPv4",
        ),
        (
            link(addr_info=[{"family": "inet", "local": "x", "prefixlen": 8}]),
            CreateFailed,
            "bad IPv4",
        ),
        (link(addr_info=[]), NotSupported, "no IPv4 address"),
        (
            link(
                addr_info=[
                    {"family": "inet6", "local": "fd00::2", "prefixlen": 64, "scope": "global"}
                ]
            ),
            NotSupported,
            "IPv6 only is not supported",
        ),
        (
            link(
                addr_info=[
                    {"family": "inet", "local": "10.88.0.2", "prefixlen": 16},
                    {"family": "inet", "local": "10.89.0.2", "prefixlen": 16},
                ]
            ),
            NotSupported,
            "2 IPv4 addresses",
        ),
    ],
)
def test_bad_or_unsupported_interfaces_are_refused_by_name(
    entry: dict[str, Any], error: type[Exception], problem: str
) -> None:
    with pytest.raises(error, match=problem):
        netns.parse_interfaces([LO, entry])


def test_not_a_list_and_too_many_interfaces_are_refused() -> None:
    with pytest.raises(CreateFailed, match="not a list"):
        netns.parse_interfaces({"ifname": "eth0"})
    with pytest.raises(CreateFailed, match="not an object"):
        netns.parse_interfaces(["eth0"])
    many = [link(f"eth{n}") for n in range(LAN_SLOTS + 1)]
    with pytest.raises(NotSupported, match=f"at most {LAN_SLOTS}"):
        netns.parse_interfaces(many)


def test_a_global_ipv6_address_is_not_carried_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    dual = link()
    dual["addr_info"].append(
        {"family": "inet6", "local": "fd00::2", "prefixlen": 64, "scope": "global"}
    )
    (found,) = netns.parse_interfaces([dual])
    assert found.address == "10.88.0.2/16"
    assert "fd00::2/64 are not carried" in caplog.text


def test_routes_through_the_interfaces_are_kept_link_routes_first() -> None:
    interfaces = netns.parse_interfaces([link()])
    routes = [
        {"dst": "default", "gateway": "169.254.1.1", "dev": "eth0", "flags": ["onlink"]},
        {"dst": "10.88.0.0/16", "dev": "eth0", "protocol": "kernel", "scope": "link"},
        {"dst": "169.254.1.1", "dev": "eth0", "scope": "link"},
        {"dst": "10.99.0.0/24", "gateway": "10.88.0.1", "dev": "eth0", "metric": 10},
        {"dst": "10.99.0.0/24", "gateway": "10.88.0.9", "dev": "eth0", "metric": 20},
        {"dst": "10.77.0.0/16", "dev": "lo"},
        {"dst": "10.66.0.0/16", "type": "blackhole"},
    ]
    (interface,) = netns.parse_routes(routes, interfaces)
    assert interface.routes == [
        {"destination": "169.254.1.1/32", "gateway": None},
        {"destination": "0.0.0.0/0", "gateway": "169.254.1.1"},
        {"destination": "10.99.0.0/24", "gateway": "10.88.0.1"},
    ]


@pytest.mark.parametrize(
    ("routes", "error", "problem"),
    [
        ({"dst": "default"}, CreateFailed, "not a list"),
        (["x"], CreateFailed, "not an object"),
        ([{"dst": "10.0.0.1/8", "dev": "eth0"}], CreateFailed, "not an IPv4 destination"),
        ([{"dst": "fd00::/8", "dev": "eth0"}], CreateFailed, "not an IPv4 destination"),
        ([{"dst": "10.0.0.0/8", "gateway": "fd00::1", "dev": "eth0"}], CreateFailed, "not IPv4"),
        ([{"dst": "default", "nexthops": []}], NotSupported, "multipath"),
    ],
)
def test_bad_routes_are_refused(routes: Any, error: type[Exception], problem: str) -> None:
    with pytest.raises(error, match=problem):
        netns.parse_routes(routes, netns.parse_interfaces([link()]))


def test_the_network_body_is_the_guests_checked_state() -> None:
    (interface,) = netns.parse_routes(
        [{"dst": "default", "gateway": "10.88.0.1", "dev": "eth0"}],
        netns.parse_interfaces([link()]),
    )
    body = netns.network_body([interface])
    assert body["egress"] is False and body["names"] is None and body["hosts"] is None
    assert body["lans"] == [
        {
            "slot": 1,
            "mac": "0a:58:0a:58:00:02",
            "address": "10.88.0.2/16",
            "mtu": 1500,
            "gateway": None,
            "routes": [{"destination": "0.0.0.0/0", "gateway": "10.88.0.1"}],
        }
    ]
    looped = netns.Interface(
        "eth0",
        "0a:58:0a:58:00:02",
        1500,
        "10.88.0.2/16",
        [{"destination": "127.0.0.0/8", "gateway": None}],
    )
    with pytest.raises(CreateFailed, match="cannot be routed"):
        netns.network_body([looped])


# -- the LAN slots on taps ---------------------------------------------------------------
def machine(tmp_path: Path, **changes: Any) -> MachineConfig:
    settings: dict[str, Any] = {
        "kernel": tmp_path / "vmlinux",
        "initrd": tmp_path / "initrd",
        "state_dir": tmp_path / "vm",
        "disks": [DiskConfig(tmp_path / "image", "husk-image", readonly=True)],
        "net": NetConfig("02:11:22:33:44:55"),
        "lan_slots": 4,
        "lan_fds": (20, 21, 22, 23),
    }
    settings.update(changes)
    return MachineConfig(**settings)


def test_a_tap_slot_is_the_same_virtio_net_device_on_a_tap_backend(tmp_path: Path) -> None:
    command = build_command(
        machine(tmp_path, lan_taps=(2,)),
        binary="qemu",
        accel="tcg",
        qmp_fd=5,
        agent_fd=6,
        boot_time_ns=1,
    )
    netdevs = [command[i + 1] for i, word in enumerate(command) if word == "-netdev"]
    assert netdevs == [
        "user,id=net0",
        "socket,id=lan1,fd=20",
        "tap,id=lan2,fd=21,vhost=off",
        "socket,id=lan3,fd=22",
        "socket,id=lan4,fd=23",
    ]
    assert f"virtio-net-device,netdev=lan2,mac={lan_boot_mac(2)}" in command


def test_tap_slots_must_be_distinct_lan_slots(tmp_path: Path) -> None:
    for taps in ((0,), (5,), (1, 1)):
        with pytest.raises(InvalidArgument, match="tap LAN slots"):
            machine(tmp_path, lan_taps=taps)


def test_lan_ports_give_qemu_the_taps_and_keep_no_switch_end_for_them() -> None:
    tap_a, tap_b = os.pipe()  # stand-ins for tap descriptors: never closed by LanPorts
    try:
        ports = LanPorts(taps={1: tap_a, 3: tap_b})
        fds = ports.qemu_fds()
        assert len(fds) == LAN_SLOTS and fds[0] == tap_a and fds[2] == tap_b
        assert sorted(ports.switch_ends) == [2, 4]
        ports.close()
        os.fstat(tap_a), os.fstat(tap_b)  # still open: the caller's
    finally:
        os.close(tap_a)
        os.close(tap_b)
    with pytest.raises(InvalidArgument, match="not a slot"):
        LanPorts(taps={LAN_SLOTS + 1: 0})
    with pytest.raises(InvalidArgument, match="not a tap descriptor"):
        LanPorts(taps={1: -1})


def test_the_sandbox_config_puts_its_taps_on_the_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("vmlinux", "initrd"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("HUSK_KERNEL", str(tmp_path / "vmlinux"))
    monkeypatch.setenv("HUSK_INITRD", str(tmp_path / "initrd"))
    config = SandboxConfig(
        state_dir=tmp_path / "vm",
        image_disk=tmp_path / "image",
        upper_disk=None,
        hostname="h",
        mac="02:11:22:33:44:55",
        lan_taps={2: 9},
    )
    ports = LanPorts(taps=config.lan_taps)
    try:
        planned = machine_config(config, ports.qemu_fds())
        assert planned.lan_taps == (2,) and planned.lan_fds[1] == 9
        # A plan without descriptors (a template's key) has no taps either.
        assert machine_config(config).lan_taps == ()
    finally:
        ports.close()


# -- attach ----------------------------------------------------------------------------
def test_attach_refuses_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NotSupported, match="needs root"):
        netns.attach("/run/netns/x")


@root_only
@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("", "is not a path"),
        ("/nonexistent/netns", "No such file"),
        ("/etc/hostname", "is not a network namespace"),
        ("/proc/self/ns/mnt", "is not a network namespace"),
        ("/proc/self/ns/net", "the host's own network namespace"),
    ],
)
def test_attach_refuses_what_is_no_engine_namespace(path: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        netns.attach(path)


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"husk-test-n-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def tc_qdiscs(name: str, device: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", name, "tc", "qdisc", "show", "dev", device],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@root_only
def test_a_namespace_with_only_loopback_gives_no_attachment(namespace: str) -> None:
    assert netns.attach(f"/run/netns/{namespace}") is None


@pytest.fixture
def peer() -> Iterator[str]:
    name = f"husk-test-q-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def links(name: str) -> list[str]:
    return [entry["ifname"] for entry in json.loads(ip("-n", name, "-json", "link", "show"))]


@root_only
def test_attach_plumbs_a_tap_per_interface_and_close_removes_it(namespace: str, peer: str) -> None:
    veth = ["type", "veth", "peer", "name", "peer0", "netns", peer]
    ip("-n", namespace, "link", "add", "eth0", "mtu", "1400", *veth)
    ip("-n", namespace, "addr", "add", "10.88.0.2/24", "dev", "eth0")
    ip("-n", namespace, "link", "set", "eth0", "up")
    ip("-n", peer, "link", "set", "peer0", "up")
    ip("-n", namespace, "route", "add", "default", "via", "10.88.0.1")
    ip("-n", namespace, "link", "add", "eth1", "type", "veth", "peer", "name", "peer1")
    # eth1 has no IPv4 address: it cannot be carried, so attach fails, leaving nothing.
    with pytest.raises(NotSupported, match=r"(eth1|peer1) has no IPv4"):
        netns.attach(f"/run/netns/{namespace}")
    assert sorted(links(namespace)) == ["eth0", "eth1", "lo", "peer1"]
    ip("-n", namespace, "link", "del", "eth1")
    # An engine's own ingress qdisc is never replaced (nor removed).
    tc = ["ip", "netns", "exec", namespace, "tc", "qdisc"]
    subprocess.run([*tc, "add", "dev", "eth0", "ingress"], check=True)
    with pytest.raises(NotSupported, match="eth0 already has an ingress qdisc"):
        netns.attach(f"/run/netns/{namespace}")
    assert sorted(links(namespace)) == ["eth0", "lo"]
    assert "ingress" in tc_qdiscs(namespace, "eth0")
    subprocess.run([*tc, "del", "dev", "eth0", "ingress"], check=True)

    attachment = netns.attach(f"/run/netns/{namespace}")
    assert attachment is not None
    with attachment:
        assert list(attachment.taps) == [1] and attachment.interfaces == {1: "eth0"}
        assert attachment.network["lans"][0]["mtu"] == 1400
        assert sorted(links(namespace)) == ["eth0", "husktap0", "lo"]
        tap = json.loads(ip("-n", namespace, "-json", "link", "show", "husktap0"))[0]
        assert tap["mtu"] == 1400 and "UP" in tap["flags"]
        assert "ingress" in tc_qdiscs(namespace, "eth0")
        # A frame written to the tap (the guest sending) leaves through eth0 to the peer.
        os.write(
            attachment.taps[1],
            b"\xff" * 6 + bytes.fromhex("0a5800000001") + b"\x88\xb5" + b"x" * 50,
        )
        stats = json.loads(ip("-n", peer, "-json", "-s", "link", "show", "peer0"))[0]
        assert stats["stats64"]["rx"]["packets"] >= 1
    attachment.close()  # idempotent
    assert sorted(links(namespace)) == ["eth0", "lo"]
    assert "ingress" not in tc_qdiscs(namespace, "eth0")
    # The engine's address and route never left.
    assert "10.88.0.2/24" in ip("-n", namespace, "addr", "show", "eth0")
    assert "default via 10.88.0.1" in ip("-n", namespace, "route")
