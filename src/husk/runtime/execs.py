"""The exec records of the running containers, bounded as Docker bounds them.

Any local client can create execs in a loop, each record holding up to a few MiB
of command and environment (the API's limits). So: created-but-not-started execs
are capped per container (a clear 409 beyond), and so are running ones; a finished
exec is kept only for a while, for ``exec inspect`` to read its exit code, and only
the newest few per container; a container's pending execs go when it stops, and
all of them when it is removed.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from husk.errors import Conflict, NotFound

MAX_PENDING_EXECS = 64
"""Created and not yet started, per container."""
MAX_RUNNING_EXECS = 128
"""Started and not yet ended, per container: each holds a guest channel whose inbox
may buffer up to the channel's limit while its client is slow."""
MAX_FINISHED_EXECS = 64
"""Finished execs kept for inspection, per container (the newest)."""
FINISHED_EXEC_TTL = 300.0
"""Seconds a finished exec stays inspectable (Docker's exec GC ran every 5 minutes)."""


@dataclass
class ExecSpec:
    argv: builtins.list[str]
    env: builtins.list[str] = field(default_factory=list)
    user: str = ""
    workdir: str = ""
    tty: bool = False
    stdin: bool = False
    detach_keys: str = ""


@dataclass
class ExecRecord:
    id: str
    container_id: str
    spec: ExecSpec
    running: bool = False
    exit_code: int | None = None
    pid: int = 0
    started: bool = False
    """Set when a start begins: a second start is refused even while the first is under way."""
    finished_at: float | None = None
    """When it ended (the table's clock); None while pending or running."""
    internal: bool = False
    """husk's own (a health check): not counted against, nor refused by, the limits."""

    @property
    def pending(self) -> bool:
        return not self.started


class ExecTable:
    """Exec records by id; every addition first drops what has expired."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: dict[str, ExecRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, exec_id: object) -> bool:
        return exec_id in self._records

    def add(self, record: ExecRecord, *, internal: bool = False) -> None:
        """Registers a created exec; refused when its container has too many pending.

        ``internal`` execs (husk's own: health checks) are started at once and do not
        count against the clients' limit.
        """
        self.prune()
        record.internal = internal
        if not internal:
            pending = sum(
                1
                for other in self._records.values()
                if other.container_id == record.container_id
                and other.pending
                and not other.internal
            )
            if pending >= MAX_PENDING_EXECS:
                raise Conflict(
                    f"container {record.container_id} already has {pending} execs created and "
                    f"not started (the limit is {MAX_PENDING_EXECS}): start them, or stop the "
                    "container, before creating more"
                )
        self._records[record.id] = record

    def get(self, exec_id: str) -> ExecRecord:
        """By full id, or by a prefix naming one exec (as Docker accepts)."""
        record = self._records.get(exec_id)
        if record is None:
            matches = [r for k, r in self._records.items() if exec_id and k.startswith(exec_id)]
            if len(matches) != 1:
                raise NotFound(f"No such exec instance: {exec_id}")
            record = matches[0]
        return record

    def check_can_start(self, record: ExecRecord) -> None:
        """Refuses a start while the container runs too many execs already."""
        if record.internal:
            return
        running = sum(
            1
            for other in self._records.values()
            if other.container_id == record.container_id
            and other.started
            and other.finished_at is None
            and not other.internal
        )
        if running >= MAX_RUNNING_EXECS:
            raise Conflict(
                f"container {record.container_id} already runs {running} execs (the limit is "
                f"{MAX_RUNNING_EXECS}): wait for some to end before starting more"
            )

    def ids_of(self, container_id: str) -> builtins.list[str]:
        return [r.id for r in self._records.values() if r.container_id == container_id]

    def finished(self, record: ExecRecord) -> None:
        """``record`` ended (or failed to start): it ages out from now."""
        record.running = False
        record.finished_at = self._clock()
        self.prune()

    def discard(self, exec_id: str) -> None:
        self._records.pop(exec_id, None)

    def container_stopped(self, container_id: str) -> None:
        """Pending execs of a stopped container can never start: they go (as in Docker)."""
        for exec_id, record in list(self._records.items()):
            if record.container_id == container_id and record.pending:
                del self._records[exec_id]

    def container_removed(self, container_id: str) -> None:
        for exec_id, record in list(self._records.items()):
            if record.container_id == container_id:
                del self._records[exec_id]

    def prune(self) -> None:
        """Drops finished execs past their time, and all but the newest few per container."""
        now = self._clock()
        kept: dict[str, builtins.list[ExecRecord]] = {}
        for exec_id, record in list(self._records.items()):
            if record.finished_at is None:
                continue
            if now - record.finished_at > FINISHED_EXEC_TTL:
                del self._records[exec_id]
            else:
                kept.setdefault(record.container_id, []).append(record)
        for records in kept.values():
            if len(records) > MAX_FINISHED_EXECS:
                records.sort(key=lambda r: r.finished_at or 0.0)
                for record in records[: len(records) - MAX_FINISHED_EXECS]:
                    del self._records[record.id]
