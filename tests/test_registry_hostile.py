"""Hostile registries: corrupt, truncated or oversized content is refused, the store unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest

from husk.errors import PullFailed
from husk.oci.manifest import MAX_MANIFEST_BYTES
from husk.oci.pull import pull
from husk.oci.registry import RegistryClient
from husk.oci.store import ImageStore
from registry_fixtures import FaultProxy, RunningRegistry, registry  # noqa: F401 - fixtures
from testimages import small_image_layout

pytestmark = pytest.mark.registry


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def _fast_client(domain: str) -> RegistryClient:
    return RegistryClient(domain, retries=3, backoff=0.01)


def _snapshot(store: ImageStore) -> tuple[list[str], list[str], list[str]]:
    return (
        sorted(p.name for p in store.blobs_dir.iterdir()),
        sorted(p.name for p in store.ingest_dir.glob("*.partial")),
        [r.id for r in store.list_images()],
    )


def _push_unique(registry: RunningRegistry, tmp_path: Path, name: str) -> tuple[str, dict]:  # noqa: F811
    """A fresh image (its own layer digest), so corrupting it harms no other test."""
    text = f"{name} {time.time_ns()}"
    ref = registry.push_oci_layout(small_image_layout(tmp_path / name, text), f"hostile/{name}:v1")
    return ref, registry.inspect(f"hostile/{name}:v1")


def test_blob_with_wrong_content_is_refused(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    ref, info = _push_unique(registry, tmp_path, "corrupt")
    layer = info["Layers"][0]
    data_file = registry.blob_data_path(layer)
    original = data_file.read_bytes()
    data_file.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])  # same size, wrong bytes
    store = ImageStore()
    before = _snapshot(store)
    with pytest.raises(PullFailed, match=f"blob {layer}.*digest mismatch"):
        asyncio.run(pull(ref, store=store, client_factory=_fast_client))
    assert _snapshot(store) == before


def test_blob_truncated_in_storage_is_refused(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    ref, info = _push_unique(registry, tmp_path, "short")
    layer = info["Layers"][0]
    data_file = registry.blob_data_path(layer)
    data_file.write_bytes(data_file.read_bytes()[:-20])
    store = ImageStore()
    with pytest.raises(PullFailed, match=f"blob {layer}.*truncated"):
        asyncio.run(pull(ref, store=store, client_factory=_fast_client))
    blobs, partials, images = _snapshot(store)
    assert (blobs, images) == ([], [])
    # What arrived stays outside the store, in ingest/, for a later pull to resume.
    assert partials == [f"{layer[7:]}.partial"]


def test_connection_cut_on_every_attempt_is_refused(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    ref, info = _push_unique(registry, tmp_path, "cut")
    layer = info["Layers"][0]
    store = ImageStore()
    with FaultProxy(registry) as proxy:
        proxy.faults[layer] = "truncate"
        with pytest.raises(PullFailed, match=f"blob {layer}.*truncated or unavailable"):
            asyncio.run(
                pull(
                    ref.replace(registry.host, proxy.host), store=store, client_factory=_fast_client
                )
            )
    blobs, _, images = _snapshot(store)
    assert (blobs, images) == ([], [])


def test_corrupted_blob_in_transit_is_refused(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    ref, info = _push_unique(registry, tmp_path, "transit")
    store = ImageStore()
    with FaultProxy(registry) as proxy:
        proxy.faults[info["Layers"][0]] = "corrupt"
        with pytest.raises(PullFailed, match="digest mismatch"):
            asyncio.run(pull(ref.replace(registry.host, proxy.host), store=store))
    assert _snapshot(store) == ([], [], [])


@pytest.mark.parametrize("fault", ["huge-manifest", "huge-manifest-chunked"])
def test_100_megabyte_manifest_is_refused_without_reading_it(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
    fault: str,
) -> None:
    ref, _ = _push_unique(registry, tmp_path, "huge")
    store = ImageStore()
    with FaultProxy(registry) as proxy:
        proxy.faults["v1"] = fault
        started = time.monotonic()
        with pytest.raises(PullFailed, match=f"manifest hostile/huge:v1 .*{MAX_MANIFEST_BYTES}"):
            asyncio.run(pull(ref.replace(registry.host, proxy.host), store=store))
        elapsed = time.monotonic() - started
    assert proxy.huge_bytes_sent < 40 * 1024 * 1024
    assert elapsed < 10
    assert _snapshot(store) == ([], [], [])


def test_manifest_not_matching_the_requested_digest_is_refused(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    _, info = _push_unique(registry, tmp_path, "mdigest")
    digest = info["Digest"]
    store = ImageStore()
    with FaultProxy(registry) as proxy:
        proxy.faults[digest] = "corrupt"
        by_digest = f"{proxy.host}/hostile/mdigest@{digest}"
        with pytest.raises(PullFailed, match="manifest digest mismatch"):
            asyncio.run(pull(by_digest, store=store))
    assert _snapshot(store) == ([], [], [])


def test_config_that_disagrees_with_the_manifest_is_refused(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    layout = small_image_layout(tmp_path / "badcfg", f"badcfg {time.time_ns()}")
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    manifest = json.loads(manifest_path.read_bytes())
    manifest["layers"].append(manifest["layers"][0])  # two layers, one diff_id
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    ref = registry.push_oci_layout(layout, "hostile/badcfg:v1")
    store = ImageStore()
    with pytest.raises(PullFailed, match="1 diff_ids but the manifest has 2 layers"):
        asyncio.run(pull(ref, store=store))
    assert _snapshot(store) == ([], [], [])
