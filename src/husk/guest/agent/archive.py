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

from husk.guest.agent import tarpipe

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
    write_archive(path, 1)


def write_archive(path: str, out: int) -> None:
    """``path`` as a PAX tar on the pipe ``out``, each file's data spliced from the file."""
    tarpipe.widen_pipe(out)
    name = os.path.basename(path.rstrip("/")) or "."
    sink = tarpipe.PipeSink(out, COPY_BLOCK)
    # Not the stream mode ("w|"): its buffer re-copies what it holds on every write.
    writer = tarpipe.SplicingWriter(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT)  # type: ignore[arg-type]
    with writer as tar:
        tar.add(path, arcname=name, recursive=True)
    sink.flush()


def put_archive(path: str) -> None:
    """Extracts a tar from stdin into the existing directory ``path``."""
    _numeric_only()
    if not os.path.isdir(path):
        _fail(f"Could not find the file {path} in container")
    extract_stream(0, path)
    sys.stdout.flush()


def extract_stream(source: int, path: str) -> None:
    """Extracts the tar on the pipe ``source`` into ``path``, member by member.

    An uncompressed stream is read through :class:`tarpipe.PipeSource` (file data spliced
    into the files); a compressed one through tarfile's own decompressing stream.
    """
    tarpipe.widen_pipe(source)
    with _reader(tarpipe.PipeSource(source)) as tar:
        tar.copybufsize = COPY_BLOCK  # type: ignore[attr-defined]
        for member in tar:
            parts = member.name.split("/")
            if member.name.startswith("/") or ".." in parts:
                _fail(f"refusing archive entry {member.name!r}: outside the destination")
            tar.extract(member, path, numeric_owner=True)


def _reader(pipe: tarpipe.PipeSource) -> tarfile.TarFile:
    if pipe.peek(6).startswith(tarpipe.COMPRESSED_MAGIC):
        # bufsize: the stream reads its source in blocks of this size (its default,
        # 10 KiB, is a Python loop turn and a copy per 10 KiB of every file extracted).
        return tarfile.open(fileobj=pipe, mode="r|*", bufsize=COPY_BLOCK)  # type: ignore[call-overload,no-any-return]
    return tarpipe.SplicingReader(fileobj=pipe, mode="r")  # type: ignore[arg-type]


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
