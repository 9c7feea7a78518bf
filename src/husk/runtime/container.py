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
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from husk.errors import HuskError, Internal

if TYPE_CHECKING:
    from husk.agent.client import GuestProcess
    from husk.runtime.model import ContainerRecord
    from husk.runtime.ports import PortPublisher
    from husk.runtime.sandbox import Sandbox
    from husk.runtime.store import ContainerStore

from husk.runtime.logs import LogFile
from husk.runtime.model import ContainerStatus
from husk.runtime.streams import OutputBus

log = logging.getLogger(__name__)


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


class Container:
    """A container and its companions; the runtime creates, finds and removes these."""

    def __init__(self, record: ContainerRecord, store: ContainerStore) -> None:
        self.record = record
        self._store = store
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
