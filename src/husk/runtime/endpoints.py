"""The containers as the network layer sees them: endpoints kept in container records.

:class:`RecordMembers` is the :class:`husk.network.manager.Members` book over the
container store; :func:`guest_network_body` is the NETWORK message for a container.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterable

from husk import confinement
from husk.network.manager import NetworkManager
from husk.network.model import Endpoint, Member, Network
from husk.network.names import guest_network_body as _guest_body
from husk.runtime.model import ContainerRecord
from husk.runtime.store import ContainerStore

log = logging.getLogger(__name__)


def extra_hosts(record: ContainerRecord) -> list[str]:
    """``--add-host`` entries as ``name:address``, host-gateway resolved."""
    entries = []
    for entry in record.spec.extra_hosts:
        name, _, address = entry.partition("=") if "=" in entry else entry.partition(":")
        address = address.strip("[]")
        if address == confinement.HOST_GATEWAY:
            address = confinement.HOST_GATEWAY_ADDRESS
        entries.append(f"{name}:{address}")
    return entries


def member_of(record: ContainerRecord) -> Member:
    """A snapshot of ``record`` for the network layer (its endpoints copied)."""
    spec = record.spec
    return Member(
        id=record.id,
        name=record.name,
        running=record.state.running,
        endpoints=dict(record.networks),
        network_mode=spec.network_mode,
        hostname=spec.hostname or "",
        labels=dict(spec.labels),
        dns=list(spec.dns),
        dns_search=list(spec.dns_search),
        dns_options=list(spec.dns_options),
        extra_hosts=extra_hosts(record),
    )


class RecordMembers:
    """Members from the container store; endpoints saved in the container's record."""

    def __init__(self, store: ContainerStore) -> None:
        self.store = store

    def members(self) -> builtins.list[Member]:
        return [member_of(r) for r in self.store.all() if r.id not in self.store.unreadable]

    def member(self, ref: str) -> Member:
        return member_of(self.store.get(ref))

    def save_endpoints(self, container_id: str, endpoints: dict[str, Endpoint]) -> None:
        record = self.store.get(container_id)
        before = record.networks
        record.networks = dict(endpoints)
        try:
            self.store.save(record)
        except BaseException:
            record.networks = before
            raise


def guest_network_body(
    record: ContainerRecord, records: Iterable[ContainerRecord], networks: Iterable[Network]
) -> dict[str, object]:
    """The NETWORK message body (docs/NETWORKS.md) for the container of ``record``.

    ``records`` are every container's records, ``networks`` every network.
    """
    return _guest_body(
        member_of(record), [member_of(r) for r in records], {n.id: n for n in networks}
    )


def network_body_of(manager: NetworkManager, record: ContainerRecord) -> dict[str, object]:
    """The same, from the manager's current view (what the lead's wiring calls)."""
    return manager.guest_body(member_of(record))


async def assign_missing(manager: NetworkManager, store: ContainerStore) -> None:
    """Records written before husk had networks get the endpoints of their network mode.

    Once per record (the flag is saved with the endpoints); a failure is logged and
    retried at the next daemon start.
    """
    for record in store.all():
        if record.networks_assigned or record.id in store.unreadable:
            continue
        try:
            endpoints = await manager.allocate(member_of(record), record.spec.networks)
        except Exception as exc:
            log.warning("container %s gets no network endpoints: %s", record.id[:12], exc)
            continue
        try:
            record.networks, record.networks_assigned = endpoints, True
            store.save(record)
        except Exception as exc:
            record.networks, record.networks_assigned = {}, False
            log.warning("container %s: cannot save its endpoints: %s", record.id[:12], exc)
        finally:
            manager.settle(record.id)
