"""The layer of a commit: the guest's writer on a real overlay-style upper directory,
and the host's check of what a (hostile) guest sends."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from husk.errors import InvalidArgument
from husk.oci.extract import xattrs_of
from husk.runtime.commit import apply_commit_changes, container_config
from husk.runtime.layertar import BadLayer, check_name, rewrite
from husk.runtime.model import ContainerRecord
from husk.spec import ContainerSpec


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in entries:
            member.size = len(data) if member.isreg() else 0
            tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return buffer.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    for key, value in fields.items():
        setattr(member, key, value)
    return member


def _members(path: Path) -> dict[str, tarfile.TarInfo]:
    with gzip.open(path) as plain, tarfile.open(fileobj=plain) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_rewrite_keeps_a_good_layer(tmp_path: Path) -> None:
    raw = _tar(
        [
            (_info("etc", tarfile.DIRTYPE, mode=0o755), b""),
            (_info("etc/passwd", mode=0o644, uid=0), b"root:x:0:0\n"),
            (_info("etc/.wh.group"), b""),
            (_info("opt", tarfile.DIRTYPE), b""),
            (_info("opt/.wh..wh..opq"), b""),
            (_info("etc/link", tarfile.LNKTYPE, linkname="etc/passwd"), b""),
            (_info("etc/sym", tarfile.SYMTYPE, linkname="/etc/passwd"), b""),
            (_info("bin/su", mode=0o4755, uid=0), b"x"),
        ]
    )
    layer = rewrite(io.BytesIO(raw), tmp_path / "l.tgz", max_bytes=1 << 20)
    members = _members(layer.path)
    assert members["etc/.wh.group"].size == 0
    assert members["etc/link"].islnk() and members["etc/link"].linkname == "etc/passwd"
    assert members["bin/su"].mode == 0o4755
    assert layer.entries == 8 and layer.diff_id.startswith("sha256:")
    with gzip.open(layer.path) as plain:
        assert "sha256:" + hashlib.sha256(plain.read()).hexdigest() == layer.diff_id


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([(_info("../escape"), b"x")], "not normalised"),
        ([(_info("a/../../b"), b"x")], "not normalised"),
        ([(_info("/etc/passwd"), b"x")], "absolute"),
        ([(_info("dev/sda", tarfile.BLKTYPE, devmajor=8), b"")], "device node"),
        ([(_info("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1), b"")], "device node"),
        ([(_info("a"), b"1"), (_info("a"), b"2")], "twice"),
        ([(_info("x", tarfile.LNKTYPE, linkname="etc/shadow"), b"")], "not an earlier file"),
        ([(_info("x", tarfile.LNKTYPE, linkname="../../etc/shadow"), b"")], "not normalised"),
        ([(_info(".wh.x"), b"data")], "not an empty file"),
        ([(_info("f"), b"1"), (_info("f/g"), b"2")], "not a directory"),
        ([(_info("big"), b"x" * 2048)], "more than 1024 bytes"),
        ([(_info("a\nb"), b"")], "control characters"),
        ([(_info("f", uid=2**32), b"")], "owner out of range"),
    ],
)
def test_rewrite_refuses_a_hostile_layer(
    tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes]], reason: str
) -> None:
    with pytest.raises(BadLayer, match=reason):
        rewrite(io.BytesIO(_tar(entries)), tmp_path / "l.tgz", max_bytes=1024)


def test_rewrite_keeps_capabilities_and_user_xattrs(tmp_path: Path) -> None:
    capability = "\x01\x00\x00\x02" + "\x00" * 16
    good = _info("bin/ping")
    good.pax_headers = {
        "SCHILY.xattr.security.capability": capability,
        "SCHILY.xattr.user.note": "hello",
        "SCHILY.xattr.user.binary": "\udcff\x00x",  # a non-UTF-8 byte, a NUL
    }
    folder = _info("data", tarfile.DIRTYPE)
    folder.pax_headers = {"SCHILY.xattr.user.dir": "d"}
    raw = _tar([(good, b"x"), (folder, b"")])
    layer = rewrite(io.BytesIO(raw), tmp_path / "l.tgz", max_bytes=1024)
    members = _members(layer.path)
    assert xattrs_of(members["bin/ping"]) == {
        "security.capability": capability.encode("latin-1"),
        "user.note": b"hello",
        "user.binary": b"\xff\x00x",
    }
    assert xattrs_of(members["data"]) == {"user.dir": b"d"}


def _with_xattrs(name: str, records: dict[str, str], kind: bytes = tarfile.REGTYPE) -> bytes:
    member = _info(name, kind, linkname="target" if kind == tarfile.SYMTYPE else "")
    member.pax_headers = records
    return _tar([(member, b"")])


@pytest.mark.parametrize(
    ("records", "kind", "reason"),
    [
        ({"SCHILY.xattr.trusted.overlay.opaque": "y"}, tarfile.REGTYPE, "'trusted.overlay.opaque'"),
        ({"SCHILY.xattr.security.selinux": "x"}, tarfile.REGTYPE, "only security.capability"),
        ({"SCHILY.xattr.security.ima": "x"}, tarfile.DIRTYPE, "only security.capability"),
        ({"SCHILY.xattr.system.posix_acl_access": "x"}, tarfile.REGTYPE, "only security"),
        ({"SCHILY.xattr.user.": "x"}, tarfile.REGTYPE, "only security.capability"),
        ({"LIBARCHIVE.xattr.user.x": "eA=="}, tarfile.REGTYPE, "extended attribute record"),
        ({"SCHILY.xattr.security.capability": "x" * 100}, tarfile.REGTYPE, "oversized"),
        ({"SCHILY.xattr.user." + "n" * 300: "x"}, tarfile.REGTYPE, "name that is too long"),
        ({"SCHILY.xattr.user.a\nb": "x"}, tarfile.REGTYPE, "control characters"),
        ({"SCHILY.xattr.user.big": "v" * 65537}, tarfile.REGTYPE, "too large"),
        (
            {f"SCHILY.xattr.user.{n}": "v" for n in range(65)},
            tarfile.REGTYPE,
            "too many extended attributes",
        ),
        (
            {f"SCHILY.xattr.user.{n}": "v" * 30000 for n in range(3)},
            tarfile.REGTYPE,
            "too many extended attributes",
        ),
        ({"SCHILY.xattr.user.x": "v"}, tarfile.SYMTYPE, "no file or directory"),
    ],
)
def test_rewrite_refuses_other_or_unbounded_xattrs(
    tmp_path: Path, records: dict[str, str], kind: bytes, reason: str
) -> None:
    with pytest.raises(BadLayer, match=reason):
        rewrite(io.BytesIO(_with_xattrs("f", records, kind)), tmp_path / "l.tgz", max_bytes=1 << 20)


def test_rewrite_counts_xattr_values_against_the_bound(tmp_path: Path) -> None:
    entries = []
    for number in range(4):
        member = _info(f"f{number}")
        member.pax_headers = {"SCHILY.xattr.user.v": "v" * 40000}
        entries.append((member, b""))
    with pytest.raises(BadLayer, match="more than 100000 bytes"):
        rewrite(io.BytesIO(_tar(entries)), tmp_path / "l.tgz", max_bytes=100_000)


def test_rewrite_refuses_garbage(tmp_path: Path) -> None:
    with pytest.raises(BadLayer):
        rewrite(io.BytesIO(b"\x01" * 5000), tmp_path / "l.tgz", max_bytes=1024)
    truncated = _tar([(_info("f"), b"x" * 1000)])[:700]
    with pytest.raises(BadLayer):
        rewrite(io.BytesIO(truncated), tmp_path / "l2.tgz", max_bytes=1 << 20)


def test_check_name() -> None:
    assert check_name("usr/bin/") == "usr/bin"
    for bad in ("", ".", "a//b", "./a", "a/./b"):
        with pytest.raises(BadLayer):
            check_name(bad)


@pytest.mark.usefixtures("as_root")
def test_guest_writer_converts_overlay_markers(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "passwd").write_text("changed\n")
    os.mknod(upper / "etc" / "group", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout
    (upper / "opq").mkdir()
    os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")
    (upper / "opq" / "fresh").write_text("fresh")
    os.link(upper / "etc" / "passwd", upper / "hard")
    os.symlink("/etc/passwd", upper / "sym")
    (upper / "ping").write_text("binary")
    capability = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw+ep
    os.setxattr(upper / "ping", "security.capability", capability)
    os.setxattr(upper / "ping", "user.origin", b"built\xff")
    os.setxattr(upper / "opq", "user.dir", b"d")
    (upper / ".dockerenv").write_text("")
    (upper / "etc" / "hostname").write_text("x")
    out = tmp_path / "out.tar"
    code = f"from husk.guest.agent.layer import LayerWriter; LayerWriter({str(upper)!r}).run()"
    with open(out, "wb") as handle:
        subprocess.run(
            [os.environ.get("PYTHON", "python3"), "-c", code],
            stdout=handle,
            check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
        )
    with tarfile.open(out) as tar:
        names = {m.name: m for m in tar.getmembers()}
    assert "etc/.wh.group" in names and names["etc/.wh.group"].isreg()
    assert "opq/.wh..wh..opq" in names and "opq/fresh" in names
    assert names["hard"].islnk() and names["hard"].linkname == "etc/passwd"
    assert names["sym"].issym() and names["sym"].linkname == "/etc/passwd"
    assert ".dockerenv" not in names and "etc/hostname" not in names
    with open(out, "rb") as raw:
        layer = rewrite(raw, tmp_path / "l.tgz", max_bytes=1 << 20)
    members = _members(layer.path)
    assert "etc/.wh.group" in members
    assert xattrs_of(members["ping"]) == {
        "security.capability": capability,
        "user.origin": b"built\xff",
    }
    # overlayfs's own attribute stays out; the directory's user.* one goes along.
    assert xattrs_of(members["opq"]) == {"user.dir": b"d"}


def _record(spec: ContainerSpec) -> ContainerRecord:
    return ContainerRecord(
        id="c" * 64,
        name="c",
        spec=spec,
        image_id="sha256:" + "a" * 64,
        image_ref="img",
        created="",
        argv=["sh"],
        env=[],
        workdir="/",
        user="",
        stop_signal="",
        stop_timeout=10,
    )


def test_commit_config_merges_container_and_changes() -> None:
    image = {"config": {"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "Labels": {"x": "1"}}}
    spec = ContainerSpec(image="img", cmd=["top"], env=["A=2"], labels={"y": "2"}, workdir="/w")
    config = container_config(_record(spec), image)
    assert config["Cmd"] == ["top"] and config["Env"] == ["PATH=/bin", "A=2"]
    assert config["Labels"] == {"x": "1", "y": "2"} and config["WorkingDir"] == "/w"
    changed = apply_commit_changes(["VOLUME /data /logs", 'ENTRYPOINT ["/bin/x"]'], config)
    assert changed["Volumes"] == {"/data": {}, "/logs": {}}
    assert changed["Entrypoint"] == ["/bin/x"]


@pytest.mark.usefixtures("as_root")
def test_guest_writer_refuses_a_redirected_directory(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "moved").mkdir(parents=True)
    os.setxattr(upper / "moved", "trusted.overlay.redirect", b"/etc")
    code = f"from husk.guest.agent.layer import LayerWriter; LayerWriter({str(upper)!r}).run()"
    result = subprocess.run(
        [os.environ.get("PYTHON", "python3"), "-c", code],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert result.returncode == 1 and b"overlay redirect" in result.stderr


def test_guest_writer_without_an_upper_directory_writes_an_empty_layer(tmp_path: Path) -> None:
    code = (
        "from husk.guest.agent.layer import LayerWriter;"
        f" LayerWriter({str(tmp_path / 'missing')!r}).run()"
    )
    result = subprocess.run(
        [os.environ.get("PYTHON", "python3"), "-c", code],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert result.returncode == 0
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        assert tar.getmembers() == []


def test_history_rows_as_docker_shows_them() -> None:
    from husk.cli.commit import HistoryRow

    item = {
        "Id": "sha256:" + "ab" * 32,
        "Created": 1_000_000,
        "CreatedBy": '/bin/sh -c #(nop)  CMD ["sh"]   ' + "x" * 60,
        "Size": 1_500_000,
        "Comment": "note",
    }
    row = HistoryRow(item, truncate=True, human=True, now=1_000_000 + 7200)
    assert row.ID == "ab" * 6 and row.CreatedSince == "2 hours ago"
    assert len(row.CreatedBy) == 45 and row.CreatedBy.endswith("…")
    assert row.Size == "1.5MB" and row.Comment == "note"
    full = HistoryRow({**item, "Id": "<missing>"}, truncate=False, human=False, now=0)
    assert full.ID == "<missing>" and full.Size == "1500000"
    assert full.CreatedBy == item["CreatedBy"]


def test_commit_request_parts() -> None:
    from husk.daemon.docker.commit import _reference, config_changes

    assert _reference("repo", "v1") == "repo:v1" and _reference("repo", "") == "repo"
    assert _reference("", "") is None
    with pytest.raises(InvalidArgument):
        _reference("", "v1")
    assert config_changes({"Cmd": ["x"], "Env": None, "Hostname": "h", "Labels": {}}) == {
        "Cmd": ["x"]
    }
