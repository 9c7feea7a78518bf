"""What a container's guest is told about its networks (the NETWORK message's body).

Pure functions of the container, the other members and the networks (docs/NETWORKS.md):
the LANs it is on, the names it resolves (user-defined networks only, as Docker's
embedded resolver), the other husk subnets it must not reach through egress, and whether
it has egress at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from husk.network.model import Endpoint, Member, Network


def dns_names(member: Member, network: Network, endpoint: Endpoint) -> list[str] | None:
    """Docker's DNSNames of an endpoint: name, aliases, short id, host name (user
    networks only; None on the default bridge, which resolves no names)."""
    if not network.user_defined:
        return None
    names = [member.name, *endpoint.aliases, member.short_id]
    if member.hostname:
        names.append(member.hostname)
    return list(dict.fromkeys(n for n in names if n))


def _by_slot(member: Member) -> list[Endpoint]:
    return sorted(member.endpoints.values(), key=lambda e: e.slot)


def names_table(
    member: Member, members: Iterable[Member], networks: Mapping[str, Network]
) -> dict[str, list[str]] | None:
    """Name → addresses the member's resolver answers; None when it is on no user network.

    Only the member itself and running members count (a stopped container has no
    reachable endpoint, as in Docker). Each name maps to the addresses of that name on
    the networks the member shares, in the order of the member's LAN slots; names are
    lowercase (DNS names are case-insensitive).
    """
    own = [e for e in _by_slot(member) if _user_network(networks, e) is not None]
    if not own:
        return None
    others = [m for m in members if m.id != member.id and m.running]
    table: dict[str, list[str]] = {}
    for endpoint in own:
        network = networks[endpoint.network_id]
        for candidate in [member, *others]:
            theirs = _endpoint_on(candidate, network.id)
            if theirs is None:
                continue
            for name in dns_names(candidate, network, theirs) or []:
                addresses = table.setdefault(name.lower(), [])
                if theirs.address not in addresses:
                    addresses.append(theirs.address)
    return table


def _user_network(networks: Mapping[str, Network], endpoint: Endpoint) -> Network | None:
    network = networks.get(endpoint.network_id)
    return network if network is not None and network.user_defined else None


def _endpoint_on(member: Member, network_id: str) -> Endpoint | None:
    for endpoint in member.endpoints.values():
        if endpoint.network_id == network_id:
            return endpoint
    return None


def unreachable(member: Member, networks: Iterable[Network]) -> list[str]:
    """The subnets of every husk network the member is not on (sorted)."""
    joined = {e.network_id for e in member.endpoints.values()}
    return sorted(
        {n.subnet for n in networks if n.addressed and n.id not in joined},
        key=_subnet_key,
    )


def _subnet_key(subnet: str) -> tuple[int, ...]:
    address, _, prefix = subnet.partition("/")
    return (*(int(part) for part in address.split(".")), int(prefix or 0))


def has_egress(member: Member, networks: Mapping[str, Network]) -> bool:
    """Egress exists while the member is on at least one network that is not internal."""
    if member.isolated:
        return False
    return any(
        (network := networks.get(e.network_id)) is not None and not network.internal
        for e in member.endpoints.values()
    )


def _lan(endpoint: Endpoint, network: Network) -> dict[str, Any]:
    lan: dict[str, Any] = {
        "slot": endpoint.slot,
        "mac": endpoint.mac,
        "address": endpoint.cidr,
        "mtu": network.mtu,
    }
    if network.gateway and not network.internal:
        # As on Docker's bridge, the gateway is the host (its published ports).
        lan["gateway"] = network.gateway
    return lan


def guest_network_body(
    member: Member, members: Iterable[Member], networks: Mapping[str, Network]
) -> dict[str, Any]:
    """The full NETWORK message body for ``member`` (docs/NETWORKS.md).

    ``members`` are every container holding endpoints (the member itself may be among
    them), ``networks`` every network by id.
    """
    endpoints = [] if member.isolated else _by_slot(member)
    lans = [
        _lan(e, networks[e.network_id])
        for e in endpoints
        if e.slot > 0 and e.network_id in networks
    ]
    egress = has_egress(member, networks)
    return {
        "egress": egress,
        "lans": lans,
        # Without egress nothing leaves the VM anyway: no reject routes to show.
        "unreachable": unreachable(member, networks.values()) if egress else [],
        "names": None if member.isolated else names_table(member, members, networks),
        "dns": {
            "servers": list(member.dns),
            "search": list(member.dns_search),
            "options": list(member.dns_options),
        },
        "hosts": {
            "hostname": member.hostname or member.short_id,
            "address": endpoints[0].address if endpoints else None,
            "extra": list(member.extra_hosts),
        },
    }
