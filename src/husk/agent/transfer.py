"""The transfer ring: a process's stdin through a read-only disk instead of the port.

Host → guest over virtio-serial, QEMU hands the guest 4 KiB per receive buffer, an
interrupt and a wake-up of the Python agent each: ~1.4-2 emulated CPU-seconds per 100 MB
before anything uses the bytes. A virtio-blk read moves the same 100 MB in ~0.1 s of the
guest's time (QEMU copies it in host code). So every VM has one extra disk, the ring: a
sparse file of RING_BYTES in its state directory (created empty at each boot and
restore), attached **read-only** (``readonly=on``, and QEMU gets an O_RDONLY descriptor
only: a guest can never write a host file through it), found by the guest by its serial.

A sender (``husk cp`` into the container, :func:`send_stdin`) writes the stream into the
ring in slots of SLOT_BYTES and tells the guest each slot's place (STDIN_DISK, a few
bytes over the port); the agent splices the range into the process's stdin with O_DIRECT
(no guest page cache, so never a stale copy of an earlier use) and answers STDIN_DONE, and
the slot can be written again. Slots are used in order, so the only valid STDIN_DONE is
for the oldest slot in flight: anything else from the guest is a protocol violation
(:class:`Slots`). A guest that never answers meets ACK_TIMEOUT; the host holds at most
one slot of the stream in memory whatever the guest does.

One sender per VM at a time (:class:`TransferRing`'s lock): a second copy into the same
VM meanwhile goes through the port as before, as does any copy into a VM without the
ring (one booted by an older husk, or from an older template format).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from husk.agent.messages import MalformedMessage
from husk.errors import GuestError
from husk.guest import protocol

if TYPE_CHECKING:
    from husk.agent.client import GuestProcess

log = logging.getLogger(__name__)

TRANSFER_SERIAL = protocol.TRANSFER_SERIAL
ALIGN = protocol.TRANSFER_ALIGN
RING_FILE = "transfer.ring"
SLOT_BYTES = 4 * 1024 * 1024
"""One STDIN_DISK's most: the guest's wake-up and round trip per 4 MiB, not per 4 KiB."""
RING_BYTES = 8 * SLOT_BYTES
"""32 MiB of sparse file per VM: enough slots in flight that the host's writes and the
guest's reads overlap (measured: 4 slots were as fast; more buys nothing)."""
ACK_TIMEOUT = 60.0
"""Seconds the guest may take to hand one slot to its process before the copy fails."""


class Slots:
    """Which slots of the ring the guest still holds, oldest first (no I/O: unit-tested)."""

    def __init__(self, ring_bytes: int = RING_BYTES, slot_bytes: int = SLOT_BYTES) -> None:
        if slot_bytes <= 0 or slot_bytes % ALIGN or ring_bytes < slot_bytes:
            raise ValueError(f"bad ring geometry {ring_bytes}/{slot_bytes}")
        self.slot_bytes = slot_bytes
        self.count = ring_bytes // slot_bytes
        self._next = 0
        self._held: deque[tuple[int, int]] = deque()

    @property
    def held(self) -> int:
        return len(self._held)

    def free(self) -> bool:
        return len(self._held) < self.count

    def take(self, length: int) -> int:
        """The offset of the next slot, now held for ``length`` bytes (aligned, ≤ a slot)."""
        if not 0 < length <= self.slot_bytes or length % ALIGN:
            raise ValueError(f"a slot holds 1-{self.slot_bytes} aligned bytes, not {length}")
        if not self.free():
            raise ValueError("every slot of the ring is in flight")
        offset = self._next * self.slot_bytes
        self._next = (self._next + 1) % self.count
        self._held.append((offset, length))
        return offset

    def release(self, offset: int, length: int) -> None:
        """The guest's STDIN_DONE: it must name the oldest slot in flight, exactly."""
        if not self._held or self._held[0] != (offset, length):
            expected = f"{self._held[0]}" if self._held else "nothing"
            raise MalformedMessage(
                "STDIN_DONE", f"names ({offset}, {length}) of the ring, expected {expected}"
            )
        self._held.popleft()


class TransferRing:
    """One VM's ring file, and the lock that gives it to one sender at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = asyncio.Lock()

    def open(self) -> int | None:
        """The ring file open for writing; None when it is not there (the caller then
        uses the port: a VM whose state directory lost it still copies, only slower)."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as err:
            log.warning("transfer ring %s unusable, copying through the port: %s", self.path, err)
            return None


def empty(fd: int) -> None:
    """Drops the ring's contents: a copy's bytes hold neither the host's disk nor its page
    cache once it is over (the guest reads nothing of the ring between copies)."""
    with contextlib.suppress(OSError):
        size = os.fstat(fd).st_size  # the size the guest's disk has: it must stay
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)


async def send_stdin(
    process: GuestProcess,
    fd: int,
    data: AsyncIterator[bytes],
    finished: asyncio.Future[Any],
    *,
    slots: Slots | None = None,
    ack_timeout: float = ACK_TIMEOUT,
) -> None:
    """Sends ``data`` as ``process``'s stdin through the ring open at ``fd`` (the caller
    holds its lock), then its end; returns once the guest holds no slot any more.

    ``finished`` is the task reading ``process.output()`` (which delivers the STDIN_DONEs):
    once it ends (the process exited) the rest of ``data`` is dropped, as a pipe drops
    what a process that exited never read.

    The last bytes that do not fill an ALIGN block go over the port (STDIN, in order).
    """
    slots = slots or Slots()
    released = asyncio.Event()

    def on_done(offset: int, length: int) -> None:
        slots.release(offset, length)  # raises in the reader: the copy fails
        released.set()

    process.on_stdin_done = on_done
    try:
        pending = bytearray()
        async for chunk in data:
            pending += chunk
            while len(pending) >= slots.slot_bytes:
                if not await _send_slot(
                    process, fd, slots, pending, released, finished, ack_timeout
                ):
                    return
        whole = len(pending) - len(pending) % ALIGN
        if whole and not await _send_slot(
            process, fd, slots, pending, released, finished, ack_timeout, whole
        ):
            return
        if pending:
            await process.write_stdin(bytes(pending))
        await process.close_stdin()
        # The guest may still be reading the last slots: they stay until it says so.
        while slots.held and await _wait_for_slot(slots, released, finished, ack_timeout):
            pass
    finally:
        process.on_stdin_done = None


async def _send_slot(
    process: GuestProcess,
    fd: int,
    slots: Slots,
    pending: bytearray,
    released: asyncio.Event,
    finished: asyncio.Future[Any],
    ack_timeout: float,
    length: int | None = None,
) -> bool:
    """Writes the first ``length`` (default: a slot's) bytes of ``pending`` into the next
    free slot and announces it; False once the process has ended (nothing sent)."""
    size = slots.slot_bytes if length is None else length
    while not slots.free():
        if not await _wait_for_slot(slots, released, finished, ack_timeout):
            return False
    if finished.done():
        return False
    offset = slots.take(size)
    with memoryview(pending) as view:
        written = os.pwrite(fd, view[:size], offset)
    if written != size:
        raise GuestError(f"short write to the transfer ring ({written} of {size} bytes)")
    del pending[:size]
    await process.stdin_from_disk(offset, size)
    return True


async def _wait_for_slot(
    slots: Slots, released: asyncio.Event, finished: asyncio.Future[Any], ack_timeout: float
) -> bool:
    """Waits for the guest to free a slot: False once the process has ended instead,
    GuestError after ``ack_timeout`` seconds of neither."""
    released.clear()
    waiter = asyncio.ensure_future(released.wait())
    try:
        done, _ = await asyncio.wait(
            {waiter, finished}, timeout=ack_timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        waiter.cancel()
    if finished in done:
        return False
    if not done:
        raise GuestError(
            f"the guest took no data of the copy for {ack_timeout:.0f} s (transfer ring)"
        )
    return True
