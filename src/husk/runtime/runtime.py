"""The container lifecycle API: usable in-process, served by the daemon.

Each running container owns one sandbox (a VM with its agent). Records and logs
live on disk, so a restarted daemon re-attaches to VMs that kept running.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal as signals
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from husk import paths
from husk.agent.client import GuestProcess, ProcessSpec
from husk.agent.messages import run_options
from husk.errors import (
    Conflict,
    GuestError,
    HuskError,
    InvalidArgument,
    NotFound,
    StartFailed,
)
from husk.guest.protocol import MsgType
from husk.runtime.collect import (
    MAX_COLLECTED_OUTPUT,
    MAX_ERROR_OUTPUT,
    MAX_STAT_OUTPUT,
    CappedOutput,
)
from husk.runtime.cpu_pinning import pin as pin_vm_to_cpus
from husk.runtime.cpu_pinning import vcpus_for_cpuset
from husk.runtime.execs import ExecRecord, ExecTable
from husk.runtime.execs import ExecSpec as ExecSpec  # re-exported: callers build specs
from husk.runtime.faults import (
    block_io_error,
    describe_exception,
    guest_broke_protocol,
    vm_state_problem,
)
from husk.runtime.logs import LogEntry, LogFile
from husk.runtime.model import ContainerRecord, ContainerState, new_container_id, now_iso
from husk.runtime.names import random_name
from husk.runtime.ports import PortPublisher, reserve
from husk.runtime.sandbox import Sandbox, SandboxConfig
from husk.runtime.store import ContainerStore, StorageError, validate_name
from husk.runtime.streams import Chunk, OutputBus, ProcessStream
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
    from husk.runtime.pool import PoolShape, WarmPool

log = logging.getLogger(__name__)
_T = TypeVar("_T")

UPPER_DISK_BYTES = 8 * 1024**3
DEFAULT_STOP_TIMEOUT = 10
CLOCK_RESYNC_SECONDS = 300.0
RESTART_BACKOFF_START = 0.1
RESTART_BACKOFF_MAX = 60.0
KILL_GRACE = 5.0
# How long a VM whose agent connection ended may take to exit before husk asks why not.
VM_EXIT_GRACE = 2.0
_VM_DIR_NAME = re.compile(r"[0-9a-f]{16}")


def _archive_error(stderr: bytes) -> HuskError:
    message = stderr.decode(errors="replace").strip() or "archive operation failed"
    if message.startswith("Could not find"):
        return NotFound(message)
    return InvalidArgument(message)


async def _close(iterator: AsyncIterator[Any]) -> None:
    closer = getattr(iterator, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


async def _end_session(process: GuestProcess) -> None:
    """Releases a guest session; one that has not exited (cut short by husk) is killed first."""
    if process.exit_code is None:
        with contextlib.suppress(Exception):
            await process.signal(int(signals.SIGKILL))
    await process.release()


class NotModified(HuskError):
    http_status = 304
    kind = "not_modified"


@dataclass
class Event:
    type: str
    action: str
    id: str
    attributes: dict[str, str]
    time_nano: int


@dataclass
class Live:
    """In-memory companions of a running container."""

    sandbox: Sandbox
    process: GuestProcess
    publisher: PortPublisher
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: builtins.list[asyncio.Task[Any]] = field(default_factory=list)
    stopping: bool = False
    """husk is ending the container (stop, kill, rm): its end is no fault."""
    fault: str = ""
    """Why husk ends this VM on its own (a guest that broke the protocol, an unusable VM)."""
    io_paused: bool = False
    """The hypervisor paused the VM on a host I/O error (disk full), not husk."""
    pausing: bool = False
    """husk itself is pausing or resuming the VM (its STOP/RESUME events are expected)."""
    last_stats: dict[str, Any] = field(default_factory=dict)
    """The guest's latest figures, shown while it is paused."""


class Runtime:
    def __init__(self) -> None:
        from husk.oci.store import ImageStore

        self.images = ImageStore()
        self.containers = ContainerStore()
        self.live: dict[str, Live] = {}
        self.execs = ExecTable()
        self._exec_processes: dict[str, GuestProcess] = {}
        self._buses: dict[str, OutputBus] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._exit_waiters: dict[str, builtins.list[asyncio.Future[int]]] = {}
        self._removal_waiters: dict[str, builtins.list[asyncio.Future[int]]] = {}
        self._stopped_events: dict[str, asyncio.Event] = {}
        self._logs: dict[str, LogFile] = {}
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        # Cold boots are CPU-bound (TCG): running many at once only makes all of them
        # miss their deadlines, so they queue for a few slots instead.
        self._boot_slots = asyncio.Semaphore(max(2, 2 * (os.cpu_count() or 1)))
        self.pool: WarmPool | None = None

    # -- helpers ----------------------------------------------------------
    def _lock(self, container_id: str) -> asyncio.Lock:
        return self._locks.setdefault(container_id, asyncio.Lock())

    def _bus(self, container_id: str) -> OutputBus:
        bus = self._buses.get(container_id)
        if bus is None or bus.closed:
            bus = self._buses[container_id] = OutputBus()
        return bus

    def _stopped_event(self, container_id: str) -> asyncio.Event:
        event = self._stopped_events.get(container_id)
        if event is None:
            event = self._stopped_events[container_id] = asyncio.Event()
            record = self.containers._records.get(container_id)
            if record is None or not record.state.running:
                event.set()
        return event

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def log_file(self, container_id: str) -> LogFile:
        """One instance per container, so followers are woken by the writer."""
        logfile = self._logs.get(container_id)
        if logfile is None:
            path = self.containers.directory(container_id) / "container.log"
            logfile = self._logs[container_id] = LogFile(path)
        return logfile

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
        if record.id not in self.containers._records or record.id in self.containers.unreadable:
            return False
        try:
            self.containers.save(record)
        except HuskError as err:
            log.warning("%s (the container's state stands in memory only)", err)
            return False
        return True

    def get(self, ref: str) -> ContainerRecord:
        return self.containers.get(ref)

    def list(self, *, all: bool = False) -> builtins.list[ContainerRecord]:
        records = self.containers.all()
        return records if all else [r for r in records if r.state.running]

    # -- lifecycle of the daemon -------------------------------------------
    async def startup(self) -> None:
        """Re-attaches to VMs that kept running while no daemon was there; fills the pool."""
        from husk.runtime import pool

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
            policy = record.spec.restart.name
            wanted = policy == "always" or (
                policy == "unless-stopped" and not record.state.stopped_by_user
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
                137 if record.state.status in ("running", "paused") else 0,
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
        for container_id, live in list(self.live.items()):
            for task in live.tasks:
                task.cancel()
            await live.publisher.close()
            with contextlib.suppress(Exception):
                await live.sandbox.close()
            self.live.pop(container_id, None)

    # -- the warm pool ------------------------------------------------------
    async def configure_pool(self, size: int, shape: PoolShape, *, persist: bool = True) -> None:
        """Keeps ``size`` idle VMs for containers of ``shape`` (0: none); refills begin now."""
        from husk.runtime.pool import WarmPool, validate, write_settings
        from husk.runtime.templates import templates_enabled

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
            self.pool = WarmPool(size, shape, self._boot_slots)
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
                raise InvalidArgument(
                    f"bind source {bind.source} is a file: husk shares directories only (9p)"
                )
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
        record = self.get(ref)
        async with self._lock(record.id):
            if record.state.running:
                raise NotModified(f"container {record.name} is already running")
            if record.state.status == "dead":
                raise Conflict(
                    f"container {record.name} is dead ({record.state.error}); "
                    "it can only be removed"
                )
            record.state.stopped_by_user = False
            await self._launch(record)

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
                await sandbox.client.mount(
                    fstype="9p", source=f"bind{i}", target=bind.target, readonly=bind.readonly
                )
            for tmpfs in record.spec.tmpfs:
                await sandbox.client.mount(
                    fstype="tmpfs", source="tmpfs", target=tmpfs.target, options=tmpfs.options()
                )
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
            if sandbox is not None:
                with contextlib.suppress(Exception):
                    await sandbox.machine.kill()
            message = describe_exception(exc)
            record.state.error = message
            if "executable file not found" in message or "no such file" in message.lower():
                record.state.exit_code = 127
            elif "permission denied" in message:
                record.state.exit_code = 126
            else:
                record.state.exit_code = 128
            self._persist(record)
            if isinstance(exc, HuskError) and not isinstance(exc, GuestError):
                raise
            if isinstance(exc, Exception):  # a guest error, or a guest's reply that broke parsing
                raise StartFailed(f"failed to start container {record.name}: {message}") from None
            raise
        publisher = PortPublisher(lambda: self._client_of(record.id))
        live = Live(sandbox=sandbox, process=process, publisher=publisher)
        state = record.state
        try:
            for binding, sock in sockets:
                await publisher.publish(binding, sock)
            record.ports = self._port_map(record.spec.ports, sockets)
            record.ip_address = "10.0.2.15"
            state.status = "running"
            state.pid = sandbox.machine.pid
            state.started_at = now_iso()
            state.error = ""
            state.exit_code = 0
            if record.spec.healthcheck and record.spec.healthcheck.test[:1] != ["NONE"]:
                state.health = "starting"
                state.failing_streak = 0
            # Saved before the container counts as started: a VM that a restarted daemon
            # could not find through its record would run on unmanaged.
            self.containers.save(record)
        except Exception as err:
            with contextlib.suppress(Exception):
                await publisher.close()
            for _, sock in sockets:
                sock.close()
            with contextlib.suppress(Exception):
                await sandbox.discard()
            state.status, state.pid, state.exit_code = "exited", 0, 128
            state.error = describe_exception(err)
            record.ports = {}
            raise StartFailed(f"failed to start container {record.name}: {state.error}") from None
        self._start_companions(record, live)
        self._container_event(record, "start")

    def _client_of(self, container_id: str) -> Any:
        live = self.live.get(container_id)
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
        self.live[record.id] = live
        self._stopped_event(record.id).clear()
        bus = self._bus(record.id)
        live.tasks.append(self._spawn(self._monitor(record, live, bus)))
        live.tasks.append(self._spawn(self._resync_clock(live)))
        if record.spec.healthcheck and record.spec.healthcheck.test[:1] not in (["NONE"], []):
            from husk.runtime.health import run_health_checks

            live.tasks.append(self._spawn(run_health_checks(self, record, live)))
        # Events from before now are replayed at once: the pauses and resumes among them
        # were husk's own (a template restore, a re-attach), its I/O errors were not.
        live.pausing = True
        try:
            live.sandbox.machine.on_event(
                lambda name, data: self._on_vm_event(record, live, name, data)
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
        publisher = PortPublisher(lambda: self._client_of(record.id))
        try:
            for binding in record.spec.ports:
                current = record.ports.get(binding.key()) or []
                port = int(current[0]["HostPort"]) if current else binding.host_port
                host_ip = current[0]["HostIp"] if current else binding.host_ip
                wanted = PortBinding(binding.container_port, binding.protocol, host_ip, port)
                sockets.append((binding, reserve(wanted)))
            for binding, sock in sockets:
                await publisher.publish(binding, sock)
            if record.state.status == "paused":
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
        self._spawn(self._check_unexpected_stop(record, live))

    # -- faults of a running container's VM ---------------------------------
    def _on_vm_event(self, record: ContainerRecord, live: Live, name: str, data: Any) -> None:
        """Makes what the hypervisor reports visible in the container (QMP events).

        A guest panic or shutdown needs nothing here: QEMU exits, and the monitor
        task reports why (the machine keeps the panic and the shutdown reason).
        """
        if self.live.get(record.id) is not live or not isinstance(data, dict):
            return
        if name == "BLOCK_IO_ERROR":
            message, paused = block_io_error(data, live.sandbox.disk_roles())
            self._show_vm_fault(record, live, message, paused=paused)
        elif name == "STOP" and not live.pausing and not live.io_paused:
            self._spawn(self._check_unexpected_stop(record, live))
        elif name == "RESUME" and not live.pausing and record.state.status == "paused":
            # Resumed by someone else than husk (a QMP client): the guest runs again.
            live.io_paused = False
            record.state.status = "running"
            self._persist(record)
            self._container_event(record, "unpause")

    def _show_vm_fault(
        self, record: ContainerRecord, live: Live, message: str, *, paused: bool
    ) -> None:
        state = record.state
        newly_paused = paused and not live.io_paused
        if state.error == message and not newly_paused:
            return  # one failed request among many: already shown
        state.error = message
        log.warning("container %s: %s", record.id[:12], message)
        if newly_paused:
            live.io_paused = True
            if state.status == "running":
                state.status = "paused"
                self._container_event(record, "pause")
        self._persist(record)  # on a full disk this fails, and says so in the log
        self._container_event(record, "io_error", error=message)

    async def _check_unexpected_stop(self, record: ContainerRecord, live: Live) -> None:
        """A STOP husk did not ask for: find out why and show it."""
        try:
            status = await live.sandbox.machine.status()
        except Exception:
            return  # the VM is going away: the monitor reports why
        if live.pausing or live.io_paused or self.live.get(record.id) is not live:
            return
        problem = vm_state_problem(status)
        if status == "io-error":
            self._show_vm_fault(record, live, "the VM was paused by a host I/O error", paused=True)
        elif problem is not None:
            self._fault(record, live, problem)
        elif status == "paused" and record.state.status == "running":
            record.state.status = "paused"  # paused by someone else than husk
            self._persist(record)
            self._container_event(record, "pause")

    def _fault(self, record: ContainerRecord, live: Live, reason: str) -> None:
        """Ends a VM that cannot go on; its container exits with ``reason`` in State.Error."""
        if live.fault or self.live.get(record.id) is not live:
            return
        live.fault = reason
        log.warning("container %s: %s; ending its VM", record.id[:12], reason)
        self._spawn(self._kill_vm(live))

    @staticmethod
    async def _kill_vm(live: Live) -> None:
        try:
            await live.sandbox.machine.kill()
        except Exception as exc:
            log.error("could not kill a VM: %s", describe_exception(exc))

    async def _guest_call(
        self, record: ContainerRecord, live: Live, what: str, call: Awaitable[_T]
    ) -> _T:
        """Awaits a request to the guest; a guest that breaks the protocol ends its container."""
        try:
            return await call
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not guest_broke_protocol(exc):
                raise
            raise self._protocol_fault(record, live, what, exc) from None

    def _protocol_fault(
        self, record: ContainerRecord, live: Live, what: str, exc: Exception
    ) -> GuestError:
        """Ends the container of a guest that broke the protocol; the error to raise."""
        reason = f"the guest agent broke the protocol during {what}: {describe_exception(exc)}"
        self._fault(record, live, reason)
        return GuestError(f"container {record.name}: {reason}; its VM was ended")

    async def _guest_stream(
        self, record: ContainerRecord, live: Live, what: str, stream: AsyncIterator[Chunk]
    ) -> AsyncIterator[Chunk]:
        """``stream`` (a guest session's output); a guest that breaks the protocol ends it."""
        try:
            async for item in stream:
                yield item
        except Exception as exc:
            if not guest_broke_protocol(exc):
                raise
            raise self._protocol_fault(record, live, what, exc) from None

    async def _monitor(self, record: ContainerRecord, live: Live, bus: OutputBus) -> None:
        logfile = self.log_file(record.id)
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
        self.live.pop(record.id, None)
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
        self._bus(record.id).close()
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
        state.status = "exited"
        state.exit_code = code
        state.finished_at = now_iso()
        state.pid = 0
        if error:
            state.error = error
        if state.health:
            state.health = "unhealthy" if state.health == "unhealthy" else ""
        record.ports = {}
        self._persist(record)
        self.execs.container_stopped(record.id)
        self._stopped_event(record.id).set()
        for future in self._exit_waiters.pop(record.id, []):
            if not future.done():
                future.set_result(code)

    def _should_restart(self, record: ContainerRecord) -> bool:
        policy = record.spec.restart
        if self._closing or record.state.stopped_by_user:
            return False
        if policy.name in ("always", "unless-stopped"):
            return True
        if policy.name == "on-failure" and record.state.exit_code != 0:
            return not policy.max_retries or record.state.restart_count < policy.max_retries
        return False

    @staticmethod
    def _backoff(record: ContainerRecord) -> float:
        return float(
            min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_START * (2**record.state.restart_count))
        )

    async def _restart_later(self, container_id: str, delay: float) -> None:
        record = self.containers._records.get(container_id)
        if record is None or record.state.status == "dead":
            return
        record.state.status = "restarting"
        self._persist(record)
        await asyncio.sleep(delay)
        record = self.containers._records.get(container_id)
        if record is None or record.state.stopped_by_user:
            if record is not None and record.state.status == "restarting":
                record.state.status = "exited"
                self._persist(record)
            return
        async with self._lock(container_id):
            if record.state.status != "restarting":
                return
            record.state.restart_count += 1
            try:
                await self._launch(record)
            except HuskError as exc:
                log.warning("restart of %s failed: %s", container_id[:12], exc)
                record.state.status = "exited"
                self._persist(record)
                if self._should_restart(record):
                    self._spawn(self._restart_later(container_id, self._backoff(record)))

    async def _resync_clock(self, live: Live) -> None:
        while True:
            await asyncio.sleep(CLOCK_RESYNC_SECONDS)
            await self._push_clock(live)

    # -- stop, kill, restart, remove ----------------------------------------
    # Each acts first and records after: a full or read-only data directory must
    # never keep a container from being stopped, killed or removed.
    def _live(self, record: ContainerRecord) -> Live:
        live = self.live.get(record.id)
        if live is None or record.state.status not in ("running", "paused"):
            raise Conflict(f"Container {record.id} is not running")
        return live

    async def stop(self, ref: str, timeout: int | None = None, signal: str | None = None) -> None:
        record = self.get(ref)
        async with self._lock(record.id):
            if record.state.status == "restarting":
                record.state.stopped_by_user = True
                record.state.status = "exited"
                self._persist(record)
                return
            live = self.live.get(record.id)
            if live is None or not record.state.running:
                raise NotModified(f"container {record.name} is not running")
            record.state.stopped_by_user = True  # recorded when the container has exited
            await self._stop_live(record, live, timeout, signal)

    async def _stop_live(
        self, record: ContainerRecord, live: Live, timeout: int | None, signal: str | None
    ) -> None:
        live.stopping = True
        if live.io_paused or live.fault:
            # The guest cannot run (paused on a host I/O error: resuming it only retries
            # the write that failed) or cannot be trusted: end its VM. The disk keeps
            # what was written before the error.
            await self._end_vm_now(record, live)
            return
        if record.state.status == "paused":
            await self._resume(record, live)
        grace = record.stop_timeout if timeout is None else timeout
        signum = parse_signal(signal or record.stop_signal)
        with contextlib.suppress(GuestError):
            await live.process.signal(signum)
        if grace < 0:  # Docker's -1: wait forever
            await live.exited.wait()
            return
        if await self._wait_exit(live, grace):
            return
        with contextlib.suppress(GuestError):
            await live.process.signal(int(signals.SIGKILL))
        if await self._wait_exit(live, KILL_GRACE):
            return
        log.warning("container %s ignored SIGKILL; killing its VM", record.id[:12])
        await self._end_vm_now(record, live)

    async def _end_vm_now(self, record: ContainerRecord, live: Live) -> None:
        """Kills the VM and waits for the monitor to record the container's end."""
        await self._kill_vm(live)
        if not await self._wait_exit(live, KILL_GRACE + VM_EXIT_GRACE):
            log.error("container %s did not end after its VM was killed", record.id[:12])

    async def _force_end(self, record: ContainerRecord, live: Live) -> None:
        """SIGKILL for the workload; the VM itself if the guest does not or cannot obey."""
        live.stopping = True
        if not (live.io_paused or live.fault):
            if record.state.status == "paused":
                with contextlib.suppress(Exception):
                    await self._resume(record, live)
            with contextlib.suppress(GuestError):
                await live.process.signal(int(signals.SIGKILL))
            if await self._wait_exit(live, KILL_GRACE):
                return
        await self._end_vm_now(record, live)

    @staticmethod
    async def _wait_exit(live: Live, timeout: float) -> bool:
        try:
            await asyncio.wait_for(live.exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def restart(self, ref: str, timeout: int | None = None) -> None:
        record = self.get(ref)
        with contextlib.suppress(NotModified):
            await self.stop(record.id, timeout)
        await self.start(record.id)
        self._container_event(record, "restart")

    async def kill(self, ref: str, signal: str | int = "KILL") -> None:
        record = self.get(ref)
        signum = parse_signal(signal)
        live = self._live(record)
        if signum != signals.SIGKILL:
            if record.state.status == "paused":
                raise Conflict(
                    f"Container {record.id} is paused. Unpause the container before killing"
                )
            await live.process.signal(signum)
        else:
            record.state.stopped_by_user = True  # recorded when the container has exited
            live.stopping = True
            if live.io_paused or live.fault:
                await self._end_vm_now(record, live)
            else:
                try:
                    if record.state.status == "paused":
                        await self._resume(record, live)
                    await live.process.signal(signum)
                except GuestError as exc:
                    log.warning("kill of %s through its agent failed: %s", record.id[:12], exc)
                    await self._end_vm_now(record, live)
                else:
                    # Docker's kill returns once the signal is sent; a guest that does
                    # not act on it loses its VM.
                    self._spawn(self._ensure_ended(record, live))
        self._container_event(record, "kill", signal=str(signum))

    async def _ensure_ended(self, record: ContainerRecord, live: Live) -> None:
        if not await self._wait_exit(live, KILL_GRACE):
            log.warning("container %s ignored SIGKILL; killing its VM", record.id[:12])
            await self._end_vm_now(record, live)

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
        async with self._lock(record.id):
            live = self.live.get(record.id)
            if record.state.running or live is not None:
                if not force:
                    raise Conflict(
                        f"You cannot remove a {record.state.status} container {record.id}. "
                        "Stop the container before attempting removal or force remove"
                    )
                record.state.stopped_by_user = True
                if live is not None:
                    await self._force_end(record, live)
            # A VM left running by an earlier failure must not outlive its container.
            Sandbox.kill_recorded(self.vm_dir(record.id))
            self._delete_vm_dir(record.id)
            try:
                self.containers.delete(record.id)
            except HuskError as err:
                if record.id not in self.containers.unreadable:
                    record.state.status = "dead"
                    record.state.error = f"removal failed: {err}"
                    self._persist(record)
                raise StorageError(
                    f"cannot remove container {record.name}: {err}. It stays listed (dead); "
                    "remove it again once that is fixed"
                ) from None
            self.execs.container_removed(record.id)
        self._container_event(record, "destroy")
        for future in self._removal_waiters.pop(record.id, []):
            if not future.done():
                future.set_result(record.state.exit_code)
        self._locks.pop(record.id, None)
        self._buses.pop(record.id, None)
        self._logs.pop(record.id, None)
        self._stopped_events.pop(record.id, None)

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
        record = self.get(ref)
        live = self._live(record)
        if record.state.status == "paused":
            raise Conflict(f"Container {record.id} is already paused")
        live.pausing = True
        try:
            await live.sandbox.machine.pause()
        finally:
            live.pausing = False
        record.state.status = "paused"
        self._persist(record)
        self._container_event(record, "pause")

    async def unpause(self, ref: str) -> None:
        record = self.get(ref)
        live = self._live(record)
        if record.state.status != "paused":
            raise Conflict(f"Container {record.id} is not paused")
        await self._resume(record, live)
        self._container_event(record, "unpause")

    async def _resume(self, record: ContainerRecord, live: Live) -> None:
        """Resumes the VM; one paused on a host I/O error retries the failed write.

        The state is set before the VM runs: if the write fails again, the event
        that says so must find the container running, to pause it again.
        """
        state = record.state
        before = (state.status, state.error, live.io_paused)
        state.status = "running"
        if live.io_paused:
            state.error = ""
            live.io_paused = False
        live.pausing = True
        try:
            await live.sandbox.machine.resume()
        except BaseException:
            if state.status == "running":
                state.status, state.error, live.io_paused = before
            raise
        finally:
            live.pausing = False
        self._persist(record)
        self._spawn(self._push_clock(live))  # the guest clock stood still while paused

    @staticmethod
    async def _push_clock(live: Live) -> None:
        if live.io_paused:
            return
        try:
            await live.sandbox.client.set_time()
        except Exception as exc:  # a guest that went away is the monitor task's to report
            log.debug("clock push failed: %s", describe_exception(exc))

    # -- wait, rename -------------------------------------------------------
    async def wait(self, ref: str, condition: str = "not-running") -> int:
        record = self.get(ref)
        loop = asyncio.get_running_loop()
        if condition in ("not-running", ""):
            if not record.state.running:
                return record.state.exit_code
            waiters = self._exit_waiters
        elif condition == "next-exit":
            waiters = self._exit_waiters
        elif condition == "removed":
            waiters = self._removal_waiters
        else:
            raise InvalidArgument(
                f"invalid wait condition {condition!r}: use not-running, next-exit or removed"
            )
        future: asyncio.Future[int] = loop.create_future()
        pending = waiters.setdefault(record.id, [])
        pending.append(future)
        try:
            return await future
        finally:
            # A client that gave up (disconnected: its handler is cancelled) leaves nothing.
            if not future.done() or future.cancelled():
                with contextlib.suppress(ValueError):
                    pending.remove(future)
                if not pending and waiters.get(record.id) is pending:
                    del waiters[record.id]

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
            stopped=self._stopped_event(record.id),
        )

    async def attach(
        self, ref: str, *, stdin: bool = False, logs: bool = False, stream: bool = True
    ) -> ProcessStream:
        record = self.get(ref)
        queue = self._bus(record.id).subscribe() if stream else None
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
                self._bus(record.id).unsubscribe(queue)

        async def write_stdin(data: bytes) -> None:
            process = await self._workload_when_started(record.id)
            await process.write_stdin(data)

        async def close_stdin() -> None:
            live = self.live.get(record.id)
            if live is not None:
                with contextlib.suppress(GuestError):
                    await live.process.close_stdin()

        async def resize(rows: int, cols: int) -> None:
            await self.resize(record.id, rows, cols)

        def exit_code() -> int | None:
            current = self.containers._records.get(record.id)
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
            live = self.live.get(container_id)
            if live is not None:
                return live.process
            if time.monotonic() > deadline:
                raise Conflict(f"container {container_id} did not start within {timeout:.0f}s")
            await asyncio.sleep(0.05)

    async def resize(self, ref: str, rows: int, cols: int) -> None:
        record = self.get(ref)
        live = self._live(record)
        await live.process.resize(rows, cols)

    # -- exec -------------------------------------------------------------
    async def exec_create(self, ref: str, spec: ExecSpec, *, internal: bool = False) -> str:
        """Records an exec to start later (``internal``: husk's own, started at once)."""
        record = self.get(ref)
        if not spec.argv or not any(spec.argv):
            raise InvalidArgument("No exec command specified")
        if record.state.status == "paused":
            raise Conflict(f"Container {record.id} is paused, unpause the container first")
        self._live(record)
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
        self._live(self.get(execution.container_id))
        self.execs.check_can_start(execution)

    async def exec_start(self, exec_id: str) -> ProcessStream:
        self.exec_check_startable(exec_id)
        execution = self.exec_inspect(exec_id)
        container = self.get(execution.container_id)
        live = self._live(container)
        spec = execution.spec
        execution.started = True
        try:
            process = await self._guest_call(
                container,
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
            execution.exit_code = 127 if "not found" in str(err) else 126
            self.execs.finished(execution)
            raise
        execution.running = True
        execution.pid = process.pid
        self._exec_processes[execution.id] = process
        self._container_event(container, "exec_start: " + " ".join(spec.argv), execID=execution.id)

        async def output() -> AsyncIterator[Chunk]:
            try:
                async for item in self._guest_stream(container, live, "exec", process.output()):
                    yield item
            finally:
                self._exec_processes.pop(execution.id, None)
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
        process = self._exec_processes.get(execution.id)
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
            process = self._exec_processes.get(exec_id)
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
        record = self.get(ref)
        live = self._live(record)
        if record.state.status == "paused":
            # A paused guest cannot answer: its figures stand still, as its clock does.
            figures: dict[str, Any] = dict(live.last_stats)
        else:
            reply = await self._guest_call(record, live, "stats", live.sandbox.client.stats())
            # Numbers only: a process list the guest sends unasked is not kept.
            figures = {k: v for k, v in reply.items() if type(v) is int}
            live.last_stats = dict(figures)
        figures["vm_rss_bytes"] = live.sandbox.machine.rss_bytes()
        figures["vm_cpu_seconds"] = live.sandbox.machine.cpu_seconds()
        figures["time_ns"] = time.time_ns()
        return figures

    async def top(self, ref: str) -> tuple[builtins.list[str], builtins.list[builtins.list[str]]]:
        record = self.get(ref)
        live = self._live(record)

        async def process_list() -> builtins.list[builtins.list[str]]:
            figures = await live.sandbox.client.request(MsgType.STATS, {"processes": True})
            return [
                [str(p["uid"]), str(p["pid"]), str(p["ppid"]), str(p["time"]), str(p["cmd"])]
                for p in figures.get("processes") or []
            ]

        rows = await self._guest_call(record, live, "top", process_list())
        return ["UID", "PID", "PPID", "TIME", "CMD"], rows

    async def _archive(
        self, ref: str, path: str, mode: str
    ) -> tuple[GuestProcess, Callable[[AsyncIterator[Chunk]], AsyncIterator[Chunk]]]:
        """The guest's archive session, and a guard for its output (see _guest_stream)."""
        record = self.get(ref)
        live = self._live(record)
        process = await self._guest_call(
            record, live, "archive", live.sandbox.client.archive(path, mode)
        )

        def guarded(stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
            return self._guest_stream(record, live, "archive", stream)

        return process, guarded

    async def stat_path(self, ref: str, path: str) -> dict[str, Any]:
        process, guarded = await self._archive(ref, path, "stat")
        collected = CappedOutput(
            f"the stat of {path}", MAX_STAT_OUTPUT, error_limit=MAX_ERROR_OUTPUT
        )
        try:
            await collected.read(guarded(process.output()))
        finally:
            await _end_session(process)
        if process.exit_code != 0:
            raise _archive_error(collected.stderr)
        try:
            result = json.loads(collected.stdout)
        except ValueError:
            result = None
        if not isinstance(result, dict):
            raise GuestError(f"the guest answered a stat of {path} with something else")
        return result

    async def get_archive(self, ref: str, path: str) -> tuple[AsyncIterator[bytes], dict[str, Any]]:
        """A tar stream of ``path`` in the container and its stat."""
        info = await self.stat_path(ref, path)
        process, guarded = await self._archive(ref, path, "get")

        async def chunks() -> AsyncIterator[bytes]:
            errors = CappedOutput(f"the archive of {path}", MAX_ERROR_OUTPUT)
            try:
                async for stream, data in guarded(process.output()):
                    if stream == "stdout":
                        yield data
                    else:
                        errors.add(stream, data)
            finally:
                await _end_session(process)
            if process.exit_code:
                raise _archive_error(errors.stderr)

        return chunks(), info

    async def put_archive(self, ref: str, path: str, data: AsyncIterator[bytes]) -> None:
        """Extracts a tar stream into the existing directory ``path`` in the container."""
        process, guarded = await self._archive(ref, path, "put")
        collected = CappedOutput(f"the extraction into {path}", MAX_ERROR_OUTPUT)
        try:
            async for chunk in data:
                await process.write_stdin(chunk)
            await process.close_stdin()
            await collected.read(guarded(process.output()))
        finally:
            await _end_session(process)
        if process.exit_code != 0:
            raise _archive_error(collected.stderr)

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
            "running": sum(r.state.status == "running" for r in records),
            "paused": sum(r.state.status == "paused" for r in records),
            "stopped": sum(not r.state.running for r in records),
            "images": len(self.images.list_images()),
            "data_dir": str(paths.data_dir()),
            "bundle_digest": bundle_digest,
            "qemu_version": qemu,
            "accelerator": os.environ.get("HUSK_ACCEL", "auto"),
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
