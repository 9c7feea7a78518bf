"""Images in and out of tarballs, without a registry.

- :func:`load_path`: a docker-archive (``docker save``, ``skopeo copy …
  docker-archive:``) or an OCI layout (``skopeo copy … oci-archive:`` / ``oci:``),
  as a tarball (optionally gzip/zstd compressed) or a directory.
- :func:`save_images`: docker-archive or OCI archive tarballs.
- :func:`import_rootfs`: a root filesystem tarball becomes a single-layer image.

Every blob is verified against its digest as it enters the store.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

import zstandard

from husk import timestamps
from husk.errors import InvalidArgument, NotFound, NotSupported
from husk.oci.manifest import (
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
    document_media_type,
    is_index,
    parse_config,
    parse_index,
    parse_manifest,
)
from husk.oci.platform import Platform, host_platform, parse_platform, select_platform
from husk.oci.reference import parse_reference
from husk.oci.store import ImageRecord, ImageStore
from husk.oci.tarsafe import open_tar

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_COPY_CHUNK = 1024 * 1024
FORMATS = ("docker-archive", "oci-archive")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _compression(head: bytes) -> str:
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "none"


def _file_compression(path: Path) -> str:
    with open(path, "rb") as handle:
        return _compression(handle.read(4))


@contextlib.contextmanager
def _decompressed(path: Path) -> Iterator[IO[bytes]]:
    """``path`` as an uncompressed stream (gzip, zstd or plain)."""
    kind = _file_compression(path)
    with open(path, "rb") as raw:
        if kind == "gzip":
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream  # type: ignore[misc]
        elif kind == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with reader:
                yield reader  # type: ignore[misc]
        else:
            yield raw


def _uncompressed_digest(path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    try:
        with _decompressed(path) as stream:
            while chunk := stream.read(_COPY_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
    except (OSError, EOFError, zstandard.ZstdError) as err:
        raise InvalidArgument(f"{path.name}: corrupt compressed data: {err}") from None
    return "sha256:" + hasher.hexdigest(), size


def _layer_media_type(path: Path) -> str:
    return {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "none": OCI_LAYER}[
        _file_compression(path)
    ]


# --------------------------------------------------------------------- unpacking input


def _safe_member_path(name: str, archive: str) -> PurePosixPath:
    """``name`` normalised inside the archive; refused if absolute or climbing out."""
    normal = posixpath.normpath(name) if name else "."
    if posixpath.isabs(normal) or normal == ".." or normal.startswith("../"):
        raise InvalidArgument(f"{archive}: entry {name!r} escapes the archive")
    return PurePosixPath(*[p for p in PurePosixPath(normal).parts if p not in ("", ".")])


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """A directory or regular file of an image tarball at ``target``."""
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tar.extractfile(member)
    if handle is not None:
        with open(target, "wb") as out:
            shutil.copyfileobj(handle, out, _COPY_CHUNK)


def _extract_archive(source: Path, dest: Path) -> None:
    """Extract regular files of an image tarball; symlinks resolve to files inside it."""
    links: dict[PurePosixPath, PurePosixPath] = {}
    try:
        with _decompressed(source) as stream, open_tar(stream, "r|") as tar:
            for member in tar:
                relative = _safe_member_path(member.name, source.name)
                if not relative.parts:
                    continue
                target = dest.joinpath(*relative.parts)
                if member.isdir() or member.isfile():
                    try:
                        _extract_file(tar, member, target)
                    except _CLASHES:
                        raise _clash(source, member.name) from None
                elif member.issym():
                    link = PurePosixPath(member.linkname)
                    base = PurePosixPath() if link.is_absolute() else relative.parent
                    links[relative] = _safe_member_path(str(base / link), source.name)
                elif member.islnk():
                    links[relative] = _safe_member_path(member.linkname, source.name)
    except tarfile.TarError as err:
        raise InvalidArgument(f"{source}: not a valid image archive: {err}") from None
    except (EOFError, zstandard.ZstdError) as err:
        raise InvalidArgument(f"{source}: truncated or corrupt archive: {err}") from None
    for link, link_target in links.items():
        resolved = link_target
        for _ in range(16):
            if resolved not in links:
                break
            resolved = links[resolved]
        existing = dest.joinpath(*resolved.parts)
        if not existing.is_file():
            raise InvalidArgument(f"{source}: link {link} points to a missing entry {link_target}")
        new_path = dest.joinpath(*link.parts)
        try:
            new_path.parent.mkdir(parents=True, exist_ok=True)
            os.link(existing, new_path)
        except _CLASHES:
            raise _clash(source, str(link)) from None


_CLASHES = (FileExistsError, IsADirectoryError, NotADirectoryError)
"""What an archive's entries clashing with each other raise (a file, then a path below
it; a directory, then a file of its name; a link and a file of one name)."""


def _clash(source: Path, name: str) -> InvalidArgument:
    return InvalidArgument(f"{source.name}: entry {name!r} clashes with an earlier entry")


def _read_small(path: Path, limit: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InvalidArgument(f"image archive lacks {what} ({path.name})") from None
    if size > limit:
        raise InvalidArgument(f"{what} is {size} bytes, more than the {limit} allowed")
    return path.read_bytes()


# ---------------------------------------------------------------------- loading


def load_path(
    source: Path,
    *,
    store: ImageStore | None = None,
    name: str | None = None,
    platform: str | Platform | None = None,
) -> list[ImageRecord]:
    """Load every image of an archive (file or directory) into the store.

    ``name`` names an image whose archive carries no full name (an OCI layout
    tagged only ``latest``); with a single image it also adds that name.
    """
    store = store if store is not None else ImageStore()
    wanted = parse_platform(platform) if isinstance(platform, str) else platform
    if not source.exists():
        raise NotFound(f"no such file or directory: {source}")
    if source.is_dir():
        return _load_directory(source, store, name, wanted)
    with tempfile.TemporaryDirectory(dir=store.ingest_dir, prefix="load-") as tmp:
        _extract_archive(source, Path(tmp))
        return _load_directory(Path(tmp), store, name, wanted)


def _load_directory(
    root: Path, store: ImageStore, name: str | None, wanted: Platform | None
) -> list[ImageRecord]:
    with store.gc_guard():
        if (root / "index.json").is_file() and (root / "oci-layout").is_file():
            return _load_oci_layout(root, store, name, wanted)
        if (root / "manifest.json").is_file():
            return _load_docker_archive(root, store, name)
    raise InvalidArgument(
        f"{root}: neither a docker-archive (manifest.json) nor an OCI layout (index.json)"
    )


def _layout_blob(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.replace(":", "/", 1)


def _import_layout_blob(root: Path, store: ImageStore, descriptor: Descriptor) -> None:
    if store.has_blob(descriptor.digest):
        return
    path = _layout_blob(root, descriptor.digest)
    if not path.is_file():
        raise InvalidArgument(f"OCI layout lacks blob {descriptor.digest}")
    size = path.stat().st_size
    if size != descriptor.size:
        raise InvalidArgument(
            f"OCI layout blob {descriptor.digest} is {size} bytes, the descriptor says "
            f"{descriptor.size}"
        )
    store.add_blob_file(path, descriptor.digest)


def _names_for(annotations: dict[str, str], name: str | None) -> list[str]:
    full = annotations.get(CONTAINERD_NAME_ANNOTATION, "")
    ref_name = annotations.get(REF_NAME_ANNOTATION, "")
    if full:
        return [full]
    if "/" in ref_name:
        with contextlib.suppress(InvalidArgument):
            parse_reference(ref_name)
            return [ref_name]
    if name is not None:
        ref = parse_reference(name)
        if ref_name and ":" not in name.rsplit("/", 1)[-1] and ref.digest is None:
            return [str(ref.with_tag(ref_name))]
        return [str(ref)]
    return []


def _load_oci_layout(
    root: Path, store: ImageStore, name: str | None, wanted: Platform | None
) -> list[ImageRecord]:
    top = parse_index(_read_small(root / "index.json", MAX_MANIFEST_BYTES, "index.json"))
    if not top.manifests:
        raise InvalidArgument("OCI layout index.json lists no images")
    records = []
    for entry in top.manifests:
        annotations = dict(entry.annotations)
        data = _read_small(_layout_blob(root, entry.digest), MAX_MANIFEST_BYTES, "manifest")
        if hashlib.sha256(data).hexdigest() != entry.digest.split(":", 1)[1]:
            raise InvalidArgument(f"OCI layout blob {entry.digest} does not match its digest")
        media_type = document_media_type(data, entry.media_type)
        index_digest: str | None = None
        manifest_desc = entry
        if is_index(media_type):
            index = parse_index(data)
            choice = select_platform(
                ((d.platform, d.digest) for d in index.manifests if d.platform is not None),
                wanted or host_platform(),
            )
            if choice is None:
                raise NotFound(
                    f"image index {entry.digest} in the archive has no image for "
                    f"{wanted or host_platform()}"
                )
            manifest_desc = next(d for d in index.manifests if d.digest == choice[1])
            store.add_blob_bytes(data, entry.digest)
            index_digest = entry.digest
        manifest = parse_manifest(
            _read_small(_layout_blob(root, manifest_desc.digest), MAX_MANIFEST_BYTES, "manifest")
        )
        for descriptor in (manifest.config, *manifest.layers):
            _import_layout_blob(root, store, descriptor)
        parse_config(store.read_blob(manifest.config.digest), layer_count=len(manifest.layers))
        _import_layout_blob(root, store, manifest_desc)
        names = _names_for(annotations, name if len(top.manifests) == 1 else None)
        records.append(
            store.add_image(
                manifest_desc.digest,
                names=names,
                index_digest=index_digest,
                source_digest=entry.digest,
                from_registry=False,
            )
        )
    return records


def _load_docker_archive(root: Path, store: ImageStore, name: str | None) -> list[ImageRecord]:
    raw = _read_small(root / "manifest.json", MAX_MANIFEST_BYTES, "manifest.json")
    try:
        entries = json.loads(raw)
    except ValueError as err:
        raise InvalidArgument(f"docker-archive manifest.json is not JSON: {err}") from None
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument("docker-archive manifest.json lists no images")
    records = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise InvalidArgument(f"docker-archive manifest.json entry {number} has no Config")
        layer_files = entry.get("Layers")
        if not isinstance(layer_files, list) or not all(isinstance(x, str) for x in layer_files):
            raise InvalidArgument(f"docker-archive manifest.json entry {number} has no Layers")
        config_path = root.joinpath(*_safe_member_path(entry["Config"], "manifest.json").parts)
        config_bytes = _read_small(config_path, MAX_CONFIG_BYTES, "image config")
        config = parse_config(config_bytes, layer_count=len(layer_files))
        config_digest = store.add_blob_bytes(config_bytes)
        layers = []
        for layer_name, diff_id in zip(layer_files, config["rootfs"]["diff_ids"], strict=True):
            layer_path = root.joinpath(*_safe_member_path(layer_name, "manifest.json").parts)
            if not layer_path.is_file():
                raise InvalidArgument(f"docker-archive lacks layer {layer_name}")
            actual, _ = _uncompressed_digest(layer_path)
            if actual != diff_id:
                raise InvalidArgument(
                    f"docker-archive layer {layer_name} has diff_id {actual}, "
                    f"the config says {diff_id}"
                )
            digest = store.add_blob_file(layer_path)
            layers.append(
                {
                    "mediaType": _layer_media_type(layer_path),
                    "digest": digest,
                    "size": layer_path.stat().st_size,
                }
            )
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": config_digest,
                "size": len(config_bytes),
            },
            "layers": layers,
        }
        manifest_digest = store.add_blob_bytes(canonical_json(manifest))
        names = [str(t) for t in entry.get("RepoTags") or [] if isinstance(t, str)]
        if name is not None and len(entries) == 1:
            names.append(name)
        records.append(store.add_image(manifest_digest, names=names, from_registry=False))
    return records


# ------------------------------------------------------------------------ saving


def _records_for(
    references: Iterable[str], store: ImageStore
) -> list[tuple[str | None, ImageRecord]]:
    chosen: list[tuple[str | None, ImageRecord]] = []
    for reference in references:
        record = store.resolve(reference)
        name: str | None = None
        with contextlib.suppress(InvalidArgument):
            ref = parse_reference(reference)
            if str(ref) in record.names:
                name = str(ref)
        if name is None and not reference.startswith("sha256:"):
            tagged = [n for n in record.names if "@" not in n]
            name = tagged[0] if len(tagged) == 1 and reference not in record.id else None
        chosen.append((name, record))
    if not chosen:
        raise InvalidArgument("no image given to save")
    return chosen


def save_images(
    references: list[str],
    output: Path | IO[bytes],
    *,
    format: str = "docker-archive",
    store: ImageStore | None = None,
) -> None:
    """Write the images as a ``docker-archive`` or ``oci-archive`` tarball."""
    if format not in FORMATS:
        raise InvalidArgument(f"unknown archive format {format!r}: expected {' or '.join(FORMATS)}")
    store = store if store is not None else ImageStore()
    chosen = _records_for(references, store)
    if isinstance(output, Path):
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                _write_archive(chosen, handle, format, store)
            os.replace(tmp, output)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    else:
        _write_archive(chosen, output, format, store)


class _TarWriter:
    def __init__(self, handle: IO[bytes]) -> None:
        self.tar = tarfile.open(fileobj=handle, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.dirs: set[str] = set()
        self.files: set[str] = set()
        self.mtime = int(datetime.now(UTC).timestamp())

    def _dir(self, path: str) -> None:
        parent = str(PurePosixPath(path).parent)
        if parent in (".", "") or parent in self.dirs:
            return
        self._dir(parent)
        info = tarfile.TarInfo(parent + "/")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.mtime = self.mtime
        self.tar.addfile(info)
        self.dirs.add(parent)

    def add_bytes(self, path: str, data: bytes) -> None:
        if path in self.files:
            return
        self._dir(path)
        info = tarfile.TarInfo(path)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = self.mtime
        self.tar.addfile(info, io.BytesIO(data))
        self.files.add(path)

    def add_file(self, path: str, source: Path) -> None:
        if path in self.files:
            return
        self._dir(path)
        info = tarfile.TarInfo(path)
        info.size = source.stat().st_size
        info.mode = 0o644
        info.mtime = self.mtime
        with open(source, "rb") as handle:
            self.tar.addfile(info, handle)
        self.files.add(path)

    def close(self) -> None:
        self.tar.close()


def _write_archive(
    chosen: list[tuple[str | None, ImageRecord]], handle: IO[bytes], format: str, store: ImageStore
) -> None:
    writer = _TarWriter(handle)
    try:
        if format == "oci-archive":
            _write_oci(chosen, writer, store)
        else:
            _write_docker(chosen, writer, store)
    finally:
        writer.close()


def _write_oci(
    chosen: list[tuple[str | None, ImageRecord]], writer: _TarWriter, store: ImageStore
) -> None:
    writer.add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    manifests = []
    for name, record in chosen:
        for digest in (record.id, *(layer.digest for layer in record.layers)):
            writer.add_file(f"blobs/sha256/{digest.split(':', 1)[1]}", store.blob_path(digest))
        manifest_path = store.blob_path(record.manifest_digest)
        writer.add_file(f"blobs/sha256/{manifest_path.name}", manifest_path)
        descriptor: dict[str, Any] = {
            "mediaType": record.manifest_media_type,
            "digest": record.manifest_digest,
            "size": manifest_path.stat().st_size,
            "platform": Platform(record.os, record.architecture, record.variant).to_json(),
        }
        if name is not None:
            ref = parse_reference(name)
            descriptor["annotations"] = {
                CONTAINERD_NAME_ANNOTATION: str(ref),
                REF_NAME_ANNOTATION: ref.tag or "latest",
            }
        manifests.append(descriptor)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    writer.add_bytes("index.json", json.dumps(index, indent=1).encode())


def _write_docker(
    chosen: list[tuple[str | None, ImageRecord]], writer: _TarWriter, store: ImageStore
) -> None:
    entries = []
    repositories: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(dir=store.ingest_dir, prefix="save-") as tmp:
        for name, record in chosen:
            config_name = f"{record.id.split(':', 1)[1]}.json"
            writer.add_file(config_name, store.blob_path(record.id))
            layer_names = []
            for layer, diff_id in zip(record.layers, record.diff_ids, strict=True):
                layer_name = f"{diff_id.split(':', 1)[1]}.tar"
                if layer_name not in writer.files:
                    plain = Path(tmp) / layer_name
                    with (
                        _decompressed(store.blob_path(layer.digest)) as stream,
                        open(plain, "wb") as out,
                    ):
                        shutil.copyfileobj(stream, out, _COPY_CHUNK)
                    writer.add_file(layer_name, plain)
                    plain.unlink()
                layer_names.append(layer_name)
            tags = []
            if name is not None:
                ref = parse_reference(name)
                if ref.tag is not None:
                    tags.append(f"{ref.familiar_repository}:{ref.tag}")
                    repositories.setdefault(ref.familiar_repository, {})[ref.tag] = (
                        layer_names[-1].removesuffix(".tar") if layer_names else ""
                    )
            entries.append({"Config": config_name, "RepoTags": tags, "Layers": layer_names})
    writer.add_bytes("manifest.json", json.dumps(entries).encode())
    if repositories:
        writer.add_bytes("repositories", json.dumps(repositories).encode())


# ------------------------------------------------------------------------ import


def apply_changes(changes: Iterable[str], base: dict[str, Any]) -> dict[str, Any]:
    """Apply Dockerfile-style changes: CMD, ENTRYPOINT, ENV, WORKDIR, USER, LABEL, EXPOSE,
    STOPSIGNAL."""
    config = dict(base)
    for change in changes:
        keyword, _, value = change.strip().partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if not value:
            raise InvalidArgument(f"change {change!r} has no value")
        if keyword in ("CMD", "ENTRYPOINT"):
            if value.startswith("["):
                try:
                    parsed = json.loads(value)
                except ValueError:
                    raise InvalidArgument(f"change {change!r}: invalid JSON array") from None
                if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
                    raise InvalidArgument(f"change {change!r}: expected a JSON array of strings")
            else:
                parsed = ["/bin/sh", "-c", value]
            config["Cmd" if keyword == "CMD" else "Entrypoint"] = parsed
        elif keyword == "ENV":
            key, sep, env_value = value.partition("=")
            if not sep:
                key, _, env_value = value.partition(" ")
            env = [e for e in config.get("Env") or [] if not e.startswith(f"{key}=")]
            config["Env"] = [*env, f"{key}={env_value.strip()}"]
        elif keyword == "WORKDIR":
            config["WorkingDir"] = value
        elif keyword == "USER":
            config["User"] = value
        elif keyword == "STOPSIGNAL":
            config["StopSignal"] = value
        elif keyword == "LABEL":
            key, sep, label = value.partition("=")
            if not sep:
                raise InvalidArgument(f"change {change!r}: expected LABEL key=value")
            config.setdefault("Labels", {})[key.strip()] = label.strip().strip('"')
        elif keyword == "EXPOSE":
            for port in value.split():
                spec = port if "/" in port else f"{port}/tcp"
                config.setdefault("ExposedPorts", {})[spec] = {}
        else:
            raise NotSupported(f"change {keyword} is not supported by husk import")
    return config


def import_rootfs(
    source: Path | IO[bytes],
    reference: str | None = None,
    *,
    store: ImageStore | None = None,
    changes: Iterable[str] = (),
    message: str = "",
    platform: str | Platform | None = None,
) -> ImageRecord:
    """Make a single-layer image of a root filesystem tarball (plain, gzip or zstd)."""
    store = store if store is not None else ImageStore()
    target = parse_platform(platform) if isinstance(platform, str) else platform
    target = target or host_platform()
    names = [str(parse_reference(reference))] if reference else []
    with tempfile.TemporaryDirectory(dir=store.ingest_dir, prefix="import-") as tmp:
        staged = Path(tmp) / "layer"
        if isinstance(source, Path):
            if not source.is_file():
                raise NotFound(f"no such file: {source}")
            shutil.copyfile(source, staged)
        else:
            with open(staged, "wb") as out:
                shutil.copyfileobj(source, out, _COPY_CHUNK)
        _check_tarball(staged)
        if _file_compression(staged) == "none":
            compressed = Path(tmp) / "layer.gz"
            with open(staged, "rb") as src, gzip.GzipFile(compressed, "wb", mtime=0) as out:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
            diff_id = "sha256:" + _sha256_file(staged)
            staged = compressed
        else:
            diff_id, _ = _uncompressed_digest(staged)
        media_type = _layer_media_type(staged)
        with store.gc_guard():
            layer_digest = store.add_blob_file(staged)
            now = timestamps.now(digits=6)
            container_config = apply_changes(
                changes,
                {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            )
            config: dict[str, Any] = {
                "created": now,
                "architecture": target.architecture,
                "os": target.os,
                "config": container_config,
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created": now, "created_by": "husk import", "comment": message}],
            }
            if target.variant:
                config["variant"] = target.variant
            config_bytes = canonical_json(config)
            config_digest = store.add_blob_bytes(config_bytes)
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": config_digest,
                    "size": len(config_bytes),
                },
                "layers": [
                    {
                        "mediaType": media_type,
                        "digest": layer_digest,
                        "size": staged.stat().st_size,
                    }
                ],
            }
            manifest_digest = store.add_blob_bytes(canonical_json(manifest))
            return store.add_image(manifest_digest, names=names, from_registry=False)


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_COPY_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _check_tarball(path: Path) -> None:
    try:
        with _decompressed(path) as stream, open_tar(stream, "r|") as tar:
            for _ in tar:
                pass
    except (tarfile.TarError, EOFError, OSError, zstandard.ZstdError) as err:
        raise InvalidArgument(f"not a valid (optionally gzip/zstd) tar archive: {err}") from None
