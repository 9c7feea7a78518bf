"""Processes a daemon started and a later daemon must find again: identified by pid + start time."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; tells a reused pid from ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def kill_if_same(pid: int, start_ticks: int | None) -> bool:
    """SIGKILLs ``pid`` if it is still the process that started at ``start_ticks``.

    The pidfd pins the process between the check and the signal, so a pid reused in
    between is never hit. True if a process was signalled.
    """
    if start_ticks is None:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if process_start_ticks(pid) != start_ticks:
            return False  # the pid belongs to another process now
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)
