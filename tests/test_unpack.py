"""Layer application: compression, whiteouts, metadata, and hostile layers."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import threading
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from husk.errors import Conflict, InvalidArgument, NotSupported
from husk.oci.unpack import CorruptLayer, UnsafeLayer, apply_layer, unpack_layers

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPES = {"gzip": GZIP, "zstd": ZSTD, "tar": TAR}
MTIME = 1_500_000_000

Entry = tuple[tarfile.TarInfo, bytes]


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    mode: int | None = None,
    uid: int = 0,
    gid: int = 0,
    mtime: float = MTIME,
    linkname: str = "",
    device: tuple[int, int] = (0, 0),
    pax: dict[str, str] | None = None,
) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    info.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.uid, info.gid, info.mtime = uid, gid, mtime
    info.linkname = linkname
    info.devmajor, info.devminor = device
    if pax:
        info.pax_headers = dict(pax)
    return info, data


def directory(name: str, **kw: object) -> Entry:
    return entry(name, tarfile.DIRTYPE, **kw)  # type: ignore[arg-type]


def symlink(name: str, target: str) -> Entry:
    return entry(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hardlink(name: str, target: str) -> Entry:
    return entry(name, tarfile.LNKTYPE, linkname=target)


def tar_bytes(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, mtime=0)
    if compression == "zstd":
        # A streamed frame (no content size in the header), as registries produce.
        out = io.BytesIO()
        with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as writer:
            writer.write(raw)
        return out.getvalue()
    return raw


def write_layer(
    directory_: Path, entries: list[Entry], compression: str = "gzip", name: str = "layer"
) -> Path:
    path = directory_ / f"{name}.{compression}"
    path.write_bytes(compress(tar_bytes(entries), compression))
    return path


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about a tree, to prove a hostile layer changed nothing."""
    state: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            state[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_mtime_ns, content)
    return state


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the rootfs that no layer may touch."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "secret").write_text("original\n")
    (target / "sub").mkdir()
    (target / "sub" / "keep").write_text("keep\n")
    return target


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


# --------------------------------------------------------------- formats


@pytest.mark.parametrize("compression", ["gzip", "zstd", "tar"])
def test_each_compression_unpacks_and_reports_its_diff_id(
    tmp_path: Path, root: Path, compression: str
) -> None:
    entries = [
        directory("etc"),
        entry("etc/hostname", data=b"box\n"),
        symlink("etc/link", "hostname"),
        entry("big", data=os.urandom(3 * 1024 * 1024 + 7)),
    ]
    raw = tar_bytes(entries)
    layer = tmp_path / "layer"
    layer.write_bytes(compress(raw, compression))

    diff_id = apply_layer(layer, MEDIA_TYPES[compression], root)

    assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert (root / "etc/hostname").read_text() == "box\n"
    assert os.readlink(root / "etc/link") == "hostname"
    assert (root / "big").read_bytes() == entries[3][1]


def test_docker_media_type_and_mislabelled_compression_follow_magic_bytes(
    tmp_path: Path, root: Path
) -> None:
    zstd_layer = write_layer(tmp_path, [entry("z", data=b"zstd")], "zstd")
    plain_layer = write_layer(tmp_path, [entry("p", data=b"plain")], "tar")

    apply_layer(zstd_layer, DOCKER_GZIP, root)
    apply_layer(plain_layer, GZIP, root)

    assert (root / "z").read_bytes() == b"zstd"
    assert (root / "p").read_bytes() == b"plain"


def test_multi_frame_zstd_and_multi_member_gzip(tmp_path: Path, root: Path) -> None:
    raw = tar_bytes([entry("a", data=b"A" * 5000), entry("b", data=b"B" * 7000)])
    half = len(raw) // 2
    zstd_layer = tmp_path / "multi.zst"
    compressor = zstandard.ZstdCompressor()
    zstd_layer.write_bytes(compressor.compress(raw[:half]) + compressor.compress(raw[half:]))
    gzip_layer = tmp_path / "multi.gz"
    gzip_layer.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))

    for layer, media_type in ((zstd_layer, ZSTD), (gzip_layer, GZIP)):
        target = root / media_type.rsplit("+", 1)[1]
        target.mkdir()
        assert apply_layer(layer, media_type, target) == f"sha256:{hashlib.sha256(raw).hexdigest()}"
        assert (target / "b").read_bytes() == b"B" * 7000


def test_unsupported_media_type_and_compression_are_refused(tmp_path: Path, root: Path) -> None:
    layer = write_layer(tmp_path, [entry("f", data=b"x")], "tar")
    with pytest.raises(NotSupported, match="media type"):
        apply_layer(layer, "application/vnd.oci.image.config.v1+json", root)
    bzip = tmp_path / "layer.bz2"
    bzip.write_bytes(b"BZh91AY&SY" + b"\0" * 64)
    with pytest.raises(NotSupported, match="bzip2"):
        apply_layer(bzip, TAR, root)


def test_large_file_is_streamed_not_held_in_memory(tmp_path: Path, root: Path) -> None:
    size = 48 * 1024 * 1024
    raw_path = tmp_path / "big.tar"
    info = tarfile.TarInfo("zeros")
    info.size = size
    with tarfile.open(raw_path, "w") as tar:
        tar.addfile(info, io.BytesIO(bytes(size)))
    layer = tmp_path / "big.zst"
    with open(raw_path, "rb") as src, open(layer, "wb") as dst:
        zstandard.ZstdCompressor().copy_stream(src, dst)

    tracemalloc.start()
    try:
        apply_layer(layer, ZSTD, root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (root / "zeros").stat().st_size == size
    assert peak < 12 * 1024 * 1024, f"peak Python allocation {peak} bytes"


# -------------------------------------------------------------- whiteouts


def test_whiteout_removes_lower_file_and_directory(tmp_path: Path, root: Path) -> None:
    lower = write_layer(
        tmp_path,
        [
            directory("etc"),
            entry("etc/gone", data=b"x"),
            entry("etc/stays", data=b"y"),
            directory("var/cache/apt"),
            entry("var/cache/apt/pkg", data=b"z"),
        ],
        name="lower",
    )
    upper = write_layer(
        tmp_path, [entry("etc/.wh.gone"), entry("var/cache/.wh.apt")], "zstd", name="upper"
    )

    apply_layer(lower, GZIP, root)
    apply_layer(upper, ZSTD, root)

    assert not (root / "etc/gone").exists()
    assert (root / "etc/stays").read_bytes() == b"y"
    assert not (root / "var/cache/apt").exists()
    assert (root / "var/cache").is_dir()
    assert not any(p.name.startswith(".wh.") for p in root.rglob("*"))


def test_opaque_directory_drops_lower_contents_even_when_marker_comes_last(
    tmp_path: Path, root: Path
) -> None:
    lower = write_layer(
        tmp_path,
        [
            directory("app"),
            entry("app/old", data=b"old"),
            directory("app/sub"),
            entry("app/sub/old", data=b"old"),
            entry("app/replaced", data=b"lower"),
            entry("outside-app", data=b"kept"),
        ],
        name="lower",
    )
    upper = write_layer(
        tmp_path,
        [
            directory("app"),
            entry("app/new", data=b"new"),
            entry("app/replaced", data=b"upper"),
            entry("app/sub/new", data=b"new"),  # parent directory implied, not listed
            entry("app/.wh..wh..opq"),  # after this layer's own entries
        ],
        name="upper",
    )

    apply_layer(lower, GZIP, root)
    apply_layer(upper, GZIP, root)

    remaining = sorted(str(p.relative_to(root)) for p in (root / "app").rglob("*"))
    assert remaining == ["app/new", "app/replaced", "app/sub", "app/sub/new"]
    assert (root / "app/replaced").read_bytes() == b"upper"
    assert (root / "outside-app").read_bytes() == b"kept"


def test_whiteout_never_removes_an_entry_of_its_own_layer(tmp_path: Path, root: Path) -> None:
    lower = write_layer(tmp_path, [entry("f", data=b"lower")], name="lower")
    upper = write_layer(tmp_path, [entry("f", data=b"upper"), entry(".wh.f")], name="upper")

    apply_layer(lower, GZIP, root)
    apply_layer(upper, GZIP, root)

    assert (root / "f").read_bytes() == b"upper"


def test_whiteout_of_missing_file_is_harmless(tmp_path: Path, root: Path) -> None:
    layer = write_layer(tmp_path, [entry("no/such/.wh.thing"), entry("a", data=b"1")])
    apply_layer(layer, GZIP, root)
    assert (root / "a").exists()
    assert not (root / "no").exists()


# ------------------------------------------------------------ file types


def test_hardlinks_within_layer_and_to_a_lower_layer(tmp_path: Path, root: Path) -> None:
    lower = write_layer(tmp_path, [directory("bin"), entry("bin/lower", data=b"L")], name="l")
    upper = write_layer(
        tmp_path,
        [
            entry("bin/busybox", data=b"BB", mode=0o755),
            hardlink("bin/sh", "bin/busybox"),
            hardlink("bin/ls", "/bin/busybox"),
            hardlink("bin/again", "bin/lower"),
        ],
        name="u",
    )

    apply_layer(lower, GZIP, root)
    apply_layer(upper, GZIP, root)

    busybox = (root / "bin/busybox").stat()
    assert (root / "bin/sh").stat().st_ino == busybox.st_ino
    assert (root / "bin/ls").stat().st_ino == busybox.st_ino
    assert busybox.st_nlink == 3
    assert (root / "bin/again").stat().st_ino == (root / "bin/lower").stat().st_ino


def test_symlinks_are_created_verbatim_and_replaced_without_following(
    tmp_path: Path, root: Path, outside: Path
) -> None:
    before = snapshot(outside)
    lower = write_layer(
        tmp_path,
        [symlink("abs", str(outside / "secret")), symlink("rel", "../outside/secret")],
        name="lower",
    )
    upper = write_layer(tmp_path, [entry("abs", data=b"replaced"), directory("rel")], name="upper")

    apply_layer(lower, GZIP, root)
    assert os.readlink(root / "abs") == str(outside / "secret")
    apply_layer(upper, GZIP, root)

    assert (root / "abs").read_bytes() == b"replaced"
    assert not (root / "abs").is_symlink()
    assert (root / "rel").is_dir() and not (root / "rel").is_symlink()
    assert snapshot(outside) == before


def test_modes_ownership_and_mtimes(tmp_path: Path, root: Path) -> None:
    layer = write_layer(
        tmp_path,
        [
            directory("usr/bin", mtime=1_000_000_000),
            entry("usr/bin/su", data=b"su", mode=0o4755, uid=1000, gid=1001, mtime=1_100_000_000),
            directory("srv", mode=0o2775, uid=33, gid=33, mtime=1_200_000_000),
            entry("srv/data", data=b"d", mtime=1_250_000_000.5),
            directory("tmp", mode=0o1777, mtime=1_300_000_000),
            entry("link", tarfile.SYMTYPE, linkname="usr", uid=7, gid=8, mtime=1_400_000_000),
            directory("usr", mtime=1_050_000_000),  # listed after its contents
            entry("usr/new", data=b"n"),  # written into usr after the usr entry
        ],
    )
    apply_layer(layer, GZIP, root)

    su = (root / "usr/bin/su").lstat()
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert (su.st_uid, su.st_gid) == (1000, 1001)
    assert su.st_mtime_ns == 1_100_000_000 * 10**9
    srv = (root / "srv").lstat()
    assert stat.S_IMODE(srv.st_mode) == 0o2775 and (srv.st_uid, srv.st_gid) == (33, 33)
    assert srv.st_mtime_ns == 1_200_000_000 * 10**9
    assert (root / "srv/data").lstat().st_mtime_ns == 1_250_000_000_500_000_000
    assert stat.S_IMODE((root / "tmp").lstat().st_mode) == 0o1777
    link = (root / "link").lstat()
    assert (link.st_uid, link.st_gid) == (7, 8)
    assert link.st_mtime_ns == 1_400_000_000 * 10**9
    assert (root / "usr/bin").lstat().st_mtime_ns == 1_000_000_000 * 10**9
    assert (root / "usr").lstat().st_mtime_ns == 1_050_000_000 * 10**9


def test_device_nodes_and_fifos(tmp_path: Path, root: Path) -> None:
    layer = write_layer(
        tmp_path,
        [
            entry("dev/null", tarfile.CHRTYPE, device=(1, 3), mode=0o666),
            entry("dev/loop9", tarfile.BLKTYPE, device=(7, 9), mode=0o660, gid=6),
            entry("run/pipe", tarfile.FIFOTYPE, mode=0o620),
        ],
    )
    apply_layer(layer, GZIP, root)

    null = (root / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and stat.S_IMODE(null.st_mode) == 0o666
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    loop = (root / "dev/loop9").lstat()
    assert stat.S_ISBLK(loop.st_mode) and loop.st_gid == 6
    assert (os.major(loop.st_rdev), os.minor(loop.st_rdev)) == (7, 9)
    pipe = (root / "run/pipe").lstat()
    assert stat.S_ISFIFO(pipe.st_mode) and stat.S_IMODE(pipe.st_mode) == 0o620


def test_xattrs_and_file_capabilities(tmp_path: Path, root: Path) -> None:
    # VFS_CAP_REVISION_2 | effective, permitted = CAP_NET_RAW (bit 13).
    capability = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
    layer = write_layer(
        tmp_path,
        [
            entry(
                "bin/ping",
                data=b"ping",
                mode=0o755,
                uid=0,
                pax={
                    "SCHILY.xattr.security.capability": capability.decode(
                        "utf-8", "surrogateescape"
                    ),
                    "SCHILY.xattr.user.origin": "debian",
                },
            ),
            directory("data", pax={"SCHILY.xattr.user.dir": "yes"}),
        ],
    )
    apply_layer(layer, GZIP, root)

    assert os.getxattr(root / "bin/ping", "security.capability") == capability
    assert os.getxattr(root / "bin/ping", "user.origin") == b"debian"
    assert os.getxattr(root / "data", "user.dir") == b"yes"


def test_implicit_parents_and_type_changes(tmp_path: Path, root: Path) -> None:
    lower = write_layer(
        tmp_path,
        [entry("a/b/c/file", data=b"x"), entry("was-file", data=b"f"), directory("was-dir/x")],
        name="lower",
    )
    upper = write_layer(
        tmp_path,
        [directory("was-file"), entry("was-file/inner", data=b"i"), entry("was-dir", data=b"d")],
        name="upper",
    )
    apply_layer(lower, GZIP, root)
    apply_layer(upper, GZIP, root)

    for parent in ("a", "a/b", "a/b/c"):
        assert stat.S_IMODE((root / parent).stat().st_mode) == 0o755
    assert (root / "was-file/inner").read_bytes() == b"i"
    assert (root / "was-dir").read_bytes() == b"d"


def test_absolute_and_dotted_names_land_inside_the_root(tmp_path: Path, root: Path) -> None:
    layer = write_layer(
        tmp_path, [entry("/etc/abs", data=b"a"), entry("./etc/./dot", data=b"d"), directory(".")]
    )
    apply_layer(layer, GZIP, root)
    assert (root / "etc/abs").read_bytes() == b"a"
    assert (root / "etc/dot").read_bytes() == b"d"
    assert stat.S_IMODE(root.stat().st_mode) == 0o755


# -------------------------------------------------------------- hostile


def _refused(
    layer: Path, root: Path, outside: Path, error: type[Exception], match: str
) -> pytest.ExceptionInfo[Exception]:
    before = snapshot(outside)
    with pytest.raises(error, match=match) as caught:
        apply_layer(layer, GZIP, root)
    assert snapshot(outside) == before
    assert "\n" not in str(caught.value)
    return caught


def test_dotdot_entry_is_refused(tmp_path: Path, root: Path, outside: Path) -> None:
    layer = write_layer(tmp_path, [entry("ok", data=b"1"), entry("../outside/secret", data=b"!")])
    caught = _refused(layer, root, outside, UnsafeLayer, r"'\.\./outside/secret'.*'\.\.'")
    assert isinstance(caught.value, InvalidArgument)


def test_dotdot_hidden_inside_a_path_is_refused(tmp_path: Path, root: Path, outside: Path) -> None:
    layer = write_layer(tmp_path, [directory("a"), entry("a/../../outside/new", data=b"!")])
    _refused(layer, root, outside, UnsafeLayer, "contains '..'")


def test_write_through_absolute_symlink_is_refused(
    tmp_path: Path, root: Path, outside: Path
) -> None:
    layer = write_layer(
        tmp_path, [symlink("evil", str(outside)), entry("evil/secret", data=b"pwned")]
    )
    _refused(layer, root, outside, UnsafeLayer, "'evil/secret'.*symbolic link 'evil'")


def test_write_through_escaping_relative_symlink_is_refused(
    tmp_path: Path, root: Path, outside: Path
) -> None:
    layer = write_layer(
        tmp_path,
        [
            directory("x"),
            symlink("x/evil", "../../outside"),
            entry("x/evil/sub/planted", data=b"pwned"),
        ],
    )
    _refused(layer, root, outside, UnsafeLayer, "symbolic link 'x/evil'")


def test_write_through_symlink_from_a_lower_layer_is_refused(
    tmp_path: Path, root: Path, outside: Path
) -> None:
    apply_layer(write_layer(tmp_path, [symlink("etc", str(outside))], name="lower"), GZIP, root)
    upper = write_layer(tmp_path, [directory("etc/sub"), entry("etc/passwd", data=b"!")])
    _refused(upper, root, outside, UnsafeLayer, "symbolic link 'etc'")


def test_hardlink_to_host_file_is_refused(tmp_path: Path, root: Path, outside: Path) -> None:
    absolute = write_layer(tmp_path, [hardlink("passwd", "/etc/passwd")], name="abs")
    _refused(absolute, root, outside, CorruptLayer, "'/etc/passwd', which is not in the image")
    assert not (root / "passwd").exists()
    dotdot = write_layer(tmp_path, [hardlink("secret", "../outside/secret")], name="dotdot")
    _refused(dotdot, root, outside, UnsafeLayer, "hard link target")
    via_symlink = write_layer(
        tmp_path, [symlink("evil", str(outside)), hardlink("stolen", "evil/secret")], name="via"
    )
    _refused(via_symlink, root, outside, UnsafeLayer, "symbolic link 'evil'")
    assert (outside / "secret").stat().st_nlink == 1


def test_whiteout_through_symlink_is_refused(tmp_path: Path, root: Path, outside: Path) -> None:
    layer = write_layer(
        tmp_path,
        [symlink("evil", str(outside)), entry("evil/.wh.secret"), entry("evil/.wh..wh..opq")],
    )
    _refused(layer, root, outside, UnsafeLayer, "symbolic link 'evil'")
    dotdot = write_layer(tmp_path, [entry(".wh.."), entry("x")], name="dots")
    _refused(dotdot, root, outside, UnsafeLayer, "whiteout")


def test_truncated_and_corrupt_layers_are_refused(tmp_path: Path, root: Path) -> None:
    entries = [entry(f"f{i}", data=os.urandom(20000)) for i in range(10)]
    cases = {}
    for compression in ("gzip", "zstd"):
        whole = compress(tar_bytes(entries), compression)
        cut = tmp_path / f"cut.{compression}"
        cut.write_bytes(whole[: len(whole) * 2 // 3])
        cases[cut] = MEDIA_TYPES[compression]
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(4000))
    cases[garbage] = GZIP
    not_tar = tmp_path / "not-tar"
    not_tar.write_bytes(os.urandom(5000))
    cases[not_tar] = TAR

    for layer, media_type in cases.items():
        target = root / layer.name
        target.mkdir()
        with pytest.raises(CorruptLayer) as caught:
            apply_layer(layer, media_type, target, name="sha256:abc")
        message = str(caught.value)
        assert message.startswith("layer sha256:abc: "), message
        assert "\n" not in message


def test_a_layer_refused_mid_stream_stops_its_read_ahead_thread(
    tmp_path: Path, root: Path, outside: Path
) -> None:
    """Layers are decompressed a few chunks ahead in a thread; a layer refused (or cut)
    before its end leaves no such thread behind, blocked on chunks nobody will take."""
    big = [entry(f"f{i}", data=os.urandom(1 << 20)) for i in range(12)]
    hostile = write_layer(tmp_path, [entry("../outside/secret", data=b"!"), *big])
    cut = tmp_path / "cut.gz"
    cut.write_bytes(write_layer(tmp_path, big, name="whole").read_bytes()[:-4000])
    before = snapshot(outside)
    for layer, refusal in ((hostile, UnsafeLayer), (cut, CorruptLayer)):
        target = root / layer.name
        target.mkdir()
        with pytest.raises(refusal):
            apply_layer(layer, GZIP, target)
    assert [t for t in threading.enumerate() if t.name == "layer-read-ahead"] == []
    assert snapshot(outside) == before


# ---------------------------------------------------------- unpack_layers


def test_unpack_layers_builds_the_tree_and_checks_diff_ids(tmp_path: Path) -> None:
    raws = [tar_bytes([entry("a", data=b"1")]), tar_bytes([entry("b", data=b"2")])]
    layers = []
    for index, raw in enumerate(raws):
        path = tmp_path / f"l{index}"
        path.write_bytes(compress(raw, ("gzip", "zstd")[index]))
        layers.append((path, (GZIP, ZSTD)[index]))
    diff_ids = [f"sha256:{hashlib.sha256(raw).hexdigest()}" for raw in raws]
    dest = tmp_path / "cache" / "tree"

    assert unpack_layers(layers, dest, diff_ids=diff_ids) == diff_ids

    assert sorted(p.name for p in dest.iterdir()) == ["a", "b"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tree"]
    with pytest.raises(Conflict, match="already exists"):
        unpack_layers(layers, dest)


def test_unpack_layers_refuses_a_diff_id_mismatch_and_leaves_nothing(tmp_path: Path) -> None:
    layer = write_layer(tmp_path, [entry("a", data=b"1")])
    wrong = "sha256:" + "0" * 64
    dest = tmp_path / "cache" / "tree"

    with pytest.raises(InvalidArgument, match=f"config says {wrong}"):
        unpack_layers([(layer, GZIP)], dest, diff_ids=[wrong], names=["sha256:feed"])

    assert list(dest.parent.iterdir()) == []
    with pytest.raises(InvalidArgument, match="2 diff_ids"):
        unpack_layers([(layer, GZIP)], dest, diff_ids=[wrong, wrong])


def test_unpack_layers_failure_leaves_no_partial_tree(tmp_path: Path, outside: Path) -> None:
    good = write_layer(tmp_path, [entry("a", data=b"1")], name="good")
    hostile = write_layer(
        tmp_path, [symlink("evil", str(outside)), entry("evil/x", data=b"!")], name="bad"
    )
    dest = tmp_path / "cache" / "tree"
    before = snapshot(outside)

    with pytest.raises(UnsafeLayer):
        unpack_layers([(good, GZIP), (hostile, GZIP)], dest)

    assert list(dest.parent.iterdir()) == []
    assert snapshot(outside) == before


# ------------------------------------------------------------- check_layer


def test_tar_cut_inside_a_header_is_refused_by_apply_and_check(tmp_path: Path, root: Path) -> None:
    """tarfile takes a header cut short for the end of the archive: the block count tells."""
    from husk.oci.unpack import check_layer

    raw = tar_bytes([entry(f"f{i}", data=b"x" * 3000) for i in range(3)])
    cut = raw[: 2 * 3584 + 100]  # two whole entries, then 100 bytes of the third header
    layer = tmp_path / "cut.gz"
    layer.write_bytes(compress(cut, "gzip"))
    diff_id = f"sha256:{hashlib.sha256(cut).hexdigest()}"  # the author's, consistent
    for run in (
        lambda: apply_layer(layer, GZIP, root, diff_id=diff_id, name="sha256:cut"),
        lambda: check_layer(layer, GZIP, diff_id=diff_id, name="sha256:cut"),
    ):
        with pytest.raises(CorruptLayer, match=r"^layer sha256:cut: tar stream is truncated"):
            run()


def test_check_layer_reads_through_without_writing(tmp_path: Path) -> None:
    from husk.oci.unpack import check_layer

    raw = tar_bytes([directory("d"), entry("d/f", data=b"1"), symlink("l", "/etc")])
    layer = write_layer(tmp_path, [directory("d"), entry("d/f", data=b"1"), symlink("l", "/etc")])
    good = f"sha256:{hashlib.sha256(raw).hexdigest()}"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert check_layer(layer, GZIP, diff_id=good) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(InvalidArgument, match=r"but the image config says sha256:0+$"):
        check_layer(layer, GZIP, diff_id="sha256:" + "0" * 64)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:1024])  # a whole number of blocks, but d/f has no data
    with pytest.raises(CorruptLayer, match="unexpected end of data"):
        check_layer(cut, TAR, name="sha256:x")
