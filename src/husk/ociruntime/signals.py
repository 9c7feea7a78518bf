"""Signal names and numbers as runc's kill takes them ("KILL", "SIGKILL", "9").

Apart from :func:`husk.spec.parse_signal` on purpose: every engine call is a fresh
``husk-runtime`` process, and importing husk.spec would add ~20 ms to each."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import NoReturn

from husk.ociruntime.errors import RuntimeFailure

# Signals whose default action does not end a process. Re-raising a stop signal (a
# workload that "died" of SIGTTIN, status 149) would leave the stand-in process stopped
# for ever, and its engine waiting; an ignored one would do nothing.
_NOT_FATAL = frozenset(
    {
        signal.SIGSTOP,
        signal.SIGTSTP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGCHLD,
        signal.SIGCONT,
        signal.SIGURG,
        signal.SIGWINCH,
    }
)


def parse(text: str) -> int:
    """The signal number ``text`` names; RuntimeFailure for anything else."""
    value = text.strip()
    if value.isdigit():
        number = int(value)
        if number in {int(s) for s in signal.Signals} or (
            signal.SIGRTMIN <= number <= signal.SIGRTMAX
        ):
            return number
        raise RuntimeFailure(f"unknown signal {text!r}")
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise RuntimeFailure(f"unknown signal {text!r}") from None


def exit_like(code: int) -> NoReturn:
    """Ends this process as the workload ended: dies of signal N for a status of 128+N
    when N is a signal that kills (without a core file), else exits with ``code``.

    ``code`` comes from the guest: a status that names a stop or ignored signal is an
    ordinary exit status here."""
    number = code - 128
    if 0 < number < 32 and number not in _NOT_FATAL:
        import resource  # only on this path

        with contextlib.suppress(Exception):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        with contextlib.suppress(Exception):  # SIGKILL's action cannot be set (nor caught)
            signal.signal(number, signal.SIG_DFL)
        with contextlib.suppress(Exception):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [number])
            os.kill(os.getpid(), number)
    os._exit(code & 0xFF)
