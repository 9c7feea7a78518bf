"""The erofs disk cache as tests see it: its entries once background deletions settled."""

from __future__ import annotations

import time

from husk.oci.rootfs import rootfs_dir


def disk_cache_entries() -> list[str]:
    """What the disk cache holds besides lock files, once staging trees being deleted in
    the background are gone (within a deadline)."""
    disks = rootfs_dir()
    deadline = time.monotonic() + 30
    while disks.exists() and any(p.name.startswith(".trash") for p in disks.iterdir()):
        assert time.monotonic() < deadline, "a staging tree was never deleted"
        time.sleep(0.05)
    return [p.name for p in disks.iterdir() if p.suffix != ".lock"] if disks.exists() else []
