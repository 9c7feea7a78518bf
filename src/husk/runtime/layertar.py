"""A guest's layer tar (``commit``), checked and written again by the host.

The guest walks its writable layer and streams a tar (:mod:`husk.guest.agent.layer`);
the guest is not trusted, so nothing of its tar is stored as it came. Each entry is
checked (a relative, normalised name; a regular file, directory, symlink, hard link
to an earlier file of the same tar, or FIFO; no device node; no name twice; an
owner, mode and size in range; the whole bounded) and written anew into a gzip
layer: what lands in the store is a tar the host made, with OCI's whiteouts.

Extended attributes (PAX ``SCHILY.xattr.`` records) are carried for regular files and
directories when they are file capabilities (``security.capability``) or in the
``user.`` namespace, names and values bounded; any other (``trusted.``, ``security.``
others, ``system.``, a ``LIBARCHIVE.xattr.`` record) refuses the layer: those change
how the kernel treats a file, and a guest has no business setting them in an image.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from husk.errors import GuestError
from husk.oci.tarsafe import open_tar

MAX_NAME = 4096
MAX_ENTRIES = 1_000_000
MAX_ID = 2**32 - 2
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
XATTR_PREFIX = "SCHILY.xattr."
CAPABILITY = "security.capability"
CAPABILITY_KEY = XATTR_PREFIX + CAPABILITY
USER_XATTR = "user."
FOREIGN_XATTR_PREFIXES = ("LIBARCHIVE.xattr.",)
MAX_CAPABILITY = 64
MAX_XATTR_NAME = 255  # XATTR_NAME_MAX
MAX_XATTR_VALUE = 65536  # XATTR_SIZE_MAX
MAX_XATTRS = 64
"""Extended attributes of one entry at most."""
MAX_XATTR_BYTES = 65536
"""Names and values of one entry's extended attributes together at most (bytes)."""
_CHUNK = 1024 * 1024


class BadLayer(GuestError):
    """The guest's layer tar is not an acceptable one."""


@dataclass(frozen=True)
class Layer:
    path: Path
    diff_id: str  # sha256 of the uncompressed tar
    digest: str  # sha256 of the gzip blob
    size: int  # bytes of the gzip blob
    entries: int


def check_name(name: str) -> str:
    """``name`` normalised (no trailing slash); BadLayer unless it is a relative,
    normalised path without control characters."""
    if not name or len(name) > MAX_NAME:
        raise BadLayer(f"an entry name that is empty or too long: {name[:80]!r}")
    if name.startswith("/"):
        raise BadLayer(f"an absolute entry name: {name[:200]!r}")
    trimmed = name[:-1] if name.endswith("/") else name
    parts = trimmed.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BadLayer(f"an entry name that is not normalised: {name[:200]!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise BadLayer(f"an entry name with control characters: {name[:200]!r}")
    return trimmed


class _Hashing:
    """A write-only file object hashing what passes through to ``target``."""

    def __init__(self, target: IO[bytes]) -> None:
        self._target = target
        self.hasher = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        return self._target.write(data)


def _copy_member(source: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.mode = source.mode & 0o7777
    for owner in (source.uid, source.gid):
        if not 0 <= owner <= MAX_ID:
            raise BadLayer(f"entry {name!r} has an owner out of range: {owner}")
    member.uid, member.gid = source.uid, source.gid
    mtime = source.mtime
    member.mtime = int(mtime) if isinstance(mtime, int | float) and 0 <= mtime < 2**33 else 0
    return member


def rewrite(raw: IO[bytes], out_path: Path, *, max_bytes: int) -> Layer:
    """Reads the guest's tar from ``raw`` (at most ``max_bytes`` of file contents),
    writes the checked layer gzip-compressed to ``out_path``."""
    with open(out_path, "wb") as blob:
        blob_hash = _Hashing(blob)
        with gzip.GzipFile(fileobj=cast(IO[bytes], blob_hash), mode="wb", mtime=0) as zipped:
            plain = _Hashing(cast(IO[bytes], zipped))
            entries = _copy_all(raw, cast(IO[bytes], plain), max_bytes)
    diff_id = "sha256:" + plain.hasher.hexdigest()
    digest = "sha256:" + blob_hash.hasher.hexdigest()
    return Layer(out_path, diff_id, digest, out_path.stat().st_size, entries)


def _copy_all(raw: IO[bytes], plain: IO[bytes], max_bytes: int) -> int:
    seen: dict[str, str] = {}  # name -> "dir" | "implied" (a parent) | "file" | "other"
    total = entries = 0
    try:
        with (
            open_tar(raw, "r|") as source,
            tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as out,
        ):
            while (entry := source.next()) is not None:
                # TarFile remembers every header it reads or writes: a guest's million
                # entries would hold the daemon's memory (~1.3 GiB), so forget them.
                cast(Any, source).members.clear()
                cast(Any, out).members.clear()
                entries += 1
                if entries > MAX_ENTRIES:
                    raise BadLayer(f"more than {MAX_ENTRIES} entries")
                # Attribute values count with file contents: a layer of tiny files with
                # 64 KiB attributes each stays bounded as well.
                total += max(entry.size, 0) + sum(
                    len(value)
                    for key, value in (entry.pax_headers or {}).items()
                    if key.startswith(XATTR_PREFIX)
                )
                if total > max_bytes:
                    raise BadLayer(f"more than {max_bytes} bytes of files")
                _one(source, out, entry, seen)
    except (tarfile.TarError, EOFError) as exc:
        raise BadLayer(f"the guest's layer tar is broken: {exc}") from None
    return entries


def _one(
    source: tarfile.TarFile, out: tarfile.TarFile, entry: tarfile.TarInfo, seen: dict[str, str]
) -> None:
    name = check_name(entry.name)
    earlier = seen.get(name)
    if earlier == "implied" and not entry.isdir():
        raise BadLayer(f"entry {name!r} replaces a directory earlier entries are in")
    if earlier is not None and earlier != "implied":
        raise BadLayer(f"entry {name!r} appears twice")
    _check_parents(name, seen)
    member = _copy_member(entry, name)
    base = name.rpartition("/")[2]
    if base.startswith(WHITEOUT_PREFIX) and not (entry.isreg() and entry.size == 0):
        raise BadLayer(f"whiteout {name!r} is not an empty file")
    if (
        base.startswith(WHITEOUT_PREFIX)
        and base != OPAQUE_MARKER
        and len(base) == len(WHITEOUT_PREFIX)
    ):
        raise BadLayer(f"whiteout {name!r} names nothing")
    if entry.isreg():
        member.type = tarfile.REGTYPE
        member.size = entry.size
        member.pax_headers = checked_xattrs(name, entry)
        data = source.extractfile(entry)
        if data is None:
            raise BadLayer(f"entry {name!r} has no contents")
        out.addfile(member, data)
        seen[name] = "file"
        return
    xattrs = checked_xattrs(name, entry)
    if entry.isdir():
        member.type = tarfile.DIRTYPE
        member.pax_headers = xattrs
        seen[name] = "dir"
    elif xattrs:
        # Linux allows user.* attributes on files and directories only.
        raise BadLayer(f"entry {name!r} has extended attributes but is no file or directory")
    elif entry.issym():
        if not entry.linkname or len(entry.linkname) > MAX_NAME or "\0" in entry.linkname:
            raise BadLayer(f"symlink {name!r} has an unusable target")
        member.type = tarfile.SYMTYPE
        member.linkname = entry.linkname
        seen[name] = "other"
    elif entry.islnk():
        target = check_name(entry.linkname)
        if seen.get(target) != "file":
            raise BadLayer(f"hard link {name!r} to {target!r}, not an earlier file of the layer")
        member.type = tarfile.LNKTYPE
        member.linkname = target
        seen[name] = "file"
    elif entry.isfifo():
        member.type = tarfile.FIFOTYPE
        seen[name] = "other"
    elif entry.ischr() or entry.isblk():
        raise BadLayer(f"entry {name!r} is a device node: not supported in a committed layer")
    else:
        raise BadLayer(f"entry {name!r} has an unsupported type {entry.type!r}")
    out.addfile(member)


def _check_parents(name: str, seen: dict[str, str]) -> None:
    """BadLayer when any directory above ``name`` is an earlier non-directory entry (a
    symlink ``a``, then ``a/b/c``: an unpacker could write through it); parents the
    layer leaves implied are remembered, so a later entry cannot turn them into one."""
    parent = name.rpartition("/")[0]
    while parent:
        kind = seen.get(parent)
        if kind in ("dir", "implied"):
            return  # its own parents were checked when it was recorded
        if kind is not None:
            raise BadLayer(f"entry {name!r} is below {parent!r}, which is not a directory")
        seen[parent] = "implied"
        parent = parent.rpartition("/")[0]


def checked_xattrs(name: str, entry: tarfile.TarInfo) -> dict[str, str]:
    """The PAX records of ``entry``'s extended attributes a layer may carry; BadLayer for
    any other extended attribute, or beyond the bounds."""
    kept: dict[str, str] = {}
    total = 0
    for key, value in (entry.pax_headers or {}).items():
        if key.startswith(FOREIGN_XATTR_PREFIXES):
            raise BadLayer(f"entry {name!r} has an extended attribute record {key[:80]!r}")
        if not key.startswith(XATTR_PREFIX):
            continue  # standard PAX fields (path, size, mtime, ...): taken by tarfile
        attribute = key[len(XATTR_PREFIX) :]
        raw = value.encode("utf-8", "surrogateescape")
        if attribute == CAPABILITY:
            if len(raw) > MAX_CAPABILITY:
                raise BadLayer(f"entry {name!r} has an oversized file capability")
        elif attribute.startswith(USER_XATTR) and len(attribute) > len(USER_XATTR):
            if len(attribute.encode("utf-8", "surrogateescape")) > MAX_XATTR_NAME:
                raise BadLayer(f"entry {name!r} has an extended attribute name that is too long")
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in attribute):
                raise BadLayer(
                    f"entry {name!r} has an extended attribute name with control characters"
                )
            if len(raw) > MAX_XATTR_VALUE:
                raise BadLayer(f"entry {name!r}: extended attribute {attribute!r} is too large")
        else:
            raise BadLayer(
                f"entry {name!r} has the extended attribute {attribute[:80]!r}: only"
                f" {CAPABILITY} and user.* ones are supported in a committed layer"
            )
        kept[key] = value
        total += len(attribute) + len(raw)
        if len(kept) > MAX_XATTRS or total > MAX_XATTR_BYTES:
            raise BadLayer(f"entry {name!r} has too many extended attributes")
    return kept
