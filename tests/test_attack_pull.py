"""A hostile registry against the pull that builds the image's disk while downloading
(docs/SECURITY.md, "Archives from a guest"): a layer served forever holds no lock that
a build of the same layers would wait for; a pull cancelled mid-layer leaves no staging
tree."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from diskcache import disk_cache_entries
from husk.oci import staging
from husk.oci.layerstream import ByteBudget
from husk.oci.platform import host_platform
from husk.oci.pull import pull
from husk.oci.registry import FetchedManifest
from husk.oci.rootfs import RootfsBuild
from husk.oci.store import ImageStore
from husk.oci.unpack import StagingFull, apply_layer

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))


def _layer(name: str) -> tuple[bytes, str]:
    """A gzip'd layer of one file, and its diff_id."""
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        member = tarfile.TarInfo(name)
        member.size = 3
        tar.addfile(member, io.BytesIO(b"hi\n"))
    raw = plain.getvalue()
    return gzip.compress(raw, mtime=0), "sha256:" + hashlib.sha256(raw).hexdigest()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class StallingRegistry:
    """Serves an image of two layers; the second one never finishes arriving."""

    def __init__(self) -> None:
        (self.first, first_id), (self.second, second_id) = _layer("a"), _layer("b")
        self.diff_ids = [first_id, second_id]
        platform = host_platform()
        self.config = json.dumps(
            {
                "architecture": platform.architecture,
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": self.diff_ids},
                "config": {},
            }
        ).encode()
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": _digest(self.config),
                    "size": len(self.config),
                },
                "layers": [
                    {"mediaType": LAYER, "digest": _digest(b), "size": len(b)}
                    for b in (self.first, self.second)
                ],
            }
        ).encode()
        self.stalled = asyncio.Event()
        self.first_applied = asyncio.Event()

    async def __aenter__(self) -> StallingRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def get_manifest(self, repository: str, ref: str) -> FetchedManifest:
        return FetchedManifest(
            self.manifest, "application/vnd.oci.image.manifest.v1+json", _digest(self.manifest)
        )

    async def fetch_blob(
        self, repository: str, digest: str, size: int, store: ImageStore, **kw: Any
    ) -> bool:
        if digest == _digest(self.second):
            self.stalled.set()
            await asyncio.sleep(3600)  # a byte now and then, forever
        data = self.config if digest == _digest(self.config) else self.first
        verify = kw.get("verify")
        if verify is not None:
            with tempfile.NamedTemporaryFile(dir=store.ingest_dir) as blob:
                blob.write(data)
                blob.flush()
                await asyncio.to_thread(verify, Path(blob.name))
            self.first_applied.set()
        store.add_blob_bytes(data, digest)
        return True


def test_a_pull_cancelled_mid_layer_frees_the_build_lock_and_its_tree() -> None:
    registry = StallingRegistry()

    async def body() -> None:
        task = asyncio.ensure_future(
            pull(
                "registry.invalid/stall:1",
                store=ImageStore(),
                client_factory=lambda domain: registry,  # type: ignore[arg-type,return-value]
                build_disk=True,
            )
        )
        await asyncio.wait_for(registry.stalled.wait(), 30)
        await asyncio.wait_for(registry.first_applied.wait(), 30)
        # While the pull stalls, a build of the same layers (a container of another
        # local image) starts at once: the pull holds no chain lock.
        other = RootfsBuild.begin(registry.diff_ids, names=["a", "b"], timeout=0.0)
        assert other is not None
        other.close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(body())
    # Gone with it: the staging tree deleted, no image stored.
    build = RootfsBuild.begin(registry.diff_ids, names=["a", "b"], timeout=0.0)
    assert build is not None
    build.close()
    assert disk_cache_entries() == []
    assert ImageStore().list_images() == []


# -- layers staged in memory (husk.oci.staging): a hostile layer cannot fill the tmpfs


def _bomb_blob(directory: Path, members: list[tuple[str, bytes]]) -> Path:
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = directory / "layer.gz"
    blob.write_bytes(gzip.compress(plain.getvalue(), compresslevel=1))
    return blob


@pytest.mark.parametrize(
    "members",
    [
        pytest.param([("zeros", bytes(32 << 20))], id="32 MiB of zeros in 32 kB"),
        pytest.param([(f"f{n}", b"") for n in range(3000)], id="3000 empty files"),
    ],
)
def test_a_decompression_bomb_stops_at_the_memory_budget(
    tmp_path: Path, members: list[tuple[str, bytes]]
) -> None:
    """Bytes and entries are both charged: neither a huge file nor a flood of tiny ones
    (each a page and an inode in a tmpfs) takes more than the budget."""
    blob = _bomb_blob(tmp_path, members)
    tree = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="husk-test-bomb-"))
    try:
        with pytest.raises(StagingFull, match="more than 1048576 bytes"):
            apply_layer(blob, LAYER, tree, budget=ByteBudget(1 << 20))
        files = list(tree.rglob("*"))
        assert sum(p.lstat().st_blocks * 512 for p in files) <= 2 << 20
        assert len(files) <= (1 << 20) // 4096 + 1
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def test_squatted_names_in_dev_shm_are_never_followed_nor_removed(tmp_path: Path) -> None:
    """/dev/shm is everyone's: a symbolic link or another user's directory named like a
    dead staging tree is left alone by the clean-up every build runs first."""
    victim = tmp_path / "victim"
    (victim / "precious").mkdir(parents=True)
    shm = Path("/dev/shm")
    link = shm / f"husk-stage-squat-link-{os.getpid()}"
    foreign = shm / f"husk-stage-squat-dir-{os.getpid()}"
    link.symlink_to(victim)
    (foreign / "inside").mkdir(parents=True)
    os.chown(foreign, 65534, 65534)
    hour_ago = time.time() - 3600
    os.utime(link, (hour_ago, hour_ago), follow_symlinks=False)
    os.utime(foreign, (hour_ago, hour_ago))
    try:
        staging.remove_dead_memory_trees(shm)
        assert (victim / "precious").is_dir()
        assert link.is_symlink()
        assert (foreign / "inside").is_dir()
    finally:
        link.unlink()
        shutil.rmtree(foreign)
