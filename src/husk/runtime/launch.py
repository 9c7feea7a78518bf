"""A container's run: boot its VM through the sandbox layer, start its workload,
follow it, record its end, and start it again when its restart policy says so.

The :class:`Launcher` acts on :class:`~husk.runtime.container.Container` objects;
every status change goes through their ``transition()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from husk import paths
from husk.agent.client import AgentClient, GuestProcess, ProcessSpec
from husk.agent.messages import run_options
from husk.errors import Conflict, GuestError, HuskError, NotModified, StartFailed
from husk.guest.netconfig import GUEST_ADDRESS
from husk.oci.rootfs import ensure_rootfs_image
from husk.oci.store import ImageStore
from husk.runtime import overlay
from husk.runtime.container import (
    TRANSITIONS,
    VM_EXIT_GRACE,
    Container,
    Live,
    check_transition,
    push_clock,
)
from husk.runtime.cpu_pinning import pin as pin_vm_to_cpus
from husk.runtime.cpu_pinning import vcpus_for_cpuset
from husk.runtime.events import EventHub
from husk.runtime.execs import ExecTable
from husk.runtime.faults import describe_exception, guest_broke_protocol, start_exit_code
from husk.runtime.gateway import Gateway
from husk.runtime.health import CheckRunner, health_at_exit, health_at_start, run_health_checks
from husk.runtime.logs import write_in_slices
from husk.runtime.model import ContainerRecord, ContainerStatus, now_iso
from husk.runtime.mounts import MountRequest, plan_mounts
from husk.runtime.networking import LiveNetworking
from husk.runtime.ports import PortPublisher, reserve
from husk.runtime.registry import ContainerRegistry
from husk.runtime.restart import backoff, should_restart
from husk.runtime.socket_relay import socket_mode
from husk.runtime.streams import OutputBus
from husk.sandbox.pool import WarmPool
from husk.sandbox.provisioner import Provisioner
from husk.sandbox.sandbox import Sandbox, SandboxConfig
from husk.spec import PortBinding
from husk.vm.machine import ShareConfig, random_mac

log = logging.getLogger(__name__)

CLOCK_RESYNC_SECONDS = 300.0
Sockets = list[tuple[PortBinding, Any]]
"""Each published port's binding and the host socket reserved for it."""


def vm_dir(container_id: str) -> Path:
    """The state directory of a container's VM (sockets, console log, pid file)."""
    # Unix socket paths are limited to 107 bytes: a prefix of the id keeps them short.
    return paths.vms_dir() / container_id[:16]


def port_map(sockets: Sockets) -> dict[str, list[dict[str, str]]]:
    """Docker's NetworkSettings.Ports of the reserved host sockets."""
    mapping: dict[str, list[dict[str, str]]] = {}
    for binding, sock in sockets:
        host_ip, host_port = sock.getsockname()[:2]
        mapping.setdefault(binding.key(), []).append(
            {"HostIp": host_ip, "HostPort": str(host_port)}
        )
    return mapping


def has_health_check(record: ContainerRecord) -> bool:
    check = record.spec.healthcheck
    return check is not None and check.test[:1] not in (["NONE"], [])


class Launcher:
    """Starts containers, follows their runs to the end and restarts them by policy."""

    def __init__(
        self,
        *,
        registry: ContainerRegistry,
        images: ImageStore,
        execs: ExecTable,
        events: EventHub,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        boot_slots: asyncio.Semaphore,
        pool: Callable[[], WarmPool | None],
        closing: Callable[[], bool],
        auto_remove: Callable[[str], Awaitable[None]],
        run_check: CheckRunner,
        provisioner: Provisioner | None = None,
        gateway: Gateway | None = None,
    ) -> None:
        self._registry = registry
        self.gateway = gateway if gateway is not None else Gateway()
        """Where the daemon's VMs reach the host ports husk containers publish."""
        self.provisioner = provisioner
        """Makes the VMs (None: the process's QEMU provisioner; tests pass a fake one)."""
        self._images = images
        self._execs = execs
        self._events = events
        self._spawn = spawn
        self._boot_slots = boot_slots
        self._pool = pool
        self._closing = closing
        self._auto_remove = auto_remove
        self._run_check = run_check
        self.networking: LiveNetworking | None = None
        """Puts the VMs on their networks (set by the runtime once its network model exists)."""

    # -- start --------------------------------------------------------------------
    async def start(self, container: Container) -> None:
        """Starts the container; one whose start fails is removed if it is AutoRemove."""
        record = container.record
        launched = False
        try:
            async with container.lock:
                if record.state.running:
                    raise NotModified(f"container {record.name} is already running")
                if record.state.status is ContainerStatus.DEAD:
                    raise Conflict(
                        f"container {record.name} is dead ({record.state.error}); "
                        "it can only be removed"
                    )
                record.state.stopped_by_user = False
                launched = True
                await self.launch(container)
        except Exception:
            # As Docker does: `run --rm` of a command that cannot start leaves nothing
            # (its client waits for the removal). Done before answering, so a client
            # that lists the containers after the error finds none.
            if launched and record.spec.auto_remove:
                await self._remove_quietly(record)
            raise

    async def launch(self, container: Container) -> None:
        """Boots the VM, starts the workload and records the container as running."""
        record = container.record
        began = time.monotonic()
        stages: dict[str, float] = {}  # seconds from here to each step done (debug log)
        image = self._images.resolve(record.image_id)
        image_disk = await asyncio.to_thread(ensure_rootfs_image, self._images, image)
        stages["image"] = time.monotonic() - began
        sockets: Sockets = []
        sandbox: Sandbox | None = None
        listeners: list[tuple[int, str]] = []
        try:
            # A host port in use fails the start (as Docker's), before the VM boots.
            for binding in record.spec.ports:
                sockets.append((binding, reserve(binding)))
            mounts = await asyncio.to_thread(
                plan_mounts, record.spec, self._registry.store.directory(record.id)
            )
            stages["planned"] = time.monotonic() - began
            # Nothing mounted after PREPARE: a root-ready snapshot may stand in for it.
            plain = not mounts.requests and not mounts.shares and not record.spec.binds
            sandbox = await self._sandbox(record, image_disk, mounts.shares, root_ready=plain)
            stages["sandbox"] = time.monotonic() - began
            process, listeners = await self._start_workload(
                record,
                sandbox,
                mounts.requests,
                lambda stage: stages.setdefault(stage, time.monotonic() - began),
            )
        except BaseException as exc:
            for _, sock in sockets:
                sock.close()
            await self.gateway.leave(record.id)
            if sandbox is not None:
                with contextlib.suppress(Exception):
                    await sandbox.machine.kill()
            if self.networking is not None:
                await self.networking.unplug(record.id)
            message = describe_exception(exc)
            code = start_exit_code(exc)
            self.start_failed(container, code, message)
            if isinstance(exc, HuskError) and not isinstance(exc, GuestError):
                raise
            if isinstance(exc, Exception):  # a guest error, or a guest's reply that broke parsing
                raise StartFailed(
                    f"failed to start container {record.name}: {message}", code
                ) from None
            raise
        await self._record_started(container, sandbox, process, sockets, listeners)
        stages["recorded"] = time.monotonic() - began
        log.debug(
            "container %s started in %.3f s: %s",
            record.id[:12],
            stages["recorded"],
            ", ".join(f"{name} {at:.3f}" for name, at in stages.items()),
        )

    async def _sandbox(
        self,
        record: ContainerRecord,
        image_disk: Path,
        shares: list[ShareConfig],
        *,
        root_ready: bool = False,
    ) -> Sandbox:
        """A VM for ``record``: an idle one of the warm pool, else a cold boot."""
        record.mac_address = random_mac()
        config = SandboxConfig(
            state_dir=vm_dir(record.id),
            image_disk=image_disk,
            upper_disk=self._registry.store.directory(record.id) / "upper.ext4",
            hostname=record.spec.hostname or record.id[:12],
            mac=record.mac_address,
            cpus=record.spec.cpus or vcpus_for_cpuset(record.spec.cpuset_cpus),
            memory_bytes=record.spec.memory,
            shares=shares,
            use_template=record.spec.use_template,
            root_ready=root_ready,
        )
        if self.networking is not None:
            config.lan_ports = self.networking.plug_in
            config.egress = self.networking.egress_of(record)
            config.hosts_later = True  # networking.wire writes /etc/hosts before the run
        sandbox: Sandbox | None = None
        pool = self._pool()
        if pool is not None and config.use_template:
            sandbox = await pool.take(config)
        if sandbox is None:
            # Cold boots are CPU-bound (TCG): they queue for a few slots.
            async with self._boot_slots:
                sandbox = await Sandbox.boot(config, provisioner=self.provisioner)
        # Which start path served it (tests and benchmarks read this line).
        log.info(
            "container %s (%s): VM from %s%s",
            record.name,
            record.id[:12],
            sandbox.boot_path,
            " (root-ready snapshot)" if sandbox.root_ready else "",
        )
        return sandbox

    async def _start_workload(
        self,
        record: ContainerRecord,
        sandbox: Sandbox,
        mounts: list[MountRequest],
        stage: Callable[[str], object] = lambda _name: None,
    ) -> tuple[GuestProcess, list[tuple[int, str]]]:
        """The workload, and the guest listener of each unix-socket bind with its host socket.

        ``stage`` is told each step done ("mounted", "networked", "running").
        """
        if record.spec.cpuset_cpus:
            pin_vm_to_cpus(sandbox.machine.pid, record.spec.cpuset_cpus)
        for request in mounts:
            await sandbox.client.mount(timeout=request.timeout, **request.body)
        listeners = [
            (await sandbox.client.listen(b.target, socket_mode(b.socket)), b.socket)
            for b in record.spec.binds
            if b.socket
        ]
        stage("mounted")
        if self.networking is not None:
            await self.networking.wire(record, sandbox)
        else:
            await self.gateway.join(record.id, sandbox.machine.pid)
        stage("networked")
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
        stage("running")
        return process, listeners

    async def _record_started(
        self,
        container: Container,
        sandbox: Sandbox,
        process: GuestProcess,
        sockets: Sockets,
        listeners: list[tuple[int, str]],
    ) -> None:
        """Publishes the ports and saves the container as running, or undoes the start."""
        record = container.record
        publisher = PortPublisher(lambda: self.client_of(record.id), self.gateway, record.id)
        live = Live(sandbox=sandbox, process=process, publisher=publisher)
        for listener, host_socket in listeners:
            publisher.relay_socket(sandbox.client, listener, host_socket)
        state = record.state
        try:
            for binding, sock in sockets:
                await publisher.publish(binding, sock)
            record.ports = port_map(sockets)
            record.ip_address = GUEST_ADDRESS
            check_transition(state.status, ContainerStatus.RUNNING)  # before any fact changes
            state.pid = sandbox.machine.pid
            state.started_at = now_iso()
            state.error = ""
            state.exit_code = 0
            if record.spec.healthcheck and record.spec.healthcheck.test[:1] != ["NONE"]:
                state.health, state.failing_streak = health_at_start()
            for bind in record.spec.binds:
                # Copied up by this start: the volume is no longer new for later ones.
                bind.copy_up = False
            # Saved before the container counts as started: a VM that a restarted daemon
            # could not find through its record would run on unmanaged.
            container.transition(ContainerStatus.RUNNING, must_persist=True)
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
            container.transition(ContainerStatus.EXITED)
            raise StartFailed(f"failed to start container {record.name}: {state.error}") from None
        self.start_companions(container, live)
        container.event("start")
        if self.networking is not None:
            self.networking.member_changed(record)

    def start_failed(self, container: Container, code: int, message: str) -> None:
        """Records a start that failed as Docker does: the status stays (created, exited),
        State.ExitCode and State.Error say why; ``die`` fires and exit waiters are told."""
        state = container.record.state
        state.error = message
        state.exit_code = code
        container.persist()
        container.event("die", exitCode=str(code))
        container.exited(code)

    def client_of(self, container_id: str) -> AgentClient | None:
        """The guest client of the container's current run (ports forward through it)."""
        live = self._registry.live_of(container_id)
        return live.sandbox.client if live is not None else None

    def start_companions(self, container: Container, live: Live) -> None:
        """The tasks that live with a run: its monitor, clock and health checks."""
        container.live = live
        container.stopped.clear()
        bus = container.bus()
        live.tasks.append(self._spawn(self.monitor(container, live, bus)))
        live.tasks.append(self._spawn(self._resync_clock(live)))
        if has_health_check(container.record):
            live.tasks.append(self._spawn(run_health_checks(container, self._run_check)))
        # Events from before now are replayed at once: the pauses and resumes among them
        # were husk's own (a template restore, a re-attach), its I/O errors were not.
        live.pausing = True
        try:
            live.sandbox.machine.on_event(
                lambda name, data: container.on_vm_event(live, name, data)
            )
        finally:
            live.pausing = False

    async def adopt(self, container: Container, sandbox: Sandbox) -> None:
        """Takes over a running VM found at startup (the caller ends it if this fails)."""
        record = container.record
        process = _workload_of(sandbox)
        sockets: Sockets = []
        publisher = PortPublisher(lambda: self.client_of(record.id), self.gateway, record.id)
        try:
            for binding in record.spec.ports:
                current = record.ports.get(binding.key()) or []
                port = int(current[0]["HostPort"]) if current else binding.host_port
                host_ip = current[0]["HostIp"] if current else binding.host_ip
                wanted = PortBinding(binding.container_port, binding.protocol, host_ip, port)
                sockets.append((binding, reserve(wanted)))
            for binding, sock in sockets:
                await publisher.publish(binding, sock)
            await self._rewire_adopted(record, sandbox)
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
        self.start_companions(container, live)
        await overlay.restore(container, self.gateway)
        # A VM found paused by a host I/O error was resumed to talk to its agent: if
        # its disk is still full it stands paused again, which must show.
        self._spawn(container.check_unexpected_stop(live))

    async def _rewire_adopted(self, record: ContainerRecord, sandbox: Sandbox) -> None:
        """A VM found running again: its ports back on their networks, its gateway.

        Its guest kept its network state; a LAN the switch lost with a restart of its
        own cannot come back (logged), which never costs the container its run.
        """
        if self.networking is None:
            await self.gateway.join(record.id, sandbox.machine.pid)
            return
        try:
            await self.networking.wire(record, sandbox)
        except Exception as exc:
            log.warning("networks of %s not restored: %s", record.id[:12], describe_exception(exc))
            await self.gateway.join(record.id, sandbox.machine.pid)

    # -- the run and its end ---------------------------------------------------------
    async def monitor(self, container: Container, live: Live, bus: OutputBus) -> None:
        """Logs and fans out the workload's output until it ends, then finishes the run."""
        record = container.record
        logfile = container.log_file()
        code: int | None = None
        try:
            async for stream, data in live.process.output():
                await write_in_slices(logfile, stream, data, split_lines=not record.spec.tty)
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
        error = await end_reason(live, code, failure)
        # The VM died without reporting: a forced stop's fallback code.
        await self.finish(container, live, 137 if code is None else code, error=error)

    async def finish(self, container: Container, live: Live, code: int, error: str = "") -> None:
        """The container's session is over: release everything, record it, tell everyone.

        Every step is contained: whatever fails, the container ends up exited and
        its waiters and followers are released.
        """
        record = container.record
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
        self.mark_exited(container, code, error=error)
        live.exited.set()
        container.close_bus()
        container.event("die", exitCode=str(code))
        if live.stopping:
            container.event("stop")
        if self.networking is not None:
            # Its VM is gone (so are its ports, with QEMU's ends); the names it had go too.
            await self.networking.unplug(record.id)
            self.networking.member_changed(record)
        if record.spec.auto_remove:
            await self._remove_quietly(record)
            return
        self.restart_if_wanted(container)

    def mark_exited(self, container: Container, code: int, error: str = "") -> None:
        """Records the end of a run: exit code, time, health; waiters and followers told."""
        record = container.record
        state = record.state
        check_transition(state.status, ContainerStatus.EXITED)  # before any fact changes
        # Status and facts change together, and are saved once.
        state.exit_code = code
        state.finished_at = now_iso()
        state.pid = 0
        container.record.overlay = {}  # the guest's overlay ended with its VM
        if error:
            state.error = error
        state.health = health_at_exit(state.health)
        record.ports = {}
        container.transition(ContainerStatus.EXITED)
        self._execs.container_stopped(record.id)
        container.stopped.set()
        container.exited(code)

    async def _remove_quietly(self, record: ContainerRecord) -> None:
        try:
            await self._auto_remove(record.id)
        except Exception as exc:
            log.warning("auto-removal of %s failed: %s", record.id[:12], exc)
            container = self._registry.held(record.id)
            if container is not None:
                # `run --rm` clients wait for the removal: tell them it failed.
                container.removal_failed(describe_exception(exc))

    # -- restarts -----------------------------------------------------------------------
    def wants_restart(self, container: Container) -> bool:
        state = container.record.state
        return should_restart(
            container.record.spec.restart,
            exit_code=state.exit_code,
            restart_count=state.restart_count,
            stopped_by_user=state.stopped_by_user,
            daemon_closing=self._closing(),
        )

    def restart_if_wanted(self, container: Container) -> None:
        """Schedules the next start if the policy says so, after the back-off."""
        if self.wants_restart(container):
            delay = backoff(container.record.state.restart_count)
            self._spawn(self.restart_later(container.id, delay))

    async def restart_later(self, container_id: str, delay: float) -> None:
        """Waits ``delay`` seconds as ``restarting``, then starts the container again."""
        container = self._registry.find(container_id)
        if container is None or ContainerStatus.RESTARTING not in TRANSITIONS[container.status]:
            return  # removed, dead, or started by someone meanwhile
        container.transition(ContainerStatus.RESTARTING)
        await asyncio.sleep(delay)
        container = self._registry.find(container_id)
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
                await self.launch(container)
            except HuskError as exc:
                log.warning("restart of %s failed: %s", container_id[:12], exc)
                if container.status is ContainerStatus.RESTARTING:
                    container.transition(ContainerStatus.EXITED)
                self.restart_if_wanted(container)

    @staticmethod
    async def _resync_clock(live: Live) -> None:
        while True:
            await asyncio.sleep(CLOCK_RESYNC_SECONDS)
            await push_clock(live)


async def end_reason(live: Live, code: int | None, failure: str) -> str:
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


def _workload_of(sandbox: Sandbox) -> GuestProcess:
    """The workload session a re-attached guest's READY names."""
    sessions = sandbox.client.ready.get("sessions")
    if not isinstance(sessions, list):
        raise GuestError("the guest agent's READY lists no sessions")
    workload = next((s for s in sessions if isinstance(s, dict) and s.get("kind") == "run"), None)
    if workload is None:
        raise GuestError("the VM runs no workload")
    channel, pid = workload.get("channel"), workload.get("pid")
    if not (type(channel) is int and type(pid) is int and channel > 0 and pid > 0):
        raise GuestError(f"the guest agent's READY names its workload badly: {workload!r}"[:300])
    return sandbox.client.reattach(channel, pid)
