"""Root-ready snapshots: which starts may use one, what one is keyed by, where they live.

A boot template (:mod:`husk.sandbox.templates`) is a VM saved at "agent ready", shared by
every image of a shape; each start then assembles its container root (PREPARE: erofs,
ext4, overlay, /sys, /dev, the identity files), which under TCG is ~21,000 freshly
translated blocks. A root-ready snapshot is a VM of one shape *and one image* saved
after PREPARE, together with the writable disk it prepared (a fresh ext4 holding a few
MB). A container's first start then copies that disk over its own pristine writable
disk, restores the snapshot and only writes its own identity (hostname, /etc/hostname,
hosts, resolv.conf; entropy, clock and MAC as every restore does)::

    data_dir()/rootready/<key>/template.json   the shape's inputs, the image's identity
    data_dir()/rootready/<key>/vm.state        QEMU's device state (0400)
    data_dir()/rootready/<key>/memory.ram      the guest's RAM (0400)
    data_dir()/rootready/<key>/upper.ext4      the writable disk as the saved guest left it (0400)

The key hashes the shape template's key with the image disk's identity (device, inode,
size, mtime): an image removed and made again is another file, and never meets a
snapshot of the old one. A snapshot is checked against the image disk again when it is
opened and dropped when that no longer matches (:func:`prune` also drops those of images
that are gone).

Only a start that changes nothing PREPARE did may use one: a writable disk never mounted
since ``mkfs`` (a container's first start, nothing copied into it), no shares (volumes,
binds), no mounts, not a maintenance VM, not an engine's root share. Anything else
starts the ordinary way; so does a start whose snapshot is missing (built in the
background afterwards, :mod:`husk.sandbox.rootready_boot`) or fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from husk import paths, settings
from husk.sandbox import templates
from husk.sandbox.config import SandboxConfig
from husk.sandbox.templates import OpenTemplate, TemplateInputs

log = logging.getLogger(__name__)

ROOT_READY_FORMAT = 1
UPPER = "upper.ext4"
MAX_SNAPSHOTS = 4
"""Kept at most (each holds a guest's used memory, ~130 MB); least recently used go first."""
_EXT4_SUPERBLOCK = 1024
_EXT4_MAGIC = 0xEF53
_COPY_CHUNK = 8 << 20


def enabled() -> bool:
    """HUSK_NO_ROOT_READY unset, config.json's "root_ready" not false, templates on."""
    return settings.root_ready_enabled()


def snapshots_dir() -> Path:
    return paths.data_dir() / "rootready"


# -- which starts may use one -------------------------------------------------------------


def unfit(config: SandboxConfig) -> str:
    """Why a start of ``config`` may not use a root-ready snapshot ("" if it may).

    ``config.root_ready`` is the runtime's word that nothing it sends after PREPARE
    depends on what PREPARE did (no mounts); the rest is checked here.
    """
    if not config.root_ready:
        return "not offered by the runtime"
    if not config.use_template:
        return "the container does not use templates"
    if config.upper_disk is None:
        return "no writable disk"
    if config.shares:
        return "the container has shares"
    if config.maintenance or config.root_share is not None or config.lan_taps:
        return "not a container's own start"
    if not pristine_ext4(config.upper_disk):
        return "the writable disk has been used"
    return ""


def pristine_ext4(path: Path) -> bool:
    """True if ``path`` is an ext4 file system never mounted since mkfs made it.

    mkfs leaves the superblock's mount count and last-mount time at zero; any mount
    (a start, a ``cp`` into a created container) sets them.
    """
    try:
        with path.open("rb") as stream:
            stream.seek(_EXT4_SUPERBLOCK)
            block = stream.read(0x3A)
    except OSError:
        return False
    if len(block) < 0x3A:
        return False
    (mtime,) = struct.unpack_from("<I", block, 0x2C)
    (mount_count,) = struct.unpack_from("<H", block, 0x34)
    (magic,) = struct.unpack_from("<H", block, 0x38)
    return bool(magic == _EXT4_MAGIC and mount_count == 0 and mtime == 0)


# -- the key -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageIdentity:
    """Which file an image disk is: a removed and re-made image is another one."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> ImageIdentity:
        info = os.stat(path)
        return cls(str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def current(self) -> bool:
        """The file at ``path`` is still this one."""
        try:
            return ImageIdentity.of(Path(self.path)) == self
        except OSError:
            return False


def snapshot_key(inputs: TemplateInputs, image: ImageIdentity, *, hosts_later: bool) -> str:
    canonical = json.dumps(
        {
            "format": ROOT_READY_FORMAT,
            "template": inputs.key,
            "image": image.to_json(),
            "hosts_later": hosts_later,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return "rr" + hashlib.sha256(canonical.encode()).hexdigest()[:30]


# -- the store -----------------------------------------------------------------------------


def open_snapshot(
    key: str, inputs: TemplateInputs, image: ImageIdentity
) -> tuple[OpenTemplate | None, str]:
    """The snapshot ``key`` if stored, of ``image`` as it is now; else (None, why not).

    A snapshot whose image disk changed or is gone is removed.
    """
    snapshot, why = templates.open_template(inputs, key=key, base=snapshots_dir())
    if snapshot is None:
        return None, why
    recorded = snapshot.metadata.get("image")
    if recorded != image.to_json() or not image.current():
        snapshot.close()
        with contextlib.suppress(OSError):
            templates.discard(snapshot, "its image disk changed")
        return None, f"root-ready snapshot {key} is of another image disk"
    try:
        size = (snapshot.directory / UPPER).stat().st_size
    except OSError as err:
        snapshot.close()
        return None, f"root-ready snapshot {key} has no writable disk ({err})"
    if size != snapshot.metadata.get("upper_size"):
        snapshot.close()
        return None, f"root-ready snapshot {key}: its writable disk changed size"
    return snapshot, ""


def new_build_dir(key: str) -> Path:
    base = paths.ensure_private_dir(snapshots_dir())
    build = base / f"{templates.BUILD_PREFIX}{key}-{secrets.token_hex(4)}"
    build.mkdir(mode=0o700)
    return build


def prune(*, keep: int | None = None, current: TemplateInputs | None = None) -> list[Path]:
    """Removes snapshots of images that are gone or changed, of another guest bundle,
    QEMU or format than ``current``, half-built ones older than an hour, and all but the
    ``keep`` (MAX_SNAPSHOTS) most recently used of the rest."""
    keep = MAX_SNAPSHOTS if keep is None else keep
    removed: list[Path] = []
    base = snapshots_dir()
    if not base.is_dir():
        return removed
    now = time.time()
    usable: list[tuple[float, Path]] = []
    for entry in base.iterdir():
        if not templates.saved_vm_dir(entry, now, removed):
            continue
        try:
            metadata = json.loads((entry / templates.METADATA).read_text())
            image = ImageIdentity(**metadata["image"])
            inputs = metadata.get("inputs") or {}
            used = entry.stat().st_mtime
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            stale = True
        else:
            stale = not image.current() or (
                current is not None and templates.outdated(inputs, current)
            )
        if stale:
            if _remove(entry):
                removed.append(entry)
        else:
            usable.append((used, entry))
    for _, entry in sorted(usable)[: max(0, len(usable) - keep)]:
        if _remove(entry):
            removed.append(entry)
    return removed


def _remove(entry: Path) -> bool:
    with templates.template_lock(entry.name, wait=None) as locked:
        if locked:
            templates._move_aside(entry)
        return locked


# -- the writable disk ---------------------------------------------------------------------


def install_upper(snapshot: OpenTemplate, upper: Path) -> Path:
    """Puts a copy of ``snapshot``'s writable disk at ``upper``; returns where the
    pristine disk it replaced was kept (:func:`keep_upper` or :func:`restore_upper`).

    Only the copy's data is written (a sparse copy: a few MB): every container gets
    its own blocks, never the snapshot's file.
    """
    staged = upper.with_name(f".{upper.name}.rootready-{secrets.token_hex(4)}")
    kept = upper.with_name(f".{upper.name}.pristine-{secrets.token_hex(4)}")
    source = os.open(snapshot.directory / UPPER, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mode = os.stat(upper).st_mode & 0o777
        target = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            sparse_copy(source, target)
        except BaseException:
            os.close(target)
            staged.unlink(missing_ok=True)
            raise
        os.close(target)
    finally:
        os.close(source)
    os.rename(upper, kept)
    try:
        os.rename(staged, upper)
    except BaseException:
        os.rename(kept, upper)
        staged.unlink(missing_ok=True)
        raise
    return kept


def keep_upper(kept: Path) -> None:
    """The start went through: the pristine disk set aside is not needed."""
    kept.unlink(missing_ok=True)


def restore_upper(kept: Path, upper: Path) -> None:
    """The fast path failed: the pristine disk goes back (the copy is dropped)."""
    os.replace(kept, upper)


def sparse_copy(source: int, target: int) -> None:
    """Copies ``source`` to ``target`` (same size), writing only the regions with data."""
    size = os.fstat(source).st_size
    os.ftruncate(target, size)
    for start, end in templates._data_ranges(source, size):
        offset = start
        while offset < end:
            length = min(_COPY_CHUNK, end - offset)
            copied = os.copy_file_range(source, target, length, offset, offset)
            if copied <= 0:
                raise OSError(f"copying the snapshot's writable disk stopped at {offset}")
            offset += copied
