"""The NETWORK message: the container's whole network state, applied idempotently.

The LAN interfaces are found by the MAC QEMU gave each slot (``lan_boot_mac``),
looked up once at boot, before anything changes them: a restored clone's agent
remembers the mapping from its template's boot. For each slot listed the interface
gets the endpoint's MAC, MTU and address and comes up; the others lose their address
and go down. A LAN's ``routes`` (an engine's network namespace) go through its
interface, link routes first; those no longer listed are removed. ``unreachable``
subnets get reject routes (the ones no longer listed are removed). ``egress`` false
brings eth0 down; true brings it back with its address and
default route. ``names`` turns the embedded resolver on (and points the container's
resolv.conf at it) or off; ``hosts`` rewrites the container's /etc/hosts.

Boot settles the LAN interfaces (down, no address, no IPv6, the LAN MTU), so a
restored clone's first NETWORK, sent before its workload starts, only sets what is the
container's own: until then the agent knows each interface's state because it set it
itself, and skips what is already so. From the workload's start on (it may hold
CAP_NET_ADMIN) every NETWORK applies the whole state again.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from husk.guest import netstate
from husk.guest.agent import container_root, netif
from husk.guest.agent.loop import Loop, log
from husk.guest.agent.resolver import Resolver
from husk.guest.agent.system import SystemError_, set_mac
from husk.guest.netconfig import (
    EMBEDDED_DNS,
    GUEST_ADDRESS,
    GUEST_DNS,
    GUEST_GATEWAY,
    GUEST_PREFIX,
    LAN_MTU,
    LAN_SLOTS,
    lan_boot_mac,
)

EGRESS_INTERFACE = "eth0"
REHEARSAL_LAN = {
    "slot": 1,
    "mac": "02:42:ac:11:00:02",
    "address": "172.17.0.2/16",
    "mtu": LAN_MTU,
    "gateway": "172.17.0.1",
}
"""What a first container on Docker's default bridge gets: a warm pool's rehearsal applies
it and takes it back (husk.guest.agent.rehearsal)."""


def _netmask(prefix: int) -> str:
    return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)


class Networking:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.slots: dict[int, str] = {}
        """LAN slot → interface name, from the boot MACs."""
        self.resolver = Resolver(loop)
        self._rejects: set[str] = set()
        self._gateway_routes: set[str] = set()
        self._lan_routes: list[tuple[str, str | None, str]] = []
        """(destination, gateway, interface) of the LAN routes in place, in their order."""
        self._resolv_before: str | None = None
        """The container's resolv.conf before the resolver took it over (to give it back)."""
        self._known: dict[str, dict[str, Any]] | None = {}
        """What the agent itself last set on each interface ("mac", "ipv6_off", "mtu",
        "address", "up"; "egress" for eth0), while that is all there is to know: until
        the workload starts, nothing else in the VM changes an interface, so a start's
        first NETWORK skips whatever is already so (under TCG every ioctl of a restored
        clone costs). None once the workload runs: it may hold CAP_NET_ADMIN, so every
        later NETWORK applies everything again."""

    def scan(self) -> None:
        """Finds the LAN interfaces by their boot MACs (at boot, before anything changes)."""
        by_mac = netif.interfaces_by_mac()
        for slot in range(1, LAN_SLOTS + 1):
            name = by_mac.get(lan_boot_mac(slot))
            if name is not None:
                self.slots.setdefault(slot, name)

    def settle_lans(self) -> None:
        """At boot: every LAN interface down (its qdisc attached), without an address or
        IPv6, at the LAN MTU.

        Done once in the VM a template is saved from, so a clone's first NETWORK only
        sets what is its own (MAC, address) and brings its interfaces up.
        """
        for slot, interface in sorted(self.slots.items()):
            try:
                netif.disable_ipv6(interface)
                netif.set_mtu(interface, LAN_MTU)
                netif.flush_address(interface)
                # Up once (IPv6 off, no address: nothing is sent), so that its default
                # qdisc is attached in every VM: a warm pool's rehearsal brings slot 1 up
                # and down, and must leave it as every other VM has it.
                netif.set_up(interface, True)
                netif.set_up(interface, False)
            except netif.NetError as exc:
                log(f"LAN slot {slot} ({interface}) not settled at boot: {exc}")
                continue
            self._remember(
                interface,
                mac=lan_boot_mac(slot),
                ipv6_off=True,
                mtu=LAN_MTU,
                address=None,
                up=False,
            )

    def settle_egress(self) -> None:
        """At boot, before eth0 comes up: no IPv6 on it, as on the LANs.

        IPv6 never left the VM that way (slirp4netns runs without IPv6; QEMU's user
        network only answered on its own fec0::/64), but its autoconfiguration did run:
        router solicitations 1 to 9 s after eth0 came up, the router advertisement, the
        SLAAC address, duplicate address detection, MLD reports. A template is saved
        within a second of boot, so every clone of it finished that work after its
        restore (about 2,000 translated blocks and a dozen frames through QEMU's user
        network per start), and redid part of it when its MAC changed.
        """
        netif.disable_ipv6(EGRESS_INTERFACE)

    def boot_egress(self, configured: bool) -> None:
        """The boot-time eth0 setup (default address and route, lo up) finished;
        ``configured``: it succeeded, so egress is on as the NETWORK message means it."""
        if configured:
            self._remember(EGRESS_INTERFACE, egress=True)
        else:
            self.forget(EGRESS_INTERFACE)

    def workload_started(self) -> None:
        """From now on interfaces may change behind the agent's back: forget them all."""
        self._known = None

    def forget(self, interface: str) -> None:
        """Something changed ``interface`` outside of NETWORK (OVERLAY_CONFIG)."""
        if self._known is not None:
            self._known.pop(interface, None)

    def _remember(self, interface: str, **facts: Any) -> None:
        if self._known is not None:
            self._known.setdefault(interface, {}).update(facts)

    def _is(self, interface: str, fact: str, value: Any) -> bool:
        """The agent set ``fact`` of ``interface`` to ``value`` itself, and it still is."""
        if self._known is None:
            return False
        facts = self._known.get(interface)
        return facts is not None and fact in facts and facts[fact] == value

    def rehearse(self, hostname: str) -> bool:
        """A start's first NETWORK (LAN slot 1 on the default bridge) applied, then undone.

        Only from the state boot settled, which the agent knows to be all there is (no
        workload yet, LAN slot 1 settled, egress on, no routes, rejects or resolver):
        the undoing (slot 1 unplugged, its boot MAC back, the gateway route removed,
        the record as it was) then leaves exactly that state. Returns False, having
        done nothing, from any other state. IPv6 is off on the LAN, so the interface
        sends nothing while it is up. Errors propagate: the VM is not offered then.
        """
        interface = self.slots.get(1)
        settled = {
            "mac": lan_boot_mac(1),
            "ipv6_off": True,
            "mtu": LAN_MTU,
            "address": None,
            "up": False,
        }
        if (
            self._known is None
            or interface is None
            or self._known.get(interface) != settled
            or not self._is(EGRESS_INTERFACE, "egress", True)
            or self._gateway_routes
            or self._lan_routes
            or self._rejects
            or self.resolver.running
        ):
            return False
        record = copy.deepcopy(self._known)
        hosts = {"hostname": hostname, "address": "172.17.0.2", "extra": []}
        try:
            self.apply({"egress": True, "lans": [REHEARSAL_LAN], "hosts": hosts})
        finally:
            self.apply({"egress": True, "lans": []})
            set_mac(lan_boot_mac(1), interface)
            self._known = record
        return True

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """Applies a NETWORK body; the reply names each slot's interface."""
        try:
            state = netstate.check(body)
        except ValueError as exc:
            raise SystemError_(f"invalid network state: {exc}") from None
        if len(self.slots) < LAN_SLOTS:
            self.scan()  # an interface that was late at boot still has its boot MAC
        wanted = {lan["slot"]: lan for lan in state["lans"]}
        missing = sorted(set(wanted) - set(self.slots))
        if missing:
            raise SystemError_(f"this VM has no LAN interface for slot(s) {missing}")
        touches_files = state["hosts"] is not None or state["names"] is not None
        if touches_files and not container_root.prepared():
            raise SystemError_("the container root is not prepared (send PREPARE first)")
        netif.set_up("lo", True)
        for slot, interface in sorted(self.slots.items()):
            lan = wanted.get(slot)
            if lan is None:
                self._unplug(interface)
            else:
                self._plug(interface, lan)
        self._set_egress(state["egress"])
        self._set_gateway_routes(state["lans"] if state["egress"] else [])
        self._set_lan_routes(state["lans"])
        self._set_rejects(state["unreachable"], [lan["address"] for lan in state["lans"]])
        self._set_resolver(state["names"], state["dns"])
        hosts = state["hosts"]
        if hosts is not None:
            container_root.write_hosts(hosts["hostname"], hosts["address"], hosts["extra"])
        return {"interfaces": {str(slot): name for slot, name in sorted(self.slots.items())}}

    # -- interfaces -------------------------------------------------------------------
    def _plug(self, interface: str, lan: dict[str, Any]) -> None:
        network = ipaddress.IPv4Interface(lan["address"])
        address = (str(network.ip), str(network.netmask))
        mac = str(lan["mac"]).lower()
        # Forgotten first: a step that fails leaves the interface in no known state.
        was = dict((self._known or {}).pop(interface, {}))
        try:
            if was.get("mac") != mac:
                set_mac(mac, interface)
            if not was.get("ipv6_off"):
                netif.disable_ipv6(interface)
            if was.get("mtu") != lan["mtu"]:
                netif.set_mtu(interface, lan["mtu"])
            if was.get("address") != address:
                netif.set_address(interface, *address)
            if was.get("up") is not True:
                netif.set_up(interface, True)
        except netif.NetError as exc:
            raise SystemError_(str(exc)) from None
        self._remember(interface, mac=mac, ipv6_off=True, mtu=lan["mtu"], address=address, up=True)

    def _unplug(self, interface: str) -> None:
        if self._is(interface, "address", None) and self._is(interface, "up", False):
            return
        was = dict((self._known or {}).pop(interface, {}))
        try:
            netif.flush_address(interface)
            netif.set_up(interface, False)
        except netif.NetError as exc:
            raise SystemError_(str(exc)) from None
        self._remember(interface, **{**was, "address": None, "up": False})

    def _set_egress(self, enabled: bool) -> None:
        if self._is(EGRESS_INTERFACE, "egress", enabled):
            return
        self.forget(EGRESS_INTERFACE)
        try:
            if not enabled:
                # As Docker's `none`: no address, no route, not only a link that is down.
                netif.flush_address(EGRESS_INTERFACE)
                netif.set_up(EGRESS_INTERFACE, False)
            else:
                netif.set_address(EGRESS_INTERFACE, GUEST_ADDRESS, _netmask(GUEST_PREFIX))
                netif.set_up(EGRESS_INTERFACE, True)
                # Bringing eth0 down took its default route away with it.
                netif.add_default_route(GUEST_GATEWAY)
        except netif.NetError as exc:
            raise SystemError_(str(exc)) from None
        self._remember(EGRESS_INTERFACE, egress=enabled)

    def _set_gateway_routes(self, lans: list[dict[str, Any]]) -> None:
        """Each network's gateway address leads to the host, as Docker's bridge does: a
        host route through eth0, where the VM's gateway relays (husk.runtime.gateway)
        answer on every address the VM's namespace gives its networks' gateways."""
        wanted = {str(lan["gateway"]) for lan in lans if lan.get("gateway")}
        try:
            for address in sorted(self._gateway_routes - wanted):
                netif.delete_host_route(address, GUEST_GATEWAY)
            for address in sorted(wanted):  # again: an eth0 brought back up lost them
                netif.add_host_route(address, GUEST_GATEWAY)
        except netif.NetError as exc:
            raise SystemError_(str(exc)) from None
        self._gateway_routes = wanted

    def _set_lan_routes(self, lans: list[dict[str, Any]]) -> None:
        """Each LAN's ``routes`` through its interface (a routed LAN: an engine's network
        namespace), after egress: eth0's default route is gone when a LAN has one.

        All of them again each time (idempotent): an interface that was brought down or
        re-addressed lost its routes. Link routes come before gateway routes (the check
        ordered nothing), as a gateway must be reachable when its route is added.
        """
        wanted = [
            (route["destination"], route["gateway"], self.slots[lan["slot"]])
            for lan in lans
            for route in sorted(lan["routes"], key=lambda route: route["gateway"] is not None)
        ]
        try:
            for destination, gateway, interface in reversed(self._lan_routes):
                if (destination, gateway, interface) not in wanted:
                    network = ipaddress.IPv4Network(destination)
                    netif.delete_route(
                        str(network.network_address), str(network.netmask), gateway, interface
                    )
            self._lan_routes = [route for route in self._lan_routes if route in wanted]
            for route in wanted:
                destination, gateway, interface = route
                network = ipaddress.IPv4Network(destination)
                netif.add_route(
                    str(network.network_address), str(network.netmask), gateway, interface
                )
                if route not in self._lan_routes:
                    self._lan_routes.append(route)
        except netif.NetError as exc:
            raise SystemError_(str(exc)) from None

    def _set_rejects(self, unreachable: list[str], local: list[str]) -> None:
        own = [ipaddress.IPv4Interface(address).network for address in local]
        wanted: set[str] = set()
        for text in unreachable:
            network = ipaddress.IPv4Network(text)
            # A subnet the container is on stays reachable, whatever the list says.
            if not any(network.overlaps(mine) for mine in own):
                wanted.add(str(network))
        try:
            for text in sorted(self._rejects - wanted):
                network = ipaddress.IPv4Network(text)
                netif.delete_reject_route(str(network.network_address), str(network.netmask))
                self._rejects.discard(text)
            for text in sorted(wanted - self._rejects):
                network = ipaddress.IPv4Network(text)
                netif.add_reject_route(str(network.network_address), str(network.netmask))
                self._rejects.add(text)
        except netif.NetError as exc:
            raise SystemError_(str(exc)) from None

    # -- names ------------------------------------------------------------------------
    def _set_resolver(self, names: dict[str, list[str]] | None, dns: dict[str, list[str]]) -> None:
        if names is None:
            was_running = self.resolver.running
            self.resolver.stop()
            if dns["servers"] or dns["search"] or dns["options"]:
                container_root.write_resolv_conf(dns["servers"], dns["search"], dns["options"])
            elif was_running and self._resolv_before is not None:
                container_root.write_text("/etc/resolv.conf", self._resolv_before)
            return
        upstreams = [s for s in dns["servers"] if ":" not in s] or [GUEST_DNS]
        self.resolver.update(names, upstreams)
        if not self.resolver.running:
            try:
                self.resolver.start()
            except OSError as exc:
                raise SystemError_(
                    f"cannot start the DNS resolver on {EMBEDDED_DNS}: {exc}"
                ) from None
            log(f"dns: resolver on {EMBEDDED_DNS} ({len(names)} names)")
            if self._resolv_before is None:
                self._resolv_before = container_root.read_text("/etc/resolv.conf")
        options = dns["options"]
        if not any(option.startswith("ndots:") for option in options):
            # As Docker's: a bare name goes to the resolver as asked, search list second.
            options = [*options, "ndots:0"]
        container_root.write_resolv_conf([EMBEDDED_DNS], dns["search"], options)
