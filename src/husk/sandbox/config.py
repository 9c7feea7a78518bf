"""What a sandbox is made of: its configuration, the machine it becomes, its root's preparation.

Shared by the sandbox, template boot and the warm pool (below all three, so that
none of them imports another to get it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from husk import sizes
from husk.agent import transfer
from husk.agent.client import AgentClient
from husk.bundle import locate
from husk.guest.netconfig import LAN_SLOTS
from husk.sandbox.lan import LanPortsHook
from husk.vm.machine import DiskConfig, MachineConfig, NetConfig, ShareConfig

IMAGE_SERIAL = "husk-image"
UPPER_SERIAL = "husk-upper"
TRANSFER_SERIAL = transfer.TRANSFER_SERIAL
MIB = 1024 * 1024


@dataclass
class SandboxConfig:
    state_dir: Path
    image_disk: Path
    upper_disk: Path | None
    hostname: str
    mac: str
    cpus: float | None = None
    memory_bytes: int | None = None
    shares: list[ShareConfig] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    use_template: bool = True
    """Restore from a boot template when templates are enabled (False: always boot cold)."""
    egress: bool = True
    """The VM can reach the host's networks (slirp4netns); False: it starts without."""
    maintenance: bool = False
    """Only to serve a stopped container's files: the root is assembled from the disks and
    nothing is written into it (no identity files), and no process of the container runs."""
    root_share: str | None = None
    """The tag of the share that is the container root (husk-runtime: an engine's rootfs
    directory); the image and writable disks are then placeholders the guest ignores."""
    lan_ports: LanPortsHook | None = None
    """Gets the switch ends of the VM's LAN slots once it runs (None: the LAN is unplugged).
    See :mod:`husk.sandbox.lan`; the machine id is ``state_dir.name``."""
    hosts_later: bool = False
    """The container's /etc/hosts is written after the root is prepared (the runtime's
    NETWORK message does, with the container's address): PREPARE leaves it out."""
    root_ready: bool = False
    """The runtime's word that nothing after PREPARE depends on what PREPARE did (no
    mounts; a first start): the start may restore a root-ready snapshot
    (:mod:`husk.sandbox.rootready`, which checks the rest)."""
    lan_taps: dict[int, int] = field(default_factory=dict)
    """LAN slot → tap descriptor (an engine's network namespace, husk.ociruntime.netns):
    those slots are on the tap, not on a socketpair, and have no switch end. The caller
    keeps the descriptors (QEMU inherits its own copies)."""


def ring_disk(state_dir: Path) -> DiskConfig:
    """The transfer ring (:mod:`husk.agent.transfer`) of the VM whose state directory is
    ``state_dir``: read-only to the guest, created empty by the machine at each start."""
    return DiskConfig(
        state_dir / transfer.RING_FILE,
        TRANSFER_SERIAL,
        readonly=True,
        create_size=transfer.RING_BYTES,
    )


def ring_of(disks: list[DiskConfig]) -> Path | None:
    """The transfer ring's file among a VM's disks (None: a VM booted without one)."""
    return next((disk.path for disk in disks if disk.serial == TRANSFER_SERIAL), None)


def machine_config(config: SandboxConfig, lan_fds: tuple[int, ...] = ()) -> MachineConfig:
    """The VM for ``config``, booting the located guest bundle (accelerator not chosen yet).

    It always has LAN_SLOTS LAN interfaces; ``lan_fds`` (QEMU's ends, see
    :class:`husk.sandbox.lan.LanPorts`) are needed to start it, not to plan it. The
    slots of ``config.lan_taps`` are on those taps.
    """
    bundle = locate()
    disks = [DiskConfig(config.image_disk, IMAGE_SERIAL, readonly=True)]
    if config.upper_disk is not None:
        disks.append(DiskConfig(config.upper_disk, UPPER_SERIAL))
    # Last, so the image and writable disks keep their places (vda, vdb) in every VM.
    disks.append(ring_disk(config.state_dir))
    kwargs: dict[str, Any] = {}
    if config.cpus:
        kwargs["cpus"] = sizes.vm_cpus(config.cpus)
    if config.memory_bytes:
        kwargs["memory_mib"] = sizes.vm_memory_mib(config.memory_bytes)
    return MachineConfig(
        kernel=bundle.kernel,
        initrd=bundle.initrd,
        state_dir=config.state_dir,
        disks=disks,
        shares=list(config.shares),
        net=NetConfig(config.mac),
        lan_slots=LAN_SLOTS,
        lan_fds=lan_fds,
        lan_taps=tuple(sorted(config.lan_taps)) if lan_fds else (),
        egress=config.egress,
        **kwargs,
    )


async def prepare_root(client: AgentClient, config: SandboxConfig) -> None:
    """Has the guest assemble the container root from the image and writable disks."""
    extra: dict[str, Any] = {"maintenance": True} if config.maintenance else {}
    if config.root_share is not None:
        extra["root_share"] = config.root_share
    if config.hosts_later:
        extra["hosts_later"] = True
    await client.prepare(
        image=IMAGE_SERIAL,
        upper=UPPER_SERIAL if config.upper_disk is not None else None,
        hostname=config.hostname,
        dns=config.dns or None,
        **extra,
    )
