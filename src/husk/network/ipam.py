"""Address management: subnets for networks, addresses for their members.

Pure functions over what is in use, so that every rule is testable without a daemon:
the caller (the network manager, under its lock) says which subnets and addresses are
taken.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network

from husk.errors import Conflict, InvalidArgument, NotSupported
from husk.guest.netconfig import EGRESS_CIDR, GUEST_SUBNET

RESERVED_SUBNETS = (
    IPv4Network(GUEST_SUBNET),
    IPv4Network(EGRESS_CIDR),
    IPv4Network("127.0.0.0/8"),
    IPv4Network("0.0.0.0/8"),
    IPv4Network("224.0.0.0/4"),
)
"""What no husk network may overlap: every VM's own networks (QEMU's slirp and
slirp4netns), loopback, "this network" and multicast."""

MAX_PREFIX = 30
"""A subnet must hold its gateway and at least one member besides network and broadcast."""


def _pool() -> Iterator[IPv4Network]:
    """Docker's default pools: 172.18.0.0/16 … 172.31.0.0/16, then 192.168.0.0/20 slices."""
    for second in range(18, 32):
        yield IPv4Network(f"172.{second}.0.0/16")
    yield from IPv4Network("192.168.0.0/16").subnets(new_prefix=20)


def parse_subnet(text: str) -> IPv4Network:
    """``--subnet``: an IPv4 CIDR whose host bits are zero (IPv6 is not supported)."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise InvalidArgument(
            f"invalid subnet {text!r}: expected an IPv4 CIDR such as 10.10.0.0/16"
        ) from None
    if "/" not in text:
        raise InvalidArgument(f"invalid subnet {text!r}: the prefix length is missing (/NN)")
    if network.version != 4:
        raise NotSupported(f"IPv6 subnet {text}: IPv6 networks are not supported by husk")
    assert isinstance(network, IPv4Network)
    if str(network) != text.strip():
        raise InvalidArgument(f"invalid subnet {text}: it should be {network}")
    if network.prefixlen > MAX_PREFIX:
        raise InvalidArgument(
            f"invalid subnet {text}: too small (/{MAX_PREFIX} at most leaves room for a "
            "gateway and a container)"
        )
    for reserved in RESERVED_SUBNETS:
        if network.overlaps(reserved):
            raise InvalidArgument(
                f"invalid subnet {text}: it overlaps {reserved}, which husk's VMs use themselves"
            )
    return network


def parse_address(text: str, what: str) -> IPv4Address:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise InvalidArgument(f"invalid {what} {text!r}: not an IP address") from None
    if address.version != 4:
        raise NotSupported(f"IPv6 {what} {text}: IPv6 networks are not supported by husk")
    assert isinstance(address, IPv4Address)
    return address


def check_gateway(subnet: IPv4Network, text: str) -> IPv4Address:
    """``--gateway``: a host address of the subnet."""
    gateway = parse_address(text, "gateway")
    if gateway not in subnet:
        raise InvalidArgument(f"invalid gateway {gateway}: it is not in subnet {subnet}")
    if gateway in (subnet.network_address, subnet.broadcast_address):
        raise InvalidArgument(
            f"invalid gateway {gateway}: the network or broadcast address of {subnet}"
        )
    return gateway


def check_free(subnet: IPv4Network, taken: Iterable[tuple[str, IPv4Network]]) -> None:
    """Conflict when ``subnet`` overlaps another husk network's (name, subnet)."""
    for name, other in taken:
        if subnet.overlaps(other):
            raise Conflict(
                f"invalid pool request: Pool overlaps with other one on this address space "
                f"({subnet} overlaps {other} of network {name})"
            )


def choose_subnet(taken: Collection[IPv4Network]) -> IPv4Network:
    """The first subnet of the default pools that overlaps none taken."""
    for candidate in _pool():
        if not any(candidate.overlaps(other) for other in taken):
            return candidate
    raise Conflict(
        "could not find an available, non-overlapping IPv4 address pool among the defaults "
        "to assign to the network (give one with --subnet)"
    )


def default_gateway(subnet: IPv4Network) -> IPv4Address:
    """Docker's choice: the subnet's first host address."""
    return subnet.network_address + 1


def allocate_address(
    subnet: IPv4Network,
    gateway: IPv4Address,
    used: Collection[str],
    wanted: str | None = None,
    *,
    network_name: str = "",
) -> IPv4Address:
    """A member's address: ``wanted`` if inside and free, else the lowest free one from .2.

    The network and broadcast addresses and the gateway are never given out.
    """
    reserved = {subnet.network_address, subnet.broadcast_address, gateway}
    label = f"network {network_name}" if network_name else f"subnet {subnet}"
    if wanted:
        address = parse_address(wanted, "IPv4 address")
        if address not in subnet:
            raise InvalidArgument(
                f"invalid IPv4 address {address}: it is not in the subnet {subnet} of {label}"
            )
        if address in reserved:
            raise InvalidArgument(
                f"invalid IPv4 address {address}: reserved on {label} "
                "(network, broadcast or gateway address)"
            )
        if str(address) in used:
            raise Conflict(f"Address already in use: {address} on {label}")
        return address
    taken = {IPv4Address(a) for a in used} | reserved
    for address in subnet.hosts():
        if address not in taken:
            return address
    raise Conflict(f"no available IPv4 address on {label} ({subnet} is full)")
