"""Network interfaces and routes through ioctls: no fork, no exec, no netlink library.

The NETWORK message runs on every container start, and under TCG a busybox ``ip``
costs more than the change it makes; these are the few operations it needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator

SIOCADDRT = 0x890B
SIOCDELRT = 0x890C
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922

IFF_UP = 0x1
RTF_UP = 0x0001
RTF_GATEWAY = 0x0002
RTF_HOST = 0x0004
RTF_REJECT = 0x0200

REJECT_METRIC = 1000
"""Reject routes rank below any route to the same prefix the kernel adds itself."""

_IFNAMSIZ = 16
_RTENTRY = struct.Struct("@L16s16s16sHhLPhPLLH0L")
SYS_CLASS_NET = "/sys/class/net"


class NetError(Exception):
    """An interface or route could not be changed; the message names which and why."""


@contextlib.contextmanager
def _control_socket() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        yield sock.fileno()


def _name(interface: str) -> bytes:
    encoded = interface.encode()
    if not encoded or len(encoded) >= _IFNAMSIZ:
        raise NetError(f"invalid interface name {interface!r}")
    return encoded.ljust(_IFNAMSIZ, b"\0")


def _sockaddr(address: str) -> bytes:
    return struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(address))


def _ioctl(fd: int, request: int, data: bytes, what: str) -> bytes:
    try:
        return fcntl.ioctl(fd, request, data)
    except OSError as exc:
        raise NetError(f"{what}: {os.strerror(exc.errno or 0)}") from None


def interfaces_by_mac() -> dict[str, str]:
    """MAC (lower case) → interface name, for every interface the kernel has now."""
    found: dict[str, str] = {}
    try:
        names = sorted(os.listdir(SYS_CLASS_NET))
    except OSError:
        return found
    for name in names:
        try:
            with open(f"{SYS_CLASS_NET}/{name}/address") as fh:
                mac = fh.read().strip().lower()
        except OSError:
            continue
        found.setdefault(mac, name)
    return found


def _flags(fd: int, interface: str) -> int:
    reply = _ioctl(
        fd, SIOCGIFFLAGS, struct.pack("16sh22x", _name(interface), 0), f"flags of {interface}"
    )
    return int(struct.unpack_from("16sh", reply)[1])


def set_up(interface: str, up: bool) -> None:
    with _control_socket() as fd:
        flags = _flags(fd, interface)
        wanted = (flags | IFF_UP) if up else (flags & ~IFF_UP)
        if wanted != flags:
            request = struct.pack("16sh22x", _name(interface), wanted & 0xFFFF)
            state = "up" if up else "down"
            _ioctl(fd, SIOCSIFFLAGS, request, f"cannot bring {interface} {state}")


def is_up(interface: str) -> bool:
    with _control_socket() as fd:
        return bool(_flags(fd, interface) & IFF_UP)


def disable_ipv6(interface: str) -> None:
    """No IPv6 on ``interface`` (husk networks are IPv4): no link-local address, and none
    of the solicitations that come with it crossing the switch. Best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6", os.O_WRONLY)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)


def set_mtu(interface: str, mtu: int) -> None:
    with _control_socket() as fd:
        request = struct.pack("16si20x", _name(interface), mtu)
        _ioctl(fd, SIOCSIFMTU, request, f"cannot set the MTU of {interface} to {mtu}")


def set_address(interface: str, address: str, netmask: str) -> None:
    """Makes ``address``/``netmask`` the interface's (only) IPv4 address."""
    with _control_socket() as fd:
        name = _name(interface)
        what = f"cannot give {interface} the address {address}"
        _ioctl(fd, SIOCSIFADDR, name + _sockaddr(address) + bytes(8), what)
        _ioctl(fd, SIOCSIFNETMASK, name + _sockaddr(netmask) + bytes(8), what)


def flush_address(interface: str) -> None:
    """Removes the interface's IPv4 address (0.0.0.0 deletes it; none: nothing to do)."""
    with _control_socket() as fd:
        request = _name(interface) + _sockaddr("0.0.0.0") + bytes(8)
        try:
            fcntl.ioctl(fd, SIOCSIFADDR, request)
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise NetError(f"cannot remove the address of {interface}: {exc}") from None


def _rtentry(
    destination: str, genmask: str, gateway: str, flags: int, metric: int, device: int = 0
) -> bytes:
    """A ``struct rtentry``; ``device``: the address of the interface's name (rt_dev)."""
    return _RTENTRY.pack(
        0,
        _sockaddr(destination),
        _sockaddr(gateway),
        _sockaddr(genmask),
        flags,
        0,
        0,
        0,
        metric,
        device,
        0,
        0,
        0,
    )


def _route(request: int, entry: bytes, what: str, ignore: int) -> bool:
    """True if the kernel took the change, False if it was already so (``ignore``)."""
    with _control_socket() as fd:
        try:
            fcntl.ioctl(fd, request, entry)
        except OSError as exc:
            if exc.errno == ignore:
                return False
            raise NetError(f"{what}: {os.strerror(exc.errno or 0)}") from None
    return True


def add_reject_route(network: str, netmask: str) -> bool:
    """An "unreachable" route for ``network``: its packets fail at once, never leave."""
    entry = _rtentry(network, netmask, "0.0.0.0", RTF_UP | RTF_REJECT, REJECT_METRIC)
    return _route(SIOCADDRT, entry, f"cannot add a reject route to {network}", errno.EEXIST)


def delete_reject_route(network: str, netmask: str) -> bool:
    entry = _rtentry(network, netmask, "0.0.0.0", RTF_UP | RTF_REJECT, REJECT_METRIC)
    return _route(SIOCDELRT, entry, f"cannot delete the reject route to {network}", errno.ESRCH)


def add_default_route(gateway: str) -> bool:
    entry = _rtentry("0.0.0.0", "0.0.0.0", gateway, RTF_UP | RTF_GATEWAY, 0)
    return _route(SIOCADDRT, entry, f"cannot add the default route via {gateway}", errno.EEXIST)


def add_host_route(destination: str, gateway: str) -> bool:
    """``destination``/32 through ``gateway`` (more specific than the subnet it is in)."""
    entry = _rtentry(destination, "255.255.255.255", gateway, RTF_UP | RTF_GATEWAY | RTF_HOST, 0)
    return _route(SIOCADDRT, entry, f"cannot route {destination} via {gateway}", errno.EEXIST)


def delete_host_route(destination: str, gateway: str) -> bool:
    entry = _rtentry(destination, "255.255.255.255", gateway, RTF_UP | RTF_GATEWAY | RTF_HOST, 0)
    return _route(SIOCDELRT, entry, f"cannot delete the route to {destination}", errno.ESRCH)


def _device_route(
    request: int, destination: str, netmask: str, gateway: str | None, interface: str
) -> bytes:
    """Does ``request`` on the route to ``destination``/``netmask`` through ``interface``.

    Returns the reply (unused); the name buffer lives until the ioctl returned.
    """
    name = ctypes.create_string_buffer(_name(interface))
    flags = RTF_UP | (RTF_GATEWAY if gateway else 0)
    if netmask == "255.255.255.255":
        flags |= RTF_HOST
    entry = _rtentry(destination, netmask, gateway or "0.0.0.0", flags, 0, ctypes.addressof(name))
    with _control_socket() as fd:
        return fcntl.ioctl(fd, request, entry)


def add_route(destination: str, netmask: str, gateway: str | None, interface: str) -> bool:
    """A route through ``interface`` (to ``gateway`` on it, or on the link); False if present."""
    via = f" via {gateway}" if gateway else ""
    try:
        _device_route(SIOCADDRT, destination, netmask, gateway, interface)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False
        raise NetError(
            f"cannot route {destination}/{netmask}{via} on {interface}: "
            f"{os.strerror(exc.errno or 0)}"
        ) from None
    return True


def delete_route(destination: str, netmask: str, gateway: str | None, interface: str) -> bool:
    """Removes a route :func:`add_route` made; False if it was gone already."""
    try:
        _device_route(SIOCDELRT, destination, netmask, gateway, interface)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENODEV):
            return False
        raise NetError(
            f"cannot delete the route to {destination} on {interface}: "
            f"{os.strerror(exc.errno or 0)}"
        ) from None
    return True
