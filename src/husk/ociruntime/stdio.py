"""Moving bytes between the host's descriptors (pipes, FIFOs, a pty) and guest processes.

Writes happen on a thread per descriptor so that a slow reader on the engine's side
never stalls the keeper's event loop; reads likewise (``/dev/null`` and regular files
cannot be polled).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import stat
import threading
from collections.abc import Awaitable, Callable

CHUNK = 65536


def is_null(fd: int) -> bool:
    """True if ``fd`` is /dev/null (no input for the workload)."""
    try:
        info = os.fstat(fd)
    except OSError:
        return True
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3)


class FdWriter:
    """Writes queued chunks to ``fd`` on a thread of its own, in order."""

    def __init__(self, fd: int, *, owned: bool = False) -> None:
        self.fd = fd
        self._owned = owned
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        self._queue.put(data)

    def _run(self) -> None:
        broken = False
        while True:
            data = self._queue.get()
            if data is None:
                break
            view = memoryview(data)
            while view and not broken:
                try:
                    written = os.write(self.fd, view)
                except BlockingIOError:
                    threading.Event().wait(0.01)
                    continue
                except OSError:
                    broken = True  # the reader is gone: drop the rest
                    break
                view = view[written:]
        if self._owned:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def close(self, timeout: float = 5.0) -> None:
        """Flushes what is queued (up to ``timeout``), then stops (closing an owned fd)."""
        self._queue.put(None)
        self._thread.join(timeout)


def pump_input(
    fd: int,
    loop: asyncio.AbstractEventLoop,
    send: Callable[[bytes], Awaitable[None]],
    close: Callable[[], Awaitable[None]],
) -> threading.Thread:
    """Reads ``fd`` on a thread and hands each chunk to ``send`` on ``loop``, in order;
    ``close`` at end of input."""
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def drain() -> None:
        while True:
            data = await chunks.get()
            try:
                if data is None:
                    await close()
                    return
                await send(data)
            except Exception:
                return  # the process is gone: its input no longer matters

    loop.create_task(drain())

    def read() -> None:
        while True:
            try:
                data = os.read(fd, CHUNK)
            except OSError:
                data = b""
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, data or None)
            except RuntimeError:
                return  # the loop is closed
            if not data:
                return

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread
