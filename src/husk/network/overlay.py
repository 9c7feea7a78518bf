"""The WireGuard overlay's configuration (the reference's ``OverlayConfig``): checks and rewriting.

Pure functions, no I/O. :func:`parse_config` turns the JSON a client sends into an
:class:`OverlayConfig` or refuses it with one line naming the bad field, before anything
changes. :func:`guest_body` is what the guest agent receives (``MsgType.WIREGUARD``), with
each peer endpoint rewritten to what the guest can reach: an endpoint on the host's
loopback becomes the VM's gateway (10.0.2.2) and a port the daemon relays over UDP to that
host endpoint; any other endpoint is left as it is (it leaves through the VM's egress).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from husk.errors import InvalidArgument
from husk.guest.netconfig import GUEST_GATEWAY

MAX_PEERS = 64
MAX_ALLOWED_IPS = 64
"""Per peer."""
MAX_KEEPALIVE = 65535
RELAYED_KEEPALIVE = 25
"""Keepalive (s) of a peer reached through husk's relays when the config sets none.

WireGuard answers the source of the latest packet: for a peer that called in, that is a
relay flow, which ends after a minute without traffic (ports.UDP_IDLE_TIMEOUT). Without a
keepalive, an idle path could stay dead in both directions."""
KEY_BYTES = 32
_FIELDS = frozenset(
    {
        "overlay_ip",
        "prefix_len",
        "private_key",
        "listen_port",
        "peers",
        "dns_server",
        "dns_domain",
        "host_port",
    }
)
_PEER_FIELDS = frozenset({"public_key", "endpoint", "allowed_ips", "persistent_keepalive_secs"})


@dataclass(frozen=True)
class Peer:
    public_key: str
    endpoint: str
    allowed_ips: tuple[str, ...]
    persistent_keepalive_secs: int


@dataclass(frozen=True)
class OverlayConfig:
    overlay_ip: str
    prefix_len: int
    private_key: str
    listen_port: int
    peers: tuple[Peer, ...]
    dns_server: str = ""
    dns_domain: str = ""
    host_port: int = 0
    """husk's own field: the host UDP port the listen port is published on (0: pick one)."""


def check_key(value: object, what: str) -> str:
    """A WireGuard key: base64 of 32 bytes."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"overlay {what} must be a base64 WireGuard key")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"overlay {what} is not valid base64: {value!r}") from None
    if len(raw) != KEY_BYTES:
        raise InvalidArgument(
            f"overlay {what} must be {KEY_BYTES} bytes of base64, not {len(raw)} bytes"
        )
    return value


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"overlay {what} must be a whole number from {low} to {high}")
    return value


def _ipv4(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"overlay {what} must be an IPv4 address")
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise InvalidArgument(f"overlay {what} is not an IPv4 address: {value!r}") from None


def check_cidr(value: object, what: str) -> str:
    """An IPv4 network ``address/prefix`` (host bits may be set, as WireGuard allows)."""
    if not isinstance(value, str) or "/" not in value:
        raise InvalidArgument(f"overlay {what} is not a CIDR (address/prefix): {value!r}")
    try:
        network = ipaddress.IPv4Network(value, strict=False)
    except ValueError:
        raise InvalidArgument(f"overlay {what} is not a valid IPv4 CIDR: {value!r}") from None
    if network.prefixlen == 0:
        # The tunnel's own packets leave through the default route: it cannot be the tunnel.
        raise InvalidArgument(
            f"overlay {what} {value!r}: a default route through the overlay is not supported"
        )
    return str(network)


def split_endpoint(value: str) -> tuple[str, int]:
    """``"host:port"`` as (host, port); IPv6 endpoints are refused (not supported)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgument(f"overlay peer endpoint {value!r} is not host:port")
    if host.startswith("[") or ":" in host:
        raise InvalidArgument(f"overlay peer endpoint {value!r}: IPv6 endpoints are not supported")
    number = int(port)
    if not 1 <= number <= 65535:
        raise InvalidArgument(f"overlay peer endpoint {value!r}: port must be 1 to 65535")
    if any(c.isspace() for c in host) or len(host) > 253:
        raise InvalidArgument(f"overlay peer endpoint {value!r}: bad host name")
    return host, number


def is_host_loopback(host: str) -> bool:
    """Whether ``host`` names the host's own loopback, which a guest cannot reach directly."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        return False


def _loopback_target(host: str, port: int) -> tuple[str, int]:
    """Where on the host a loopback endpoint is (a name such as localhost: 127.0.0.1)."""
    return (host if host[:1].isdigit() else "127.0.0.1", port)


def _unknown(data: Mapping[str, Any], known: frozenset[str], what: str) -> None:
    extra = sorted(set(data) - known)
    if extra:
        raise InvalidArgument(f"overlay {what} has unknown field {extra[0]!r}")


def _peer(number: int, data: object) -> Peer:
    what = f"peer {number}"
    if not isinstance(data, dict):
        raise InvalidArgument(f"overlay {what} is not a JSON object")
    _unknown(data, _PEER_FIELDS, what)
    endpoint = data.get("endpoint") or ""
    if not isinstance(endpoint, str):
        raise InvalidArgument(f"overlay {what} endpoint must be a string host:port")
    if endpoint:
        split_endpoint(endpoint)
    allowed = data.get("allowed_ips") or []
    if not isinstance(allowed, list) or len(allowed) > MAX_ALLOWED_IPS:
        raise InvalidArgument(
            f"overlay {what} allowed_ips must be a list of at most {MAX_ALLOWED_IPS} CIDRs"
        )
    keepalive = data.get("persistent_keepalive_secs")
    return Peer(
        public_key=check_key(data.get("public_key"), f"{what} public_key"),
        endpoint=endpoint,
        allowed_ips=tuple(check_cidr(c, f"{what} allowed IP") for c in allowed),
        persistent_keepalive_secs=0
        if keepalive is None
        else _int(keepalive, f"{what} persistent_keepalive_secs", 0, MAX_KEEPALIVE),
    )


def parse_config(data: object) -> OverlayConfig:
    """The overlay configuration a client sent, checked (InvalidArgument, one line)."""
    if not isinstance(data, dict):
        raise InvalidArgument("the overlay configuration must be a JSON object")
    _unknown(data, _FIELDS, "configuration")
    peers = data.get("peers") or []
    if not isinstance(peers, list):
        raise InvalidArgument("overlay peers must be a list")
    if len(peers) > MAX_PEERS:
        raise InvalidArgument(f"overlay peers: at most {MAX_PEERS}, not {len(peers)}")
    parsed = tuple(_peer(number, peer) for number, peer in enumerate(peers))
    keys = [peer.public_key for peer in parsed]
    if len(set(keys)) != len(keys):
        raise InvalidArgument("overlay peers: the same public key appears twice")
    dns_server = data.get("dns_server") or ""
    dns_domain = data.get("dns_domain") or ""
    if not isinstance(dns_domain, str) or any(c.isspace() for c in dns_domain):
        raise InvalidArgument(f"overlay dns_domain is not a domain name: {dns_domain!r}")
    host_port = data.get("host_port")
    config = OverlayConfig(
        overlay_ip=_ipv4(data.get("overlay_ip"), "overlay_ip"),
        prefix_len=_int(data.get("prefix_len"), "prefix_len", 0, 32),
        private_key=check_key(data.get("private_key"), "private_key"),
        listen_port=_int(data.get("listen_port"), "listen_port", 1, 65535),
        peers=parsed,
        dns_server=_ipv4(dns_server, "dns_server") if dns_server else "",
        dns_domain=dns_domain,
        host_port=0 if host_port is None else _int(host_port, "host_port", 0, 65535),
    )
    if config.private_key in keys:
        raise InvalidArgument("overlay peers: a peer has the container's own key")
    return config


def loopback_targets(config: OverlayConfig) -> list[tuple[str, int]]:
    """The host-loopback endpoints of the peers (each needs a relay), without repeats."""
    targets: list[tuple[str, int]] = []
    for peer in config.peers:
        if not peer.endpoint:
            continue
        host, port = split_endpoint(peer.endpoint)
        if is_host_loopback(host):
            target = _loopback_target(host, port)
            if target not in targets:
                targets.append(target)
    return targets


def rewrite_endpoint(endpoint: str, relays: Mapping[tuple[str, int], int]) -> str:
    """What the guest dials for ``endpoint``: its relay at the gateway, or itself.

    A loopback endpoint without a relay keeps its port at the gateway (what a VM without
    a network namespace of its own reaches the host's loopback through)."""
    if not endpoint:
        return ""
    host, port = split_endpoint(endpoint)
    if not is_host_loopback(host):
        return endpoint
    return f"{GUEST_GATEWAY}:{relays.get(_loopback_target(host, port), port)}"


def _relayed(endpoint: str) -> bool:
    return bool(endpoint) and is_host_loopback(split_endpoint(endpoint)[0])


def guest_body(
    config: OverlayConfig, relays: Mapping[tuple[str, int], int] | None = None
) -> dict[str, Any]:
    """The WIREGUARD request for the agent; ``relays`` maps each loopback target to the
    gateway port relaying to it (see :func:`loopback_targets`)."""
    relays = relays or {}
    return {
        "overlay_ip": config.overlay_ip,
        "prefix_len": config.prefix_len,
        "private_key": config.private_key,
        "listen_port": config.listen_port,
        "peers": [
            {
                "public_key": peer.public_key,
                "endpoint": rewrite_endpoint(peer.endpoint, relays),
                "allowed_ips": list(peer.allowed_ips),
                "persistent_keepalive_secs": peer.persistent_keepalive_secs
                or (RELAYED_KEEPALIVE if _relayed(peer.endpoint) else 0),
            }
            for peer in config.peers
        ],
        "dns_server": config.dns_server or None,
        "dns_domain": config.dns_domain or None,
    }


# -- what the guest answers (hostile input: its root can write anything to the port) --
_INTERFACE_NAME = 15
_ENDPOINT_TEXT = 64
_COUNTER_MAX = 1 << 63


def _guest_key(value: object) -> str:
    """A public key the guest reports: 32 bytes of base64, else ""."""
    if not isinstance(value, str) or len(value) != 44:
        return ""
    try:
        return value if len(base64.b64decode(value, validate=True)) == 32 else ""
    except (binascii.Error, ValueError):
        return ""


def _guest_count(value: object) -> int:
    return value if type(value) is int and 0 <= value < _COUNTER_MAX else 0


def _guest_text(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else ""
    return text if len(text) <= limit and text.isprintable() else ""


def guest_reply(reply: Mapping[str, Any]) -> dict[str, Any]:
    """The guest's WIREGUARD reply cut to what the host shows: typed, bounded, at most
    MAX_PEERS peers; anything malformed reads as absent, never as an error."""
    peers = reply.get("peers")
    shown = []
    for peer in (peers if isinstance(peers, list) else [])[:MAX_PEERS]:
        if isinstance(peer, dict):
            shown.append(
                {
                    "public_key": _guest_key(peer.get("public_key")),
                    "endpoint": _guest_text(peer.get("endpoint"), _ENDPOINT_TEXT),
                    "latest_handshake": _guest_count(peer.get("latest_handshake")),
                    "rx_bytes": _guest_count(peer.get("rx_bytes")),
                    "tx_bytes": _guest_count(peer.get("tx_bytes")),
                }
            )
    return {
        "public_key": _guest_key(reply.get("public_key")),
        "interface": _guest_text(reply.get("interface"), _INTERFACE_NAME),
        "attached": reply.get("attached") is True,
        "peers": shown,
    }
