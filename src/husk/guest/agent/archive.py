"""Copying files in and out of the container (``husk cp``, Docker's archive API).

These run in a forked child that has already chrooted into the container root,
so every path (and every symlink in it) resolves inside the container. The
tarfile module is imported only here: most VMs never pay for it.
"""

from __future__ import annotations

import json
import os
import stat
import sys


def _fail(message: str) -> None:
    os.write(2, message.encode(errors="replace"))
    os._exit(1)


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
    import tarfile

    if not os.path.lexists(path):
        _fail(f"Could not find the file {path} in container")
    name = os.path.basename(path.rstrip("/")) or "."
    with (
        os.fdopen(1, "wb", buffering=256 * 1024) as out,
        tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.add(path, arcname=name, recursive=True)


def put_archive(path: str) -> None:
    """Extracts a tar from stdin into the existing directory ``path``."""
    import tarfile

    if not os.path.isdir(path):
        _fail(f"Could not find the file {path} in container")
    with (
        os.fdopen(0, "rb", buffering=256 * 1024) as source,
        tarfile.open(fileobj=source, mode="r|*") as tar,
    ):
        for member in tar:
            parts = member.name.split("/")
            if member.name.startswith("/") or ".." in parts:
                _fail(f"refusing archive entry {member.name!r}: outside the destination")
            tar.extract(member, path, numeric_owner=True)
    sys.stdout.flush()


ACTIONS = {"stat": stat_path, "get": get_archive, "put": put_archive}
