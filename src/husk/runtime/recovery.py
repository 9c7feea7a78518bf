"""A daemon that starts again: re-attach to the VMs that ran on, end those nobody owns,
name the containers its restart policies start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil

from husk import paths
from husk.runtime.container import Container
from husk.runtime.faults import describe_exception
from husk.runtime.launch import Launcher, vm_dir
from husk.runtime.model import ContainerStatus
from husk.runtime.registry import ContainerRegistry
from husk.runtime.restart import restart_at_daemon_start
from husk.runtime.store import ContainerStore
from husk.sandbox.provisioner import Provisioner
from husk.sandbox.sandbox import Sandbox

log = logging.getLogger(__name__)

# A container's VM, or (…m) a maintenance VM (runtime.offline), never owned at startup.
_VM_DIR_NAME = re.compile(r"[0-9a-f]{16}|[0-9a-f]{15}m")


async def reattach(launcher: Launcher, container: Container) -> None:
    """Adopts the VM of a running container; any failure ends it and marks it exited."""
    record = container.record
    sandbox: Sandbox | None = None
    try:
        logged = container.log_file().bytes_since(record.state.started_at)
        sandbox = await Sandbox.attach(
            vm_dir(record.id), resume={"run": logged}, provisioner=launcher.provisioner
        )
        await launcher.adopt(container, sandbox)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        reason = describe_exception(exc)
        log.warning("container %s could not be re-attached: %s", record.id[:12], reason)
        if sandbox is not None:
            with contextlib.suppress(Exception):
                await sandbox.client.close()
            with contextlib.suppress(Exception):
                await sandbox.machine.kill()
        # A VM husk does not manage must not run on: it holds the container's disk,
        # and a later start would boot a second VM on it.
        ended = Sandbox.kill_recorded(vm_dir(record.id), provisioner=launcher.provisioner)
        what = "ended it" if ended else "it was gone"
        was_up = record.state.status in (ContainerStatus.RUNNING, ContainerStatus.PAUSED)
        launcher.mark_exited(
            container,
            137 if was_up else 0,
            error=f"lost the VM across a daemon restart ({what}): {reason}",
        )
        return
    log.info("re-attached to container %s", record.id[:12])


def end_orphan_vms(registry: ContainerRegistry, provisioner: Provisioner | None = None) -> None:
    """Ends VMs that no running container owns (e.g. a start whose record was never saved)."""
    base = paths.vms_dir()
    if not base.is_dir():
        return
    owned = {vm_dir(container_id).name for container_id in registry.live}
    known = {vm_dir(record.id).name for record in registry.store.all()}
    for directory in base.iterdir():
        if not _VM_DIR_NAME.fullmatch(directory.name) or directory.name in owned:
            continue
        if Sandbox.kill_recorded(directory, provisioner=provisioner):
            log.warning("ended the VM in %s: no running container owns it", directory)
        if directory.name not in known:
            shutil.rmtree(directory, ignore_errors=True)


def restarts_at_start(store: ContainerStore) -> list[str]:
    """The stopped containers whose restart policy starts them with the daemon."""
    return [
        record.id
        for record in store.all()
        if not record.state.running
        and restart_at_daemon_start(
            record.spec.restart, stopped_by_user=record.state.stopped_by_user
        )
    ]
