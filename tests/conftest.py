"""Session-wide test setup: an isolated husk data/run directory and a current guest bundle."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Shared fixtures: real registries (plain, htpasswd, token auth) and a real husk daemon.
pytest_plugins = ["registry_fixtures", "daemon_fixtures"]

# The installed bundle (built by install.sh) lives in the system data dir; tests
# isolate everything else, so remember where it is before redirecting.
_SYSTEM_DATA_DIR = Path(os.environ.get("HUSK_DATA_DIR") or "/var/lib/husk")


@pytest.fixture(scope="session", autouse=True)
def husk_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test session gets its own data and run directories."""
    root = tmp_path_factory.mktemp("husk")
    saved = {
        k: os.environ.get(k)
        for k in ("HUSK_DATA_DIR", "HUSK_RUN_DIR", "HUSK_SYSTEM_BUNDLE", "HUSK_SYSTEM_IMAGES")
    }
    os.environ["HUSK_DATA_DIR"] = str(root / "data")
    # Unix socket paths must stay under 108 bytes: keep the run dir short.
    run = Path(tempfile.mkdtemp(prefix="husk-run-", dir="/tmp"))
    os.environ["HUSK_RUN_DIR"] = str(run)
    os.environ.setdefault("HUSK_ACCEL", "tcg")
    # Nor does a session see the host's bundle and images installed for every user (issue 17).
    os.environ["HUSK_SYSTEM_BUNDLE"] = str(root / "no-system-bundle")
    os.environ["HUSK_SYSTEM_IMAGES"] = str(root / "no-system-images")
    yield root
    from husk.network.switchclient import stop_switch

    stop_switch(run)
    shutil.rmtree(run, ignore_errors=True)
    _unmount_below(root)  # sized volumes a failed test left mounted
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _unmount_below(root: Path) -> None:
    prefix = str(root) + "/"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1]
        if target.startswith(prefix):
            subprocess.run(["umount", "--lazy", target], check=False, capture_output=True)


@pytest.fixture(scope="session")
def guest_bundle(husk_dirs: Path) -> object:
    """The installed guest bundle, rebuilt first if the agent's sources changed."""
    from husk.bundle.builder import ensure_built

    bundle = ensure_built(
        _SYSTEM_DATA_DIR / "bundle", deb_cache=_SYSTEM_DATA_DIR / "cache" / "debs"
    )
    os.environ["HUSK_KERNEL"] = str(bundle.kernel)
    os.environ["HUSK_INITRD"] = str(bundle.initrd)
    return bundle


@pytest.fixture(scope="session")
def busybox_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An erofs container root built from Debian's busybox-static."""
    from guestfs import busybox_erofs

    return busybox_erofs(tmp_path_factory.mktemp("busybox"))


@pytest.fixture
def as_root() -> None:
    """Tests of root-only paths (namespaces, taps, whiteouts): CI runs as root, so their
    absence is a failure with the reason, never a skip."""
    assert os.geteuid() == 0, "this test exercises a root-only path: run the suite as root"
