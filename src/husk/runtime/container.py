"""One container: its record, its typed status and everything that lives with it.

A :class:`Container` owns what used to be spread over the runtime's dicts keyed
by id: the persisted record, the live VM handle while it runs, the lock that
orders its lifecycle operations, the output bus attached clients read, its log
file, the waiters of ``wait`` and the exec sessions it runs. Its status changes
only through :meth:`Container.transition`, which checks the change against
:data:`TRANSITIONS` and saves the record (atomically, by the store).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import signal as signals
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from husk.errors import Conflict, GuestError, HuskError, Internal
from husk.guest.protocol import MsgType
from husk.runtime.faults import (
    block_io_error,
    describe_exception,
    guest_broke_protocol,
)
from husk.runtime.logs import LogFile
from husk.runtime.model import ContainerStatus as ContainerStatus  # re-exported
from husk.runtime.streams import Chunk, OutputBus
from husk.spec import parse_signal
from husk.vm.machine import state_problem

if TYPE_CHECKING:
    from husk.agent.client import GuestProcess
    from husk.runtime.model import ContainerRecord
    from husk.runtime.ports import PortPublisher
    from husk.runtime.store import ContainerStore
    from husk.sandbox.sandbox import Sandbox

log = logging.getLogger(__name__)
_T = TypeVar("_T")

KILL_GRACE = 5.0
"""Seconds a workload has to end after SIGKILL before its VM is killed."""
VM_EXIT_GRACE = 2.0
"""How long a VM whose agent connection ended may take to exit before husk asks why not."""


_S = ContainerStatus
TRANSITIONS: dict[ContainerStatus, frozenset[ContainerStatus]] = {
    # started; a start whose record could not be saved is over at once; a restart
    # policy that applies at daemon start; removal.
    _S.CREATED: frozenset({_S.RUNNING, _S.EXITED, _S.RESTARTING, _S.REMOVING}),
    # paused (by husk, by a host I/O error, by someone else); the workload ended.
    _S.RUNNING: frozenset({_S.PAUSED, _S.EXITED}),
    # resumed; the VM ended while paused (kill, fault, a lost VM at daemon start).
    _S.PAUSED: frozenset({_S.RUNNING, _S.EXITED}),
    # the restart began; it was stopped, failed, or its VM was lost.
    _S.RESTARTING: frozenset({_S.RUNNING, _S.EXITED}),
    # started again; waiting to restart; a later exit recorded again (a VM found gone).
    _S.EXITED: frozenset({_S.RUNNING, _S.RESTARTING, _S.EXITED, _S.REMOVING}),
    # a removal that could not delete everything leaves the container dead.
    _S.REMOVING: frozenset({_S.DEAD}),
    # a dead container can only be removed.
    _S.DEAD: frozenset({_S.REMOVING}),
}


class IllegalTransition(Internal):
    """A status change the container's state machine does not allow (a husk bug)."""

    kind = "illegal_transition"

    def __init__(self, container_id: str, current: ContainerStatus, wanted: ContainerStatus):
        super().__init__(
            f"container {container_id[:12]} cannot go from {current.value} to {wanted.value}"
        )
        self.current = current
        self.wanted = wanted


def check_transition(current: ContainerStatus, wanted: ContainerStatus) -> None:
    """Raises :class:`IllegalTransition` (with an empty id) unless the table allows it."""
    if wanted not in TRANSITIONS[current]:
        raise IllegalTransition("", current, wanted)


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


@dataclass(frozen=True)
class Host:
    """What a container needs of its runtime: to announce events and to run tasks."""

    event: Callable[..., None]
    """``event(record, action, **attributes)``: a container event for subscribers."""
    spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]
    """Runs a background task that the runtime cancels at shutdown."""


def _no_event(*_args: Any, **_attributes: str) -> None:
    return None


def _detached_spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    return asyncio.get_running_loop().create_task(coro)


DETACHED = Host(event=_no_event, spawn=_detached_spawn)
"""For a container outside a runtime (tests)."""


class Container:
    """A container and its companions; the runtime creates, finds and removes these."""

    def __init__(
        self, record: ContainerRecord, store: ContainerStore, host: Host = DETACHED
    ) -> None:
        self.record = record
        self._store = store
        self._host = host
        self.directory: Path = store.directory(record.id)
        self.live: Live | None = None
        self.lock = asyncio.Lock()
        """Orders start, stop, restart and removal of this container."""
        self.exit_waiters: builtins.list[asyncio.Future[int]] = []
        self.removal_waiters: builtins.list[asyncio.Future[int]] = []
        self.exec_processes: dict[str, GuestProcess] = {}
        """Started exec sessions by exec id (for resize)."""
        self._stopped = asyncio.Event()
        if not self.status.running:
            self._stopped.set()
        self._bus: OutputBus | None = None
        self._log: LogFile | None = None

    # -- identity and state -------------------------------------------------
    @property
    def id(self) -> str:
        return self.record.id

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def status(self) -> ContainerStatus:
        return self.record.state.status

    @property
    def running(self) -> bool:
        return self.status.running

    def transition(
        self, wanted: ContainerStatus, *, must_persist: bool = False, persist: bool = True
    ) -> bool:
        """Moves to ``wanted`` if the table allows it, and saves the record.

        Raises :class:`IllegalTransition` (nothing changes) otherwise. The change
        stands even if the record cannot be saved (a full or read-only data
        directory): the next save that works writes it; False says it was not
        saved. With ``must_persist`` a failed save raises instead (a start must not
        count as done unless a restarted daemon can find it); with ``persist=False``
        the caller saves once the action it belongs to is done.
        """
        current = self.status
        if wanted not in TRANSITIONS[current]:
            raise IllegalTransition(self.id, current, wanted)
        self.record.state.status = wanted
        if not persist:
            return False
        if must_persist:
            self._store.save(self.record)
            return True
        return self.persist()

    def persist(self) -> bool:
        """Saves the record after a change that already happened; False (logged) on failure.

        A removed container (or one whose record is unreadable) is not written back.
        """
        if not self._store.holds(self.id) or self.id in self._store.unreadable:
            return False
        try:
            self._store.save(self.record)
        except HuskError as err:
            log.warning("%s (the container's state stands in memory only)", err)
            return False
        return True

    def event(self, action: str, **attributes: str) -> None:
        """Announces ``action`` of this container to the runtime's event subscribers."""
        self._host.event(self.record, action, **attributes)

    # -- companions -----------------------------------------------------------
    @property
    def stopped(self) -> asyncio.Event:
        """Cleared while a run is live, set once it has ended (log followers end on it)."""
        return self._stopped

    def bus(self) -> OutputBus:
        """The live output of the current run (a fresh bus once the last one closed)."""
        if self._bus is None or self._bus.closed:
            self._bus = OutputBus()
        return self._bus

    def log_file(self) -> LogFile:
        """One instance per container, so followers are woken by the writer."""
        if self._log is None:
            self._log = LogFile(self.directory / "container.log")
        return self._log

    def close_bus(self) -> None:
        if self._bus is not None:
            self._bus.close()

    # -- waiters --------------------------------------------------------------
    def add_waiter(self, *, removal: bool) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        (self.removal_waiters if removal else self.exit_waiters).append(future)
        return future

    def drop_waiter(self, future: asyncio.Future[int]) -> None:
        """Forgets a waiter whose client gave up."""
        for waiters in (self.exit_waiters, self.removal_waiters):
            if future in waiters:
                waiters.remove(future)

    def exited(self, code: int) -> None:
        """Answers every ``wait`` for the next exit."""
        waiters, self.exit_waiters = self.exit_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(code)

    def removed(self) -> None:
        """Answers every ``wait`` for the removal; the container is gone."""
        waiters, self.removal_waiters = self.removal_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(self.record.state.exit_code)

    def removal_failed(self, reason: str) -> None:
        """Answers every ``wait`` for the removal with why it failed (an AutoRemove the
        daemon could not finish): the container stays listed, the waiter must not hang."""
        waiters, self.removal_waiters = self.removal_waiters, []
        for future in waiters:
            if not future.done():
                future.set_exception(Internal(f"could not remove container {self.id}: {reason}"))

    # -- the live VM: guarded guest calls -----------------------------------------
    def require_live(self) -> Live:
        """The live run; Conflict unless the container runs (or is paused)."""
        live = self.live
        if live is None or self.status not in (ContainerStatus.RUNNING, ContainerStatus.PAUSED):
            raise Conflict(f"Container {self.id} is not running")
        return live

    async def guest_call(self, live: Live, what: str, call: Awaitable[_T]) -> _T:
        """Awaits a request to the guest; a guest that breaks the protocol ends its container."""
        try:
            return await call
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not guest_broke_protocol(exc):
                raise
            raise self._protocol_fault(live, what, exc) from None

    async def guest_stream(
        self, live: Live, what: str, stream: AsyncIterator[Chunk]
    ) -> AsyncIterator[Chunk]:
        """``stream`` (a guest session's output); a guest that breaks the protocol ends it."""
        try:
            async for item in stream:
                yield item
        except Exception as exc:
            if not guest_broke_protocol(exc):
                raise
            raise self._protocol_fault(live, what, exc) from None

    def _protocol_fault(self, live: Live, what: str, exc: Exception) -> GuestError:
        """Ends the container of a guest that broke the protocol; the error to raise."""
        reason = f"the guest agent broke the protocol during {what}: {describe_exception(exc)}"
        self.fault(live, reason)
        return GuestError(f"container {self.name}: {reason}; its VM was ended")

    # -- what the guest reports ------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        """The guest's figures and the VM's host figures (the last ones while paused)."""
        live = self.require_live()
        if self.status is ContainerStatus.PAUSED:
            # A paused guest cannot answer: its figures stand still, as its clock does.
            figures: dict[str, Any] = dict(live.last_stats)
        else:
            reply = await self.guest_call(live, "stats", live.sandbox.client.stats())
            # Numbers only: a process list the guest sends unasked is not kept.
            figures = {k: v for k, v in reply.items() if type(v) is int}
            live.last_stats = dict(figures)
        figures["vm_rss_bytes"] = live.sandbox.machine.rss_bytes()
        figures["vm_cpu_seconds"] = live.sandbox.machine.cpu_seconds()
        figures["time_ns"] = time.time_ns()
        return figures

    async def top(self) -> tuple[builtins.list[str], builtins.list[builtins.list[str]]]:
        """The container's processes, as ``docker top`` shows them by default."""
        rows = [
            [str(p["uid"]), str(p["pid"]), str(p["ppid"]), str(p["time"]), str(p["cmd"])]
            for p in await self.processes()
        ]
        return ["UID", "PID", "PPID", "TIME", "CMD"], rows

    async def processes(self) -> builtins.list[dict[str, int | str]]:
        """The container's processes as the guest lists them (pid, ppid, uid, time, cmd, comm).

        The guest chooses every value: only known keys of the expected types are kept.
        """
        live = self.require_live()

        async def process_list() -> builtins.list[dict[str, int | str]]:
            figures = await live.sandbox.client.request(MsgType.STATS, {"processes": True})
            listed = figures.get("processes")
            return (
                [_process_row(p) for p in listed if isinstance(p, dict)]
                if isinstance(listed, list)
                else []
            )

        return await self.guest_call(live, "top", process_list())

    async def resize(self, rows: int, cols: int) -> None:
        await self.require_live().process.resize(rows, cols)

    # -- faults of the VM -----------------------------------------------------------
    def on_vm_event(self, live: Live, name: str, data: Any) -> None:
        """Makes what the hypervisor reports visible in the container (QMP events).

        A guest panic or shutdown needs nothing here: QEMU exits, and the monitor
        task reports why (the machine keeps the panic and the shutdown reason).
        """
        if self.live is not live or not isinstance(data, dict):
            return
        if name == "BLOCK_IO_ERROR":
            message, paused = block_io_error(data, live.sandbox.disk_roles())
            self.show_vm_fault(live, message, paused=paused)
        elif name == "STOP" and not live.pausing and not live.io_paused:
            self._host.spawn(self.check_unexpected_stop(live))
        elif name == "RESUME" and not live.pausing and self.status is ContainerStatus.PAUSED:
            # Resumed by someone else than husk (a QMP client): the guest runs again.
            live.io_paused = False
            self.transition(ContainerStatus.RUNNING)
            self._host.event(self.record, "unpause")

    def show_vm_fault(self, live: Live, message: str, *, paused: bool) -> None:
        state = self.record.state
        newly_paused = paused and not live.io_paused
        if state.error == message and not newly_paused:
            return  # one failed request among many: already shown
        state.error = message
        log.warning("container %s: %s", self.id[:12], message)
        if newly_paused:
            live.io_paused = True
            if state.status is ContainerStatus.RUNNING:
                self.transition(ContainerStatus.PAUSED, persist=False)
                self._host.event(self.record, "pause")
        self.persist()  # on a full disk this fails, and says so in the log
        self._host.event(self.record, "io_error", error=message)

    async def check_unexpected_stop(self, live: Live) -> None:
        """A STOP husk did not ask for: find out why and show it."""
        try:
            status = await live.sandbox.machine.status()
        except Exception:
            return  # the VM is going away: the monitor reports why
        if live.pausing or live.io_paused or self.live is not live:
            return
        problem = state_problem(status)
        if status == "io-error":
            self.show_vm_fault(live, "the VM was paused by a host I/O error", paused=True)
        elif problem is not None:
            self.fault(live, problem)
        elif status == "paused" and self.status is ContainerStatus.RUNNING:
            self.transition(ContainerStatus.PAUSED)  # paused by someone else than husk
            self._host.event(self.record, "pause")

    def fault(self, live: Live, reason: str) -> None:
        """Ends a VM that cannot go on; the container exits with ``reason`` in State.Error."""
        if live.fault or self.live is not live:
            return
        live.fault = reason
        log.warning("container %s: %s; ending its VM", self.id[:12], reason)
        self._host.spawn(kill_vm(live))

    # -- pause, stop, kill ----------------------------------------------------------
    async def pause(self) -> None:
        live = self.require_live()
        if self.status is ContainerStatus.PAUSED:
            raise Conflict(f"Container {self.id} is already paused")
        live.pausing = True
        try:
            await live.sandbox.machine.pause()
        finally:
            live.pausing = False
        self.transition(ContainerStatus.PAUSED)
        self._host.event(self.record, "pause")

    async def unpause(self) -> None:
        live = self.require_live()
        if self.status is not ContainerStatus.PAUSED:
            raise Conflict(f"Container {self.id} is not paused")
        await self.resume(live)
        self._host.event(self.record, "unpause")

    async def resume(self, live: Live) -> None:
        """Resumes the VM; one paused on a host I/O error retries the failed write.

        The state is set before the VM runs: if the write fails again, the event
        that says so must find the container running, to pause it again.
        """
        state = self.record.state
        before = (state.status, state.error, live.io_paused)
        self.transition(ContainerStatus.RUNNING, persist=False)
        if live.io_paused:
            state.error = ""
            live.io_paused = False
        live.pausing = True
        try:
            await live.sandbox.machine.resume()
        except BaseException:
            if state.status is ContainerStatus.RUNNING:
                self.transition(before[0], persist=False)
                state.error, live.io_paused = before[1], before[2]
            raise
        finally:
            live.pausing = False
        self.persist()
        self._host.spawn(push_clock(live))  # the guest clock stood still while paused

    async def stop_live(self, live: Live, timeout: int | None, signal: str | None) -> None:
        """The stop signal, then SIGKILL after the grace time, then the VM itself."""
        record = self.record
        live.stopping = True
        if live.io_paused or live.fault:
            # The guest cannot run (paused on a host I/O error: resuming it only retries
            # the write that failed) or cannot be trusted: end its VM. The disk keeps
            # what was written before the error.
            await self.end_vm_now(live)
            return
        if self.status is ContainerStatus.PAUSED:
            await self.resume(live)
        grace = record.stop_timeout if timeout is None else timeout
        signum = parse_signal(signal or record.stop_signal)
        with contextlib.suppress(GuestError):
            await live.process.signal(signum)
        if grace < 0:  # Docker's -1: wait forever
            await live.exited.wait()
            return
        if await wait_exit(live, grace):
            return
        with contextlib.suppress(GuestError):
            await live.process.signal(int(signals.SIGKILL))
        if await wait_exit(live, KILL_GRACE):
            return
        log.warning("container %s ignored SIGKILL; killing its VM", self.id[:12])
        await self.end_vm_now(live)

    async def end_vm_now(self, live: Live) -> None:
        """Kills the VM and waits for the monitor to record the container's end."""
        await kill_vm(live)
        if not await wait_exit(live, KILL_GRACE + VM_EXIT_GRACE):
            log.error("container %s did not end after its VM was killed", self.id[:12])

    async def force_end(self, live: Live) -> None:
        """SIGKILL for the workload; the VM itself if the guest does not or cannot obey."""
        live.stopping = True
        if not (live.io_paused or live.fault):
            if self.status is ContainerStatus.PAUSED:
                with contextlib.suppress(Exception):
                    await self.resume(live)
            with contextlib.suppress(GuestError):
                await live.process.signal(int(signals.SIGKILL))
            if await wait_exit(live, KILL_GRACE):
                return
        await self.end_vm_now(live)

    async def kill(self, signal: str | int) -> None:
        """Sends ``signal`` to the workload; SIGKILL ends the container (its VM if need be)."""
        record = self.record
        signum = parse_signal(signal)
        live = self.require_live()
        if signum != signals.SIGKILL:
            if self.status is ContainerStatus.PAUSED:
                raise Conflict(
                    f"Container {record.id} is paused. Unpause the container before killing"
                )
            await live.process.signal(signum)
        else:
            record.state.stopped_by_user = True  # recorded when the container has exited
            live.stopping = True
            if live.io_paused or live.fault:
                await self.end_vm_now(live)
            else:
                try:
                    if self.status is ContainerStatus.PAUSED:
                        await self.resume(live)
                    await live.process.signal(signum)
                except GuestError as exc:
                    log.warning("kill of %s through its agent failed: %s", self.id[:12], exc)
                    await self.end_vm_now(live)
                else:
                    # As Docker's, a SIGKILL returns once the container has stopped (an
                    # inspect right after shows it exited), its "kill" event before the
                    # "die"; a guest that does not act on it loses its VM.
                    self._host.event(record, "kill", signal=str(signum))
                    await self._ensure_ended(live)
                    return
        self._host.event(record, "kill", signal=str(signum))

    async def _ensure_ended(self, live: Live) -> None:
        if not await wait_exit(live, KILL_GRACE):
            log.warning("container %s ignored SIGKILL; killing its VM", self.id[:12])
            await self.end_vm_now(live)


async def kill_vm(live: Live) -> None:
    try:
        await live.sandbox.machine.kill()
    except Exception as exc:
        log.error("could not kill a VM: %s", describe_exception(exc))


async def wait_exit(live: Live, timeout: float) -> bool:
    """Whether the run ended within ``timeout`` seconds."""
    try:
        await asyncio.wait_for(live.exited.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def push_clock(live: Live) -> None:
    """Sets the guest's clock to the host's (after a pause, and now and then)."""
    if live.io_paused:
        return
    try:
        await live.sandbox.client.set_time()
    except Exception as exc:  # a guest that went away is the monitor task's to report
        log.debug("clock push failed: %s", describe_exception(exc))


_PROCESS_INTS = ("pid", "ppid", "uid")
_PROCESS_TEXTS = ("time", "cmd", "comm")
_MAX_PROCESS_TEXT = 4096


def _process_row(listed: dict[str, Any]) -> dict[str, int | str]:
    """One process of the guest's list, with only known keys of the expected types."""
    row: dict[str, int | str] = {}
    for key in _PROCESS_INTS:
        value = listed.get(key)
        row[key] = value if type(value) is int else 0
    for key in _PROCESS_TEXTS:
        value = listed.get(key)
        row[key] = value[:_MAX_PROCESS_TEXT] if isinstance(value, str) else ""
    if not row["comm"]:
        row["comm"] = str(row["cmd"]).split(" ", 1)[0].rsplit("/", 1)[-1]
    return row
