"""The transfer ring without a VM: its bookkeeping, the host's sender against a scripted
guest (well-behaved, silent, lying, exiting early), and the disk every VM gets for it
(read-only to QEMU, sparse, created at boot, in the template's key)."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from husk.agent import transfer
from husk.agent.messages import MalformedMessage
from husk.agent.transfer import ALIGN, Slots
from husk.errors import GuestError
from husk.guest.netconfig import LAN_SLOTS
from husk.sandbox.config import SandboxConfig, machine_config, ring_disk
from husk.sandbox.templates import template_inputs
from husk.vm import qemu
from husk.vm.machine import DiskConfig
from husk.vm.qemu import config_from_json, config_to_json, open_disk
from husk.vm.qemu_argv import build_command

T = TypeVar("T")
SLOT = 64 * 1024
RING = 4 * SLOT


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


# -- the bookkeeping ------------------------------------------------------------------------


def test_slots_go_round_in_order_and_only_the_oldest_can_be_freed() -> None:
    slots = Slots(RING, SLOT)
    offsets = [slots.take(SLOT) for _ in range(4)]
    assert offsets == [0, SLOT, 2 * SLOT, 3 * SLOT] and not slots.free()
    with pytest.raises(ValueError, match="in flight"):
        slots.take(ALIGN)
    slots.release(0, SLOT)
    assert slots.take(ALIGN) == 0  # round again, to the slot just freed
    for wrong in [(2 * SLOT, SLOT), (SLOT, SLOT - ALIGN), (0, ALIGN), (-1, SLOT)]:
        with pytest.raises(MalformedMessage, match="STDIN_DONE"):
            slots.release(*wrong)
    assert slots.held == 4  # a refused answer frees nothing
    for offset in (SLOT, 2 * SLOT, 3 * SLOT, 0):
        slots.release(offset, SLOT if offset else ALIGN)
    with pytest.raises(MalformedMessage, match="expected nothing"):
        slots.release(0, ALIGN)  # once more: nothing is in flight


def test_slots_refuse_lengths_a_guest_could_not_read_with_o_direct() -> None:
    slots = Slots(RING, SLOT)
    for length in (0, ALIGN - 1, ALIGN + 1, SLOT + ALIGN):
        with pytest.raises(ValueError, match="aligned"):
            slots.take(length)
    with pytest.raises(ValueError, match="geometry"):
        Slots(SLOT, SLOT + 1)


# -- the sender, against scripted guests -----------------------------------------------------


class ScriptedGuest:
    """What the agent does with STDIN_DISK and STDIN: reads the range from the ring file
    (as the guest's O_DIRECT read does) and answers STDIN_DONE, unless told otherwise."""

    def __init__(self, ring: Path, *, answer: bool = True) -> None:
        self.ring = ring
        self.answer = answer
        self.stdin = bytearray()
        self.ranges: list[tuple[int, int]] = []
        self.closed = False
        self.on_stdin_done: Any = None

    async def stdin_from_disk(self, offset: int, length: int) -> None:
        assert offset % ALIGN == 0 and length % ALIGN == 0 and offset + length <= RING
        with self.ring.open("rb") as ring:
            ring.seek(offset)
            self.stdin += ring.read(length)
        self.ranges.append((offset, length))
        if self.answer:
            asyncio.get_running_loop().call_soon(self.on_stdin_done, offset, length)

    async def write_stdin(self, data: bytes) -> None:
        self.stdin += data

    async def close_stdin(self) -> None:
        self.closed = True


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


def ring_file(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "ring"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, RING)
    return path, fd


@pytest.mark.parametrize("size", [0, 100, ALIGN, 5 * SLOT + 3 * ALIGN + 17, 9 * SLOT])
def test_the_stream_arrives_whole_and_in_order_through_slots_and_port(
    tmp_path: Path, size: int
) -> None:
    """Every byte once, in order: whole slots, an aligned remainder through the ring, the
    last partial block through the port; the ring is emptied afterwards."""
    data = os.urandom(size)
    path, fd = ring_file(tmp_path)
    guest = ScriptedGuest(path)

    async def body() -> None:
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await transfer.send_stdin(guest, fd, pieces(data, 7000), never, slots=Slots(RING, SLOT))  # type: ignore[arg-type]

    try:
        run(body())
        transfer.empty(fd)
        assert bytes(guest.stdin) == data and guest.closed
        assert all(length <= SLOT for _, length in guest.ranges)
        assert sum(length for _, length in guest.ranges) == size - size % ALIGN
        assert guest.on_stdin_done is None  # the sender let go of the process
        assert os.fstat(fd).st_size == RING and os.fstat(fd).st_blocks == 0
    finally:
        os.close(fd)


def test_a_guest_that_never_answers_fails_the_copy_in_bounded_time(tmp_path: Path) -> None:
    path, fd = ring_file(tmp_path)
    guest = ScriptedGuest(path, answer=False)

    async def body() -> None:
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        slots = Slots(RING, SLOT)
        with pytest.raises(GuestError, match="took no data of the copy"):
            await transfer.send_stdin(
                guest,  # type: ignore[arg-type]
                fd,
                pieces(os.urandom(6 * SLOT), SLOT),
                never,
                slots=slots,
                ack_timeout=0.2,
            )
        assert slots.held == 4  # it filled the ring, then waited, then gave up

    try:
        run(body())
        assert not guest.closed and len(guest.ranges) == 4
    finally:
        os.close(fd)


def test_a_guest_answering_for_the_wrong_slot_breaks_the_protocol(tmp_path: Path) -> None:
    path, fd = ring_file(tmp_path)
    guest = ScriptedGuest(path, answer=False)

    async def body() -> None:
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sending = asyncio.ensure_future(
            transfer.send_stdin(
                guest,  # type: ignore[arg-type]
                fd,
                pieces(os.urandom(6 * SLOT), SLOT),
                never,
                slots=Slots(RING, SLOT),
                ack_timeout=5,
            )
        )
        while len(guest.ranges) < 4:
            await asyncio.sleep(0.01)
        # What the process's output reader does with each STDIN_DONE: a lie raises there
        # (a MalformedMessage: the runtime ends such a guest's container).
        with pytest.raises(MalformedMessage, match=r"expected \(0, 65536\)"):
            guest.on_stdin_done(SLOT, SLOT)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending

    try:
        run(body())
    finally:
        os.close(fd)


def test_a_process_that_ends_early_stops_the_sender_without_its_end(tmp_path: Path) -> None:
    """The process exited (its reader task ended): the rest of the stream is dropped, as
    a pipe drops what nobody reads, and the sender returns instead of waiting."""
    path, fd = ring_file(tmp_path)
    guest = ScriptedGuest(path, answer=False)

    async def body() -> None:
        finished: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.1, finished.set_result, None)
        await transfer.send_stdin(
            guest,  # type: ignore[arg-type]
            fd,
            pieces(os.urandom(8 * SLOT), SLOT),
            finished,
            slots=Slots(RING, SLOT),
        )

    try:
        run(body())
        assert len(guest.ranges) == 4 and not guest.closed
    finally:
        os.close(fd)


def test_a_missing_ring_file_means_the_port(tmp_path: Path) -> None:
    assert transfer.TransferRing(tmp_path / "gone").open() is None


# -- the disk -------------------------------------------------------------------------------


@pytest.fixture
def bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake guest kernel and initramfs: machine_config only names them."""
    for name in ("vmlinux", "initrd"):
        (tmp_path / name).write_bytes(b"fake")
    monkeypatch.setenv("HUSK_KERNEL", str(tmp_path / "vmlinux"))
    monkeypatch.setenv("HUSK_INITRD", str(tmp_path / "initrd"))


def _sandbox_config(tmp_path: Path) -> SandboxConfig:
    for name in ("image", "upper"):
        (tmp_path / name).write_bytes(b"\0" * 4096)
    return SandboxConfig(
        state_dir=tmp_path / "vm",
        image_disk=tmp_path / "image",
        upper_disk=tmp_path / "upper",
        hostname="h",
        mac="02:11:22:33:44:55",
    )


@pytest.mark.usefixtures("bundle")
def test_every_vm_gets_the_ring_read_only_after_its_other_disks(tmp_path: Path) -> None:
    config = machine_config(_sandbox_config(tmp_path), lan_fds=tuple(range(20, 20 + LAN_SLOTS)))
    assert [disk.serial for disk in config.disks] == ["husk-image", "husk-upper", "husk-transfer"]
    ring = config.disks[-1]
    assert ring.path == tmp_path / "vm" / transfer.RING_FILE
    assert ring.readonly and ring.create_size == transfer.RING_BYTES
    argv = " ".join(
        build_command(config, binary="qemu", accel="tcg", qmp_fd=3, agent_fd=4, boot_time_ns=0)
    )
    assert "id=disk2,file=" in argv and "readonly=on" in argv.split("id=disk2,", 1)[1].split()[0]
    assert "virtio-blk-device,drive=disk2,serial=husk-transfer" in argv
    again = config_from_json(config_to_json(config))
    assert again.disks[-1] == ring  # a daemon that attaches again still knows it


def test_the_ring_is_created_sparse_and_empty_and_qemu_gets_it_read_only(
    tmp_path: Path,
) -> None:
    ring = ring_disk(tmp_path / "state")
    qemu._create_scratch_disks([ring])
    info = ring.path.stat()
    assert info.st_size == transfer.RING_BYTES and info.st_blocks == 0
    assert info.st_mode & 0o777 == 0o600
    ring.path.write_bytes(b"old copy")  # a previous VM's bytes are gone at the next boot
    qemu._create_scratch_disks([ring])
    assert ring.path.stat().st_blocks == 0 and ring.path.stat().st_size == transfer.RING_BYTES
    fds = open_disk(ring.path, ring.readonly)
    try:
        assert len(fds) == 1  # no writable descriptor exists for QEMU to use
        assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.usefixtures("bundle")
def test_the_ring_is_in_the_template_key_without_existing_yet(tmp_path: Path) -> None:
    class Backend:
        def version(self) -> str:
            return "7.2"

        def default_cpu_model(self, accel: str) -> str:
            return "qemu64"

    config = machine_config(_sandbox_config(tmp_path))
    config = type(config)(**{**config.__dict__, "accel": "tcg"})
    assert not config.disks[-1].path.exists()
    inputs = template_inputs(config, bundle_digest="d", backend=Backend())  # type: ignore[arg-type]
    assert inputs.disks[-1] == ("husk-transfer", True, "writeback", transfer.RING_BYTES)
    without = type(config)(**{**config.__dict__, "disks": config.disks[:-1]})
    old = template_inputs(without, bundle_digest="d", backend=Backend())  # type: ignore[arg-type]
    assert old.key != inputs.key  # a template saved without the ring is never restored


def test_a_scratch_disk_size_must_be_whole_blocks(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="bad scratch size"):
        DiskConfig(tmp_path / "r", "husk-transfer", readonly=True, create_size=1000)
