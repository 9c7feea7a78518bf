"""A stopped container's files, served by a short-lived maintenance VM.

The host never mounts or parses a disk a guest wrote (a hostile ext4 is an
attack on the host's kernel). To copy files in or out of a created or exited
container, export it or list its changes, a VM boots (template path) with the
container's image disk and writable disk, assembles the root as a start would
but writes nothing into it and runs none of the container's processes
(``maintenance`` PREPARE), serves the archive sessions, and powers off cleanly
(the writable disk synced). The container's lock is held meanwhile: a start,
stop or removal waits for the VM to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import posixpath
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TypeVar

from husk import paths
from husk.errors import GuestError, InvalidArgument, NotFound
from husk.oci.rootfs import ensure_rootfs_image, make_ext4_disk
from husk.oci.store import ImageStore
from husk.runtime.archive import Files, live_files
from husk.runtime.container import Container
from husk.runtime.create import UPPER_DISK_BYTES
from husk.runtime.model import ContainerStatus
from husk.runtime.mounts import plan_mounts
from husk.sandbox.provisioner import Provisioner
from husk.sandbox.sandbox import Sandbox, SandboxConfig
from husk.spec import ContainerSpec
from husk.vm.machine import random_mac

UPPER_DISK = "upper.ext4"
ANSWER_DEADLINE = 600.0
"""How long a guest may take to answer a stat or list the changes (streams are paced by
their client instead, who can hang up): the container's lock is not held forever."""
_T = TypeVar("_T")


async def within_deadline(call: Awaitable[_T], what: str) -> _T:
    """``call``'s result; GuestError if the guest takes longer than ANSWER_DEADLINE."""
    try:
        return await asyncio.wait_for(call, ANSWER_DEADLINE)
    except TimeoutError:
        raise GuestError(f"the guest did not answer {what} within {ANSWER_DEADLINE:.0f}s") from None


def maintenance_dir(container_id: str) -> Path:
    """The maintenance VM's state directory (never the container's own VM's)."""
    return paths.vms_dir() / f"{container_id[:15]}m"


def _running(container: Container) -> bool:
    return container.live is not None and container.status in (
        ContainerStatus.RUNNING,
        ContainerStatus.PAUSED,
    )


def check_writable(spec: ContainerSpec, path: str) -> None:
    """Docker's refusal of a copy into a read-only root, unless into a bind or volume."""
    if not spec.read_only:
        return
    wanted = posixpath.normpath("/" + path.lstrip("/"))
    for bind in spec.binds:
        target = posixpath.normpath(bind.target)
        if not bind.readonly and (wanted == target or wanted.startswith(target.rstrip("/") + "/")):
            return
    raise InvalidArgument("container rootfs is marked read-only")


class MaintenanceVMs:
    def __init__(
        self,
        *,
        images: ImageStore,
        container_dir: Callable[[str], Path],
        boot_slots: asyncio.Semaphore,
        provisioner: Provisioner | None = None,
    ) -> None:
        self._images = images
        self._container_dir = container_dir
        self._boot_slots = boot_slots
        self._provisioner = provisioner

    @contextlib.asynccontextmanager
    async def files(self, container: Container, *, writing: bool = False) -> AsyncIterator[Files]:
        """The container's files: its running VM's, else a maintenance VM's.

        ``writing``: the caller puts files there, so a stopped container without a
        writable disk gets one (the disk its first start then mounts).
        """
        if _running(container):
            yield live_files(container)
            return
        async with container.lock:
            running = _running(container)  # it may have started while we waited
            if not running:
                directory = self._container_dir(container.id)
                if not directory.is_dir():  # removed while we waited
                    raise NotFound(f"No such container: {container.id}")
                upper = directory / UPPER_DISK
                if writing and not upper.exists():
                    size = container.record.spec.storage_size or UPPER_DISK_BYTES
                    await asyncio.to_thread(make_ext4_disk, upper, size)
                async with self._vm(container, upper) as sandbox:
                    yield Files(sandbox.client, container, None, sandbox.transfer_ring())
        if running:
            yield live_files(container)

    @contextlib.asynccontextmanager
    async def _vm(self, container: Container, upper: Path) -> AsyncIterator[Sandbox]:
        record = container.record
        image = self._images.resolve(record.image_id)
        image_disk = await asyncio.to_thread(ensure_rootfs_image, self._images, image)
        state_dir = maintenance_dir(record.id)
        # Binds and volumes as a start mounts them (single-file binds included), but no
        # copy-up (that is the first start's) and no tmpfs (a copy goes to the layer).
        spec = dataclasses.replace(
            record.spec,
            binds=[dataclasses.replace(b, copy_up=False) for b in record.spec.binds],
            tmpfs=[],
        )
        mounts = await asyncio.to_thread(plan_mounts, spec, self._container_dir(record.id))
        config = SandboxConfig(
            state_dir=state_dir,
            image_disk=image_disk,
            # Without a writable disk (never made) the root is the image's alone.
            upper_disk=upper if upper.exists() else None,
            hostname=record.spec.hostname or record.id[:12],
            mac=random_mac(),
            shares=mounts.shares,
            egress=False,
            maintenance=True,
        )
        async with self._boot_slots:
            sandbox = await Sandbox.boot(config, provisioner=self._provisioner)
        try:
            # Bind mounts and volumes where a start mounts them: a copy to or from their
            # paths reaches them, as Docker's does (export and diff leave them out).
            for request in mounts.requests:
                await sandbox.client.mount(**request.body, timeout=request.timeout)
            yield sandbox
        finally:
            # A clean power-off: what was copied in is on the writable disk when it ends.
            try:
                await sandbox.destroy()
            finally:
                shutil.rmtree(state_dir, ignore_errors=True)


async def streamed(
    manager: AbstractAsyncContextManager[Files],
    make: Callable[[Files], Awaitable[AsyncIterator[bytes]]],
) -> AsyncIterator[bytes]:
    """``make(files)``'s chunks, with ``manager`` (and its VM) held until they end."""
    async with manager as files:
        stream = await make(files)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            closer = getattr(stream, "aclose", None)
            if closer is not None:
                await closer()
