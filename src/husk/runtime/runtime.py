"""The container manager: creates, finds, lists and removes containers; used in-process
and served by the daemon.

Each container is a :class:`~husk.runtime.container.Container` (its record, typed
status and live companions). The work is done by modules with one job each:
``create`` (spec checks, the record, disks), ``launch`` (boot, workload, monitor,
exit, restarts), ``recovery`` (a restarted daemon re-attaches), ``exec_sessions``,
``attach`` (logs and streams), ``archive`` (files), ``info``. Records and logs live
on disk, so a restarted daemon re-attaches to VMs that kept running.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from husk import paths
from husk.errors import Conflict, HuskError, InvalidArgument, NotFound, NotModified
from husk.network.manager import NetworkManager
from husk.network.model import Network
from husk.network.store import NetworkStore
from husk.oci.pull import local_image, normalise_policy
from husk.oci.pull import pull as pull_image
from husk.oci.store import ImageRecord, ImageStore
from husk.runtime import (
    archive,
    attach,
    commit,
    create,
    endpoints,
    info,
    offline,
    recovery,
    removal,
)
from husk.runtime.collect import MAX_COLLECTED_OUTPUT
from husk.runtime.container import Container, Host
from husk.runtime.container import Live as Live  # re-exported: tests build them
from husk.runtime.create import UPPER_DISK_BYTES as UPPER_DISK_BYTES  # re-exported
from husk.runtime.endpoints import RecordMembers, member_of
from husk.runtime.events import Event as Event  # re-exported: the daemon's events type
from husk.runtime.events import EventHub
from husk.runtime.exec_sessions import ExecSessions
from husk.runtime.execs import ExecRecord, ExecTable
from husk.runtime.execs import ExecSpec as ExecSpec  # re-exported: callers build specs
from husk.runtime.faults import describe_exception
from husk.runtime.launch import Launcher, vm_dir
from husk.runtime.logs import LogEntry, LogFile, one_by_one
from husk.runtime.model import ContainerRecord, ContainerState, ContainerStatus
from husk.runtime.names import random_name
from husk.runtime.networking import LiveNetworking
from husk.runtime.registry import ContainerRegistry
from husk.runtime.store import ContainerStore, StorageError, validate_name
from husk.runtime.streams import ProcessStream
from husk.sandbox import pool as warm_pool
from husk.sandbox.pool import PoolShape, WarmPool
from husk.sandbox.provisioner import Provisioner
from husk.sandbox.templates import templates_enabled
from husk.spec import ContainerSpec
from husk.volumes import mountspec
from husk.volumes.manager import VolumeManager
from husk.volumes.model import Volume
from husk.volumes.store import VolumeStore

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, *, provisioner: Provisioner | None = None) -> None:
        """``provisioner`` makes the VMs: the process's QEMU one unless a test gives another."""
        self.images = ImageStore()
        self.containers = ContainerStore()
        self.events = EventHub()
        self._background: set[asyncio.Task[Any]] = set()
        self.registry = ContainerRegistry(
            self.containers, Host(event=self.events.container_event, spawn=self._spawn)
        )
        self.execs = ExecTable()
        self.networks = NetworkManager(
            NetworkStore(), RecordMembers(self.containers), event=self._network_event
        )
        self.volumes = VolumeManager(
            VolumeStore(), lambda: create.volume_users(self.containers), event=self._volume_event
        )
        self.exec_sessions = ExecSessions(self.registry, self.execs, self.events)
        self._closing = False
        # Cold boots are CPU-bound (TCG): running many at once only makes all of them
        # miss their deadlines, so they queue for a few slots instead.
        self._boot_slots = asyncio.Semaphore(max(2, 2 * (os.cpu_count() or 1)))
        self.pool: WarmPool | None = None
        self.launcher = Launcher(
            registry=self.registry,
            images=self.images,
            execs=self.execs,
            events=self.events,
            spawn=self._spawn,
            boot_slots=self._boot_slots,
            pool=lambda: self.pool,
            closing=lambda: self._closing,
            auto_remove=lambda container_id: self.remove(container_id, force=True, volumes=True),
            run_check=self.exec_sessions.run_to_end,
            provisioner=provisioner,
        )
        self.offline = offline.MaintenanceVMs(
            images=self.images,
            container_dir=self.registry.store.directory,
            boot_slots=self._boot_slots,
            provisioner=provisioner,
        )
        self.networking = LiveNetworking(
            registry=self.registry,
            manager=lambda: self.networks,
            gateway=self.launcher.gateway,
            spawn=self._spawn,
        )
        self.launcher.networking = self.networking
        self.networks.live = self.networking

    # -- the containers ---------------------------------------------------
    def container(self, ref: str) -> Container:
        """The container ``ref`` names: full id, name or unique id prefix (NotFound)."""
        return self.registry.get(ref)

    def get(self, ref: str) -> ContainerRecord:
        return self.containers.get(ref)

    def list(self, *, all: bool = False) -> builtins.list[ContainerRecord]:
        records = self.containers.all()
        return records if all else [r for r in records if r.state.running]

    @property
    def live(self) -> dict[str, Live]:
        """The live VM handles of the running containers, by id (a snapshot)."""
        return self.registry.live

    def log_file(self, container_id: str) -> LogFile:
        """One instance per container, so followers are woken by the writer."""
        return self.container(container_id).log_file()

    @staticmethod
    def vm_dir(container_id: str) -> Path:
        return vm_dir(container_id)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- events -----------------------------------------------------------
    def _network_event(self, action: str, network: Network, **attributes: str) -> None:
        self.emit(
            "network", action, network.id, name=network.name, type=network.driver, **attributes
        )

    def _volume_event(self, action: str, volume: Volume, **attributes: str) -> None:
        self.emit("volume", action, volume.name, driver=volume.driver, **attributes)

    def emit(self, kind: str, action: str, obj_id: str, **attributes: str) -> None:
        self.events.emit(kind, action, obj_id, **attributes)

    def subscribe(self) -> AsyncIterator[Event]:
        return self.events.subscribe()

    # -- lifecycle of the daemon -------------------------------------------
    async def startup(self) -> None:
        """Re-attaches to VMs that kept running while no daemon was there; fills the pool."""
        await endpoints.assign_missing(self.networks, self.containers)
        try:
            warm_pool.remove_leftovers()
            size, shape = warm_pool.read_settings()
            if size:
                await self.configure_pool(size, shape, persist=False)
        except Exception as exc:  # never a reason for the daemon not to start
            log.warning("no warm pool: %s", describe_exception(exc))
        # Each container is re-attached on its own: one VM that hangs or misbehaves
        # costs only its own deadline and its own container.
        running = [self.registry.of(r) for r in self.containers.all() if r.state.running]
        await asyncio.gather(*(recovery.reattach(self.launcher, c) for c in running))
        recovery.end_orphan_vms(self.registry, self.launcher.provisioner)
        for container_id in recovery.restarts_at_start(self.containers):
            self._spawn(self.launcher.restart_later(container_id, 0.0))

    async def shutdown(self) -> None:
        """Detaches from every VM and leaves it running (the pool's idle VMs end)."""
        self._closing = True
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        for task in list(self._background):
            task.cancel()
        for container in self.registry.all_held():
            live = container.live
            if live is None:
                continue
            for task in live.tasks:
                task.cancel()
            await live.publisher.close()
            with contextlib.suppress(Exception):
                await live.sandbox.close()
            container.live = None
        await self.launcher.gateway.close()
        # The switch runs on: the VMs left running keep their LANs until a daemon is back.
        await self.networking.switch.close()

    # -- the warm pool ------------------------------------------------------
    async def configure_pool(self, size: int, shape: PoolShape, *, persist: bool = True) -> None:
        """Keeps ``size`` idle VMs for containers of ``shape`` (0: none); refills begin now."""
        warm_pool.validate(size, shape)
        if size and not templates_enabled():
            raise InvalidArgument("a warm pool needs boot templates, which are disabled")
        if persist:
            warm_pool.write_settings(size, shape)
        if self.pool is not None and (self.pool.size, self.pool.shape) == (size, shape):
            self.pool.refill()  # the same pool: keep its VMs
            return
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if size:
            self.pool = WarmPool(size, shape, self._boot_slots, upper_disk_bytes=UPPER_DISK_BYTES)
            self.pool.refill()

    def pool_report(self) -> dict[str, Any]:
        if self.pool is None:
            return {"size": 0, "idle": 0, "filling": False, "taken": 0, "rss_bytes": 0}
        return self.pool.report()

    # -- images -----------------------------------------------------------
    async def pull(
        self,
        reference: str,
        *,
        policy: str = "missing",
        platform: str | None = None,
        progress: Callable[..., Any] | None = None,
    ) -> Any:
        # Docker's "pull" event is for a registry pull: none when create finds the image.
        found_locally = normalise_policy(policy) in ("missing", "never") and (
            local_image(self.images, reference) is not None
        )
        record = await pull_image(
            reference, policy=policy, platform=platform, progress=progress, store=self.images
        )
        if not found_locally:
            self.emit("image", "pull", reference, name=reference)
        return record

    # -- create, start, stop, restart, kill, pause ----------------------------
    async def create(self, spec: ContainerSpec, *, pull_policy: str = "missing") -> ContainerRecord:
        name = validate_name(spec.name) if spec.name else random_name(self.containers.names())
        existing = self.containers.find_by_name(name)
        if existing is not None:
            raise Conflict(
                f'the container name "/{name}" is already in use by container "{existing.id}". '
                "You have to remove (or rename) that container to be able to reuse that name."
            )
        create.validate_spec(spec)
        image = await self.pull(spec.image, policy=pull_policy)
        spec.binds = create.volume_mounts(spec, image.config, self.containers)
        mountspec.check_targets(spec.binds, spec.tmpfs)
        create.validate_spec(spec)  # the binds --volumes-from copied
        record = create.new_record(spec, name, image)
        record.networks = await self.networks.allocate(member_of(record), spec.networks)
        try:
            resolved = self.volumes.resolve(record.id, record.spec.binds)
        except BaseException:
            self.networks.settle(record.id)
            raise
        record.spec.binds = resolved.binds
        directory = self.containers.directory(record.id)
        try:
            paths.ensure_private_dir(directory)
            await asyncio.to_thread(
                create.prepare_disks, self.images, image, directory, record.spec.storage_size
            )
            self.containers.add(record)
        except BaseException as exc:
            self.networks.settle(record.id)
            self.volumes.undo(record.id, resolved.created)
            self.containers.forget(record.id)
            if isinstance(exc, OSError):
                where = f" ({exc.filename})" if exc.filename else ""
                raise StorageError(
                    f"cannot create container {name}: {exc.strerror or exc}{where}"
                ) from exc
            raise
        self.networks.settle(record.id)
        self.volumes.settle(record.id)
        self.events.container_event(record, "create")
        self.networks.announce(record.id, record.networks)
        return record

    async def start(self, ref: str) -> None:
        """Starts the container; one whose start fails is removed if it is AutoRemove."""
        container = self.container(ref)
        await self.launcher.start(container)
        record = container.record
        for bind in record.spec.binds:
            if bind.volume:  # Docker's "volume mount" event, one per volume mounted
                self.emit(
                    "volume",
                    "mount",
                    bind.volume,
                    driver="local",
                    container=record.id,
                    destination=bind.target,
                    propagation="",
                    **{"read/write": "false" if bind.readonly else "true"},
                )

    # Each acts first and records after: a full or read-only data directory must
    # never keep a container from being stopped, killed or removed.
    async def stop(self, ref: str, timeout: int | None = None, signal: str | None = None) -> None:
        container = self.container(ref)
        record = container.record
        async with container.lock:
            if record.state.status is ContainerStatus.RESTARTING:
                record.state.stopped_by_user = True
                container.transition(ContainerStatus.EXITED)
                return
            live = container.live
            if live is None or not record.state.running:
                raise NotModified(f"container {record.name} is not running")
            record.state.stopped_by_user = True  # recorded when the container has exited
            await container.stop_live(live, timeout, signal)

    async def restart(self, ref: str, timeout: int | None = None) -> None:
        record = self.get(ref)
        with contextlib.suppress(NotModified):
            await self.stop(record.id, timeout)
        await self.start(record.id)
        self.events.container_event(record, "restart")

    async def kill(self, ref: str, signal: str | int = "KILL") -> None:
        await self.container(ref).kill(signal)

    async def pause(self, ref: str) -> None:
        await self.container(ref).pause()

    async def unpause(self, ref: str) -> None:
        await self.container(ref).unpause()

    # -- remove -----------------------------------------------------------
    async def remove(self, ref: str, *, force: bool = False, volumes: bool = False) -> None:
        """Ends the container if ``force``, then deletes its files, its record last;
        ``volumes`` (``rm -v``) then removes its anonymous volumes.

        Succeeds only once the record is gone: a removal that cannot delete
        something says what, and leaves the container listed as dead with the
        reason, so that a later ``rm -f`` can finish it.
        """
        try:
            container = self.container(ref)
        except NotFound:
            if len(ref) == 64 and all(c in "0123456789abcdef" for c in ref):
                return  # removing a removed container (by full id) is not an error
            raise
        record = container.record
        async with container.lock:
            live = container.live
            if record.state.running or live is not None:
                if not force:
                    raise Conflict(
                        f"You cannot remove a {record.state.status.value} container {record.id}. "
                        "Stop the container before attempting removal or force remove"
                    )
                record.state.stopped_by_user = True
                if live is not None:
                    await container.force_end(live)
            removal.delete_container(
                container, self.containers, self.execs, self.launcher.provisioner, self.networks
            )
        self.events.container_event(record, "destroy")
        container.removed()
        self.registry.forget(container)
        if volumes:
            self.volumes.remove_anonymous(record.spec.binds)

    async def prune(self) -> builtins.list[str]:
        removed = []
        for record in self.containers.all():
            if not record.state.running:
                try:
                    await self.remove(record.id)
                except HuskError as exc:
                    log.warning("prune: %s", exc)
                    continue
                removed.append(record.id)
        return removed

    # -- wait, rename -------------------------------------------------------
    async def wait(self, ref: str, condition: str = "not-running") -> int:
        container = self.container(ref)
        if condition in ("not-running", ""):
            if not container.running:
                return container.record.state.exit_code
        elif condition not in ("next-exit", "removed"):
            raise InvalidArgument(
                f"invalid wait condition {condition!r}: use not-running, next-exit or removed"
            )
        future = container.add_waiter(removal=condition == "removed")
        try:
            return await future
        finally:
            # A client that gave up (disconnected: its handler is cancelled) leaves nothing.
            if not future.done() or future.cancelled():
                container.drop_waiter(future)

    async def rename(self, ref: str, new_name: str) -> None:
        record = self.get(ref)
        name = validate_name(new_name)
        other = self.containers.find_by_name(name)
        if other is not None and other.id != record.id:
            raise Conflict(
                f'the container name "/{name}" is already in use by container "{other.id}"'
            )
        old = record.name
        record.name = name
        try:
            self.containers.save(record)
        except BaseException:
            record.name = old
            raise
        self.events.container_event(record, "rename", oldName="/" + old)

    # -- logs and attach ---------------------------------------------------
    def logs(
        self,
        ref: str,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        until: float | None = None,
        stdout: bool = True,
        stderr: bool = True,
    ) -> AsyncIterator[LogEntry]:
        batches = self.log_batches(
            ref, follow=follow, tail=tail, since=since, until=until, stdout=stdout, stderr=stderr
        )
        return one_by_one(batches)

    def log_batches(
        self,
        ref: str,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        until: float | None = None,
        stdout: bool = True,
        stderr: bool = True,
    ) -> AsyncIterator[builtins.list[LogEntry]]:
        """The log as :meth:`logs` gives it, a file block's entries at a time."""
        return attach.log_batches(
            self.container(ref),
            follow=follow,
            tail=tail,
            since=since,
            until=until,
            stdout=stdout,
            stderr=stderr,
        )

    async def attach(
        self, ref: str, *, stdin: bool = False, logs: bool = False, stream: bool = True
    ) -> ProcessStream:
        # ``stdin`` is the client's business: its writes reach the workload either way.
        return attach.attach(self.registry, self.container(ref), logs=logs, stream=stream)

    async def resize(self, ref: str, rows: int, cols: int) -> None:
        await self.container(ref).resize(rows, cols)

    # -- exec -------------------------------------------------------------
    async def exec_create(self, ref: str, spec: ExecSpec, *, internal: bool = False) -> str:
        """Records an exec to start later (``internal``: husk's own, started at once)."""
        return self.exec_sessions.create(ref, spec, internal=internal)

    def exec_inspect(self, exec_id: str) -> ExecRecord:
        return self.exec_sessions.inspect(exec_id)

    def exec_check_startable(self, exec_id: str) -> None:
        """The refusals of :meth:`exec_start`, checked before anything starts."""
        self.exec_sessions.check_startable(exec_id)

    async def exec_start(self, exec_id: str) -> ProcessStream:
        return await self.exec_sessions.start(exec_id)

    async def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        await self.exec_sessions.resize(exec_id, rows, cols)

    async def exec_simple(
        self,
        ref: str,
        argv: builtins.list[str],
        timeout: float = 30.0,
        *,
        limit: int = MAX_COLLECTED_OUTPUT,
        truncate: bool = False,
    ) -> tuple[int, bytes, bytes]:
        """Runs a command to completion (health checks, tests); see ExecSessions.run_to_end."""
        return await self.exec_sessions.run_to_end(
            ref, argv, timeout, limit=limit, truncate=truncate
        )

    # -- introspection -------------------------------------------------------
    async def stats(self, ref: str) -> dict[str, Any]:
        return await self.container(ref).stats()

    async def top(self, ref: str) -> tuple[builtins.list[str], builtins.list[builtins.list[str]]]:
        return await self.container(ref).top()

    # A stopped container's files are served by a maintenance VM (see offline).
    async def stat_path(self, ref: str, path: str) -> dict[str, Any]:
        async with self.offline.files(self.container(ref)) as files:
            return await offline.within_deadline(archive.stat_path(files, path), "a path stat")

    async def get_archive(self, ref: str, path: str) -> tuple[AsyncIterator[bytes], dict[str, Any]]:
        """A tar stream of ``path`` in the container and its stat."""
        stack = contextlib.AsyncExitStack()
        files = await stack.enter_async_context(self.offline.files(self.container(ref)))
        try:
            chunks, info = await archive.get_archive(files, path)
        except BaseException:
            await stack.aclose()
            raise

        async def held() -> AsyncIterator[bytes]:
            async with stack:
                try:
                    async for chunk in chunks:
                        yield chunk
                finally:
                    await chunks.aclose()  # type: ignore[attr-defined]

        return held(), info

    async def put_archive(self, ref: str, path: str, data: AsyncIterator[bytes]) -> None:
        """Extracts a tar stream into the existing directory ``path`` in the container."""
        container = self.container(ref)
        offline.check_writable(container.record.spec, path)
        async with self.offline.files(container, writing=True) as files:
            await archive.put_archive(files, path, data)

    def export(self, ref: str) -> AsyncIterator[bytes]:
        """The container's whole file system as a tar stream (Docker's export)."""
        manager = self.offline.files(self.container(ref))
        return offline.streamed(manager, archive.export_root)

    async def changes(self, ref: str) -> builtins.list[dict[str, Any]]:
        """Docker's changes of the container against its image (``diff``)."""
        async with self.offline.files(self.container(ref)) as files:
            return await offline.within_deadline(archive.list_changes(files), "the changes")

    async def commit(self, ref: str, options: commit.CommitOptions) -> ImageRecord:
        """A new image of the container's changes on top of its image (``commit``)."""
        container = self.container(ref)
        image = await commit.commit_container(container, self.offline, self.images, options)
        self.events.container_event(container.record, "commit")
        return image

    def info(self) -> dict[str, Any]:
        """Facts about this husk installation, for ``husk info`` and the Docker API."""
        return info.info(self.containers, self.images)

    def disk_usage(self) -> dict[str, Any]:
        """Bytes really used on disk (sparse files count by allocated blocks)."""
        return info.disk_usage(self.containers, self.images)

    def port_mappings(self, ref: str) -> dict[str, builtins.list[dict[str, str]]]:
        return dict(self.get(ref).ports)

    def state_of(self, ref: str) -> ContainerState:
        return self.get(ref).state
