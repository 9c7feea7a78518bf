"""The capabilities container processes may hold: Docker's default set, adjusted by the spec.

The workload and exec processes get this set as their bounding set before they
exec, so a root process ends up with exactly these capabilities and a non-root
one can never gain more (setuid-root or file-capability binaries included). The
archive child never execs: it sets its own sets directly, to what its job needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from husk.guest.agent import syscalls
from husk.guest.kernelnames import CAPABILITIES

NAMES = CAPABILITIES
NUMBERS = {name: number for number, name in enumerate(NAMES)}
ALL = frozenset(range(len(NAMES)))

DOCKER_DEFAULT = frozenset(
    NUMBERS[name]
    for name in (
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    )
)

# The archive child (husk cp, Docker's archive API): reading needs to pass every
# permission check; writing needs to create, own and mode files as the tar says.
ARCHIVE_READ = frozenset({NUMBERS["DAC_READ_SEARCH"]})
ARCHIVE_WRITE = frozenset(
    NUMBERS[name] for name in ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "MKNOD")
)


class CapabilityError(ValueError):
    pass


def _number(name: str) -> int:
    key = name.strip().upper()
    key = key[4:] if key.startswith("CAP_") else key
    if key not in NUMBERS:
        raise CapabilityError(f"unknown capability {name!r}")
    return NUMBERS[key]


def _names(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CapabilityError(f"{field} must be a list of capability names")
    return value


def from_spec(body: dict[str, Any]) -> frozenset[int]:
    """The container's set from a RUN body: Docker's default, ``cap_add``, ``cap_drop``.

    Docker's rules: "ALL" in cap_add starts from every capability, "ALL" in cap_drop
    from none (then cap_add adds back), and ``privileged`` means every capability.
    """
    if body.get("privileged") is True:
        return ALL
    added = _names(body.get("cap_add"), "cap_add")
    dropped = _names(body.get("cap_drop"), "cap_drop")
    result = set(DOCKER_DEFAULT)
    if any(name.upper() in ("ALL", "CAP_ALL") for name in dropped):
        result.clear()
    else:
        result -= {_number(name) for name in dropped}
    if any(name.upper() in ("ALL", "CAP_ALL") for name in added):
        result |= ALL
    else:
        result |= {_number(name) for name in added}
    return frozenset(result)


def mask(caps: Iterable[int]) -> int:
    value = 0
    for cap in caps:
        value |= 1 << cap
    return value


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return len(NAMES) - 1


LAST_CAP = _last_cap()


def limit_bounding(keep: frozenset[int]) -> None:
    """Drops every capability outside ``keep`` from the bounding set, before an exec.

    Also empties the ambient set. The inheritable set is already empty (the kernel
    starts PID 1 with none and the agent never adds any), so the exec'd program's
    sets are at most ``keep``, and a root program gets exactly ``keep``.
    """
    syscalls.drop_from_bounding_set([cap for cap in range(LAST_CAP + 1) if cap not in keep])
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)


def release_all() -> None:
    """For a non-root process that will not exec: no capability, for good.

    Its uid change already emptied its permitted and effective sets, and the bounding
    set was limited before it (which it could not change any more: that takes
    CAP_SETPCAP); what is left is making sure, and no new privileges."""
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    syscalls.capset(0, 0, 0)
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


def restrict_to(keep: frozenset[int]) -> None:
    """For a process that will not exec: holds ``keep`` only, for good (no new privileges)."""
    syscalls.drop_from_bounding_set([cap for cap in range(LAST_CAP + 1) if cap not in keep])
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    value = mask(keep)
    syscalls.capset(value, value, 0)
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
