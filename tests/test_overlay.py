"""The WireGuard overlay without a VM: the host's checks and endpoint rewriting, the guest's
netlink messages (built and parsed back byte by byte), resolv.conf, the CLI's reading and
report, and the gateway's UDP relay (its bounds, and a real relay out of a network
namespace the test creates)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from husk.errors import InvalidArgument
from husk.guest.agent import wireguard as wg
from husk.guest.netconfig import GUEST_GATEWAY
from husk.network import overlay
from husk.network.overlay import MAX_PEERS, guest_reply
from husk.runtime import gateway as gw

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(1, 33))).decode()
KEY_C = base64.b64encode(bytes(range(2, 34))).decode()


def config(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "overlay_ip": "10.200.0.1",
        "prefix_len": 24,
        "private_key": KEY_A,
        "listen_port": 51820,
        "peers": [
            {
                "public_key": KEY_B,
                "endpoint": "127.0.0.1:40002",
                "allowed_ips": ["10.200.0.2/32"],
                "persistent_keepalive_secs": 5,
            },
            {
                "public_key": KEY_C,
                "endpoint": "192.0.2.7:51820",
                "allowed_ips": ["10.200.1.0/24", "10.200.2.9/32"],
            },
        ],
        "dns_server": "10.200.0.53",
        "dns_domain": "overlay.test",
    }
    data.update(changes)
    return data


def peer_change(**changes: Any) -> dict[str, Any]:
    data = config()
    data["peers"][0].update(changes)
    return data


# -- the host's checks ----------------------------------------------------------------------
def test_a_good_config_parses() -> None:
    parsed = overlay.parse_config(config())
    assert parsed.overlay_ip == "10.200.0.1"
    assert parsed.prefix_len == 24
    assert parsed.listen_port == 51820
    assert parsed.host_port == 0
    assert [p.public_key for p in parsed.peers] == [KEY_B, KEY_C]
    assert parsed.peers[0].persistent_keepalive_secs == 5
    assert parsed.peers[1].persistent_keepalive_secs == 0
    assert parsed.peers[1].allowed_ips == ("10.200.1.0/24", "10.200.2.9/32")
    assert parsed.dns_server == "10.200.0.53"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (config(private_key="not base64!"), "private_key is not valid base64"),
        (config(private_key=base64.b64encode(b"short").decode()), "32 bytes"),
        (config(private_key=""), "private_key must be a base64"),
        (peer_change(public_key="@@@"), "peer 0 public_key is not valid base64"),
        (peer_change(allowed_ips=["10.200.0.300/32"]), "not a valid IPv4 CIDR"),
        (peer_change(allowed_ips=["10.200.0.2"]), "not a CIDR"),
        (peer_change(allowed_ips=["0.0.0.0/0"]), "default route"),
        (peer_change(allowed_ips="10.0.0.0/8"), "allowed_ips must be a list"),
        (config(prefix_len=33), "prefix_len must be a whole number from 0 to 32"),
        (config(prefix_len="24"), "prefix_len"),
        (config(listen_port=0), "listen_port must be a whole number from 1 to 65535"),
        (config(listen_port=65536), "listen_port"),
        (config(listen_port=True), "listen_port"),
        (config(host_port=70000), "host_port"),
        (config(overlay_ip="10.200.0"), "overlay_ip is not an IPv4 address"),
        (config(overlay_ip="fd00::1"), "overlay_ip is not an IPv4 address"),
        (config(dns_server="resolver"), "dns_server"),
        (config(dns_domain="a b"), "dns_domain"),
        (peer_change(endpoint="127.0.0.1"), "is not host:port"),
        (peer_change(endpoint="127.0.0.1:0"), "port must be 1 to 65535"),
        (peer_change(endpoint="127.0.0.1:x"), "is not host:port"),
        (peer_change(endpoint="[::1]:51820"), "IPv6 endpoints are not supported"),
        (peer_change(persistent_keepalive_secs=-1), "persistent_keepalive_secs"),
        (peer_change(public_key=KEY_C), "the same public key appears twice"),
        (peer_change(public_key=KEY_A), "the container's own key"),
        (peer_change(colour="red"), "unknown field 'colour'"),
        (config(mtu=1420), "unknown field 'mtu'"),
        (config(peers=[{"public_key": KEY_B}] * (MAX_PEERS + 1)), "at most 64"),
        (config(peers={"public_key": KEY_B}), "peers must be a list"),
        (["not", "an", "object"], "must be a JSON object"),
    ],
)
def test_bad_configs_are_refused_in_one_line(data: object, words: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        overlay.parse_config(data)
    message = str(caught.value)
    assert words in message
    assert "\n" not in message


def test_loopback_endpoints_are_rewritten_to_the_gateway_relay() -> None:
    parsed = overlay.parse_config(config())
    assert overlay.loopback_targets(parsed) == [("127.0.0.1", 40002)]
    body = overlay.guest_body(parsed, {("127.0.0.1", 40002): 45000})
    assert body["peers"][0]["endpoint"] == f"{GUEST_GATEWAY}:45000"
    assert body["peers"][1]["endpoint"] == "192.0.2.7:51820"  # leaves through egress as is
    assert body["private_key"] == KEY_A
    assert body["peers"][0]["persistent_keepalive_secs"] == 5  # as given
    assert body["peers"][1]["persistent_keepalive_secs"] == 0  # not relayed: as given


def test_relayed_peers_without_keepalive_get_one() -> None:
    parsed = overlay.parse_config(peer_change(persistent_keepalive_secs=0))
    body = overlay.guest_body(parsed)
    assert body["peers"][0]["persistent_keepalive_secs"] == overlay.RELAYED_KEEPALIVE
    assert body["dns_server"] == "10.200.0.53"
    assert body["dns_domain"] == "overlay.test"
    assert "host_port" not in body


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [
        ("localhost:7000", ("127.0.0.1", 7000)),
        ("127.0.0.2:7000", ("127.0.0.2", 7000)),
        ("127.255.0.1:9", ("127.255.0.1", 9)),
    ],
)
def test_every_loopback_form_is_relayed(endpoint: str, target: tuple[str, int]) -> None:
    parsed = overlay.parse_config(peer_change(endpoint=endpoint))
    assert overlay.loopback_targets(parsed) == [target]
    assert overlay.rewrite_endpoint(endpoint, {target: 1234}) == f"{GUEST_GATEWAY}:1234"


@pytest.mark.parametrize("endpoint", ["", "example.com:51820", "128.0.0.1:5", "10.0.0.1:5"])
def test_other_endpoints_are_left_alone(endpoint: str) -> None:
    assert overlay.rewrite_endpoint(endpoint, {}) == endpoint


def test_peers_without_endpoint_need_no_relay() -> None:
    parsed = overlay.parse_config(peer_change(endpoint=""))
    assert overlay.loopback_targets(parsed) == []
    assert overlay.guest_body(parsed)["peers"][0]["endpoint"] == ""


def test_the_guest_accepts_what_the_host_sends() -> None:
    parsed = overlay.parse_config(config())
    body = overlay.guest_body(parsed, {("127.0.0.1", 40002): 45000})
    decoded = wg.parse_config(body)
    assert decoded["private_key"] == bytes(range(32))
    assert decoded["address"] == socket.inet_aton("10.200.0.1")
    assert decoded["peers"][0]["endpoint"] == (socket.inet_aton(GUEST_GATEWAY), 45000)
    assert decoded["peers"][1]["allowed_ips"] == [
        (socket.inet_aton("10.200.1.0"), 24),
        (socket.inet_aton("10.200.2.9"), 32),
    ]
    assert decoded["peers"][1]["keepalive"] == 0


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"private_key": "AAAA"}, "32 bytes"),
        ({"prefix_len": 40}, "prefix_len"),
        ({"listen_port": 0}, "listen_port"),
        ({"overlay_ip": "x"}, "overlay_ip"),
    ],
)
def test_the_guest_guards_itself_too(change: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        wg.parse_config({**overlay.guest_body(overlay.parse_config(config())), **change})


# -- netlink encoding -----------------------------------------------------------------------
def test_attributes_are_padded_to_four_bytes() -> None:
    encoded = wg.attr(3, b"wg0\0")
    assert encoded == struct.pack("=HH", 8, 3) + b"wg0\0"
    odd = wg.attr(7, b"\x01")
    assert odd == struct.pack("=HH", 5, 7) + b"\x01\0\0\0"
    assert wg.parse_attrs(odd + encoded) == {7: b"\x01", 3: b"wg0\0"}


def test_nested_attributes_carry_the_nested_flag() -> None:
    encoded = wg.nested(8, wg.attr(1, b"ab"))
    size, kind = struct.unpack_from("=HH", encoded)
    assert kind == 8 | wg.NLA_F_NESTED
    assert size == 4 + 8
    assert wg.iter_attrs(encoded) == [(8, wg.attr(1, b"ab"))]


def test_a_truncated_attribute_stops_parsing() -> None:
    good = wg.attr(1, b"abcd")
    assert wg.iter_attrs(good + struct.pack("=HH", 40, 2) + b"xx") == [(1, b"abcd")]


def test_sockaddr_in_layout() -> None:
    raw = wg.sockaddr_in(socket.inet_aton("10.0.2.2"), 51820)
    assert len(raw) == 16
    assert struct.unpack_from("=H", raw)[0] == socket.AF_INET  # host byte order
    assert raw[2:4] == (51820).to_bytes(2, "big")  # network byte order
    assert wg.parse_sockaddr(raw) == "10.0.2.2:51820"


def test_new_link_message() -> None:
    data = wg.new_link(7, "wg0", "wireguard")
    [(kind, flags, seq, payload)] = wg.parse_messages(data)
    assert (kind, seq) == (wg.RTM_NEWLINK, 7)
    assert flags & wg.NLM_F_CREATE and flags & wg.NLM_F_EXCL and flags & wg.NLM_F_ACK
    attrs = wg.parse_attrs(payload[16:])  # after struct ifinfomsg
    assert attrs[wg.IFLA_IFNAME] == b"wg0\0"
    assert wg.parse_attrs(attrs[wg.IFLA_LINKINFO]) == {wg.IFLA_INFO_KIND: b"wireguard\0"}


def test_address_route_and_link_up_messages() -> None:
    [(kind, _, _, payload)] = wg.parse_messages(
        wg.new_address(1, 5, socket.inet_aton("10.200.0.1"), 24)
    )
    assert kind == wg.RTM_NEWADDR
    family, prefix, _, _, index = struct.unpack_from("=BBBBI", payload)
    assert (family, prefix, index) == (socket.AF_INET, 24, 5)
    assert wg.parse_attrs(payload[8:])[wg.IFA_LOCAL] == socket.inet_aton("10.200.0.1")

    [(kind, _, _, payload)] = wg.parse_messages(
        wg.new_route(2, 5, socket.inet_aton("10.200.1.0"), 24)
    )
    assert kind == wg.RTM_NEWROUTE
    assert payload[1] == 24  # rtm_dst_len
    attrs = wg.parse_attrs(payload[12:])
    assert attrs[wg.RTA_DST] == socket.inet_aton("10.200.1.0")
    assert attrs[wg.RTA_OIF] == struct.pack("=I", 5)

    [(kind, _, _, payload)] = wg.parse_messages(wg.link_up(3, 5))
    _, _, index, flags, change = struct.unpack_from("=BxHiII", payload)
    assert (index, flags, change) == (5, wg.IFF_UP, wg.IFF_UP)


def test_family_lookup_message_and_reply() -> None:
    [(kind, _, _, payload)] = wg.parse_messages(wg.get_family(4, "wireguard"))
    assert kind == wg.GENL_ID_CTRL
    assert payload[0] == wg.CTRL_CMD_GETFAMILY
    assert wg.parse_attrs(payload[4:])[wg.CTRL_ATTR_FAMILY_NAME] == b"wireguard\0"
    reply = struct.pack("=BBH", 1, 2, 0) + wg.attr(wg.CTRL_ATTR_FAMILY_ID, struct.pack("=H", 29))
    assert wg.parse_family_id(reply) == 29
    with pytest.raises(OSError):
        wg.parse_family_id(struct.pack("=BBH", 1, 2, 0))


def test_set_device_message_holds_every_field() -> None:
    decoded = wg.parse_config(overlay.guest_body(overlay.parse_config(config())))
    data = wg.set_device(9, 29, "wg0", decoded["private_key"], 51820, decoded["peers"])
    [(kind, flags, seq, payload)] = wg.parse_messages(data)
    assert (kind, seq) == (29, 9)
    assert flags & wg.NLM_F_ACK
    assert payload[0] == wg.WG_CMD_SET_DEVICE
    device = wg.parse_attrs(payload[4:])
    assert device[wg.WGDEVICE_A_IFNAME] == b"wg0\0"
    assert device[wg.WGDEVICE_A_PRIVATE_KEY] == bytes(range(32))
    assert device[wg.WGDEVICE_A_LISTEN_PORT] == struct.pack("=H", 51820)
    assert device[wg.WGDEVICE_A_FLAGS] == struct.pack("=I", wg.WGDEVICE_F_REPLACE_PEERS)
    peers = [wg.parse_attrs(p) for _, p in wg.iter_attrs(device[wg.WGDEVICE_A_PEERS])]
    assert [p[wg.WGPEER_A_PUBLIC_KEY] for p in peers] == [bytes(range(1, 33)), bytes(range(2, 34))]
    assert wg.parse_sockaddr(peers[0][wg.WGPEER_A_ENDPOINT]) == f"{GUEST_GATEWAY}:40002"
    assert peers[0][wg.WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL] == struct.pack("=H", 5)
    assert peers[0][wg.WGPEER_A_FLAGS] == struct.pack("=I", wg.WGPEER_F_REPLACE_ALLOWEDIPS)
    allowed = [wg.parse_attrs(a) for _, a in wg.iter_attrs(peers[1][wg.WGPEER_A_ALLOWEDIPS])]
    assert [(a[wg.WGALLOWEDIP_A_IPADDR], a[wg.WGALLOWEDIP_A_CIDR_MASK]) for a in allowed] == [
        (socket.inet_aton("10.200.1.0"), b"\x18"),
        (socket.inet_aton("10.200.2.9"), b"\x20"),
    ]
    assert all(a[wg.WGALLOWEDIP_A_FAMILY] == struct.pack("=H", socket.AF_INET) for a in allowed)


def test_a_peer_without_endpoint_sends_none() -> None:
    decoded = wg.parse_config(overlay.guest_body(overlay.parse_config(peer_change(endpoint=""))))
    data = wg.set_device(1, 29, "wg0", decoded["private_key"], 1, decoded["peers"][:1])
    payload = wg.parse_messages(data)[0][3]
    peers = wg.parse_attrs(payload[4:])[wg.WGDEVICE_A_PEERS]
    assert wg.WGPEER_A_ENDPOINT not in wg.parse_attrs(wg.iter_attrs(peers)[0][1])


def _device_reply(peers: list[bytes]) -> bytes:
    return struct.pack("=BBH", wg.WG_CMD_GET_DEVICE, 1, 0) + b"".join(
        [
            wg.attr(wg.WGDEVICE_A_PUBLIC_KEY, bytes(32)),
            wg.attr(wg.WGDEVICE_A_LISTEN_PORT, struct.pack("=H", 51820)),
            wg.nested(wg.WGDEVICE_A_PEERS, *(wg.nested(n, p) for n, p in enumerate(peers))),
        ]
    )


def test_device_status_is_parsed_and_split_peers_merged() -> None:
    key = bytes(range(1, 33))
    first = b"".join(
        [
            wg.attr(wg.WGPEER_A_PUBLIC_KEY, key),
            wg.attr(wg.WGPEER_A_ENDPOINT, wg.sockaddr_in(socket.inet_aton("127.0.0.1"), 1)),
            wg.attr(wg.WGPEER_A_LAST_HANDSHAKE_TIME, struct.pack("=qq", 1_700_000_000, 5)),
            wg.attr(wg.WGPEER_A_RX_BYTES, struct.pack("=Q", 596)),
            wg.attr(wg.WGPEER_A_TX_BYTES, struct.pack("=Q", 656)),
        ]
    )
    # The same peer continued in the next message (only its allowed IPs there).
    second = wg.attr(wg.WGPEER_A_PUBLIC_KEY, key) + wg.nested(wg.WGPEER_A_ALLOWEDIPS)
    idle = wg.attr(wg.WGPEER_A_PUBLIC_KEY, bytes(range(2, 34)))
    device = wg.parse_device([_device_reply([first]), _device_reply([second, idle])])
    assert device["public_key"] == base64.b64encode(bytes(32)).decode()
    assert device["listen_port"] == 51820
    assert device["peers"] == [
        {
            "public_key": base64.b64encode(key).decode(),
            "endpoint": "127.0.0.1:1",
            "latest_handshake": 1_700_000_000,
            "rx_bytes": 596,
            "tx_bytes": 656,
        },
        {
            "public_key": base64.b64encode(bytes(range(2, 34))).decode(),
            "endpoint": "",
            "latest_handshake": 0,
            "rx_bytes": 0,
            "tx_bytes": 0,
        },
    ]


def test_netlink_errors_carry_the_kernels_errno() -> None:
    class FakeSocket:
        def __init__(self, replies: list[bytes]) -> None:
            self.replies = replies
            self.sent: list[bytes] = []

        def send(self, data: bytes) -> None:
            self.sent.append(data)

        def recv(self, _size: int) -> bytes:
            return self.replies.pop(0)

    link = wg.Netlink.__new__(wg.Netlink)
    link._seq = 0
    error = struct.pack("=i", -17) + bytes(16)
    stale = wg.message(wg.NLMSG_ERROR, 0, 99, struct.pack("=i", -1) + bytes(16))
    link.sock = FakeSocket([stale + wg.message(wg.NLMSG_ERROR, 0, 1, error)])  # type: ignore[assignment]
    with pytest.raises(FileExistsError):
        link.request(wg.new_link, "wg0", "wireguard")
    reply = wg.message(wg.GENL_ID_CTRL, 0, 2, b"payload")
    ack = wg.message(wg.NLMSG_ERROR, 0, 2, struct.pack("=i", 0) + bytes(16))
    link.sock = FakeSocket([reply, ack])  # type: ignore[assignment]
    assert link.request(wg.get_family, "wireguard") == [b"payload"]


def test_modules_load_in_the_listed_order_and_a_missing_list_loads_nothing(
    tmp_path: Path,
) -> None:
    assert wg.load_modules(str(tmp_path / "absent")) == []
    listing = tmp_path / "modules.wireguard"
    listing.write_text("no_such_module_for_husk_tests\n")
    with pytest.raises(FileNotFoundError):
        wg.load_modules(str(listing), str(tmp_path))


# -- resolv.conf ------------------------------------------------------------------------------
def test_resolv_conf_gets_the_overlay_server_first_and_its_domain_first() -> None:
    before = "search corp.example\nnameserver 10.0.2.3\noptions ndots:2\n"
    after = wg.resolv_with_overlay(before, "10.200.0.53", "overlay.test")
    assert after.splitlines() == [
        "search overlay.test corp.example",
        "nameserver 10.200.0.53",
        "nameserver 10.0.2.3",
        "options ndots:2",
    ]
    assert wg.resolv_with_overlay(after, "10.200.0.53", "overlay.test") == after
    assert wg.resolv_with_overlay("nameserver 10.0.2.3\n", "", "") == "nameserver 10.0.2.3\n"


# -- the bundle ---------------------------------------------------------------------------------
def test_wireguard_modules_are_on_demand_not_loaded_at_boot(tmp_path: Path) -> None:
    from husk.bundle import initramfs
    from husk.bundle.modules import GUEST_MODULES, ON_DEMAND_MODULES, ModuleInfo

    assert ON_DEMAND_MODULES["wireguard"] == ("wireguard",)
    assert "wireguard" not in GUEST_MODULES
    source = tmp_path / "src.ko"
    source.write_bytes(b"\x7fELF")
    infos = [ModuleInfo(n, source, (), (), (), ()) for n in ("udp_tunnel", "wireguard")]
    initramfs.install_on_demand(tmp_path / "root", "wireguard", infos)
    root = tmp_path / "root"
    assert (root / "etc/husk/modules.wireguard").read_text() == "udp_tunnel\nwireguard\n"
    assert (root / "lib/modules/wireguard.ko").read_bytes() == b"\x7fELF"
    assert not (root / initramfs.MODULES_LOADER).exists()
    assert wg.ON_DEMAND_LIST == "/" + initramfs.MODULES_LIST + ".wireguard"
    assert wg.MODULES_DIR == "/" + initramfs.MODULES_DIR


# -- the CLI ------------------------------------------------------------------------------------
def test_cli_reads_a_config_file_and_refuses_bad_json(tmp_path: Path) -> None:
    from husk.cli import overlay as cli_overlay

    good = tmp_path / "good.json"
    good.write_text(json.dumps(config()))
    assert cli_overlay.read_config(str(good)) == config()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidArgument, match="is not JSON"):
        cli_overlay.read_config(str(bad))
    with pytest.raises(InvalidArgument, match="cannot read overlay config"):
        cli_overlay.read_config(str(tmp_path / "missing.json"))


def test_cli_status_says_no_handshake() -> None:
    from husk.cli.overlay import describe

    report = {
        "IPAddress": "10.200.0.1",
        "PrefixLen": 24,
        "PublicKey": KEY_A,
        "ListenPort": 51820,
        "HostIP": "127.0.0.1",
        "HostPort": 40000,
        "Attached": True,
        "Peers": [
            {"PublicKey": KEY_B, "LatestHandshake": 0, "RxBytes": 0, "TxBytes": 148},
            {"PublicKey": KEY_C, "LatestHandshake": 990, "RxBytes": 92, "TxBytes": 148},
        ],
    }
    lines = describe(report, now=1000)
    assert lines[0] == "address: 10.200.0.1/24"
    assert f"peer {KEY_B}: no handshake" in lines[3]
    assert f"peer {KEY_C}: 10s ago" in lines[4]
    assert describe({"Attached": False, "Peers": []}) == ["no overlay"]


# -- the gateway's UDP relay -----------------------------------------------------------------
class _Echo:
    """A UDP echo server on the host's loopback (127.0.0.1, as the tests' rule says)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.sources: set[tuple[str, int]] = set()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        def echo() -> None:
            try:
                data, source = self.sock.recvfrom(70000)
            except BlockingIOError:
                return
            self.sources.add(source)
            self.sock.sendto(b"echo:" + data, source)

        loop.add_reader(self.sock.fileno(), echo)


async def _exchange(sock: socket.socket, data: bytes, to: tuple[str, int]) -> bytes | None:
    loop = asyncio.get_running_loop()
    sock.sendto(data, to)
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 70000), 1.0)
    except TimeoutError:
        return None


def _client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def test_udp_relay_keeps_flows_apart_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw, "MAX_UDP_FLOWS", 2)

    async def scenario() -> None:
        echo = _Echo()
        echo.attach(asyncio.get_running_loop())
        front = _client()  # stands in for the socket bound in the VM's namespace
        relay = gw.UdpRelay(front, echo.address)
        here = front.getsockname()
        one, two, three = _client(), _client(), _client()
        try:
            assert await _exchange(one, b"a", here) == b"echo:a"
            assert await _exchange(two, b"b", here) == b"echo:b"
            assert await _exchange(one, b"c", here) == b"echo:c"  # the same flow again
            assert relay.flows == 2
            assert len(echo.sources) == 2  # one host socket per guest source
            assert await _exchange(three, b"d", here) is None  # over the bound: dropped
            assert await _exchange(one, b"x" * 60000, here) == b"echo:" + b"x" * 60000
        finally:
            relay.close()
            for sock in (one, two, three, echo.sock):
                sock.close()
        assert front.fileno() == -1

    asyncio.run(scenario())


def test_udp_relay_drops_oversized_datagrams_and_idle_flows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gw, "MAX_DATAGRAM", 100)
    monkeypatch.setattr(gw, "UDP_IDLE_TIMEOUT", 0.2)
    monkeypatch.setattr(gw, "_SWEEP_INTERVAL", 0.1)

    async def scenario() -> None:
        echo = _Echo()
        echo.attach(asyncio.get_running_loop())
        front = _client()
        relay = gw.UdpRelay(front, echo.address)
        one = _client()
        try:
            assert await _exchange(one, b"y" * 101, front.getsockname()) is None
            assert await _exchange(one, b"y" * 50, front.getsockname()) == b"echo:" + b"y" * 50
            assert relay.flows == 1
            await asyncio.sleep(0.5)
            assert relay.flows == 0
        finally:
            relay.close()
            one.close()
            echo.sock.close()

    asyncio.run(scenario())


@pytest.fixture
def netns_holder() -> Iterator[int]:
    """A process in a fresh network namespace (loopback up) that the test owns."""
    assert os.geteuid() == 0, "creating a network namespace needs root (the suite runs as root)"
    process = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", "ip link set lo up 2>/dev/null; exec sleep 60"]
    )
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


SEND_FROM_NETNS = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(5)
sock.sendto(b"from-the-vm", ("127.0.0.1", int(sys.argv[1])))
print(sock.recv(100).decode())
"""


def test_gateway_relays_udp_out_of_a_vms_namespace(netns_holder: int) -> None:
    """What a guest sends to 10.0.2.2:PORT arrives at 127.0.0.1:PORT of the VM's namespace
    (QEMU's doing); the gateway carries it to the target on the host and the reply back."""
    import time

    time.sleep(0.2)  # the holder brings its loopback up

    async def scenario() -> None:
        echo = _Echo()
        echo.attach(asyncio.get_running_loop())
        gateway = gw.Gateway()
        await gateway.join("c1", netns_holder)
        try:
            port = await gateway.relay_udp("c1", echo.address)
            assert port == echo.address[1]  # the target's own port when free there
            sender = await asyncio.create_subprocess_exec(
                "nsenter",
                f"--net=/proc/{netns_holder}/ns/net",
                sys.executable,
                "-c",
                SEND_FROM_NETNS,
                str(port),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(sender.communicate(), 20)
            assert out.decode().strip() == "echo:from-the-vm"
            await gateway.drop_udp_relays("c1")
            assert await gateway.relay_udp("c9", ("127.0.0.1", 5)) == 5  # not a member
        finally:
            await gateway.close()
            echo.sock.close()

    asyncio.run(scenario())


RTNETLINK_IN_NETNS = """
import errno, socket, subprocess
from husk.guest.agent import wireguard as wg

with wg.Netlink(wg.NETLINK_ROUTE) as route, wg.Netlink(wg.NETLINK_GENERIC) as genl:
    route.request(wg.new_link, "ovt0", "veth")  # wireguard is not in this host's kernel
    try:
        route.request(wg.new_link, "ovt0", "veth")
    except FileExistsError:
        print("exists")
    index = socket.if_nametoindex("ovt0")
    route.request(wg.new_address, index, socket.inet_aton("10.200.0.1"), 24)
    route.request(wg.link_up, index)
    route.request(wg.new_route, index, socket.inet_aton("10.201.0.0"), 16)
    route.request(wg.new_route, index, socket.inet_aton("10.201.0.0"), 16)  # replaced
    print("nlctrl", wg.parse_family_id(genl.request(wg.get_family, "nlctrl")[0]))
    try:
        genl.request(wg.get_family, "nosuchfamily")
    except OSError as exc:
        print("family", errno.errorcode[exc.errno])
    print(subprocess.run(["ip", "-o", "-4", "addr", "show", "ovt0"], capture_output=True,
                         text=True).stdout.split()[3])
    print(subprocess.run(["ip", "route", "show", "10.201.0.0/16"], capture_output=True,
                         text=True).stdout.strip())
    route.request(wg.delete_link, "ovt0")
    print("gone", not any(name == "ovt0" for _, name in socket.if_nameindex()))
"""


def test_rtnetlink_messages_against_a_real_kernel_in_a_namespace() -> None:
    """The link, address and route messages and the ack/error handling, in a network
    namespace the test creates (this host's kernel has no WireGuard: a veth stands in)."""
    assert os.geteuid() == 0, "creating a network namespace needs root (the suite runs as root)"
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", RTNETLINK_IN_NETNS],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(Path(wg.__file__).parents[3])},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "exists"
    assert lines[1] == f"nlctrl {wg.GENL_ID_CTRL}"
    assert lines[2] == "family ENOENT"
    assert lines[3] == "10.200.0.1/24"
    assert lines[4].startswith("10.201.0.0/16 dev ovt0")
    assert "proto static" in lines[4] and "scope link" in lines[4]
    assert lines[5] == "gone True"


# -- the runtime's attach, with a fake container (the real path is in test_overlay_vm) -------
class _FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _FakeClient:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.requests: list[dict[str, Any]] = []

    async def request(self, _kind: Any, body: dict[str, Any], *, timeout: float) -> Any:
        from husk.errors import GuestError

        self.requests.append(body)
        if self.fail:
            raise GuestError("wireguard failed in the guest: no module")
        return {"public_key": KEY_B, "interface": "wg0", "attached": True, "peers": []}


class _FakePublisher:
    def __init__(self) -> None:
        self.transports: list[_FakeTransport] = []
        self.bound: list[tuple[str, int]] = []

    async def publish(self, binding: Any, sock: socket.socket) -> _FakeTransport:
        self.bound.append(sock.getsockname())
        sock.close()
        self.transports.append(_FakeTransport())
        return self.transports[-1]


class _FakeContainer:
    def __init__(self, status: str = "running", fail: bool = False) -> None:
        from types import SimpleNamespace

        from husk.runtime.model import ContainerStatus

        self.id = "c" * 64
        self.name = "peer"
        self.status = ContainerStatus(status)
        self.running = self.status.running
        self.lock = asyncio.Lock()
        self.client = _FakeClient(fail)
        self.publisher = _FakePublisher()
        self.live = SimpleNamespace(
            sandbox=SimpleNamespace(client=self.client), publisher=self.publisher
        )
        self.record = SimpleNamespace(overlay={})
        self.saved = 0

    def persist(self) -> bool:
        self.saved += 1
        return True


def test_runtime_attach_records_the_overlay_and_keeps_the_host_port() -> None:
    from husk.runtime import overlay as runtime_overlay

    async def scenario() -> None:
        container = _FakeContainer()
        gateway = gw.Gateway()
        shown = await runtime_overlay.attach(container, gateway, config())  # type: ignore[arg-type]
        assert shown["IPAddress"] == "10.200.0.1" and shown["PublicKey"] == KEY_B
        assert KEY_A not in json.dumps(container.record.overlay)  # never the private key
        assert container.saved == 1
        [sent] = container.client.requests
        assert sent["peers"][0]["endpoint"] == f"{GUEST_GATEWAY}:40002"  # not a member: as is
        first_port = container.record.overlay["HostPort"]
        assert container.publisher.bound == [("127.0.0.1", first_port)]
        await runtime_overlay.attach(container, gateway, config())  # type: ignore[arg-type]
        assert container.publisher.transports[0].closed  # the old listen port is released
        assert container.record.overlay["HostPort"] == first_port

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("container", "data", "error"),
    [
        (lambda: _FakeContainer(), config(private_key="bad"), "private_key"),
        (lambda: _FakeContainer(status="exited"), config(), "is not running"),
        (lambda: _FakeContainer(status="paused"), config(), "is paused"),
        (lambda: _FakeContainer(fail=True), config(), "no module"),
    ],
)
def test_runtime_attach_failures_change_nothing(container: Any, data: Any, error: str) -> None:
    from husk.errors import HuskError
    from husk.runtime import overlay as runtime_overlay

    async def scenario() -> None:
        fake = container()
        with pytest.raises(HuskError, match=error):
            await runtime_overlay.attach(fake, gw.Gateway(), data)
        assert fake.record.overlay == {}
        assert fake.saved == 0
        assert all(t.closed for t in fake.publisher.transports)  # the host side is undone

    asyncio.run(scenario())


def test_a_hostile_guest_reply_is_cut_to_bounded_typed_fields() -> None:
    """The guest's root writes what it likes: long strings, wrong types, floods of peers;
    the host keeps only keys that are keys, short printable text, sane counters."""
    key = base64.b64encode(bytes(range(32))).decode()
    reply = {
        "public_key": "A" * 10_000,
        "interface": "wg0\x1b[2J",
        "attached": "yes",
        "peers": [
            {
                "public_key": key,
                "endpoint": "x" * 500,
                "latest_handshake": "soon",
                "rx_bytes": -5,
                "tx_bytes": 1 << 70,
            },
            "not a peer",
        ]
        * 1000,
    }
    shown = guest_reply(reply)
    assert shown["public_key"] == "" and shown["interface"] == ""
    assert shown["attached"] is False
    assert len(shown["peers"]) == MAX_PEERS // 2  # of the first MAX_PEERS, half were no peer
    assert shown["peers"][0] == {
        "public_key": key,
        "endpoint": "",
        "latest_handshake": 0,
        "rx_bytes": 0,
        "tx_bytes": 0,
    }
    good = {"public_key": key, "interface": "wg0", "attached": True, "peers": []}
    assert guest_reply(good) == good
