"""Where husk keeps its data and runtime files.

Root uses the system locations (/var/lib/husk, /run/husk); other users get XDG
locations. ``HUSK_DATA_DIR`` and ``HUSK_RUN_DIR`` override both, which is how the
tests isolate themselves.
"""

from __future__ import annotations

import os
from pathlib import Path


def _is_root() -> bool:
    return os.geteuid() == 0


def data_dir() -> Path:
    override = os.environ.get("HUSK_DATA_DIR")
    if override:
        return Path(override)
    if _is_root():
        return Path("/var/lib/husk")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "husk"


def run_dir() -> Path:
    override = os.environ.get("HUSK_RUN_DIR")
    if override:
        return Path(override)
    if _is_root():
        return Path("/run/husk")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/husk-{os.geteuid()}"
    return Path(base) / "husk"


def bundle_dir() -> Path:
    """The installed guest bundle (vmlinux, initramfs.cpio, manifest.json)."""
    return data_dir() / "bundle"


def cache_dir() -> Path:
    """Downloads that can be re-fetched (Debian packages for the bundle)."""
    return data_dir() / "cache"


def vms_dir() -> Path:
    """Per-VM runtime state: sockets, console logs. Private to the owner."""
    return run_dir() / "vms"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable only by its owner."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
