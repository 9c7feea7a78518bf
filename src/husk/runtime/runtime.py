"""The container lifecycle API: usable in-process, served by the daemon.

Each running container owns one sandbox (a VM with its agent). Records and logs
live on disk, so a restarted daemon re-attaches to VMs that kept running.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal as signals
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from husk import paths, settings
from husk.agent.client import ProcessSpec
from husk.agent.messages import run_options
from husk.errors import (
    Conflict,
    GuestError,
    HuskError,
    InvalidArgument,
    NotFound,
    NotModified,
    StartFailed,
)
from husk.guest.netconfig import GUEST_ADDRESS
from husk.runtime import archive
from husk.runtime.collect import (
    MAX_COLLECTED_OUTPUT,
    CappedOutput,
)
from husk.runtime.container import (
    TRANSITIONS,
    VM_EXIT_GRACE,
    Container,
    Host,
    check_transition,
    push_clock,
)
from husk.runtime.container import Live as Live  # re-exported: tests build them
from husk.runtime.cpu_pinning import pin as pin_vm_to_cpus
from husk.runtime.cpu_pinning import vcpus_for_cpuset
from husk.runtime.execs import ExecRecord, ExecTable
from husk.runtime.execs import ExecSpec as ExecSpec  # re-exported: callers build specs
from husk.runtime.faults import (
    describe_exception,
    exec_exit_code,
    guest_broke_protocol,
    start_exit_code,
)
from husk.runtime.gateway import Gateway
from husk.runtime.health import health_at_exit, health_at_start, run_health_checks
from husk.runtime.logs import LogEntry, LogFile
from husk.runtime.model import (
    ContainerRecord,
    ContainerState,
    ContainerStatus,
    new_container_id,
    now_iso,
)
from husk.runtime.names import random_name
from husk.runtime.ports import PortPublisher, reserve
from husk.runtime.restart import backoff, restart_at_daemon_start, should_restart
from husk.runtime.socket_relay import socket_mode, socket_source
from husk.runtime.store import ContainerStore, StorageError, validate_name
from husk.runtime.streams import Chunk, OutputBus, ProcessStream
from husk.sandbox.sandbox import Sandbox, SandboxConfig
from husk.spec import (
    ContainerSpec,
    PortBinding,
    image_exposed_ports,
    image_stop_signal,
    merge_env,
    parse_signal,
    plan_process,
)
from husk.vm.machine import ShareConfig, random_mac

if TYPE_CHECKING:
    from husk.sandbox.pool import PoolShape, WarmPool

log = logging.getLogger(__name__)
_T = TypeVar("_T")

UPPER_DISK_BYTES = 8 * 1024**3
DEFAULT_STOP_TIMEOUT = 10
CLOCK_RESYNC_SECONDS = 300.0
_VM_DIR_NAME = re.compile(r"[0-9a-f]{16}")


async def _close(iterator: AsyncIterator[Any]) -> None:
    closer = getattr(iterator, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


@dataclass
class Event:
    type: str
    action: str
    id: str
    attributes: dict[str, str]
    time_nano: int


class Runtime:
    def __init__(self) -> None:
        from husk.oci.store import ImageStore

        self.images = ImageStore()
        self.containers = ContainerStore()
        self._containers: dict[str, Container] = {}
        """The Container of each record, made when first needed, dropped on removal."""
        self._host = Host(event=self._container_event, spawn=self._spawn)
        self.execs = ExecTable()
        self.gateway = Gateway()
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        # Cold boots are CPU-bound (TCG): running many at once only makes all of them
        # miss their deadlines, so they queue for a few slots instead.
        self._boot_slots = asyncio.Semaphore(max(2, 2 * (os.cpu_count() or 1)))
        self.pool: WarmPool | None = None

    # -- the containers ---------------------------------------------------
    def container(self, ref: str) -> Container:
        """The container ``ref`` names: full id, name or unique id prefix (NotFound)."""
        return self._of(self.containers.get(ref))

    def _of(self, record: ContainerRecord) -> Container:
        container = self._containers.get(record.id)
        if container is not None and container.record is record:
            return container
        container = Container(record, self.containers, self._host)
        # A late caller holding a removed container's record gets a detached object:
        # nothing of a removed container is kept.
        if self.containers.holds(record.id):
            self._containers[record.id] = container
        return container

    def _find(self, container_id: str) -> Container | None:
        """The container of a full id, None once it is removed."""
        record = self.containers.find(container_id)
        return None if record is None else self._of(record)

    @property
    def live(self) -> dict[str, Live]:
        """The live VM handles of the running containers, by id (a snapshot)."""
        return {cid: c.live for cid, c in self._containers.items() if c.live is not None}

    def _live_of(self, record: ContainerRecord) -> Live | None:
        return self._of(record).live

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def log_file(self, container_id: str) -> LogFile:
        """One instance per container, so followers are woken by the writer."""
        return self.container(container_id).log_file()

    def vm_dir(self, container_id: str) -> Path:
        # Unix socket paths are limited to 107 bytes: a prefix of the id keeps them short.
        return paths.vms_dir() / container_id[:16]

    def emit(self, kind: str, action: str, obj_id: str, **attributes: str) -> None:
        event = Event(kind, action, obj_id, attributes, time.time_ns())
        for queue in self._subscribers:
            queue.put_nowait(event)

    def _container_event(self, record: ContainerRecord, action: str, **extra: str) -> None:
        self.emit("container", action, record.id, name=record.name, image=record.image_ref, **extra)

    async def subscribe(self) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    def _persist(self, record: ContainerRecord) -> bool:
        """Saves ``record`` after an action that already happened; False (logged) on failure.

        The action stands whether or not its record reaches the disk (a full or
        read-only data directory): the in-memory state is what inspect shows, and
        the next save that works writes it.
        """
        return self._of(record).persist()

    def _transition(self, record: ContainerRecord, status: ContainerStatus) -> None:
        self._of(record).transition(status)

    def get(self, ref: str) -> ContainerRecord:
        return self.containers.get(ref)

    def list(self, *, all: bool = False) -> builtins.list[ContainerRecord]:
        records = self.containers.all()
        return records if all else [r for r in records if r.state.running]

    # -- lifecycle of the daemon -------------------------------------------
    async def startup(self) -> None:
        """Re-attaches to VMs that kept running while no daemon was there; fills the pool."""
        from husk.sandbox import pool

        try:
            pool.remove_leftovers()
            size, shape = pool.read_settings()
            if size:
                await self.configure_pool(size, shape, persist=False)
        except Exception as exc:  # never a reason for the daemon not to start
            log.warning("no warm pool: %s", describe_exception(exc))
        # Each container is re-attached on its own: one VM that hangs or misbehaves
        # costs only its own deadline and its own container.
        running = [record for record in self.containers.all() if record.state.running]
        await asyncio.gather(*(self._reattach(record) for record in running))
        self._end_orphan_vms()
        for record in self.containers.all():
            wanted = restart_at_daemon_start(
                record.spec.restart, stopped_by_user=record.state.stopped_by_user
            )
            if not record.state.running and wanted:
                self._spawn(self._restart_later(record.id, 0.0))

    async def _reattach(self, record: ContainerRecord) -> None:
        """Adopts the VM of ``record`` at startup; any failure ends it and marks it exited."""
        sandbox: Sandbox | None = None
        try:
            logged = self.log_file(record.id).bytes_since(record.state.started_at)
            sandbox = await Sandbox.attach(self.vm_dir(record.id), resume={"run": logged})
            await self._adopt(record, sandbox)
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
            ended = Sandbox.kill_recorded(self.vm_dir(record.id))
            what = "ended it" if ended else "it was gone"
            self._mark_exited(
                record,
                137
                if record.state.status in (ContainerStatus.RUNNING, ContainerStatus.PAUSED)
                else 0,
                error=f"lost the VM across a daemon restart ({what}): {reason}",
            )
            return
        log.info("re-attached to container %s", record.id[:12])

    def _end_orphan_vms(self) -> None:
        """Ends VMs that no running container owns (e.g. a start whose record was never saved)."""
        base = paths.vms_dir()
        if not base.is_dir():
            return
        owned = {self.vm_dir(container_id).name for container_id in self.live}
        known = {self.vm_dir(record.id).name for record in self.containers.all()}
        for directory in base.iterdir():
            if not _VM_DIR_NAME.fullmatch(directory.name) or directory.name in owned:
                continue
            if Sandbox.kill_recorded(directory):
                log.warning("ended the VM in %s: no running container owns it", directory)
            if directory.name not in known:
                shutil.rmtree(directory, ignore_errors=True)

    async def shutdown(self) -> None:
        """Detaches from every VM and leaves it running (the pool's idle VMs end)."""
        self._closing = True
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        for task in list(self._background):
            task.cancel()
        for container in list(self._containers.values()):
            live = container.live
            if live is None:
                continue
            for task in live.tasks:
                task.cancel()
            await live.publisher.close()
            with contextlib.suppress(Exception):
                await live.sandbox.close()
            container.live = None

    # -- the warm pool ------------------------------------------------------
    async def configure_pool(self, size: int, shape: PoolShape, *, persist: bool = True) -> None:
        """Keeps ``size`` idle VMs for containers of ``shape`` (0: none); refills begin now."""
        from husk.sandbox.pool import WarmPool, validate, write_settings
        from husk.sandbox.templates import templates_enabled

        validate(size, shape)
        if size and not templates_enabled():
            raise InvalidArgument("a warm pool needs boot templates, which are disabled")
        if persist:
            write_settings(size, shape)
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
        from husk.oci.pull import pull

        record = await pull(
            reference, policy=policy, platform=platform, progress=progress, store=self.images
        )
        self.emit("image", "pull", reference, name=reference)
        return record

    def remove_image(self, reference: str, *, force: bool = False) -> Any:
        """``rmi``: refused while a container (even a stopped one) uses the image."""
        image = self.images.resolve(reference)
        users = [r for r in self.containers.all() if r.image_id == image.id]
        if users and not force:
            user = users[0]
            raise Conflict(
                f'conflict: unable to remove repository reference "{reference}" '
                f"(must force) - container {user.id[:12]} is using its referenced image "
                f"{image.id.removeprefix('sha256:')[:12]}"
            )
        result = self.images.remove_image(reference, force=force)
        for name in result.untagged:
            self.emit("image", "untag", image.id, name=name)
        for digest in result.deleted:
            self.emit("image", "delete", digest, name=digest)
        return result

    # -- create -----------------------------------------------------------
    async def create(self, spec: ContainerSpec, *, pull_policy: str = "missing") -> ContainerRecord:
        name = validate_name(spec.name) if spec.name else random_name(self.containers.names())
        if self.containers.find_by_name(name) is not None:
            existing = self.containers.find_by_name(name)
            assert existing is not None
            raise Conflict(
                f'the container name "/{name}" is already in use by container "{existing.id}". '
                "You have to remove (or rename) that container to be able to reuse that name."
            )
        self._validate(spec)
        image = await self.pull(spec.image, policy=pull_policy)
        plan = plan_process(spec, image.config)
        stop_signal = spec.stop_signal or image_stop_signal(image.config) or "SIGTERM"
        parse_signal(stop_signal)
        bindings = list(spec.ports)
        if spec.publish_all:
            published = {b.key() for b in bindings}
            for port in [*image_exposed_ports(image.config), *spec.exposed_ports]:
                number, _, proto = port.partition("/")
                binding = PortBinding(int(number), proto or "tcp")
                if binding.key() not in published:
                    bindings.append(binding)
                    published.add(binding.key())
        for binding in bindings:
            if binding.host_port:
                reserve(binding).close()  # fail now, not after the container exists
        record = ContainerRecord(
            id=new_container_id(),
            name=name,
            spec=spec,
            image_id=image.id,
            image_ref=spec.image,
            created=now_iso(),
            argv=plan.argv,
            env=plan.env,
            workdir=plan.workdir,
            user=plan.user,
            stop_signal=stop_signal,
            stop_timeout=spec.stop_timeout
            if spec.stop_timeout is not None
            else DEFAULT_STOP_TIMEOUT,
        )
        record.spec.ports = bindings
        directory = self.containers.directory(record.id)
        try:
            paths.ensure_private_dir(directory)
            await asyncio.to_thread(self._prepare_disks, record, image)
            self.containers.add(record)
        except BaseException as exc:
            self.containers.forget(record.id)
            if isinstance(exc, OSError):
                where = f" ({exc.filename})" if exc.filename else ""
                raise StorageError(
                    f"cannot create container {name}: {exc.strerror or exc}{where}"
                ) from exc
            raise
        self._container_event(record, "create")
        return record

    def _validate(self, spec: ContainerSpec) -> None:
        for bind in spec.binds:
            if not os.path.exists(bind.source):
                raise InvalidArgument(
                    f'invalid mount config for type "bind": bind source path does not exist: '
                    f"{bind.source}"
                )
            if not os.path.isdir(bind.source):
                bind.socket = socket_source(bind.source)  # refuses other files
        if spec.memory is not None and spec.memory < 6 * 1024 * 1024:
            raise InvalidArgument("Minimum memory limit allowed is 6MB")
        if spec.cpus is not None and spec.cpus <= 0:
            raise InvalidArgument(f"invalid number of CPUs: {spec.cpus}")
        if spec.healthcheck is not None and spec.healthcheck.test[:1] not in (
            ["CMD"],
            ["CMD-SHELL"],
            ["NONE"],
            [],
        ):
            raise InvalidArgument(f"invalid health check test {spec.healthcheck.test!r}")

    def _prepare_disks(self, record: ContainerRecord, image: Any) -> None:
        from husk.oci.rootfs import ensure_rootfs_image, make_ext4_disk

        ensure_rootfs_image(self.images, image)
        make_ext4_disk(self.containers.directory(record.id) / "upper.ext4", UPPER_DISK_BYTES)

    # -- start ------------------------------------------------------------
    async def start(self, ref: str) -> None:
        """Starts the container; one whose start fails is removed if it is AutoRemove."""
        record = self.get(ref)
        launched = False
        try:
            async with self._of(record).lock:
                if record.state.running:
                    raise NotModified(f"container {record.name} is already running")
                if record.state.status is ContainerStatus.DEAD:
                    raise Conflict(
                        f"container {record.name} is dead ({record.state.error}); "
                        "it can only be removed"
                    )
                record.state.stopped_by_user = False
                launched = True
                await self._launch(record)
        except Exception:
            # As Docker does: `run --rm` of a command that cannot start leaves nothing
            # (its client waits for the removal). Done before answering, so a client
            # that lists the containers after the error finds none.
            if launched and record.spec.auto_remove:
                try:
                    await self.remove(record.id, force=True)
                except Exception as exc:
                    log.warning("auto-removal of %s failed: %s", record.id[:12], exc)
            raise

    async def _launch(self, record: ContainerRecord) -> None:
        from husk.oci.rootfs import ensure_rootfs_image

        image = self.images.resolve(record.image_id)
        image_disk = await asyncio.to_thread(ensure_rootfs_image, self.images, image)
        sockets = [(b, reserve(b)) for b in record.spec.ports]
        sandbox: Sandbox | None = None
        try:
            shares = [
                ShareConfig(tag=f"bind{i}", path=Path(b.source), readonly=b.readonly)
                for i, b in enumerate(record.spec.binds)
                if not b.socket
            ]
            record.mac_address = random_mac()
            config = SandboxConfig(
                state_dir=self.vm_dir(record.id),
                image_disk=image_disk,
                upper_disk=self.containers.directory(record.id) / "upper.ext4",
                hostname=record.spec.hostname or record.id[:12],
                mac=record.mac_address,
                cpus=record.spec.cpus or vcpus_for_cpuset(record.spec.cpuset_cpus),
                memory_bytes=record.spec.memory,
                shares=shares,
                use_template=record.spec.use_template,
            )
            if self.pool is not None and config.use_template:
                sandbox = await self.pool.take(config)
            if sandbox is None:
                async with self._boot_slots:
                    sandbox = await Sandbox.boot(config)
            if record.spec.cpuset_cpus:
                pin_vm_to_cpus(sandbox.machine.pid, record.spec.cpuset_cpus)
            for i, bind in enumerate(record.spec.binds):
                if bind.socket:
                    continue
                await sandbox.client.mount(
                    fstype="9p", source=f"bind{i}", target=bind.target, readonly=bind.readonly
                )
            for tmpfs in record.spec.tmpfs:
                await sandbox.client.mount(
                    fstype="tmpfs", source="tmpfs", target=tmpfs.target, options=tmpfs.options()
                )
            listeners = [
                (await sandbox.client.listen(b.target, socket_mode(b.socket)), b.socket)
                for b in record.spec.binds
                if b.socket
            ]
            await self.gateway.join(record.id, sandbox.machine.pid)
            process = await sandbox.client.run(
                ProcessSpec(
                    argv=record.argv,
                    env=record.env,
                    cwd=record.workdir,
                    user=record.user,
                    tty=record.spec.tty,
                    stdin=record.spec.open_stdin,
                    privileged=record.spec.privileged,
                    init=record.spec.init,
                    options=run_options(record.spec),
                ),
                poweroff_on_exit=True,
            )
        except BaseException as exc:
            for _, sock in sockets:
                sock.close()
            await self.gateway.leave(record.id)
            if sandbox is not None:
                with contextlib.suppress(Exception):
                    await sandbox.machine.kill()
            message = describe_exception(exc)
            code = start_exit_code(exc)
            self._start_failed(record, code, message)
            if isinstance(exc, HuskError) and not isinstance(exc, GuestError):
                raise
            if isinstance(exc, Exception):  # a guest error, or a guest's reply that broke parsing
                raise StartFailed(
                    f"failed to start container {record.name}: {message}", code
                ) from None
            raise
        publisher = PortPublisher(lambda: self._client_of(record.id), self.gateway, record.id)
        live = Live(sandbox=sandbox, process=process, publisher=publisher)
        for listener, host_socket in listeners:
            publisher.relay_socket(sandbox.client, listener, host_socket)
        state = record.state
        try:
            for binding, sock in sockets:
                await publisher.publish(binding, sock)
            record.ports = self._port_map(record.spec.ports, sockets)
            record.ip_address = GUEST_ADDRESS
            check_transition(state.status, ContainerStatus.RUNNING)
            state.pid = sandbox.machine.pid
            state.started_at = now_iso()
            state.error = ""
            state.exit_code = 0
            if record.spec.healthcheck and record.spec.healthcheck.test[:1] != ["NONE"]:
                state.health, state.failing_streak = health_at_start()
            # Saved before the container counts as started: a VM that a restarted daemon
            # could not find through its record would run on unmanaged.
            self._of(record).transition(ContainerStatus.RUNNING, must_persist=True)
        except Exception as err:
            with contextlib.suppress(Exception):
                await publisher.close()
            for _, sock in sockets:
                sock.close()
            with contextlib.suppress(Exception):
                await sandbox.discard()
            state.pid, state.exit_code = 0, 128
            state.error = describe_exception(err)
            record.ports = {}
            self._of(record).transition(ContainerStatus.EXITED)
            raise StartFailed(f"failed to start container {record.name}: {state.error}") from None
        self._start_companions(record, live)
        self._container_event(record, "start")

    def _start_failed(self, record: ContainerRecord, code: int, message: str) -> None:
        """Records a start that failed as Docker does: the status stays (created, exited),
        State.ExitCode and State.Error say why; ``die`` fires and exit waiters are told."""
        record.state.error = message
        record.state.exit_code = code
        self._persist(record)
        self._container_event(record, "die", exitCode=str(code))
        self._of(record).exited(code)

    def _client_of(self, container_id: str) -> Any:
        container = self._containers.get(container_id)
        live = container.live if container is not None else None
        return live.sandbox.client if live is not None else None

    @staticmethod
    def _port_map(
        bindings: builtins.list[PortBinding], sockets: builtins.list[tuple[PortBinding, Any]]
    ) -> dict[str, builtins.list[dict[str, str]]]:
        mapping: dict[str, builtins.list[dict[str, str]]] = {}
        for binding, sock in sockets:
            host_ip, host_port = sock.getsockname()[:2]
            mapping.setdefault(binding.key(), []).append(
                {"HostIp": host_ip, "HostPort": str(host_port)}
            )
        return mapping

    def _start_companions(self, record: ContainerRecord, live: Live) -> None:
        container = self._of(record)
        container.live = live
        container.stopped.clear()
        bus = container.bus()
        live.tasks.append(self._spawn(self._monitor(record, live, bus)))
        live.tasks.append(self._spawn(self._resync_clock(live)))
        if record.spec.healthcheck and record.spec.healthcheck.test[:1] not in (["NONE"], []):
            live.tasks.append(self._spawn(run_health_checks(self, record, live)))
        # Events from before now are replayed at once: the pauses and resumes among them
        # were husk's own (a template restore, a re-attach), its I/O errors were not.
        live.pausing = True
        try:
            live.sandbox.machine.on_event(
                lambda name, data: container.on_vm_event(live, name, data)
            )
        finally:
            live.pausing = False

    async def _adopt(self, record: ContainerRecord, sandbox: Sandbox) -> None:
        """Takes over a running VM found at startup (the caller ends it if this fails)."""
        sessions = sandbox.client.ready.get("sessions")
        if not isinstance(sessions, builtins.list):
            raise GuestError("the guest agent's READY lists no sessions")
        workload = next(
            (s for s in sessions if isinstance(s, dict) and s.get("kind") == "run"), None
        )
        if workload is None:
            raise GuestError("the VM runs no workload")
        channel, pid = workload.get("channel"), workload.get("pid")
        if not (type(channel) is int and type(pid) is int and channel > 0 and pid > 0):
            raise GuestError(
                f"the guest agent's READY names its workload badly: {workload!r}"[:300]
            )
        process = sandbox.client.reattach(channel, pid)
        sockets: builtins.list[tuple[PortBinding, Any]] = []
        publisher = PortPublisher(lambda: self._client_of(record.id), self.gateway, record.id)
        try:
            for binding in record.spec.ports:
                current = record.ports.get(binding.key()) or []
                port = int(current[0]["HostPort"]) if current else binding.host_port
                host_ip = current[0]["HostIp"] if current else binding.host_ip
                wanted = PortBinding(binding.container_port, binding.protocol, host_ip, port)
                sockets.append((binding, reserve(wanted)))
            for binding, sock in sockets:
                await publisher.publish(binding, sock)
            await self.gateway.join(record.id, sandbox.machine.pid)
            if record.state.status is ContainerStatus.PAUSED:
                # Sandbox.attach resumed it for the handshake: the user's pause stands.
                await sandbox.machine.pause()
        except BaseException:
            with contextlib.suppress(Exception):
                await publisher.close()
            for _, sock in sockets:
                sock.close()
            raise
        live = Live(sandbox=sandbox, process=process, publisher=publisher)
        self._start_companions(record, live)
        # A VM found paused by a host I/O error was resumed to talk to its agent: if
        # its disk is still full it stands paused again, which must show.
        self._spawn(self._of(record).check_unexpected_stop(live))

    # -- faults of a running container's VM ---------------------------------
    async def _monitor(self, record: ContainerRecord, live: Live, bus: OutputBus) -> None:
        logfile = self._of(record).log_file()
        code: int | None = None
        try:
            async for stream, data in live.process.output():
                logfile.write(stream, data, split_lines=not record.spec.tty)
                await bus.publish(stream, data)  # waits while an attached client is full
            code = live.process.exit_code
        except asyncio.CancelledError:
            logfile.flush_partial()
            raise
        except Exception as exc:
            failure = describe_exception(exc)
            if guest_broke_protocol(exc):
                live.fault = live.fault or f"the guest agent broke the protocol: {failure}"
            elif not live.stopping:
                log.warning("lost the guest of %s: %s", record.id[:12], failure)
        else:
            failure = ""
        logfile.flush_partial()
        error = await self._end_reason(live, code, failure)
        # The VM died without reporting: a forced stop's fallback code.
        await self._finish(record, live, 137 if code is None else code, error=error)

    async def _end_reason(self, live: Live, code: int | None, failure: str) -> str:
        """Why the workload's session ended without husk asking ("" for a normal end).

        ``failure`` is what ended the session's output, if anything did.
        """
        if live.fault:
            return live.fault
        if code is not None or live.stopping:
            return ""
        machine = live.sandbox.machine
        with contextlib.suppress(Exception):
            await machine.wait(VM_EXIT_GRACE)
        try:
            machine.check_alive()
        except GuestError as err:
            return f"the VM ended unexpectedly: {err}"
        # The VM runs on, but its agent failed (or hung up): it cannot be managed any more.
        live.fault = f"the guest agent failed: {failure or 'it closed its connection'}"
        return live.fault

    async def _finish(
        self, record: ContainerRecord, live: Live, code: int, error: str = ""
    ) -> None:
        """The container's session is over: release everything, record it, tell everyone.

        Every step is contained: whatever fails, the container ends up exited and
        its waiters and followers are released.
        """
        container = self._of(record)
        if container.live is live:
            container.live = None
        with contextlib.suppress(Exception):
            live.sandbox.machine.on_event(None)
        current = asyncio.current_task()
        for task in live.tasks:
            if task is not current:
                task.cancel()
        with contextlib.suppress(Exception):
            await live.process.release()
        with contextlib.suppress(Exception):
            await live.publisher.close()
        try:
            if record.spec.auto_remove or live.fault or live.io_paused:
                # Nothing to flush that could be written: end the VM at once.
                await live.sandbox.discard()
            else:
                await live.sandbox.destroy(timeout=5.0)
        except Exception as exc:
            log.error("could not end the VM of %s: %s", record.id[:12], describe_exception(exc))
        self._mark_exited(record, code, error=error)
        live.exited.set()
        container.close_bus()
        self._container_event(record, "die", exitCode=str(code))
        if live.stopping:
            self._container_event(record, "stop")
        if record.spec.auto_remove:
            try:
                await self.remove(record.id, force=True)
            except Exception as exc:
                log.warning("auto-removal of %s failed: %s", record.id[:12], exc)
            return
        if self._should_restart(record):
            self._spawn(self._restart_later(record.id, self._backoff(record)))

    def _mark_exited(self, record: ContainerRecord, code: int, error: str = "") -> None:
        state = record.state
        container = self._of(record)
        # Status and facts change together, and are saved once.
        check_transition(state.status, ContainerStatus.EXITED)
        state.exit_code = code
        state.finished_at = now_iso()
        state.pid = 0
        if error:
            state.error = error
        state.health = health_at_exit(state.health)
        record.ports = {}
        container.transition(ContainerStatus.EXITED)
        self.execs.container_stopped(record.id)
        container.stopped.set()
        container.exited(code)

    def _should_restart(self, record: ContainerRecord) -> bool:
        return should_restart(
            record.spec.restart,
            exit_code=record.state.exit_code,
            restart_count=record.state.restart_count,
            stopped_by_user=record.state.stopped_by_user,
            daemon_closing=self._closing,
        )

    @staticmethod
    def _backoff(record: ContainerRecord) -> float:
        return backoff(record.state.restart_count)

    async def _restart_later(self, container_id: str, delay: float) -> None:
        container = self._find(container_id)
        if container is None or ContainerStatus.RESTARTING not in TRANSITIONS[container.status]:
            return  # removed, dead, or started by someone meanwhile
        container.transition(ContainerStatus.RESTARTING)
        await asyncio.sleep(delay)
        container = self._find(container_id)
        if container is None:
            return
        record = container.record
        if record.state.stopped_by_user:
            if container.status is ContainerStatus.RESTARTING:
                container.transition(ContainerStatus.EXITED)
            return
        async with container.lock:
            if container.status is not ContainerStatus.RESTARTING:
                return
            record.state.restart_count += 1
            try:
                await self._launch(record)
            except HuskError as exc:
                log.warning("restart of %s failed: %s", container_id[:12], exc)
                if container.status is ContainerStatus.RESTARTING:
                    container.transition(ContainerStatus.EXITED)
                if self._should_restart(record):
                    self._spawn(self._restart_later(container_id, self._backoff(record)))

    async def _resync_clock(self, live: Live) -> None:
        while True:
            await asyncio.sleep(CLOCK_RESYNC_SECONDS)
            await push_clock(live)

    # -- stop, kill, restart, remove ----------------------------------------
    # Each acts first and records after: a full or read-only data directory must
    # never keep a container from being stopped, killed or removed.
    async def stop(self, ref: str, timeout: int | None = None, signal: str | None = None) -> None:
        record = self.get(ref)
        container = self._of(record)
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
        self._container_event(record, "restart")

    async def kill(self, ref: str, signal: str | int = "KILL") -> None:
        await self.container(ref).kill(signal)

    async def remove(self, ref: str, *, force: bool = False) -> None:
        """Ends the container if ``force``, then deletes its files, its record last.

        Succeeds only once the record is gone: a removal that cannot delete
        something says what, and leaves the container listed as dead with the
        reason, so that a later ``rm -f`` can finish it.
        """
        try:
            record = self.get(ref)
        except NotFound:
            if len(ref) == 64 and all(c in "0123456789abcdef" for c in ref):
                return  # removing a removed container (by full id) is not an error
            raise
        container = self._of(record)
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
            # A VM left running by an earlier failure must not outlive its container.
            Sandbox.kill_recorded(self.vm_dir(record.id))
            self._delete_vm_dir(record.id)
            unreadable = record.id in self.containers.unreadable
            if not unreadable and ContainerStatus.REMOVING in TRANSITIONS[container.status]:
                container.transition(ContainerStatus.REMOVING)
            try:
                self.containers.delete(record.id)
            except HuskError as err:
                if container.status is ContainerStatus.REMOVING:
                    record.state.error = f"removal failed: {err}"
                    container.transition(ContainerStatus.DEAD)
                raise StorageError(
                    f"cannot remove container {record.name}: {err}. It stays listed (dead); "
                    "remove it again once that is fixed"
                ) from None
            self.execs.container_removed(record.id)
        self._container_event(record, "destroy")
        container.removed()
        # Everything the container owned goes with it (lock, bus, logs, waiters).
        if self._containers.get(record.id) is container:
            del self._containers[record.id]

    def _delete_vm_dir(self, container_id: str) -> None:
        """The VM's runtime files (sockets, console log); what stays is swept at startup."""

        def note(_function: object, path: str, exc_info: Any) -> None:
            log.warning("could not delete %s: %s", path, exc_info[1])

        if self.vm_dir(container_id).exists():
            shutil.rmtree(self.vm_dir(container_id), onerror=note)

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

    # -- pause ------------------------------------------------------------
    async def pause(self, ref: str) -> None:
        await self.container(ref).pause()

    async def unpause(self, ref: str) -> None:
        await self.container(ref).unpause()

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
        self._container_event(record, "rename", oldName="/" + old)

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
        record = self.get(ref)
        streams = tuple(s for s, on in (("stdout", stdout), ("stderr", stderr)) if on)
        return self.log_file(record.id).entries(
            follow=follow,
            tail=tail,
            since=since,
            until=until,
            streams=streams,
            stopped=self._of(record).stopped,
        )

    async def attach(
        self, ref: str, *, stdin: bool = False, logs: bool = False, stream: bool = True
    ) -> ProcessStream:
        record = self.get(ref)
        container = self._of(record)
        queue = container.bus().subscribe() if stream else None
        # The log's end is fixed now, with the subscription: no output is lost or shown
        # twice; the entries themselves are read from disk as the client takes them.
        past = self.log_file(record.id).entries(follow=False) if logs else None

        async def output() -> AsyncIterator[Chunk]:
            if past is not None:
                async for entry in past:
                    yield entry.stream, entry.data
            if queue is None:
                return
            try:
                while (item := await queue.get()) is not None:
                    yield item
            finally:
                container.bus().unsubscribe(queue)

        async def write_stdin(data: bytes) -> None:
            process = await self._workload_when_started(record.id)
            await process.write_stdin(data)

        async def close_stdin() -> None:
            live = container.live
            if live is not None:
                with contextlib.suppress(GuestError):
                    await live.process.close_stdin()

        async def resize(rows: int, cols: int) -> None:
            await self.resize(record.id, rows, cols)

        def exit_code() -> int | None:
            current = self.containers.find(record.id)
            if current is None or current.state.running:
                return None
            return current.state.exit_code

        return ProcessStream(
            tty=record.spec.tty,
            output=output,
            write_stdin=write_stdin,
            close_stdin=close_stdin,
            resize=resize,
            exit_code=exit_code,
        )

    async def _workload_when_started(self, container_id: str, timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            container = self._containers.get(container_id)
            live = container.live if container is not None else None
            if live is not None:
                return live.process
            if time.monotonic() > deadline:
                raise Conflict(f"container {container_id} did not start within {timeout:.0f}s")
            await asyncio.sleep(0.05)

    async def resize(self, ref: str, rows: int, cols: int) -> None:
        await self.container(ref).resize(rows, cols)

    # -- exec -------------------------------------------------------------
    async def exec_create(self, ref: str, spec: ExecSpec, *, internal: bool = False) -> str:
        """Records an exec to start later (``internal``: husk's own, started at once)."""
        record = self.get(ref)
        if not spec.argv or not any(spec.argv):
            raise InvalidArgument("No exec command specified")
        if record.state.status is ContainerStatus.PAUSED:
            raise Conflict(f"Container {record.id} is paused, unpause the container first")
        self._of(record).require_live()
        exec_id = secrets.token_hex(32)
        self.execs.add(ExecRecord(exec_id, record.id, spec), internal=internal)
        self._container_event(record, "exec_create: " + " ".join(spec.argv), execID=exec_id)
        return exec_id

    def exec_inspect(self, exec_id: str) -> ExecRecord:
        return self.execs.get(exec_id)

    def exec_check_startable(self, exec_id: str) -> None:
        """The refusals of :meth:`exec_start`, checked before anything starts."""
        execution = self.exec_inspect(exec_id)
        if execution.started:
            raise Conflict(f"exec {exec_id} has already been started")
        self.container(execution.container_id).require_live()
        self.execs.check_can_start(execution)

    async def exec_start(self, exec_id: str) -> ProcessStream:
        self.exec_check_startable(exec_id)
        execution = self.exec_inspect(exec_id)
        container = self.get(execution.container_id)
        live = self._of(container).require_live()
        spec = execution.spec
        execution.started = True
        try:
            process = await self._of(container).guest_call(
                live,
                "exec",
                live.sandbox.client.exec(
                    ProcessSpec(
                        argv=spec.argv,
                        env=merge_env(container.env, spec.env),
                        cwd=spec.workdir or container.workdir,
                        user=spec.user or container.user,
                        tty=spec.tty,
                        stdin=spec.stdin,
                    )
                ),
            )
        except BaseException as err:
            # As Docker records it: 127 for a missing command, 126 when it cannot run.
            execution.exit_code = exec_exit_code(err)
            self.execs.finished(execution)
            raise
        execution.running = True
        execution.pid = process.pid
        processes = self._of(container).exec_processes
        processes[execution.id] = process
        self._container_event(container, "exec_start: " + " ".join(spec.argv), execID=execution.id)

        async def output() -> AsyncIterator[Chunk]:
            try:
                async for item in self._of(container).guest_stream(live, "exec", process.output()):
                    yield item
            finally:
                processes.pop(execution.id, None)
                if process.exit_code is not None:
                    execution.exit_code = process.exit_code
                    self._container_event(
                        container, "exec_die", execID=execution.id, exitCode=str(process.exit_code)
                    )
                self.execs.finished(execution)
                await process.release()

        return ProcessStream(
            tty=spec.tty,
            output=output,
            write_stdin=process.write_stdin,
            close_stdin=process.close_stdin,
            resize=process.resize,
            exit_code=lambda: process.exit_code,
        )

    async def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        execution = self.exec_inspect(exec_id)
        owner = self._containers.get(execution.container_id)
        process = owner.exec_processes.get(execution.id) if owner is not None else None
        if process is None or not execution.running:
            raise Conflict(f"exec {exec_id} is not running")
        await process.resize(rows, cols)

    async def exec_simple(
        self,
        ref: str,
        argv: builtins.list[str],
        timeout: float = 30.0,
        *,
        limit: int = MAX_COLLECTED_OUTPUT,
        truncate: bool = False,
    ) -> tuple[int, bytes, bytes]:
        """Runs a command to completion (health checks, tests).

        At most ``limit`` bytes of each stream are kept: beyond, the command is killed
        and :class:`OutputTooLarge` raised, or with ``truncate`` the rest is read and
        dropped (a health check's output, of which Docker keeps the start).
        """
        exec_id = await self.exec_create(ref, ExecSpec(argv=argv), internal=True)
        collected = CappedOutput(f"the output of {argv[0]!r}", limit, truncate=truncate)
        try:
            stream = await self.exec_start(exec_id)
            process = self.container(ref).exec_processes.get(exec_id)
            output = stream.output()
            try:
                await asyncio.wait_for(collected.read(output), timeout)
            finally:
                # Too much output, or too slow: the command is not left running behind.
                if process is not None and process.exit_code is None:
                    with contextlib.suppress(Exception):
                        await process.signal(int(signals.SIGKILL))
                await _close(output)
            code = stream.exit_code
        finally:
            self.execs.discard(exec_id)
        return (code if code is not None else -1), collected.stdout, collected.stderr

    # -- introspection -------------------------------------------------------
    async def stats(self, ref: str) -> dict[str, Any]:
        return await self.container(ref).stats()

    async def top(self, ref: str) -> tuple[builtins.list[str], builtins.list[builtins.list[str]]]:
        return await self.container(ref).top()

    async def stat_path(self, ref: str, path: str) -> dict[str, Any]:
        return await archive.stat_path(self.container(ref), path)

    async def get_archive(self, ref: str, path: str) -> tuple[AsyncIterator[bytes], dict[str, Any]]:
        """A tar stream of ``path`` in the container and its stat."""
        return await archive.get_archive(self.container(ref), path)

    async def put_archive(self, ref: str, path: str, data: AsyncIterator[bytes]) -> None:
        """Extracts a tar stream into the existing directory ``path`` in the container."""
        await archive.put_archive(self.container(ref), path, data)

    def info(self) -> dict[str, Any]:
        """Facts about this husk installation, for ``husk info`` and the Docker API."""
        import platform

        from husk.bundle import locate
        from husk.errors import BundleError
        from husk.vm.machine import host_cpu_count, host_memory_mib
        from husk.vm.qemu import qemu_version

        records = self.containers.all()
        try:
            bundle_digest = locate().digest
        except BundleError as exc:
            bundle_digest = f"missing ({exc})"
        try:
            qemu = qemu_version()
        except HuskError as exc:
            qemu = f"unavailable ({exc})"
        return {
            "containers": len(records),
            "running": sum(r.state.status is ContainerStatus.RUNNING for r in records),
            "paused": sum(r.state.status is ContainerStatus.PAUSED for r in records),
            "stopped": sum(not r.state.running for r in records),
            "images": len(self.images.list_images()),
            "data_dir": str(paths.data_dir()),
            "bundle_digest": bundle_digest,
            "qemu_version": qemu,
            "accelerator": settings.accel_requested(),
            "kernel": platform.release(),
            "os": platform.platform(),
            "cpus": host_cpu_count(),
            "memory_bytes": host_memory_mib() * 1024 * 1024,
            "hostname": platform.node(),
        }

    def disk_usage(self) -> dict[str, Any]:
        """Bytes really used on disk (sparse files count by allocated blocks)."""

        def allocated(path: Path) -> int:
            total = 0
            for root, _dirs, files in os.walk(path):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(root, name)).st_blocks * 512
            return total

        containers = {
            r.id: allocated(self.containers.directory(r.id)) for r in self.containers.all()
        }
        return {
            "images_bytes": self.images.disk_usage(),
            "rootfs_cache_bytes": allocated(paths.data_dir() / "rootfs"),
            "containers": containers,
            "containers_bytes": sum(containers.values()),
        }

    def port_mappings(self, ref: str) -> dict[str, builtins.list[dict[str, str]]]:
        return dict(self.get(ref).ports)

    def state_of(self, ref: str) -> ContainerState:
        return self.get(ref).state
