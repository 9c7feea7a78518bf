"""Starting VMs from boot templates, cold booting when that is not possible, building templates.

A start with templates enabled:

1. pads the read-only image disk to its size class (sparse) and computes the
   template inputs (:mod:`husk.sandbox.templates`);
2. if a template for them exists: starts QEMU paused on the saved device state,
   with guest RAM mapped copy-on-write from the template's memory file, while a
   thread checks both files' hashes (once per file per process); connects to the
   agent, resumes, then gives the clone its own identity (fresh entropy + CRNG
   reseed, wall clock, MAC) before the container root is prepared;
3. if there is none (or it was corrupt and has been discarded): takes the
   template's build lock and builds it with a VM of its own, booted cold on
   placeholder disks with its RAM in a shared memory file and saved at "agent
   ready" (only device state is written: the memory file is the RAM), then
   restores from it like any later start. Concurrent first starts wait for that
   build (up to BUILDER_WAIT) instead of all booting a VM on a 2-core host. The
   VM a template is saved from never runs again: its memory file is the template;
4. when building or restoring fails, boots cold, logging why. A template that
   failed to restore without being proven bad is kept (up to MAX_FAILURES).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from husk import paths
from husk.agent.client import AgentClient
from husk.bundle import locate
from husk.errors import GuestError, HuskError
from husk.sandbox import template_failures, templates
from husk.sandbox.config import SandboxConfig, machine_config
from husk.sandbox.lan import LanPorts
from husk.sandbox.provisioner import Provisioner, default_provisioner
from husk.sandbox.templates import OpenTemplate, TemplateCorrupt, TemplateInputs
from husk.vm.machine import (
    DiskConfig,
    MachineConfig,
    MemoryFile,
    NetConfig,
    RestorableMachine,
    ShareConfig,
    random_mac,
)

log = logging.getLogger(__name__)

PrepareFn = Callable[[AgentClient], Awaitable[None]]

BOOT_TIMEOUT = 60.0
RESTORE_TIMEOUT = 20.0
"""A restore that takes longer than this has gone wrong: boot cold instead."""
ENTROPY_BYTES = 64
BUILDER_WAIT = 30.0
"""How long a start waits for a concurrent start that is building its template."""
_BUILDER_POLL = 0.05
_CONSOLE_LIMIT = 1 << 20


@dataclass
class Launch:
    """A running VM with its agent connected and the caller's ``prepare`` done."""

    machine: RestorableMachine
    client: AgentClient
    path: str
    """"template" (restored) or "cold" (booted)."""
    template_key: str | None
    """The template restored from (None when booted cold)."""
    reason: str
    """Why the VM booted cold, or why its template had to be built first ("" if neither)."""
    built_template: bool = False
    """This start built the template it restored from."""
    root_ready: bool = False
    """Restored from a root-ready snapshot (:mod:`husk.sandbox.rootready`)."""
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds from the start of the launch to each stage it passed (for benchmarks)."""


@dataclass(frozen=True)
class Plan:
    config: MachineConfig
    """The caller's configuration with the accelerator resolved."""
    inputs: TemplateInputs
    provisioner: Provisioner
    """Makes the plan's machines."""


async def make_plan(
    config: MachineConfig,
    *,
    pad: Sequence[Path] = (),
    provisioner: Provisioner | None = None,
) -> tuple[Plan | None, str]:
    """The template plan for ``config``, or (None, why it cannot use templates)."""
    provisioner = provisioner or default_provisioner()
    for disk in pad:
        try:
            size = disk.stat().st_size
            target = templates.image_disk_size(size)
            if size != target:
                # imported here: it loads the image store, which a boot does not need
                from husk.oci.rootfs import pad_to

                await asyncio.to_thread(pad_to, disk, target)
        except (OSError, HuskError) as err:
            return None, f"cannot pad {disk} to a template disk size: {err}"
    try:
        resolved = await provisioner.resolve(config)
        bundle = locate()
        if (bundle.kernel, bundle.initrd) != (config.kernel, config.initrd):
            return None, "the VM does not boot the located guest bundle"
        inputs = templates.template_inputs(
            resolved, bundle_digest=bundle.digest, backend=provisioner.backend
        )
    except (OSError, HuskError) as err:
        return None, f"cannot compute the template key: {err}"
    return Plan(resolved, inputs, provisioner), ""


async def launch(
    config: MachineConfig,
    prepare: PrepareFn,
    *,
    pad: Sequence[Path] = (),
    timeout: float = BOOT_TIMEOUT,
    provisioner: Provisioner | None = None,
) -> Launch:
    """Restores ``config``'s template, or boots cold (and saves one); then runs ``prepare``.

    ``pad`` lists read-only disks that may be grown (sparse) to their size class
    so that every image fits one template. Template problems never fail the
    start: they are logged and the VM boots cold. Errors of the cold boot itself
    (bad disks, a guest that does not come up, ``prepare`` failing) propagate.
    """
    started = time.monotonic()
    provisioner = provisioner or default_provisioner()
    plan, reason = await make_plan(config, pad=pad, provisioner=provisioner)
    if plan is None:
        log.info("booting cold: %s", reason)
        result = await cold_boot(
            config, prepare, reason=reason, timeout=timeout, provisioner=provisioner
        )
    else:
        result = await _launch_planned(plan, prepare, timeout=timeout)
    result.seconds = time.monotonic() - started
    return result


async def _launch_planned(plan: Plan, prepare: PrepareFn, *, timeout: float) -> Launch:
    known = template_failures.recall(plan.inputs)
    if known is not None:  # building it again would fail again: see template_failures
        reason = template_failures.describe(known)
        log.info("booting cold: %s", reason)
        return await cold_boot(
            plan.config, prepare, reason=reason, timeout=timeout, provisioner=plan.provisioner
        )
    lock = templates.BuildLock(plan.inputs.key)
    reason = ""
    built = False
    try:
        # A second round only after the first found a bad template and discarded it.
        for _ in range(2):
            template, missing = templates.open_template(plan.inputs)
            if template is None:
                reason = _join(reason, missing)
                built, failure = await _build_or_wait(plan, lock, timeout=timeout)
                if failure.startswith(BUILD_FAILED):
                    template_failures.remember(plan.inputs, "build", failure)
                template, missing = templates.open_template(plan.inputs)
                if template is None:
                    reason = _join(reason, failure or missing)
                    break
            try:
                restore_timeout = min(timeout, RESTORE_TIMEOUT)
                result = await _restore(plan, template, prepare, timeout=restore_timeout)
                templates.mark_used(template)
                template_failures.forget(plan.inputs.key)
                result.built_template = built
                result.reason = reason
                return result
            except Exception as err:  # any failure means: boot cold instead
                reason = f"restoring template {template.key} failed: {err}"
                log.warning("%s", reason)
                bad = isinstance(err, TemplateCorrupt)
                discarded = False
                if bad or templates.record_failure(template) >= templates.MAX_FAILURES:
                    discarded = await asyncio.to_thread(templates.discard, template, str(err))
                if discarded and (built or not bad):
                    template_failures.remember(plan.inputs, "restore", str(err))
            finally:
                template.close()
            if not discarded or built:
                break
        log.info("booting cold: %s", reason)
        return await cold_boot(
            plan.config, prepare, reason=reason, timeout=timeout, provisioner=plan.provisioner
        )
    finally:
        lock.close()


BUILD_FAILED = "building it failed"


def _join(first: str, second: str) -> str:
    return f"{first}; {second}" if first and second else first or second


async def _build_or_wait(
    plan: Plan, lock: templates.BuildLock, *, timeout: float
) -> tuple[bool, str]:
    """Builds ``plan``'s template, or waits for the start that is building it.

    Returns (whether this call built it, why there may still be none).
    """
    if not lock.try_acquire():
        # Another start is building it: restoring it once saved beats one more
        # VM booting on the same CPUs.
        if await _wait_for_builder(lock, min(BUILDER_WAIT, timeout / 2)):
            return False, ""
        return False, "the start building it is taking too long"
    try:
        existing, _ = templates.open_template(plan.inputs)
        if existing is not None:  # built by another start while this one looked
            existing.close()
            return False, ""
        await build_template(plan, timeout=timeout)
        return True, ""
    except (GuestError, OSError) as err:
        log.warning("could not build template %s: %s", plan.inputs.key, err)
        return False, f"{BUILD_FAILED}: {err}"
    finally:
        lock.release()


async def _wait_for_builder(lock: templates.BuildLock, timeout: float) -> bool:
    """Waits until nobody holds ``lock`` (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.try_acquire():
            lock.release()
            return True
        await asyncio.sleep(_BUILDER_POLL)
    return False


async def _restore(
    plan: Plan, template: OpenTemplate, prepare: PrepareFn, *, timeout: float
) -> Launch:
    begun = time.monotonic()
    deadline = begun + timeout
    stages: dict[str, float] = {}
    # The template's RAM, checked and sealed: the clone maps it, never writes it.
    memfd = await asyncio.to_thread(templates.sealed_memory, template)
    try:
        return await _restore_with(plan, template, prepare, memfd, begun, deadline, stages)
    finally:
        os.close(memfd)  # QEMU has its own copy by now (or never will)


async def _restore_with(
    plan: Plan,
    template: OpenTemplate,
    prepare: PrepareFn,
    memfd: int,
    begun: float,
    deadline: float,
    stages: dict[str, float],
) -> Launch:
    timeout = deadline - time.monotonic()
    memory = MemoryFile(template.directory / templates.MEMORY, shared=False, fd=memfd)
    machine = plan.provisioner.create(replace(plan.config, memory_file=memory))
    # The snapshot's hash runs beside QEMU's load; the guest only runs once it has matched.
    verify = asyncio.ensure_future(asyncio.to_thread(template.verify))
    connect: asyncio.Task[AgentClient] | None = None
    try:
        prefix = template.console + f"\n[husk] restored from template {template.key}\n".encode()
        try:
            await machine.restore(
                template.snapshot_fd, start=False, console_prefix=prefix, timeout=timeout
            )
        except GuestError as err:
            if (machine.returncode or 0) > 0:
                # QEMU quit by itself (not killed after a timeout): it refused the state.
                raise TemplateCorrupt(f"QEMU could not load it: {err}") from err
            raise
        stages["loaded"] = time.monotonic() - begun

        async def clone_identity() -> dict[str, Any]:
            return identity_body(plan.config)

        # Connecting while the guest is still paused: it never sees the host go away.
        # The HELLO carries the clone's entropy and MAC (see make_own).
        connect = asyncio.create_task(
            AgentClient.connect(
                machine.agent_socket,
                timeout=max(0.1, deadline - time.monotonic()),
                check_alive=machine.check_alive,
                identity=clone_identity,
            )
        )
        await verify
        stages["verified"] = time.monotonic() - begun
        await machine.resume()
        client = await connect
        stages["ready"] = time.monotonic() - begun
        try:
            await make_own(client, plan.config)
            stages["personalised"] = time.monotonic() - begun
            await prepare(client)
            stages["prepared"] = time.monotonic() - begun
        except BaseException:
            await client.close()
            raise
    except BaseException as failure:
        if connect is not None:
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
        # The hashing thread reads the template's descriptor: let it finish first.
        corrupt: TemplateCorrupt | None = None
        try:
            await asyncio.shield(verify)
        except TemplateCorrupt as err:
            corrupt = err
        except Exception:
            log.debug("template check failed", exc_info=True)
        finally:
            with contextlib.suppress(Exception):
                await machine.kill()
        if corrupt is not None and corrupt is not failure and isinstance(failure, Exception):
            # QEMU choking on a damaged file is a symptom; the hash says what happened.
            raise corrupt from failure
        raise
    return Launch(machine, client, "template", template.key, "", stages=stages)


def identity_body(config: MachineConfig) -> dict[str, Any]:
    """A clone's own entropy and MAC as its HELLO carries them (husk.guest.agent.identity)."""
    body: dict[str, Any] = {"entropy": os.urandom(ENTROPY_BYTES).hex()}
    if config.net is not None:
        body["mac"] = config.net.mac
    return body


async def make_own(client: AgentClient, config: MachineConfig) -> None:
    """After a restore's handshake: the clone's entropy and MAC are set (the HELLO carried
    them and the agent set them, see :func:`identity_body`), then its clock; or all three
    now (:func:`personalise`, for an agent that does not take them with the HELLO).

    The clock is never in the HELLO: the guest reads that only once it has woken up,
    hundreds of milliseconds after the host wrote it on a loaded host; SET_TIME after
    READY reaches an awake guest.
    """
    if client.identity is None:
        await personalise(client, config)
        return
    wanted = config.net.mac if config.net is not None else None
    if client.identity.get("mac") != wanted:
        raise GuestError(f"the guest set MAC {client.identity.get('mac')!r} instead of {wanted!r}")
    await client.set_time()


async def personalise(client: AgentClient, config: MachineConfig) -> None:
    """Makes a restored clone its own: fresh entropy (and a CRNG reseed), the clock, a MAC.

    The hostname comes with PREPARE. The kernel's boot_id is generated on its
    first read, which no template guest does, so each clone draws its own after
    the reseed.
    """
    steps: list[Awaitable[object]] = [client.add_entropy(ENTROPY_BYTES), client.set_time()]
    if config.net is not None:
        steps.append(client.set_interface(mac=config.net.mac))
    await asyncio.gather(*steps)


async def cold_boot(
    config: MachineConfig,
    prepare: PrepareFn,
    *,
    reason: str = "",
    timeout: float = BOOT_TIMEOUT,
    provisioner: Provisioner | None = None,
) -> Launch:
    """Boots ``config`` the ordinary way, waits for the agent, runs ``prepare``."""
    begun = time.monotonic()
    stages: dict[str, float] = {}
    provisioner = provisioner or default_provisioner()
    machine = provisioner.create(await provisioner.resolve(config))
    await machine.boot()
    try:
        client = await AgentClient.connect(
            machine.agent_socket, timeout=timeout, check_alive=machine.check_alive
        )
        machine.release_boot_images()
        stages["ready"] = time.monotonic() - begun
        try:
            await prepare(client)
            stages["prepared"] = time.monotonic() - begun
        except BaseException:
            await client.close()
            raise
    except BaseException:
        with contextlib.suppress(Exception):
            await machine.kill()
        raise
    return Launch(machine, client, "cold", None, reason, stages=stages)


def saved_vm_config(
    plan: Plan,
    scratch: Path,
    disks: list[DiskConfig],
    shares: list[ShareConfig],
    lan: LanPorts,
    memory: Path,
    memfd: int,
) -> MachineConfig:
    """The configuration of a VM that will be saved (a template or a root-ready
    snapshot): its RAM in ``memfd``, sized here, shared with QEMU (which, under its own
    uid, could not open a daemon-owned file by name) and written to ``memory`` once the
    VM is saved; a MAC of its own and LAN sockets of its own."""
    _cpus, memory_mib = plan.config.resources()
    sparse_file(memory, memory_mib * 1024 * 1024)
    os.ftruncate(memfd, memory_mib * 1024 * 1024)
    return replace(
        plan.config,
        state_dir=scratch / "vm",
        disks=disks,
        shares=shares,
        net=NetConfig(random_mac()) if plan.config.net is not None else None,
        memory_file=MemoryFile(memory, shared=True, fd=memfd),
        lan_fds=lan.qemu_fds(),
        lan_taps=(),
    )


async def boot_and_save(
    plan: Plan,
    config: MachineConfig,
    lan: LanPorts,
    snapshot: Path,
    timeout: float,
    before_save: PrepareFn | None = None,
) -> bytes:
    """Boots ``config``, waits for its agent, lets ``before_save`` work in the guest,
    saves the VM's state to ``snapshot`` without resuming it and returns the start of its
    console log. The VM is killed and ``lan`` closed whatever happens."""
    machine = plan.provisioner.create(config)
    await machine.boot()
    try:
        client = await AgentClient.connect(
            machine.agent_socket, timeout=timeout, check_alive=machine.check_alive
        )
        try:
            if before_save is not None:
                await before_save(client)
            await machine.snapshot(snapshot, resume=False)
        finally:
            await client.close()
        with contextlib.suppress(OSError), machine.console_log.open("rb") as stream:
            return stream.read(_CONSOLE_LIMIT)
        return b""
    finally:
        with contextlib.suppress(Exception):
            await machine.kill()
        lan.close()


async def build_template(plan: Plan, *, timeout: float = BOOT_TIMEOUT) -> Path:
    """Boots a VM for ``plan``, saves it at "agent ready" as the template, and stops it.

    The caller holds the template's build lock. The VM gets placeholder disks and
    shares (sparse files and empty directories of the same shapes): it never
    mounts them, and a container's files never meet a VM that others are cloned
    from. Its RAM lives in the new template's memory file.
    """
    key = plan.inputs.key
    started = time.monotonic()
    build = templates.new_build_dir(key)
    scratch = paths.vms_dir() / f"template-{build.name[-8:]}"
    memfd = -1
    # The template's VM has the LAN interfaces every VM has, on sockets of its own whose
    # other ends stay open until it is saved (a closed peer would be saved as such).
    lan = LanPorts(plan.config.lan_slots)
    try:
        placeholders = scratch / "placeholders"
        placeholders.mkdir(parents=True, mode=0o700)
        disks = []
        for index, disk in enumerate(plan.config.disks):
            placeholder = placeholders / f"disk{index}"
            if disk.create_size is None:
                sparse_file(placeholder, disk.path.stat().st_size)
            disks.append(replace(disk, path=placeholder))  # a scratch disk: made at boot
        shares = []
        for index, share in enumerate(plan.config.shares):
            directory = placeholders / f"share{index}"
            directory.mkdir()
            shares.append(replace(share, path=directory))
        memory = build / templates.MEMORY
        memfd = templates.new_memory_fd(f"build-{key[:12]}")
        config = saved_vm_config(plan, scratch, disks, shares, lan, memory, memfd)
        console = await boot_and_save(plan, config, lan, build / templates.SNAPSHOT, timeout)
        await asyncio.to_thread(templates.write_memory, memfd, memory)
        final = await asyncio.to_thread(
            templates.publish,
            build,
            plan.inputs,
            console=console,
            seconds=time.monotonic() - started,
        )
        log.info("saved template %s (%s)", key, plan.inputs.describe())
        templates.adopt_memory(final / templates.MEMORY, memfd)
        memfd = -1
    finally:
        lan.close()
        if memfd >= 0:
            os.close(memfd)
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):
        removed = await asyncio.to_thread(templates.prune, plan.inputs)
        if removed:
            log.info("removed %d stale or surplus templates", len(removed))
    return final


@dataclass
class WarmResult:
    key: str
    path: Path
    built: bool
    """False when a valid template was already there."""
    seconds: float
    inputs: TemplateInputs


async def warm(
    *,
    memory_bytes: int | None = None,
    cpus: float | None = None,
    upper_disk_bytes: int | None,
    image_disk_bytes: int = templates.IMAGE_DISK_BASE,
    shares: int = 0,
    rebuild: bool = False,
    timeout: float = BOOT_TIMEOUT,
    provisioner: Provisioner | None = None,
) -> WarmResult:
    """Builds the template a container with these resources and layout will use.

    The VM boots with placeholder disks (sparse files of the sizes containers
    get) and ``shares`` placeholder directories. ``rebuild`` replaces an
    existing template.
    """
    started = time.monotonic()
    base = paths.ensure_private_dir(templates.templates_dir())
    scratch = base / f"{templates.BUILD_PREFIX}warm-{time.time_ns()}"
    scratch.mkdir(mode=0o700)
    state_dir = paths.vms_dir() / f"template-{scratch.name[-8:]}"
    try:
        image = scratch / "image.placeholder"
        sparse_file(image, image_disk_bytes)
        upper = None
        if upper_disk_bytes is not None:
            upper = scratch / "upper.placeholder"
            sparse_file(upper, upper_disk_bytes)
        share_configs = []
        for index in range(shares):
            directory = scratch / f"share{index}"
            directory.mkdir()
            share_configs.append(ShareConfig(tag=f"bind{index}", path=directory))
        config = machine_config(
            SandboxConfig(
                state_dir=state_dir,
                image_disk=image,
                upper_disk=upper,
                hostname="template",
                mac=random_mac(),
                cpus=cpus,
                memory_bytes=memory_bytes,
                shares=share_configs,
            )
        )
        plan, reason = await make_plan(config, pad=[image], provisioner=provisioner)
        if plan is None:
            raise GuestError(f"cannot build a template: {reason}")
        key = plan.inputs.key
        if rebuild:
            existing, _ = templates.open_template(plan.inputs)
            if existing is not None:
                await asyncio.to_thread(templates.discard, existing, "rebuild requested")
                existing.close()
        existing, _ = templates.open_template(plan.inputs)
        if existing is not None:
            existing.close()
            return WarmResult(
                key, templates.template_dir(key), False, time.monotonic() - started, plan.inputs
            )
        lock = templates.BuildLock(key)
        try:
            built, failure = await _build_or_wait(plan, lock, timeout=timeout)
        finally:
            lock.close()
        existing, reason = templates.open_template(plan.inputs)
        if existing is None:
            raise GuestError(f"building template {key} failed: {failure or reason}")
        existing.close()
        return WarmResult(
            key, templates.template_dir(key), built, time.monotonic() - started, plan.inputs
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)


def sparse_file(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
