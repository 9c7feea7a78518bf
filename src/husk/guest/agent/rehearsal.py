"""REHEARSE: an idle pooled VM runs a start once, then undoes every trace of it.

Under TCG a VM restored from a template has an empty translation cache: every
kernel and CPython path a start runs (the mounts of PREPARE, the fork into new
namespaces, the exec, the exit) is translated again, and that translation is most
of what a start costs. QEMU finds translated code by guest physical address, so
code a VM has already run stays translated for as long as the VM lives. A pooled
VM that has rehearsed a start therefore serves a real one with that code ready.

The rehearsal uses the same functions as a real start: PREPARE's
:func:`container_root.prepare` on the VM's own (placeholder) disks, which the host
filled with a tiny erofs image and an empty ext4, and RUN's spawn through the
isolation entry (new PID and mount namespaces, device cgroup, capabilities) of a
program that exits at once; between the two, with ``network``, the first NETWORK of a
container on the default bridge (:meth:`Networking.rehearse`, which undoes itself).
Then it takes it all down: the child is reaped, every mount it made under the agent's
state directory is unmounted (the disks' page cache is dropped, so nothing read from
them survives the host swapping in the container's disks), the directories it made
are removed and the hostname is restored. The agent's own state (workload, sessions,
isolation settings) is never touched: the rehearsal's process is no session and no
workload.

Refused once the VM has served anything; any failure is an error, and the host
then discards the VM.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol

from husk.guest.agent import capabilities, container_root, limits, syscalls
from husk.guest.agent.isolation import Isolation
from husk.guest.agent.networking import Networking
from husk.guest.agent.sessions import spawn
from husk.guest.agent.system import SystemError_, block_device_for_serial

BLKFLSBUF = 0x1261  # _IO(0x12, 97): write back and drop a block device's buffer cache
DEFAULT_TIMEOUT = 20.0
_POLL = 0.005
_MADE_DIRECTORIES = (
    container_root.STATE,
    container_root.IMAGE_MOUNT,
    container_root.UPPER_MOUNT,
    container_root.ROOT,
)


class Agent(Protocol):
    """What a rehearsal reads and uses of the agent (main.Agent; no import cycle)."""

    @property
    def workload(self) -> object | None: ...
    @property
    def sessions(self) -> Mapping[int, object]: ...
    @property
    def tunnels(self) -> Mapping[int, object]: ...
    @property
    def listeners(self) -> Mapping[int, object]: ...
    @property
    def maintenance(self) -> bool: ...
    @property
    def isolation(self) -> Isolation: ...
    @property
    def networking(self) -> Networking: ...
    def _finish_background(self, timeout: float = ...) -> None: ...


def rehearse(agent: Agent, body: dict[str, Any]) -> dict[str, Any]:
    """Handles REHEARSE: PREPARE and RUN of ``argv`` on the given disks, then undone."""
    if (
        agent.workload is not None
        or agent.sessions
        or agent.tunnels
        or agent.listeners
        or agent.maintenance
        or container_root.prepared()
    ):
        raise SystemError_("a rehearsal needs a VM that has served nothing yet")
    argv = body["argv"]
    timeout = body.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise SystemError_("timeout must be a positive number of seconds")
    deadline = time.monotonic() + min(float(timeout), 60.0)
    shm_size = body.get("shm_size")
    if shm_size is not None and (
        isinstance(shm_size, bool) or not isinstance(shm_size, int) or shm_size <= 0
    ):
        raise SystemError_("shm_size must be a positive number of bytes")
    devices = [
        block_device_for_serial(str(body["image"])),
        block_device_for_serial(str(body["upper"])),
    ]
    hostname = socket.gethostname()
    missing = [path for path in _MADE_DIRECTORIES if not os.path.lexists(path)]
    mounted = set(_mounts())
    failure: BaseException | None = None
    code = -1
    networked = False
    try:
        container_root.prepare(
            {
                "image": body["image"],
                "upper": body["upper"],
                "hostname": hostname,
                "hosts_later": True,
            },
            None,
        )
        if body.get("network") is True:
            agent._finish_background()  # the boot-time eth0 set-up, as NETWORK waits for
            networked = agent.networking.rehearse(hostname)
        run = {"argv": argv, "user": "", "cwd": "/", "env": [f"HOSTNAME={hostname}"]}
        if shm_size is not None:
            run["shm_size"] = shm_size
        code = _run(agent, run, deadline)
    except BaseException as exc:
        failure = exc
    # Undone whatever happened: a VM left half-rehearsed must fail, never be offered.
    try:
        tear_down(devices, missing, mounted)
    finally:
        socket.sethostname(hostname)
    if failure is not None:
        raise failure
    if code != 0:
        raise SystemError_(f"the rehearsal's process exited with {code}")
    return {"exit_code": code, "networked": networked}


def _run(agent: Agent, body: dict[str, Any], deadline: float) -> int:
    """RUN's path for ``body``: settings, entry, spawn; waits for the exit until ``deadline``."""
    isolation = agent.isolation
    saved = (isolation.caps, isolation.privileged, isolation.settings)
    try:
        isolation.caps = capabilities.from_spec(body)
        isolation.privileged = False
        isolation.settings = limits.Settings(body)
        isolation.settings.prepare(body, None)
        pid, fds = spawn(body, container_root.ROOT, False, False, isolation.entry("run"))
        try:
            return _wait(pid, deadline)
        finally:
            for fd in fds.values():
                os.close(fd)
    finally:
        isolation.caps, isolation.privileged, isolation.settings = saved


def _wait(pid: int, deadline: float) -> int:
    # Reaped here, not by the agent's SIGCHLD handler: that one only runs from the loop,
    # after this request, and looks up no session for this pid. A pidfd becomes readable
    # when the process exits (no polling: every wake-up costs under TCG).
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except OSError:
        pidfd = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise SystemError_("the rehearsal's process did not exit in time")
            if pidfd is not None:
                select.select([pidfd], [], [], remaining)
            else:
                time.sleep(min(_POLL, remaining))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def drop_cache(device: str) -> None:
    """Writes back and drops ``device``'s buffer cache: what the file systems read from
    the placeholder never answers a read of the container's disk that replaces it."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    finally:
        os.close(fd)


def mounts_under(prefix: str, mountinfo: str) -> list[str]:
    """Mount points at or under ``prefix`` in a mountinfo text, in mount order."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return mounts_under(container_root.STATE, fh.read())


def tear_down(devices: list[str], made: list[str], kept: set[str]) -> None:
    """Unmounts what the rehearsal mounted under the state directory (all but ``kept``),
    drops the disks' cache, removes the directories it made (``made``, outermost first)."""
    for point in reversed(_mounts()):
        if point in kept:
            continue
        try:
            syscalls.umount(point)
        except OSError as exc:
            raise SystemError_(f"cannot unmount {point} after the rehearsal: {exc}") from None
    for device in devices:
        drop_cache(device)
    for path in reversed(made):
        os.rmdir(path)  # empty again, or this fails and the VM is not offered
