"""Boot templates on disk: what a template is keyed by, where it lives, how it is swapped.

A template is a VM saved at "agent ready" (see :mod:`husk.sandbox.template_boot`).
It may only be restored into a VM with the same bundle, QEMU, accelerator, CPU
model, vCPUs, memory and device layout, disks of the same virtual sizes
included; :class:`TemplateInputs` lists all of that and its hash names the
template's directory::

    data_dir()/templates/<key>/template.json   every input + both files' sizes and sha256
    data_dir()/templates/<key>/vm.state        QEMU's device state, saved without RAM (0400)
    data_dir()/templates/<key>/memory.ram      the guest's RAM, a sparse file (0400)
    data_dir()/templates/<key>/console.log     the template guest's boot log
    data_dir()/templates/<key>.lock            flock serialising builds and removals

Restored VMs map the template's RAM copy-on-write: a restore reads a few kilobytes
of device state instead of the guest's used memory, and every clone of one
template shares the pages it never wrote. QEMU 7.2 opens a RAM file read-write
whatever it does with it (``rom=`` came in 8.1), so clones are not given
``memory.ram`` itself: the daemon loads it once (checking its digest on the way)
into a memfd sealed against writes, growing and shrinking (:func:`sealed_memory`),
and hands every clone that memfd. A clone's QEMU can map it privately and
nothing else: ``write()`` and shared writable mappings of it are refused by the
kernel, so no clone can change the RAM another clone starts from. A template's
files are never written after they are published either; replacing one renames a
new directory into place.

A new template is written into a private ``.build-*`` directory and renamed into
place under the lock, so readers see a whole template or none. Readers open the
directory once and everything else relative to it, so a template replaced while
it is being read cannot mix old metadata with a new snapshot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from husk import paths, settings
from husk.errors import InvalidArgument
from husk.vm.machine import MachineBackend, MachineConfig, host_tsc_khz

log = logging.getLogger(__name__)

TEMPLATE_FORMAT = 5
"""3: every VM has LAN_SLOTS LAN interfaces (issue 12). 4: the guest kernel's memory options
(qemu_argv.GUEST_MEMORY_CMDLINE) are on its command line."""
METADATA = "template.json"
SNAPSHOT = "vm.state"
MEMORY = "memory.ram"
CONSOLE = "console.log"
FAILURES = "failures"
MAX_FAILURES = 3
"""Restores in a row that failed without proof of a bad template before it is dropped."""
LOCK_SUFFIX = ".lock"
BUILD_PREFIX = ".build-"
TRASH_PREFIX = ".trash-"
GIB = 1024**3
IMAGE_DISK_BASE = 4 * GIB
"""Image disks are padded to 4 GiB, or the next doubling of it that holds them."""
LOCK_TIMEOUT = 120.0
MAX_TEMPLATES = 8
"""Kept at most (each holds a guest's used memory, ~130 MB); least recently used go first."""
STALE_BUILD_SECONDS = 3600.0
_HASH_CHUNK = 4 << 20
_MEMORY_BLOCK = 1 << 20
MAX_SEALED = 2
"""Templates whose RAM this process keeps loaded in sealed memfds (least recently used go)."""
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
_ZERO_BLOCK = bytes(_MEMORY_BLOCK)


class TemplateCorrupt(Exception):
    """The template itself is bad: one of its files changed on disk, or QEMU rejected it."""


# -- the switch -------------------------------------------------------------------------


def templates_enabled() -> bool:
    """False when HUSK_NO_TEMPLATE is set, or data_dir()/config.json says {"templates": false}."""
    return settings.templates_enabled()


# -- the key ----------------------------------------------------------------------------


def image_disk_size(actual: int) -> int:
    """The virtual size an image disk of ``actual`` bytes is padded to."""
    size = IMAGE_DISK_BASE
    while size < actual:
        size *= 2
    return size


@dataclass(frozen=True)
class TemplateInputs:
    """Everything a saved VM's state depends on; any change means another template."""

    bundle_digest: str
    qemu_version: str
    accel: str
    cpu_model: str
    cpus: int
    memory_mib: int
    tsc_khz: int | None
    cmdline_extra: tuple[str, ...]
    disks: tuple[tuple[str, bool, str, int], ...]
    """(serial, readonly, cache mode, size in bytes), in attachment order."""
    shares: tuple[str, ...]
    """Mount tags in attachment order (the guest reads them at boot; read-only is host-side)."""
    net: bool
    lan_slots: int
    """LAN interfaces (virtio-net devices on stream sockets) after the network device."""
    format: int = TEMPLATE_FORMAT

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # type: ignore[no-any-return]

    @property
    def key(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def describe(self) -> str:
        return (
            f"{self.cpus} vCPU, {self.memory_mib} MiB, {self.accel}, "
            f"{len(self.disks)} disks, {len(self.shares)} shares"
        )


def template_inputs(
    config: MachineConfig, *, bundle_digest: str, backend: MachineBackend
) -> TemplateInputs:
    """The inputs of ``config`` as it will run (resources clamped, disks at their sizes now).

    ``config`` names its accelerator (a template is saved under one, never "auto").
    """
    accel = config.accel
    if accel == "auto":
        raise InvalidArgument("a template's inputs need the accelerator chosen, not 'auto'")
    cpus, memory_mib = config.resources()
    return TemplateInputs(
        bundle_digest=bundle_digest,
        qemu_version=backend.version(),
        accel=accel,
        cpu_model=config.cpu_model or backend.default_cpu_model(accel),
        cpus=cpus,
        memory_mib=memory_mib,
        tsc_khz=host_tsc_khz() if accel == "tcg" else None,
        cmdline_extra=tuple(config.cmdline_extra),
        disks=tuple(
            (disk.serial, disk.readonly, disk.cache, disk.virtual_size()) for disk in config.disks
        ),
        shares=tuple(share.tag for share in config.shares),
        net=config.net is not None,
        lan_slots=config.lan_slots,
    )


# -- the store --------------------------------------------------------------------------


def templates_dir() -> Path:
    return paths.data_dir() / "templates"


def template_dir(key: str) -> Path:
    return templates_dir() / key


@dataclass
class OpenTemplate:
    """A template found on disk, with its two state files open for reading (offset 0)."""

    key: str
    directory: Path
    metadata: dict[str, Any]
    snapshot_fd: int
    memory_fd: int
    console: bytes
    identity: tuple[int, int]
    """(st_dev, st_ino) of template.json: tells this template from a rebuilt one."""

    def close(self) -> None:
        for name in ("snapshot_fd", "memory_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def verify(self) -> None:
        """Hashes both files (pread: QEMU's offset is untouched); TemplateCorrupt if changed.

        A file this process already verified, unchanged since (same inode, size, mtime
        and ctime, which no write can avoid changing), is not hashed again: hashing
        a guest's memory costs more CPU than the whole rest of a restore.
        """
        checks = (
            (self.snapshot_fd, "snapshot", sha256_of_fd),
            (self.memory_fd, "memory", memory_digest),
        )
        for fd, what, digest_of in checks:
            expected = str(self.metadata.get(f"{what}_sha256", ""))
            identity = _file_identity(fd)
            if _verified.get(identity) == expected:
                continue
            size, digest = digest_of(fd)
            recorded = self.metadata.get(f"{what}_size")
            if size != recorded:
                raise TemplateCorrupt(f"{what} is {size} bytes, the template recorded {recorded}")
            if digest != expected:
                raise TemplateCorrupt(f"{what} does not match its recorded sha256")
            _verified[identity] = expected


_verified: dict[tuple[int, int, int, int, int], str] = {}


def _file_identity(fd: int) -> tuple[int, int, int, int, int]:
    info = os.fstat(fd)
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def sha256_of_fd(fd: int) -> tuple[int, str]:
    """(size, sha256) of everything in ``fd``, read with pread."""
    digest = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, _HASH_CHUNK, offset)
        if not chunk:
            break
        digest.update(chunk)
        offset += len(chunk)
    return offset, digest.hexdigest()


def memory_digest(fd: int, *, copy_to: int | None = None) -> tuple[int, str]:
    """(size, digest) of a sparse guest-RAM file, reading only its data.

    The digest covers every 1 MiB block that is not all zeros, with its index, so
    it does not depend on how the filesystem happens to lay out holes.
    ``copy_to``: a file of the same size that receives exactly the blocks hashed
    (its other blocks stay holes), so what was checked is what was copied.
    """
    size = os.fstat(fd).st_size
    if copy_to is not None:
        os.ftruncate(copy_to, size)
    digest = hashlib.sha256()
    digest.update(size.to_bytes(8, "little"))
    block = 0
    for start, end in _data_ranges(fd, size):
        block = max(block, start // _MEMORY_BLOCK)
        while block * _MEMORY_BLOCK < end:
            data = os.pread(fd, _MEMORY_BLOCK, block * _MEMORY_BLOCK)
            if data != _ZERO_BLOCK[: len(data)]:
                digest.update(block.to_bytes(8, "little"))
                digest.update(data)
                if copy_to is not None:
                    _write_all(copy_to, data, block * _MEMORY_BLOCK)
            block += 1
    return size, digest.hexdigest()


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# -- the RAM clones map ---------------------------------------------------------------


_sealed: OrderedDict[tuple[int, int, int, int, int], int] = OrderedDict()
_sealed_lock = threading.Lock()


class SharedMemory(Protocol):
    """Sealed template RAM held by another process of the same user (husk-runtime's RAM
    holder, husk.ociruntime.ramholder): a short-lived process then neither reads nor
    hashes a template's RAM that another one has checked already."""

    def get(self, identity: tuple[int, int, int, int, int], digest: str, size: int) -> int | None:
        """A sealed memfd of the file ``identity`` checked against ``digest``, or None."""

    def put(self, identity: tuple[int, int, int, int, int], digest: str, memfd: int) -> None:
        """Offers a sealed, checked memfd to the holder (the caller keeps its own)."""


shared_memory: SharedMemory | None = None
"""Asked before a template's RAM is loaded, and given what this process loads."""


def new_memory_fd(name: str) -> int:
    """An empty memfd that can be sealed later."""
    return os.memfd_create(f"husk-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def sealed_memory(template: OpenTemplate) -> int:
    """A sealed memfd holding ``template``'s RAM, checked against its recorded digest.

    Loaded once per process and template (reading only the file's data), then
    shared: the caller gets its own descriptor of it (a dup) and closes it. The
    memfd can be mapped privately, never written (``F_SEAL_WRITE``), resized
    (``F_SEAL_GROW|SHRINK``) or unsealed (``F_SEAL_SEAL``). TemplateCorrupt if the
    file does not match its digest.
    """
    identity = _file_identity(template.memory_fd)
    with _sealed_lock:
        cached = _sealed.get(identity)
        if cached is not None:
            _sealed.move_to_end(identity)
            return os.dup(cached)
        expected = str(template.metadata.get("memory_sha256", ""))
        recorded = template.metadata.get("memory_size")
        if shared_memory is not None and isinstance(recorded, int):
            held = shared_memory.get(identity, expected, recorded)
            if held is not None:
                _verified[identity] = expected
                return held
        memfd = new_memory_fd(f"template-{template.key[:12]}")
        try:
            size, digest = memory_digest(template.memory_fd, copy_to=memfd)
            if size != recorded:
                raise TemplateCorrupt(f"memory is {size} bytes, the template recorded {recorded}")
            if digest != expected:
                raise TemplateCorrupt("memory does not match its recorded sha256")
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(memfd)
            raise
        _verified[identity] = expected
        _remember_sealed(identity, memfd)
        if shared_memory is not None:
            shared_memory.put(identity, expected, memfd)
        return os.dup(memfd)


def adopt_memory(memory_file: Path, memfd: int) -> None:
    """Seals ``memfd`` (the RAM a template was just saved from, identical to the
    published ``memory_file``) and keeps it for restores: the first clone needs no load.

    Takes ownership of ``memfd``; nothing may map it writable and shared any more.
    """
    try:
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
        fd = os.open(memory_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            identity = _file_identity(fd)
        finally:
            os.close(fd)
    except OSError:
        os.close(memfd)
        raise
    with _sealed_lock:
        _remember_sealed(identity, memfd)


def _remember_sealed(identity: tuple[int, int, int, int, int], memfd: int) -> None:
    old = _sealed.pop(identity, None)
    if old is not None:
        os.close(old)
    _sealed[identity] = memfd
    while len(_sealed) > MAX_SEALED:
        _, evicted = _sealed.popitem(last=False)
        os.close(evicted)  # running clones keep their own mappings


def write_memory(memfd: int, path: Path) -> None:
    """Writes the RAM in ``memfd`` to ``path`` (an existing sparse file), data blocks only."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        memory_digest(memfd, copy_to=fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the regions of ``fd`` that hold data (the whole file if unknown)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


def open_template(
    inputs: TemplateInputs, *, key: str | None = None, base: Path | None = None
) -> tuple[OpenTemplate | None, str]:
    """The template for ``inputs`` if one is stored and really was built from them.

    ``key`` and ``base``: another store of templates of the same format (root-ready
    snapshots, :mod:`husk.sandbox.rootready`), its entry ``key``.
    Returns (template, "") or (None, why not).
    """
    key = key or inputs.key
    directory = (base or templates_dir()) / key
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, f"no template {key} yet"
    except OSError as err:
        return None, f"cannot open template {key}: {err}"
    try:
        try:
            meta_fd = os.open(METADATA, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
            with os.fdopen(meta_fd, "rb") as stream:
                info = os.fstat(stream.fileno())
                metadata = json.loads(stream.read())
            if not isinstance(metadata, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            return None, f"template {key} has unreadable metadata ({err})"
        if metadata.get("inputs") != inputs.to_json():
            return None, f"template {key} was built from other inputs"
        opened: list[int] = []
        for what, name in (("snapshot", SNAPSHOT), ("memory", MEMORY)):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as err:
                for fd in opened:
                    os.close(fd)
                return None, f"template {key} has no {what} file ({err})"
            opened.append(fd)
            size = os.fstat(fd).st_size
            recorded = metadata.get(f"{what}_size")
            if size != recorded:
                for fd in opened:
                    os.close(fd)
                return None, f"template {key}: {what} is {size} bytes, expected {recorded}"
        snapshot_fd, memory_fd = opened
        console = b""
        with contextlib.suppress(OSError):
            console_fd = os.open(CONSOLE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
            with os.fdopen(console_fd, "rb") as stream:
                console = stream.read(1 << 20)
        return (
            OpenTemplate(
                key,
                directory,
                metadata,
                snapshot_fd,
                memory_fd,
                console,
                (info.st_dev, info.st_ino),
            ),
            "",
        )
    finally:
        os.close(dir_fd)


class BuildLock:
    """The flock that serialises building, replacing and removing one template.

    Held by a start from its cold boot until its save, so that concurrent first
    starts wait for that one template instead of all booting cold.
    """

    def __init__(self, key: str) -> None:
        base = paths.ensure_private_dir(templates_dir())
        self._fd = os.open(
            base / f"{key}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        self.held = False

    def try_acquire(self) -> bool:
        if not self.held:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self.held = True
        return True

    def release(self) -> None:
        if self.held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.held = False

    def close(self) -> None:
        self.release()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@contextlib.contextmanager
def template_lock(key: str, *, wait: float | None = LOCK_TIMEOUT) -> Iterator[bool]:
    """Holds the template's build lock; yields False if ``wait`` (None: don't wait) ran out.

    Blocks the calling thread while waiting: from async code, use ``wait=None``.
    """
    lock = BuildLock(key)
    try:
        deadline = time.monotonic() + (wait or 0.0)
        while not lock.try_acquire():
            if wait is None or time.monotonic() >= deadline:
                yield False
                return
            time.sleep(0.05)
        yield True
    finally:
        lock.close()


def new_build_dir(key: str) -> Path:
    base = paths.ensure_private_dir(templates_dir())
    build = base / f"{BUILD_PREFIX}{key}-{secrets.token_hex(4)}"
    build.mkdir(mode=0o700)
    return build


def publish(
    build: Path,
    inputs: TemplateInputs,
    *,
    console: bytes,
    seconds: float,
    final: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Completes ``build`` (which holds the device state and the memory file) and
    renames it into place.

    The caller holds :func:`template_lock`. An older template with the same key
    (corrupt or half-written by a crashed build) is replaced. This process trusts
    the hashes it records here without reading the files again. ``final``: where it
    goes (another store's entry), ``extra``: more metadata.
    """
    (build / CONSOLE).write_bytes(console)
    metadata: dict[str, Any] = {
        "format": TEMPLATE_FORMAT,
        "key": inputs.key,
        "inputs": inputs.to_json(),
        "created": time.time(),
        "build_seconds": round(seconds, 3),
        **(extra or {}),
    }
    for item in (build / SNAPSHOT, build / MEMORY, build / CONSOLE):
        os.chmod(item, 0o400)
    for what, name, digest_of in (
        ("snapshot", SNAPSHOT, sha256_of_fd),
        ("memory", MEMORY, memory_digest),
    ):
        fd = os.open(build / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size, digest = digest_of(fd)
            metadata[f"{what}_size"] = size
            metadata[f"{what}_sha256"] = digest
            _verified[_file_identity(fd)] = digest
        finally:
            os.close(fd)
    (build / METADATA).write_text(json.dumps(metadata, indent=1, sort_keys=True))
    os.chmod(build / METADATA, 0o600)
    final = final or template_dir(inputs.key)
    _move_aside(final)
    os.rename(build, final)
    return final


def discard(template: OpenTemplate, reason: str) -> bool:
    """Removes ``template`` if it is still the stored one (not rebuilt meanwhile)."""
    with template_lock(template.key, wait=10.0) as locked:
        if not locked:
            return False
        try:
            info = os.stat(template.directory / METADATA)
        except OSError:
            return False
        if (info.st_dev, info.st_ino) != template.identity:
            return False
        log.warning("discarding template %s: %s", template.key, reason)
        _move_aside(template.directory)
        return True


def _move_aside(directory: Path) -> None:
    """Renames ``directory`` out of the way, then deletes it (open files stay readable)."""
    if not directory.exists():
        return
    trash = directory.with_name(f"{TRASH_PREFIX}{directory.name}-{secrets.token_hex(4)}")
    os.rename(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def mark_used(template: OpenTemplate) -> None:
    """Records a successful restore (the directory's mtime orders :func:`prune`)."""
    with contextlib.suppress(OSError):
        os.utime(template.directory)
    with contextlib.suppress(OSError):
        (template.directory / FAILURES).unlink()


def record_failure(template: OpenTemplate) -> int:
    """Counts a failed restore that may not be the template's fault (e.g. a timeout
    on a loaded host); returns how many happened in a row."""
    path = template.directory / FAILURES
    try:
        count = int(path.read_text() or "0") + 1
    except (OSError, ValueError):
        count = 1
    with contextlib.suppress(OSError):
        path.write_text(str(count))
    return count


def list_templates() -> list[dict[str, Any]]:
    """Metadata of every stored template (unreadable ones included, with an "error")."""
    found: list[dict[str, Any]] = []
    base = templates_dir()
    if not base.is_dir():
        return found
    for entry in sorted(base.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            metadata = json.loads((entry / METADATA).read_text())
            if not isinstance(metadata, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            metadata = {"error": str(err)}
        metadata["path"] = str(entry)
        found.append(metadata)
    return found


def outdated(inputs: dict[str, Any], current: TemplateInputs) -> bool:
    """Whether a VM saved from ``inputs`` can never be restored again: another template
    format, guest bundle or QEMU than ``current``'s."""
    return (
        inputs.get("format") != current.format
        or inputs.get("bundle_digest") != current.bundle_digest
        or inputs.get("qemu_version") != current.qemu_version
    )


def saved_vm_dir(entry: Path, now: float, removed: list[Path]) -> bool:
    """Whether ``entry`` of a store of saved VMs (templates, root-ready snapshots) is one;
    a half-built or trashed directory older than STALE_BUILD_SECONDS (a crashed build)
    is removed on the way and added to ``removed``."""
    if entry.name.startswith((BUILD_PREFIX, TRASH_PREFIX)):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return False
    return not entry.name.startswith(".") and entry.is_dir()


def prune(current: TemplateInputs, *, keep: int = MAX_TEMPLATES) -> list[Path]:
    """Deletes templates that can never be used again (other bundle, QEMU or format).

    Templates for other sizes or layouts stay, the ``keep`` most recently used
    of them; half-built directories older than an hour (a crashed build) go.
    """
    removed: list[Path] = []
    base = templates_dir()
    if not base.is_dir():
        return removed
    now = time.time()
    usable: list[tuple[float, Path]] = []
    for entry in base.iterdir():
        if not saved_vm_dir(entry, now, removed):
            continue
        try:
            inputs = json.loads((entry / METADATA).read_text()).get("inputs") or {}
            used = entry.stat().st_mtime
        except (OSError, ValueError, AttributeError):
            continue  # replaced by the next build for its key
        stale = outdated(inputs, current)
        if stale:
            if _remove_unlocked(entry):
                removed.append(entry)
        elif entry.name != current.key:
            usable.append((used, entry))
    surplus = len(usable) + 1 - keep
    for _, entry in sorted(usable)[: max(0, surplus)]:
        if _remove_unlocked(entry):
            removed.append(entry)
    return removed


def _remove_unlocked(entry: Path) -> bool:
    with template_lock(entry.name, wait=None) as locked:
        if locked:
            # The lock file stays: unlinking it would let two builders lock
            # different inodes under one name.
            _move_aside(entry)
        return locked
