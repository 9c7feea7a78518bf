"""Images as disk files: a read-only erofs image per chain id, and scratch ext4 disks.

An image's layers are unpacked once into a private staging tree, their
uncompressed digests checked against the config's diff_ids, and the tree
turned into an erofs image with ``mkfs.erofs``. The result is cached as
``data_dir()/rootfs/<chain id hex>.erofs`` (no colon in the name: QEMU's
``-drive file=`` syntax would split on it), so images sharing every layer share
one disk file. Builds hold a per-chain-id lock and rename into place, so a
cached file is always complete. A pull's build is speculative: it applies layers as they
arrive without that lock (a stalled download must not keep containers of another image
with the same layers waiting) and takes the lock only to rename its finished disk.

Fixed virtual sizes: a VM restored from a template must see disks of the size
the template had. erofs ignores everything after its last block, so
:func:`pad_to` may grow an image (sparsely) to any size that is a multiple of
:data:`EROFS_ALIGN` without changing what the guest reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from husk.errors import Conflict, Internal, InvalidArgument, NotFound, NotSupported
from husk.oci.locks import file_lock, try_lock
from husk.oci.reference import validate_digest
from husk.oci.staging import MemoryTree, make_memory_tree
from husk.oci.store import ImageRecord, ImageStore
from husk.oci.unpack import StagingFull, apply_layer, check_layer
from husk.paths import data_dir, ensure_private_dir
from husk.tools import tool_argv

EROFS_ALIGN = 4096
"""erofs block size: image files are a whole number of these; pad to a multiple."""

EXT4_MIN_BYTES = 8 * 1024 * 1024
BUILD_LOCK_TIMEOUT = 1800.0
"""Seconds to wait for another process building the same image (large images are slow)."""
TOOL_TIMEOUT = 1800.0

_IMAGE_SUFFIX = ".erofs"
_LOCK_SUFFIX = ".lock"
_BUILD_PREFIX = ".build-"
_SPECULATIVE_PREFIX = ".pull-"
_SPECULATIVE_GRACE = 60.0
"""Seconds a speculative staging tree is left alone before its owner's lock is checked
(it is created a moment before it is locked)."""
_TRASH_PREFIX = ".trash"
_TRASH_GRACE = 600.0

log = logging.getLogger(__name__)


def chain_id(diff_ids: Sequence[str]) -> str:
    """The OCI chain id of a layer stack: ChainID(L0) = DiffID(L0), then
    ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    if not diff_ids:
        raise InvalidArgument("the image has no layers (its config lists no diff_ids)")
    chain = validate_digest(diff_ids[0], what="diff_id")
    for diff_id in diff_ids[1:]:
        validate_digest(diff_id, what="diff_id")
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def rootfs_dir() -> Path:
    """Where erofs images are cached (private: they hold whole image contents)."""
    return data_dir() / "rootfs"


def rootfs_image_path(chain: str) -> Path:
    """The cache path of the erofs image for a chain id (it may not exist yet)."""
    return rootfs_dir() / f"{validate_digest(chain, what='chain id').split(':', 1)[1]}.erofs"


def run_tool(argv: list[str], what: str) -> None:
    """Runs a file-system tool; NotSupported or Internal naming it and its last line."""
    try:
        result = subprocess.run(
            tool_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=TOOL_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise NotSupported(f"{argv[0]} is not installed; it is needed to {what}") from None
    except subprocess.TimeoutExpired:
        raise Internal(f"{argv[0]} did not finish within {TOOL_TIMEOUT:.0f}s ({what})") from None
    if result.returncode != 0:
        lines = [line.strip() for line in result.stdout.decode(errors="replace").splitlines()]
        # The last lines say why (mount's reason comes before its pointer to dmesg).
        detail = "; ".join(line for line in lines[-2:] if line)[:300]
        detail = detail or f"exit status {result.returncode}"
        raise Internal(f"{argv[0]} failed to {what}: {detail}")


def build_erofs(source_dir: Path, dest: Path, *, all_root: bool = False) -> None:
    """Write an uncompressed erofs image of ``source_dir`` to ``dest`` (overwritten).

    Ownership, modes (setuid included), device nodes, hard links, xattrs and
    mtimes are taken from the tree as they are. ``all_root`` records every file
    as owned by root instead (for trees unpacked without root, whose owner is
    just the unpacking user). Uncompressed: faster to build and to read under TCG.
    """
    if not source_dir.is_dir():
        raise NotFound(f"cannot build a disk image: {source_dir} is not a directory")
    flags = ["--quiet", *(["--all-root"] if all_root else [])]
    run_tool(
        ["mkfs.erofs", *flags, os.fspath(dest), os.fspath(source_dir)],
        f"build an erofs image from {source_dir}",
    )


def _fsync(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _layer_inputs(store: ImageStore, record: ImageRecord) -> list[tuple[Path, str]]:
    if len(record.layers) != len(record.diff_ids):
        raise InvalidArgument(
            f"image {record.id}: {len(record.layers)} layers but "
            f"{len(record.diff_ids)} diff_ids in its config"
        )
    inputs = []
    for layer in record.layers:
        path = store.blob_path(layer.digest)
        if not path.is_file():
            raise NotFound(
                f"layer {layer.digest} of image {record.id} is missing from the store; "
                "pull the image again"
            )
        inputs.append((path, layer.media_type))
    return inputs


def _discard_in_background(work: Path) -> None:
    """Deletes a finished build's staging tree without making anyone wait for it.

    Deleting an unpacked image (thousands of files) takes as long as a large part of
    building it; the tree is renamed out of the way at once and removed by a thread.
    A process that exits first leaves it for the next build's :func:`_empty_trash`.
    """
    trash = work.with_name(_TRASH_PREFIX + work.name)
    try:
        os.rename(work, trash)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
        return
    threading.Thread(
        target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True}, daemon=True
    ).start()


def _empty_trash(cache: Path) -> None:
    """Staging trees a process left when it exited before their background removal."""
    for trash in cache.glob(f"{_TRASH_PREFIX}*"):
        with contextlib.suppress(OSError):
            age = time.time() - trash.lstat().st_mtime
            if age > _TRASH_GRACE:  # younger ones may still be being removed
                shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_builds(cache: Path, hex_id: str) -> None:
    """Drop staging directories of builds that died (the caller holds the build lock)."""
    for stale in cache.glob(f"{_BUILD_PREFIX}{hex_id}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _lock_directory(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or None when another
    process holds it (a live speculative build)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if try_lock(fd):
        return fd
    os.close(fd)
    return None


def _remove_dead_speculative_builds(cache: Path) -> None:
    """Staging trees of pulls whose process died: old enough and nobody holds their lock.
    A live pull keeps its tree's lock until it is done with it."""
    for stale in cache.glob(f"{_SPECULATIVE_PREFIX}*"):
        try:
            if time.time() - stale.lstat().st_mtime < _SPECULATIVE_GRACE:
                continue
            fd = _lock_directory(stale)
        except OSError:
            continue
        if fd is None:
            continue
        try:
            _discard_in_background(stale)
        finally:
            os.close(fd)


def ensure_rootfs_image(
    store: ImageStore, record: ImageRecord, *, timeout: float = BUILD_LOCK_TIMEOUT
) -> Path:
    """The cached erofs image of ``record``, built first if it is missing.

    Safe to call from several threads or processes at once: one builds, the
    others wait (up to ``timeout`` seconds) and reuse its result. A layer whose
    uncompressed digest differs from the config's diff_id refuses the image
    (InvalidArgument) and caches nothing. Run as root to keep the image's file
    ownership; otherwise every file in the disk image is owned by root.
    """
    dest = rootfs_image_path(chain_id(record.diff_ids))
    if dest.is_file():
        return dest
    layers = _layer_inputs(store, record)
    names = [layer.digest for layer in record.layers]
    for in_memory in (True, False):
        build = RootfsBuild.begin(record.diff_ids, names=names, timeout=timeout, memory=in_memory)
        if build is None:
            return dest
        try:
            # Blobs must not be collected while they are read.
            with store.gc_guard():
                for index, (path, media_type) in enumerate(layers):
                    build.apply(index, path, media_type)
            return build.finish()
        except StagingFull as full:
            log.info("image %s: %s; building its disk from a tree on disk", record.id, full)
        finally:
            build.close()
    raise Internal(f"image {record.id}: its disk could not be staged")  # disk has no budget


class RootfsBuild:
    """One image's erofs disk being built: its layers applied in order onto a private
    staging tree, then ``mkfs.erofs``, then renamed into the cache.

    Holds the chain id's build lock from :meth:`begin` to :meth:`close`, unless it is
    speculative (:meth:`begin_speculative`, a pull's): then it holds only its own staging
    tree's lock and takes the chain's in :meth:`finish`, to rename. Layers may be handed
    over from several threads as they become available (a pull applies each layer as
    soon as it is downloaded): :meth:`apply` waits for the layers below to be applied
    first. Any failure poisons the build; :meth:`close` deletes what is left.

    The staging tree is in memory when it fits (:mod:`husk.oci.staging`). A layer that
    overruns the memory budget makes :meth:`apply` raise :class:`StagingFull` (the caller
    builds again on disk), except in a speculative build: that one goes on checking its
    layers without applying them (the pull still refuses a broken layer), and
    :meth:`finish` reports that the disk is left to the first container.
    """

    def __init__(self, dest: Path, work: Path, diff_ids: Sequence[str], names: Sequence[str]):
        self.dest = dest
        self._work = work
        self._tree = work / "rootfs"
        self._diff_ids = list(diff_ids)
        self._names = list(names)
        self._next = 0
        self._failed: BaseException | None = None
        self._turn = threading.Condition()
        self._release: contextlib.ExitStack | None = None
        self._speculative = False
        self._memory: MemoryTree | None = None
        self._check_only = False
        """The memory budget ran out in a speculative build: layers are only checked."""

    @classmethod
    def begin(
        cls,
        diff_ids: Sequence[str],
        *,
        names: Sequence[str],
        timeout: float = BUILD_LOCK_TIMEOUT,
        memory: bool = True,
    ) -> RootfsBuild | None:
        """A build of the image with ``diff_ids``, or None when its disk is cached already
        (perhaps by another process that held the lock meanwhile). ``memory``: stage the
        layers in memory if they fit."""
        return cls._start(diff_ids, names, lock_timeout=timeout, memory=memory)

    @classmethod
    def begin_speculative(
        cls, diff_ids: Sequence[str], *, names: Sequence[str], expected_bytes: int = 0
    ) -> RootfsBuild | None:
        """A build that holds no chain lock while its layers arrive (a pull's: a download
        may stall for long), or None when the disk is cached already. Another build of
        the same layers may run meanwhile; the first to finish is kept. ``expected_bytes``
        (the layers' compressed size) keeps a build that cannot fit out of memory."""
        return cls._start(diff_ids, names, lock_timeout=None, expected_bytes=expected_bytes)

    @classmethod
    def _start(
        cls,
        diff_ids: Sequence[str],
        names: Sequence[str],
        *,
        lock_timeout: float | None,
        memory: bool = True,
        expected_bytes: int = 0,
    ) -> RootfsBuild | None:
        """A build holding the chain's lock (waiting up to ``lock_timeout``), or, with no
        timeout, a speculative one holding only its staging tree's lock."""
        if len(names) != len(diff_ids):
            raise Internal("RootfsBuild: one name per layer expected")
        dest = rootfs_image_path(chain_id(diff_ids))
        if dest.is_file():
            return None
        cache = ensure_private_dir(dest.parent)
        hex_id = dest.name.removesuffix(_IMAGE_SUFFIX)
        stack = contextlib.ExitStack()
        try:
            if lock_timeout is None:
                _remove_dead_speculative_builds(cache)
                prefix = _SPECULATIVE_PREFIX
            else:
                lock = cache / f"{hex_id}{_LOCK_SUFFIX}"
                stack.enter_context(file_lock(lock, timeout=lock_timeout))
                if dest.is_file():
                    stack.close()
                    return None
                _remove_stale_builds(cache, hex_id)
                prefix = _BUILD_PREFIX
            _empty_trash(cache)
            work = Path(tempfile.mkdtemp(prefix=f"{prefix}{hex_id}-", dir=cache))
            stack.callback(_discard_in_background, work)
            if lock_timeout is None:
                owner = _lock_directory(work)
                if owner is None:
                    raise Internal(f"a new staging tree {work.name} is locked by someone else")
                stack.callback(os.close, owner)  # closed first: released, then deleted
            build = cls(dest, work, diff_ids, names)
            build._memory = make_memory_tree(expected_bytes) if memory else None
            if build._memory is not None:
                stack.callback(build._memory.discard)
                build._tree = build._memory.tree
            else:
                build._tree.mkdir()
                os.chmod(build._tree, 0o755)
        except BaseException:
            stack.close()
            raise
        build._release = stack
        build._speculative = lock_timeout is None
        return build

    def apply(self, index: int, blob: Path, media_type: str) -> None:
        """Apply layer ``index`` (its blob, checked against its diff_id) once every layer
        below it is applied. Raises what the layer's check raised, or Conflict when a
        lower layer failed."""
        with self._turn:
            while self._next != index and self._failed is None:
                self._turn.wait()
            if self._failed is not None:
                raise Conflict(f"layer {self._names[index]} not applied: a lower layer failed")
        try:
            if self._check_only:
                self._check(index, blob, media_type)
            else:
                self._apply(index, blob, media_type)
        except BaseException as failure:
            with self._turn:
                self._failed = failure
                self._turn.notify_all()
            raise
        with self._turn:
            self._next = index + 1
            self._turn.notify_all()

    def _apply(self, index: int, blob: Path, media_type: str) -> None:
        memory = self._memory
        try:
            apply_layer(
                blob,
                media_type,
                self._tree,
                diff_id=self._diff_ids[index],
                name=self._names[index],
                budget=memory.budget if memory is not None else None,
            )
        except StagingFull as full:
            if not self._speculative:
                raise
            log.info("%s; the disk is left to the first container", full)
            self._check_only = True
            if memory is not None:
                self._memory = None
                memory.discard()  # its memory back at once
            self._check(index, blob, media_type)

    def _check(self, index: int, blob: Path, media_type: str) -> None:
        check_layer(blob, media_type, diff_id=self._diff_ids[index], name=self._names[index])

    def fail(self, failure: BaseException) -> None:
        """Wakes and fails every :meth:`apply` still waiting (the pull gave up)."""
        with self._turn:
            if self._failed is None:
                self._failed = failure
            self._turn.notify_all()

    def finish(self) -> Path:
        """The disk built from every layer, renamed into the cache."""
        if self._failed is not None or self._next != len(self._diff_ids):
            raise Internal(f"the disk of image layers {self._names} is incomplete")
        if self._check_only:
            raise Internal(
                "its layers are larger than a build in memory allows; the first container "
                "builds the disk"
            )
        staged = self._work / f"image{_IMAGE_SUFFIX}"
        # Without root the unpack could not keep ownership; root-owned is the
        # closer approximation of an image than "owned by whoever pulled it".
        build_erofs(self._tree, staged, all_root=os.geteuid() != 0)
        os.chmod(staged, 0o600)
        _fsync(staged)
        if not self._speculative:
            self._publish(staged)  # the chain's lock is held since begin
            return self.dest
        hex_id = self.dest.name.removesuffix(_IMAGE_SUFFIX)
        with file_lock(self.dest.parent / f"{hex_id}{_LOCK_SUFFIX}", timeout=BUILD_LOCK_TIMEOUT):
            if not self.dest.is_file():  # else another build finished first: keep that
                self._publish(staged)
        return self.dest

    def _publish(self, staged: Path) -> None:
        os.rename(staged, self.dest)
        _fsync(self.dest.parent, directory=True)

    def close(self) -> None:
        """Deletes the staging tree and releases the lock (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            release.close()


def prune_rootfs_images(keep_chain_ids: Iterable[str]) -> list[Path]:
    """Delete cached erofs images whose chain id is not in ``keep_chain_ids``.

    Images being built are skipped (their lock is held). Returns what was removed.
    A VM that has an image open keeps reading it: unlinking does not revoke it.
    """
    cache = rootfs_dir()
    if not cache.is_dir():
        return []
    keep = {rootfs_image_path(c).name for c in keep_chain_ids}
    removed = []
    for image in sorted(cache.glob(f"*{_IMAGE_SUFFIX}")):
        if image.name in keep:
            continue
        lock = image.with_suffix(_LOCK_SUFFIX)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if not try_lock(fd):
                continue
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
                removed.append(image)
            # The lock file stays: a builder may already wait on this very inode.
        finally:
            os.close(fd)
    return removed


def round_up(size: int, multiple: int = EROFS_ALIGN) -> int:
    return -(-size // multiple) * multiple


def pad_to(path: Path, size: int) -> None:
    """Grow ``path`` to exactly ``size`` bytes; the new tail is a hole (no disk used).

    ``size`` must be a multiple of :data:`EROFS_ALIGN` (which also satisfies
    virtio-blk's 512-byte sectors). Refuses to shrink: a disk image larger than
    the fixed size cannot be attached at that size.
    """
    if size <= 0 or size % EROFS_ALIGN:
        raise InvalidArgument(f"disk size {size} is not a positive multiple of {EROFS_ALIGN} bytes")
    try:
        current = path.stat().st_size
    except FileNotFoundError:
        raise NotFound(f"disk image {path} does not exist") from None
    if current > size:
        raise Conflict(
            f"disk image {path.name} is {current} bytes, larger than the fixed size {size}"
        )
    if current < size:
        os.truncate(path, size)


def make_ext4_disk(path: Path, size_bytes: int, *, label: str = "husk-scratch") -> None:
    """Create ``path`` as a sparse ``size_bytes`` file holding an empty ext4 filesystem.

    mkfs.ext4 writes into the regular file directly, so no loop device or
    root is needed. Inode tables and journal are initialised lazily (the guest
    kernel finishes them), the root directory belongs to root, no blocks are
    reserved, and the features are e2fsprogs' ext4 defaults, which the
    bundle's Debian kernel mounts (it needs crc32c for metadata_csum).
    """
    if size_bytes < EXT4_MIN_BYTES or size_bytes % EROFS_ALIGN:
        raise InvalidArgument(
            f"ext4 disk size {size_bytes} must be a multiple of {EROFS_ALIGN} bytes "
            f"and at least {EXT4_MIN_BYTES}"
        )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    try:
        run_tool(
            [
                "mkfs.ext4",
                "-F",
                "-q",
                "-b",
                "4096",
                "-m",
                "0",
                "-L",
                label,
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
                os.fspath(path),
            ],
            f"create an ext4 disk at {path}",
        )
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
