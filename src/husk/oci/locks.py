"""fcntl file locks with deadlines, usable from threads and from asyncio code."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from husk.errors import Conflict

_POLL_SECONDS = 0.02


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def try_lock(fd: int, *, shared: bool = False) -> bool:
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False, timeout: float = 60.0) -> Iterator[None]:
    """Hold a lock on ``path`` for the block; Conflict if not obtained within ``timeout``."""
    fd = _open_lock(path)
    try:
        deadline = time.monotonic() + timeout
        while not try_lock(fd, shared=shared):
            if time.monotonic() >= deadline:
                raise Conflict(f"timed out after {timeout:.0f}s waiting for lock {path}")
            time.sleep(_POLL_SECONDS)
        yield
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def async_file_lock(
    path: Path, *, shared: bool = False, timeout: float = 3600.0
) -> AsyncIterator[None]:
    """Like :func:`file_lock`, but waits without blocking the event loop."""
    fd = _open_lock(path)
    try:
        deadline = time.monotonic() + timeout
        while not try_lock(fd, shared=shared):
            if time.monotonic() >= deadline:
                raise Conflict(f"timed out after {timeout:.0f}s waiting for lock {path}")
            await asyncio.sleep(_POLL_SECONDS)
        yield
    finally:
        os.close(fd)
