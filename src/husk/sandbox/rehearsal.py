"""The host's side of a pooled VM's rehearsal (the guest's: husk.guest.agent.rehearsal).

A VM restored from a template under TCG translates every guest path a start runs
for the first time; a pooled VM that has run one start path already serves the
real start with that code translated. Before a pooled VM is offered, its
placeholder disks get real file systems (a tiny erofs image holding one program
that exits 0, and an empty ext4 as the writable disk), and the agent rehearses
PREPARE and RUN on them and undoes both. The container's own disks replace the
placeholders when a start takes the VM, as before. Between the two, the agent also
applies and takes back a default-bridge NETWORK on LAN slot 1 (when the VM's network
is still as boot settled it).

The erofs image is built once per process (``mkfs.erofs``, a few kB) and copied
into each VM's image placeholder, which keeps its sparse template size.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
from pathlib import Path

from husk.agent.client import AgentClient
from husk.errors import GuestError
from husk.guest.protocol import MsgType
from husk.oci.rootfs import build_erofs, make_ext4_disk
from husk.sandbox.config import IMAGE_SERIAL, UPPER_SERIAL

PROGRAM = "/bin/true"
TIMEOUT = 30.0
"""How long the guest may take (under load, TCG): the agent kills its process at
GUEST_TIMEOUT, and the host gives up on the VM at TIMEOUT."""
GUEST_TIMEOUT = 20.0
UPPER_FS_BYTES = 64 * 1024 * 1024
SHM_BYTES = 64 * 1024 * 1024
"""/dev/shm's size, which every start's RUN sets (Docker's default, husk.confinement)."""
_VADDR = 0x400000
_lock = threading.Lock()
_image: bytes | None = None


def exit_zero_program() -> bytes:
    """A static x86-64 ELF executable that calls exit(0): the least an exec can run.

    Written out here rather than taken from the host, whose binaries may need a
    dynamic loader the rehearsal root does not have.
    """
    header_size, phdr_size = 64, 56
    # xor edi, edi (31 ff); mov eax, 60 (b8 3c 00 00 00); syscall (0f 05)
    code = bytes.fromhex("31ffb83c0000000f05")
    total = header_size + phdr_size + len(code)
    entry = _VADDR + header_size + phdr_size
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, header_size, 0, 0, header_size, phdr_size, 1, 0, 0, 0
    )
    # One PT_LOAD of the whole file, read + execute.
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, _VADDR, _VADDR, total, total, 0x1000)
    return header + phdr + code


def image_bytes() -> bytes:
    """The rehearsal's erofs image: /bin/true (above) and the directories PREPARE uses."""
    global _image
    with _lock:
        if _image is None:
            with tempfile.TemporaryDirectory(prefix="husk-rehearsal-") as scratch:
                tree = Path(scratch) / "root"
                for directory in ("bin", "etc", "dev", "proc", "sys", "tmp"):
                    (tree / directory).mkdir(parents=True, mode=0o755)
                # The workload's user is looked up there, as in an image.
                (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/true\n")
                (tree / "etc" / "group").write_text("root:x:0:\n")
                program = tree / PROGRAM.lstrip("/")
                program.write_bytes(exit_zero_program())
                program.chmod(0o755)
                disk = Path(scratch) / "root.erofs"
                build_erofs(tree, disk, all_root=True)
                _image = disk.read_bytes()
        return _image


def fill_placeholders(image_disk: Path, upper_disk: Path, upper_bytes: int) -> None:
    """Writes the rehearsal's file systems onto a pooled VM's (sparse) placeholders."""
    fd = os.open(image_disk, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, image_bytes(), 0)
    finally:
        os.close(fd)
    # A small file system on the full-size disk: the guest's ext4 would otherwise
    # spend the rehearsal zeroing a full-size disk's inode tables (lazy init).
    make_ext4_disk(upper_disk, min(UPPER_FS_BYTES, upper_bytes))
    os.truncate(upper_disk, upper_bytes)


async def rehearse(client: AgentClient) -> None:
    """Has the guest rehearse a start on its placeholders and undo it (GuestError if not)."""
    body = {
        "image": IMAGE_SERIAL,
        "upper": UPPER_SERIAL,
        "argv": [PROGRAM],
        "network": True,
        "shm_size": SHM_BYTES,
        "timeout": GUEST_TIMEOUT,
    }
    reply = await client.request(MsgType.REHEARSE, body, timeout=TIMEOUT)
    if reply.get("exit_code") != 0:
        raise GuestError(f"the rehearsal ended with {reply!r}")
