"""A running container's WireGuard overlay: pushed to its guest, published on the host.

Attaching checks the configuration (husk.network.overlay), opens the host side (a UDP
relay at the VM's gateway for each peer endpoint on the host's loopback, and the listen
port published on the host over UDP so peers reach it), then sends the guest the
``WIREGUARD`` request. What the container's inspect shows is kept in its record
(``overlay``: address, prefix, public key, ports; never the private key) until the VM
ends. A failed attach leaves the container as it was: the host side is undone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from husk.errors import Conflict, GuestError, HuskError
from husk.guest.protocol import MsgType
from husk.network.overlay import (
    OverlayConfig,
    guest_body,
    guest_reply,
    loopback_targets,
    parse_config,
)
from husk.runtime.container import Container
from husk.runtime.gateway import Gateway
from husk.runtime.model import ContainerStatus
from husk.runtime.ports import reserve
from husk.spec import PortBinding

log = logging.getLogger(__name__)

GUEST_TIMEOUT = 60.0
"""The first attach loads the kernel's WireGuard modules: seconds under TCG."""
HOST_ADDRESS = "127.0.0.1"
"""Where the listen port is published: peers on this host (other daemons) reach it there."""


@dataclass
class _HostSide:
    """What the host holds for one container's overlay (in memory: it ends with the run)."""

    transport: asyncio.DatagramTransport | None = None
    relays: dict[tuple[str, int], int] = field(default_factory=dict)


_host_sides: dict[str, _HostSide] = {}


def _require_running(container: Container) -> Any:
    live = container.live
    if live is None or not container.running:
        raise Conflict(f"container {container.name} is not running")
    if container.status is ContainerStatus.PAUSED:
        raise Conflict(f"container {container.name} is paused")
    return live


async def _release(container_id: str, gateway: Gateway) -> None:
    side = _host_sides.pop(container_id, None)
    if side is not None and side.transport is not None:
        side.transport.close()
    await gateway.drop_udp_relays(container_id)


async def attach(container: Container, gateway: Gateway, data: object) -> dict[str, Any]:
    """Gives the running ``container`` the overlay ``data`` describes (replacing one it
    had); returns what inspect shows under NetworkSettings.HuskOverlay, with peer status."""
    config = parse_config(data)
    async with container.lock:
        live = _require_running(container)
        # A reconfiguration keeps the host port peers already use, unless told otherwise.
        host_port = config.host_port or int(container.record.overlay.get("HostPort") or 0)
        await _release(container.id, gateway)
        side = _HostSide()
        try:
            for target in loopback_targets(config):
                side.relays[target] = await gateway.relay_udp(container.id, target)
            binding = PortBinding(
                container_port=config.listen_port,
                protocol="udp",
                host_ip=HOST_ADDRESS,
                host_port=host_port,
            )
            sock = reserve(binding)
            host_port = sock.getsockname()[1]
            side.transport = await live.publisher.publish(binding, sock)
            _host_sides[container.id] = side
            reply = guest_reply(
                await live.sandbox.client.request(
                    MsgType.WIREGUARD, guest_body(config, side.relays), timeout=GUEST_TIMEOUT
                )
            )
        except BaseException:
            _host_sides[container.id] = side
            await _release(container.id, gateway)
            raise
        container.record.overlay = _shown(config, reply, host_port, side.relays)
        container.persist()
    return {**container.record.overlay, "Peers": _peers(reply)}


async def detach(container: Container, gateway: Gateway) -> None:
    """Removes the overlay of the running ``container`` (Conflict if it has none)."""
    async with container.lock:
        live = _require_running(container)
        if not container.record.overlay:
            raise Conflict(f"container {container.name} has no overlay")
        await live.sandbox.client.request(
            MsgType.WIREGUARD, {"detach": True}, timeout=GUEST_TIMEOUT
        )
        await _release(container.id, gateway)
        container.record.overlay = {}
        container.persist()


async def status(container: Container) -> dict[str, Any]:
    """The overlay as the guest reports it now: each peer's latest handshake (0: none
    yet) and bytes; ``Attached`` false without one. Never waits on a handshake."""
    live = _require_running(container)
    try:
        reply = guest_reply(
            await live.sandbox.client.request(
                MsgType.WIREGUARD, {"status": True}, timeout=GUEST_TIMEOUT
            )
        )
    except GuestError as exc:
        raise Conflict(f"container {container.name}: cannot read its overlay: {exc}") from None
    shown = dict(container.record.overlay)
    return {**shown, "Attached": bool(reply.get("attached")), "Peers": _peers(reply)}


async def restore(container: Container, gateway: Gateway) -> None:
    """A restarted daemon took over ``container``, whose guest kept its overlay: the host
    side (relays on the same gateway ports, the listen port on the same host port) is
    opened again. A part that cannot be is logged; the container runs on regardless."""
    shown = container.record.overlay
    live = container.live
    if not shown or live is None:
        return
    side = _HostSide()
    _host_sides[container.id] = side
    try:
        for relay in shown.get("Relays") or []:
            host, _, port = str(relay["Target"]).rpartition(":")
            target = (host, int(port))
            side.relays[target] = await gateway.relay_udp(
                container.id, target, port=int(relay["GatewayPort"])
            )
        binding = PortBinding(
            container_port=int(shown["ListenPort"]),
            protocol="udp",
            host_ip=HOST_ADDRESS,
            host_port=int(shown["HostPort"]),
        )
        side.transport = await live.publisher.publish(binding, reserve(binding))
    except (HuskError, OSError, KeyError, ValueError, TypeError) as exc:
        log.warning("overlay of %s not fully restored: %s", container.id[:12], exc)


def _shown(
    config: OverlayConfig,
    reply: dict[str, Any],
    host_port: int,
    relays: dict[tuple[str, int], int],
) -> dict[str, Any]:
    return {
        "IPAddress": config.overlay_ip,
        "PrefixLen": config.prefix_len,
        "PublicKey": str(reply.get("public_key") or ""),
        "ListenPort": config.listen_port,
        "HostIP": HOST_ADDRESS,
        "HostPort": host_port,
        "Interface": str(reply.get("interface") or ""),
        "Relays": [
            {"Target": f"{host}:{port}", "GatewayPort": gateway_port}
            for (host, port), gateway_port in relays.items()
        ],
    }


def _peers(reply: dict[str, Any]) -> list[dict[str, Any]]:
    peers = reply.get("peers") or []
    shown: list[dict[str, Any]] = []
    for peer in peers if isinstance(peers, list) else []:
        if not isinstance(peer, dict):
            continue
        handshake = int(peer["latest_handshake"])  # checked by guest_reply
        shown.append(
            {
                "PublicKey": str(peer.get("public_key") or ""),
                "Endpoint": str(peer.get("endpoint") or ""),
                "LatestHandshake": handshake,
                "Handshake": handshake > 0,
                "RxBytes": int(peer["rx_bytes"]),
                "TxBytes": int(peer["tx_bytes"]),
            }
        )
    return shown
