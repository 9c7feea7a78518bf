"""Confining QEMU the way Firecracker's jailer confines its VMM.

QEMU parses everything a hostile guest sends (device registers, virtio rings,
9p requests, network packets), so husk treats it as the most exposed process it
runs. When the daemon is root, each VM's QEMU runs:

* as a uid/gid of its own (``ID_BASE + slot``; no /etc/passwd entry needed), with
  no supplementary groups, an empty capability set *and* bounding set, and
  ``PR_SET_NO_NEW_PRIVS``: it can open nothing that is not world-accessible and
  signal or trace no other VM's QEMU;
* in its own mount namespace whose root is a small read-only tmpfs holding only
  what QEMU needs: ``/usr`` (its binary, libraries, modules and firmware)
  read-only, ``/dev/{null,urandom}`` (and ``/dev/kvm`` under KVM), the kernel
  and initrd read-only, the 9p share directories, a ``/proc`` that shows only
  its own processes (``hidepid=invisible,subset=pid``: QEMU opens RAM and disks
  through ``/proc/self/fd``), and ``/etc/resolv.conf`` for its user-mode network.
  Disks, the console log and snapshots are handed over as open descriptors,
  never as paths, so nothing of the daemon's data directory is mounted;
* in its own network namespace (see :mod:`husk.vm.network`), IPC and UTS namespaces;
* in a cgroup of its own (memory = guest RAM + QEMU's overhead; pids), removed
  when the VM is gone;
* under QEMU's own seccomp filter (``-sandbox``), installed by QEMU after this, on
  top of husk's (:mod:`husk.vm.signalfilter`: QEMU signals only itself, traces nobody).

Everything is done in the forked child before ``exec`` (``preexec_fn``): it costs
a few milliseconds and no helper binary. The child only makes system calls on
values computed by the parent (no imports, no logging, no locks), which keeps
``preexec_fn`` safe in the daemon's multi-threaded process. The order matters:
join the cgroups, create the namespaces and the root, drop the bounding set,
then groups, gid, uid (CPython's own ``user=``/``group=`` would run *before*
``preexec_fn``, after which mounting is no longer allowed).

Ids are leased by ``flock`` on ``ID_LOCK_DIR/<slot>``; the locked descriptor is
inherited by QEMU, so the lease lasts exactly as long as that QEMU, across
daemon restarts, and is unique among the VMs of every husk daemon on the host.

Without root (issue 17), QEMU keeps the user's uid but still gets a user
namespace (mapping only that uid) with the same mount, network, IPC and UTS
namespaces, when the kernel lets unprivileged users create them; otherwise it
runs as today. A jail that cannot be set up never fails a rootless start.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from husk import settings
from husk.tools import find_tool
from husk.vm import signalfilter

log = logging.getLogger(__name__)

ID_BASE = 0x7A000000
"""First uid/gid of the range VMs run as (2046820352); far above any login or subuid range."""
ID_SLOTS = 1 << 16
ID_LOCK_DIR = Path("/run/husk-vm-ids")
"""Host-wide (not per data directory): ids must be unique among every daemon's VMs."""

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "husk"
QEMU_OVERHEAD_MIB = 768
"""Memory a VM's cgroup allows beyond guest RAM. QEMU's own share is ~150 MiB (code,
libraries, the 32 MiB TCG translation cache, I/O buffers, slirp4netns); the rest is
room for the host page cache of the VM's disk writes, which cgroup v1 charges to the
VM and can reclaim only once written back. Measured here (512 MiB guest writing 3 GB
to its disk): +768 MiB runs through; +256 MiB got QEMU OOM-killed after 900 MB."""
PIDS_LIMIT = 256
"""QEMU's threads: main loop, RCU, vCPUs, TCG, up to 64 block I/O workers, 9p workers."""
_CGROUP_GRACE = 10.0
"""An empty cgroup younger than this may be one a spawn is about to join."""

TUN_DEVICE = "/dev/net/tun"
NO_JAIL_ENV = settings.HUSK_NO_JAIL
"""Set to 1 to run QEMU unconfined (debugging only; refused nowhere, logged)."""

# <linux/sched.h>, <sys/mount.h>, <linux/prctl.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x100000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
SYS_OPEN_TREE = 428  # x86-64
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
PR_CAPBSET_DROP = 24
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
SYS_CAPSET = 126  # x86-64
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# <linux/capability.h>: what a QEMU serving an engine's root file system needs (below).
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_FOWNER = 3
CAP_FSETID = 4
FILE_CAPABILITIES = (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID)
"""The only capabilities a QEMU serving host-owned shares keeps (as ambient capabilities
of its own uid): to read and write files of every owner and to give new files the owner
the guest asks for, as runc's container root does in its root file system. Nothing that
lets it change its uid, signal or trace others, mount, or make device nodes."""
SYS_PIVOT_ROOT = 155  # x86-64
PROC_MOUNT_OPTIONS = (b"hidepid=invisible,subset=pid", b"hidepid=2")
"""QEMU's own /proc, tried in order: only process directories, its own (Linux 5.8+); else
(older kernels) no other uid's processes. Never the host's /proc as root."""
PROC_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
"""Read-only: nothing of the kernel's is written through it (its /proc/self/fd links still
open QEMU's descriptors read-write, whose files live on other mounts)."""
ST_NOSUID = os.ST_NOSUID
ST_NODEV = os.ST_NODEV
ST_NOEXEC = os.ST_NOEXEC
ST_RDONLY = os.ST_RDONLY


def jail_disabled() -> bool:
    return settings.jail_disabled()


# -- ids ----------------------------------------------------------------------------------


@dataclass
class IdLease:
    """A uid/gid pair held by an flock; the lock descriptor goes to QEMU."""

    slot: int
    fd: int

    @property
    def uid(self) -> int:
        return ID_BASE + self.slot

    @property
    def gid(self) -> int:
        return ID_BASE + self.slot

    def close(self) -> None:
        """Closes this process's copy (QEMU's inherited copy keeps the lease)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lease_id(directory: Path = ID_LOCK_DIR) -> IdLease:
    """A slot no live VM of any daemon holds. OSError if the directory is unusable."""
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.lstat()
    if info.st_uid != 0 or info.st_mode & 0o022 or not os.path.isdir(directory):
        raise OSError(errno.EPERM, f"{directory} must be a directory owned by root, not writable")
    # The lowest free slot: the directory holds no more files than VMs ever ran at once.
    for slot in range(ID_SLOTS):
        fd = os.open(directory / str(slot), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return IdLease(slot, fd)
    raise OSError(errno.EAGAIN, f"all {ID_SLOTS} VM ids are in use")


# -- cgroups ------------------------------------------------------------------------------


@dataclass
class Cgroup:
    """A VM's cgroup directories (one per v1 controller, or one v2 directory)."""

    paths: list[Path] = field(default_factory=list)

    def procs_files(self) -> list[Path]:
        return [path / "cgroup.procs" for path in self.paths]

    def add(self, pid: int) -> None:
        for procs in self.procs_files():
            with contextlib.suppress(OSError):
                procs.write_text(f"{pid}\n")

    def remove(self) -> bool:
        """Removes every directory that is empty now; True if none is left."""
        left = []
        for path in self.paths:
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(path)
        self.paths = left
        return not left

    def to_json(self) -> list[str]:
        return [str(path) for path in self.paths]


def _cgroup_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def create_cgroup(name: str, *, memory_bytes: int, pids: int = PIDS_LIMIT) -> Cgroup:
    """The cgroup a VM's processes join (OSError if cgroups cannot be used here)."""
    sweep_cgroups()
    group = Cgroup()
    try:
        if _cgroup_v2():
            parent = CGROUP_ROOT / CGROUP_PARENT
            _enable_v2_controllers(CGROUP_ROOT)
            parent.mkdir(exist_ok=True)
            _enable_v2_controllers(parent)
            path = parent / name
            path.mkdir()
            group.paths.append(path)
            (path / "memory.max").write_text(f"{memory_bytes}\n")
            with contextlib.suppress(OSError):  # no swap for QEMU either
                (path / "memory.swap.max").write_text("0\n")
            (path / "pids.max").write_text(f"{pids}\n")
        else:
            for controller, settings in (
                ("memory", {"memory.limit_in_bytes": memory_bytes}),
                ("pids", {"pids.max": pids}),
            ):
                parent = CGROUP_ROOT / controller / CGROUP_PARENT
                parent.mkdir(exist_ok=True)
                path = parent / name
                path.mkdir()
                group.paths.append(path)
                for key, value in settings.items():
                    (path / key).write_text(f"{value}\n")
    except OSError:
        group.remove()
        raise
    return group


def _enable_v2_controllers(path: Path) -> None:
    control = path / "cgroup.subtree_control"
    enabled = control.read_text().split()
    for controller in ("memory", "pids"):
        if controller not in enabled:
            control.write_text(f"+{controller}\n")


def sweep_cgroups() -> int:
    """Removes the empty cgroups of VMs that are gone (a daemon may have died first)."""
    parents = (
        [CGROUP_ROOT / CGROUP_PARENT]
        if _cgroup_v2()
        else [CGROUP_ROOT / controller / CGROUP_PARENT for controller in ("memory", "pids")]
    )
    removed = 0
    now = time.time()
    for parent in parents:
        try:
            children = [entry for entry in parent.iterdir() if entry.is_dir()]
        except OSError:
            continue
        for child in children:
            try:
                if now - child.stat().st_mtime < _CGROUP_GRACE:
                    continue
                child.rmdir()  # refused (EBUSY) while a process is in it
                removed += 1
            except OSError:
                continue
    return removed


# -- the root -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bind:
    """A host path made visible at the same path inside the jail."""

    path: Path
    readonly: bool = True
    userns_fd: int | None = None
    """An idmapped bind: ids are translated through this user namespace's mapping."""


@dataclass
class JailSpec:
    """Everything the child needs; computed in the parent, applied by :func:`preexec`."""

    mount_point: Path
    """An empty directory the new root's tmpfs is mounted on (in the child's namespace only)."""
    binds: list[Bind]
    files: dict[str, bytes]
    """Small files written into the jail (e.g. "/etc/resolv.conf")."""
    uid: int | None
    """The uid/gid to become (None: keep the caller's, inside a user namespace)."""
    gid: int | None
    net: bool = True
    """A network namespace of its own."""
    cgroup_procs: list[Path] = field(default_factory=list)
    hostname: str = "husk-vm"
    ambient_caps: tuple[int, ...] = ()
    """Capabilities QEMU keeps under its own uid (only :data:`FILE_CAPABILITIES`, only as
    root); empty for every VM but those serving host-owned shares."""


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    return libc


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


@functools.cache
def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


def _mount_flags(path: Path) -> int:
    """The flags a read-only remount of a bind of ``path`` must keep (locked mounts)."""
    try:
        flags = os.statvfs(path).f_flag
    except OSError:
        return 0
    kept = 0
    for statvfs_flag, mount_flag in (
        (ST_NOSUID, MS_NOSUID),
        (ST_NODEV, MS_NODEV),
        (ST_NOEXEC, MS_NOEXEC),
    ):
        if flags & statvfs_flag:
            kept |= mount_flag
    return kept


class JailError(OSError):
    pass


def make_preexec(spec: JailSpec) -> Callable[[], None]:
    """The function the forked child runs before exec to enter ``spec``'s jail.

    Every string, flag and path is prepared here, in the parent: the child only
    calls into libc and ``os``.
    """
    libc = _libc()
    rootless = spec.uid is None
    uid = spec.uid if spec.uid is not None else os.geteuid()
    gid = spec.gid if spec.gid is not None else os.getegid()
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (CLONE_NEWNET if spec.net else 0)
    last_cap = _last_cap()
    hostname = spec.hostname.encode()
    procs = [str(path).encode() for path in spec.cgroup_procs]
    root = str(spec.mount_point).encode()
    operations = _root_operations(spec, root)
    proc_target = root + b"/proc"
    proc_options = PROC_MOUNT_OPTIONS
    # Without root: the user is root of QEMU's user namespace (as rootless podman does),
    # which slirp4netns's sandbox expects; QEMU's empty bounding set leaves it no capability.
    uid_map = f"0 {uid} 1\n".encode()
    gid_map = f"0 {gid} 1\n".encode()
    kept_caps = frozenset(spec.ambient_caps)
    if kept_caps - set(FILE_CAPABILITIES) or (kept_caps and rootless):
        raise ValueError(f"a jail keeps only file capabilities, as root: {sorted(kept_caps)}")
    read_only_attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    signal_filter = signalfilter.build()
    cap_header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    cap_data = (_CapData * 2)()
    cap_mask = sum(1 << cap for cap in kept_caps)
    cap_data[0].effective = cap_data[0].permitted = cap_data[0].inheritable = cap_mask

    def fail(what: str) -> None:
        err = ctypes.get_errno()
        with contextlib.suppress(OSError):
            os.write(2, f"husk jail: {what}: {os.strerror(err)}\n".encode())
        raise JailError(err, what)

    def mount(
        source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None
    ) -> None:
        if libc.mount(source, target, fstype, flags, data) != 0:
            fail(f"mount {target.decode(errors='replace')}")

    def write_file(path: bytes, content: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)

    def idmapped_bind(source: bytes, target: bytes, readonly: bool, userns: int) -> bool:
        """A bind whose owner reads as QEMU's uid; False (and a note) if the fs refuses."""
        tree = libc.syscall(
            ctypes.c_long(SYS_OPEN_TREE),
            ctypes.c_int(AT_FDCWD),
            source,
            ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
        )
        if tree < 0:
            fail(f"open_tree {source.decode(errors='replace')}")
        try:
            attr = _MountAttr(
                MOUNT_ATTR_IDMAP
                | MOUNT_ATTR_NOSUID
                | MOUNT_ATTR_NODEV
                | (MOUNT_ATTR_RDONLY if readonly else 0),
                0,
                0,
                userns,
            )
            if libc.syscall(
                ctypes.c_long(SYS_MOUNT_SETATTR),
                ctypes.c_int(tree),
                b"",
                ctypes.c_uint(AT_EMPTY_PATH),
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ):
                with contextlib.suppress(OSError):
                    note = os.strerror(ctypes.get_errno())
                    os.write(2, f"husk jail: no idmapped mount of {source!r}: {note}\n".encode())
                return False
            if libc.syscall(
                ctypes.c_long(SYS_MOVE_MOUNT),
                ctypes.c_int(tree),
                b"",
                ctypes.c_int(AT_FDCWD),
                target,
                ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
            ):
                fail(f"move_mount {target.decode(errors='replace')}")
        finally:
            os.close(tree)
        return True

    def recursive_read_only(target: bytes) -> None:
        """``target`` and the mounts below it read-only (a remount changes only the top
        one: a /usr/local file system below /usr stayed writable). Kernels before 5.12
        have no mount_setattr: there only a remount made anything read-only."""
        failed = libc.syscall(
            ctypes.c_long(SYS_MOUNT_SETATTR),
            ctypes.c_int(AT_FDCWD),
            target,
            ctypes.c_uint(AT_RECURSIVE),
            ctypes.byref(read_only_attr),
            ctypes.c_size_t(ctypes.sizeof(read_only_attr)),
        )
        if failed and ctypes.get_errno() != errno.ENOSYS:
            fail(f"make {target.decode(errors='replace')} read-only below")

    def child() -> None:
        try:
            enter()
        except BaseException as err:
            # CPython reports only "Exception occurred in preexec_fn": say what failed.
            if not isinstance(err, JailError):
                with contextlib.suppress(OSError):
                    os.write(2, f"husk jail: {err!r}\n".encode())
            raise

    def enter() -> None:
        # Popen applied QEMU's umask (0077) already: the jail's directories need 0755.
        umask = os.umask(0o022)
        for path in procs:
            write_file(path, b"0\n")
        if rootless:
            if libc.unshare(CLONE_NEWUSER) != 0:
                fail("unshare(CLONE_NEWUSER)")
            write_file(b"/proc/self/setgroups", b"deny")
            write_file(b"/proc/self/uid_map", uid_map)
            write_file(b"/proc/self/gid_map", gid_map)
        if libc.unshare(flags) != 0:
            fail("unshare")
        libc.sethostname(hostname, len(hostname))
        mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
        mount(b"tmpfs", root, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=1m,nr_inodes=4096")
        for kind, target, source, readonly, kept in operations:
            if kind == "dir":
                with contextlib.suppress(FileExistsError):
                    os.mkdir(target, 0o755)
            elif kind == "symlink":
                os.symlink(source, target)
            elif kind == "write":
                write_file(target, source)
            else:
                if not os.path.lexists(target):
                    if kind != "bind-file":
                        os.mkdir(target, 0o755)
                    else:
                        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                if kind == "bind-idmap" and idmapped_bind(source, target, readonly, kept):
                    continue
                mount(source, target, None, MS_BIND | MS_REC, None)
                if readonly:
                    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | kept, None)
                    recursive_read_only(target)
        os.mkdir(proc_target, 0o555)
        for options in proc_options:
            if libc.mount(b"proc", proc_target, b"proc", PROC_FLAGS, options) == 0:
                break
        else:
            if not rootless:
                # Never the host's /proc as root: with husk-runtime's file capabilities
                # QEMU would write root's files there (sysrq-trigger, IRQ affinities,
                # other processes' OOM scores).
                fail("mount a proc of QEMU's own")
            # A user namespace may not mount a proc of the host's PID namespace: bind it,
            # read-only (writable, QEMU could raise the OOM score of its user's processes).
            mount(b"/proc", proc_target, None, MS_BIND | MS_REC, None)
            recursive_read_only(proc_target)
        os.chdir(root)
        if libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), b".", b".") != 0:
            fail("pivot_root")
        if libc.umount2(b".", MNT_DETACH) != 0:
            fail("umount the old root")
        os.chdir(b"/")
        mount(None, b"/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        for cap in range(last_cap + 1):
            if cap not in kept_caps and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                fail(f"drop capability {cap}")
        if kept_caps and libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
            fail("PR_SET_KEEPCAPS")
        if not rootless:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        if kept_caps:
            # Kept through the uid change (KEEPCAPS), then made ambient: QEMU, not a
            # privileged binary, gets them at exec, under the VM's own uid.
            if libc.syscall(
                ctypes.c_long(SYS_CAPSET), ctypes.byref(cap_header), ctypes.byref(cap_data)
            ):
                fail("capset")
            for cap in kept_caps:
                if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
                    fail(f"raise ambient capability {cap}")
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            fail("PR_SET_NO_NEW_PRIVS")
        os.umask(umask)
        if signal_filter is not None:
            # Last: QEMU may signal only itself (rootless, it shares the user's uid).
            signal_filter.aim(os.getpid())
            program = ctypes.addressof(signal_filter.program)
            if libc.prctl(
                signalfilter.PR_SET_SECCOMP, signalfilter.SECCOMP_MODE_FILTER, program, 0, 0
            ):
                fail("install the signal filter")

    return child


_Operation = tuple[str, bytes, bytes, bool, int]
"""(kind, path in the new root, source or content, read-only, mount flags to keep or,
for "bind-idmap", the user namespace descriptor)."""


def _root_operations(spec: JailSpec, root: bytes) -> list[_Operation]:
    """What builds the new root, parents before children."""
    operations: list[_Operation] = []
    made: set[Path] = set()

    def parents(path: Path) -> None:
        for parent in reversed(path.parents):
            if parent != Path("/") and parent not in made:
                made.add(parent)
                operations.append(("dir", root + bytes(parent), b"", False, 0))

    for bind in sorted(spec.binds, key=lambda bind: bind.path):
        if bind.path in made:
            continue
        parents(bind.path)
        made.add(bind.path)
        kind = "bind-dir" if bind.path.is_dir() else "bind-file"
        source = bytes(bind.path)
        if bind.userns_fd is not None and kind == "bind-dir":
            # The last field carries the user namespace for an idmapped bind.
            operations.append(("bind-idmap", root + source, source, bind.readonly, bind.userns_fd))
            continue
        operations.append((kind, root + source, source, bind.readonly, _mount_flags(bind.path)))
    for name in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
        host = Path("/") / name
        if host.is_symlink() and host not in made:
            made.add(host)
            operations.append(("symlink", root + bytes(host), os.readlink(host).encode(), False, 0))
    for name, content in spec.files.items():
        path = Path(name)
        parents(path)
        operations.append(("write", root + bytes(path), content, False, 0))
    return operations


# -- can this process build jails? --------------------------------------------------------


@functools.cache
def rootless_jail_works() -> tuple[bool, str]:
    """Whether an unprivileged user may create the user+mount+net namespaces (probed once)."""
    try:
        result = subprocess.run(
            [
                find_tool("unshare") or "unshare",
                "--user",
                "--map-current-user",
                "--mount",
                "--net",
                "--ipc",
                "--uts",
                "true",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as err:
        return False, f"cannot probe user namespaces: {err}"
    if result.returncode != 0:
        return False, (result.stderr.strip() or f"unshare exited with {result.returncode}")
    return True, ""


# -- one VM's confinement -----------------------------------------------------------------


@dataclass
class Confinement:
    """What confines one QEMU: built before the spawn, released after its exit."""

    spec: JailSpec | None
    """None: QEMU runs unconfined (``reason`` says why)."""
    lease: IdLease | None = None
    cgroup: Cgroup | None = None
    reason: str = ""
    userns_fds: list[int] = field(default_factory=list)
    """User namespaces of idmapped binds; only the child needs them (before exec)."""
    egress: bool = True
    """slirp4netns gives the VM's network namespace a way out (False: none can)."""

    @property
    def jailed(self) -> bool:
        return self.spec is not None

    @property
    def own_network(self) -> bool:
        """QEMU gets a network namespace of its own (and so needs slirp4netns for egress)."""
        return self.spec is not None and self.spec.net

    @property
    def user_namespace(self) -> bool:
        return self.spec is not None and self.spec.uid is None

    @property
    def uid(self) -> int | None:
        return self.lease.uid if self.lease is not None else None

    def preexec(self) -> Callable[[], None] | None:
        return make_preexec(self.spec) if self.spec is not None else None

    def inherited_fds(self) -> tuple[int, ...]:
        """Descriptors QEMU must inherit: the id lease lives as long as it does."""
        return (self.lease.fd,) if self.lease is not None and self.lease.fd >= 0 else ()

    def spawned(self) -> None:
        """The parent's copies are no longer needed once QEMU holds its own."""
        if self.lease is not None:
            self.lease.close()
        for fd in self.userns_fds:
            os.close(fd)
        self.userns_fds = []

    def join(self, pid: int) -> None:
        """Puts another of the VM's processes (slirp4netns) into its cgroup."""
        if self.cgroup is not None:
            self.cgroup.add(pid)

    def release(self) -> bool:
        """After QEMU (and slirp4netns) exited: removes the cgroup; True if nothing is left."""
        self.spawned()
        return self.cgroup.remove() if self.cgroup is not None else True

    def to_json(self) -> dict[str, Any]:
        return {
            "jailed": self.jailed,
            "uid": self.uid,
            "user_namespace": self.user_namespace,
            "own_network": self.own_network,
            "cgroup": self.cgroup.to_json() if self.cgroup is not None else [],
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Confinement:
        """Enough of a recorded confinement to release it (its cgroup) later."""
        cgroup = Cgroup([Path(path) for path in data.get("cgroup") or []])
        return cls(None, None, cgroup, str(data.get("reason", "")))


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def idmap_userns(inside: tuple[int, int], outside: tuple[int, int]) -> int:
    """A user namespace (descriptor) mapping uid/gid ``inside`` to ``outside``, one id each.

    Used for idmapped binds: through them, files owned by ``inside`` (a share's
    owner) read as owned by ``outside`` (the VM's uid), and files QEMU creates as
    ``outside`` are stored as ``inside``. A helper process holds the namespace
    while its maps are written; it is gone when this returns.
    """
    libc = _libc()

    def enter() -> None:
        if libc.unshare(CLONE_NEWUSER) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")

    sleep = shutil.which("sleep") or "/bin/sleep"
    helper = subprocess.Popen([sleep, "60"], preexec_fn=enter, stdin=subprocess.DEVNULL)
    try:
        proc = Path(f"/proc/{helper.pid}")
        (proc / "uid_map").write_text(f"{inside[0]} {outside[0]} 1\n")
        (proc / "gid_map").write_text(f"{inside[1]} {outside[1]} 1\n")
        return os.open(proc / "ns" / "user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.kill()
        helper.wait()


def confine(
    *,
    name: str,
    mount_point: Path,
    binary: str,
    read_only: list[Path],
    shares: list[tuple[Path, bool]],
    kvm: bool,
    memory_mib: int,
    resolv_conf: bytes | None,
    host_owned_shares: bool = False,
) -> Confinement:
    """The confinement for one QEMU (see the module's docstring).

    ``read_only``: files QEMU opens by name (kernel, initrd); ``shares``: (9p
    directory, read-only). Everything else QEMU gets as descriptors.
    ``resolv_conf``: the jail's /etc/resolv.conf (None: none). Raises OSError
    only when the daemon is root and the jail cannot be built; without root it
    degrades, with a reason.

    As root, each share is an idmapped bind that maps the directory's owner and
    group to the VM's uid and gid: QEMU, with no capabilities, gets the owner's
    access to it, and what it creates there is owned on the host by that owner.

    ``host_owned_shares`` (husk-runtime: an engine's root file system, files of many
    owners, often on overlayfs where no idmapped mount can be made): the shares are
    plain binds and QEMU keeps :data:`FILE_CAPABILITIES` under its own uid, so the guest
    reads and writes them as runc's container root would, and nothing more. Root only.
    """
    if jail_disabled():
        _warn_once(f"{NO_JAIL_ENV} is set: QEMU runs unconfined, as the daemon's user")
        return Confinement(None, reason=f"{NO_JAIL_ENV} is set")
    root = os.geteuid() == 0
    if not root:
        works, why = rootless_jail_works()
        if not works:
            reason = f"unprivileged user namespaces are not available ({why})"
            _warn_once(f"QEMU runs without namespaces: {reason}")
            return Confinement(None, reason=reason)
    binds = [Bind(Path("/usr"))]
    real_binary = Path(os.path.realpath(binary))
    if not real_binary.is_relative_to("/usr"):
        binds.append(Bind(real_binary))
    for extra in (Path("/etc/ld.so.cache"),):
        if extra.exists():
            binds.append(Bind(extra))
    devices = [Path("/dev/null"), Path("/dev/urandom")] + ([Path("/dev/kvm")] if kvm else [])
    binds += [Bind(device, readonly=False) for device in devices]
    binds += [Bind(Path(os.path.abspath(path))) for path in read_only]
    files = {"/etc/resolv.conf": resolv_conf} if resolv_conf is not None else {}
    mount_point.mkdir(mode=0o700, exist_ok=True)
    if host_owned_shares and not root:
        raise OSError(errno.EPERM, "host-owned shares need root (QEMU keeps file capabilities)")
    if not root:
        binds += [Bind(Path(os.path.abspath(path)), readonly) for path, readonly in shares]
        reason = "rootless: user namespace, the user's own uid"
        egress = True
        if resolv_conf is not None and not os.access(TUN_DEVICE, os.R_OK | os.W_OK):
            # slirp4netns needs a tap device. Without one the VM still gets a network
            # namespace of its own, but no way out of it: sharing the user's namespace
            # instead would hand guests the host's loopback (the daemon, registries,
            # databases), which is worse than no network at all.
            egress = False
            reason += f"; no egress ({TUN_DEVICE} is not usable by this user)"
            _warn_once(f"guests have no network egress: {TUN_DEVICE} is not usable by this user")
        spec = JailSpec(mount_point, binds, files, uid=None, gid=None, net=True)
        return Confinement(spec, reason=reason, egress=egress)
    confinement = Confinement(None, lease_id())
    lease = confinement.lease
    assert lease is not None
    try:
        for path, readonly in shares:
            if host_owned_shares:
                binds.append(Bind(Path(os.path.abspath(path)), readonly))
                continue
            owner = os.stat(path)
            userns = idmap_userns((owner.st_uid, owner.st_gid), (lease.uid, lease.gid))
            confinement.userns_fds.append(userns)
            binds.append(Bind(Path(os.path.abspath(path)), readonly, userns))
        try:
            confinement.cgroup = create_cgroup(
                f"{name}-{lease.slot}",
                memory_bytes=(memory_mib + QEMU_OVERHEAD_MIB) * 1024 * 1024,
            )
        except OSError as err:
            _warn_once(f"QEMU runs without a cgroup of its own: {err}")
        confinement.spec = JailSpec(
            mount_point,
            binds,
            files,
            uid=lease.uid,
            gid=lease.gid,
            cgroup_procs=confinement.cgroup.procs_files() if confinement.cgroup else [],
            ambient_caps=FILE_CAPABILITIES if host_owned_shares else (),
        )
        if host_owned_shares:
            confinement.reason = "host-owned shares: own uid with file capabilities only"
    except BaseException:
        confinement.release()
        raise
    return confinement
