"""The WireGuard overlay (``MsgType.WIREGUARD``): interface ``wg0`` set up over netlink.

The body carries the reference's ``OverlayConfig`` fields: ``overlay_ip``, ``prefix_len``,
``private_key`` (base64 of 32 bytes), ``listen_port``, ``peers`` (``public_key``,
``endpoint`` "host:port", ``allowed_ips``, ``persistent_keepalive_secs``), ``dns_server``
and ``dns_domain``. ``{"detach": true}`` removes the interface; ``{"status": true}`` reads
it back (per-peer last handshake and byte counts), so the host can tell "no handshake yet"
from a hang. Every request is answered with the interface's status.

The kernel's ``wireguard`` module and its crypto dependencies ship in the initramfs but
are loaded on first use (the list and order come from the bundle): most VMs never join an
overlay and must not pay for it at boot. Everything goes through netlink sockets (rtnetlink
for the link, its address and routes; generic netlink for WireGuard's own settings): no
``ip`` or ``wg`` binary, no fork. The message building and parsing are pure functions.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import os
import socket
import struct
import time
from typing import Any

from husk.guest.agent import beneath
from husk.guest.agent.container_root import ROOT as CONTAINER_ROOT

INTERFACE = "wg0"
MODULES_DIR = "/lib/modules"
ON_DEMAND_LIST = "/etc/husk/modules.wireguard"
"""The modules to insmod for WireGuard, in dependency order (written by the bundle builder)."""
RESOLV_CONF = "/etc/resolv.conf"
MAX_PEERS = 64
_NETLINK_TIMEOUT = 5.0
_RESOLV_LIMIT = 64 * 1024

# <linux/netlink.h>
NETLINK_ROUTE = 0
NETLINK_GENERIC = 16
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")

# <linux/rtnetlink.h>, <linux/if_link.h>, <linux/if_addr.h>
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFF_UP = 0x1
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")

# <linux/genetlink.h>
GENL_ID_CTRL = 16
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
_GENLMSGHDR = struct.Struct("=BBH")

# <linux/wireguard.h>
WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_CMD_GET_DEVICE = 0
WG_CMD_SET_DEVICE = 1
WGDEVICE_A_IFNAME = 2
WGDEVICE_A_PRIVATE_KEY = 3
WGDEVICE_A_PUBLIC_KEY = 4
WGDEVICE_A_FLAGS = 5
WGDEVICE_A_LISTEN_PORT = 6
WGDEVICE_A_PEERS = 8
WGDEVICE_F_REPLACE_PEERS = 1
WGPEER_A_PUBLIC_KEY = 1
WGPEER_A_FLAGS = 3
WGPEER_A_ENDPOINT = 4
WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = 5
WGPEER_A_LAST_HANDSHAKE_TIME = 6
WGPEER_A_RX_BYTES = 7
WGPEER_A_TX_BYTES = 8
WGPEER_A_ALLOWEDIPS = 9
WGPEER_F_REPLACE_ALLOWEDIPS = 2
WGALLOWEDIP_A_FAMILY = 1
WGALLOWEDIP_A_IPADDR = 2
WGALLOWEDIP_A_CIDR_MASK = 3

_SYS_FINIT_MODULE = 313  # x86_64, the only architecture the bundle is built for


# -- validation of the body (the host validates too: this is the guest's own guard) -------
def _key(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"{what} must be 32 bytes, not {len(raw)}")
    return raw


def _ipv4(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be an IPv4 address")
    try:
        return socket.inet_pton(socket.AF_INET, value)
    except OSError:
        raise ValueError(f"{what} is not an IPv4 address: {value!r}") from None


def parse_cidr(value: object) -> tuple[bytes, int]:
    """``"10.0.0.0/24"`` as (4 address bytes, prefix length)."""
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"allowed IP {value!r} is not a CIDR (address/prefix)")
    address, _, prefix = value.partition("/")
    if not prefix.isdigit() or not 0 <= int(prefix) <= 32:
        raise ValueError(f"allowed IP {value!r} has a bad prefix length")
    return _ipv4(address, "allowed IP"), int(prefix)


def _port(value: object, what: str, *, allow_zero: bool = False) -> int:
    if type(value) is not int or not (0 if allow_zero else 1) <= value <= 65535:
        raise ValueError(f"{what} must be a port number, not {value!r}")
    return value


def parse_endpoint(value: object) -> tuple[str, int] | None:
    """``"host:port"`` (empty: the peer has no endpoint, it must call first)."""
    if value in (None, ""):
        return None
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"endpoint {value!r} is not host:port")
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not host:
        raise ValueError(f"endpoint {value!r} is not host:port")
    return host, _port(int(port), "endpoint port")


# -- netlink messages -----------------------------------------------------------------------
def _align(size: int) -> int:
    return (size + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = _NLATTR.size + len(payload)
    return _NLATTR.pack(size, kind) + payload + b"\0" * (_align(size) - size)


def nested(kind: int, *children: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


def message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, flags, seq, 0) + payload


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes by type (nested flag cleared; a repeated type keeps the last)."""
    found: dict[int, bytes] = {}
    for kind, payload in iter_attrs(data):
        found[kind] = payload
    return found


def iter_attrs(data: bytes) -> list[tuple[int, bytes]]:
    items: list[tuple[int, bytes]] = []
    offset = 0
    while offset + _NLATTR.size <= len(data):
        size, kind = _NLATTR.unpack_from(data, offset)
        if size < _NLATTR.size or offset + size > len(data):
            break
        items.append((kind & NLA_TYPE_MASK, data[offset + _NLATTR.size : offset + size]))
        offset += _align(size)
    return items


def parse_messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each message in one datagram."""
    items: list[tuple[int, int, int, bytes]] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        size, kind, flags, seq, _ = _NLMSGHDR.unpack_from(data, offset)
        if size < _NLMSGHDR.size or offset + size > len(data):
            break
        items.append((kind, flags, seq, data[offset + _NLMSGHDR.size : offset + size]))
        offset += _align(size)
    return items


def _cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def new_link(seq: int, name: str, kind: str) -> bytes:
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    body += attr(IFLA_IFNAME, _cstring(name))
    body += nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, _cstring(kind)))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return message(RTM_NEWLINK, flags, seq, body)


def delete_link(seq: int, name: str) -> bytes:
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, _cstring(name))
    return message(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def link_up(seq: int, index: int) -> bytes:
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
    return message(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def new_address(seq: int, index: int, address: bytes, prefix: int) -> bytes:
    body = _IFADDRMSG.pack(socket.AF_INET, prefix, 0, 0, index)
    body += attr(IFA_LOCAL, address) + attr(IFA_ADDRESS, address)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    return message(RTM_NEWADDR, flags, seq, body)


def new_route(seq: int, index: int, network: bytes, prefix: int) -> bytes:
    body = _RTMSG.pack(
        socket.AF_INET, prefix, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_LINK, RTN_UNICAST, 0
    )
    body += attr(RTA_DST, network) + attr(RTA_OIF, struct.pack("=I", index))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    return message(RTM_NEWROUTE, flags, seq, body)


def get_family(seq: int, name: str) -> bytes:
    body = _GENLMSGHDR.pack(CTRL_CMD_GETFAMILY, 1, 0) + attr(CTRL_ATTR_FAMILY_NAME, _cstring(name))
    return message(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def parse_family_id(payload: bytes) -> int:
    attrs = parse_attrs(payload[_GENLMSGHDR.size :])
    if CTRL_ATTR_FAMILY_ID not in attrs:
        raise OSError(errno.ENOENT, "the kernel did not name the wireguard family")
    family: int = struct.unpack_from("=H", attrs[CTRL_ATTR_FAMILY_ID])[0]
    return family


def sockaddr_in(address: bytes, port: int) -> bytes:
    """struct sockaddr_in: family in host order, port in network order, 8 bytes of zero."""
    return struct.pack("=H", socket.AF_INET) + struct.pack(">H", port) + address + b"\0" * 8


def parse_sockaddr(data: bytes) -> str:
    if len(data) >= 8 and struct.unpack_from("=H", data)[0] == socket.AF_INET:
        port = struct.unpack_from(">H", data, 2)[0]
        return f"{socket.inet_ntop(socket.AF_INET, data[4:8])}:{port}"
    if len(data) >= 24 and struct.unpack_from("=H", data)[0] == socket.AF_INET6:
        port = struct.unpack_from(">H", data, 2)[0]
        return f"[{socket.inet_ntop(socket.AF_INET6, data[8:24])}]:{port}"
    return ""


def _peer_attrs(peer: dict[str, Any]) -> bytes:
    parts = [
        attr(WGPEER_A_PUBLIC_KEY, peer["public_key"]),
        attr(WGPEER_A_FLAGS, struct.pack("=I", WGPEER_F_REPLACE_ALLOWEDIPS)),
        attr(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H", peer["keepalive"])),
    ]
    if peer.get("endpoint") is not None:
        address, port = peer["endpoint"]
        parts.append(attr(WGPEER_A_ENDPOINT, sockaddr_in(address, port)))
    allowed = [
        nested(
            number,
            attr(WGALLOWEDIP_A_FAMILY, struct.pack("=H", socket.AF_INET)),
            attr(WGALLOWEDIP_A_IPADDR, network),
            attr(WGALLOWEDIP_A_CIDR_MASK, struct.pack("=B", prefix)),
        )
        for number, (network, prefix) in enumerate(peer["allowed_ips"])
    ]
    parts.append(nested(WGPEER_A_ALLOWEDIPS, *allowed))
    return b"".join(parts)


def set_device(
    seq: int,
    family: int,
    name: str,
    private_key: bytes,
    listen_port: int,
    peers: list[dict[str, Any]],
) -> bytes:
    """WG_CMD_SET_DEVICE replacing every peer. ``peers``: public_key (32 bytes), endpoint
    ((4 address bytes, port) or None), allowed_ips ([(4 bytes, prefix)]), keepalive (s)."""
    body = _GENLMSGHDR.pack(WG_CMD_SET_DEVICE, WG_GENL_VERSION, 0)
    body += attr(WGDEVICE_A_IFNAME, _cstring(name))
    body += attr(WGDEVICE_A_PRIVATE_KEY, private_key)
    body += attr(WGDEVICE_A_LISTEN_PORT, struct.pack("=H", listen_port))
    body += attr(WGDEVICE_A_FLAGS, struct.pack("=I", WGDEVICE_F_REPLACE_PEERS))
    body += nested(WGDEVICE_A_PEERS, *(nested(n, _peer_attrs(p)) for n, p in enumerate(peers)))
    return message(family, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def get_device(seq: int, family: int, name: str) -> bytes:
    body = _GENLMSGHDR.pack(WG_CMD_GET_DEVICE, WG_GENL_VERSION, 0)
    body += attr(WGDEVICE_A_IFNAME, _cstring(name))
    return message(family, NLM_F_REQUEST | NLM_F_ACK | NLM_F_DUMP, seq, body)


def parse_device(payloads: list[bytes]) -> dict[str, Any]:
    """The device's public key, listen port and peers from WG_CMD_GET_DEVICE's parts.

    A device with many peers comes in several messages; a peer split across two repeats
    its public key, so peers are merged by key.
    """
    device: dict[str, Any] = {"public_key": "", "listen_port": 0, "peers": []}
    by_key: dict[str, dict[str, Any]] = {}
    for payload in payloads:
        attrs = parse_attrs(payload[_GENLMSGHDR.size :])
        if WGDEVICE_A_PUBLIC_KEY in attrs:
            device["public_key"] = base64.b64encode(attrs[WGDEVICE_A_PUBLIC_KEY]).decode()
        if WGDEVICE_A_LISTEN_PORT in attrs:
            device["listen_port"] = struct.unpack_from("=H", attrs[WGDEVICE_A_LISTEN_PORT])[0]
        for _, raw_peer in iter_attrs(attrs.get(WGDEVICE_A_PEERS, b"")):
            fields = parse_attrs(raw_peer)
            key = base64.b64encode(fields.get(WGPEER_A_PUBLIC_KEY, b"")).decode()
            peer = by_key.get(key)
            if peer is None:
                peer = by_key[key] = {
                    "public_key": key,
                    "endpoint": "",
                    "latest_handshake": 0,
                    "rx_bytes": 0,
                    "tx_bytes": 0,
                }
                device["peers"].append(peer)
            if WGPEER_A_ENDPOINT in fields:
                peer["endpoint"] = parse_sockaddr(fields[WGPEER_A_ENDPOINT])
            if WGPEER_A_LAST_HANDSHAKE_TIME in fields:
                peer["latest_handshake"] = struct.unpack_from(
                    "=q", fields[WGPEER_A_LAST_HANDSHAKE_TIME]
                )[0]
            if WGPEER_A_RX_BYTES in fields:
                peer["rx_bytes"] = struct.unpack_from("=Q", fields[WGPEER_A_RX_BYTES])[0]
            if WGPEER_A_TX_BYTES in fields:
                peer["tx_bytes"] = struct.unpack_from("=Q", fields[WGPEER_A_TX_BYTES])[0]
    return device


# -- netlink I/O --------------------------------------------------------------------------
class Netlink:
    """One netlink socket; each request waits (bounded) for its acknowledgement."""

    def __init__(self, protocol: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        self.sock.settimeout(_NETLINK_TIMEOUT)
        self.sock.bind((0, 0))
        self._seq = int(time.monotonic()) & 0xFFFF

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def request(self, build: Any, *args: Any) -> list[bytes]:
        """Sends ``build(seq, *args)``; returns the payloads of the replies (not the ack).

        Raises OSError with the kernel's errno for a refusal.
        """
        seq = self.next_seq()
        self.sock.send(build(seq, *args))
        payloads: list[bytes] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise OSError(errno.ETIMEDOUT, "netlink: no answer from the kernel") from None
            for kind, _flags, reply_seq, payload in parse_messages(data):
                if reply_seq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return payloads
                if kind == NLMSG_DONE:
                    return payloads
                payloads.append(payload)


# -- the kernel module ----------------------------------------------------------------------
def load_modules(list_path: str = ON_DEMAND_LIST, modules_dir: str = MODULES_DIR) -> list[str]:
    """insmods the on-demand modules in their order; those already loaded are skipped."""
    try:
        with open(list_path) as stream:
            names = stream.read().split()
    except FileNotFoundError:
        return []  # a bundle without them: the kernel may have WireGuard built in
    libc = ctypes.CDLL(None, use_errno=True)
    loaded: list[str] = []
    for name in names:
        if os.path.isdir(f"/sys/module/{name}"):
            continue
        fd = os.open(f"{modules_dir}/{name}.ko", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.syscall(_SYS_FINIT_MODULE, fd, b"", 0) != 0:
                err = ctypes.get_errno()
                if err != errno.EEXIST:
                    raise OSError(err, f"cannot load kernel module {name}: {os.strerror(err)}")
        finally:
            os.close(fd)
        loaded.append(name)
    return loaded


# -- resolv.conf ----------------------------------------------------------------------------
_saved_resolv: list[str] = []


def resolv_with_overlay(text: str, server: str, domain: str) -> str:
    """``text`` with the overlay's nameserver first and its domain first in the search list."""
    lines = text.splitlines()
    search = [line.split()[1:] for line in lines if line.startswith(("search ", "domain "))]
    domains = [d for found in search for d in found if d != domain]
    rest = [
        line
        for line in lines
        if not line.startswith(("search ", "domain ")) and line.split() != ["nameserver", server]
    ]
    head: list[str] = []
    if domain or domains:
        head.append("search " + " ".join(([domain] if domain else []) + domains))
    if server:
        head.append(f"nameserver {server}")
    return "\n".join(head + rest) + "\n"


def _apply_dns(server: str, domain: str) -> None:
    if not os.path.ismount(CONTAINER_ROOT):
        return
    current = beneath.read_file(CONTAINER_ROOT, RESOLV_CONF, _RESOLV_LIMIT).decode(
        "utf-8", "replace"
    )
    if not _saved_resolv:
        _saved_resolv.append(current)
    base = _saved_resolv[0]
    beneath.write_file(CONTAINER_ROOT, RESOLV_CONF, resolv_with_overlay(base, server, domain))


def _restore_dns() -> None:
    if _saved_resolv and os.path.ismount(CONTAINER_ROOT):
        beneath.write_file(CONTAINER_ROOT, RESOLV_CONF, _saved_resolv.pop())


# -- the requests ---------------------------------------------------------------------------
def _resolve_endpoint(endpoint: tuple[str, int] | None) -> tuple[bytes, int] | None:
    if endpoint is None:
        return None
    host, port = endpoint
    try:
        return socket.inet_pton(socket.AF_INET, host), port
    except OSError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as exc:
        raise ValueError(f"cannot resolve peer endpoint {host}: {exc}") from None
    return socket.inet_pton(socket.AF_INET, str(infos[0][4][0])), port


def parse_config(body: dict[str, Any]) -> dict[str, Any]:
    """The body checked and decoded (raises ValueError naming the bad field)."""
    address = _ipv4(body.get("overlay_ip"), "overlay_ip")
    prefix = body.get("prefix_len")
    if type(prefix) is not int or not 0 <= prefix <= 32:
        raise ValueError(f"prefix_len must be 0 to 32, not {prefix!r}")
    peers_in = body.get("peers") or []
    if not isinstance(peers_in, list) or len(peers_in) > MAX_PEERS:
        raise ValueError(f"peers must be a list of at most {MAX_PEERS}")
    peers: list[dict[str, Any]] = []
    for number, item in enumerate(peers_in):
        if not isinstance(item, dict):
            raise ValueError(f"peer {number} is not an object")
        allowed = item.get("allowed_ips") or []
        if not isinstance(allowed, list):
            raise ValueError(f"peer {number}: allowed_ips must be a list")
        keepalive = item.get("persistent_keepalive_secs") or 0
        peers.append(
            {
                "public_key": _key(item.get("public_key"), f"peer {number}: public_key"),
                "endpoint": _resolve_endpoint(parse_endpoint(item.get("endpoint"))),
                "allowed_ips": [parse_cidr(cidr) for cidr in allowed],
                "keepalive": _port(keepalive, "persistent_keepalive_secs", allow_zero=True),
            }
        )
    dns_server = body.get("dns_server") or ""
    if dns_server:
        _ipv4(dns_server, "dns_server")
    dns_domain = body.get("dns_domain") or ""
    if not isinstance(dns_domain, str) or any(c.isspace() for c in dns_domain):
        raise ValueError(f"dns_domain is not a domain name: {dns_domain!r}")
    return {
        "address": address,
        "prefix": prefix,
        "private_key": _key(body.get("private_key"), "private_key"),
        "listen_port": _port(body.get("listen_port"), "listen_port"),
        "peers": peers,
        "dns_server": dns_server,
        "dns_domain": dns_domain,
    }


def _family_id(genl: Netlink) -> int:
    try:
        replies = genl.request(get_family, WG_GENL_NAME)
    except FileNotFoundError:
        raise OSError(
            errno.ENOENT, "the guest kernel has no WireGuard (module not loaded)"
        ) from None
    if not replies:
        raise OSError(errno.ENOENT, "the kernel has no wireguard family")
    return parse_family_id(replies[0])


def _network(address: bytes, prefix: int) -> bytes:
    value = int.from_bytes(address, "big")
    mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix else 0
    return (value & mask).to_bytes(4, "big")


def configure(config: dict[str, Any]) -> None:
    load_modules()
    with Netlink(NETLINK_ROUTE) as route, Netlink(NETLINK_GENERIC) as genl:
        with contextlib.suppress(FileExistsError):  # reconfigured: the same interface
            route.request(new_link, INTERFACE, "wireguard")
        index = socket.if_nametoindex(INTERFACE)
        family = _family_id(genl)
        genl.request(
            set_device,
            family,
            INTERFACE,
            config["private_key"],
            config["listen_port"],
            config["peers"],
        )
        route.request(new_address, index, config["address"], config["prefix"])
        route.request(link_up, index)
        for peer in config["peers"]:
            for network, prefix in peer["allowed_ips"]:
                if prefix:  # never the default route: the tunnel's own packets use it
                    route.request(new_route, index, _network(network, prefix), prefix)
    if config["dns_server"] or config["dns_domain"]:
        _apply_dns(config["dns_server"], config["dns_domain"])


def status() -> dict[str, Any]:
    try:
        index = socket.if_nametoindex(INTERFACE)
    except OSError:
        return {"attached": False, "interface": INTERFACE, "peers": []}
    with Netlink(NETLINK_GENERIC) as genl:
        device = parse_device(genl.request(get_device, _family_id(genl), INTERFACE))
    return {
        "attached": True,
        "interface": INTERFACE,
        "index": index,
        "now": int(time.time()),
        **device,
    }


def detach() -> dict[str, Any]:
    try:
        socket.if_nametoindex(INTERFACE)
    except OSError:
        return {"attached": False, "interface": INTERFACE, "peers": []}
    with Netlink(NETLINK_ROUTE) as route:
        route.request(delete_link, INTERFACE)
    _restore_dns()
    return {"attached": False, "interface": INTERFACE, "peers": []}


def handle(body: dict[str, Any]) -> dict[str, Any]:
    """The WIREGUARD request: configure (the default), ``detach`` or ``status``."""
    if body.get("detach") is True:
        return detach()
    if body.get("status") is True:
        return status()
    configure(parse_config(body))
    return status()
