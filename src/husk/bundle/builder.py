"""``husk bundle build``: Debian packages in, vmlinux + initramfs.cpio + manifest.json out.

The output depends only on the .deb files, the agent sources and
SOURCE_DATE_EPOCH, so the same inputs give the same digest. The new bundle is
built beside the destination and swapped in atomically under a lock, so a
reader sees either the old bundle or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from husk import paths, settings
from husk.bundle import debs, initramfs, kernel, pyruntime
from husk.bundle.locate import (
    INITRD,
    KERNEL,
    MANIFEST,
    Bundle,
    canonical_json,
    file_sha256,
    load,
)
from husk.bundle.modules import ON_DEMAND_MODULES, ModuleTree
from husk.errors import BundleError

FORMAT_VERSION = 1
# Imported by the guest's interpreter at build time, to catch a broken trim early.
SMOKE_IMPORTS = ["encodings.utf_8", "json", "tarfile", "husk.guest.protocol"]

AGENT_MAIN = "husk/guest/agent/main.pyc"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def husk_package_dir() -> Path:
    """The installed ``husk`` package, whose ``guest`` subpackage the guest runs."""
    spec = importlib.util.find_spec("husk")
    if spec is None or not spec.submodule_search_locations:
        raise BundleError("cannot find the husk package to copy the guest agent from")
    return Path(next(iter(spec.submodule_search_locations)))


def _sources_sha256(base: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        if "__pycache__" in file.parts:
            continue
        digest.update(file.relative_to(base).as_posix().encode() + b"\0")
        digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()


def agent_sources_sha256(husk_package: Path) -> str:
    files = [husk_package / "__init__.py", *sorted((husk_package / "guest").rglob("*.py"))]
    return _sources_sha256(husk_package, files)


def builder_sources_sha256() -> str:
    """The builder's own code is an input too: a changed builder may lay files out differently."""
    here = Path(__file__).parent
    return _sources_sha256(here, sorted(here.glob("*.py")))


def source_date_epoch(explicit: int | None = None) -> int:
    if explicit is not None:
        return explicit
    return settings.source_date_epoch()


def build_inputs(packages: list[debs.Deb], agent_entry: str | None, epoch: int) -> dict[str, Any]:
    """Everything the output is a function of; recorded in the manifest."""
    return {
        "format": FORMAT_VERSION,
        "packages": sorted(
            (deb.manifest_entry() for deb in packages), key=lambda entry: entry["name"]
        ),
        "agent_sha256": agent_sources_sha256(husk_package_dir()),
        "builder_sha256": builder_sources_sha256(),
        "agent_entry_sha256": (
            None if agent_entry is None else hashlib.sha256(agent_entry.encode()).hexdigest()
        ),
        "source_date_epoch": epoch,
    }


def resolve_packages(deb_dir: Path | None, deb_cache: Path | None) -> list[debs.Deb]:
    if deb_dir is not None:
        return debs.from_directory(deb_dir)
    return debs.fetch(deb_cache or paths.cache_dir() / "debs")


def _assemble(
    work: Path,
    out: Path,
    packages: list[debs.Deb],
    agent_entry: str | None,
    epoch: int,
    progress: Progress,
) -> dict[str, Any]:
    unpacked: dict[str, Path] = {}
    for deb in packages:
        unpacked[deb.name] = debs.extract(deb, work / "debs" / deb.name)
    image = debs.kernel_image(packages)
    release = image.name.removeprefix("linux-image-")
    kernel_root = unpacked[image.name]

    progress("extracting vmlinux")
    bzimage = kernel_root / "boot" / f"vmlinuz-{release}"
    if not bzimage.is_file():
        raise BundleError(f"{image.name} has no boot/vmlinuz-{release}")
    (out / KERNEL).write_bytes(kernel.extract_vmlinux(bzimage.read_bytes()))

    progress("selecting kernel modules")
    tree = ModuleTree(kernel_root / "lib" / "modules" / release)
    modules = tree.load_order()
    at_boot = {module.name for module in modules}
    on_demand = {
        feature: [m for m in tree.load_order(wanted) if m.name not in at_boot]
        for feature, wanted in ON_DEMAND_MODULES.items()
    }

    progress("assembling the root file system")
    root = work / "root"
    root.mkdir()
    initramfs.install_busybox(root, unpacked["busybox-static"] / "bin" / "busybox")
    pyruntime.install_python(root, lambda name: unpacked[name])
    initramfs.install_modules(root, modules)
    for feature, extra in on_demand.items():
        initramfs.install_on_demand(root, feature, extra)
    initramfs.install_agent(root, husk_package_dir(), agent_entry)
    initramfs.install_init(root)

    progress("precompiling the guest's Python")
    pyruntime.compile_sourceless(root, [pyruntime.STDLIB, initramfs.AGENT_LIB])
    smoke = list(SMOKE_IMPORTS)
    if agent_entry is None and (root / initramfs.AGENT_LIB / AGENT_MAIN).exists():
        smoke.append("husk.guest.agent.main")
    pyruntime.check_imports(root, root / initramfs.AGENT_LIB, smoke)

    progress("writing initramfs.cpio")
    initramfs.write_archive(root, out / INITRD, epoch)
    return {
        "kernel_release": release,
        "modules": [module.name for module in modules],
        "on_demand_modules": {f: [m.name for m in extra] for f, extra in on_demand.items()},
        "artifacts": {
            name: {"sha256": file_sha256(out / name), "size": (out / name).stat().st_size}
            for name in (KERNEL, INITRD)
        },
    }


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(new: Path, current: Path) -> bool:
    """Atomically swap two directories (renameat2 RENAME_EXCHANGE); False if unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(current), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS):
        return False
    raise BundleError(f"cannot install the bundle at {current}: {os.strerror(code)}")


def _install(new: Path, destination: Path) -> None:
    if not destination.exists():
        os.rename(new, destination)
        return
    if _exchange(new, destination):
        shutil.rmtree(new)  # now holds the previous bundle
        return
    previous = new.with_name(new.name + ".old")
    os.rename(destination, previous)
    os.rename(new, destination)
    shutil.rmtree(previous)


@contextlib.contextmanager
def _locked(destination: Path) -> Iterator[None]:
    """Serialise builds into one destination (tests and users may run them together)."""
    lock_path = destination.with_name(f".{destination.name}.lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(
    output: Path | None = None,
    *,
    deb_dir: Path | None = None,
    deb_cache: Path | None = None,
    agent_entry: str | None = None,
    epoch: int | None = None,
    progress: Progress = _quiet,
) -> Bundle:
    """Build the guest bundle into ``output`` (default: the data directory's bundle).

    ``deb_dir`` uses pre-downloaded packages instead of apt; ``agent_entry``
    replaces the source of /husk/init.py (tests boot a probe instead of the agent).
    """
    destination = paths.bundle_dir() if output is None else output
    destination.parent.mkdir(parents=True, exist_ok=True)
    with _locked(destination):
        return _build_locked(destination, deb_dir, deb_cache, agent_entry, epoch, progress)


def ensure_built(
    output: Path,
    *,
    deb_dir: Path | None = None,
    deb_cache: Path | None = None,
    agent_entry: str | None = None,
    progress: Progress = _quiet,
) -> Bundle:
    """The bundle at ``output``, rebuilt only if its inputs changed (packages, agent, entry)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with _locked(output):
        packages = resolve_packages(deb_dir, deb_cache)
        wanted = build_inputs(packages, agent_entry, source_date_epoch())
        with contextlib.suppress(BundleError):
            existing = load(output, verify=True)
            if existing.manifest.get("inputs") == wanted:
                return existing
        return _build_locked(output, deb_dir, deb_cache, agent_entry, None, progress, packages)


def _build_locked(
    destination: Path,
    deb_dir: Path | None,
    deb_cache: Path | None,
    agent_entry: str | None,
    epoch: int | None,
    progress: Progress,
    packages: list[debs.Deb] | None = None,
) -> Bundle:
    started = time.monotonic()
    if packages is None:
        progress("fetching Debian packages")
        packages = resolve_packages(deb_dir, deb_cache)
    fixed_epoch = source_date_epoch(epoch)
    inputs = build_inputs(packages, agent_entry, fixed_epoch)
    scratch = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}-build-"))
    try:
        out = scratch / "bundle"
        out.mkdir()
        built = _assemble(scratch / "work", out, packages, agent_entry, fixed_epoch, progress)
        manifest = {"format": FORMAT_VERSION, "inputs": inputs, **built}
        (out / MANIFEST).write_bytes(canonical_json(manifest) + b"\n")
        for name in (KERNEL, INITRD, MANIFEST):
            os.chmod(out / name, 0o644)
        os.chmod(out, 0o755)
        _install(out, destination)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    progress(f"built in {time.monotonic() - started:.1f} s")
    return load(destination)
