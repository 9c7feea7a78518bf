"""Just enough ELF64 reading for the bundle: sections and notes.

Kernel modules keep their metadata in the ``.modinfo`` section and vmlinux
advertises its PVH entry point in an ELF note; both are read here without any
external tool so the build depends only on the Debian packages.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION = struct.Struct("<IIQQQQIIQQ")
_PROGRAM = struct.Struct("<IIQQQQQQ")
_NOTE = struct.Struct("<III")
PT_NOTE = 4


class ElfError(ValueError):
    """The data is not a little-endian ELF64 file we can read."""


@dataclass(frozen=True)
class _Header:
    shoff: int
    shentsize: int
    shnum: int
    shstrndx: int
    phoff: int
    phentsize: int
    phnum: int


def _parse_header(raw: bytes) -> _Header:
    if len(raw) < _HEADER.size or raw[:4] != ELF_MAGIC:
        raise ElfError("not an ELF file")
    if raw[4] != _ELFCLASS64 or raw[5] != _ELFDATA2LSB:
        raise ElfError("not a little-endian 64-bit ELF file")
    fields = _HEADER.unpack_from(raw)
    return _Header(
        phoff=fields[5],
        shoff=fields[6],
        phentsize=fields[9],
        phnum=fields[10],
        shentsize=fields[11],
        shnum=fields[12],
        shstrndx=fields[13],
    )


def _read_at(stream: BinaryIO, offset: int, size: int) -> bytes:
    stream.seek(offset)
    data = stream.read(size)
    if len(data) != size:
        raise ElfError("truncated ELF file")
    return data


def read_section(stream: BinaryIO, name: str) -> bytes | None:
    """The contents of the section called ``name``, or None if there is none.

    Reads only the headers and that section, so scanning thousands of kernel
    modules stays cheap.
    """
    header = _parse_header(_read_at(stream, 0, _HEADER.size))
    if header.shnum == 0 or header.shentsize != _SECTION.size:
        return None
    table = _read_at(stream, header.shoff, header.shnum * _SECTION.size)
    sections = [_SECTION.unpack_from(table, index * _SECTION.size) for index in range(header.shnum)]
    names_section = sections[header.shstrndx]
    names = _read_at(stream, names_section[4], names_section[5])
    wanted = name.encode()
    for section in sections:
        start = section[0]
        end = names.find(b"\0", start)
        if names[start:end] == wanted:
            return _read_at(stream, section[4], section[5])
    return None


@dataclass(frozen=True)
class Note:
    name: bytes
    type: int
    desc: bytes


def _align4(value: int) -> int:
    return (value + 3) & ~3


def iter_notes(data: bytes) -> Iterator[Note]:
    """Every note in the PT_NOTE segments of an ELF image held in memory."""
    header = _parse_header(data)
    for index in range(header.phnum):
        offset = header.phoff + index * header.phentsize
        if offset + _PROGRAM.size > len(data):
            raise ElfError("truncated ELF program headers")
        p_type, _, p_offset, _, _, p_filesz, _, _ = _PROGRAM.unpack_from(data, offset)
        if p_type != PT_NOTE:
            continue
        position, end = p_offset, min(p_offset + p_filesz, len(data))
        while position + _NOTE.size <= end:
            namesz, descsz, note_type = _NOTE.unpack_from(data, position)
            position += _NOTE.size
            name = data[position : position + namesz].rstrip(b"\0")
            position += _align4(namesz)
            desc = data[position : position + descsz]
            position += _align4(descsz)
            yield Note(name=name, type=note_type, desc=desc)
