"""The networks and their members: create, list, remove, prune, connect, disconnect.

:class:`NetworkManager` holds the rules (Docker's), the networks' store and one lock that
orders every change, so that two requests never hand out one address or slot. It does not
know container records: a :class:`Members` book (the runtime's) lists the containers and
saves their endpoints. What must happen on a running VM (its switch ports, its guest's
NETWORK message, its egress) is a :class:`LiveNetworks`'s job, called after each change.
"""

from __future__ import annotations

import asyncio
import builtins
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

from husk.errors import Conflict, InvalidArgument, NotFound, NotSupported
from husk.guest.netconfig import LAN_MTU, LAN_SLOTS
from husk.network import ipam
from husk.network.model import (
    BRIDGE_DRIVER,
    DEFAULT_MODES,
    DEFAULT_NETWORK,
    HOST_NETWORK,
    MTU_OPTION,
    NONE_NETWORK,
    PREDEFINED,
    Endpoint,
    Forbidden,
    Member,
    Network,
    mac_for,
    new_id,
)
from husk.network.names import guest_network_body
from husk.network.store import NetworkStore
from husk.spec import NetworkRequest

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
MAX_NAME = 128
ALIAS_PATTERN = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_.-]*")
MAX_ALIAS = 253
MIN_MTU = 68
# Bridge-driver options whose only meaning husk already has (its switch forwards between
# members and masquerades egress); any other value of them is refused.
HARMLESS_OPTIONS = {
    "com.docker.network.bridge.enable_icc": ("true",),
    "com.docker.network.bridge.enable_ip_masquerade": ("true",),
}
NAMED_OPTIONS = ("com.docker.network.bridge.name",)
"""Options that only name things on Docker's host (its Linux bridge): kept, shown, unused."""
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"

NOT_SUPPORTED_HOST = (
    "network mode host is not supported: each husk container is a VM, which cannot share "
    "the host's network stack (publish ports with -p instead)"
)


class LiveNetworks(Protocol):
    """What a network change means for running containers (wired by the runtime).

    Called after the change is recorded, under the manager's lock: an implementation
    must not call the manager's async methods. A failing ``container_joined`` undoes
    the connect (the error reaches the client); failures of the others are logged.
    """

    async def container_joined(
        self, container_id: str, network: Network, endpoint: Endpoint
    ) -> None: ...

    async def container_left(
        self, container_id: str, network: Network, endpoint: Endpoint
    ) -> None: ...

    async def network_removed(self, network: Network) -> None: ...


class NoLiveNetworks:
    """No running VMs to tell (tests, and until the runtime wires its own)."""

    async def container_joined(
        self, container_id: str, network: Network, endpoint: Endpoint
    ) -> None:
        return None

    async def container_left(self, container_id: str, network: Network, endpoint: Endpoint) -> None:
        return None

    async def network_removed(self, network: Network) -> None:
        return None


class Members(Protocol):
    """The containers, as the runtime keeps them."""

    def members(self) -> list[Member]:
        """Every container (with its endpoints)."""
        ...

    def member(self, ref: str) -> Member:
        """The container ``ref`` names (id, name, unique id prefix); NotFound otherwise."""
        ...

    def save_endpoints(self, container_id: str, endpoints: dict[str, Endpoint]) -> None:
        """Replaces the container's endpoints in its record and saves it (or raises)."""
        ...


NetworkEvent = Callable[..., None]
"""``event(action, network, **attributes)``: a network event for ``docker events``."""


def _no_event(_action: str, _network: Network, **_attributes: str) -> None:
    return None


class NetworkManager:
    def __init__(
        self,
        store: NetworkStore,
        members: Members,
        *,
        live: LiveNetworks | None = None,
        event: NetworkEvent = _no_event,
    ) -> None:
        self.store = store
        self.members = members
        self.live: LiveNetworks = live if live is not None else NoLiveNetworks()
        """Replaceable: the runtime sets its own once its VMs can be wired."""
        self._event = event
        self.lock = asyncio.Lock()
        self._pending: dict[str, tuple[str, dict[str, Endpoint]]] = {}
        """Endpoints of containers being created (id → (name, endpoints)), not yet in
        a saved record: they count as taken until :meth:`settle`."""

    # -- finding networks ---------------------------------------------------------
    def list(self) -> builtins.list[Network]:
        return self.store.all()

    def by_id(self) -> dict[str, Network]:
        return {n.id: n for n in self.store.all()}

    def get(self, ref: str) -> Network:
        """Docker's order: full id, then exact name, then unique id prefix."""
        if not ref:
            raise NotFound("network name or id is empty")
        found = self.store.find(ref) or self.store.find_by_name(ref)
        if found is not None:
            return found
        matches = [n for n in self.store.all() if n.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise NotFound(f"network {ref} is ambiguous ({len(matches)} matches found on id)")
        raise NotFound(f"network {ref} not found")

    def members_of(self, network: Network) -> builtins.list[tuple[Member, Endpoint]]:
        """The containers with an endpoint on ``network`` (saved records only)."""
        found = []
        for member in self.members.members():
            endpoint = _endpoint_on(member.endpoints, network.id)
            if endpoint is not None:
                found.append((member, endpoint))
        return found

    def guest_body(self, member: Member) -> dict[str, Any]:
        """The NETWORK message body for ``member`` now (see husk.network.names)."""
        return guest_network_body(member, self.members.members(), self.by_id())

    # -- what is taken --------------------------------------------------------------
    def _holders(self) -> builtins.list[tuple[str, str, dict[str, Endpoint]]]:
        """(id, name, endpoints) of every container, pending creations included."""
        holders = {m.id: (m.name, m.endpoints) for m in self.members.members()}
        holders.update(self._pending)
        return [(cid, name, eps) for cid, (name, eps) in holders.items()]

    def _used_addresses(self, network_id: str, *, besides: str = "") -> set[str]:
        used = set()
        for cid, _name, endpoints in self._holders():
            endpoint = _endpoint_on(endpoints, network_id)
            if endpoint is not None and cid != besides:
                used.add(endpoint.address)
        return used

    def _subnets(self) -> builtins.list[tuple[str, IPv4Network]]:
        return [(n.name, IPv4Network(n.subnet)) for n in self.store.all() if n.addressed]

    # -- networks ---------------------------------------------------------------------
    async def create(
        self,
        name: str,
        *,
        driver: str = "",
        subnet: str | None = None,
        gateway: str | None = None,
        internal: bool = False,
        attachable: bool = False,
        labels: dict[str, str] | None = None,
        options: dict[str, str] | None = None,
        ipv6: bool = False,
    ) -> Network:
        """A new user-defined bridge network; nothing is created if anything is wrong."""
        check_network_name(name)
        if name in PREDEFINED:
            raise Forbidden(f"operation is not permitted on predefined {name} network")
        if driver not in ("", BRIDGE_DRIVER):
            raise NotSupported(
                f'network driver "{driver}" is not supported by husk: only "bridge" is'
            )
        if ipv6:
            raise NotSupported("IPv6 networks are not supported by husk")
        checked_options = check_options(options or {})
        if gateway and not subnet:
            raise InvalidArgument("a gateway needs a subnet (--subnet) to be in")
        async with self.lock:
            if self.store.find_by_name(name) is not None:
                raise Conflict(f"network with name {name} already exists")
            taken = self._subnets()
            if subnet:
                chosen = ipam.parse_subnet(subnet)
                ipam.check_free(chosen, taken)
            else:
                chosen = ipam.choose_subnet([s for _n, s in taken])
            gateway_address = (
                ipam.check_gateway(chosen, gateway) if gateway else ipam.default_gateway(chosen)
            )
            network = Network(
                id=new_id(),
                name=name,
                driver=BRIDGE_DRIVER,
                subnet=str(chosen),
                gateway=str(gateway_address),
                subnet_configured=bool(subnet),
                internal=internal,
                attachable=attachable,
                labels=dict(labels or {}),
                options=checked_options,
            )
            self.store.save(network)
            self._event("create", network)
            return network

    async def remove(self, ref: str) -> Network:
        """Deletes a user network no container is on (Forbidden otherwise)."""
        async with self.lock:
            network = self.get(ref)
            if network.predefined:
                raise Forbidden(f"{network.name} is a pre-defined network and cannot be removed")
            holders = self._holders_of(network)
            if holders:
                raise Forbidden(
                    f"error while removing network: network {network.name} id {network.id} "
                    f"has active endpoints (containers: {', '.join(sorted(holders))})"
                )
            self.store.delete(network.id)
            self._event("destroy", network)
            try:
                await self.live.network_removed(network)
            except Exception as exc:
                log.warning("network %s removed; its live cleanup failed: %s", network.name, exc)
            return network

    def _holders_of(self, network: Network) -> builtins.list[str]:
        return [name for _cid, name, eps in self._holders() if _endpoint_on(eps, network.id)]

    async def prune(
        self, wanted: Callable[[Network], bool] | None = None
    ) -> builtins.list[Network]:
        """Removes every user network no container is on (and ``wanted`` accepts)."""
        removed = []
        async with self.lock:
            candidates = [n for n in self.store.all() if n.user_defined]
        for network in candidates:
            if wanted is not None and not wanted(network):
                continue
            try:
                removed.append(await self.remove(network.id))
            except (Forbidden, NotFound):
                continue  # in use (or gone) by now: not unused
        return removed

    # -- endpoints at container create ------------------------------------------------------
    async def allocate(
        self, member: Member, requests: Sequence[NetworkRequest]
    ) -> dict[str, Endpoint]:
        """The endpoints of a container being created; they count as taken until
        :meth:`settle` (call it once the record is saved, or the create failed).

        ``member.network_mode`` is the mode (""/default/bridge, a network, none);
        ``requests`` the networks to join, the mode's first (empty: the mode's alone).
        """
        mode = member.network_mode
        if mode == HOST_NETWORK:
            raise NotSupported(NOT_SUPPORTED_HOST)
        if mode.startswith("container:"):
            raise NotSupported(
                f"network mode {mode} is not supported: each husk container is a VM with its "
                "own network stack"
            )
        if mode == NONE_NETWORK:
            others = [r for r in requests if r.network != NONE_NETWORK]
            if others:
                raise InvalidArgument(
                    "container cannot be connected to multiple networks with one of the "
                    "networks in private (none) mode"
                )
            return {}
        wanted = list(requests) or [
            NetworkRequest(DEFAULT_NETWORK if mode in DEFAULT_MODES else mode)
        ]
        if len(wanted) > LAN_SLOTS:
            raise InvalidArgument(
                f"a container can join at most {LAN_SLOTS} networks with husk "
                f"({len(wanted)} asked for)"
            )
        async with self.lock:
            endpoints: dict[str, Endpoint] = {}
            for slot, request in enumerate(wanted, start=1):
                network = self._network_for(request.network)
                if network.name in endpoints:
                    raise InvalidArgument(
                        f"network {network.name} is given more than once for one container"
                    )
                endpoints[network.name] = self._new_endpoint(
                    member, network, slot, request.aliases, request.ipv4, endpoints
                )
            self._pending[member.id] = (member.name, endpoints)
            return endpoints

    def settle(self, container_id: str) -> None:
        """The pending endpoints of a create are now in its saved record (or abandoned)."""
        self._pending.pop(container_id, None)

    def released(self, container_id: str, endpoints: dict[str, Endpoint]) -> None:
        """A removed container's endpoints are gone with its record: say so."""
        self._pending.pop(container_id, None)
        for endpoint in endpoints.values():
            network = self.store.find(endpoint.network_id)
            if network is not None:
                self._event("disconnect", network, container=container_id)

    def announce(self, container_id: str, endpoints: dict[str, Endpoint]) -> None:
        """A created container's endpoints are saved: Docker's connect events."""
        for endpoint in endpoints.values():
            network = self.store.find(endpoint.network_id)
            if network is not None:
                self._event("connect", network, container=container_id)

    def _network_for(self, ref: str) -> Network:
        if ref in DEFAULT_MODES:
            ref = DEFAULT_NETWORK
        network = self.get(ref)
        if network.name == HOST_NETWORK:
            raise NotSupported(NOT_SUPPORTED_HOST)
        if network.name == NONE_NETWORK:
            raise InvalidArgument(
                "container cannot be connected to multiple networks with one of the "
                "networks in private (none) mode"
            )
        return network

    def _new_endpoint(
        self,
        member: Member,
        network: Network,
        slot: int,
        aliases: Iterable[str],
        ipv4: str | None,
        siblings: dict[str, Endpoint],
    ) -> Endpoint:
        """An endpoint on ``network``, checked against every rule (nothing is taken yet)."""
        wanted_aliases = builtins.list(dict.fromkeys(a for a in aliases if a))
        if wanted_aliases and not network.user_defined:
            raise InvalidArgument(
                "network-scoped alias is supported only for containers in user defined networks"
            )
        for alias in wanted_aliases:
            check_alias(alias)
        if ipv4 and not network.user_defined:
            raise InvalidArgument(
                "user specified IP address is supported on user defined networks only"
            )
        if ipv4 and not network.subnet_configured:
            raise InvalidArgument(
                "user specified IP address is supported only when connecting to networks "
                "with user configured subnets"
            )
        self._check_aliases(member, network, wanted_aliases)
        used = self._used_addresses(network.id, besides=member.id)
        used |= {e.address for e in siblings.values() if e.network_id == network.id}
        address = ipam.allocate_address(
            IPv4Network(network.subnet),
            IPv4Address(network.gateway),
            used,
            ipv4,
            network_name=network.name,
        )
        return Endpoint(
            network_id=network.id,
            network_name=network.name,
            slot=slot,
            address=str(address),
            prefix_len=network.prefix_len,
            gateway=network.gateway,
            mac=mac_for(str(address)),
            aliases=wanted_aliases,
            ipam_address=str(address) if ipv4 else "",
        )

    def _check_aliases(self, member: Member, network: Network, aliases: builtins.list[str]) -> None:
        """An alias names one container on a network, unless the containers sharing it
        are replicas of one compose service (Docker answers such names round-robin)."""
        if not aliases:
            return
        service = _service_of(member)
        for other in self.members.members():
            if other.id == member.id:
                continue
            theirs = _endpoint_on(other.endpoints, network.id)
            if theirs is None:
                continue
            taken = {other.name.lower(), *(a.lower() for a in theirs.aliases)}
            clash = [a for a in aliases if a.lower() in taken]
            if clash and not (service is not None and service == _service_of(other)):
                raise Conflict(
                    f"alias {clash[0]} is already in use on network {network.name} "
                    f"by container {other.name}"
                )

    # -- connect and disconnect ---------------------------------------------------------------
    async def connect(
        self,
        network_ref: str,
        container_ref: str,
        *,
        aliases: Sequence[str] = (),
        ipv4: str | None = None,
    ) -> Endpoint:
        """Adds an endpoint on the network to the container (running or not)."""
        async with self.lock:
            network = self._network_for(network_ref)
            member = self.members.member(container_ref)
            if member.isolated:
                raise InvalidArgument(
                    "container cannot be connected to multiple networks with one of the "
                    "networks in private (none) mode"
                )
            if _endpoint_on(member.endpoints, network.id) is not None:
                raise Forbidden(
                    f"endpoint with name {member.name} already exists in network {network.name}"
                )
            free = sorted(
                set(range(1, LAN_SLOTS + 1)) - {e.slot for e in member.endpoints.values()}
            )
            if not free:
                raise InvalidArgument(
                    f"container {member.name} is already on {LAN_SLOTS} networks, the most a "
                    "husk container can join"
                )
            endpoint = self._new_endpoint(member, network, free[0], aliases, ipv4, {})
            endpoints = {**member.endpoints, network.name: endpoint}
            self.members.save_endpoints(member.id, endpoints)
            if member.running:
                try:
                    await self.live.container_joined(member.id, network, endpoint)
                except BaseException:
                    self.members.save_endpoints(member.id, dict(member.endpoints))
                    raise
            self._event("connect", network, container=member.id)
            return endpoint

    async def disconnect(
        self, network_ref: str, container_ref: str, *, force: bool = False
    ) -> None:
        """Removes the container's endpoint on the network; its address is free again.

        ``force`` is Docker's (for networks of other hosts): husk has nothing more to force.
        """
        async with self.lock:
            network = self.get(network_ref)
            member = self.members.member(container_ref)
            endpoint = _endpoint_on(member.endpoints, network.id)
            if endpoint is None:
                if network.name == HOST_NETWORK:
                    raise NotSupported(NOT_SUPPORTED_HOST)
                raise Forbidden(f"container {member.id} is not connected to network {network.name}")
            endpoints = {k: v for k, v in member.endpoints.items() if v is not endpoint}
            self.members.save_endpoints(member.id, endpoints)
            self._event("disconnect", network, container=member.id)
            if member.running:
                try:
                    await self.live.container_left(member.id, network, endpoint)
                except Exception as exc:
                    log.warning(
                        "container %s left network %s; its live cleanup failed: %s",
                        member.id[:12],
                        network.name,
                        exc,
                    )


def _endpoint_on(endpoints: dict[str, Endpoint], network_id: str) -> Endpoint | None:
    for endpoint in endpoints.values():
        if endpoint.network_id == network_id:
            return endpoint
    return None


def _service_of(member: Member) -> tuple[str, str] | None:
    project = member.labels.get(COMPOSE_PROJECT)
    service = member.labels.get(COMPOSE_SERVICE)
    return (project, service) if project and service else None


def check_network_name(name: str) -> None:
    if not name:
        raise InvalidArgument("a network needs a name")
    if len(name) > MAX_NAME or not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"invalid network name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )


def check_alias(alias: str) -> None:
    if len(alias) > MAX_ALIAS or not ALIAS_PATTERN.fullmatch(alias):
        raise InvalidArgument(
            f"invalid network alias {alias!r}: a DNS name of [a-zA-Z0-9_.-] is expected"
        )


def check_options(options: dict[str, str]) -> dict[str, str]:
    """Driver options husk honours (the MTU) or that change nothing; others are refused."""
    checked = {}
    for key, value in options.items():
        key, value = str(key), str(value)
        if key == MTU_OPTION:
            try:
                mtu = int(value)
            except ValueError:
                raise InvalidArgument(f"invalid MTU {value!r}: not a number") from None
            if not MIN_MTU <= mtu <= LAN_MTU:
                raise InvalidArgument(f"invalid MTU {mtu}: must be {MIN_MTU} to {LAN_MTU}")
        elif key in HARMLESS_OPTIONS:
            if value.lower() not in HARMLESS_OPTIONS[key]:
                raise NotSupported(f"network option {key}={value} is not supported by husk")
        elif key not in NAMED_OPTIONS:
            raise NotSupported(f"network option {key} is not supported by husk")
        checked[key] = value
    return checked


def validate_ipv4(text: str) -> str:
    """An address given with ``--ip`` (IPv4 only), normalised."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"invalid IPv4 address {text!r}") from None
    if address.version != 4:
        raise NotSupported(f"IPv6 address {text}: IPv6 networks are not supported by husk")
    return str(address)
