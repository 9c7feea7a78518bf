"""Deleting a container that has ended: its VM's leftovers, its files, its record last."""

from __future__ import annotations

import logging
import shutil
from typing import Any

from husk.errors import HuskError
from husk.network.manager import NetworkManager
from husk.runtime.container import TRANSITIONS, Container
from husk.runtime.execs import ExecTable
from husk.runtime.launch import vm_dir
from husk.runtime.model import ContainerStatus
from husk.runtime.store import ContainerStore, StorageError
from husk.sandbox.provisioner import Provisioner
from husk.sandbox.sandbox import Sandbox

log = logging.getLogger(__name__)


def delete_container(
    container: Container,
    store: ContainerStore,
    execs: ExecTable,
    provisioner: Provisioner | None = None,
    networks: NetworkManager | None = None,
) -> None:
    """Deletes everything of an ended container, its record last (the caller holds its lock).

    Its endpoints go with its record (addresses are what the records hold), so
    ``networks`` only announces the disconnects. A deletion that fails leaves the
    container listed as dead with the reason, so that a later ``rm -f`` can finish it,
    and raises :class:`StorageError`.
    """
    record = container.record
    # A VM left running by an earlier failure must not outlive its container.
    Sandbox.kill_recorded(vm_dir(record.id), provisioner=provisioner)
    delete_vm_dir(record.id)
    unreadable = record.id in store.unreadable
    if not unreadable and ContainerStatus.REMOVING in TRANSITIONS[container.status]:
        container.transition(ContainerStatus.REMOVING)
    try:
        store.delete(record.id)
    except HuskError as err:
        if container.status is ContainerStatus.REMOVING:
            record.state.error = f"removal failed: {err}"
            container.transition(ContainerStatus.DEAD)
        raise StorageError(
            f"cannot remove container {record.name}: {err}. It stays listed (dead); "
            "remove it again once that is fixed"
        ) from None
    execs.container_removed(record.id)
    if networks is not None:
        networks.released(record.id, record.networks)


def delete_vm_dir(container_id: str) -> None:
    """The VM's runtime files (sockets, console log); what stays is swept at startup."""

    def note(_function: object, path: str, exc_info: Any) -> None:
        log.warning("could not delete %s: %s", path, exc_info[1])

    if vm_dir(container_id).exists():
        shutil.rmtree(vm_dir(container_id), onerror=note)
