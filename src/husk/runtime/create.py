"""What ``create`` decides before a container exists: its spec checked, its record made,
its disks prepared. Nothing here boots a VM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from husk.errors import InvalidArgument
from husk.oci.rootfs import ensure_rootfs_image, make_ext4_disk
from husk.oci.store import ImageRecord, ImageStore
from husk.runtime.model import ContainerRecord, new_container_id, now_iso
from husk.runtime.socket_relay import socket_source
from husk.runtime.store import ContainerStore
from husk.spec import (
    BindMount,
    ContainerSpec,
    PortBinding,
    image_exposed_ports,
    image_stop_signal,
    image_volumes,
    parse_signal,
    plan_process,
)
from husk.volumes import mountspec
from husk.volumes.manager import VolumeUser

UPPER_DISK_BYTES = 8 * 1024**3
"""The writable layer's size unless ``--storage-opt size=`` says otherwise: a sparse ext4
disk image, so only what the container writes takes room on the host."""
DEFAULT_STOP_TIMEOUT = 10
MIN_MEMORY_BYTES = 6 * 1024 * 1024
"""Docker's smallest memory limit."""


def validate_spec(spec: ContainerSpec) -> None:
    """Docker's refusals of a container spec, before anything is pulled or made."""
    for bind in spec.binds:
        if bind.volume or bind.anonymous:
            continue  # a volume: resolved once the image is known (volume_mounts)
        if not os.path.exists(bind.source):
            raise InvalidArgument(
                f'invalid mount config for type "bind": bind source path does not exist: '
                f"{bind.source}"
            )
        if not os.path.isdir(bind.source):
            bind.socket = socket_source(bind.source)  # refuses other files
    if spec.memory is not None and spec.memory < MIN_MEMORY_BYTES:
        raise InvalidArgument("Minimum memory limit allowed is 6MB")
    if spec.cpus is not None and spec.cpus <= 0:
        raise InvalidArgument(f"invalid number of CPUs: {spec.cpus}")
    if spec.healthcheck is not None and spec.healthcheck.test[:1] not in (
        ["CMD"],
        ["CMD-SHELL"],
        ["NONE"],
        [],
    ):
        raise InvalidArgument(f"invalid health check test {spec.healthcheck.test!r}")


def volume_mounts(
    spec: ContainerSpec, image_config: dict[str, Any], containers: ContainerStore
) -> list[BindMount]:
    """The spec's mounts, then what ``--volumes-from`` copies and an anonymous volume for
    each of the image's VOLUMEs, each only where no earlier mount (or tmpfs) is."""
    binds = list(spec.binds)
    covered = [b.target for b in binds] + [t.target for t in spec.tmpfs]
    taken = {mountspec.normal(t) for t in covered}
    for entry in spec.volumes_from:
        ref, readonly = mountspec.parse_volumes_from(entry)
        source = containers.get(ref)
        for bind in mountspec.copied_mounts(source.spec.binds, readonly):
            if mountspec.normal(bind.target) not in taken:
                taken.add(mountspec.normal(bind.target))
                binds.append(bind)
    binds += mountspec.anonymous_volumes(image_volumes(image_config), taken)
    return binds


def volume_users(containers: ContainerStore) -> list[VolumeUser]:
    """Who mounts which volume, from the container records."""
    return [
        VolumeUser(r.id, r.name, tuple(b.volume for b in r.spec.binds if b.volume))
        for r in containers.all()
    ]


def published_ports(spec: ContainerSpec, image_config: dict[str, Any]) -> list[PortBinding]:
    """The spec's bindings, plus (``-P``) one for each exposed port not bound already."""
    bindings = list(spec.ports)
    if spec.publish_all:
        published = {b.key() for b in bindings}
        for port in [*image_exposed_ports(image_config), *spec.exposed_ports]:
            number, _, proto = port.partition("/")
            binding = PortBinding(int(number), proto or "tcp")
            if binding.key() not in published:
                bindings.append(binding)
                published.add(binding.key())
    return bindings


def new_record(spec: ContainerSpec, name: str, image: ImageRecord) -> ContainerRecord:
    """The record of a new container of ``image``.

    A host port in use is not refused here: as with Docker, ``create`` succeeds and
    the start fails (the port may be free by then)."""
    plan = plan_process(spec, image.config)
    stop_signal = spec.stop_signal or image_stop_signal(image.config) or "SIGTERM"
    parse_signal(stop_signal)
    bindings = published_ports(spec, image.config)
    record = ContainerRecord(
        id=new_container_id(),
        name=name,
        spec=spec,
        image_id=image.id,
        image_ref=spec.image,
        created=now_iso(),
        argv=plan.argv,
        env=plan.env,
        workdir=plan.workdir,
        user=plan.user,
        stop_signal=stop_signal,
        stop_timeout=spec.stop_timeout if spec.stop_timeout is not None else DEFAULT_STOP_TIMEOUT,
    )
    record.spec.ports = bindings
    return record


def prepare_disks(
    images: ImageStore, image: ImageRecord, directory: Path, size: int | None = None
) -> None:
    """The image's shared read-only disk (made once) and the container's own upper disk
    (``size`` bytes; None: UPPER_DISK_BYTES). The guest cannot grow it: a full writable
    layer is ENOSPC inside the container, never more of the host's disk."""
    ensure_rootfs_image(images, image)
    make_ext4_disk(directory / "upper.ext4", size or UPPER_DISK_BYTES)
