"""Signal names and numbers as runc's kill takes them ("KILL", "SIGKILL", "9").

Apart from :func:`husk.spec.parse_signal` on purpose: every engine call is a fresh
``husk-runtime`` process, and importing husk.spec would add ~20 ms to each."""

from __future__ import annotations

import signal

from husk.ociruntime.errors import RuntimeFailure


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
