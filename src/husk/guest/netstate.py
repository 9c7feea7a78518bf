"""The NETWORK message's body: checked and normalised, by the host and by the guest agent.

Standard library only (the guest agent imports it, as it does :mod:`husk.guest.protocol`).
The body is the container's whole network state (docs/NETWORKS.md)::

    {"egress": true,
     "lans": [{"slot": 1, "mac": "02:42:ac:12:00:02", "address": "172.18.0.2/16",
               "mtu": 65520,
               "routes": [{"destination": "10.90.0.0/16", "gateway": "172.18.0.1"}]}],
     "unreachable": ["172.19.0.0/16"],
     "names": {"web": ["172.18.0.3"]},           # null: no embedded resolver
     "dns": {"servers": [], "search": [], "options": []},
     "hosts": {"hostname": "abc", "address": "172.18.0.2", "extra": ["host:1.2.3.4"]}}

:func:`check` raises ValueError naming the field that is wrong; it returns a new dict
with every field present and of the promised type.

A LAN's ``routes`` (a routed LAN: an engine's network namespace, husk.ociruntime.netns)
go through its interface, to a ``gateway`` on it or (no gateway) on the link itself.
``0.0.0.0/0`` is the default route: only with ``egress`` false (eth0 has it otherwise)
and on one LAN at most.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from husk.guest.netconfig import LAN_MTU, LAN_SLOTS

MIN_MTU = 68
MAX_MTU = 65535
MAX_UNREACHABLE = 256
MAX_NAMES = 4096
MAX_ADDRESSES_PER_NAME = 64
MAX_DNS_ITEMS = 16
MAX_EXTRA_HOSTS = 1024
MAX_NAME = 253
MAX_TEXT = 255
MAX_LAN_ROUTES = 64
_NOT_ROUTABLE = tuple(
    ipaddress.IPv4Network(text)
    for text in ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32")
)
"""Destinations no LAN route may cover (but the default route, 0.0.0.0/0, itself)."""
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")
_WORD = re.compile(r"[!-~]+")


def _list(value: Any, what: str, limit: int) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list")
    if len(value) > limit:
        raise ValueError(f"{what} has more than {limit} entries")
    return value


def _text(value: Any, what: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ValueError(f"{what} must be a non-empty string of at most {limit} characters")
    return value


def _ipv4(value: Any, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(_text(value, what, 64)))
    except ipaddress.AddressValueError:
        raise ValueError(f"{what} {value!r} is not an IPv4 address") from None


def _ip(value: Any, what: str) -> str:
    try:
        return str(ipaddress.ip_address(_text(value, what, 64)))
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an IP address") from None


def normal_name(name: str) -> str:
    """A DNS name as the resolver's table keys it: lower case, without the final dot."""
    return name.lower().rstrip(".")


def check_mac(value: Any, what: str) -> str:
    mac = _text(value, what, 17).lower()
    if not _MAC.fullmatch(mac):
        raise ValueError(f"{what} {value!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
    if int(mac[:2], 16) & 0x01:
        raise ValueError(f"{what} {mac} is a multicast address")
    return mac


def _lan(value: Any, index: int) -> dict[str, Any]:
    what = f"lans[{index}]"
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object")
    slot = value.get("slot")
    if type(slot) is not int or not 1 <= slot <= LAN_SLOTS:
        raise ValueError(f"{what}.slot must be a LAN slot from 1 to {LAN_SLOTS}, not {slot!r}")
    address = _text(value.get("address"), f"{what}.address", 64)
    try:
        interface = ipaddress.IPv4Interface(address)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError):
        raise ValueError(f"{what}.address {address!r} is not an IPv4 address/prefix") from None
    if "/" not in address:
        raise ValueError(f"{what}.address {address!r} needs a prefix length (a.b.c.d/n)")
    mtu = value.get("mtu", LAN_MTU)
    if type(mtu) is not int or not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"{what}.mtu must be an integer from {MIN_MTU} to {MAX_MTU}")
    gateway = value.get("gateway")
    if gateway is not None:
        gateway = _ipv4(gateway, f"{what}.gateway")
    return {
        "slot": slot,
        "mac": check_mac(value.get("mac"), f"{what}.mac"),
        "address": str(interface),
        "mtu": mtu,
        "gateway": gateway,
        "routes": _routes(value.get("routes"), what, interface),
    }


def _routes(value: Any, what: str, own: ipaddress.IPv4Interface) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = []
    for index, entry in enumerate(_list(value, f"{what}.routes", MAX_LAN_ROUTES)):
        where = f"{what}.routes[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object")
        text = _text(entry.get("destination"), f"{where}.destination", 64)
        try:
            destination = ipaddress.IPv4Network(text, strict=True)
        except ValueError:
            raise ValueError(f"{where}.destination {text!r} is not an IPv4 network") from None
        if destination.prefixlen and any(destination.overlaps(n) for n in _NOT_ROUTABLE):
            raise ValueError(f"{where}.destination {destination} cannot be routed through a LAN")
        gateway = entry.get("gateway")
        if gateway is not None:
            address = ipaddress.IPv4Address(_ipv4(gateway, f"{where}.gateway"))
            if any(address in n for n in _NOT_ROUTABLE) or address == own.ip:
                raise ValueError(f"{where}.gateway {address} cannot be a gateway")
            gateway = str(address)
        if any(route["destination"] == str(destination) for route in routes):
            raise ValueError(f"{where}.destination {destination} is listed twice")
        routes.append({"destination": str(destination), "gateway": gateway})
    return routes


def _names(value: Any) -> dict[str, list[str]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("names must be an object (name → addresses) or null")
    if len(value) > MAX_NAMES:
        raise ValueError(f"names has more than {MAX_NAMES} entries")
    table: dict[str, list[str]] = {}
    for name, addresses in value.items():
        key = normal_name(_text(name, "a name in names", MAX_NAME))
        if not _NAME.fullmatch(key):
            raise ValueError(f"names: {name!r} is not a DNS name")
        what = f"names[{name!r}]"
        found = [_ipv4(a, what) for a in _list(addresses, what, MAX_ADDRESSES_PER_NAME)]
        merged = table.setdefault(key, [])
        merged.extend(a for a in found if a not in merged)
    return table


def _dns(value: Any) -> dict[str, list[str]]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError("dns must be an object")
    servers = [_ip(s, "dns.servers") for s in _list(value.get("servers"), "dns", MAX_DNS_ITEMS)]
    words: dict[str, list[str]] = {}
    for key in ("search", "options"):
        items = [_text(s, f"dns.{key}") for s in _list(value.get(key), f"dns.{key}", 16)]
        for item in items:
            if not _WORD.fullmatch(item):
                raise ValueError(f"dns.{key}: {item!r} must be one word of printable ASCII")
        words[key] = items
    return {"servers": servers, "search": words["search"], "options": words["options"]}


def _hosts_line(entry: Any) -> str:
    """An /etc/hosts line from ``name:ip`` (Docker's --add-host) or ``ip<TAB>name``."""
    text = _text(entry, "hosts.extra", 512)
    if "\n" in text or "\r" in text or "\0" in text:
        raise ValueError(f"hosts.extra {text!r} spans lines")
    parts = text.split()
    if len(parts) >= 2:
        _ip(parts[0], "hosts.extra")
        return "\t".join([parts[0], " ".join(parts[1:])])
    name, separator, address = text.partition(":")
    if not separator or not name:
        raise ValueError(f"hosts.extra {text!r} is neither name:address nor address<TAB>name")
    return f"{_ip(address.strip('[]'), 'hosts.extra')}\t{name}"


def _hosts(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("hosts must be an object or null")
    hostname = _text(value.get("hostname"), "hosts.hostname", 64)
    if not _WORD.fullmatch(hostname):
        raise ValueError(f"hosts.hostname {hostname!r} must be one word")
    address = value.get("address")
    extra = [_hosts_line(e) for e in _list(value.get("extra"), "hosts.extra", MAX_EXTRA_HOSTS)]
    return {
        "hostname": hostname,
        "address": None if address is None else _ip(address, "hosts.address"),
        "extra": extra,
    }


def check(body: Any) -> dict[str, Any]:
    """The normalised NETWORK body; ValueError naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the network state must be an object")
    egress = body.get("egress", True)
    if not isinstance(egress, bool):
        raise ValueError("egress must be true or false")
    lans = [_lan(v, i) for i, v in enumerate(_list(body.get("lans"), "lans", LAN_SLOTS))]
    slots = [lan["slot"] for lan in lans]
    if len(set(slots)) != len(slots):
        raise ValueError(f"lans: a slot is listed twice ({slots})")
    defaults = [
        lan["slot"]
        for lan in lans
        for route in lan["routes"]
        if route["destination"] == "0.0.0.0/0"
    ]
    if defaults and egress:
        raise ValueError("a default route through a LAN needs egress false (eth0 has it)")
    if len(defaults) > 1:
        raise ValueError(f"lans: a default route on more than one LAN (slots {defaults})")
    unreachable: list[str] = []
    for entry in _list(body.get("unreachable"), "unreachable", MAX_UNREACHABLE):
        try:
            network = ipaddress.IPv4Network(_text(entry, "unreachable", 64), strict=False)
        except (ValueError, TypeError):
            raise ValueError(f"unreachable: {entry!r} is not an IPv4 network") from None
        if str(network) not in unreachable:
            unreachable.append(str(network))
    return {
        "egress": egress,
        "lans": lans,
        "unreachable": unreachable,
        "names": _names(body.get("names")),
        "dns": _dns(body.get("dns")),
        "hosts": _hosts(body.get("hosts")),
    }
