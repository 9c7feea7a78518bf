"""A deterministic writer for the newc ("070701") cpio format the kernel unpacks.

The archive depends only on the entries given: they are sorted by path, owned
by root, stamped with one fixed mtime and numbered with sequential inodes, so
the same tree always yields the same bytes. Device nodes are plain entries,
which is why building an initramfs needs no mknod and no root.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. ``path`` is relative ("bin/sh"); ``mode`` includes the file type."""

    path: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def directory(path: str, permissions: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | permissions)


def regular(path: str, data: bytes, permissions: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | permissions, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, permissions: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | permissions, rdev_major=major, rdev_minor=minor)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(*, ino: int, entry: Entry, nlink: int, mtime: int, name_size: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        mtime,
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        name_size,
        0,  # check
    )
    return _MAGIC + b"".join(b"%08X" % value for value in fields)


def _write_member(out: BinaryIO, entry: Entry, ino: int, mtime: int) -> None:
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    header = _header(ino=ino, entry=entry, nlink=nlink, mtime=mtime, name_size=len(name))
    out.write(header + name + _pad(len(header) + len(name)))
    out.write(entry.data + _pad(len(entry.data)))


def write_newc(out: BinaryIO, entries: Iterable[Entry], *, mtime: int = 0) -> None:
    """Write ``entries`` (sorted, so parents precede children) and the trailer."""
    members = sorted(entries, key=lambda entry: entry.path)
    seen: set[str] = set()
    for member in members:
        if member.path in seen or not member.path or member.path.startswith("/"):
            raise ValueError(f"bad or duplicate cpio path: {member.path!r}")
        seen.add(member.path)
    for ino, member in enumerate(members, start=1):
        _write_member(out, member, ino, mtime)
    _write_member(out, Entry(_TRAILER, 0), 0, 0)
