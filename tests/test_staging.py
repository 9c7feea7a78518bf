"""Image disks built from layers staged in memory (husk.oci.staging): where the tree goes,
what it keeps, and what happens when the memory budget runs out."""

from __future__ import annotations

import os
import stat
import tarfile
import time
from pathlib import Path

import pytest

from diskcache import disk_cache_entries
from husk.errors import Internal, InvalidArgument
from husk.oci import rootfs, staging
from husk.oci.rootfs import RootfsBuild, ensure_rootfs_image
from husk.oci.store import ImageStore
from test_rootfs import add_image, layer_tar, member, mounted, sha256


@pytest.fixture(autouse=True)
def memory_staging_available() -> None:
    """Every host husk's CI runs on has /dev/shm as a tmpfs keeping user.* xattrs: its
    absence is a failure naming the reason, never a skip."""
    assert staging.memory_parent() is not None, "/dev/shm is not a tmpfs keeping xattrs here"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("HUSK_DISK_STAGING", raising=False)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "data" / "images")


@pytest.fixture
def memory_trees(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every memory staging directory made during the test (other processes make theirs
    in the same /dev/shm)."""
    made: list[Path] = []
    original = staging.make_memory_tree

    def recording(expected_bytes: int = 0) -> staging.MemoryTree | None:
        tree = original(expected_bytes)
        if tree is not None:
            made.append(tree.directory)
        return tree

    monkeypatch.setattr(rootfs, "make_memory_tree", recording)
    return made


def small_budget(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(staging, "memory_budget", lambda parent: size)


def gone(directory: Path) -> bool:
    """Whether ``directory`` disappears within a deadline (it is deleted in the background)."""
    deadline = time.monotonic() + 30
    while directory.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def rich_layer() -> bytes:
    """Whiteout-free layer with what a tree must keep: modes, setuid, owners, xattrs,
    links, a device node."""
    xattrs = {
        "SCHILY.xattr.user.note": "kept",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00" + "\0" * 12,
    }
    return layer_tar(
        member("usr/bin/tool", b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0, pax_headers=xattrs),
        member("usr/bin/link", kind=tarfile.LNKTYPE, linkname="usr/bin/tool"),
        member("usr/bin/soft", kind=tarfile.SYMTYPE, linkname="tool"),
        member("home/dev", kind=tarfile.DIRTYPE, uid=1000, gid=1000, mode=0o700),
        member("dev/null", kind=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
    )


def test_a_build_stages_in_memory_keeps_everything_and_frees_the_memory(
    tmp_path: Path, store: ImageStore, memory_trees: list[Path]
) -> None:
    top = layer_tar(member("usr/bin/.wh.soft"), member("etc/os-release", b"ID=test\n"))
    record = add_image(store, [(rich_layer(), "gzip"), (top, "zstd")])

    image = ensure_rootfs_image(store, record)

    assert len(memory_trees) == 1
    assert memory_trees[0].parent == Path("/dev/shm")
    assert gone(memory_trees[0])
    assert [n for n in disk_cache_entries() if n.startswith(".")] == []
    with mounted(image, tmp_path / "mnt") as mnt:
        tool = (mnt / "usr/bin/tool").stat()
        assert stat.S_IMODE(tool.st_mode) == 0o4755
        assert os.getxattr(mnt / "usr/bin/tool", "user.note") == b"kept"
        assert len(os.getxattr(mnt / "usr/bin/tool", "security.capability")) == 20
        assert (mnt / "usr/bin/link").stat().st_ino == tool.st_ino
        assert not (mnt / "usr/bin/soft").exists()
        home = (mnt / "home/dev").stat()
        assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o700)
        null = (mnt / "dev/null").lstat()
        assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1
        assert (mnt / "etc/os-release").read_text() == "ID=test\n"


def test_husk_disk_staging_keeps_the_tree_on_disk(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch, memory_trees: list[Path]
) -> None:
    monkeypatch.setenv("HUSK_DISK_STAGING", "1")
    record = add_image(store, [(layer_tar(member("f", b"x")), "gzip")])
    build = RootfsBuild.begin(record.diff_ids, names=["l"])
    assert build is not None
    try:
        assert build._tree.is_relative_to(rootfs.rootfs_dir())
    finally:
        build.close()
    assert memory_trees == []


def test_a_tmpfs_that_loses_xattrs_is_not_used(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch, memory_trees: list[Path]
) -> None:
    monkeypatch.setattr(staging, "_keeps_xattrs", lambda directory: False)
    record = add_image(store, [(layer_tar(member("f", b"x")), "gzip")])
    assert ensure_rootfs_image(store, record).is_file()
    assert memory_trees == []


def test_layers_larger_than_the_budget_are_built_on_disk(
    tmp_path: Path, store: ImageStore, monkeypatch: pytest.MonkeyPatch, memory_trees: list[Path]
) -> None:
    small_budget(monkeypatch, 64 * 1024)
    big = layer_tar(member("big", os.urandom(256 * 1024)), member("small", b"s"))
    record = add_image(store, [(layer_tar(member("first", b"1")), "gzip"), (big, "gzip")])

    image = ensure_rootfs_image(store, record)

    assert len(memory_trees) == 1 and gone(memory_trees[0])  # tried, overran, freed
    assert [n for n in disk_cache_entries() if n.startswith(".")] == []
    with mounted(image, tmp_path / "mnt") as mnt:
        assert (mnt / "big").stat().st_size == 256 * 1024
        assert (mnt / "first").read_bytes() == b"1"


def test_a_pull_over_the_budget_still_checks_every_layer_and_leaves_the_disk(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch, memory_trees: list[Path]
) -> None:
    """A speculative (pull) build that overruns the budget frees its memory at once, goes on
    checking layers (a broken one still fails the pull) and builds no disk."""
    small_budget(monkeypatch, 64 * 1024)
    big = layer_tar(member("big", os.urandom(256 * 1024)))
    good = layer_tar(member("after", b"a"))
    record = add_image(store, [(big, "gzip"), (good, "gzip"), (good, "gzip")])
    blobs = [store.blob_path(layer.digest) for layer in record.layers]
    media = record.layers[0].media_type
    wrong = [*record.diff_ids[:2], sha256(b"not this layer")]
    build = RootfsBuild.begin_speculative(wrong, names=["big", "good", "wrong"])
    assert build is not None
    try:
        build.apply(0, blobs[0], media)
        assert len(memory_trees) == 1 and gone(memory_trees[0])
        build.apply(1, blobs[1], media)
        with pytest.raises(InvalidArgument, match="digest"):
            build.apply(2, blobs[2], media)
    finally:
        build.close()
    build = RootfsBuild.begin_speculative(record.diff_ids, names=["big", "good", "good"])
    assert build is not None
    try:
        for index, blob in enumerate(blobs):
            build.apply(index, blob, media)
        with pytest.raises(Internal, match="first container builds the disk"):
            build.finish()
    finally:
        build.close()
    assert list(rootfs.rootfs_dir().glob("*.erofs")) == []


def test_a_pull_whose_layers_cannot_fit_stays_on_disk(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch, memory_trees: list[Path]
) -> None:
    small_budget(monkeypatch, 64 * 1024)
    build = RootfsBuild.begin_speculative([sha256(b"x")], names=["l"], expected_bytes=128 * 1024)
    assert build is not None
    build.close()
    assert memory_trees == []


def test_a_dead_builds_memory_tree_is_removed_and_a_live_ones_kept(
    store: ImageStore, memory_trees: list[Path]
) -> None:
    record = add_image(store, [(layer_tar(member("f", b"y")), "gzip")])
    live = RootfsBuild.begin(record.diff_ids, names=["l"])
    assert live is not None and len(memory_trees) == 1
    assert stat.S_IMODE(memory_trees[0].stat().st_mode) == 0o700  # setuid files inside
    dead = Path("/dev/shm") / f"husk-stage-test-dead-{os.getpid()}"
    (dead / "rootfs" / "etc").mkdir(parents=True)
    hour_ago = time.time() - 3600
    for tree in (dead, memory_trees[0]):
        os.utime(tree, (hour_ago, hour_ago))
    third = staging.make_memory_tree()  # as every new build does: clears the dead first
    assert third is not None
    third.discard()
    assert not dead.exists()
    assert memory_trees[0].is_dir()  # locked by its live build
    live.apply(0, store.blob_path(record.layers[0].digest), record.layers[0].media_type)
    assert live.finish().is_file()
    live.close()
    assert gone(memory_trees[0])
