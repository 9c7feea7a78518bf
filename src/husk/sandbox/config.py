"""What a sandbox is made of: its configuration, the machine it becomes, its root's preparation.

Shared by the sandbox, template boot and the warm pool (below all three, so that
none of them imports another to get it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from husk import sizes
from husk.agent.client import AgentClient
from husk.bundle import locate
from husk.vm.machine import DiskConfig, MachineConfig, NetConfig, ShareConfig

IMAGE_SERIAL = "husk-image"
UPPER_SERIAL = "husk-upper"
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


def machine_config(config: SandboxConfig) -> MachineConfig:
    """The VM for ``config``, booting the located guest bundle (accelerator not chosen yet)."""
    bundle = locate()
    disks = [DiskConfig(config.image_disk, IMAGE_SERIAL, readonly=True)]
    if config.upper_disk is not None:
        disks.append(DiskConfig(config.upper_disk, UPPER_SERIAL))
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
        **kwargs,
    )


async def prepare_root(client: AgentClient, config: SandboxConfig) -> None:
    """Has the guest assemble the container root from the image and writable disks."""
    await client.prepare(
        image=IMAGE_SERIAL,
        upper=UPPER_SERIAL if config.upper_disk is not None else None,
        hostname=config.hostname,
        dns=config.dns or None,
    )
