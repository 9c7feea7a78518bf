"""Container networks on running VMs: switch ports, the guest's network state, egress.

The network model (:mod:`husk.network.manager`) records who is on which network;
this module makes the running VMs agree with it (docs/NETWORKS.md):

* a VM's LAN slots reach husk's switch as soon as the sandbox runs
  (:meth:`LiveNetworking.plug_in`, the sandbox's ``lan_ports`` hook), unattached;
* at start, and on every connect/disconnect, each slot's port is put on the network
  of the endpoint in that slot (or on none), slirp4netns is started or stopped
  (egress), the host gateway is joined or left, and the guest gets its whole network
  state (one NETWORK message);
* the other running members of the networks concerned get their name tables again
  when a member starts, stops, joins or leaves.

It is also the :class:`husk.network.manager.LiveNetworks` the manager calls.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from husk.guest.netconfig import LAN_SLOTS
from husk.network.manager import NetworkManager
from husk.network.model import Endpoint, Network
from husk.network.switchclient import SwitchClient
from husk.runtime.endpoints import network_body_of
from husk.runtime.gateway import Gateway
from husk.runtime.model import ContainerRecord
from husk.runtime.registry import ContainerRegistry
from husk.sandbox.sandbox import Sandbox

log = logging.getLogger(__name__)


def lan_owner(container_id: str) -> str:
    """The switch's owner name of a container's VM: its state directory's name."""
    return container_id[:16]


def port_id(owner: str, slot: int) -> str:
    return f"{owner}/{slot}"


class LiveNetworking:
    """Keeps running VMs' LANs, egress and name tables in step with the network model."""

    def __init__(
        self,
        *,
        registry: ContainerRegistry,
        manager: Callable[[], NetworkManager],
        gateway: Gateway,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        switch: SwitchClient | None = None,
    ) -> None:
        self._registry = registry
        self._manager = manager
        self._gateway = gateway
        self._spawn = spawn
        self.switch = switch if switch is not None else SwitchClient()

    # -- a VM's ports ---------------------------------------------------------------
    async def plug_in(self, owner: str, ends: dict[int, socket.socket]) -> None:
        """The sandbox hook: hands a new VM's LAN slots to the switch, unattached."""
        try:
            # Ports of a previous run of this container, if its QEMU's ends outlived it.
            await self.switch.remove(owner)
            await self.switch.add(owner, {slot: end.fileno() for slot, end in ends.items()})
        finally:
            for end in ends.values():  # the switch holds its own duplicates
                end.close()

    async def unplug(self, container_id: str) -> None:
        """Forgets a VM's ports (they also go when QEMU's ends close)."""
        try:
            await self.switch.remove(lan_owner(container_id))
        except Exception as exc:
            log.debug("switch: removing the ports of %s: %s", container_id[:12], exc)

    async def _attach_ports(self, record: ContainerRecord) -> None:
        owner = lan_owner(record.id)
        wanted: dict[int, str] = {e.slot: e.network_id for e in record.networks.values()}
        for slot in range(1, LAN_SLOTS + 1):
            await self.switch.attach(port_id(owner, slot), wanted.get(slot))

    def egress_of(self, record: ContainerRecord) -> bool:
        """Whether the container may leave its VM (not when all its networks are internal)."""
        return bool(network_body_of(self._manager(), record).get("egress"))

    # -- a container's whole state ----------------------------------------------------
    async def wire(self, record: ContainerRecord, sandbox: Sandbox) -> bool:
        """Applies the container's networks to its VM; True when it has egress.

        Called at start (before the workload runs), after a connect or disconnect,
        and when a restarted daemon adopts a running VM.
        """
        body = network_body_of(self._manager(), record)
        egress = bool(body.get("egress"))
        await self._attach_ports(record)
        await sandbox.set_egress(egress)
        await sandbox.client.configure_network(body)
        if egress:
            if not self._gateway.is_member(record.id):
                await self._gateway.join(record.id, sandbox.machine.pid)
            lans = body.get("lans")
            gateways = [
                str(lan["gateway"])
                for lan in (lans if isinstance(lans, list) else [])
                if isinstance(lan, dict) and lan.get("gateway")
            ]
            await self._gateway.add_local(record.id, gateways)
        else:
            await self._gateway.leave(record.id)
        return egress

    async def _refresh(self, record: ContainerRecord) -> None:
        live = self._registry.live_of(record.id)
        if live is None:
            return
        body = network_body_of(self._manager(), record)
        await live.sandbox.client.configure_network(body)

    def refresh_members(self, network_ids: set[str], *, besides: str = "") -> None:
        """Pushes fresh name tables to the running members of ``network_ids`` (in the
        background: a slow or broken guest must not hold up anyone else)."""
        if not network_ids:
            return
        for container in self._registry.all_held():
            record = container.record
            if record.id == besides or container.live is None:
                continue
            if any(e.network_id in network_ids for e in record.networks.values()):
                self._spawn(self._refresh_quietly(record))

    async def _refresh_quietly(self, record: ContainerRecord) -> None:
        try:
            await self._refresh(record)
        except Exception as exc:
            log.warning("network state of %s not updated: %s", record.id[:12], exc)

    def member_changed(self, record: ContainerRecord) -> None:
        """A member started or stopped: its user networks' name tables change."""
        self.refresh_members({e.network_id for e in record.networks.values()}, besides=record.id)

    # -- husk.network.manager.LiveNetworks ----------------------------------------------
    async def container_joined(
        self, container_id: str, network: Network, endpoint: Endpoint
    ) -> None:
        await self._rewire(container_id)
        self.refresh_members({network.id}, besides=container_id)

    async def container_left(self, container_id: str, network: Network, endpoint: Endpoint) -> None:
        await self._rewire(container_id)
        self.refresh_members({network.id}, besides=container_id)

    async def network_removed(self, network: Network) -> None:
        return None  # a network with endpoints cannot be removed: no VM uses it

    async def _rewire(self, container_id: str) -> None:
        container = self._registry.find(container_id)
        if container is None or container.live is None:
            return
        await self.wire(container.record, container.live.sandbox)
