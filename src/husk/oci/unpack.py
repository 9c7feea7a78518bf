"""Apply OCI image layers (tar streams) onto a root filesystem directory.

Each layer is read once, as a stream: decompression, the diff_id hash and the
tar parser run in one pass and nothing is held in memory whole.

Safety rests on one rule: every path is resolved below the rootfs without
following a symbolic link. Names are split into components; ``..`` is refused
and a leading ``/`` is dropped (as Docker and containerd do). Every parent
component must be a real directory: an entry whose parent is a symlink is
refused rather than resolved, since a well-formed layer (a diff of a real
filesystem) never writes through one. The final component is replaced, never
opened through (``O_NOFOLLOW | O_EXCL``), and hard links are made without
following their target.

:func:`unpack_layers` builds the tree in a private (0700) staging directory and
renames it into place only when every layer applied, so a failure leaves
nothing behind. The tree holds the image's setuid files and device nodes, so
callers should keep the destination inside a directory only they can enter.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

from husk.errors import Conflict, Internal, InvalidArgument, NotSupported
from husk.oci.layerstream import READ_CHUNK, CorruptLayer, LayerStream

__all__ = [
    "CorruptLayer",
    "UnsafeLayer",
    "apply_layer",
    "unpack_layers",
]

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_SCHILY_XATTR = "SCHILY.xattr."
_LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."
# Overlay metadata would change how the guest's overlayfs reads the image.
_SKIPPED_XATTR_PREFIXES = ("trusted.overlay.",)
_DEVICE_TYPES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK}


class UnsafeLayer(InvalidArgument):
    """A layer entry that would land outside the rootfs or write through a symlink."""


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is not None:
        with contextlib.suppress(InvalidOperation, ValueError):
            return int(Decimal(text) * 1_000_000_000)
    return int(Decimal(str(member.mtime)) * 1_000_000_000)


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith(_SCHILY_XATTR):
            # tarfile decodes PAX values as UTF-8 with surrogateescape: undo it.
            found[key[len(_SCHILY_XATTR) :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith(_LIBARCHIVE_XATTR):
            name = unquote(key[len(_LIBARCHIVE_XATTR) :])
            raw = value.encode("ascii", "surrogateescape")
            found.setdefault(name, base64.b64decode(raw + b"=" * (-len(raw) % 4)))
    return {k: v for k, v in found.items() if not k.startswith(_SKIPPED_XATTR_PREFIXES)}


class _LayerApplier:
    """Applies the entries of one layer, in tar order, onto ``root``."""

    def __init__(self, root: Path, label: str) -> None:
        self._root = os.path.abspath(root)
        self._label = label
        self._keep_owner = os.geteuid() == 0
        # Relative paths (no leading "/", "" is the root) checked to be real directories.
        self._real_dirs: set[str] = {""}
        self._written: set[str] = set()
        self._opaque_dirs: list[str] = []
        self._dir_mtimes: dict[str, int] = {}

    # ------------------------------------------------------------- paths

    def _abs(self, rel: str) -> str:
        return f"{self._root}/{rel}" if rel else self._root

    def _components(self, name: str, what: str) -> list[str]:
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise UnsafeLayer(
                f"{self._label}: {what} {name!r} contains '..'; refusing to unpack the layer"
            )
        return parts

    def _forget_dirs(self, rel: str) -> None:
        prefix = rel + "/"
        self._real_dirs = {d for d in self._real_dirs if d != rel and not d.startswith(prefix)}

    def _parents_ok(self, parts: list[str], name: str, *, create: bool) -> bool:
        """Check (or create) every parent of ``parts`` as a real directory.

        Returns False when a parent is missing and ``create`` is False. A parent
        that is a symlink refuses the layer: following it could leave the root.
        """
        if len(parts) <= 1 or "/".join(parts[:-1]) in self._real_dirs:
            return True
        rel = ""
        for part in parts[:-1]:
            rel = f"{rel}/{part}" if rel else part
            if rel in self._real_dirs:
                continue
            path = self._abs(rel)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                if not create:
                    return False
                os.mkdir(path, 0o755)
                os.chmod(path, 0o755)
                self._real_dirs.add(rel)
                continue
            if stat.S_ISLNK(mode):
                raise UnsafeLayer(
                    f"{self._label}: entry {name!r} would be written through the symbolic "
                    f"link {rel!r}; refusing to unpack the layer"
                )
            if not stat.S_ISDIR(mode):
                raise CorruptLayer(f"{self._label}: entry {name!r}: {rel!r} is not a directory")
            self._real_dirs.add(rel)
        return True

    def _is_real_dir_chain(self, rel: str) -> bool:
        """Whether ``rel`` and all its parents are real directories (never raises)."""
        if not rel:
            return True
        try:
            return self._parents_ok([*rel.split("/"), "-"], rel, create=False)
        except InvalidArgument:
            return False

    def _remove(self, rel: str) -> None:
        """Remove whatever is at ``rel`` (a whole tree for a directory), never following links."""
        path = self._abs(rel)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            shutil.rmtree(path)
            self._forget_dirs(rel)
        else:
            os.unlink(path)

    # ----------------------------------------------------------- metadata

    def _set_xattrs(self, target: int | str, member: tarfile.TarInfo) -> None:
        for key, value in _xattrs(member).items():
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as err:
                if err.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                log.warning("%s: xattr %s on %s not kept: %s", self._label, key, member.name, err)

    def _set_path_metadata(self, path: str, member: tarfile.TarInfo, *, symlink: bool) -> None:
        if self._keep_owner:
            os.chown(path, member.uid, member.gid, follow_symlinks=False)
        if not symlink:
            # After chown: the kernel clears setuid/setgid on a change of owner.
            os.chmod(path, member.mode & 0o7777)
        self._set_xattrs(path, member)

    # ------------------------------------------------------------ entries

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = self._components(member.name, "entry")
        if not parts:
            self._apply_root(member)
            return
        if parts[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, member.name)
            return
        self._parents_ok(parts, member.name, create=True)
        rel = "/".join(parts)
        if member.isdir():
            self._make_dir(rel, member)
        elif member.islnk():
            self._make_hardlink(rel, member)
        else:
            self._remove(rel)
            path = self._abs(rel)
            if member.isreg():
                self._write_file(path, tar, member)
            elif member.issym():
                os.symlink(member.linkname, path)
                self._set_path_metadata(path, member, symlink=True)
                ns = _mtime_ns(member)
                os.utime(path, ns=(ns, ns), follow_symlinks=False)
            elif member.type in _DEVICE_TYPES or member.isfifo():
                self._make_node(path, member)
            else:
                raise CorruptLayer(
                    f"{self._label}: entry {member.name!r} has unsupported type {member.type!r}"
                )
        self._written.add(rel)

    def _apply_root(self, member: tarfile.TarInfo) -> None:
        if not member.isdir():
            raise UnsafeLayer(
                f"{self._label}: entry {member.name!r} would replace the root directory"
            )
        self._set_path_metadata(self._root, member, symlink=False)
        self._dir_mtimes[""] = _mtime_ns(member)

    def _make_dir(self, rel: str, member: tarfile.TarInfo) -> None:
        path = self._abs(rel)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = 0
        if not stat.S_ISDIR(mode):
            if mode:
                os.unlink(path)
            os.mkdir(path, 0o700)
        self._real_dirs.add(rel)
        self._set_path_metadata(path, member, symlink=False)
        self._dir_mtimes[rel] = _mtime_ns(member)

    def _write_file(self, path: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            if member.size:
                source = tar.extractfile(member)
                if source is None:
                    raise Internal(f"{self._label}: no data for {member.name!r}")
                with source:
                    while chunk := source.read(READ_CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
            if self._keep_owner:
                os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & 0o7777)
            self._set_xattrs(fd, member)
            ns = _mtime_ns(member)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def _make_node(self, path: str, member: tarfile.TarInfo) -> None:
        kind = stat.S_IFIFO if member.isfifo() else _DEVICE_TYPES[member.type]
        device = os.makedev(member.devmajor, member.devminor) if kind != stat.S_IFIFO else 0
        try:
            os.mknod(path, kind | 0o600, device)
        except PermissionError:
            raise NotSupported(
                f"{self._label}: creating device node {member.name!r} needs root"
            ) from None
        self._set_path_metadata(path, member, symlink=False)
        ns = _mtime_ns(member)
        os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def _make_hardlink(self, rel: str, member: tarfile.TarInfo) -> None:
        target_parts = self._components(member.linkname, "hard link target")
        if not target_parts:
            raise UnsafeLayer(
                f"{self._label}: hard link {member.name!r} points at the root directory"
            )
        target_rel = "/".join(target_parts)
        target = self._abs(target_rel)
        missing = CorruptLayer(
            f"{self._label}: hard link {member.name!r} points to {member.linkname!r}, "
            "which is not in the image"
        )
        if not self._parents_ok(target_parts, member.linkname, create=False):
            raise missing
        try:
            target_stat = os.lstat(target)
        except FileNotFoundError:
            raise missing from None
        if stat.S_ISDIR(target_stat.st_mode):
            raise UnsafeLayer(
                f"{self._label}: hard link {member.name!r} points to the directory "
                f"{member.linkname!r}"
            )
        path = self._abs(rel)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.lstat(path), target_stat):
                return
        self._remove(rel)
        os.link(target, path, follow_symlinks=False)

    def _whiteout(self, parts: list[str], name: str) -> None:
        base = parts[-1]
        if base == OPAQUE_MARKER:
            self._parents_ok(parts, name, create=True)
            directory = "/".join(parts[:-1])
            self._opaque_dirs.append(directory)
            self._written.add(directory)
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # aufs bookkeeping (.wh..wh.plnk and friends), not a deletion
        hidden = base[len(WHITEOUT_PREFIX) :]
        if hidden in ("", ".", ".."):
            raise UnsafeLayer(f"{self._label}: whiteout {name!r} names no file; refusing it")
        target_parts = [*parts[:-1], hidden]
        if not self._parents_ok(target_parts, name, create=False):
            return
        rel = "/".join(target_parts)
        # A whiteout hides lower layers only, wherever it sits in this layer's tar.
        if rel not in self._written:
            self._remove(rel)

    # ------------------------------------------------------------- finish

    def finish(self) -> None:
        if self._opaque_dirs:
            keep: set[str] = set()
            for rel in self._written:
                while rel and rel not in keep:
                    keep.add(rel)
                    rel = rel.rpartition("/")[0]
            for directory in self._opaque_dirs:
                self._prune(directory, keep)
        # Directory times last: creating entries inside a directory changes its mtime.
        for rel, ns in self._dir_mtimes.items():
            if self._is_real_dir_chain(rel):
                os.utime(self._abs(rel), ns=(ns, ns), follow_symlinks=False)

    def _prune(self, directory: str, keep: set[str]) -> None:
        """Drop what lower layers put in an opaque directory, keeping this layer's entries."""
        if not self._is_real_dir_chain(directory):
            return
        pending = [directory]
        while pending:
            current = pending.pop()
            with os.scandir(self._abs(current)) as entries:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            for child, is_dir in children:
                rel = f"{current}/{child}" if current else child
                if rel not in keep:
                    self._remove(rel)
                elif is_dir:
                    pending.append(rel)


def _label_for(layer: Path, name: str | None) -> str:
    return f"layer {name}" if name else f"layer {layer.name}"


def apply_layer(
    layer: Path,
    media_type: str,
    rootfs: Path,
    *,
    diff_id: str | None = None,
    name: str | None = None,
) -> str:
    """Apply one layer blob onto ``rootfs`` in place; return its diff_id.

    ``diff_id``, when given, is checked against the digest of the uncompressed
    stream after the layer is applied (InvalidArgument on mismatch): in-place
    callers should discard ``rootfs`` on any error, as :func:`unpack_layers` does.
    ``name`` (e.g. the blob digest) labels error messages.
    """
    label = _label_for(layer, name)
    algorithm = diff_id.partition(":")[0] if diff_id else "sha256"
    try:
        with LayerStream(layer, media_type, algorithm=algorithm) as stream:
            applier = _LayerApplier(rootfs, label)
            with tarfile.open(fileobj=stream, mode="r|", bufsize=READ_CHUNK) as tar:
                while (member := tar.next()) is not None:
                    applier.apply(tar, member)
                    # TarFile remembers every header even when streaming; drop them.
                    cast(Any, tar).members.clear()
            stream.drain()
            applier.finish()
            actual = stream.digest()
    except CorruptLayer as err:
        if err.message.startswith(label):
            raise
        raise CorruptLayer(f"{label}: {err.message}") from None
    except (tarfile.TarError, EOFError) as err:
        raise CorruptLayer(f"{label}: not a valid tar stream: {err}") from None
    except FileNotFoundError as err:
        if err.filename == os.fspath(layer):
            raise InvalidArgument(f"{label}: blob {layer} does not exist") from None
        raise Internal(f"{label}: cannot write the layer: {err}") from None
    except OSError as err:
        raise Internal(f"{label}: cannot write the layer: {err}") from None
    if diff_id is not None and actual != diff_id:
        raise InvalidArgument(
            f"{label}: uncompressed content has digest {actual}, "
            f"but the image config says {diff_id}"
        )
    return actual


def unpack_layers(
    layers: Sequence[tuple[Path, str]],
    rootfs: Path,
    *,
    diff_ids: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> list[str]:
    """Apply ``layers`` (blob path, media type), lowest first, into a new ``rootfs``.

    ``rootfs`` must not exist. It appears only once every layer applied (and,
    with ``diff_ids``, every uncompressed digest matched); on any error nothing
    is left behind. Returns the diff_ids computed.
    """
    if diff_ids is not None and len(diff_ids) != len(layers):
        raise InvalidArgument(
            f"the image has {len(layers)} layers but {len(diff_ids)} diff_ids in its config"
        )
    if names is not None and len(names) != len(layers):
        raise Internal("unpack_layers: one name per layer expected")
    if os.path.lexists(rootfs):
        raise Conflict(f"cannot unpack into {rootfs}: it already exists")
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{rootfs.name}.unpack-", dir=rootfs.parent))
    try:
        tree = staging / "rootfs"
        tree.mkdir()
        os.chmod(tree, 0o755)
        computed = [
            apply_layer(
                path,
                media_type,
                tree,
                diff_id=diff_ids[index] if diff_ids is not None else None,
                name=names[index] if names is not None else None,
            )
            for index, (path, media_type) in enumerate(layers)
        ]
        os.rename(tree, rootfs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return computed
