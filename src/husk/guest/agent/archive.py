"""Copying files in and out of the container (``husk cp``, Docker's archive API).

These run in a forked child that has already joined the container's namespaces
(its root is the container root) as uid 0 holding only the capabilities the job
needs: reading (DAC_READ_SEARCH) or extracting (CHOWN, DAC_OVERRIDE, FOWNER,
FSETID, MKNOD), with no new privileges. Owners travel as numbers only: nothing
here may look a name up, because glibc would do it through the container's own
/etc/nsswitch.conf and load the image's libnss_*.so into this process (the
pattern of CVE-2019-14271 in ``docker cp``). No module can be imported either
(:func:`husk.guest.agent.isolation.seal_imports`): every path on ``sys.path`` would
name the image's files, so tarfile comes loaded from the agent, and a stream needing
a module it lacks (bz2, xz) fails with "No module named …" instead.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tarfile
import typing

COPY_BLOCK = 1024 * 1024
"""File data moves in blocks of this size (tarfile's default, 16 KiB, costs a Python loop
turn per 16 KiB: most of a copy's time in an emulated guest)."""


def _fail(message: str) -> None:
    os.write(2, message.encode(errors="replace"))
    os._exit(1)


def _numeric_only() -> None:
    """Makes tarfile unable to resolve uid/gid to names (it skips the lookup without them)."""
    tarfile.pwd = None  # type: ignore[attr-defined]
    tarfile.grp = None  # type: ignore[attr-defined]


def stat_path(path: str) -> None:
    """Writes Docker's container-path-stat JSON for ``path`` to stdout."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        _fail(f"Could not find the file {path} in container")
        return
    except OSError as exc:
        _fail(f"{path}: {exc.strerror}")
        return
    target = os.readlink(path) if stat.S_ISLNK(info.st_mode) else ""
    body = {
        "name": os.path.basename(path.rstrip("/")) or "/",
        "size": info.st_size,
        "mode": info.st_mode,
        "mtime": info.st_mtime,
        "linkTarget": target,
    }
    os.write(1, json.dumps(body).encode())


def get_archive(path: str) -> None:
    """Streams ``path`` (file or directory tree) as an uncompressed tar on stdout."""
    _numeric_only()
    if not os.path.lexists(path):
        _fail(f"Could not find the file {path} in container")
    name = os.path.basename(path.rstrip("/")) or "."
    with os.fdopen(1, "wb", buffering=COPY_BLOCK) as out:
        counted = typing.cast(typing.IO[bytes], _Counted(out))
        with tarfile.open(fileobj=counted, mode="w", format=tarfile.PAX_FORMAT) as tar:
            # Not the stream mode ("w|"): its buffer re-copies what it holds on every
            # write (quadratic for big blocks); this mode writes each block straight on.
            tar.copybufsize = COPY_BLOCK  # type: ignore[attr-defined]
            tar.add(path, arcname=name, recursive=True)


class _Counted:
    """A pipe as tarfile's write mode sees a file: it only writes and asks where it is."""

    def __init__(self, out: typing.BinaryIO) -> None:
        self._out = out
        self._position = 0

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position


def put_archive(path: str) -> None:
    """Extracts a tar from stdin into the existing directory ``path``."""
    _numeric_only()
    if not os.path.isdir(path):
        _fail(f"Could not find the file {path} in container")
    with (
        os.fdopen(0, "rb", buffering=COPY_BLOCK) as source,
        # bufsize: the stream reads its source in blocks of this size (its default, 10 KiB,
        # is a Python loop turn and a copy per 10 KiB of every file extracted).
        tarfile.open(fileobj=source, mode="r|*", bufsize=COPY_BLOCK) as tar,
    ):
        tar.copybufsize = COPY_BLOCK  # type: ignore[attr-defined]
        for member in tar:
            parts = member.name.split("/")
            if member.name.startswith("/") or ".." in parts:
                _fail(f"refusing archive entry {member.name!r}: outside the destination")
            tar.extract(member, path, numeric_owner=True)
    sys.stdout.flush()


EXPORT_SKIPPED = frozenset({"proc", "sys", "dev"})
"""Top-level directories whose contents an export leaves out (kernel and device files)."""


def _export_tree(tar: tarfile.TarFile, path: str, name: str, device: int) -> None:
    """Adds ``path`` as ``name``, then what is below it on the root's own filesystem.

    Another filesystem mounted inside (a volume, a bind mount, /proc) is left out but
    for its mount point, as Docker exports only the container's layers.
    """
    info = tar.gettarinfo(path, name)  # lstat: a symlink is stored, never followed
    if info.isreg():
        with open(path, "rb") as source:
            tar.addfile(info, source)
    else:
        tar.addfile(info)
    if not info.isdir() or os.lstat(path).st_dev != device or name in EXPORT_SKIPPED:
        return
    for child in sorted(os.listdir(path)):
        _export_tree(tar, f"{path.rstrip('/')}/{child}", f"{name}/{child}", device)


def export_root(path: str) -> None:
    """Streams the container's whole file system (its layers, merged) as a tar on stdout."""
    _numeric_only()
    device = os.lstat("/").st_dev
    with (
        os.fdopen(1, "wb", buffering=256 * 1024) as out,
        tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for child in sorted(os.listdir("/")):
            _export_tree(tar, f"/{child}", child, device)


ACTIONS = {"stat": stat_path, "get": get_archive, "put": put_archive, "export": export_root}
