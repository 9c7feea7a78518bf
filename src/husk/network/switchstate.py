"""Where the switch lives in the run directory, and how a later daemon finds it again.

The switch writes ``switch.json`` (pid, process start time, socket) atomically once it
listens; a pid alone could be reused by another process after the switch died, so the
start time (clock ticks since boot, from /proc) is compared before trusting or signalling it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from husk import fileio

SOCKET_NAME = "switch.sock"
STATE_NAME = "switch.json"
LOCK_NAME = "switch.lock"
LOG_NAME = "switch.log"


def socket_path(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


def state_path(run_dir: Path) -> Path:
    return run_dir / STATE_NAME


def lock_path(run_dir: Path) -> Path:
    return run_dir / LOCK_NAME


def log_path(run_dir: Path) -> Path:
    return run_dir / LOG_NAME


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return int(text[text.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class SwitchRecord:
    """One switch process: who it is and where it listens."""

    pid: int
    started: int
    """Process start time in clock ticks since boot (with ``pid``: the process's identity)."""
    socket: str
    started_at: float = 0.0
    """Wall-clock start (seconds since the epoch), for people reading the file."""

    def alive(self) -> bool:
        """Whether this very process (not a later one with the same pid) still runs."""
        return process_start_ticks(self.pid) == self.started

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "started": self.started,
            "socket": self.socket,
            "started_at": self.started_at,
        }


def own_record(socket: Path) -> SwitchRecord:
    pid = os.getpid()
    return SwitchRecord(
        pid=pid, started=process_start_ticks(pid) or 0, socket=str(socket), started_at=time.time()
    )


def write_record(state_file: Path, record: SwitchRecord) -> None:
    fileio.write_json_atomic(state_file, record.to_json())


def read_record(state_file: Path) -> SwitchRecord | None:
    """The recorded switch, or None when there is no (readable, well-formed) record."""
    try:
        data = json.loads(state_file.read_bytes())
        return SwitchRecord(
            pid=int(data["pid"]),
            started=int(data["started"]),
            socket=str(data["socket"]),
            started_at=float(data.get("started_at", 0.0)),
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def forget_record(state_file: Path, record: SwitchRecord) -> None:
    """Remove the state file if it still describes ``record`` (not a successor's)."""
    if read_record(state_file) == record:
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()


def stop_switch(run_dir: Path, *, timeout: float = 5.0) -> bool:
    """SIGTERM the recorded switch (if it is still that process), wait, SIGKILL after ``timeout``.

    Synchronous: for tests and reset-like cleanup. True if a switch was signalled.
    """
    state_file = state_path(run_dir)
    record = read_record(state_file)
    if record is None:
        return False
    try:
        pidfd = os.pidfd_open(record.pid)
    except OSError:
        forget_record(state_file, record)
        return False
    try:
        # The pidfd pins the process: a pid reused after this check is never signalled.
        if not record.alive():
            forget_record(state_file, record)
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not _wait_exit(pidfd, timeout):
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            _wait_exit(pidfd, timeout)
    finally:
        os.close(pidfd)
    forget_record(state_file, record)
    return True


def _wait_exit(pidfd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))
