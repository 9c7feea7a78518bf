"""husk-runtime's single-file binds: the VM gets a share holding that one file, never its
directory.

A 9p share is a directory, and QEMU serves the engine's files with CAP_DAC_OVERRIDE
(docs/SECURITY.md, "husk-runtime's QEMU"). Sharing a file bind's own directory handed a
guest that owns its VM every sibling of the file, read-write unless the bind was
read-only: for the docker engine's ``/etc/hosts`` the container's directory
(``hostconfig.json``: ``Privileged`` and a bind of ``/`` at the next start), for podman's
its userdata (the bundle's ``config.json``), for ``-v /etc/localtime:...:ro`` all of
``/etc``. Each file bind is instead a private, read-only directory of the container with
an empty placeholder on which the keeper binds the very file, in its own mount namespace
(:func:`husk.ociruntime.namespaces.hold_mounts`): QEMU's jail binds that directory with
its submounts, so the guest reaches the file's inode and nothing beside it, and can
neither remove nor replace it (a mount point). Writes go both ways, as through runc's
bind of the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from husk.ociruntime.errors import RuntimeFailure
from husk.vm.jail import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT

_LOCKED = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC))


@dataclass(frozen=True)
class FileBind:
    source: str
    """The host file (resolved)."""
    directory: Path
    """The private directory shared with the VM."""
    readonly: bool

    @property
    def name(self) -> str:
        return os.path.basename(self.source)


def _mount(source: str | None, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    if libc.mount(source.encode() if source else None, target.encode(), None, flags, None):
        err = ctypes.get_errno()
        raise RuntimeFailure(f"cannot bind {source or target} for the VM: {os.strerror(err)}")


def _read_only(target: str) -> None:
    """Remounts the bind on ``target`` read-only, keeping the flags a user namespace may
    not clear (rootless engines)."""
    flags = os.statvfs(target).f_flag
    kept = sum(mount_flag for statvfs_flag, mount_flag in _LOCKED if flags & statvfs_flag)
    _mount(None, target, MS_BIND | MS_REMOUNT | MS_RDONLY | kept)


def bind(file: FileBind) -> None:
    """Makes ``file.directory`` afresh holding only the file (see the module's docstring).

    Only in the keeper, after :func:`~husk.ociruntime.namespaces.hold_mounts`: the binds
    must never land in the engine's mount namespace."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(file.directory)
    file.directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    file.directory.mkdir(mode=0o700)
    placeholder = str(file.directory / file.name)
    os.close(os.open(placeholder, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    directory = str(file.directory)
    # The directory itself read-only: the guest makes nothing beside the file.
    _mount(directory, directory, MS_BIND)
    _read_only(directory)
    fd = os.open(file.source, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RuntimeFailure(f"bind mount source {file.source} is no longer a regular file")
        # The descriptor's /proc link: the very file checked, whatever its path does now.
        _mount(f"/proc/self/fd/{fd}", placeholder, MS_BIND)
    finally:
        os.close(fd)
    if file.readonly:
        _read_only(placeholder)
