"""Volumes with a size limit: an ext4 image file loop-mounted on the volume's ``_data``.

A plain volume is a host directory that every container's VM gets over 9p; QEMU's 9p
server writes into it with nothing to stop a guest at the host's last free byte. A
volume created with ``size=`` (``husk volume create --opt size=1G``, or config.json's
``volume_size`` for every new volume) is a sparse ext4 file system of that size in
``disk.ext4`` beside ``_data``, mounted there by the daemon: containers still share
it over 9p (several running containers see each other's writes, as with any volume),
and a guest that fills it gets ENOSPC from the host kernel, never more than the size
of the host's disk. The host mounts it ``nosuid,nodev``: whatever a guest stores there
never means anything to the host.

The mount does not survive a reboot of the host: the store mounts every sized volume
again when it loads, and :func:`ensure_mounted` refuses to hand an unmounted one to a
container (its writes would land, unlimited, in the empty directory underneath).
Mounting needs root; without it, ``size=`` is "not supported" and says why.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from husk.errors import HuskError, NotSupported
from husk.oci.rootfs import make_ext4_disk, run_tool

DISK = "disk.ext4"
"""The file system image of a sized volume, beside its ``_data`` directory."""
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"


class VolumeMountError(HuskError):
    """A sized volume's file system could not be mounted (or unmounted)."""

    kind = "storage"


def disk_of(data: Path) -> Path:
    return data.parent / DISK


def is_sized(data: Path) -> bool:
    """True when ``data`` is the ``_data`` of a volume with a size limit."""
    return disk_of(data).is_file()


def make(data: Path, size_bytes: int) -> None:
    """Makes the volume's file system and mounts it on ``data`` (an empty directory).

    Nothing is left behind on failure (the caller removes the volume's directory).
    """
    if os.geteuid() != 0:
        raise NotSupported(
            "volume option size is not supported without root: husk limits a volume with "
            "a loop-mounted ext4 image, which only root can mount"
        )
    disk = disk_of(data)
    make_ext4_disk(disk, size_bytes, label="husk-volume")
    try:
        _mount(disk, data)
        # An empty volume is empty: copy-up fills only those, and e2fsck makes
        # lost+found again when it needs one.
        with contextlib.suppress(FileNotFoundError):
            (data / "lost+found").rmdir()
        os.chmod(data, 0o755)
    except BaseException:
        unmount(data)
        with contextlib.suppress(FileNotFoundError):
            disk.unlink()
        raise


def ensure_mounted(data: Path) -> None:
    """Mounts a sized volume's file system on ``data`` unless it is there already.

    A no-op for a volume without a size. Raises VolumeMountError rather than let a
    container write into the unmounted (unlimited) directory.
    """
    if not is_sized(data) or os.path.ismount(data):
        return
    _mount(disk_of(data), data)


def unmount(data: Path) -> None:
    """Detaches the volume's file system (lazily: a VM being torn down may still hold it)."""
    if not os.path.ismount(data):
        return
    _run(["umount", "--lazy", os.fspath(data)], f"unmount the volume at {data}")


def _mount(disk: Path, data: Path) -> None:
    if os.geteuid() != 0:
        raise VolumeMountError(
            f"the volume at {data} has a size limit and is not mounted; only root can mount it"
        )
    _run(
        ["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, os.fspath(disk), os.fspath(data)],
        f"mount the volume's file system {disk}",
    )


def _run(command: list[str], what: str) -> None:
    try:
        run_tool(command, what)
    except HuskError as err:
        raise VolumeMountError(str(err)) from None
