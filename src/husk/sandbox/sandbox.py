"""A sandbox: one VM with its agent connected and the container root assembled.

This is the seam between the VM layer (a machine with disks) and the container
layer (images, specs): the runtime asks for a sandbox, the sandbox boots the
bundle with the image's disk and the container's writable disk attached.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from husk.agent.client import AgentClient
from husk.agent.transfer import TransferRing
from husk.errors import GuestError
from husk.sandbox import rootready, rootready_boot, template_boot
from husk.sandbox.config import (
    IMAGE_SERIAL,
    TRANSFER_SERIAL,
    UPPER_SERIAL,
    SandboxConfig,
    machine_config,
    prepare_root,
    ring_of,
)
from husk.sandbox.lan import LanPorts
from husk.sandbox.provisioner import Provisioner, default_provisioner
from husk.sandbox.templates import templates_enabled
from husk.vm.machine import DiskConfig, VirtualMachine, state_problem

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
_DISK_ROLES = {
    IMAGE_SERIAL: "image disk",
    UPPER_SERIAL: "writable layer",
    TRANSFER_SERIAL: "transfer ring",
}

__all__ = ["BOOT_TIMEOUT", "STOP_TIMEOUT", "Sandbox", "SandboxConfig"]


class Sandbox:
    boot_path = "cold"
    """How the VM started: "template" (restored) or "cold" (booted)."""
    template_key: str | None = None
    """The template restored from."""
    built_template = False
    """This start had to build its template first (a VM booted cold and saved)."""
    cold_reason = ""
    root_ready = False
    """Restored from a root-ready snapshot (its root assembled before the save)."""
    """Why a start that could use templates booted cold, or had to build its template."""

    def __init__(
        self, machine: VirtualMachine, client: AgentClient, lan: LanPorts | None = None
    ) -> None:
        self.machine = machine
        self.client = client
        self.lan = lan
        """The LAN slots' switch ends this sandbox still holds (None: none; see hand_over)."""
        self._ring: TransferRing | None = None

    def transfer_ring(self) -> TransferRing | None:
        """The VM's transfer ring (None: it was booted without one, e.g. by an older husk)."""
        path = ring_of(list(self.machine.config.disks))
        if path is None:
            return None
        if self._ring is None or self._ring.path != path:  # a pool VM's moved with its state
            self._ring = TransferRing(path)
        return self._ring

    @classmethod
    async def boot(
        cls,
        config: SandboxConfig,
        *,
        timeout: float = BOOT_TIMEOUT,
        provisioner: Provisioner | None = None,
    ) -> Sandbox:
        """Boots a VM, completes the handshake and assembles the container root."""
        provisioner = provisioner or default_provisioner()
        if config.use_template and templates_enabled():
            return await cls.boot_from_template(config, timeout=timeout, provisioner=provisioner)
        lan = LanPorts(taps=config.lan_taps)
        try:
            machine = provisioner.create(
                await provisioner.resolve(machine_config(config, lan.qemu_fds()))
            )
            await machine.boot()
            try:
                client = await AgentClient.connect(
                    machine.agent_socket, timeout=timeout, check_alive=machine.check_alive
                )
                machine.release_boot_images()
                box = cls(machine, client, lan)
                await box._plug_in(config)
                await prepare_root(client, config)
            except BaseException:
                with contextlib.suppress(Exception):
                    await machine.kill()
                raise
        except BaseException:
            lan.close()
            raise
        return box

    async def _plug_in(self, config: SandboxConfig) -> None:
        """Hands the LAN slots' switch ends to ``config.lan_ports`` (the VM runs by now)."""
        if self.lan is not None:
            await self.lan.hand_over(config.state_dir.name, config.lan_ports)

    async def set_egress(self, enabled: bool) -> None:
        """Starts or ends the running VM's way out (slirp4netns); idempotent.

        Also for a sandbox found again by :meth:`attach` after a daemon restart: the
        slirp4netns it starts still ends with the VM.
        """
        await self.machine.set_egress(enabled)

    @classmethod
    async def boot_from_template(
        cls,
        config: SandboxConfig,
        *,
        timeout: float = BOOT_TIMEOUT,
        provisioner: Provisioner | None = None,
    ) -> Sandbox:
        """Restores the matching boot template, else boots cold (and saves the template).

        Never fails because of a template: a missing, stale or broken one means a
        cold boot, with the reason in ``cold_reason`` and the log.
        """

        lan = LanPorts(taps=config.lan_taps)

        async def prepare(client: AgentClient) -> None:
            await prepare_root(client, config)

        try:
            started = None
            unfit = rootready.unfit(config) or ("" if rootready.enabled() else "switched off")
            if unfit:
                log.debug("no root-ready start: %s", unfit)
            else:
                started = await rootready_boot.try_launch(
                    config,
                    machine_config(config, lan.qemu_fds()),
                    timeout=timeout,
                    provisioner=provisioner,
                )
            if started is None:
                started = await template_boot.launch(
                    machine_config(config, lan.qemu_fds()),
                    prepare,
                    pad=[config.image_disk],
                    timeout=timeout,
                    provisioner=provisioner,
                )
            box = cls(started.machine, started.client, lan)
            try:
                await box._plug_in(config)
            except BaseException:
                await box.discard()
                raise
        except BaseException:
            lan.close()
            raise
        box.boot_path = started.path
        log.debug(
            "%s boot in %.3f s: %s",
            started.path,
            started.seconds,
            ", ".join(f"{name} {at:.3f}" for name, at in started.stages.items()),
        )
        box.template_key = started.template_key
        box.root_ready = started.root_ready
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
        provisioner: Provisioner | None = None,
    ) -> Sandbox:
        """Reconnects to a VM that kept running while the daemon was away.

        A paused VM (by its user, or by the hypervisor on a host I/O error) is resumed
        first: its agent cannot answer otherwise. The caller pauses it again if it
        should stay paused; one that still cannot write pauses itself again.
        """
        machine = await (provisioner or default_provisioner()).attach(state_dir)
        try:
            status = await machine.status()
            problem = state_problem(status)
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
    def kill_recorded(state_dir: Path, *, provisioner: Provisioner | None = None) -> bool:
        """Ends the VM recorded in ``state_dir`` if it still runs (no monitor needed)."""
        return (provisioner or default_provisioner()).kill_recorded(state_dir)

    def disk_roles(self) -> dict[str, tuple[str, str]]:
        """QEMU's names of each disk (drive id, node names) → (what it is, its host path).

        The names are those the QEMU backend gives its drives (``diskN``, ``diskN-format``).
        """
        disks: list[DiskConfig] = list(self.machine.config.disks)
        roles: dict[str, tuple[str, str]] = {}
        for index, disk in enumerate(disks):
            what = _DISK_ROLES.get(disk.serial, f"disk {disk.serial}")
            for name in (f"disk{index}", f"disk{index}-format", f"disk{index}-file"):
                roles[name] = (what, str(disk.path))
        return roles

    def _unplug(self) -> None:
        """The VM is gone (or forgotten): LAN ends still held here have nobody to serve."""
        if self.lan is not None:
            self.lan.close()

    async def close(self) -> None:
        """Forgets the VM without stopping it (daemon shutdown)."""
        await self.client.close()
        await self.machine.detach()
        self._unplug()

    async def destroy(self, timeout: float = STOP_TIMEOUT) -> None:
        """Asks the guest to power off cleanly (disks synced); kills QEMU after ``timeout``."""
        try:
            await self.client.shutdown()
        except GuestError as exc:
            log.debug("guest shutdown request failed: %s", exc)
        await self.client.close()
        try:
            if await self.machine.wait(timeout) is None:
                log.warning("guest did not power off within %.0fs; killing QEMU", timeout)
                await self.machine.kill()
        finally:
            self._unplug()

    async def discard(self) -> None:
        """Ends the VM at once, without the guest's orderly power-off.

        Only for a VM whose writable disk is deleted next (``run --rm``): there is
        nothing to flush, and the power-off would cost a tenth of a second or more.
        """
        await self.client.close()
        try:
            await self.machine.kill()
        finally:
            self._unplug()
