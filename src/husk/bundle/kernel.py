"""Turn Debian's compressed bzImage into the uncompressed ELF vmlinux QEMU boots via PVH.

Booting vmlinux directly skips the kernel's own decompressor, which costs
seconds under TCG. The Debian kernel is built with CONFIG_KERNEL_XZ and
CONFIG_PVH, so the bzImage carries an XZ stream whose content is that ELF file.
"""

from __future__ import annotations

import lzma
import struct

from husk.bundle.elf import ElfError, iter_notes
from husk.errors import BundleError

_XZ_MAGIC = b"\xfd7zXZ\x00"
_SETUP_SECTS = 0x1F1
_HEADER_MAGIC_AT = 0x202
_PAYLOAD_AT = 0x248
XEN_NOTE_NAME = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _payload_start(bzimage: bytes) -> int:
    """Where the XZ stream starts: from the boot header, else by searching for its magic."""
    if (
        len(bzimage) > _PAYLOAD_AT + 8
        and bzimage[_HEADER_MAGIC_AT : _HEADER_MAGIC_AT + 4] == b"HdrS"
    ):
        setup_sects = bzimage[_SETUP_SECTS] or 4
        payload_offset: int = struct.unpack_from("<I", bzimage, _PAYLOAD_AT)[0]
        start = (setup_sects + 1) * 512 + payload_offset
        if bzimage[start : start + len(_XZ_MAGIC)] == _XZ_MAGIC:
            return start
    start = bzimage.find(_XZ_MAGIC)
    if start < 0:
        raise BundleError("kernel image has no XZ-compressed payload (expected CONFIG_KERNEL_XZ)")
    return start


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux inside ``bzimage``; raises BundleError unless it is PVH-bootable."""
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        # Whatever follows the stream (size trailer, padding) lands in unused_data.
        vmlinux = decompressor.decompress(bzimage[_payload_start(bzimage) :])
    except lzma.LZMAError as err:
        raise BundleError(f"cannot decompress the kernel's XZ payload: {err}") from err
    if not decompressor.eof:
        raise BundleError("kernel XZ payload is truncated")
    require_pvh(vmlinux)
    return trim_zero_tails(vmlinux)


_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")
_PT_LOAD = 1
_PAGE = 4096


def trim_zero_tails(vmlinux: bytes) -> bytes:
    """Shrinks each loadable segment's file size to exclude its trailing zero bytes.

    The decompressor's vmlinux stores .bss, .brk and .init.scratch (over 20 MB of
    zeros) inside the last segment. QEMU keeps a copy of every loaded byte for
    resets; with a smaller p_filesz it zero-fills the rest instead, which gives the
    guest identical memory and saves that much host memory per VM.
    """
    if vmlinux[:4] != b"\x7fELF" or vmlinux[4] != 2:
        return vmlinux
    header = _ELF64_HEADER.unpack_from(vmlinux)
    phoff, phentsize, phnum = header[5], header[9], header[10]
    image = bytearray(vmlinux)
    for index in range(phnum):
        at = phoff + index * phentsize
        p_type, flags, offset, vaddr, paddr, filesz, memsz, align = _ELF64_PHDR.unpack_from(
            image, at
        )
        if p_type != _PT_LOAD or filesz == 0:
            continue
        end = offset + filesz
        segment = memoryview(image)[offset:end]
        keep = len(bytes(segment).rstrip(b"\0"))
        keep = min(filesz, (keep + _PAGE - 1) // _PAGE * _PAGE)
        if keep < filesz:
            _ELF64_PHDR.pack_into(
                image, at, p_type, flags, offset, vaddr, paddr, keep, memsz, align
            )
    return bytes(image)


def has_pvh_entry(vmlinux: bytes) -> bool:
    """Whether the ELF image carries XEN_ELFNOTE_PHYS32_ENTRY, QEMU's PVH entry point."""
    return any(
        note.name == XEN_NOTE_NAME and note.type == XEN_ELFNOTE_PHYS32_ENTRY
        for note in iter_notes(vmlinux)
    )


def require_pvh(vmlinux: bytes) -> None:
    try:
        pvh = has_pvh_entry(vmlinux)
    except ElfError as err:
        raise BundleError(f"decompressed kernel is not a usable ELF vmlinux: {err}") from err
    if not pvh:
        raise BundleError("kernel has no PVH entry note (needs CONFIG_PVH=y)")
