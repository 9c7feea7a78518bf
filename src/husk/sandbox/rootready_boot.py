"""Starting a container from a root-ready snapshot, and building one in the background.

See :mod:`husk.sandbox.rootready` for what a snapshot is and which starts may use one.
Nothing here ever fails a start: a missing, stale or failing snapshot means the caller
starts the ordinary way (the shape template, else a cold boot), with the container's
pristine writable disk put back first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from dataclasses import replace

from husk import paths
from husk.agent.client import AgentClient
from husk.errors import GuestError
from husk.sandbox import rootready, template_boot, templates
from husk.sandbox.config import IMAGE_SERIAL, UPPER_SERIAL, SandboxConfig
from husk.sandbox.lan import LanPorts
from husk.sandbox.provisioner import Provisioner
from husk.sandbox.rootready import ImageIdentity
from husk.sandbox.template_boot import Launch, Plan
from husk.sandbox.templates import TemplateCorrupt
from husk.vm.machine import MachineConfig

log = logging.getLogger(__name__)

BUILD_DELAY = 1.0
"""Seconds a background build waits first: the start that asked for it goes ahead."""
BUILD_TIMEOUT = 120.0
_SNAPSHOT_HOSTNAME = "root-ready"

_builds: dict[str, asyncio.Task[None]] = {}
"""Background builds of this process, by snapshot key."""
_failed: set[str] = set()
"""Keys whose build failed in this process: not tried again until it restarts."""
_one_at_a_time: asyncio.Lock | None = None


async def try_launch(
    config: SandboxConfig,
    machine: MachineConfig,
    *,
    timeout: float,
    provisioner: Provisioner | None,
) -> Launch | None:
    """``config``'s container restored from its image's root-ready snapshot, or None.

    None when there is no usable snapshot (one is then built in the background) or
    restoring it failed; the container's writable disk is then as it was.
    """
    if config.upper_disk is None:
        return None
    started = time.monotonic()
    upper = config.upper_disk
    plan, reason = await template_boot.make_plan(
        machine, pad=[config.image_disk], provisioner=provisioner
    )
    if plan is None:
        log.debug("no root-ready start: %s", reason)
        return None
    try:
        image = ImageIdentity.of(config.image_disk)
    except OSError as err:
        log.debug("no root-ready start: %s", err)
        return None
    key = rootready.snapshot_key(plan.inputs, image, hosts_later=config.hosts_later)
    snapshot, why = await asyncio.to_thread(rootready.open_snapshot, key, plan.inputs, image)
    if snapshot is None:
        log.debug("no root-ready start: %s", why)
        schedule_build(plan, config, image, key)
        return None

    async def reidentify(client: AgentClient) -> None:
        extra = {"hosts_later": True} if config.hosts_later else {}
        await client.prepare(
            identity_only=True, hostname=config.hostname, dns=config.dns or None, **extra
        )

    kept = None
    try:
        kept = await asyncio.to_thread(rootready.install_upper, snapshot, upper)
        result = await template_boot._restore(
            plan, snapshot, reidentify, timeout=min(timeout, template_boot.RESTORE_TIMEOUT)
        )
    except Exception as err:  # any failure means: start the ordinary way
        log.warning("root-ready snapshot %s failed, starting the ordinary way: %s", key, err)
        if kept is not None:
            with contextlib.suppress(OSError):
                rootready.restore_upper(kept, upper)
        if isinstance(err, TemplateCorrupt) or (
            templates.record_failure(snapshot) >= templates.MAX_FAILURES
        ):
            with contextlib.suppress(OSError):
                await asyncio.to_thread(templates.discard, snapshot, str(err))
        return None
    finally:
        snapshot.close()
    with contextlib.suppress(OSError):
        rootready.keep_upper(kept)
    templates.mark_used(snapshot)
    result.root_ready = True
    result.seconds = time.monotonic() - started
    return result


def schedule_build(plan: Plan, config: SandboxConfig, image: ImageIdentity, key: str) -> None:
    """Builds ``key``'s snapshot in the background, unless built, building or failed."""
    if key in _builds or key in _failed:
        return
    task = asyncio.ensure_future(_build_later(plan, config, image, key))
    _builds[key] = task
    task.add_done_callback(lambda _task: _builds.pop(key, None))


async def _build_later(plan: Plan, config: SandboxConfig, image: ImageIdentity, key: str) -> None:
    global _one_at_a_time
    await asyncio.sleep(BUILD_DELAY)
    if _one_at_a_time is None:
        _one_at_a_time = asyncio.Lock()
    async with _one_at_a_time:  # one VM booting in the background at a time
        lock = templates.BuildLock(key)
        try:
            if not lock.try_acquire():
                return  # another process builds it
            existing, _ = rootready.open_snapshot(key, plan.inputs, image)
            if existing is not None:
                existing.close()
                return
            await build(plan, config, image, key)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            _failed.add(key)
            log.warning("could not build root-ready snapshot %s: %s", key, err)
        finally:
            lock.close()
    with contextlib.suppress(OSError):
        removed = await asyncio.to_thread(rootready.prune, current=plan.inputs)
        if removed:
            log.info("removed %d stale or surplus root-ready snapshots", len(removed))


async def build(
    plan: Plan,
    config: SandboxConfig,
    image: ImageIdentity,
    key: str,
    *,
    timeout: float = BUILD_TIMEOUT,
) -> None:
    """Boots a VM of ``plan``'s shape on ``config``'s image disk and a fresh writable disk,
    has it assemble the container root, and saves it with that disk.

    The caller holds the key's build lock. The VM gets no share, no container file
    and a hostname of its own: what it saves is the image's files and an empty
    writable layer, the same for every container that restores it.
    """
    from husk.oci.rootfs import make_ext4_disk  # the image store: only builds need it

    started = time.monotonic()
    build_dir = rootready.new_build_dir(key)
    scratch = paths.vms_dir() / f"rootready-{build_dir.name[-8:]}"
    memfd = -1
    lan = LanPorts(plan.config.lan_slots)
    try:
        upper = build_dir / rootready.UPPER
        upper_size = plan.config.disks[1].path.stat().st_size
        await asyncio.to_thread(make_ext4_disk, upper, upper_size)
        disks = [
            plan.config.disks[0],
            replace(plan.config.disks[1], path=upper),
            # Scratch disks (the transfer ring) in the saving VM's own directory.
            *(replace(d, path=scratch / "vm" / d.path.name) for d in plan.config.disks[2:]),
        ]
        memory = build_dir / templates.MEMORY
        memfd = templates.new_memory_fd(f"rootready-{key[:12]}")
        scratch.mkdir(parents=True, mode=0o700)
        machine_config = template_boot.saved_vm_config(plan, scratch, disks, [], lan, memory, memfd)

        async def prepare_root(client: AgentClient) -> None:
            extra = {"hosts_later": True} if config.hosts_later else {}
            await client.prepare(
                image=IMAGE_SERIAL, upper=UPPER_SERIAL, hostname=_SNAPSHOT_HOSTNAME, **extra
            )

        console = await template_boot.boot_and_save(
            plan,
            machine_config,
            lan,
            build_dir / templates.SNAPSHOT,
            timeout,
            before_save=prepare_root,
        )
        if not image.current():
            raise GuestError("the image disk changed while its snapshot was built")
        await asyncio.to_thread(templates.write_memory, memfd, memory)
        os.chmod(upper, 0o400)
        await asyncio.to_thread(
            templates.publish,
            build_dir,
            plan.inputs,
            console=console,
            seconds=time.monotonic() - started,
            final=rootready.snapshots_dir() / key,
            extra={
                "root_ready_format": rootready.ROOT_READY_FORMAT,
                "image": image.to_json(),
                "hosts_later": config.hosts_later,
                "upper_size": upper_size,
            },
        )
        log.info("saved root-ready snapshot %s (%s)", key, plan.inputs.describe())
    finally:
        lan.close()
        if memfd >= 0:
            os.close(memfd)
        shutil.rmtree(build_dir, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


async def wait_for_builds() -> None:
    """Waits for this process's background builds (tests, benchmarks)."""
    while _builds:
        await asyncio.gather(*list(_builds.values()), return_exceptions=True)
