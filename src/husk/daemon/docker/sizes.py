"""A container's sizes as ``docker ps -s`` shows them: ``SizeRw`` and ``SizeRootFs``.

A container's writable layer is a sparse ext4 disk image (``upper.ext4`` in its state
directory) that the guest mounts under its overlay. What the container wrote is what
that image holds beyond an empty filesystem: the blocks the image really takes on the
host, less those a freshly made, empty disk of the same size takes (mkfs's metadata).
Read from the host's file alone: nothing is booted or mounted for it. Blocks the guest
freed are not returned to the host (no discard), so after deleting files the size stays
at its high-water mark, as a copy-up layer's would until the next write.

``SizeRootFs`` is Docker's "virtual" size: the writable layer plus the image.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from husk.errors import HuskError
from husk.oci.rootfs import make_ext4_disk

if TYPE_CHECKING:
    from husk.runtime.model import ContainerRecord
    from husk.runtime.runtime import Runtime

log = logging.getLogger(__name__)

UPPER_DISK = "upper.ext4"


@functools.lru_cache(maxsize=8)
def empty_disk_bytes(size: int, directory: Path) -> int:
    """Bytes an empty writable-layer disk of ``size`` takes on ``directory``'s filesystem."""
    try:
        with tempfile.TemporaryDirectory(dir=directory, prefix=".husk-size-") as scratch:
            probe = Path(scratch) / UPPER_DISK
            make_ext4_disk(probe, size)
            return os.stat(probe).st_blocks * 512
    except (OSError, HuskError) as err:
        log.warning("cannot measure an empty %d-byte disk: %s", size, err)
        return 0


def writable_layer_bytes(upper: Path) -> int:
    """What the container wrote into its writable layer ``upper`` (0 when it has none)."""
    try:
        info = os.stat(upper)
    except OSError:
        return 0
    used = info.st_blocks * 512 - empty_disk_bytes(info.st_size, upper.parent.parent)
    return max(0, used)


def container_sizes(runtime: Runtime, record: ContainerRecord) -> tuple[int, int]:
    """(``SizeRw``, ``SizeRootFs``) of ``record``."""
    size_rw = writable_layer_bytes(runtime.containers.directory(record.id) / UPPER_DISK)
    image_bytes = 0
    with contextlib.suppress(HuskError):
        image_bytes = runtime.images.resolve(record.image_id).size
    return size_rw, size_rw + image_bytes
