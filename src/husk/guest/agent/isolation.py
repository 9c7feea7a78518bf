"""How container processes are walled off from the agent: namespaces, devices, capabilities.

The agent stays in the VM's initial namespaces with its code in the initramfs.
The workload becomes PID 1 of a new PID namespace and gets a new mount namespace
whose root is the container root, entered as runc does without pivot_root (which
the kernel refuses while the root is the initramfs): the container root is moved
onto ``/`` and the process chroots into it. What stays underneath, the initramfs
and the agent's own mounts on it (its /proc, /dev, /run …), has no path left to
it: ``..`` from the container root lands on the container root again (the kernel
steps back into the mount on top of ``/``), the container's /proc is a fresh one
holding only its own processes, the mount table it can read lists only what is
under its root, and every way to re-root (setns, umount, open_tree, a user
namespace) needs a capability no container process holds. (Detaching the agent's
mounts from the namespace as well would cost an RCU grace period each, about 5 ms
per start under TCG, for no path the container could use.)

Exec sessions and the archive child join the workload's namespaces with setns(2):
a PID namespace joined affects only the children forked afterwards, so the agent
joins it just around its fork and then returns to its own; the child itself joins
the mount namespace, which puts its root on the container root. Until then it
holds every capability and is not dumpable, so no container process may look
through its /proc entries at the agent's root meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys

from husk.guest.agent import capabilities, cgroup2, limits, syscalls
from husk.guest.agent.devices import DeviceCgroup
from husk.guest.agent.loop import log

# As runc's defaults: kernel settings the container may read but never change
# (/proc/sys/kernel/core_pattern, for one, names a program the kernel runs as the
# VM's root), and files and directories it may not see at all.
READ_ONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/asound",
)
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
_HARDENED = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC


class IsolationError(Exception):
    pass


def seal_imports() -> None:
    """Only modules already loaded, built in or frozen can be imported from now on.

    Inside the container every path on ``sys.path`` (/husk/lib, /usr/lib/python3.11)
    names the image's files: a lazy import there (tarfile imports bz2 for a bz2
    stream) would run the image's code in this process. This way it fails instead.
    """
    # Without the path-based finder nothing on sys.path is ever looked at. (Rebinding one
    # list, rather than clearing caches, keeps the copy-on-write pages touched few.)
    sys.meta_path = [
        finder
        for finder in sys.meta_path
        if getattr(finder, "__name__", "") in ("BuiltinImporter", "FrozenImporter")
    ]


class Isolation:
    """The agent's side: the container's device cgroup and, once it runs, its namespaces."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.devices: DeviceCgroup | None = None
        self.devices_error = "not set up"
        self.caps = capabilities.DOCKER_DEFAULT
        # ``privileged`` (docker run --privileged): every capability and device of the
        # VM, /proc/sys writable; the VM stays the boundary.
        self.privileged = False
        # The container's process settings (ulimits, read-only root …) from its RUN body.
        self.settings = limits.Settings()
        self.workload_pid: int | None = None
        self._pid_ns = ""
        self._own_pid_ns = -1
        # Which of READ_ONLY_PATHS and MASKED_PATHS this kernel has (dirs, files), found
        # once at boot: each check in every start would cost a millisecond under TCG.
        self.read_only: tuple[str, ...] = ()
        self.masked_dirs: tuple[str, ...] = ()
        self.masked_files: tuple[str, ...] = ()

    def setup(self) -> None:
        """At boot: the device cgroup, and no user namespaces for anyone.

        A user namespace would hand a container process every capability inside it
        (Docker's seccomp profile refuses it for the same reason); nothing in the
        guest needs one, and /proc/sys is read-only to the container.
        """
        self._own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        # The agent's /proc and /sys show what the container's will.
        self.read_only = tuple(p for p in READ_ONLY_PATHS if os.path.lexists(p))
        self.masked_dirs = tuple(p for p in MASKED_PATHS if os.path.isdir(p))
        self.masked_files = tuple(
            p for p in MASKED_PATHS if os.path.lexists(p) and not os.path.isdir(p)
        )
        try:
            self.devices = DeviceCgroup.create()
        except OSError as exc:
            self.devices_error = str(exc)
            log(f"device cgroup unavailable, containers will not start: {exc}")
        try:
            with open("/proc/sys/user/max_user_namespaces", "w") as fh:
                fh.write("0")
        except OSError as exc:
            log(f"cannot disable user namespaces: {exc}")

    def entry(
        self, kind: str, keep: frozenset[int] | None = None, *, maintenance: bool = False
    ) -> Entry:
        """How a new process of ``kind`` (run, exec, archive) enters the container.

        ``maintenance``: the VM serves a stopped container's files and runs no workload;
        an archive child gets a mount namespace of its own rooted at the container root
        (nothing else: no /proc, no kernel files, nothing the workload would see).
        """
        if self.devices is None and not self.privileged:
            raise IsolationError(f"the device cgroup is not available: {self.devices_error}")
        if kind == "run":
            return Entry(self, None, keep if keep is not None else self.caps, execs=True)
        if maintenance and kind == "archive":
            return Entry(self, None, keep or frozenset(), execs=False, bare=True)
        if self.workload_pid is None:
            raise IsolationError("the container's workload is not running")
        try:
            pid_fd = os.open(f"/proc/{self.workload_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            raise IsolationError("container is not running: its workload has exited") from None
        try:
            mnt_fd = os.open(f"/proc/{self.workload_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(pid_fd)
            raise IsolationError("container is not running: its workload has exited") from None
        return Entry(
            self, (pid_fd, mnt_fd), keep if keep is not None else self.caps, execs=kind != "archive"
        )

    def workload_started(self, pid: int) -> None:
        self.workload_pid = pid

    def pid_ns(self) -> str:
        """ "pid:[inode]" of the container's PID namespace; ask only while the workload
        runs (not yet reaped, so its pid cannot name another process)."""
        if not self._pid_ns and self.workload_pid is not None:
            # Read on first use, not at start: every step of a start costs under TCG.
            with contextlib.suppress(OSError):
                self._pid_ns = os.readlink(f"/proc/{self.workload_pid}/ns/pid")
        return self._pid_ns

    def restore_pid_ns(self) -> None:
        """Makes the agent's later children its own again (after a fork into the container)."""
        try:
            syscalls.setns(self._own_pid_ns, syscalls.CLONE_NEWPID)
        except OSError as exc:  # every later fork would land in the container: stop here
            log(f"fatal: cannot return to the agent's PID namespace: {exc}")
            raise SystemExit(1) from None


class Entry:
    """One process entering the container: the agent forks it, the child calls the rest."""

    def __init__(
        self,
        isolation: Isolation,
        join: tuple[int, int] | None,
        keep: frozenset[int],
        *,
        execs: bool,
        bare: bool = False,
    ) -> None:
        self._bare = bare  # only the container root, for a maintenance VM's archive child
        self._isolation = isolation
        self._join = join  # (pid ns fd, mount ns fd) of the workload; None: new namespaces
        self._keep = keep
        self._execs = execs

    def fork(self) -> int:
        """os.fork(), with the child in the container's PID namespace (a new one for run)."""
        isolation = self._isolation
        if self._join is None:
            syscalls.unshare(syscalls.CLONE_NEWPID)
        else:
            syscalls.setns(self._join[0], syscalls.CLONE_NEWPID)
        try:
            pid = os.fork()
        except OSError as exc:
            isolation.restore_pid_ns()
            if exc.errno == errno.ENOMEM and self._join is not None:
                # The kernel's answer for a PID namespace whose init has exited.
                raise IsolationError("container is not running: its workload has exited") from None
            raise
        except BaseException:
            isolation.restore_pid_ns()
            raise
        if pid:
            isolation.restore_pid_ns()
        return pid

    def close(self) -> None:
        """The agent's copies of the namespace descriptors (after the fork)."""
        if self._join is not None:
            for fd in self._join:
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- in the child -------------------------------------------------------
    def enter(self) -> None:  # pragma: no cover - runs in the forked child
        """Joins the device cgroup and the namespaces; the root becomes the container root."""
        # Not dumpable until exec: no container process may open our /proc entries
        # (our root, our descriptors) while we still stand in the agent's root.
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        seal_imports()
        cgroup = self._isolation.devices
        if cgroup is not None and not self._isolation.privileged:
            cgroup.join()
        self._isolation.settings.join()
        if self._join is not None:
            syscalls.setns(self._join[1], syscalls.CLONE_NEWNS)  # root: the container's
            self.close()
        elif self._bare:
            self._bare_root()
        else:
            self._new_mount_namespace()
        os.chdir("/")

    def _new_mount_namespace(self) -> None:  # pragma: no cover - forked child
        root = self._isolation.root
        syscalls.unshare(syscalls.CLONE_NEWNS)
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        # A /proc of the new PID namespace: the container's processes only.
        syscalls.mount("proc", f"{root}/proc", "proc", _HARDENED)
        isolation = self._isolation
        if isolation.settings.cgroup_procs_fd is not None:
            cgroup2.enter_namespace(root)  # its own cgroup on /sys/fs/cgroup, as runc's
        if not isolation.privileged and not isolation.settings.unconfined_system_paths:
            self._protect_kernel_files(root)
        if self._isolation.settings.read_only:
            # Only the root's own mount: /dev, /dev/shm, --tmpfs and bind mounts keep theirs.
            flags = syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY
            syscalls.mount(None, root, None, flags)
        os.chdir(root)
        syscalls.mount(root, "/", None, syscalls.MS_MOVE)
        os.chroot(".")

    def _bare_root(self) -> None:  # pragma: no cover - forked child
        root = self._isolation.root
        syscalls.unshare(syscalls.CLONE_NEWNS)
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        os.chdir(root)
        syscalls.mount(root, "/", None, syscalls.MS_MOVE)
        os.chroot(".")

    def _protect_kernel_files(self, root: str) -> None:  # pragma: no cover - forked child
        isolation = self._isolation
        for path in isolation.read_only:
            target = f"{root}{path}"
            syscalls.mount(target, target, None, syscalls.MS_BIND | syscalls.MS_REC)
            flags = syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY | _HARDENED
            syscalls.mount(None, target, None, flags)
        for path in isolation.masked_dirs:
            syscalls.mount("tmpfs", f"{root}{path}", "tmpfs", syscalls.MS_RDONLY | _HARDENED)
        for path in isolation.masked_files:
            syscalls.mount(f"{root}/dev/null", f"{root}{path}", None, syscalls.MS_BIND)

    def before_identity(self) -> None:  # pragma: no cover - forked child
        if self._execs:
            self._isolation.settings.before_identity()
            capabilities.limit_bounding(self._keep)

    def after_identity(self) -> None:  # pragma: no cover - forked child
        if not self._execs:
            capabilities.restrict_to(self._keep)

    def confine_init(self) -> None:  # pragma: no cover - forked child
        """For the reaping init, which never execs: no more than the workload will hold."""
        if os.geteuid() == 0:
            capabilities.restrict_to(self._keep)
        else:  # `--init -u USER`: it dropped its capabilities with root
            capabilities.release_all()


class Outside(Entry):
    """A child that stays in the agent's own namespaces, holding the agent's privileges.

    Only for agent code that never execs and reads the layers themselves (``diff``
    walks the writable layer's upper directory, which no container path reaches);
    it is not dumpable and in no namespace of the container, so no container
    process can reach it.
    """

    def __init__(self) -> None:  # nothing to join, nothing held
        pass

    def fork(self) -> int:
        return os.fork()

    def close(self) -> None:
        return None

    def enter(self) -> None:  # pragma: no cover - runs in the forked child
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        seal_imports()
        os.chdir("/")

    def before_identity(self) -> None:  # pragma: no cover - forked child
        return None

    def after_identity(self) -> None:  # pragma: no cover - forked child
        return None

    def confine_init(self) -> None:  # pragma: no cover - forked child
        return None
