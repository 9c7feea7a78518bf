"""Find the installed guest bundle, or the kernel/initrd named by HUSK_KERNEL / HUSK_INITRD."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from husk import paths, settings
from husk.errors import BundleError

MANIFEST = "manifest.json"
KERNEL = "vmlinux"
INITRD = "initramfs.cpio"
ARTIFACTS = (KERNEL, INITRD)
KERNEL_ENV = settings.HUSK_KERNEL
INITRD_ENV = settings.HUSK_INITRD
_REBUILD = "run `husk bundle build` to rebuild it"

# (path, size, mtime_ns) -> sha256, so each file is hashed once per process.
_sha256_cache: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class Bundle:
    kernel: Path
    initrd: Path
    digest: str
    manifest: dict[str, Any] = field(compare=False, hash=False)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The bundle's identity: sha256 of its manifest in canonical JSON."""
    return "sha256:" + hashlib.sha256(canonical_json(manifest)).hexdigest()


def file_sha256(path: Path) -> str:
    info = path.stat()
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    cached = _sha256_cache.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        cached = _sha256_cache[key] = digest.hexdigest()
    return cached


def _read_manifest(directory: Path) -> dict[str, Any]:
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"guest bundle not found at {directory}: run `husk bundle build`")
    try:
        manifest = json.loads(manifest_path.read_text())
        artifacts = manifest["artifacts"]
        for name in ARTIFACTS:
            int(artifacts[name]["size"])
            str(artifacts[name]["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BundleError(
            f"guest bundle at {directory} is corrupt (unreadable {MANIFEST}: {err}): {_REBUILD}"
        ) from err
    if not isinstance(manifest, dict):
        raise BundleError(f"guest bundle at {directory} is corrupt: {_REBUILD}")
    return manifest


def _check_artifact(directory: Path, manifest: dict[str, Any], name: str, verify: bool) -> Path:
    path = directory / name
    expected = manifest["artifacts"][name]
    try:
        size = path.stat().st_size
    except OSError as err:
        raise BundleError(
            f"guest bundle at {directory} is corrupt ({name} missing): {_REBUILD}"
        ) from err
    if size != int(expected["size"]):
        raise BundleError(
            f"guest bundle at {directory} is corrupt ({name} is {size} bytes, "
            f"manifest says {expected['size']}): {_REBUILD}"
        )
    if verify and file_sha256(path) != expected["sha256"]:
        raise BundleError(
            f"guest bundle at {directory} is corrupt ({name} does not match its sha256): {_REBUILD}"
        )
    return path


def load(directory: Path, *, verify: bool = False) -> Bundle:
    """The bundle installed in ``directory``, ignoring HUSK_KERNEL / HUSK_INITRD."""
    manifest = _read_manifest(directory)
    return Bundle(
        kernel=_check_artifact(directory, manifest, KERNEL, verify),
        initrd=_check_artifact(directory, manifest, INITRD, verify),
        digest=manifest_digest(manifest),
        manifest=manifest,
    )


def _override(variable: str) -> Path | None:
    value = settings.raw(variable)
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise BundleError(f"{variable}={value} is not a file")
    return path


def _usable_system_dir(directory: Path) -> str | None:
    """Why the system bundle directory cannot be used (None: it can).

    Its kernel and agent run every container of this user, so it must be a directory
    that only root (or the user) can change, on a path only they can change.
    """
    try:
        paths.check_ancestors(directory)
        paths.check_private_dir(directory)
    except FileNotFoundError:
        return "not installed"
    except paths.UnsafePath as err:
        return str(err)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if not (directory / MANIFEST).is_file():
        return f"no {MANIFEST} there"
    return None


def find_directory() -> Path:
    """The bundle directory to use: the user's own if it has a manifest, else the first
    usable system-wide one (paths.bundle_dirs); BundleError saying how to get one."""
    own = paths.bundle_dir()
    if (own / MANIFEST).exists():
        return own
    reasons = []
    for candidate in paths.bundle_dirs()[1:]:
        problem = _usable_system_dir(candidate)
        if problem is None:
            return candidate
        reasons.append(f"{candidate} ({problem})")
    elsewhere = f" nor at {'; '.join(reasons)}" if reasons else ""
    raise BundleError(
        f"guest bundle not found at {own}{elsewhere}: run `husk bundle build` to build "
        "your own (about 15 s, from Debian packages), or ask an administrator to run "
        f"install.sh, which installs one for every user in {settings.SYSTEM_BUNDLE_DIRS[0]}"
    )


def locate(directory: Path | None = None, *, verify: bool = False) -> Bundle:
    """The bundle to boot. ``verify`` checks every artifact's sha256, not only its size.

    Without ``directory``, the user's own bundle, else the system's (find_directory).
    HUSK_KERNEL / HUSK_INITRD replace the bundle's artifacts; the digest is then
    derived from the sha256 of the two files actually used.
    """
    kernel_override = _override(KERNEL_ENV)
    initrd_override = _override(INITRD_ENV)
    if kernel_override is None and initrd_override is None:
        return load(directory or find_directory(), verify=verify)
    if kernel_override is None or initrd_override is None:
        installed = load(directory or find_directory(), verify=verify)
        kernel = kernel_override or installed.kernel
        initrd = initrd_override or installed.initrd
    else:
        kernel, initrd = kernel_override, initrd_override
    override_manifest: dict[str, Any] = {
        "overrides": {
            KERNEL: {
                "path": str(kernel),
                "sha256": file_sha256(kernel),
                "size": kernel.stat().st_size,
            },
            INITRD: {
                "path": str(initrd),
                "sha256": file_sha256(initrd),
                "size": initrd.stat().st_size,
            },
        }
    }
    identity = {name: entry["sha256"] for name, entry in override_manifest["overrides"].items()}
    return Bundle(
        kernel=kernel, initrd=initrd, digest=manifest_digest(identity), manifest=override_manifest
    )
