"""Apply OCI image layers (tar streams) onto a root filesystem directory.

Each layer is read once, as a stream: decompression, the diff_id hash and the
tar parser run in one pass and nothing is held in memory whole.

The entries themselves are written by :class:`husk.oci.extract.TarExtractor`,
the same hardened extractor ``husk cp`` uses for archives from a guest: every
path is resolved below the rootfs without following a symbolic link (``..`` is
refused, a leading ``/`` dropped as Docker and containerd do), nothing is
written through a link, and hard links point only inside the tree. This module
adds what only layers have: whiteouts and opaque directories.

:func:`unpack_layers` builds the tree in a private (0700) staging directory and
renames it into place only when every layer applied, so a failure leaves
nothing behind. The tree holds the image's setuid files and device nodes, so
callers should keep the destination inside a directory only they can enter.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from husk.errors import Conflict, Internal, InvalidArgument
from husk.oci.extract import BadEntry, TarExtractor, UnsafeEntry, layer_policy
from husk.oci.layerstream import (
    READ_CHUNK,
    BudgetExceeded,
    ByteBudget,
    CorruptLayer,
    LayerStream,
)
from husk.oci.tarsafe import open_tar

__all__ = [
    "CorruptLayer",
    "StagingFull",
    "UnsafeLayer",
    "apply_layer",
    "check_layer",
    "unpack_layers",
]

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

UnsafeLayer = UnsafeEntry
"""A layer entry that would land outside the rootfs or write through a symlink."""

TAR_BUFFER = 16 * 1024
"""tarfile's stream buffer. Streaming tarfile copies what is left of its buffer at every
read, so a buffer of READ_CHUNK cost a 1 MiB copy per 512-byte header; the large reads
come from the :class:`io.BufferedReader` under it instead."""


ENTRY_CHARGE = 4096
"""Bytes of a budget charged per entry on top of its stream bytes: a file in a tmpfs takes
a whole page and an inode, however small it is in the tar stream."""


class StagingFull(Exception):
    """The tree's byte budget (or its file system) ran out while a layer was applied: a
    limit of where the layers are staged, not a fault of the layer. The tree is then
    incomplete; the caller builds elsewhere or checks the layer another way."""


def _open_tar(stream: LayerStream) -> tarfile.TarFile:
    buffered = io.BufferedReader(stream, READ_CHUNK)
    return open_tar(buffered, "r|", bufsize=TAR_BUFFER)


class _LayerApplier:
    """Applies the entries of one layer, in tar order, onto ``root``: the extractor plus
    whiteouts and opaque directories."""

    def __init__(self, extractor: TarExtractor) -> None:
        self._tree = extractor
        self._label = extractor.label
        self._opaque_dirs: list[list[str]] = []

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = self._tree.parts(member.name)
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, member.name)
            return
        self._tree.extract(tar, member, parts)

    def _whiteout(self, parts: list[str], name: str) -> None:
        base = parts[-1]
        if base == OPAQUE_MARKER:
            directory = parts[:-1]
            self._tree.directory(directory, name, create=True)
            self._opaque_dirs.append(directory)
            self._tree.written.add("/".join(directory))
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # aufs bookkeeping (.wh..wh.plnk and friends), not a deletion
        hidden = base[len(WHITEOUT_PREFIX) :]
        if hidden in ("", ".", ".."):
            raise UnsafeLayer(f"{self._label}: whiteout {name!r} names no file; refusing it")
        target = [*parts[:-1], hidden]
        # A whiteout hides lower layers only, wherever it sits in this layer's tar.
        if "/".join(target) in self._tree.written:
            return
        if self._tree.lstat(target, name) is not None:
            self._tree.remove(target, name)

    def finish(self) -> None:
        if self._opaque_dirs:
            keep: set[str] = set()
            for rel in self._tree.written:
                while rel and rel not in keep:
                    keep.add(rel)
                    rel = rel.rpartition("/")[0]
            for directory in self._opaque_dirs:
                self._prune(directory, keep)
        # Directory modes and times last: creating entries inside a directory changes them.
        self._tree.finish()

    def _prune(self, directory: list[str], keep: set[str]) -> None:
        """Drop what lower layers put in an opaque directory, keeping this layer's entries."""
        pending = [directory]
        while pending:
            current = pending.pop()
            children = self._tree.list_directory(current, "/".join(current))
            for child, is_dir in children or []:
                path = [*current, child]
                if "/".join(path) not in keep:
                    self._tree.remove(path, "/".join(path))
                elif is_dir:
                    pending.append(path)


def _label_for(layer: Path, name: str | None) -> str:
    return f"layer {name}" if name else f"layer {layer.name}"


def apply_layer(
    layer: Path,
    media_type: str,
    rootfs: Path,
    *,
    diff_id: str | None = None,
    name: str | None = None,
    budget: ByteBudget | None = None,
) -> str:
    """Apply one layer blob onto ``rootfs`` in place; return its diff_id.

    ``diff_id``, when given, is checked against the digest of the uncompressed
    stream after the layer is applied (InvalidArgument on mismatch): in-place
    callers should discard ``rootfs`` on any error, as :func:`unpack_layers` does.
    ``name`` (e.g. the blob digest) labels error messages. With ``budget`` (shared by
    the layers of one tree), a layer stream that exceeds it, or a file system that runs
    out of space, raises :class:`StagingFull` instead of an error about the layer.
    """
    label = _label_for(layer, name)
    algorithm = diff_id.partition(":")[0] if diff_id else "sha256"
    try:
        with (
            LayerStream(layer, media_type, algorithm=algorithm, budget=budget) as stream,
            TarExtractor(
                rootfs, layer_policy(), label=label, origin="image", track_written=True
            ) as tree,
        ):
            applier = _LayerApplier(tree)
            with _open_tar(stream) as tar:
                while (member := tar.next()) is not None:
                    if budget is not None:
                        budget.spend(ENTRY_CHARGE)
                    applier.apply(tar, member)
                    # TarFile remembers every header even when streaming; drop them.
                    cast(Any, tar).members.clear()
            stream.drain()
            stream.check_whole_blocks()
            applier.finish()
            actual = stream.digest()
    except BudgetExceeded as err:
        raise StagingFull(f"{label}: {err}") from None
    except BadEntry as err:
        raise CorruptLayer(err.message) from None
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
        if budget is not None and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StagingFull(f"{label}: {err}") from None
        raise Internal(f"{label}: cannot write the layer: {err}") from None
    _check_diff_id(label, actual, diff_id)
    return actual


def _check_diff_id(label: str, actual: str, diff_id: str | None) -> None:
    if diff_id is not None and actual != diff_id:
        raise InvalidArgument(
            f"{label}: uncompressed content has digest {actual}, "
            f"but the image config says {diff_id}"
        )


def check_layer(
    layer: Path, media_type: str, *, diff_id: str | None = None, name: str | None = None
) -> str:
    """Read a layer blob through as :func:`apply_layer` would, writing nothing; return its
    diff_id.

    The compressed stream must be complete and the tar stream well formed to its end (a
    truncated last entry is refused), and with ``diff_id`` the uncompressed digest must
    match it: :class:`CorruptLayer` / InvalidArgument otherwise. Pulls use it so that a
    broken layer fails the pull rather than the first container created from it.
    """
    label = _label_for(layer, name)
    algorithm = diff_id.partition(":")[0] if diff_id else "sha256"
    try:
        with LayerStream(layer, media_type, algorithm=algorithm) as stream:
            with _open_tar(stream) as tar:
                while tar.next() is not None:
                    cast(Any, tar).members.clear()
            stream.drain()
            stream.check_whole_blocks()
            actual = stream.digest()
    except CorruptLayer as err:
        if err.message.startswith(label):
            raise
        raise CorruptLayer(f"{label}: {err.message}") from None
    except (tarfile.TarError, EOFError) as err:
        raise CorruptLayer(f"{label}: not a valid tar stream: {err}") from None
    except FileNotFoundError:
        raise InvalidArgument(f"{label}: blob {layer} does not exist") from None
    except OSError as err:
        raise Internal(f"{label}: cannot read the layer: {err}") from None
    _check_diff_id(label, actual, diff_id)
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
