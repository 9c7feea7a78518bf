"""erofs disk images per chain id, fixed-size padding and scratch ext4 disks."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from diskcache import disk_cache_entries
from husk.errors import Conflict, Internal, InvalidArgument, NotFound
from husk.oci import rootfs
from husk.oci.rootfs import (
    EROFS_ALIGN,
    RootfsBuild,
    build_erofs,
    chain_id,
    ensure_rootfs_image,
    make_ext4_disk,
    pad_to,
    prune_rootfs_images,
    rootfs_image_path,
)
from husk.oci.store import ImageRecord, ImageStore
from husk.oci.unpack import UnsafeLayer

MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "tar": "application/vnd.oci.image.layer.v1.tar",
}
CAP_NET_RAW = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "data" / "images")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def member(
    name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, **attrs: object
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_500_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def add_image(
    store: ImageStore,
    layers: list[tuple[bytes, str]],
    *,
    name: str = "test/image:latest",
    diff_ids: list[str] | None = None,
    label: str = "",
) -> ImageRecord:
    """Store an image the way a pull would: layer blobs, config, manifest, index entry."""
    descriptors = []
    for raw, compression in layers:
        blob = compress(raw, compression)
        descriptors.append(
            {
                "mediaType": MEDIA_TYPES[compression],
                "digest": store.add_blob_bytes(blob),
                "size": len(blob),
            }
        )
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {"variant": label}},
            "rootfs": {
                "type": "layers",
                "diff_ids": diff_ids or [sha256(raw) for raw, _ in layers],
            },
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": store.add_blob_bytes(config),
                "size": len(config),
            },
            "layers": descriptors,
        }
    ).encode()
    return store.add_image(store.add_blob_bytes(manifest), names=[name])


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path, fstype: str = "erofs") -> Iterator[Path]:
    """Loop-mount a disk image (the kernel reading it is the strongest check there is)."""
    mountpoint.mkdir(exist_ok=True)
    options = "loop,ro" if fstype == "erofs" else "loop"
    subprocess.run(
        ["mount", "-t", fstype, "-o", options, str(image), str(mountpoint)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True, timeout=60)


def dump_inode(image: Path, path: str) -> str:
    result = subprocess.run(
        ["dump.erofs", f"--path={path}", str(image)],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    return result.stdout


def test_chain_id_follows_the_oci_definition() -> None:
    a, b, c = (sha256(x) for x in (b"a", b"b", b"c"))
    assert chain_id([a]) == a
    ab = sha256(f"{a} {b}".encode())
    assert chain_id([a, b]) == ab
    assert chain_id([a, b, c]) == sha256(f"{ab} {c}".encode())
    with pytest.raises(InvalidArgument, match="no layers"):
        chain_id([])
    with pytest.raises(InvalidArgument, match="diff_id"):
        chain_id([a, "sha256:xyz"])


def test_build_erofs_keeps_ownership_modes_and_metadata(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "home/user").mkdir(parents=True)
    tool = tree / "usr/bin/tool"
    tool.parent.mkdir(parents=True)
    tool.write_bytes(b"#!/bin/sh\n")
    os.chown(tool, 1000, 1001)
    os.chmod(tool, 0o4755)
    os.setxattr(tool, "security.capability", CAP_NET_RAW)
    os.link(tool, tree / "usr/bin/alias")
    os.chown(tree / "home/user", 1000, 1000)
    os.chmod(tree / "home/user", 0o2750)
    os.mknod(tree / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(tree / "null", 0o666)
    os.symlink("usr/bin/tool", tree / "link")
    os.utime(tool, ns=(1_234_567_890 * 10**9, 1_234_567_890 * 10**9))
    image = tmp_path / "image.erofs"

    build_erofs(tree, image)

    assert image.stat().st_size % EROFS_ALIGN == 0
    assert "Uid: 1000   Gid: 1001" in dump_inode(image, "/usr/bin/tool")
    with mounted(image, tmp_path / "mnt") as mnt:
        inside = (mnt / "usr/bin/tool").lstat()
        assert (inside.st_uid, inside.st_gid) == (1000, 1001)
        assert stat.S_IMODE(inside.st_mode) == 0o4755
        assert inside.st_mtime_ns == 1_234_567_890 * 10**9
        assert inside.st_nlink == 2
        assert (mnt / "usr/bin/alias").lstat().st_ino == inside.st_ino
        assert os.getxattr(mnt / "usr/bin/tool", "security.capability") == CAP_NET_RAW
        home = (mnt / "home/user").lstat()
        assert (home.st_uid, stat.S_IMODE(home.st_mode)) == (1000, 0o2750)
        null = (mnt / "null").lstat()
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert os.readlink(mnt / "link") == "usr/bin/tool"


def test_build_erofs_all_root_records_root_ownership(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "owned").write_text("x")
    os.chown(tree / "owned", 1000, 1000)
    image = tmp_path / "image.erofs"

    build_erofs(tree, image, all_root=True)

    assert "Uid: 0   Gid: 0" in dump_inode(image, "/owned")


def test_build_erofs_of_a_missing_tree_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not a directory"):
        build_erofs(tmp_path / "nope", tmp_path / "x.erofs")


def test_ensure_rootfs_image_builds_once_per_chain_id(tmp_path: Path, store: ImageStore) -> None:
    base = layer_tar(
        member("etc", kind=tarfile.DIRTYPE),
        member("etc/os-release", b"ID=test\n"),
        member("etc/obsolete", b"x"),
        member("bin/su", b"su", mode=0o4755, uid=0, gid=0),
        member("home/dev", kind=tarfile.DIRTYPE, uid=1000, gid=1000, mode=0o700),
    )
    top = layer_tar(
        member("etc/.wh.obsolete"),
        member("home/dev/notes", b"hello", uid=1000, gid=1000, mode=0o600),
    )
    first = add_image(store, [(base, "gzip"), (top, "zstd")], name="a/one:1", label="one")
    second = add_image(store, [(base, "gzip"), (top, "zstd")], name="a/two:1", label="two")
    assert first.id != second.id

    image = ensure_rootfs_image(store, first)

    assert image == rootfs_image_path(chain_id(first.diff_ids))
    assert image.name == chain_id(first.diff_ids).split(":", 1)[1] + ".erofs"
    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    assert stat.S_IMODE(image.parent.stat().st_mode) == 0o700
    built = image.stat()
    assert ensure_rootfs_image(store, second) == image
    again = image.stat()
    assert (again.st_ino, again.st_mtime_ns) == (built.st_ino, built.st_mtime_ns)
    assert [n for n in disk_cache_entries() if n.startswith(".")] == []
    with mounted(image, tmp_path / "mnt") as mnt:
        assert (mnt / "etc/os-release").read_text() == "ID=test\n"
        assert not (mnt / "etc/obsolete").exists()
        assert stat.S_IMODE((mnt / "bin/su").stat().st_mode) == 0o4755
        notes = (mnt / "home/dev/notes").stat()
        assert (notes.st_uid, notes.st_gid, stat.S_IMODE(notes.st_mode)) == (1000, 1000, 0o600)


def test_concurrent_requests_build_the_image_once(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = add_image(store, [(layer_tar(member("f", b"data")), "gzip")])
    builds: list[Path] = []
    real_build = rootfs.build_erofs

    def counting_build(source: Path, dest: Path, *, all_root: bool = False) -> None:
        builds.append(dest)
        real_build(source, dest, all_root=all_root)

    monkeypatch.setattr(rootfs, "build_erofs", counting_build)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_rootfs_image(store, record))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(results) == 4 and len(set(results)) == 1
    assert len(builds) == 1


def test_diff_id_mismatch_refuses_the_image_and_caches_nothing(store: ImageStore) -> None:
    raw = layer_tar(member("f", b"real content"))
    lie = sha256(b"something else")
    record = add_image(store, [(raw, "gzip")], diff_ids=[lie])

    with pytest.raises(InvalidArgument, match=f"layer {record.layers[0].digest}.*{lie}"):
        ensure_rootfs_image(store, record)

    assert list(rootfs.rootfs_dir().glob("*.erofs")) == []
    assert [n for n in disk_cache_entries() if n.startswith(".")] == []


def test_hostile_layer_refuses_the_image(tmp_path: Path, store: ImageStore) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    raw = layer_tar(
        member("evil", kind=tarfile.SYMTYPE, linkname=str(outside)),
        member("evil/planted", b"pwned"),
    )
    record = add_image(store, [(raw, "gzip")])

    with pytest.raises(UnsafeLayer, match="symbolic link 'evil'"):
        ensure_rootfs_image(store, record)

    assert list(outside.iterdir()) == []
    assert list(rootfs.rootfs_dir().glob("*.erofs")) == []


def test_missing_layer_blob_is_not_found(store: ImageStore) -> None:
    record = add_image(store, [(layer_tar(member("f", b"x")), "tar")])
    store.blob_path(record.layers[0].digest).unlink()
    with pytest.raises(NotFound, match="missing from the store"):
        ensure_rootfs_image(store, record)


def test_prune_keeps_only_listed_chain_ids(store: ImageStore) -> None:
    keep = add_image(store, [(layer_tar(member("k", b"1")), "gzip")], name="x/keep:1")
    drop = add_image(store, [(layer_tar(member("d", b"2")), "gzip")], name="x/drop:1")
    kept_image = ensure_rootfs_image(store, keep)
    dropped_image = ensure_rootfs_image(store, drop)

    assert prune_rootfs_images([chain_id(keep.diff_ids)]) == [dropped_image]

    assert kept_image.exists() and not dropped_image.exists()


def test_pad_to_grows_sparsely_and_keeps_the_filesystem(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text("hi\n")
    image = tmp_path / "image.erofs"
    build_erofs(tree, image)
    used = image.stat().st_blocks
    size = 64 * 1024 * 1024

    pad_to(image, size)
    pad_to(image, size)  # idempotent

    assert image.stat().st_size == size
    assert image.stat().st_blocks == used
    with mounted(image, tmp_path / "mnt") as mnt:
        assert (mnt / "hello").read_text() == "hi\n"
    with pytest.raises(Conflict, match="larger than the fixed size"):
        pad_to(image, EROFS_ALIGN)
    with pytest.raises(InvalidArgument, match="multiple of 4096"):
        pad_to(image, size + 512)
    with pytest.raises(NotFound):
        pad_to(tmp_path / "missing", size)


def test_make_ext4_disk_is_sparse_clean_and_mountable(tmp_path: Path) -> None:
    disk = tmp_path / "scratch.ext4"
    size = 256 * 1024 * 1024

    make_ext4_disk(disk, size)

    info = disk.stat()
    assert info.st_size == size
    assert info.st_blocks * 512 < 32 * 1024 * 1024, "lazy init keeps the file sparse"
    check = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout
    with mounted(disk, tmp_path / "mnt", fstype="ext4") as mnt:
        root = mnt.stat()
        assert (root.st_uid, root.st_gid) == (0, 0)
        (mnt / "upper").mkdir()
        (mnt / "upper/file").write_text("written\n")
    check = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout


def test_make_ext4_disk_refuses_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="at least"):
        make_ext4_disk(tmp_path / "tiny", 1024 * 1024)
    with pytest.raises(InvalidArgument, match="multiple"):
        make_ext4_disk(tmp_path / "odd", 64 * 1024 * 1024 + 1)
    assert list(tmp_path.iterdir()) == []


def test_layers_handed_over_out_of_order_are_applied_in_order(store: ImageStore) -> None:
    """A pull hands layers over as their downloads finish: the upper one waits."""
    lower = layer_tar(member("f", b"lower"), member("gone", b"x"))
    upper = layer_tar(member("f", b"upper"), member(".wh.gone"))
    record = add_image(store, [(lower, "gzip"), (upper, "gzip")])
    blobs = [store.blob_path(layer.digest) for layer in record.layers]
    build = RootfsBuild.begin(record.diff_ids, names=[layer.digest for layer in record.layers])
    assert build is not None
    try:
        upper_thread = threading.Thread(
            target=build.apply, args=(1, blobs[1], record.layers[1].media_type)
        )
        upper_thread.start()
        time.sleep(0.2)
        assert upper_thread.is_alive()  # waiting for layer 0
        build.apply(0, blobs[0], record.layers[0].media_type)
        upper_thread.join(timeout=30)
        disk = build.finish()
    finally:
        build.close()
    assert dump_inode(disk, "/f").count("Size: 5") == 1
    assert (
        "gone"
        not in subprocess.run(
            ["dump.erofs", "--ls", "--path=/", str(disk)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("FILENAME", 1)[1]
    )


def test_a_failed_lower_layer_fails_the_waiting_ones_and_caches_nothing(
    store: ImageStore,
) -> None:
    good = layer_tar(member("f", b"fine"))
    record = add_image(store, [(good, "gzip"), (good, "gzip")], diff_ids=[sha256(b"lie")] * 2)
    blobs = [store.blob_path(layer.digest) for layer in record.layers]
    build = RootfsBuild.begin(record.diff_ids, names=["lower", "upper"])
    assert build is not None
    failures: list[BaseException] = []

    def upper() -> None:
        try:
            build.apply(1, blobs[1], record.layers[1].media_type)
        except BaseException as err:
            failures.append(err)

    waiting = threading.Thread(target=upper)
    waiting.start()
    with pytest.raises(InvalidArgument, match="layer lower"):
        build.apply(0, blobs[0], record.layers[0].media_type)
    waiting.join(timeout=30)
    assert [type(f) for f in failures] == [Conflict]
    with pytest.raises(Internal, match="incomplete"):
        build.finish()
    build.close()
    assert list(rootfs.rootfs_dir().glob("*.erofs")) == []
    assert [n for n in disk_cache_entries() if n.startswith(".")] == []


def test_staging_trees_left_by_a_dead_process_are_removed_by_the_next_build(
    store: ImageStore,
) -> None:
    record = add_image(store, [(layer_tar(member("f", b"x")), "gzip")])
    cache = rootfs.rootfs_dir()
    cache.mkdir(parents=True, exist_ok=True)
    old = cache / ".trash.build-dead-1"
    (old / "rootfs" / "usr").mkdir(parents=True)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    ensure_rootfs_image(store, record)
    assert not old.exists()


def test_a_pull_building_the_same_layers_never_keeps_a_container_waiting(
    store: ImageStore,
) -> None:
    """A pull builds its disk without the chain's lock: a stalled download (here: a
    layer never handed over) does not hold up a container of another local image with
    the same layers, and the pull's late disk does not replace the one built meanwhile."""
    record = add_image(store, [(layer_tar(member("f", b"shared")), "gzip")])
    blob = store.blob_path(record.layers[0].digest)
    pull = RootfsBuild.begin_speculative(
        record.diff_ids, names=[layer.digest for layer in record.layers]
    )
    assert pull is not None
    try:
        disk = ensure_rootfs_image(store, record, timeout=5.0)  # Conflict if it waited
        built = disk.stat()
        pull.apply(0, blob, record.layers[0].media_type)
        assert pull.finish() == disk
        assert (disk.stat().st_ino, disk.stat().st_mtime_ns) == (built.st_ino, built.st_mtime_ns)
    finally:
        pull.close()
    assert [n for n in disk_cache_entries() if n.startswith(".")] == []
    assert RootfsBuild.begin_speculative(record.diff_ids, names=["x"]) is None  # cached


def test_a_dead_pulls_staging_tree_is_removed_and_a_live_ones_kept(store: ImageStore) -> None:
    record = add_image(store, [(layer_tar(member("f", b"y")), "gzip")])
    names = [layer.digest for layer in record.layers]
    live = RootfsBuild.begin_speculative(record.diff_ids, names=names)
    assert live is not None
    cache = rootfs.rootfs_dir()
    dead = cache / ".pull-dead-1"
    (dead / "rootfs" / "etc").mkdir(parents=True)
    hour_ago = time.time() - 3600
    for tree in [dead, *cache.glob(".pull-*")]:
        os.utime(tree, (hour_ago, hour_ago))  # both past the grace period
    try:
        other = RootfsBuild.begin_speculative(record.diff_ids, names=names)
        assert other is not None
        other.close()
        assert not dead.exists()  # moved to the trash at once
        assert live._work.is_dir()  # its owner holds its lock: kept
        live.apply(0, store.blob_path(record.layers[0].digest), record.layers[0].media_type)
        assert live.finish().is_file()
    finally:
        live.close()
    assert [n for n in disk_cache_entries() if n.startswith(".")] == []
