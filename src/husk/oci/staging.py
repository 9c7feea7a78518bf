"""Where an image's layers are unpacked before ``mkfs.erofs``: in memory when it fits.

An image disk is built from a staging tree that lives only until the disk exists.
Creating thousands of small files costs far less on a tmpfs than on a disk file
system (on this project's ext4 hosts, without a journal, every new inode is checked
against recently deleted ones: 1.3 CPU-seconds of kernel time for a 3,600-entry image
on disk, 0.2 s in memory), and nothing needs writing back or deleting from a disk.

The tree goes to ``/dev/shm`` when it is a tmpfs that keeps extended attributes,
inside a private (0700) directory with an unguessable name, locked by its builder.
Its size is bounded by a :class:`~husk.oci.layerstream.ByteBudget` (a quarter of the
free memory and of the tmpfs's free space, at most :data:`MEMORY_BUDGET_MAX`): every
uncompressed byte and every entry of the layers is charged
(:func:`husk.oci.unpack.apply_layer`), so a decompression bomb stops at the budget and
the build goes to disk instead. ``HUSK_DISK_STAGING`` turns memory staging off.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from husk import settings
from husk.oci.layerstream import ByteBudget
from husk.oci.locks import try_lock

MEMORY_BUDGET_MAX = 2 << 30
"""Uncompressed bytes (and entry charges) of one image staged in memory at most."""
MEMORY_BUDGET_MIN = 64 << 20
"""Below this much room, memory staging is not tried."""

_SHM = Path("/dev/shm")
_PREFIX = "husk-stage-"
_GRACE = 60.0
"""Seconds a memory tree is left alone before its lock is checked (it is created a
moment before it is locked)."""
_XATTR_PROBE = "user.husk-probe"


def memory_parent() -> Path | None:
    """The tmpfs that may hold staging trees, or None (not a tmpfs, or turned off)."""
    if settings.disk_staging():
        return None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[1] == os.fspath(_SHM) and fields[2] == "tmpfs":
                    return _SHM
    except OSError:
        pass
    return None


def _mem_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_budget(parent: Path) -> int:
    """Bytes one image may take in a staging tree below ``parent`` (0: none)."""
    try:
        fs = os.statvfs(parent)
    except OSError:
        return 0
    budget = min(fs.f_bavail * fs.f_frsize // 4, _mem_available() // 4, MEMORY_BUDGET_MAX)
    return budget if budget >= MEMORY_BUDGET_MIN else 0


def _keeps_xattrs(directory: Path) -> bool:
    """Whether the file system keeps ``user.`` extended attributes (tmpfs does since
    Linux 6.6): a tree that silently lost an image's xattrs would build a wrong disk."""
    try:
        os.setxattr(directory, _XATTR_PROBE, b"1", follow_symlinks=False)
        os.removexattr(directory, _XATTR_PROBE, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return False
        raise
    return True


@dataclass
class MemoryTree:
    """A private directory on a tmpfs holding one build's staging tree, locked while
    its build lives, and the budget its layers must keep within."""

    directory: Path
    budget: ByteBudget
    _lock_fd: int

    @property
    def tree(self) -> Path:
        return self.directory / "rootfs"

    def discard(self) -> None:
        """Deletes the tree (in the background: the caller need not wait) and unlocks it."""
        fd, self._lock_fd = self._lock_fd, -1
        if fd < 0:
            return
        directory = self.directory

        def remove() -> None:
            try:
                shutil.rmtree(directory, ignore_errors=True)
            finally:
                os.close(fd)  # unlocked only once it is gone

        threading.Thread(target=remove, daemon=True).start()


def make_memory_tree(expected_bytes: int = 0) -> MemoryTree | None:
    """A new memory staging tree, or None when memory staging is off, too small for
    ``expected_bytes`` (the layers' compressed size, a lower bound), or unusable."""
    parent = memory_parent()
    if parent is None:
        return None
    remove_dead_memory_trees(parent)
    total = memory_budget(parent)
    if total <= expected_bytes:
        return None
    try:
        directory = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))
    except OSError:
        return None
    fd = -1
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if not try_lock(fd):
            raise OSError(errno.EAGAIN, f"{directory} is locked by someone else")
        tree = directory / "rootfs"
        tree.mkdir()
        os.chmod(tree, 0o755)
        if not _keeps_xattrs(tree):
            raise OSError(errno.ENOTSUP, "no user xattrs")
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
        if fd >= 0:
            os.close(fd)
        return None
    return MemoryTree(directory, ByteBudget(total), fd)


def remove_dead_memory_trees(parent: Path) -> None:
    """Memory trees of builds whose process died: this user's, old enough, unlocked.

    The parent is world-writable (sticky): only real directories owned by this user
    are considered, opened without following links, and a directory only its owner may
    rename cannot be swapped between the check and the removal."""
    try:
        candidates = list(parent.glob(f"{_PREFIX}*"))
    except OSError:
        return
    for candidate in candidates:
        try:
            info = candidate.lstat()
            if (
                not stat.S_ISDIR(info.st_mode)
                or info.st_uid != os.geteuid()
                or time.time() - info.st_mtime < _GRACE
            ):
                continue
            fd = os.open(candidate, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if try_lock(fd):
                shutil.rmtree(candidate, ignore_errors=True)
        finally:
            os.close(fd)
