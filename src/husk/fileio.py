"""Writing files so that a crash or a concurrent reader never sees half of one.

Records, state files, settings and credentials are replaced whole: the new content goes
to a temporary file beside the target, is synced, and is renamed over it; the directory
is then synced so that the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

TEMPORARY_SUFFIX = ".tmp"
"""Temporary files are ``.<name>.<pid>.<random>.tmp``: hidden, and easy to sweep."""


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable only by its owner."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def fsync_directory(directory: Path) -> None:
    """Makes a rename or unlink in ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Readers (and a restarted daemon) see the old content or the new, never a torn one.

    On any failure (ENOSPC, EROFS, …) the temporary file is removed, the old file stays
    and the error propagates. The new file gets ``mode`` (private by default).
    """
    # The random part keeps two threads of one process from sharing a temporary file.
    temporary = path.with_name(
        f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{TEMPORARY_SUFFIX}"
    )
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(temporary, flags, mode)
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    fsync_directory(path.parent)


def write_json_atomic(path: Path, data: Any, *, mode: int = 0o600) -> None:
    """``data`` as indented, key-sorted JSON, written as :func:`write_file_atomic` does."""
    write_file_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode(), mode=mode)
