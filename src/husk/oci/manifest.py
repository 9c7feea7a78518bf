"""Media types and the parsing of manifests, indexes and image configs.

Both OCI and Docker schema-2 documents are accepted; they share one shape.
Anything malformed is rejected with InvalidArgument naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from husk.errors import InvalidArgument, NotSupported
from husk.oci.platform import Platform
from husk.oci.reference import validate_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT_MANIFESTS = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

LAYER_TYPES = (
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_LAYER_NONDIST_GZIP,
    DOCKER_LAYER,
    DOCKER_FOREIGN_LAYER,
)

# A manifest or index is small JSON; anything bigger is hostile or broken.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform is not None:
            data["platform"] = self.platform.to_json()
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


def _descriptor(raw: Any, where: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: descriptor is not an object")
    media_type = raw.get("mediaType")
    digest = raw.get("digest")
    size = raw.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise InvalidArgument(f"{where}: descriptor has no mediaType")
    if not isinstance(digest, str):
        raise InvalidArgument(f"{where}: descriptor has no digest")
    validate_digest(digest, what=f"{where} digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{where}: descriptor {digest} has an invalid size {size!r}")
    platform = None
    if isinstance(raw.get("platform"), dict):
        platform = Platform.from_json(raw["platform"])
    annotations: tuple[tuple[str, str], ...] = ()
    if isinstance(raw.get("annotations"), dict):
        annotations = tuple(sorted((str(k), str(v)) for k, v in raw["annotations"].items()))
    return Descriptor(media_type, digest, size, platform, annotations)


def load_json_document(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument(f"{what} is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return doc


def document_media_type(data: bytes, header_type: str | None = None) -> str:
    """The media type of a manifest or index: its own field, else the header's, else a guess."""
    doc = load_json_document(data, "manifest")
    media_type = doc.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    if header_type:
        bare = header_type.split(";")[0].strip()
        if bare in (*MANIFEST_TYPES, *INDEX_TYPES):
            return bare
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    raise InvalidArgument("manifest has no mediaType and is neither a manifest nor an index")


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def parse_manifest(data: bytes) -> Manifest:
    doc = load_json_document(data, "manifest")
    media_type = doc.get("mediaType") or OCI_MANIFEST
    if media_type in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED) or doc.get("schemaVersion") == 1:
        raise NotSupported("Docker schema 1 manifests are not supported; push the image again")
    if media_type not in MANIFEST_TYPES:
        raise InvalidArgument(f"unexpected manifest media type {media_type!r}")
    config = _descriptor(doc.get("config"), "manifest config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidArgument("manifest has no layers list")
    layers = tuple(_descriptor(layer, f"manifest layer {i}") for i, layer in enumerate(raw_layers))
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise NotSupported(
                f"layer {layer.digest} has media type {layer.media_type!r}, "
                "which is not an image layer husk can apply"
            )
    return Manifest(str(media_type), config, layers)


def parse_index(data: bytes) -> Index:
    doc = load_json_document(data, "image index")
    media_type = doc.get("mediaType") or OCI_INDEX
    if media_type not in INDEX_TYPES:
        raise InvalidArgument(f"unexpected index media type {media_type!r}")
    raw = doc.get("manifests")
    if not isinstance(raw, list):
        raise InvalidArgument("image index has no manifests list")
    return Index(
        str(media_type), tuple(_descriptor(m, f"index entry {i}") for i, m in enumerate(raw))
    )


def parse_config(data: bytes, *, layer_count: int) -> dict[str, Any]:
    doc = load_json_document(data, "image config")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise InvalidArgument("image config has no rootfs.diff_ids")
    diff_ids = rootfs["diff_ids"]
    for diff_id in diff_ids:
        if not isinstance(diff_id, str):
            raise InvalidArgument("image config rootfs.diff_ids holds a non-string")
        validate_digest(diff_id, what="image config diff_id")
    if len(diff_ids) != layer_count:
        raise InvalidArgument(
            f"image config lists {len(diff_ids)} diff_ids but the manifest has {layer_count} layers"
        )
    if "config" in doc and doc["config"] is not None and not isinstance(doc["config"], dict):
        raise InvalidArgument("image config field 'config' is not an object")
    return doc


def canonical_json(doc: Any) -> bytes:
    """Compact, key-sorted JSON: the same document always has the same digest."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
