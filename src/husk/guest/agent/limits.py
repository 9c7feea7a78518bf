"""The container's process settings from the RUN body: Docker's HostConfig, inside the guest.

Some apply once, by the agent, before the workload starts (sysctls, the size of
/dev/shm, /etc/hosts and /etc/resolv.conf, the pids cgroup); the rest in every
container process the agent forks, the workload and each exec alike, before it
drops its privileges (rlimits, no_new_privs, the pids cgroup, supplementary
groups), as Docker's exec processes inherit the container's.

The host validated every value (husk.confinement); they are checked again here
for their types only, since a bad one must fail the start with a clear message
rather than go unnoticed.
"""

from __future__ import annotations

import os
from typing import Any

from husk.guest.agent import beneath, cgroup2, container_root, syscalls
from husk.guest.kernelnames import (
    NAMESPACED_SYSCTL_PREFIXES,
    NAMESPACED_SYSCTLS,
    OOM_SCORE_ADJ_RANGE,
)

PIDS_MOUNT = "/run/husk/cgroup-pids"
PIDS_GROUP = f"{PIDS_MOUNT}/container"


class LimitError(ValueError):
    pass


def _strings(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LimitError(f"{key} must be a list of strings")
    return value


def _limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LimitError("ulimit values must be integers")
    return value


class Settings:
    """What every container process gets; read from the RUN body once."""

    def __init__(self, body: dict[str, Any] | None = None) -> None:
        body = body or {}
        self.read_only = body.get("read_only") is True
        self.no_new_privileges = body.get("no_new_privileges") is True
        # --security-opt systempaths=unconfined: /proc's kernel files as --privileged has them.
        self.unconfined_system_paths = body.get("unconfined_system_paths") is True
        self.group_add = _strings(body, "group_add")
        self.rlimits: list[tuple[int, int, int]] = []
        for item in body.get("ulimits") or []:
            if not isinstance(item, dict) or item.get("name") not in syscalls.RLIMITS:
                raise LimitError(f"unknown ulimit {item!r}")
            self.rlimits.append(
                (
                    syscalls.RLIMITS[item["name"]],
                    _limit(item.get("soft")),
                    _limit(item.get("hard")),
                )
            )
        self.pids_limit = body.get("pids_limit")
        if self.pids_limit is not None and (
            isinstance(self.pids_limit, bool) or not isinstance(self.pids_limit, int)
        ):
            raise LimitError("pids_limit must be an integer")
        self.pids_procs_fd: int | None = None
        self.oom_score_adj = body.get("oom_score_adj", 0)
        low, high = OOM_SCORE_ADJ_RANGE
        if (
            isinstance(self.oom_score_adj, bool)
            or not isinstance(self.oom_score_adj, int)
            or not low <= self.oom_score_adj <= high
        ):
            raise LimitError(f"oom_score_adj must be an integer from {low} to {high}")
        # An OCI runtime's container (husk-runtime): a cgroup v2 group its limits live in.
        self.cgroup = cgroup2.check(body["cgroup"]) if "cgroup" in body else None
        self.cgroup_procs_fd: int | None = None

    # -- by the agent, before the workload ------------------------------------
    def prepare(self, body: dict[str, Any], address: str | None) -> None:
        """The VM-wide part: sysctls, /dev/shm, name files, the pids cgroup."""
        sysctls = body.get("sysctls") or {}
        if not isinstance(sysctls, dict):
            raise LimitError("sysctls must be an object")
        for key, value in sysctls.items():
            write_sysctl(str(key), str(value))
        shm_size = body.get("shm_size")
        if shm_size:
            if isinstance(shm_size, bool) or not isinstance(shm_size, int) or shm_size < 0:
                raise LimitError("shm_size must be a number of bytes")
            remount_shm(shm_size)
        extra_hosts = _strings(body, "extra_hosts")
        if extra_hosts:
            container_root.write_hosts(os.uname().nodename, address, extra_hosts)
        dns, search, options = (
            _strings(body, "dns"),
            _strings(body, "dns_search"),
            _strings(body, "dns_options"),
        )
        if dns or search or options:
            container_root.write_resolv_conf(dns, search, options)
        if self.pids_limit:
            self.pids_procs_fd = pids_cgroup(self.pids_limit)
        if self.cgroup is not None:
            try:
                self.cgroup_procs_fd = cgroup2.create(self.cgroup)
            except cgroup2.CgroupError as exc:
                raise LimitError(str(exc)) from None
        cwd = body.get("cwd")
        if self.read_only and isinstance(cwd, str) and cwd.startswith("/"):
            # The workload cannot make its working directory in a read-only root: made
            # here first, as Docker does before it mounts the root read-only.
            try:
                os.close(beneath.open_path(container_root.ROOT, cwd, create_dirs=True))
            except OSError as exc:
                raise LimitError(f"workdir {cwd}: {exc.strerror}") from None

    # -- in each forked child ---------------------------------------------------
    def join(self) -> None:  # pragma: no cover - forked child
        if self.oom_score_adj:
            # In the agent's /proc, still root with every capability (lowering the score
            # takes CAP_SYS_RESOURCE); the workload's children inherit it.
            with open("/proc/self/oom_score_adj", "w") as fh:
                fh.write(str(self.oom_score_adj))
        if self.pids_procs_fd is not None:
            os.write(self.pids_procs_fd, b"0")
        if self.cgroup_procs_fd is not None:
            os.write(self.cgroup_procs_fd, b"0")

    def before_identity(self) -> None:  # pragma: no cover - forked child
        for which, soft, hard in self.rlimits:
            syscalls.setrlimit(which, soft, hard)
        if self.no_new_privileges:
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


def write_sysctl(key: str, value: str) -> None:
    """Sets a namespaced sysctl; the VM is the container's, so its value is the container's."""
    if (
        not (key in NAMESPACED_SYSCTLS or key.startswith(NAMESPACED_SYSCTL_PREFIXES))
        or ".." in key
        or "/" in key
    ):
        raise LimitError(f"sysctl '{key}' is not allowed")
    path = "/proc/sys/" + key.replace(".", "/")
    try:
        with open(path, "w") as fh:
            fh.write(value)
    except OSError as exc:
        raise LimitError(f"cannot set sysctl {key}={value}: {exc.strerror}") from None


def remount_shm(size: int) -> None:
    target = container_root.inside("/dev/shm")
    flags = syscalls.MS_REMOUNT | syscalls.MS_NOSUID | syscalls.MS_NODEV
    try:
        syscalls.mount(None, target, None, flags, f"mode=1777,size={size}")
    except OSError as exc:
        raise LimitError(f"cannot size /dev/shm to {size} bytes: {exc.strerror}") from None


def pids_cgroup(limit: int) -> int:
    """The pids cgroup with ``limit``; returns its cgroup.procs, open for writing."""
    try:
        os.makedirs(PIDS_MOUNT, exist_ok=True)
        if not os.path.ismount(PIDS_MOUNT):
            flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
            syscalls.mount("cgroup", PIDS_MOUNT, "cgroup", flags, "pids")
        os.makedirs(PIDS_GROUP, exist_ok=True)
        with open(f"{PIDS_GROUP}/pids.max", "w") as fh:
            fh.write(str(limit))
        return os.open(f"{PIDS_GROUP}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LimitError(f"cannot set the pids limit: {exc.strerror or exc}") from None
