"""The content store: blobs by digest, the image index, metadata, garbage collection.

Layout under ``root`` (default ``data_dir()/images``)::

    blobs/sha256/<hex>    verified content, never modified once written
    ingest/               partial downloads and per-blob locks (same filesystem)
    index.json            names and images; rewritten atomically under index.lock
    gc.lock               pulls hold it shared; a sweep needs it exclusive

A blob only enters ``blobs/`` after its sha256 and size were checked, by an
atomic rename, so a reader never sees partial content.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from husk import timestamps
from husk.errors import Conflict, Internal, InvalidArgument, NotFound
from husk.oci.locks import file_lock, try_lock
from husk.oci.manifest import (
    Descriptor,
    parse_config,
    parse_manifest,
    sha256_digest,
)
from husk.oci.reference import Reference, parse_reference, validate_digest
from husk.paths import data_dir

INDEX_VERSION = 1
_HEX_PREFIX = re.compile(r"(?:sha256:)?([a-f0-9]{1,64})")
_COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LayerRef:
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class ImageRecord:
    names: tuple[str, ...]
    id: str
    manifest_digest: str
    config: dict[str, Any] = field(hash=False, compare=False)
    layers: tuple[LayerRef, ...]
    diff_ids: tuple[str, ...]
    size: int
    created: str
    os: str
    architecture: str
    variant: str = ""
    manifest_media_type: str = ""
    config_size: int = 0
    repo_digests: tuple[str, ...] = ()
    index_digest: str | None = None
    added: str = ""

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]

    @property
    def labels(self) -> dict[str, str]:
        labels = (self.config.get("config") or {}).get("Labels") or {}
        return {str(k): str(v) for k, v in labels.items()}

    @property
    def platform(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


@dataclass(frozen=True)
class RemovalResult:
    untagged: tuple[str, ...]
    deleted: tuple[str, ...]

    def lines(self) -> list[str]:
        return [f"Untagged: {n}" for n in self.untagged] + [f"Deleted: {d}" for d in self.deleted]


@dataclass(frozen=True)
class RemovalPlan:
    """What removing a reference does: the names it untags, and whether the image goes."""

    image_id: str
    manifest_digest: str
    untag: tuple[str, ...]
    deletes: bool
    by_name: bool
    """The reference is one of the image's names (not its id)."""


@dataclass(frozen=True)
class PruneResult:
    deleted_images: tuple[str, ...]
    deleted_blobs: int
    reclaimed_bytes: int


def _now() -> str:
    return timestamps.now(digits=6)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobIngest:
    """One blob being written: hashes as it goes, verified by :meth:`commit`.

    Partial content survives in ``ingest/<hex>.partial`` so a later attempt can
    resume it (HTTP Range). Only the holder of the blob's lock may use it.
    """

    def __init__(self, store: ImageStore, digest: str, expected_size: int | None) -> None:
        self.store = store
        self.digest = digest
        self.expected_size = expected_size
        self.partial_path = store.ingest_dir / f"{digest.split(':', 1)[1]}.partial"
        self._hash = hashlib.sha256()
        self._file: Any = None
        self.offset = 0

    def open(self, *, resume: bool = True) -> int:
        """Open for appending; returns how many bytes are already there."""
        self.close()
        self._hash = hashlib.sha256()
        if resume and self.partial_path.exists():
            self._file = open(self.partial_path, "r+b")  # noqa: SIM115 - lives across calls
            while chunk := self._file.read(_COPY_CHUNK):
                self._hash.update(chunk)
            self.offset = self._file.tell()
            if self.expected_size is not None and self.offset > self.expected_size:
                return self.reset()
        else:
            self._file = open(self.partial_path, "wb")  # noqa: SIM115
            self.offset = 0
        return self.offset

    def reset(self) -> int:
        return self.open(resume=False)

    def write(self, chunk: bytes) -> None:
        if self.expected_size is not None and self.offset + len(chunk) > self.expected_size:
            raise InvalidArgument(
                f"blob {self.digest} is larger than the {self.expected_size} bytes announced"
            )
        self._file.write(chunk)
        self._hash.update(chunk)
        self.offset += len(chunk)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.partial_path.unlink()

    def commit(self, check: Callable[[Path], object] | None = None) -> Path:
        """Verify size and digest (and with ``check``, the content), then move the blob
        into the store. A blob that fails is discarded, so it never enters the store."""
        if self._file is None:
            raise Internal("blob ingest committed before it was opened")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close()
        if self.expected_size is not None and self.offset != self.expected_size:
            self.discard()
            raise InvalidArgument(
                f"blob {self.digest} is truncated: got {self.offset} of {self.expected_size} bytes"
            )
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            self.discard()
            raise InvalidArgument(f"blob digest mismatch: expected {self.digest}, got {actual}")
        if check is not None:
            try:
                check(self.partial_path)
            except BaseException:
                self.discard()
                raise
        target = self.store.blob_path(self.digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.partial_path, 0o644)
        os.replace(self.partial_path, target)
        _fsync_dir(target.parent)
        return target


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else data_dir() / "images"
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.ingest_dir = self.root / "ingest"
        self.index_path = self.root / "index.json"
        self._index_lock = self.root / "index.lock"
        self.gc_lock_path = self.root / "gc.lock"
        for directory in (self.blobs_dir, self.ingest_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- blobs

    def blob_path(self, digest: str) -> Path:
        validate_digest(digest)
        return self.blobs_dir / digest.split(":", 1)[1]

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_size(self, digest: str) -> int:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the image store") from None

    def read_blob(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the image store") from None

    def add_blob_bytes(self, data: bytes, expected_digest: str | None = None) -> str:
        digest = sha256_digest(data)
        if expected_digest is not None and digest != expected_digest:
            raise InvalidArgument(f"blob digest mismatch: expected {expected_digest}, got {digest}")
        target = self.blob_path(digest)
        if target.is_file():
            return digest
        fd, tmp = tempfile.mkstemp(dir=self.ingest_dir, prefix="bytes-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return digest

    def add_blob_file(self, source: Path, expected_digest: str | None = None) -> str:
        """Copy a file into the store, verifying it while copying."""
        hasher = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.ingest_dir, prefix="file-")
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while chunk := src.read(_COPY_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = "sha256:" + hasher.hexdigest()
            if expected_digest is not None and digest != expected_digest:
                raise InvalidArgument(
                    f"blob digest mismatch: expected {expected_digest}, got {digest}"
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.blob_path(digest))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return digest

    def blob_lock_path(self, digest: str) -> Path:
        return self.ingest_dir / f"{digest.split(':', 1)[1]}.lock"

    def ingest(self, digest: str, expected_size: int | None) -> BlobIngest:
        """A writer for ``digest``; the caller must hold :meth:`blob_lock_path`."""
        validate_digest(digest)
        return BlobIngest(self, digest, expected_size)

    @contextlib.contextmanager
    def gc_guard(self) -> Iterator[None]:
        """Held (shared) while blobs are added but not yet referenced by the index."""
        with file_lock(self.gc_lock_path, shared=True, timeout=600):
            yield

    # ----------------------------------------------------------------- index

    def _read_index(self) -> dict[str, Any]:
        try:
            data = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {"version": INDEX_VERSION, "names": {}, "images": {}}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise Internal(f"image index {self.index_path} is corrupt: {err}") from None
        if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
            raise Internal(f"image index {self.index_path} has an unknown format")
        data.setdefault("names", {})
        data.setdefault("images", {})
        return data

    def _write_index(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index-")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.index_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked_index(self) -> Iterator[dict[str, Any]]:
        with file_lock(self._index_lock):
            data = self._read_index()
            yield data
            self._write_index(data)

    def _snapshot(self) -> dict[str, Any]:
        with file_lock(self._index_lock, shared=True):
            return self._read_index()

    # --------------------------------------------------------------- images

    def add_image(
        self,
        manifest_digest: str,
        *,
        names: tuple[str, ...] | list[str] = (),
        index_digest: str | None = None,
        source_digest: str | None = None,
        from_registry: bool = True,
    ) -> ImageRecord:
        """Record an image whose manifest, config and layers are all in the store.

        ``names`` are references (any spelling); each moves to this image.
        ``source_digest`` is what the registry served for each name (an index or
        the manifest itself): the ``newer`` pull policy compares against it.
        Without ``from_registry`` (a load, an import) no ``repo@digest`` is recorded:
        as in Docker, only a registry's own digest names an image in a repository.
        """
        manifest = parse_manifest(self.read_blob(manifest_digest))
        missing = [
            d.digest for d in (manifest.config, *manifest.layers) if not self.has_blob(d.digest)
        ]
        if missing:
            raise Internal(f"image {manifest_digest} is incomplete: missing blobs {missing}")
        normalised = [str(parse_reference(n)) for n in names]
        with self._locked_index() as data:
            # One image per id (config digest), as Docker keeps it: the same image arriving
            # again under another manifest (a docker-archive's uncompressed layers after a
            # save -> load round trip) gains the names, not a second, ambiguous entry.
            manifest_digest = self._same_image(data, manifest_digest, manifest.config.digest)
            image = data["images"].setdefault(
                manifest_digest, {"added": _now(), "index": None, "repo_digests": []}
            )
            if index_digest is not None:
                image["index"] = index_digest
            for name in normalised:
                ref = parse_reference(name)
                if ref.digest is not None:
                    name = ref.with_digest(ref.digest).tagged()
                data["names"][name] = {
                    "manifest": manifest_digest,
                    "source": source_digest or manifest_digest,
                }
                repo_digest = f"{ref.repository}@{source_digest or manifest_digest}"
                if from_registry and repo_digest not in image["repo_digests"]:
                    image["repo_digests"].append(repo_digest)
        return self._record(manifest_digest, self._snapshot())

    def _same_image(self, data: dict[str, Any], manifest_digest: str, config_digest: str) -> str:
        """The manifest recorded for the image ``config_digest``, else ``manifest_digest``."""
        if manifest_digest in data["images"]:
            return manifest_digest
        for digest in data["images"]:
            if self._config_digest(digest) == config_digest:
                return str(digest)
        return manifest_digest

    def add_repo_digest(self, manifest_digest: str, repo_digest: str) -> None:
        """Remember that ``repository@digest`` (e.g. after a push) holds this image."""
        with self._locked_index() as data:
            image = data["images"].get(manifest_digest)
            if image is None:
                raise NotFound(f"image {manifest_digest} is not in the image store")
            if repo_digest not in image["repo_digests"]:
                image["repo_digests"].append(repo_digest)

    def source_digest(self, reference: str) -> str | None:
        """What the registry served for ``reference`` when it was last pulled."""
        ref = parse_reference(reference)
        entry = self._snapshot()["names"].get(self._name_key(ref))
        return None if entry is None else str(entry["source"])

    @staticmethod
    def _name_key(ref: Reference) -> str:
        if ref.digest is not None:
            return ref.with_digest(ref.digest).tagged()
        return str(ref)

    def _record(self, manifest_digest: str, data: dict[str, Any]) -> ImageRecord:
        meta = data["images"].get(manifest_digest)
        if meta is None:
            raise NotFound(f"image {manifest_digest} is not in the image store")
        manifest = parse_manifest(self.read_blob(manifest_digest))
        config = parse_config(
            self.read_blob(manifest.config.digest), layer_count=len(manifest.layers)
        )
        names = tuple(
            sorted(n for n, e in data["names"].items() if e["manifest"] == manifest_digest)
        )
        layers = tuple(LayerRef(d.digest, d.media_type, d.size) for d in manifest.layers)
        return ImageRecord(
            names=names,
            id=manifest.config.digest,
            manifest_digest=manifest_digest,
            config=config,
            layers=layers,
            diff_ids=tuple(config["rootfs"]["diff_ids"]),
            size=sum(layer.size for layer in layers) + manifest.config.size,
            created=str(config.get("created") or ""),
            os=str(config.get("os") or ""),
            architecture=str(config.get("architecture") or ""),
            variant=str(config.get("variant") or ""),
            manifest_media_type=manifest.media_type,
            config_size=manifest.config.size,
            repo_digests=tuple(meta.get("repo_digests") or ()),
            index_digest=meta.get("index"),
            added=str(meta.get("added") or ""),
        )

    def _find(self, reference: str, data: dict[str, Any]) -> str:
        """The manifest digest that ``reference`` names: a name, an id (prefix) or a digest."""
        if not reference:
            raise InvalidArgument("empty image reference")
        is_hex_like = _HEX_PREFIX.fullmatch(reference) is not None
        if not reference.startswith("sha256:"):
            try:
                ref = parse_reference(reference)
            except InvalidArgument:
                if not is_hex_like:
                    raise
                ref = None
            if ref is not None:
                entry = data["names"].get(self._name_key(ref))
                if entry is not None:
                    return str(entry["manifest"])
                if ref.digest is not None:
                    for digest, meta in data["images"].items():
                        if digest == ref.digest or f"{ref.repository}@{ref.digest}" in (
                            meta.get("repo_digests") or ()
                        ):
                            return str(digest)
        match = _HEX_PREFIX.fullmatch(reference)
        if match is not None:
            prefix = match.group(1)
            full = len(prefix) == 64
            hits: set[str] = set()
            for digest in data["images"]:
                manifest_hex = digest.split(":", 1)[1]
                config_hex = self._config_digest(digest).split(":", 1)[1]
                if (full and prefix in (manifest_hex, config_hex)) or (
                    not full and config_hex.startswith(prefix)
                ):
                    hits.add(digest)
            if len({self._config_digest(d) for d in hits}) == 1:
                # One image id under several manifests (a store from before they were
                # merged on load): the same image whichever manifest is taken.
                return min(hits, key=lambda d: data["images"][d].get("added") or "")
            if len(hits) > 1:
                raise Conflict(f"image id prefix {reference!r} is ambiguous; give more digits")
        raise NotFound(f"no such image: {reference}")

    def _config_digest(self, manifest_digest: str) -> str:
        try:
            return parse_manifest(self.read_blob(manifest_digest)).config.digest
        except NotFound:
            return "sha256:"

    def resolve(self, reference: str) -> ImageRecord:
        data = self._snapshot()
        return self._record(self._find(reference, data), data)

    def exists(self, reference: str) -> bool:
        try:
            self.resolve(reference)
        except NotFound:
            return False
        return True

    def list_images(self) -> list[ImageRecord]:
        data = self._snapshot()
        records = [self._record(digest, data) for digest in data["images"]]
        return sorted(records, key=lambda r: r.added, reverse=True)

    def tag(self, source: str, target: str) -> None:
        target_ref = parse_reference(target)
        if target_ref.digest is not None:
            raise InvalidArgument(f"cannot tag with a digest: {target!r}")
        with self._locked_index() as data:
            manifest_digest = self._find(source, data)
            data["names"][str(target_ref)] = {
                "manifest": manifest_digest,
                "source": manifest_digest,
            }

    def remove(self, reference: str, force: bool = False) -> list[str]:
        """``rmi``: untag a name, or delete an image given by id; then collect garbage."""
        return self.remove_image(reference, force=force).lines()

    def plan_removal(self, reference: str, *, force: bool = False) -> RemovalPlan:
        """What :meth:`remove_image` would do for ``reference``, changing nothing."""
        return self._plan(reference, self._snapshot(), force=force)

    def _plan(self, reference: str, data: dict[str, Any], *, force: bool) -> RemovalPlan:
        manifest_digest = self._find(reference, data)
        names = [n for n, e in data["names"].items() if e["manifest"] == manifest_digest]
        by_name = self._names_matching(reference, names)
        if by_name:
            targets = by_name
        else:
            repositories = {parse_reference(n).repository for n in names}
            if len(repositories) > 1 and not force:
                raise Conflict(
                    f"conflict: unable to delete {reference} (must be forced) - image is "
                    f"referenced in several repositories ({', '.join(sorted(names))})"
                )
            targets = names
        return RemovalPlan(
            image_id=self._config_digest(manifest_digest),
            manifest_digest=manifest_digest,
            untag=tuple(targets),
            deletes=not (set(names) - set(targets)),
            by_name=bool(by_name),
        )

    def remove_image(
        self, reference: str, *, force: bool = False, keep_image: bool = False
    ) -> RemovalResult:
        """Untag what ``reference`` names (a name: that name; an id: every name) and delete
        the image once no name is left, unless ``keep_image`` (a container still uses it)."""
        with self._locked_index() as data:
            plan = self._plan(reference, data, force=force)
            for name in plan.untag:
                del data["names"][name]
            deleted: tuple[str, ...] = ()
            if plan.deletes and not keep_image:
                deleted = (plan.image_id,)
                del data["images"][plan.manifest_digest]
        self.collect_garbage()
        return RemovalResult(plan.untag, deleted)

    def _names_matching(self, reference: str, names: list[str]) -> list[str]:
        if reference.startswith("sha256:") or _HEX_PREFIX.fullmatch(reference):
            # A bare hex string could be a repository name too: only a stored name counts.
            try:
                key = self._name_key(parse_reference(reference))
            except InvalidArgument:
                return []
            return [key] if key in names else []
        ref = parse_reference(reference)
        key = self._name_key(ref)
        return [key] if key in names else []

    def prune(self, *, all_images: bool = False, keep: frozenset[str] = frozenset()) -> PruneResult:
        """Delete images without names (or every image with ``all_images``), then sweep blobs.

        ``keep`` holds image ids (config digests) in use by containers.
        """
        deleted: list[str] = []
        with self._locked_index() as data:
            for digest in list(data["images"]):
                named = any(e["manifest"] == digest for e in data["names"].values())
                config_digest = self._config_digest(digest)
                if config_digest in keep or (named and not all_images):
                    continue
                for name in [n for n, e in data["names"].items() if e["manifest"] == digest]:
                    del data["names"][name]
                del data["images"][digest]
                deleted.append(config_digest)
        count, reclaimed = self.collect_garbage()
        return PruneResult(tuple(deleted), count, reclaimed)

    # ------------------------------------------------------------------- gc

    def referenced_blobs(self, data: dict[str, Any] | None = None) -> set[str]:
        data = data if data is not None else self._snapshot()
        keep: set[str] = set()
        for digest, meta in data["images"].items():
            keep.add(digest)
            if meta.get("index"):
                keep.add(meta["index"])
            try:
                manifest = parse_manifest(self.read_blob(digest))
            except NotFound:
                continue
            descriptors: tuple[Descriptor, ...] = (manifest.config, *manifest.layers)
            keep.update(d.digest for d in descriptors)
        for entry in data["names"].values():
            keep.add(entry["source"])
        return keep

    def collect_garbage(self, *, stale_ingest_seconds: float = 24 * 3600) -> tuple[int, int]:
        """Delete blobs no image references. Skipped while a pull holds the gc guard."""
        fd = os.open(self.gc_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if not try_lock(fd):
                return 0, 0
            with file_lock(self._index_lock, shared=True):
                keep = {d.split(":", 1)[1] for d in self.referenced_blobs(self._read_index())}
                count = reclaimed = 0
                for path in self.blobs_dir.iterdir():
                    if path.name in keep:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        size = path.stat().st_size
                        path.unlink()
                        count += 1
                        reclaimed += size
            cutoff = time.time() - stale_ingest_seconds
            for path in self.ingest_dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        self._unlink_unlocked(path)
            return count, reclaimed
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _unlink_unlocked(path: Path) -> None:
        if path.suffix == ".lock":
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                if try_lock(fd):
                    path.unlink()
            finally:
                os.close(fd)
        else:
            path.unlink()

    def disk_usage(self) -> int:
        return sum(p.stat().st_size for p in self.blobs_dir.iterdir() if p.is_file())
