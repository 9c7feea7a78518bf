"""A broken layer fails the pull, not the first container created from the image.

Each image here is consistent at the registry level (every blob matches its
digest and size), as an image pushed by a buggy or hostile tool would be, but
its layer is not a complete tar stream, or not the one the config's diff_id
names. A real docker-registry serves it; the pull must fail naming the layer and
leave the store as it was (no blob, no partial download, no image).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from diskcache import disk_cache_entries
from husk.errors import HuskError
from husk.oci.pull import pull
from husk.oci.store import ImageStore
from registry_fixtures import RunningRegistry, registry  # noqa: F401 - fixture
from testimages import CREATED, LAYER_MEDIA_TYPES, OCI_CONFIG, OCI_MANIFEST, LayoutWriter

pytestmark = pytest.mark.registry


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def layer_tar(text: str) -> bytes:
    """A tar of three 3000-byte files (each entry 512 + 3072 bytes), unique to ``text``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for number in range(3):
            data = (f"{text} {number} ".encode() * 400)[:3000]
            info = tarfile.TarInfo(f"file{number}")
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def push_image(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
    name: str,
    blob: bytes,
    diff_id: str,
) -> str:
    """Push a one-layer image whose layer blob is ``blob`` and whose config says ``diff_id``."""
    writer = LayoutWriter(tmp_path / name)
    layer = writer.blob(blob, LAYER_MEDIA_TYPES["gzip"])
    config = {
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": writer.blob(canonical(config), OCI_CONFIG),
        "layers": [layer],
    }
    writer.tag(writer.blob(canonical(manifest), OCI_MANIFEST), "latest")
    return registry.push_oci_layout(tmp_path / name, f"brokenlayer/{name}:latest")


def store_state(store: ImageStore) -> tuple[list[str], list[str], list[str]]:
    blobs = sorted(p.name for p in store.blobs_dir.iterdir()) if store.blobs_dir.exists() else []
    ingest = store.ingest_dir
    partials = sorted(p.name for p in ingest.glob("*.partial")) if ingest.exists() else []
    return blobs, partials, [r.id for r in store.list_images()]


def refused_at_pull(reference: str, layer_digest: str, match: str) -> None:
    """Refused by the plain pull's check, and by a pull that builds the disk meanwhile
    (which then leaves no disk and no staging tree either)."""
    store = ImageStore()
    for build_disk in (False, True):
        with pytest.raises(HuskError) as caught:
            asyncio.run(pull(reference, store=store, build_disk=build_disk))
        message = str(caught.value)
        assert "\n" not in message
        assert layer_digest in message, message
        assert match in message, message
        assert store_state(store) == ([], [], [])
    assert disk_cache_entries() == []


def test_truncated_gzip_layer_is_refused_at_pull(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    raw = layer_tar(f"gzip {time.time_ns()}")
    whole = gzip.compress(raw, mtime=0)
    cut = whole[: len(whole) * 2 // 3]
    reference = push_image(registry, tmp_path, "gzipcut", cut, digest(raw))
    refused_at_pull(reference, digest(cut), "gzip stream is truncated")


def test_valid_gzip_of_a_tar_cut_inside_a_file_is_refused_at_pull(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The author's diff_id matches the cut tar: only the tar structure shows the damage."""
    raw = layer_tar(f"data {time.time_ns()}")[: 3584 + 512 + 1024]  # 2 of 3072 data bytes
    blob = gzip.compress(raw, mtime=0)
    reference = push_image(registry, tmp_path, "datacut", blob, digest(raw))
    refused_at_pull(reference, digest(blob), "unexpected end of data")


def test_valid_gzip_of_a_tar_cut_inside_a_header_is_refused_at_pull(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    raw = layer_tar(f"header {time.time_ns()}")[: 2 * 3584 + 100]  # inside the third header
    blob = gzip.compress(raw, mtime=0)
    reference = push_image(registry, tmp_path, "headercut", blob, digest(raw))
    refused_at_pull(reference, digest(blob), "not a whole number of 512-byte blocks")


def test_layer_not_matching_its_diff_id_is_refused_at_pull(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    raw = layer_tar(f"diffid {time.time_ns()}")
    blob = gzip.compress(raw, mtime=0)
    wrong = digest(raw[:-1024])  # what a cut stream would hash to
    reference = push_image(registry, tmp_path, "diffid", blob, wrong)
    refused_at_pull(reference, digest(blob), f"but the image config says {wrong}")


def test_a_sound_layer_still_pulls_and_is_stored(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    raw = layer_tar(f"sound {time.time_ns()}")
    blob = gzip.compress(raw, mtime=0)
    reference = push_image(registry, tmp_path, "sound", blob, digest(raw))
    store = ImageStore()
    record = asyncio.run(pull(reference, store=store))
    assert store.has_blob(digest(blob))
    assert [r.id for r in store.list_images()] == [record.id]
