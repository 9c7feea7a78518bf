"""What a fault of one container's VM or guest means, in words a user can act on.

The runtime contains every fault to its container: the VM is ended if it cannot be
trusted or used any more, the container shows why (``State.Error``), and nothing
propagates to the daemon or to other containers. This module only classifies and
describes; the runtime acts.
"""

from __future__ import annotations

import errno
from typing import Any

from husk.errors import GuestError, HuskError
from husk.guest import protocol
from husk.guest.protocol import ProtocolError

DISK_FULL = "disk full: the host has no space left for the {what} ({path})"
"""Shown in State.Error while a VM stands paused on ENOSPC (see qemu.py's werror policy)."""

DISK_FULL_HINT = "; free space on the host, then unpause the container to retry, or stop it"


def guest_broke_protocol(exc: BaseException) -> bool:
    """True when ``exc`` says the guest sent something the protocol does not allow.

    Such a guest cannot be trusted with its session any more: its container ends.
    A GuestError that merely reports a failure or a timeout is not one; a typed
    GuestError may say it is by a true ``protocol_violation`` attribute. Anything
    that is no HuskError at all escaped from parsing the guest's data.
    """
    if isinstance(exc, ProtocolError):
        return True
    if isinstance(exc, HuskError):
        return bool(getattr(exc, "protocol_violation", False))
    return isinstance(exc, Exception)


def describe_exception(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, HuskError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def block_io_error(data: dict[str, Any], disks: dict[str, tuple[str, str]]) -> tuple[str, bool]:
    """(State.Error text, whether the VM was paused) of a QMP BLOCK_IO_ERROR event.

    ``disks`` maps QEMU's drive and node names to (what the disk is, its host path).
    """
    names = (str(data.get("device") or ""), str(data.get("node-name") or ""))
    what, path = next((disks[name] for name in names if name in disks), ("disk", "?"))
    paused = data.get("action") == "stop"
    if data.get("nospace") is True:
        message = DISK_FULL.format(what=what, path=path)
        return (message + DISK_FULL_HINT if paused else message), paused
    operation = str(data.get("operation") or "I/O")
    reason = str(data.get("reason") or "I/O error")
    message = f"host I/O error on the {what} ({path}): {operation} failed: {reason}"
    if paused:
        message += "; the VM is paused"
    return message, paused


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


EXIT_START_FAILED = 128
"""Docker's code for a container whose process could not be set up (user, mounts, …)."""
EXIT_EXEC_FAILED = 126
"""Docker's code for an exec that could not be started, unless its command is missing."""
_COMMAND_FAILURES = (protocol.ERROR_COMMAND_NOT_FOUND, protocol.ERROR_NOT_EXECUTABLE)


def start_exit_code(exc: BaseException) -> int:
    """The exit code Docker records for a container whose start failed with ``exc``.

    127 for a missing command and 126 for one that cannot run, as the guest typed
    them; any other failure (user, workdir, mounts, the VM itself) is 128.
    """
    if (
        isinstance(exc, GuestError)
        and exc.guest_kind in _COMMAND_FAILURES
        and exc.exit_code is not None
    ):
        return exc.exit_code
    return EXIT_START_FAILED


def exec_exit_code(exc: BaseException) -> int:
    """The exit code of an exec that could not be started: the guest's, else 126."""
    if isinstance(exc, GuestError) and exc.exit_code is not None:
        return exc.exit_code
    return EXIT_EXEC_FAILED
