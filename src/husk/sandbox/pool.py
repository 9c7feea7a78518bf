"""The warm pool: VMs restored from a template and idle, each waiting to become a container's.

``husk system warm --pool N`` asks the daemon to keep N of them for containers
of one shape (memory, vCPUs, the runtime's disks, no bind mounts). A start of
that shape takes one instead of restoring: its disks are pointed at the
container's image and writable disk (``blockdev-reopen``; the guest has mounted
neither), its state directory is renamed to the container's, and it gets its
identity and root like a fresh clone. What it saves is the restore and the
guest's first wake-up under TCG, a third of a start. The pool then refills one
VM at a time in the background. A VM that fails any step is killed and the
start takes the ordinary path.

Bounded: at most MAX_POOL VMs, and never more guest memory than half the host's.
Each idle VM costs the private pages it wrote since the template (its other
pages are the template's, shared) and the CPU of an idle guest's timer ticks;
:meth:`WarmPool.report` measures both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from husk import paths, settings, sizes
from husk.agent.client import AgentClient
from husk.errors import GuestError, HuskError, InvalidArgument
from husk.sandbox import rehearsal, templates
from husk.sandbox.config import SandboxConfig, machine_config, prepare_root
from husk.sandbox.lan import LanPorts
from husk.sandbox.provisioner import Provisioner, default_provisioner
from husk.sandbox.sandbox import Sandbox
from husk.sandbox.template_boot import launch, make_plan, personalise, sparse_file
from husk.sandbox.templates import TemplateInputs
from husk.vm.machine import (
    DEFAULT_MEMORY_MIB,
    VirtualMachine,
    host_memory_mib,
    random_mac,
)

log = logging.getLogger(__name__)

POOL_PREFIX = "pool-"
DISKS_SUFFIX = ".disks"
MAX_POOL = 16
_REFILL_BACKOFF = 5.0
_MAX_FAILURES_IN_A_ROW = 3
REHEARSED_TCG_CACHE_MIB = 64


@dataclass(frozen=True)
class PoolShape:
    """The containers a pool serves: their memory and CPUs (None: the defaults)."""

    memory_bytes: int | None = None
    cpus: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"memory": self.memory_bytes, "cpus": self.cpus}


def validate(size: int, shape: PoolShape) -> None:
    """Refuses pools that could take the host's memory."""
    if size < 0 or size > MAX_POOL:
        raise InvalidArgument(f"a warm pool holds 0 to {MAX_POOL} VMs, not {size}")
    memory_mib = DEFAULT_MEMORY_MIB
    if shape.memory_bytes:
        memory_mib = sizes.vm_memory_mib(shape.memory_bytes)
    budget = host_memory_mib() // 2
    if size * memory_mib > budget:
        raise InvalidArgument(
            f"a warm pool of {size} VMs of {memory_mib} MiB exceeds half the host's memory "
            f"({budget} MiB)"
        )


def read_settings() -> tuple[int, PoolShape]:
    """The pool the daemon keeps, from <data dir>/config.json (size 0: none)."""
    stored = settings.warm_pool()
    return stored.size, PoolShape(stored.memory_bytes, stored.cpus)


def write_settings(size: int, shape: PoolShape) -> None:
    settings.set_warm_pool(settings.WarmPoolSetting(size, shape.memory_bytes, shape.cpus))


def _placeholder_config(directory: Path, shape: PoolShape) -> SandboxConfig:
    disks = directory.with_name(directory.name + DISKS_SUFFIX)
    return SandboxConfig(
        state_dir=directory,
        image_disk=disks / "image.placeholder",
        upper_disk=disks / "upper.placeholder",
        hostname="pool",
        mac=random_mac(),
        cpus=shape.cpus,
        memory_bytes=shape.memory_bytes,
    )


@dataclass
class PooledVM:
    machine: VirtualMachine
    client: AgentClient
    disks: Path
    """The directory of its placeholder disks."""
    template_key: str | None
    ready_at: float
    cpu_at_ready: float
    lan: LanPorts
    """Its LAN slots' ends, handed to the sandbox that takes it."""


class WarmPool:
    """Keeps ``size`` idle VMs of ``shape``, refilled in the background.

    ``upper_disk_bytes``: the size of the writable disk the runtime gives each
    container (a pooled VM's placeholder has it, so that the container's fits).
    ``slots`` bounds the VMs starting at once, shared with the caller's other starts.
    """

    def __init__(
        self,
        size: int,
        shape: PoolShape,
        slots: asyncio.Semaphore,
        *,
        upper_disk_bytes: int,
        provisioner: Provisioner | None = None,
    ) -> None:
        validate(size, shape)
        self.size = size
        self.shape = shape
        self._slots = slots
        self._upper_disk_bytes = upper_disk_bytes
        self._provisioner = provisioner or default_provisioner()
        self._idle: list[PooledVM] = []
        self._filler: asyncio.Task[None] | None = None
        self._closed = False
        self._inputs: TemplateInputs | None = None
        """What the idle VMs were restored for (set by the first fill)."""
        self.taken = 0
        self.last_error = ""
        self.rehearse = not settings.pool_rehearsal_disabled()
        """Whether each VM rehearses a start before it is offered (see rehearsal)."""
        self.rehearsal_cpu_seconds = 0.0
        """QEMU's CPU time spent in rehearsals, in total (for the report)."""
        self.rehearsals = 0

    # -- filling ------------------------------------------------------------------------

    def refill(self) -> None:
        """Starts topping the pool up unless that is already under way."""
        if self._closed or (self._filler is not None and not self._filler.done()):
            return
        self._filler = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        failures = 0
        while not self._closed and len(self._idle) < self.size:
            try:
                async with self._slots:
                    vm = await self._restore_one()
            except (HuskError, OSError) as err:
                failures += 1
                self.last_error = str(err)
                log.warning("warm pool: could not restore a VM: %s", err)
                if failures >= _MAX_FAILURES_IN_A_ROW:
                    log.warning("warm pool: giving up after %d failures in a row", failures)
                    return
                await asyncio.sleep(_REFILL_BACKOFF)
                continue
            failures = 0
            if self._closed:
                await _kill(vm)
                return
            self._idle.append(vm)

    async def _restore_one(self) -> PooledVM:
        directory = paths.ensure_private_dir(paths.vms_dir()) / (POOL_PREFIX + secrets.token_hex(4))
        config = _placeholder_config(directory, self.shape)
        disks = config.image_disk.parent
        disks.mkdir(mode=0o700)
        lan = LanPorts()
        try:
            sparse_file(config.image_disk, templates.IMAGE_DISK_BASE)
            assert config.upper_disk is not None
            sparse_file(config.upper_disk, self._upper_disk_bytes)
            if self.rehearse:
                await asyncio.to_thread(
                    rehearsal.fill_placeholders,
                    config.image_disk,
                    config.upper_disk,
                    self._upper_disk_bytes,
                )
            machine = machine_config(config, lan.qemu_fds())
            if self.rehearse:
                # Its translated code must outlive the rehearsal into the start: a full
                # cache is flushed whole (the default bound holds one start, not two).
                machine = replace(machine, tcg_cache_mib=REHEARSED_TCG_CACHE_MIB)
            plan, reason = await make_plan(machine, provisioner=self._provisioner)
            if plan is None:
                raise GuestError(f"no template plan for the pool: {reason}")
            self._inputs = plan.inputs

            async def nothing(_client: AgentClient) -> None:
                return None

            started = await launch(plan.config, nothing, provisioner=self._provisioner)
            lan.release_vm_ends()
        except BaseException:
            lan.close()
            shutil.rmtree(directory, ignore_errors=True)
            shutil.rmtree(disks, ignore_errors=True)
            raise
        vm = PooledVM(
            started.machine,
            started.client,
            disks,
            started.template_key,
            time.monotonic(),
            _cpu_seconds(started.machine),
            lan,
        )
        if self.rehearse:
            try:
                await rehearsal.rehearse(vm.client)
            except BaseException as err:
                await _kill(vm)  # never offered half-rehearsed
                if isinstance(err, HuskError):
                    # (e.g. a guest bundle without REHEARSE): the pool goes on without.
                    self.rehearse = False
                    log.warning("warm pool: a rehearsal failed, refilling without: %s", err)
                    raise GuestError(f"the VM's rehearsal failed: {err}") from err
                raise
            vm.ready_at, cpu_before = time.monotonic(), vm.cpu_at_ready
            vm.cpu_at_ready = _cpu_seconds(vm.machine)
            self.rehearsal_cpu_seconds += vm.cpu_at_ready - cpu_before
            self.rehearsals += 1
        return vm

    # -- taking -------------------------------------------------------------------------

    async def take(self, config: SandboxConfig) -> Sandbox | None:
        """An idle VM turned into ``config``'s sandbox, or None (then boot as usual)."""
        if self._closed or not self._idle or config.shares or config.upper_disk is None:
            return None
        if config.lan_taps:  # the pool's VMs have their LAN slots on socketpairs
            return None
        plan, _ = await make_plan(
            machine_config(config), pad=[config.image_disk], provisioner=self._provisioner
        )
        if plan is None or self._inputs is None or not self._idle:
            return None
        if plan.inputs.key != self._inputs.key:
            if _same_shape(plan.inputs, self._inputs):
                # Same shape, but another bundle or QEMU since the pool filled: its
                # VMs can never serve a start again.
                log.info("warm pool: the guest bundle or QEMU changed; replacing its VMs")
                await self._drain()
                self.refill()
            return None
        vm = self._idle.pop(0)
        self.refill()
        began = time.monotonic()
        try:
            vm.machine.check_alive()
            for index, disk in enumerate(plan.config.disks):
                if disk.create_size is None:  # a scratch disk moves with the state dir
                    await vm.machine.replace_disk(index, disk.path)
            disks = time.monotonic() - began
            if config.state_dir.exists():
                shutil.rmtree(config.state_dir)  # a previous run's, of this stopped container
            vm.machine.move_state_dir(config.state_dir)
            if not config.egress:
                await vm.machine.set_egress(False)
            await personalise(vm.client, plan.config)
            personalised = time.monotonic() - began
            await prepare_root(vm.client, config)
            log.debug(
                "warm pool: VM handed over in %.3f s: disks %.3f, personalised %.3f",
                time.monotonic() - began,
                disks,
                personalised,
            )
        except (HuskError, OSError) as err:
            log.warning("warm pool: could not hand a VM over, starting another way: %s", err)
            await _kill(vm)
            return None
        try:
            await vm.lan.hand_over(config.state_dir.name, config.lan_ports)
        except BaseException:
            await _kill(vm)  # the caller's hook failed: its error is the start's
            raise
        shutil.rmtree(vm.disks, ignore_errors=True)  # the placeholders
        self.taken += 1
        box = Sandbox(vm.machine, vm.client, vm.lan)
        box.boot_path = "pool"
        box.template_key = vm.template_key
        return box

    # -- the rest -----------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(BaseException):
                await self._filler
        await self._drain()

    async def _drain(self) -> None:
        idle, self._idle = self._idle, []
        for vm in idle:
            await _kill(vm)

    def report(self) -> dict[str, Any]:
        """What the pool holds and costs right now."""
        now = time.monotonic()
        rss = 0
        cpu_share = 0.0
        for vm in self._idle:
            with contextlib.suppress(HuskError, OSError):
                rss += vm.machine.rss_bytes()
                elapsed = now - vm.ready_at
                if elapsed > 0:
                    cpu_share += (_cpu_seconds(vm.machine) - vm.cpu_at_ready) / elapsed
        return {
            "size": self.size,
            "idle": len(self._idle),
            "filling": self._filler is not None and not self._filler.done(),
            "taken": self.taken,
            **self.shape.to_json(),
            "rss_bytes": rss,
            "cpu_percent": round(100 * cpu_share, 2),
            "rehearsed": self.rehearse,
            "rehearsal_cpu_seconds": round(
                self.rehearsal_cpu_seconds / self.rehearsals if self.rehearsals else 0.0, 3
            ),
            "last_error": self.last_error,
        }


def _same_shape(first: TemplateInputs, second: TemplateInputs) -> bool:
    """Whether two template inputs describe the same VM, whatever software it runs."""
    software = ("bundle_digest", "qemu_version", "tsc_khz", "format")
    one, other = first.to_json(), second.to_json()
    return all(one[key] == other[key] for key in one if key not in software)


def remove_leftovers(provisioner: Provisioner | None = None) -> None:
    """Kills the pooled VMs of a daemon that ended without closing its pool."""
    base = paths.vms_dir()
    if not base.is_dir():
        return
    provisioner = provisioner or default_provisioner()
    for directory in base.glob(POOL_PREFIX + "*"):
        if not directory.name.endswith(DISKS_SUFFIX) and provisioner.kill_recorded(directory):
            log.info("ended %s, left over by an earlier daemon", directory.name)
        shutil.rmtree(directory, ignore_errors=True)


async def _kill(vm: PooledVM) -> None:
    with contextlib.suppress(Exception):
        await vm.client.close()
    with contextlib.suppress(Exception):
        await vm.machine.kill()
    vm.lan.close()
    shutil.rmtree(vm.machine.state_dir, ignore_errors=True)
    shutil.rmtree(vm.disks, ignore_errors=True)


def _cpu_seconds(machine: VirtualMachine) -> float:
    try:
        return machine.cpu_seconds()
    except GuestError:
        return 0.0
