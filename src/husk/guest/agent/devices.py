"""The device cgroup every container process lives in: runc's default device allow list.

Docker gives a container CAP_MKNOD, and an image can ship device nodes of its own;
what stops either from reaching the VM's disks, the agent's virtio-serial port,
/dev/mem or /dev/kmsg is the device cgroup, which the kernel checks on every open
(and mknod) of a device node. The guest kernel (Debian's) has the cgroup v1
``devices`` controller; nothing else in the guest uses cgroups, so the agent
mounts that one hierarchy for itself, outside anything the container can see.
"""

from __future__ import annotations

import os

from husk.guest.agent import syscalls

MOUNT = "/run/husk/cgroup"
GROUP = f"{MOUNT}/container"

# runc's default rules (libcontainer/specconv AllowedDevices): mknod of any node, and
# read/write of the nodes a container's /dev holds: null, zero, full, random, urandom,
# tty, ptmx, the ptys of its own devpts and /dev/net/tun.
ALLOWED = (
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
    "c 10:200 rwm",
)


class DeviceCgroup:
    """The container's device cgroup; children join it before entering the container."""

    def __init__(self, procs_fd: int) -> None:
        self._procs_fd = procs_fd

    @classmethod
    def create(cls) -> DeviceCgroup:
        """Mounts the hierarchy and writes the allow list (raises OSError if unavailable)."""
        os.makedirs(MOUNT, exist_ok=True)
        if not os.path.ismount(MOUNT):
            flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
            try:
                # Without it every move into the cgroup waits for an RCU grace period,
                # tens of milliseconds per container process under TCG.
                syscalls.mount("cgroup", MOUNT, "cgroup", flags, "devices,favordynmods")
            except OSError:
                syscalls.mount("cgroup", MOUNT, "cgroup", flags, "devices")
        os.makedirs(GROUP, exist_ok=True)
        _write(f"{GROUP}/devices.deny", "a")
        for rule in ALLOWED:
            _write(f"{GROUP}/devices.allow", rule)
        return cls(os.open(f"{GROUP}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))

    def join(self) -> None:
        """Moves the calling process into the cgroup (a forked child, before it execs)."""
        os.write(self._procs_fd, b"0")


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
