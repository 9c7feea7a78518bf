"""Archives from a guest are hostile: ``husk cp CONTAINER:SRC DEST`` writes below DEST only.

Each attack is a tar stream crafted here, as a guest could send it, and fed to
the same function ``husk cp`` uses (:func:`husk.cli.cp.extract_copy`): the
stream is refused with a one-line error naming the entry, and nothing outside
DEST changes. Then Docker's naming rules, ownership and modes, and the shared
extractor (:mod:`husk.oci.extract`) on its own. These tests also run under
Debian's Python 3.11.2, whose tarfile has no extraction filters.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from husk.cli.cp import extract_copy
from husk.errors import HuskError

MTIME = 1_600_000_000
LABEL = "archive of web:/data"

Entry = tuple[tarfile.TarInfo, bytes]


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    mode: int | None = None,
    uid: int = 0,
    gid: int = 0,
    linkname: str = "",
    device: tuple[int, int] = (0, 0),
) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.uid, info.gid, info.mtime = uid, gid, MTIME
    info.linkname = linkname
    info.devmajor, info.devminor = device
    return info, data


def directory(name: str, **kw: Any) -> Entry:
    return entry(name, tarfile.DIRTYPE, **kw)


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


def copy_out(
    entries: list[Entry] | bytes,
    dest: Path | str,
    *,
    src: str = "/data",
    is_dir: bool = True,
    keep_owner: bool = False,
) -> None:
    """What ``husk cp web:SRC DEST`` does with the archive the guest sent."""
    raw = entries if isinstance(entries, bytes) else tar_bytes(entries)
    mode = (1 << 31) | 0o755 if is_dir else 0o644
    stat_doc = {"name": os.path.basename(src.rstrip("/")), "mode": mode}
    extract_copy(io.BytesIO(raw), src, stat_doc, str(dest), label=LABEL, keep_owner=keep_owner)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about a tree (and the tree's own entry)."""
    state: dict[str, tuple[object, ...]] = {}
    top = root.lstat()
    state["."] = (top.st_mode, top.st_uid, top.st_gid, top.st_nlink)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            state[str(path.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_nlink,
                st.st_mtime_ns,
                content,
            )
    return state


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Files next to DEST that no archive may touch: a passwd-like file owned by the test."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    os.chmod(target / "passwd", 0o644)
    (target / "sub").mkdir()
    (target / "sub" / "keep").write_text("keep\n")
    return target


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "dest"
    path.mkdir()
    return path


def refused(
    entries: list[Entry] | bytes,
    dest: Path,
    watched: list[Path],
    match: str,
    **kw: Any,
) -> str:
    """The copy fails with one line naming the entry; nothing in ``watched`` changed."""
    before = {path: snapshot(path) for path in watched}
    with pytest.raises(HuskError) as caught:
        copy_out(entries, dest, **kw)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(LABEL + ": "), message
    assert re.search(match, message), message
    for path in watched:
        assert snapshot(path) == before[path], f"{path} changed"
    return message


# ------------------------------------------------------------------ attacks


def test_hard_link_to_a_file_outside_dest_then_write_through_it(dest: Path, outside: Path) -> None:
    """The reproduced attack: link to a host file, then a regular entry of the same name
    (tarfile's "tar" filter writes and chowns through the link)."""
    passwd = outside / "passwd"
    for target in (str(passwd), f"../{passwd.parent.name}/passwd", "data/../../outside/passwd"):
        refused(
            [
                directory("data"),
                hardlink("data/pw", target),
                entry("data/pw", data=b"pwned::0:0::/:/bin/sh\n", uid=4242, gid=4242),
            ],
            dest,
            [outside],
            r"hard link target .*" + r"(absolute|'\.\.')",
        )
    assert passwd.stat().st_nlink == 1
    assert passwd.read_text().startswith("root:x:0:0")
    assert list(dest.iterdir()) == []


def test_hard_link_may_only_point_at_an_entry_already_extracted(dest: Path, outside: Path) -> None:
    # A file that exists in DEST beforehand is not the archive's to link to.
    (dest / "data").mkdir()
    (dest / "data" / "mine").write_text("the user's\n")
    refused(
        [directory("data"), hardlink("data/stolen", "data/mine")],
        dest,
        [outside, dest],
        r"hard link 'data/stolen' points to 'data/mine', which is not in the archive",
    )
    # A link to a later entry, or to a directory, is refused too.
    refused(
        [directory("data"), hardlink("data/early", "data/late"), entry("data/late", data=b"x")],
        dest,
        [outside, dest],
        "which is not in the archive",
    )
    refused(
        [directory("data"), directory("data/d"), hardlink("data/ld", "data/d")],
        dest,
        [outside, dest],
        "which is not in the archive",
    )


def test_symlink_then_write_through_it(dest: Path, outside: Path) -> None:
    refused(
        [directory("data"), symlink("data/a", str(outside)), entry("data/a/x", data=b"!")],
        dest,
        [outside],
        r"'data/a/x' would be written through the symbolic link 'data/a'",
    )
    refused(
        [
            directory("data"),
            symlink("data/up", "../../outside"),
            directory("data/up/sub"),
            entry("data/up/sub/planted", data=b"!"),
        ],
        dest,
        [outside],
        "symbolic link",
    )
    # A link through a symlink: the target resolves outside.
    refused(
        [directory("data"), symlink("data/a", str(outside)), hardlink("data/pw", "data/a/passwd")],
        dest,
        [outside],
        "symbolic link|not in the archive",
    )
    assert list(dest.iterdir()) == []


def test_symlink_already_in_dest_is_not_followed(dest: Path, outside: Path) -> None:
    """DEST (the user's own directory) holds a link out; the archive writes below it."""
    (dest / "data").mkdir()
    os.symlink(outside, dest / "data" / "sub")
    refused(
        [directory("data"), directory("data/sub"), entry("data/sub/keep", data=b"!")],
        dest,
        [outside],
        "symbolic link 'data/sub'|cannot overwrite non-directory",
    )
    refused(
        [directory("data"), entry("data/sub/keep", data=b"!")],
        dest,
        [outside],
        "symbolic link 'data/sub'",
    )


def test_dotdot_names(dest: Path, outside: Path, tmp_path: Path) -> None:
    for name in ("data/../../outside/passwd", "../outside/passwd", "data/x/../../../escape"):
        refused([directory("data"), entry(name, data=b"!")], dest, [outside], "contains '..'")
    assert not (tmp_path / "escape").exists()
    # ... as the very first entry too (it would set the archive's top-level name).
    refused([entry("../outside/passwd", data=b"!")], dest, [outside], "contains '..'")


def test_absolute_names(dest: Path, outside: Path) -> None:
    refused(
        [directory("data"), entry(str(outside / "passwd"), data=b"!")],
        dest,
        [outside],
        "is an absolute path",
    )
    refused([entry(str(outside / "new"), data=b"!")], dest, [outside], "is an absolute path")
    assert not (outside / "new").exists()


def test_device_nodes_and_fifos_are_refused(dest: Path, outside: Path) -> None:
    refused(
        [directory("data"), entry("data/null", tarfile.CHRTYPE, device=(1, 3), mode=0o666)],
        dest,
        [outside],
        "'data/null' is a device node",
    )
    refused(
        [directory("data"), entry("data/sda", tarfile.BLKTYPE, device=(8, 0))],
        dest,
        [outside],
        "'data/sda' is a device node",
    )
    refused(
        [directory("data"), entry("data/pipe", tarfile.FIFOTYPE)],
        dest,
        [outside],
        "'data/pipe' is a FIFO",
    )
    assert list(dest.iterdir()) == []  # checked before anything was written


def test_entry_outside_the_archives_top_is_refused(
    dest: Path, outside: Path, tmp_path: Path
) -> None:
    """``cp web:/data /tmp/new``: entries not under the archive's top never land beside DEST."""
    new = dest / "new"
    refused(
        [directory("data"), entry("data/ok", data=b"1"), entry("other/evil", data=b"!")],
        new,
        [outside, dest],
        "'other/evil' is outside the copied path 'data'",
    )
    refused(
        [directory("data"), hardlink("data/l", "other/evil")],
        new,
        [outside, dest],
        "hard link target 'other/evil' is outside",
    )
    assert not new.exists() and not (dest / "other").exists()


def test_top_level_name_is_not_the_guests_choice(dest: Path, tmp_path: Path) -> None:
    """The guest answers ``cp web:/data`` with an archive named ``etc``: it lands at DEST."""
    archive = [directory("etc"), entry("etc/passwd", data=b"guest\n"), directory("etc/sub")]
    new = dest / "out"
    copy_out(archive, new)
    assert (new / "passwd").read_bytes() == b"guest\n"
    assert sorted(p.name for p in dest.iterdir()) == ["out"]
    # Into an existing directory: under the requested name, not the archive's.
    copy_out(archive, dest)
    assert (dest / "data" / "passwd").read_bytes() == b"guest\n"
    assert not (dest / "etc").exists()
    # A file to a new name.
    copy_out([entry("shadow", data=b"s")], dest / "file.txt", src="/data/f", is_dir=False)
    assert (dest / "file.txt").read_bytes() == b"s"
    assert sorted(p.name for p in dest.iterdir()) == ["data", "file.txt", "out"]


def test_archive_cannot_replace_dest_or_a_directory_with_a_file(dest: Path) -> None:
    (dest / "data").mkdir()
    (dest / "data" / "keep").write_text("mine\n")
    refused([entry("data", data=b"flat")], dest, [dest], "cannot overwrite directory 'data'")
    refused(
        [directory("data"), entry("data/keep/x", data=b"x")],
        dest,
        [dest],
        "'data/keep' is not a directory|cannot overwrite",
    )
    # Contents of a directory (SRC/.) whose top entry is a file, not a directory.
    refused([entry(".", data=b"x")], dest, [dest], "would replace the destination", src="/d/.")


def test_setuid_bits_and_owners_are_dropped_without_archive_mode(dest: Path) -> None:
    copy_out(
        [
            directory("data", mode=0o2775, uid=4242, gid=4343),
            entry("data/su", data=b"su", mode=0o4755, uid=0, gid=0),
            entry("data/sg", data=b"sg", mode=0o2711, uid=4242, gid=4343),
            entry("data/sticky", data=b"t", mode=0o1644),
        ],
        dest,
    )
    su = (dest / "data" / "su").stat()
    assert stat.S_IMODE(su.st_mode) == 0o755
    assert (su.st_uid, su.st_gid) == (os.getuid(), os.getgid())
    sg = (dest / "data" / "sg").stat()
    assert stat.S_IMODE(sg.st_mode) == 0o711 and sg.st_uid == os.getuid()
    assert stat.S_IMODE((dest / "data" / "sticky").stat().st_mode) == 0o1644
    top = (dest / "data").stat()
    assert stat.S_IMODE(top.st_mode) == 0o775 and top.st_uid == os.getuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="keeping owners needs root")
def test_archive_mode_as_root_keeps_owners_and_setuid(dest: Path) -> None:
    copy_out(
        [
            directory("data", uid=4242, gid=4343),
            entry("data/su", data=b"su", mode=0o4755, uid=4242, gid=4343),
            symlink("data/link", "su"),
        ],
        dest,
        keep_owner=True,
    )
    su = (dest / "data" / "su").stat()
    assert stat.S_IMODE(su.st_mode) == 0o4755 and (su.st_uid, su.st_gid) == (4242, 4343)
    assert (dest / "data").stat().st_uid == 4242


def test_names_and_sizes_are_bounded(dest: Path, outside: Path) -> None:
    refused(
        [directory("data"), entry("data/" + "x" * 300, data=b"!")],
        dest,
        [outside],
        "component of 300 bytes",
    )
    refused(
        [directory("data"), entry("data/" + "/".join(["y" * 200] * 25), data=b"!")],
        dest,
        [outside],
        "bytes long",
    )
    nul = entry("data/plain", data=b"!")
    nul[0].pax_headers = {"path": "data/nul\0name"}  # ustar names stop at a NUL; PAX ones do not
    refused([directory("data"), nul], dest, [outside], "contains a NUL byte")


def test_truncated_and_garbage_archives_are_refused(dest: Path) -> None:
    raw = tar_bytes([directory("data"), entry("data/big", data=os.urandom(50_000))])
    refused(raw[:20_000], dest, [dest], "not a valid tar archive|unexpected end")
    refused(os.urandom(4096), dest, [dest], "not a valid tar archive")
    assert list(dest.iterdir()) == []


# ------------------------------------------------------------- Docker naming


@pytest.mark.parametrize(
    ("src", "dest_name", "exists", "expected"),
    [
        ("/data", "dest", True, "dest/data/f"),  # existing directory: under the source's name
        ("/data", "dest/new", False, "dest/new/f"),  # new name: the source renamed
        ("/data/", "dest/new", False, "dest/new/f"),
        ("/data/.", "dest", True, "dest/f"),  # SRC/. : the contents
        ("/data/.", "dest/new", False, "dest/new/f"),
    ],
)
def test_docker_naming_rules(
    tmp_path: Path, src: str, dest_name: str, exists: bool, expected: str
) -> None:
    (tmp_path / "dest").mkdir()
    top = "." if src.endswith("/.") else "data"
    prefix = "" if top == "." else "data/"
    copy_out(
        [directory(top), entry(f"{prefix}f", data=b"f"), hardlink(f"{prefix}g", f"{prefix}f")],
        tmp_path / dest_name,
        src=src,
    )
    assert (tmp_path / expected).read_bytes() == b"f"
    linked = (tmp_path / expected).with_name("g")
    assert linked.stat().st_ino == (tmp_path / expected).stat().st_ino
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == sorted(
        {str(Path(expected).parent), str(Path(expected)), str(linked.relative_to(tmp_path))}
        | ({"dest"} if dest_name != "dest" or expected.count("/") > 1 else set())
    )


def test_file_replaces_a_file_and_not_through_its_links(dest: Path, outside: Path) -> None:
    target = dest / "conf"
    os.link(outside / "passwd", target)  # the user's own hard link to a file outside
    copy_out([entry("hosts", data=b"new\n")], target, src="/etc/hosts", is_dir=False)
    assert target.read_bytes() == b"new\n"
    assert (outside / "passwd").read_text().startswith("root:x")
    os.symlink(outside / "passwd", dest / "sym")
    copy_out([entry("hosts", data=b"via\n")], dest / "sym", src="/etc/hosts", is_dir=False)
    assert not (dest / "sym").is_symlink() and (dest / "sym").read_bytes() == b"via\n"
    assert (outside / "passwd").read_text().startswith("root:x")


def test_directory_to_a_file_and_missing_parents_are_refused(dest: Path) -> None:
    (dest / "file").write_text("x")
    with pytest.raises(HuskError, match="cannot copy a directory to a file"):
        copy_out([directory("data")], dest / "file")
    with pytest.raises(HuskError, match=r"parent directory .* does not exist"):
        copy_out([directory("data")], dest / "no" / "such")
    with pytest.raises(HuskError, match=r"destination directory .* does not exist"):
        copy_out([directory("data")], f"{dest}/missing/")


def test_symlinks_are_copied_verbatim(dest: Path, outside: Path) -> None:
    copy_out(
        [directory("data"), symlink("data/abs", str(outside)), symlink("data/rel", "../x")],
        dest,
    )
    assert os.readlink(dest / "data" / "abs") == str(outside)
    assert os.readlink(dest / "data" / "rel") == "../x"


def test_read_only_directory_still_receives_its_contents(dest: Path) -> None:
    copy_out(
        [directory("data", mode=0o555), directory("data/ro", mode=0o500), entry("data/ro/f")],
        dest,
    )
    assert (dest / "data" / "ro" / "f").exists()
    assert stat.S_IMODE((dest / "data" / "ro").stat().st_mode) == 0o500
    assert stat.S_IMODE((dest / "data").stat().st_mode) == 0o555
    os.chmod(dest / "data", 0o755)  # let tmp_path be cleaned up
    os.chmod(dest / "data" / "ro", 0o755)


def test_a_large_archive_is_streamed_from_a_file(dest: Path, tmp_path: Path) -> None:
    size = 48 * 1024 * 1024
    spool = tmp_path / "spool.tar"
    with tarfile.open(spool, "w") as tar:
        info = tarfile.TarInfo("data")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        info = tarfile.TarInfo("data/zeros")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    tracemalloc.start()
    try:
        with open(spool, "rb") as handle:
            extract_copy(handle, "/data", {"mode": 1 << 31}, str(dest), label=LABEL)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (dest / "data" / "zeros").stat().st_size == size
    assert peak < 12 * 1024 * 1024, f"peak Python allocation {peak} bytes"


# --------------------------------------------------------- the extractor itself


def extractor_module() -> Any:
    import husk.oci.extract

    return husk.oci.extract


def run_extract(entries: list[Entry], root: Path, **policy: bool) -> int:
    module = extractor_module()
    count: int = module.extract_archive(
        io.BytesIO(tar_bytes(entries)),
        root,
        module.ExtractPolicy(**policy),
        label="test",
    )
    return count


def test_policy_allows_special_files_and_xattrs_only_when_asked(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    fifo = [entry("pipe", tarfile.FIFOTYPE, mode=0o640)]
    with pytest.raises(HuskError, match="'pipe' is a FIFO"):
        run_extract(fifo, root)
    run_extract(fifo, root, special_files=True)
    assert stat.S_ISFIFO((root / "pipe").lstat().st_mode)
    assert stat.S_IMODE((root / "pipe").lstat().st_mode) == 0o640


def test_sparse_entries_are_refused_by_default(tmp_path: Path) -> None:
    """A GNU sparse entry may declare terabytes in a few bytes of archive."""
    info = tarfile.TarInfo("hole")
    info.type = tarfile.GNUTYPE_SPARSE
    # Old GNU sparse header: map (offset 0, size 0), real size 1 TiB.
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT)[:512])
    header[386:398] = b"%011o\0" % 0  # offset
    header[398:410] = b"%011o\0" % 0  # numbytes
    header[482] = 0  # isextended
    header[483:495] = b"%011o\0" % (1 << 40)  # realsize
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    raw = bytes(header) + bytes(1024)
    root = tmp_path / "root"
    root.mkdir()
    module = extractor_module()
    with pytest.raises(HuskError, match="sparse"):
        module.extract_archive(io.BytesIO(raw), root, module.ExtractPolicy(), label="test")
    assert list(root.iterdir()) == []


def test_each_refusal_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    attacks: list[list[Entry]] = [
        [entry("a", data=b"1"), symlink("l", "/"), entry("l/etc/x", data=b"!")],
        [entry("a", data=b"1"), hardlink("b", "/etc/passwd")],
        [entry("a", data=b"1"), entry("b", tarfile.CHRTYPE, device=(1, 3))],
        [entry("a", data=b"1"), entry("../b", data=b"!")],
    ]
    for attack in attacks:
        with pytest.raises(HuskError):
            run_extract(attack, root)
        assert list(root.iterdir()) == []


def _mutations() -> list[Callable[[Path], list[Entry]]]:
    return [
        lambda o: [symlink("s", str(o)), entry("s/passwd", data=b"!")],
        lambda o: [hardlink("h", str(o / "passwd"))],
        lambda o: [directory("d"), symlink("d/s", "../../outside"), entry("d/s/passwd")],
    ]


@pytest.mark.parametrize("make", _mutations())
def test_layer_rules_hold_for_hostile_entries_too(
    tmp_path: Path, outside: Path, make: Callable[[Path], list[Entry]]
) -> None:
    """The image-layer policy (absolute names dropped, links to earlier layers allowed)
    still never leaves the tree."""
    module = extractor_module()
    root = tmp_path / "root"
    root.mkdir()
    before = snapshot(outside)
    with pytest.raises(HuskError):
        module.extract_archive(
            io.BytesIO(tar_bytes(make(outside))), root, module.layer_policy(), label="layer"
        )
    assert snapshot(outside) == before


UNPRIVILEGED_SCRIPT = """
import io, os, stat, sys, tarfile
from pathlib import Path
from husk.errors import HuskError
from husk.oci.extract import ExtractPolicy, TopMapper, extract_archive

def archive(entries):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, mode, link in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname, info.uid = kind, mode, link, 0
            info.size = 1 if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(b"x") if kind == tarfile.REGTYPE else None)
    buffer.seek(0)
    return buffer

dest, outside = Path(sys.argv[1]), Path(sys.argv[2])
policy = ExtractPolicy(keep_owner=True, keep_setid=True)  # refusals hold whatever is kept
D, F, L, S = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE
extract_archive(
    archive([("d", D, 0o555, ""), ("d/ro", D, 0o500, ""), ("d/ro/f", F, 0o4755, ""),
             ("d/ro/h", L, 0o644, "d/ro/f")]),
    dest, ExtractPolicy(), label="t", mapper=TopMapper(("out",), "t"))
f = (dest / "out/ro/f").stat()
print(f.st_uid == os.getuid(), oct(stat.S_IMODE(f.st_mode)), f.st_nlink,
      oct(stat.S_IMODE((dest / "out/ro").stat().st_mode)))
for bad in ([("d", D, 0o755, ""), ("d/s", S, 0o777, str(outside)), ("d/s/passwd", F, 0o644, "")],
            [("d", D, 0o755, ""), ("d/h", L, 0o644, "../outside/passwd")]):
    try:
        extract_archive(archive(bad), dest, policy, label="t", mapper=TopMapper(("x",), "t"))
        print("NOT REFUSED")
    except HuskError as err:
        print("refused")
os.chmod(dest / "out/ro", 0o755)
os.chmod(dest / "out", 0o755)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_extractor_as_an_unprivileged_user_under_the_system_python() -> None:
    """A non-root ``husk cp``: read-only directories still filled, no chown, links confined;
    run by Debian's /usr/bin/python3 (3.11.2 here) when there is one, else this one."""
    import shutil
    import subprocess
    import sys
    import tempfile

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is not installed")
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    # pytest's own temporary directories are private to root: use one nobody can enter.
    work = Path(tempfile.mkdtemp(prefix="husk-unprivileged-"))
    try:
        (work / "dest").mkdir()
        (work / "outside").mkdir()
        (work / "outside" / "passwd").write_text("orig\n")
        for path in (work, work / "dest", work / "outside", work / "outside" / "passwd"):
            os.chown(path, 65534, 65534)
        source = Path(__file__).resolve().parent.parent / "src"
        result = subprocess.run(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
             UNPRIVILEGED_SCRIPT, str(work / "dest"), str(work / "outside")],
            env={"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        if result.returncode != 0 and python != "/usr/bin/python3":
            pytest.skip(f"this interpreter cannot run as nobody: {result.stderr[-200:]}")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["True", "0o755", "2", "0o500", "refused", "refused"]
        assert (work / "outside" / "passwd").read_text() == "orig\n"
        assert not (work / "dest" / "x").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)
