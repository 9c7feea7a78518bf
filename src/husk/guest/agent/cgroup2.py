"""The container's cgroup v2 group: the memory, CPU and pids limits of an OCI runtime's
container, which ``husk-runtime update`` changes while it runs (runc's, inside the VM).

husk-runtime asks for it in the RUN body (``cgroup``: the initial limits). The agent
mounts the unified hierarchy once at :data:`MOUNT`, makes the group :data:`GROUP` and
enables the controllers for it; every container process joins it in its forked child
(:meth:`husk.guest.agent.limits.Settings.join`), and the workload gets a cgroup namespace
rooted there with the hierarchy mounted read-only on its ``/sys/fs/cgroup``, as runc's
containers see theirs (``cat /sys/fs/cgroup/memory.max``).

The device cgroup (devices.py) is a v1 hierarchy; v1 and v2 hierarchies coexist, each
controller in one of them. A controller the v1 side holds (``pids`` when a husk
container sets ``pids_limit``) is simply not offered here.

Bodies name the group's files and their values as strings; the host
(husk.ociruntime.resources) checked them against the VM, they are checked again here
for their form only.
"""

from __future__ import annotations

import os
import re
from typing import Any

from husk.guest.agent import syscalls

MOUNT = "/run/husk/cgroup2"
GROUP = f"{MOUNT}/container"
CONTROLLERS = ("cpuset", "cpu", "memory", "pids")
CLONE_NEWCGROUP = 0x02000000

_NUMBER_OR_MAX = re.compile(r"max|[0-9]{1,19}")
_CPU_LIST = re.compile(r"[0-9]{1,4}(-[0-9]{1,4})?(,[0-9]{1,4}(-[0-9]{1,4})?){0,63}")
FILES: dict[str, re.Pattern[str]] = {
    # Written in this order: a cpuset's memory nodes before its CPUs, as runc does.
    "cpuset.mems": _CPU_LIST,
    "cpuset.cpus": _CPU_LIST,
    "cpu.weight": re.compile(r"[0-9]{1,5}"),
    "cpu.max": re.compile(r"(max|[0-9]{1,19}) [0-9]{1,19}"),
    "memory.low": _NUMBER_OR_MAX,
    "memory.high": _NUMBER_OR_MAX,
    "memory.max": _NUMBER_OR_MAX,
    "pids.max": _NUMBER_OR_MAX,
}


class CgroupError(ValueError):
    pass


def check(body: Any) -> dict[str, str]:
    """``body`` as {file: value}, every file one of :data:`FILES` with a value of its form."""
    if not isinstance(body, dict):
        raise CgroupError("cgroup limits must be an object")
    limits: dict[str, str] = {}
    for name, value in body.items():
        pattern = FILES.get(name)
        if pattern is None:
            raise CgroupError(f"cgroup file {name!r} cannot be set")
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise CgroupError(f"invalid value {value!r} for {name}")
        limits[name] = value
    return limits


def create(limits: dict[str, str]) -> int:
    """Mounts the hierarchy (once), makes the group with ``limits``; its cgroup.procs,
    open for writing (each container process writes 0 there to join)."""
    try:
        os.makedirs(MOUNT, exist_ok=True)
        if not os.path.ismount(MOUNT):
            flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
            try:
                # As for the device cgroup: joins without an RCU grace period each.
                syscalls.mount("cgroup2", MOUNT, "cgroup2", flags, "favordynmods")
            except OSError:
                syscalls.mount("cgroup2", MOUNT, "cgroup2", flags)
        with open(f"{MOUNT}/cgroup.controllers") as fh:
            available = fh.read().split()
        wanted = [name for name in CONTROLLERS if name in available]
        if wanted:
            with open(f"{MOUNT}/cgroup.subtree_control", "w") as fh:
                fh.write(" ".join(f"+{name}" for name in wanted))
        os.makedirs(GROUP, exist_ok=True)
    except OSError as exc:
        raise CgroupError(f"cannot make the container's cgroup: {exc.strerror or exc}") from None
    apply(limits)
    return os.open(f"{GROUP}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)


def apply(limits: dict[str, str], group: str = GROUP) -> dict[str, str]:
    """Writes ``limits`` into ``group`` (checked ones); returns what the files hold then."""
    for name in FILES:
        if name not in limits:
            continue
        path = f"{group}/{name}"
        if not os.path.exists(path):
            raise CgroupError(f"{name} is not available in the guest's cgroup")
        try:
            with open(path, "w") as fh:
                fh.write(limits[name])
        except OSError as exc:
            raise CgroupError(
                f"cannot set {name} to {limits[name]}: {exc.strerror or exc}"
            ) from None
    return current(group)


def current(group: str = GROUP) -> dict[str, str]:
    """The group's settable files and their values (those this kernel has)."""
    values: dict[str, str] = {}
    for name in FILES:
        try:
            with open(f"{group}/{name}") as fh:
                values[name] = fh.read().strip()
        except OSError:
            continue
    return values


def enter_namespace(root: str) -> None:  # pragma: no cover - forked child
    """In the workload (already in the group, in its new mount namespace): a cgroup
    namespace rooted at the group, and the hierarchy read-only on /sys/fs/cgroup."""
    syscalls.unshare(CLONE_NEWCGROUP)
    flags = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
    syscalls.mount("cgroup2", f"{root}/sys/fs/cgroup", "cgroup2", flags)
