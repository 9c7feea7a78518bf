"""A sandbox: one VM with its agent connected and the container root assembled.

This is the seam between the VM layer (a machine with disks) and the container
layer (images, specs): the runtime asks for a sandbox, the sandbox boots the
bundle with the image's disk and the container's writable disk attached.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from husk import sizes
from husk.agent.client import AgentClient
from husk.bundle import locate
from husk.errors import GuestError
from husk.runtime.faults import vm_state_problem
from husk.vm.machine import DiskConfig, MachineConfig, NetConfig, ShareConfig, VirtualMachine

log = logging.getLogger(__name__)

IMAGE_SERIAL = "husk-image"
UPPER_SERIAL = "husk-upper"
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
MIB = 1024 * 1024
_DISK_ROLES = {IMAGE_SERIAL: "image disk", UPPER_SERIAL: "writable layer"}


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


async def _prepare(client: AgentClient, config: SandboxConfig) -> None:
    await client.prepare(
        image=IMAGE_SERIAL,
        upper=UPPER_SERIAL if config.upper_disk is not None else None,
        hostname=config.hostname,
        dns=config.dns or None,
    )


def _new_machine(config: MachineConfig) -> VirtualMachine:
    from husk.vm.qemu import QemuMachine

    return QemuMachine(config)


class Sandbox:
    boot_path = "cold"
    """How the VM started: "template" (restored) or "cold" (booted)."""
    template_key: str | None = None
    """The template restored from."""
    built_template = False
    """This start had to build its template first (a VM booted cold and saved)."""
    cold_reason = ""
    """Why a start that could use templates booted cold, or had to build its template."""

    def __init__(self, machine: VirtualMachine, client: AgentClient) -> None:
        self.machine = machine
        self.client = client

    @classmethod
    async def boot(cls, config: SandboxConfig, *, timeout: float = BOOT_TIMEOUT) -> Sandbox:
        """Boots a VM, completes the handshake and assembles the container root."""
        from husk.runtime.templates import templates_enabled

        if config.use_template and templates_enabled():
            return await cls.boot_from_template(config, timeout=timeout)
        machine = _new_machine(machine_config(config))
        await machine.boot()
        try:
            client = await AgentClient.connect(
                machine.agent_socket, timeout=timeout, check_alive=machine.check_alive
            )
            await _prepare(client, config)
        except BaseException:
            with contextlib.suppress(Exception):
                await machine.kill()
            raise
        return cls(machine, client)

    @classmethod
    async def boot_from_template(
        cls, config: SandboxConfig, *, timeout: float = BOOT_TIMEOUT
    ) -> Sandbox:
        """Restores the matching boot template, else boots cold (and saves the template).

        Never fails because of a template: a missing, stale or broken one means a
        cold boot, with the reason in ``cold_reason`` and the log.
        """
        from husk.runtime.template_boot import launch

        async def prepare(client: AgentClient) -> None:
            await _prepare(client, config)

        started = await launch(
            machine_config(config), prepare, pad=[config.image_disk], timeout=timeout
        )
        box = cls(started.machine, started.client)
        box.boot_path = started.path
        box.template_key = started.template_key
        box.cold_reason = started.reason
        box.built_template = started.built_template
        return box

    @classmethod
    async def attach(
        cls,
        state_dir: Path,
        *,
        timeout: float = 15.0,
        resume: dict[str, dict[str, int]] | None = None,
    ) -> Sandbox:
        """Reconnects to a VM that kept running while the daemon was away.

        A paused VM (by its user, or by the hypervisor on a host I/O error) is resumed
        first: its agent cannot answer otherwise. The caller pauses it again if it
        should stay paused; one that still cannot write pauses itself again.
        """
        from husk.vm.qemu import QemuMachine

        machine = await QemuMachine.attach(state_dir)
        try:
            status = await machine.status()
            problem = vm_state_problem(status)
            if problem is not None:
                raise GuestError(f"{problem} (QEMU reports {status!r})")
            if status in ("paused", "io-error"):
                await machine.resume()
            client = await AgentClient.connect(
                machine.agent_socket,
                timeout=timeout,
                check_alive=machine.check_alive,
                resume=resume,
            )
        except BaseException:
            await machine.detach()
            raise
        return cls(machine, client)

    @staticmethod
    def kill_recorded(state_dir: Path) -> bool:
        """Ends the VM recorded in ``state_dir`` if it still runs (no monitor needed)."""
        from husk.vm.qemu import QemuMachine

        return QemuMachine.kill_recorded(state_dir)

    def disk_roles(self) -> dict[str, tuple[str, str]]:
        """QEMU's names of each disk (drive id, node names) → (what it is, its host path).

        The names are those the QEMU backend gives its drives (``diskN``, ``diskN-format``).
        """
        config = getattr(self.machine, "config", None)
        disks: list[DiskConfig] = list(getattr(config, "disks", None) or [])
        roles: dict[str, tuple[str, str]] = {}
        for index, disk in enumerate(disks):
            what = _DISK_ROLES.get(disk.serial, f"disk {disk.serial}")
            for name in (f"disk{index}", f"disk{index}-format", f"disk{index}-file"):
                roles[name] = (what, str(disk.path))
        return roles

    async def close(self) -> None:
        """Forgets the VM without stopping it (daemon shutdown)."""
        await self.client.close()
        await self.machine.detach()

    async def destroy(self, timeout: float = STOP_TIMEOUT) -> None:
        """Asks the guest to power off cleanly (disks synced); kills QEMU after ``timeout``."""
        try:
            await self.client.shutdown()
        except GuestError as exc:
            log.debug("guest shutdown request failed: %s", exc)
        await self.client.close()
        if await self.machine.wait(timeout) is None:
            log.warning("guest did not power off within %.0fs; killing QEMU", timeout)
            await self.machine.kill()

    async def discard(self) -> None:
        """Ends the VM at once, without the guest's orderly power-off.

        Only for a VM whose writable disk is deleted next (``run --rm``): there is
        nothing to flush, and the power-off would cost a tenth of a second or more.
        """
        await self.client.close()
        await self.machine.kill()
