"""The content store: verified blobs, names, every spelling resolving, removal and GC."""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from husk.errors import Conflict, InvalidArgument, NotFound
from husk.oci.archive import load_path
from husk.oci.locks import async_file_lock
from husk.oci.manifest import canonical_json, sha256_digest
from husk.oci.store import ImageRecord, ImageStore
from testimages import busybox_image_layout, small_image_layout


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def _small_image(store: ImageStore, tmp_path: Path, text: str, name: str | None) -> ImageRecord:
    layout = small_image_layout(
        tmp_path / f"layout-{hashlib.sha1(text.encode()).hexdigest()}", text
    )
    return load_path(layout, store=store, name=name)[0]


def test_default_root_is_under_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    assert ImageStore().root == tmp_path / "data" / "images"


def test_blobs_are_content_addressed_and_verified(store: ImageStore, tmp_path: Path) -> None:
    digest = store.add_blob_bytes(b"hello")
    assert digest == sha256_digest(b"hello")
    assert store.has_blob(digest)
    assert store.read_blob(digest) == b"hello"
    assert store.blob_path(digest) == store.root / "blobs" / "sha256" / digest[7:]
    with pytest.raises(InvalidArgument, match="digest mismatch"):
        store.add_blob_bytes(b"other", expected_digest=digest)
    source = tmp_path / "blob"
    source.write_bytes(b"from a file")
    with pytest.raises(InvalidArgument, match="digest mismatch"):
        store.add_blob_file(source, sha256_digest(b"something else"))
    assert not store.has_blob(sha256_digest(b"from a file"))
    assert store.add_blob_file(source) == sha256_digest(b"from a file")
    assert list(store.ingest_dir.iterdir()) == []
    with pytest.raises(NotFound):
        store.read_blob("sha256:" + "1" * 64)
    with pytest.raises(InvalidArgument):
        store.blob_path("sha256:../../etc/passwd")


def test_ingest_refuses_mismatch_truncation_and_overflow(store: ImageStore) -> None:
    data = b"x" * 1000
    digest = sha256_digest(data)
    ingest = store.ingest(digest, len(data))
    ingest.open()
    ingest.write(data[:500])
    with pytest.raises(InvalidArgument, match="truncated"):
        ingest.commit()
    assert not store.has_blob(digest)

    ingest = store.ingest(digest, len(data))
    ingest.open()
    with pytest.raises(InvalidArgument, match="larger than"):
        ingest.write(data + b"y")
    ingest.discard()

    ingest = store.ingest(digest, len(data))
    ingest.open()
    ingest.write(b"y" * 1000)
    with pytest.raises(InvalidArgument, match="digest mismatch"):
        ingest.commit()
    assert not store.has_blob(digest)
    assert not ingest.partial_path.exists()

    # An interrupted ingest resumes from its partial file.
    ingest = store.ingest(digest, len(data))
    ingest.open()
    ingest.write(data[:300])
    ingest.close()
    resumed = store.ingest(digest, len(data))
    assert resumed.open(resume=True) == 300
    resumed.write(data[300:])
    resumed.commit()
    assert store.read_blob(digest) == data


def test_every_spelling_resolves(store: ImageStore, tmp_path: Path) -> None:
    record = _small_image(store, tmp_path, "one", "alpine")
    assert record.names == ("docker.io/library/alpine:latest",)
    for spelling in (
        "alpine",
        "alpine:latest",
        "docker.io/library/alpine",
        "docker.io/library/alpine:latest",
        "index.docker.io/library/alpine:latest",
        record.id,
        record.id[7:],
        record.id[7:19],
        record.manifest_digest,
        f"alpine@{record.manifest_digest}",
    ):
        assert store.resolve(spelling).manifest_digest == record.manifest_digest, spelling
    with pytest.raises(NotFound, match="no such image: alpine:3"):
        store.resolve("alpine:3")
    with pytest.raises(NotFound):
        store.resolve("ffffffffffff")


def test_record_metadata(store: ImageStore, tmp_path: Path) -> None:
    layout = busybox_image_layout(tmp_path / "bb")
    record = load_path(layout, store=store, name="husk.local/busybox:latest")[0]
    manifest = json.loads(store.read_blob(record.manifest_digest))
    assert record.size == manifest["config"]["size"] + sum(x["size"] for x in manifest["layers"])
    assert record.layers[0].digest == manifest["layers"][0]["digest"]
    assert record.config["config"]["Cmd"] == ["sh"]
    assert record.os == "linux" and record.architecture == "amd64"
    assert record.created == "2023-11-14T22:13:20Z"
    assert record.labels == {"org.opencontainers.image.title": "husk test busybox"}
    assert len(record.diff_ids) == len(record.layers) == 1
    assert record.id == manifest["config"]["digest"]


def test_tag_remove_and_garbage_collection(store: ImageStore, tmp_path: Path) -> None:
    first = _small_image(store, tmp_path, "first", "example.com/app:1")
    store.tag("example.com/app:1", "example.com/app:2")
    store.tag(first.id, "other.example.com/app")
    assert set(store.resolve("example.com/app:2").names) == {
        "example.com/app:1",
        "example.com/app:2",
        "other.example.com/app:latest",
    }
    with pytest.raises(InvalidArgument):
        store.tag("example.com/app:1", "example.com/app@sha256:" + "a" * 64)
    with pytest.raises(NotFound):
        store.tag("missing", "x")

    # By id, an image named in several repositories needs force.
    with pytest.raises(Conflict, match="several repositories"):
        store.remove(first.id[7:19])
    assert store.remove("example.com/app:2") == ["Untagged: example.com/app:2"]
    assert store.remove("other.example.com/app") == ["Untagged: other.example.com/app:latest"]
    blob_files = {p.name for p in store.blobs_dir.iterdir()}
    assert first.layers[0].digest[7:] in blob_files
    lines = store.remove("example.com/app:1")
    assert lines == ["Untagged: example.com/app:1", f"Deleted: {first.id}"]
    assert list(store.blobs_dir.iterdir()) == []
    assert store.list_images() == []
    with pytest.raises(NotFound):
        store.remove("example.com/app:1")


def test_shared_layers_survive_removal_of_one_image(store: ImageStore, tmp_path: Path) -> None:
    layout = busybox_image_layout(tmp_path / "bb")
    one = load_path(layout, store=store, name="a/busybox")[0]
    # Same layer, different config: import the layout's image under a new config.
    config = json.loads(store.read_blob(one.id))
    config["config"]["Cmd"] = ["true"]
    config_bytes = canonical_json(config)
    config_digest = store.add_blob_bytes(config_bytes)
    manifest = json.loads(store.read_blob(one.manifest_digest))
    manifest["config"] = {**manifest["config"], "digest": config_digest, "size": len(config_bytes)}
    two = store.add_image(store.add_blob_bytes(canonical_json(manifest)), names=["b/busybox"])
    assert two.layers == one.layers and two.id != one.id
    store.remove("a/busybox")
    assert store.has_blob(one.layers[0].digest)
    assert not store.has_blob(one.id)
    store.remove("b/busybox")
    assert not store.has_blob(one.layers[0].digest)


def test_prune_removes_dangling_images(store: ImageStore, tmp_path: Path) -> None:
    old = _small_image(store, tmp_path, "old", "example.com/app")
    new = _small_image(store, tmp_path, "new", "example.com/app")
    assert old.id != new.id
    listed = {r.id: r.names for r in store.list_images()}
    assert listed == {old.id: (), new.id: ("example.com/app:latest",)}
    result = store.prune()
    assert result.deleted_images == (old.id,)
    assert result.reclaimed_bytes > 0
    assert not store.has_blob(old.layers[0].digest)
    assert store.has_blob(new.layers[0].digest)
    assert store.prune(all_images=True, keep=frozenset({new.id})).deleted_images == ()
    assert store.prune(all_images=True).deleted_images == (new.id,)
    assert list(store.blobs_dir.iterdir()) == []


def test_gc_waits_for_running_pulls(store: ImageStore) -> None:
    orphan = store.add_blob_bytes(b"being pulled")
    with store.gc_guard():
        assert store.collect_garbage() == (0, 0)
        assert store.has_blob(orphan)
    assert store.collect_garbage()[0] == 1
    assert not store.has_blob(orphan)


def test_corrupt_index_is_reported(store: ImageStore) -> None:
    store.index_path.write_text("{not json")
    with pytest.raises(Exception, match="corrupt"):
        store.list_images()


def _hold_lock_and_write(root: str, digest: str, data: bytes, marker: str) -> None:
    store = ImageStore(Path(root))

    async def run() -> None:
        async with async_file_lock(store.blob_lock_path(digest), timeout=30):
            if store.has_blob(digest):
                return
            Path(marker).write_text("downloaded")
            await asyncio.sleep(0.3)
            ingest = store.ingest(digest, len(data))
            ingest.open()
            ingest.write(data)
            ingest.commit()

    asyncio.run(run())


def test_blob_lock_serialises_processes(store: ImageStore, tmp_path: Path) -> None:
    data = os.urandom(4096)
    digest = sha256_digest(data)
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(
            target=_hold_lock_and_write,
            args=(str(store.root), digest, data, str(tmp_path / f"marker{i}")),
        )
        for i in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert len(list(tmp_path.glob("marker*"))) == 1
    assert store.read_blob(digest) == data
