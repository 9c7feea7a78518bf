"""Facts about this husk installation: ``husk info``, ``system df`` and the Docker API's."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

from husk import paths, settings
from husk.bundle import locate
from husk.errors import BundleError, HuskError
from husk.oci.store import ImageStore
from husk.runtime.model import ContainerStatus
from husk.runtime.store import ContainerStore
from husk.vm.machine import host_cpu_count, host_memory_mib
from husk.vm.qemu import qemu_version


def info(containers: ContainerStore, images: ImageStore) -> dict[str, Any]:
    """Facts about this husk installation, for ``husk info`` and the Docker API."""
    records = containers.all()
    try:
        bundle_digest = locate().digest
    except BundleError as exc:
        bundle_digest = f"missing ({exc})"
    try:
        qemu = qemu_version()
    except HuskError as exc:
        qemu = f"unavailable ({exc})"
    return {
        "containers": len(records),
        "running": sum(r.state.status is ContainerStatus.RUNNING for r in records),
        "paused": sum(r.state.status is ContainerStatus.PAUSED for r in records),
        "stopped": sum(not r.state.running for r in records),
        "images": len(images.list_images()),
        "data_dir": str(paths.data_dir()),
        "bundle_digest": bundle_digest,
        "qemu_version": qemu,
        "accelerator": settings.accel_requested(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "cpus": host_cpu_count(),
        "memory_bytes": host_memory_mib() * 1024 * 1024,
        "hostname": platform.node(),
    }


def allocated_bytes(path: Path) -> int:
    """Bytes really used under ``path`` (sparse files count by allocated blocks)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def disk_usage(containers: ContainerStore, images: ImageStore) -> dict[str, Any]:
    """Bytes really used on disk by images, the rootfs cache and each container."""
    sizes = {r.id: allocated_bytes(containers.directory(r.id)) for r in containers.all()}
    return {
        "images_bytes": images.disk_usage(),
        "rootfs_cache_bytes": allocated_bytes(paths.data_dir() / "rootfs"),
        "containers": sizes,
        "containers_bytes": sum(sizes.values()),
    }
