"""``commit``: a container's writable layer becomes one new layer on top of its image.

The guest writes the layer tar (:mod:`husk.guest.agent.layer`), the host checks and
writes it again (:mod:`husk.runtime.layertar`), and the new image gets the
container's configuration (with Dockerfile-style changes) and a history entry.
Also used by the builder, whose RUN steps are containers committed this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from husk import timestamps
from husk.errors import Conflict, GuestError, InvalidArgument
from husk.oci.archive import apply_changes
from husk.oci.manifest import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, canonical_json
from husk.oci.platform import host_platform
from husk.oci.reference import parse_reference
from husk.oci.store import ImageRecord, ImageStore
from husk.runtime.archive import Files, end_session
from husk.runtime.collect import MAX_ERROR_OUTPUT, CappedOutput
from husk.runtime.container import Container
from husk.runtime.create import UPPER_DISK_BYTES
from husk.runtime.layertar import Layer, rewrite
from husk.runtime.model import ContainerRecord, ContainerStatus
from husk.runtime.offline import MaintenanceVMs, within_deadline
from husk.spec import merge_env

RAW_OVERHEAD = 256 * 1024 * 1024
"""What a layer tar may hold beyond its files' contents (headers of many entries)."""


@dataclass
class CommitOptions:
    reference: str | None = None
    changes: list[str] = field(default_factory=list)
    comment: str = ""
    author: str = ""
    created_by: str | None = None  # None: the container's command, as Docker records it
    config: dict[str, Any] = field(default_factory=dict)  # API config fields replacing these


async def guest_layer(files: Files, directory: Path, max_bytes: int) -> Layer:
    """The container's writable layer as a checked gzip layer file in ``directory``."""
    process = await files.session("/", "layer")
    errors = CappedOutput("the layer", MAX_ERROR_OUTPUT)
    raw_path = directory / "raw.tar"
    written = 0
    try:
        with open(raw_path, "wb") as raw:
            async for stream, data in files.guarded(process.output()):
                if stream != "stdout":
                    errors.add(stream, data)
                    continue
                written += len(data)
                if written > max_bytes + RAW_OVERHEAD:
                    raise GuestError(f"the guest's layer is larger than {max_bytes} bytes")
                await asyncio.to_thread(raw.write, data)
    finally:
        await end_session(process)
    if process.exit_code != 0:
        message = errors.stderr.decode(errors="replace").strip()
        raise GuestError(f"the guest could not write the layer: {message or 'it failed'}")
    try:

        def check() -> Layer:
            with open(raw_path, "rb") as raw:
                return rewrite(raw, directory / "layer.tar.gz", max_bytes=max_bytes)

        return await asyncio.to_thread(check)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(raw_path)


def container_config(record: ContainerRecord, image_config: dict[str, Any]) -> dict[str, Any]:
    """The image config's ``config`` section for a commit: the image's, with what the
    container was created with on top (as Docker's commit merges them)."""
    spec = record.spec
    config = dict(image_config.get("config") or {})
    if spec.entrypoint is not None:
        config["Entrypoint"] = list(spec.entrypoint) or None
        if not spec.cmd:
            config["Cmd"] = None
    if spec.cmd:
        config["Cmd"] = list(spec.cmd)
    config["Env"] = merge_env(list(config.get("Env") or []), spec.env)
    if spec.workdir:
        config["WorkingDir"] = spec.workdir
    if spec.user:
        config["User"] = spec.user
    if spec.exposed_ports:
        ports = dict(config.get("ExposedPorts") or {})
        ports.update({port: {} for port in spec.exposed_ports})
        config["ExposedPorts"] = ports
    if spec.labels:
        config["Labels"] = {**(config.get("Labels") or {}), **spec.labels}
    if spec.stop_signal:
        config["StopSignal"] = spec.stop_signal
    if spec.healthcheck is not None:
        check = spec.healthcheck
        config["Healthcheck"] = {
            "Test": list(check.test),
            "Interval": int(check.interval * 1e9),
            "Timeout": int(check.timeout * 1e9),
            "Retries": check.retries,
            "StartPeriod": int(check.start_period * 1e9),
        }
    return {k: v for k, v in config.items() if v is not None}


def apply_commit_changes(changes: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """``-c`` changes: import's (CMD, ENTRYPOINT, ENV, WORKDIR, USER, LABEL, EXPOSE,
    STOPSIGNAL) and VOLUME."""
    others = []
    for change in changes:
        keyword, _, value = change.strip().partition(" ")
        if keyword.upper() != "VOLUME":
            others.append(change)
            continue
        value = value.strip()
        paths = _json_list(value) if value.startswith("[") else value.split()
        if not paths or not all(p.startswith("/") for p in paths):
            raise InvalidArgument(f"change {change!r}: VOLUME needs absolute paths")
        config = dict(config)
        config["Volumes"] = {**(config.get("Volumes") or {}), **{p: {} for p in paths}}
    return apply_changes(others, config)


def _json_list(value: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):  # a deep nest of brackets: RecursionError
        raise InvalidArgument(f"VOLUME {value!r}: invalid JSON array") from None
    if not isinstance(parsed, list) or not all(isinstance(p, str) for p in parsed):
        raise InvalidArgument(f"VOLUME {value!r}: expected a JSON array of strings")
    return parsed


def history_entry(
    created_by: str, *, comment: str = "", author: str = "", empty_layer: bool = False
) -> dict[str, Any]:
    entry: dict[str, Any] = {"created": timestamps.now(digits=6), "created_by": created_by}
    if comment:
        entry["comment"] = comment
    if author:
        entry["author"] = author
    if empty_layer:
        entry["empty_layer"] = True
    return entry


def store_image(
    store: ImageStore,
    base: ImageRecord | None,
    config_section: dict[str, Any],
    *,
    layer: Layer | None,
    history: list[dict[str, Any]],
    names: list[str] | None = None,
    author: str = "",
    platform: tuple[str, str, str] | None = None,
) -> ImageRecord:
    """A new image: ``base``'s layers (none for scratch) plus ``layer``, with the config
    section and ``history``'s entries after the base's; named ``names``."""
    base_config = base.config if base is not None else {}
    base_manifest: dict[str, Any] = (
        _read_json(store, base.manifest_digest) if base is not None else {"layers": []}
    )
    diff_ids = list(base.diff_ids) if base is not None else []
    layers = list(base_manifest.get("layers") or [])
    with store.gc_guard():
        if layer is not None:
            digest = store.add_blob_file(layer.path, layer.digest)
            diff_ids.append(layer.diff_id)
            layers.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": layer.size})
        os_name, arch, variant = platform or (
            (base.os, base.architecture, base.variant) if base is not None else _host()
        )
        config: dict[str, Any] = {
            "created": history[-1]["created"] if history else timestamps.now(digits=6),
            "architecture": arch,
            "os": os_name,
            "config": config_section,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [*(base_config.get("history") or []), *history],
        }
        if variant:
            config["variant"] = variant
        if author:
            config["author"] = author
        config_bytes = canonical_json(config)
        config_digest = store.add_blob_bytes(config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": layers,
        }
        manifest_digest = store.add_blob_bytes(canonical_json(manifest))
        return store.add_image(manifest_digest, names=list(names or []), from_registry=False)


def _host() -> tuple[str, str, str]:
    host = host_platform()
    return host.os, host.architecture, host.variant or ""


def _read_json(store: ImageStore, digest: str) -> dict[str, Any]:
    data = json.loads(store.read_blob(digest))
    return data if isinstance(data, dict) else {}


def check_reference(reference: str | None) -> list[str]:
    """The names a commit gets: ``reference`` checked (none: an untagged image)."""
    if not reference:
        return []
    return [str(parse_reference(reference))]


def temporary_directory(store: ImageStore) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(dir=store.ingest_dir, prefix="commit-")


async def commit_container(
    container: Container, vms: MaintenanceVMs, store: ImageStore, options: CommitOptions
) -> ImageRecord:
    """The new image of ``container``'s writable layer on top of its image (running or
    stopped: its own VM's agent, else a maintenance VM's, writes the layer)."""
    record = container.record
    if container.status is ContainerStatus.PAUSED:
        # husk pauses the whole VM, agent included: nobody could read the layer.
        raise Conflict(f"container {record.name} is paused: unpause it to commit it")
    names = check_reference(options.reference)
    base = store.resolve(record.image_id)
    config = {**container_config(record, base.config), **options.config}
    config = apply_commit_changes(options.changes, config)
    max_bytes = record.spec.storage_size or UPPER_DISK_BYTES
    with temporary_directory(store) as tmp:
        async with vms.files(container) as files:
            layer = await within_deadline(guest_layer(files, Path(tmp), max_bytes), "the layer")
        created_by = options.created_by
        if created_by is None:
            created_by = " ".join(record.argv)
        history = history_entry(created_by, comment=options.comment, author=options.author)
        return await asyncio.to_thread(
            store_image,
            store,
            base,
            config,
            layer=layer,
            history=[history],
            names=names,
            author=options.author,
        )
