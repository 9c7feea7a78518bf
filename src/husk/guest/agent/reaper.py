"""A small init for the container (``docker run --init``): PID 1 that forwards and reaps.

Without it the workload itself is PID 1 of its namespace: the kernel gives it only
the signals it handles, and orphans it never waits for stay zombies. With it, the
process that entered the container forks the workload and stays behind as PID 1,
as Docker's tini does: every signal it gets is passed on to the workload, every
orphan re-parented to it is reaped, and it exits with the workload's status.

It runs after entering the container, where no module can be imported: only
``os`` and ``signal``, already loaded. It drops to the workload's identity and
capabilities itself, so it holds nothing the workload does not.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

_FORWARDED = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def become_init(drop_privileges: Callable[[], None]) -> None:
    """Forks the workload; returns in it, and never returns in the init.

    The init closes every descriptor but stdio, the start-up error pipe among them:
    only the workload holds that, so the agent still hears of a failed exec, or of
    success when the pipe closes at exec.
    """
    # Blocked signals reach an init even without a handler (the kernel drops an
    # unhandled one otherwise); blocked before the fork, so none is lost meanwhile.
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    child = os.fork()
    if child == 0:
        # Its own process group, in the terminal's foreground if there is one (as tini
        # does): a ctrl-c reaches the workload once, not also through the init.
        os.setpgid(0, 0)
        if os.isatty(0):
            with contextlib.suppress(OSError):
                os.tcsetpgrp(0, os.getpid())  # SIGTTOU is still blocked here
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        return
    # Nothing of the agent's stays open in a process the container can see (the port,
    # the cgroup); only stdio, which the workload shares anyway.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    try:
        drop_privileges()
    except BaseException:
        os.kill(child, signal.SIGKILL)
        os._exit(126)
    _serve(child)


def _serve(child: int) -> None:  # pragma: no cover - runs as the container's PID 1
    while True:
        received = signal.sigwaitinfo(_FORWARDED).si_signo
        if received != signal.SIGCHLD:
            with contextlib.suppress(ProcessLookupError):  # exiting: its SIGCHLD is coming
                os.kill(child, received)
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                os._exit(0)
            if pid == 0:
                break
            if pid == child:
                code = os.waitstatus_to_exitcode(status)
                os._exit(128 - code if code < 0 else code)
