"""Extract tar members below one directory, and nowhere else, whatever the archive says.

One set of rules for every tar husk unpacks on the host: image layers
(:mod:`husk.oci.unpack`) and archives a guest sends (``husk cp CONTAINER:…``).
Both are hostile input.

- Names are split into components. ``..`` is refused; a leading ``/`` is refused
  (or dropped, for image layers, as Docker and containerd do); a NUL byte, a
  component over 255 bytes or a name over 4095 bytes is refused.
- Every directory on the way is opened relative to its parent with
  ``O_NOFOLLOW`` (an openat walk from the destination), so a symbolic link,
  whether the archive made it or it was there before, is never followed: an
  entry below one is refused. The last component is created afresh
  (``O_CREAT | O_EXCL | O_NOFOLLOW``) after removing what was there, so nothing
  is ever written through a link, soft or hard.
- A hard link must point at a non-directory below the destination, found by the
  same walk; unless :attr:`ExtractPolicy.links_to_existing`, only at one this
  archive extracted.
- Device nodes and FIFOs, ownership, setuid/setgid bits, extended attributes
  and sparse files are each allowed only when the policy says so.

Directory modes, owners and times are applied last, deepest first, so that a
read-only directory in the archive does not stop its own contents from being
written.

:func:`extract_archive` checks every header of a seekable archive before it
writes anything (names, types, links within the archive), then extracts it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import logging
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import unquote

from husk.errors import Conflict, InvalidArgument, NotSupported
from husk.oci.tarsafe import open_tar

__all__ = [
    "BadEntry",
    "ExtractPolicy",
    "Mapped",
    "TarExtractor",
    "TopMapper",
    "UnsafeEntry",
    "extract_archive",
    "split_name",
]

NAME_MAX = 255
"""Bytes in one path component (Linux NAME_MAX)."""
PATH_MAX = 4095
"""Bytes in a whole name or symlink target (Linux PATH_MAX, without its NUL)."""
MAX_ID = 2**32 - 2
"""Largest uid/gid chown accepts (-1, i.e. 2**32 - 1, means "unchanged")."""
COPY_CHUNK = 1 << 20
DIR_CACHE = 64
"""Directory file descriptors kept open between entries (tar entries cluster by directory)."""

_SCHILY_XATTR = "SCHILY.xattr."
_LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."
# Overlay metadata would change how the guest's overlayfs reads an image.
_SKIPPED_XATTR_PREFIXES = ("trusted.overlay.",)
_DEVICE_TYPES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK}
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NODE_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MTIME_LIMIT = 2**62  # nanoseconds: far beyond any real date, well inside what utime takes


class UnsafeEntry(InvalidArgument):
    """An entry that would land outside the destination or write through a link."""


class BadEntry(InvalidArgument):
    """An entry that is malformed or not allowed (missing link target, refused type)."""


@dataclass(frozen=True)
class ExtractPolicy:
    """What an archive may do beyond regular files, directories and links inside the tree."""

    keep_owner: bool = False
    """chown entries to the archive's uid/gid (only meaningful as root)."""
    keep_setid: bool = False
    """Keep setuid/setgid bits; without it they are cleared."""
    special_files: bool = False
    """Create device nodes and FIFOs; without it they are refused."""
    xattrs: bool = False
    """Set the extended attributes the archive carries (PAX SCHILY/LIBARCHIVE records)."""
    strip_absolute: bool = False
    """Drop a leading ``/`` from names (image layers); without it absolute names are refused."""
    links_to_existing: bool = False
    """Hard links may point at files that were in the tree before this archive."""
    replace_mismatched: bool = False
    """An entry replaces whatever is at its path, a whole directory tree included. Without it
    a directory never replaces a non-directory nor the reverse (Docker's NoOverwriteDirNonDir)."""
    sparse: bool = False
    """Accept GNU/PAX sparse files (their declared size may dwarf the archive)."""


def layer_policy() -> ExtractPolicy:
    """Image layers: everything a root filesystem holds. Owners are kept only as root;
    setuid bits either way (a tree unpacked without root is recorded root-owned in the
    erofs image, so its setuid files stay what the image meant)."""
    return ExtractPolicy(
        keep_owner=os.geteuid() == 0,
        keep_setid=True,
        special_files=True,
        xattrs=True,
        strip_absolute=True,
        links_to_existing=True,
        replace_mismatched=True,
        sparse=True,
    )


# ------------------------------------------------------------------ names


def split_name(name: str, label: str, what: str, *, strip_absolute: bool) -> list[str]:
    """``name`` as path components below the destination ([] is the destination itself)."""
    if "\0" in name:
        raise UnsafeEntry(f"{label}: {what} {name!r} contains a NUL byte; refusing it")
    if name.startswith("/") and not strip_absolute:
        raise UnsafeEntry(f"{label}: {what} {name!r} is an absolute path; refusing it")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeEntry(f"{label}: {what} {name!r} contains '..'; refusing it")
    check_length(parts, label, what, name)
    return parts


def check_length(parts: list[str], label: str, what: str, name: str) -> None:
    total = -1
    for part in parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise BadEntry(
                f"{label}: {what} {name[:80]!r}… has a component of {size} bytes "
                f"(at most {NAME_MAX}); refusing it"
            )
        total += size + 1
    if total > PATH_MAX:
        raise BadEntry(
            f"{label}: {what} {name[:80]!r}… is {total} bytes long (at most {PATH_MAX}); "
            "refusing it"
        )


def _rel(parts: list[str]) -> str:
    return "/".join(parts)


# --------------------------------------------------------------- metadata


def mtime_ns(member: tarfile.TarInfo) -> int:
    """The entry's mtime in nanoseconds (PAX sub-second precision kept), clamped to sanity."""
    value: Decimal | None = None
    text = member.pax_headers.get("mtime")
    if text is not None:
        with contextlib.suppress(InvalidOperation, ValueError):
            value = Decimal(text)
    if value is None or not value.is_finite():
        try:
            value = Decimal(str(member.mtime))
        except (InvalidOperation, ValueError):
            return 0
    if not value.is_finite():
        return 0
    ns = int(value * 1_000_000_000)
    return max(-_MTIME_LIMIT, min(_MTIME_LIMIT, ns))


def xattrs_of(member: tarfile.TarInfo) -> dict[str, bytes]:
    if not member.pax_headers:
        return {}

    found: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith(_SCHILY_XATTR):
            # tarfile decodes PAX values as UTF-8 with surrogateescape: undo it.
            found[key[len(_SCHILY_XATTR) :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith(_LIBARCHIVE_XATTR):
            name = unquote(key[len(_LIBARCHIVE_XATTR) :])
            raw = value.encode("ascii", "surrogateescape")
            with contextlib.suppress(binascii.Error, ValueError):
                found.setdefault(name, base64.b64decode(raw + b"=" * (-len(raw) % 4)))
    return {k: v for k, v in found.items() if not k.startswith(_SKIPPED_XATTR_PREFIXES)}


def _proc(fd: int) -> str:
    """A path naming what an ``O_PATH`` descriptor refers to (chmod/chown/utime need one)."""
    return f"/proc/self/fd/{fd}"


@dataclass
class _DirMeta:
    mode: int
    uid: int
    gid: int
    mtime_ns: int | None
    xattrs: dict[str, bytes]
    label: str


def check_type(member: tarfile.TarInfo, policy: ExtractPolicy, label: str) -> None:
    """Refuse entry types the policy does not allow, and malformed numeric fields."""
    name = member.name
    if member.type in _DEVICE_TYPES and not policy.special_files:
        raise UnsafeEntry(f"{label}: entry {name!r} is a device node; refusing it")
    if member.isfifo() and not policy.special_files:
        raise UnsafeEntry(f"{label}: entry {name!r} is a FIFO; refusing it")
    if member.issparse() and not policy.sparse:
        raise BadEntry(f"{label}: entry {name!r} is a sparse file; refusing it")
    if not (
        member.isreg()
        or member.isdir()
        or member.issym()
        or member.islnk()
        or member.isfifo()
        or member.type in _DEVICE_TYPES
    ):
        raise BadEntry(f"{label}: entry {name!r} has unsupported type {member.type!r}")
    if member.size < 0:
        raise BadEntry(f"{label}: entry {name!r} has a negative size")
    if policy.keep_owner and not (0 <= member.uid <= MAX_ID and 0 <= member.gid <= MAX_ID):
        raise BadEntry(f"{label}: entry {name!r} has an invalid owner {member.uid}:{member.gid}")
    if member.issym():
        if "\0" in member.linkname:
            raise UnsafeEntry(f"{label}: symbolic link {name!r} has a NUL byte in its target")
        if not member.linkname or len(os.fsencode(member.linkname)) > PATH_MAX:
            raise BadEntry(f"{label}: symbolic link {name!r} has an empty or overlong target")


# -------------------------------------------------------------- extractor


class TarExtractor:
    """Applies tar entries, in order, below ``root``; never outside it.

    ``label`` starts every error message; ``origin`` ("image", "archive") names
    what a hard link's target is missing from. Use as a context manager (it
    holds directory descriptors) and call :meth:`finish` after the last entry.
    """

    def __init__(
        self,
        root: Path,
        policy: ExtractPolicy,
        *,
        label: str,
        origin: str = "archive",
        track_written: bool = False,
    ) -> None:
        self.policy = policy
        self.label = label
        self.origin = origin
        self.root = os.path.abspath(root)
        # The destination itself may be reached through the caller's own symlinks.
        self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs: dict[str, int] = {}
        self._dir_meta: dict[str, _DirMeta] = {}
        # Memory grows with the entry count only where a rule needs it.
        self._track_extracted = not policy.links_to_existing
        self._extracted: set[str] = set()
        """Non-directories this extractor created (what a hard link may point at)."""
        self._track_written = track_written
        self.written: set[str] = set()
        """With ``track_written``, every path an entry was applied to (image layers:
        whiteouts must spare them)."""

    def __enter__(self) -> TarExtractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # ----------------------------------------------------------- paths

    def parts(self, name: str, what: str = "entry") -> list[str]:
        return split_name(name, self.label, what, strip_absolute=self.policy.strip_absolute)

    def _trim_cache(self) -> None:
        while len(self._dirs) > DIR_CACHE:
            oldest = next(iter(self._dirs))
            os.close(self._dirs.pop(oldest))

    def _forget_tree(self, rel: str) -> None:
        """Drop what is known about the directory ``rel`` and everything below it."""
        prefix = rel + "/"
        for key in [k for k in self._dirs if k == rel or k.startswith(prefix)]:
            os.close(self._dirs.pop(key))
        for key in [k for k in self._dir_meta if k == rel or k.startswith(prefix)]:
            del self._dir_meta[key]
        if self._extracted:
            self._extracted = {k for k in self._extracted if not k.startswith(prefix)}

    def directory(self, parts: list[str], name: str, *, create: bool) -> int | None:
        """A descriptor (owned by the cache: do not close) of the directory ``parts``.

        Each missing component is created (0700 until :meth:`finish`) when
        ``create``; otherwise None is returned. A component that is a symbolic
        link refuses the entry ``name``; one that is another non-directory is a
        :class:`BadEntry`.
        """
        if not parts:
            return self._root_fd
        rel = _rel(parts)
        cached = self._dirs.get(rel)
        if cached is not None:
            return cached
        start = len(parts) - 1
        while start > 0 and _rel(parts[:start]) not in self._dirs:
            start -= 1
        fd = self._dirs[_rel(parts[:start])] if start else self._root_fd
        owned = False
        try:
            for index in range(start, len(parts)):
                child = self._open_child(fd, parts, index, name, create=create)
                if owned:
                    os.close(fd)
                if child is None:
                    return None
                fd, owned = child, True
        except BaseException:
            if owned:
                os.close(fd)
            raise
        self._dirs[rel] = fd
        return fd

    def _open_child(
        self, parent: int, parts: list[str], index: int, name: str, *, create: bool
    ) -> int | None:
        part = parts[index]
        try:
            return os.open(part, _WALK_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as err:
            if err.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            self._refuse_non_directory(parent, parts[: index + 1], name)
        os.mkdir(part, 0o700, dir_fd=parent)
        rel = _rel(parts[: index + 1])
        # An implied parent: the extracting user's, 0755, as tar and Docker make them.
        self._dir_meta.setdefault(rel, _DirMeta(0o755, -1, -1, None, {}, label=rel))
        return os.open(part, _WALK_FLAGS, dir_fd=parent)

    def _refuse_non_directory(self, parent: int, parts: list[str], name: str) -> None:
        rel = _rel(parts)
        mode = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            raise UnsafeEntry(
                f"{self.label}: entry {name!r} would be written through the symbolic "
                f"link {rel!r}; refusing it"
            )
        raise BadEntry(f"{self.label}: entry {name!r}: {rel!r} is not a directory")

    def lstat(self, parts: list[str], name: str) -> os.stat_result | None:
        """lstat of ``parts`` without following any link; None when it does not exist."""
        parent = self.directory(parts[:-1], name, create=False)
        if parent is None:
            return None
        try:
            return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def remove(self, parts: list[str], name: str, *, for_directory: bool = False) -> None:
        """Remove whatever is at ``parts`` (never following links) so an entry can take it.

        Without ``replace_mismatched``, a directory is never replaced by a
        non-directory nor the reverse, and an existing directory is kept for a
        directory entry.
        """
        parent = self.directory(parts[:-1], name, create=True)
        assert parent is not None
        try:
            mode = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return
        rel = _rel(parts)
        if stat.S_ISDIR(mode) and for_directory:
            return
        if not self.policy.replace_mismatched and stat.S_ISDIR(mode) != for_directory:
            if for_directory:
                raise Conflict(
                    f"{self.label}: cannot overwrite non-directory {rel!r} with directory {name!r}"
                )
            raise Conflict(
                f"{self.label}: cannot overwrite directory {rel!r} with non-directory {name!r}"
            )
        if stat.S_ISDIR(mode):
            self._forget_tree(rel)
            shutil.rmtree(parts[-1], dir_fd=parent)
        else:
            self._extracted.discard(rel)
            os.unlink(parts[-1], dir_fd=parent)

    def list_directory(self, parts: list[str], name: str) -> list[tuple[str, bool]] | None:
        """(child, is a real directory) of the directory ``parts``; None if it is not one."""
        try:
            fd = self.directory(parts, name, create=False)
        except InvalidArgument:
            return None
        if fd is None:
            return None
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            with os.scandir(listing) as entries:
                return [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        finally:
            os.close(listing)

    # ----------------------------------------------------------- entries

    def extract(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        parts: list[str] | None = None,
        link_parts: list[str] | None = None,
    ) -> None:
        """Apply one entry at ``parts`` (default: its own name); a hard link's target is
        ``link_parts`` (default: its own linkname)."""
        self._trim_cache()
        check_type(member, self.policy, self.label)
        if parts is None:
            parts = self.parts(member.name)
        rel = _rel(parts)
        if member.isdir():
            self._make_dir(parts, member)
        elif not parts:
            raise UnsafeEntry(
                f"{self.label}: entry {member.name!r} would replace the destination directory"
            )
        elif member.islnk():
            if link_parts is None:
                link_parts = self.parts(member.linkname, "hard link target")
            self._make_hardlink(parts, link_parts, member)
            if self._track_extracted:
                self._extracted.add(rel)
        else:
            self.remove(parts, member.name)
            parent = self.directory(parts[:-1], member.name, create=True)
            assert parent is not None
            if member.isreg():
                self._write_file(parent, parts[-1], tar, member)
            elif member.issym():
                os.symlink(member.linkname, parts[-1], dir_fd=parent)
                self._set_node_metadata(parent, parts[-1], member, symlink=True)
            else:
                self._make_node(parent, parts[-1], member)
            if self._track_extracted:
                self._extracted.add(rel)
        if self._track_written:
            self.written.add(rel)

    def _mode(self, member: tarfile.TarInfo) -> int:
        mode = member.mode & 0o7777
        return mode if self.policy.keep_setid else mode & ~(stat.S_ISUID | stat.S_ISGID)

    def _owner(self, member: tarfile.TarInfo) -> tuple[int, int]:
        return (member.uid, member.gid) if self.policy.keep_owner else (-1, -1)

    def _xattrs(self, member: tarfile.TarInfo) -> dict[str, bytes]:
        return xattrs_of(member) if self.policy.xattrs else {}

    def _set_xattrs(
        self, target: int | str, xattrs: dict[str, bytes], what: str, *, follow: bool = False
    ) -> None:
        """Set ``xattrs`` on a descriptor, or on a path whose last component is followed
        only with ``follow`` (a /proc/self/fd magic link must be)."""
        for key, value in xattrs.items():
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=follow)
            except OSError as err:
                if err.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                logging.getLogger(__name__).warning(
                    "%s: xattr %s on %s not kept: %s", self.label, key, what, err
                )

    def _make_dir(self, parts: list[str], member: tarfile.TarInfo) -> None:
        uid, gid = self._owner(member)
        meta = _DirMeta(
            self._mode(member), uid, gid, mtime_ns(member), self._xattrs(member), member.name
        )
        if parts:
            self.remove(parts, member.name, for_directory=True)
            parent = self.directory(parts[:-1], member.name, create=True)
            assert parent is not None
            with contextlib.suppress(FileExistsError):
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
            self.directory(parts, member.name, create=False)  # a real directory, now cached
        self._dir_meta[_rel(parts)] = meta

    def _write_file(
        self, parent: int, base: str, tar: tarfile.TarFile, member: tarfile.TarInfo
    ) -> None:
        fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=parent)
        try:
            if member.size:
                source = tar.extractfile(member)
                if source is None:
                    raise BadEntry(f"{self.label}: no data for {member.name!r}")
                with source:
                    while chunk := source.read(COPY_CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
            uid, gid = self._owner(member)
            if uid >= 0:
                os.fchown(fd, uid, gid)
            # After chown: the kernel clears setuid/setgid on a change of owner.
            os.fchmod(fd, self._mode(member))
            self._set_xattrs(fd, self._xattrs(member), member.name)
            ns = mtime_ns(member)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def _make_node(self, parent: int, base: str, member: tarfile.TarInfo) -> None:
        kind = stat.S_IFIFO if member.isfifo() else _DEVICE_TYPES[member.type]
        device = os.makedev(member.devmajor, member.devminor) if kind != stat.S_IFIFO else 0
        try:
            os.mknod(base, kind | 0o600, device, dir_fd=parent)
        except PermissionError:
            raise NotSupported(
                f"{self.label}: creating device node {member.name!r} needs root"
            ) from None
        self._set_node_metadata(parent, base, member, symlink=False)

    def _set_node_metadata(
        self, parent: int, base: str, member: tarfile.TarInfo, *, symlink: bool
    ) -> None:
        uid, gid = self._owner(member)
        if uid >= 0:
            os.chown(base, uid, gid, dir_fd=parent, follow_symlinks=False)
        if not symlink:
            # Linux has no lchmod: change the node through an O_PATH descriptor of it.
            fd = os.open(base, _NODE_FLAGS, dir_fd=parent)
            try:
                if stat.S_IFMT(os.fstat(fd).st_mode) != stat.S_IFMT(
                    stat.S_IFIFO if member.isfifo() else _DEVICE_TYPES[member.type]
                ):
                    raise UnsafeEntry(f"{self.label}: {member.name!r} changed while extracted")
                os.chmod(_proc(fd), self._mode(member))
            finally:
                os.close(fd)
        xattrs = self._xattrs(member)
        if xattrs:
            self._set_xattrs(f"{_proc(parent)}/{base}", xattrs, member.name)
        ns = mtime_ns(member)
        os.utime(base, ns=(ns, ns), dir_fd=parent, follow_symlinks=False)

    def _make_hardlink(
        self, parts: list[str], target_parts: list[str], member: tarfile.TarInfo
    ) -> None:
        target_rel = _rel(target_parts)
        missing = BadEntry(
            f"{self.label}: hard link {member.name!r} points to {member.linkname!r}, "
            f"which is not in the {self.origin}"
        )
        if not target_parts:
            raise UnsafeEntry(
                f"{self.label}: hard link {member.name!r} points at the destination directory"
            )
        if not self.policy.links_to_existing and target_rel not in self._extracted:
            raise missing
        target_parent = self.directory(target_parts[:-1], member.linkname, create=False)
        if target_parent is None:
            raise missing
        try:
            target_stat = os.stat(target_parts[-1], dir_fd=target_parent, follow_symlinks=False)
        except FileNotFoundError:
            raise missing from None
        if stat.S_ISDIR(target_stat.st_mode):
            raise UnsafeEntry(
                f"{self.label}: hard link {member.name!r} points to the directory "
                f"{member.linkname!r}"
            )
        current = self.lstat(parts, member.name)
        if current is not None and os.path.samestat(current, target_stat):
            return
        self.remove(parts, member.name)
        parent = self.directory(parts[:-1], member.name, create=True)
        # remove() may have dropped cached descriptors below the link: look the target up again.
        target_parent = self.directory(target_parts[:-1], member.linkname, create=False)
        if target_parent is None:
            raise missing
        os.link(
            target_parts[-1],
            parts[-1],
            src_dir_fd=target_parent,
            dst_dir_fd=parent,
            follow_symlinks=False,
        )

    # ------------------------------------------------------------- finish

    def finish(self) -> None:
        """Apply directory modes, owners and times, deepest first."""
        for rel in sorted(self._dir_meta, key=lambda r: -r.count("/") - (1 if r else 0)):
            meta = self._dir_meta[rel]
            parts = rel.split("/") if rel else []
            try:
                fd = self.directory(parts, meta.label, create=False)
            except InvalidArgument:
                continue  # replaced by a non-directory since: nothing to set
            if fd is None:
                continue
            path = _proc(fd)
            if meta.uid >= 0:
                os.chown(path, meta.uid, meta.gid)
            os.chmod(path, meta.mode)
            self._set_xattrs(path, meta.xattrs, meta.label, follow=True)
            if meta.mtime_ns is not None:
                os.utime(path, ns=(meta.mtime_ns, meta.mtime_ns))
        self._dir_meta.clear()


# ------------------------------------------------------- whole archives

Mapped = tuple[list[str], list[str] | None] | None
"""Where an entry goes: (its path components, a hard link's target components), or None to
skip it. A mapper raises :class:`UnsafeEntry` for an entry it will not place."""
Mapper = Callable[[tarfile.TarInfo], Mapped]


class TopMapper:
    """A :data:`Mapper` that places a one-rooted archive (``husk cp``'s) at ``top``.

    The archive's top-level name is its author's choice: it is taken from the
    first entry and replaced by ``top`` (components below the destination; ()
    for the destination itself). An entry or hard link target not under that
    first top-level name is refused, so nothing lands anywhere else. The archive's
    own top directory is skipped when it would land on the destination itself
    (the contents of a directory go into an existing one, which keeps its mode).
    """

    def __init__(self, top: tuple[str, ...], label: str) -> None:
        self._top = list(top)
        self._label = label
        self._stream_top: list[str] | None = None

    def _below_top(self, name: str, what: str) -> list[str]:
        parts = split_name(name, self._label, what, strip_absolute=False)
        if self._stream_top is None:
            self._stream_top = parts[:1]
        depth = len(self._stream_top)
        if parts[:depth] != self._stream_top:
            raise UnsafeEntry(
                f"{self._label}: {what} {name!r} is outside the copied path "
                f"{'/'.join(self._stream_top)!r}; refusing it"
            )
        return [*self._top, *parts[depth:]]

    def __call__(self, member: tarfile.TarInfo) -> Mapped:
        parts = self._below_top(member.name, "entry")
        links = self._below_top(member.linkname, "hard link target") if member.islnk() else None
        if not parts and member.isdir():
            return None
        return parts, links


def _headers(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        yield member
        # TarFile remembers every header; an archive of a million entries need not.
        cast(Any, tar).members.clear()


class _StreamCheck:
    """What the archive itself builds, to refuse links within it before anything is written."""

    def __init__(self, policy: ExtractPolicy, label: str, origin: str) -> None:
        self.policy = policy
        self.label = label
        self.origin = origin
        self.kinds: dict[str, str] = {}  # rel → "dir", "symlink" or "file"

    def entry(self, member: tarfile.TarInfo, parts: list[str], links: list[str] | None) -> None:
        check_type(member, self.policy, self.label)
        for depth in range(1, len(parts)):
            prefix = _rel(parts[:depth])
            kind = self.kinds.get(prefix)
            if kind == "symlink":
                raise UnsafeEntry(
                    f"{self.label}: entry {member.name!r} would be written through the "
                    f"symbolic link {prefix!r}; refusing it"
                )
            if kind == "file":
                raise BadEntry(
                    f"{self.label}: entry {member.name!r}: {prefix!r} is not a directory"
                )
        rel = _rel(parts)
        if not parts and not member.isdir():
            raise UnsafeEntry(
                f"{self.label}: entry {member.name!r} would replace the destination directory"
            )
        if member.islnk() and not self.policy.links_to_existing:
            target = _rel(links or [])
            if self.kinds.get(target) not in ("file", "symlink"):
                raise BadEntry(
                    f"{self.label}: hard link {member.name!r} points to {member.linkname!r}, "
                    f"which is not in the {self.origin}"
                )
        kind = "dir" if member.isdir() else "symlink" if member.issym() else "file"
        previous = self.kinds.get(rel)
        if (
            previous is not None
            and not self.policy.replace_mismatched
            and (previous == "dir") != (kind == "dir")
        ):
            raise Conflict(
                f"{self.label}: entry {member.name!r} replaces an earlier "
                f"{'directory' if previous == 'dir' else 'non-directory'} of the archive"
            )
        if previous == "dir" and kind != "dir":
            prefix = rel + "/"
            self.kinds = {k: v for k, v in self.kinds.items() if not k.startswith(prefix)}
        self.kinds[rel] = kind


def extract_archive(
    source: IO[bytes],
    root: Path,
    policy: ExtractPolicy,
    *,
    label: str,
    mapper: Mapper | None = None,
    origin: str = "archive",
) -> int:
    """Extract the uncompressed tar ``source`` (seekable) below ``root``; return the entry count.

    Every header is read and checked first (names, what the mapper makes of
    them, entry types, links within the archive, truncation); only then is
    anything written. Errors are :class:`~husk.errors.HuskError` with a one-line
    message naming the entry.
    """

    def place(member: tarfile.TarInfo) -> Mapped:
        if mapper is not None:
            return mapper(member)
        strip = policy.strip_absolute
        parts = split_name(member.name, label, "entry", strip_absolute=strip)
        links = (
            split_name(member.linkname, label, "hard link target", strip_absolute=strip)
            if member.islnk()
            else None
        )
        return parts, links

    start = source.tell()
    try:
        with open_tar(source, "r:") as tar:
            check = _StreamCheck(policy, label, origin)
            count = 0
            for member in _headers(tar):
                count += 1
                placed = place(member)
                if placed is not None:
                    check.entry(member, *placed)
        source.seek(start)
        with (
            open_tar(source, "r:") as tar,
            TarExtractor(root, policy, label=label, origin=origin) as extractor,
        ):
            for member in _headers(tar):
                placed = place(member)
                if placed is not None:
                    extractor.extract(tar, member, *placed)
            extractor.finish()
    except (tarfile.TarError, EOFError) as err:
        raise BadEntry(f"{label}: not a valid tar archive: {err}") from None
    return count
