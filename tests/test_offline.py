"""Stopped containers' files and the writable layer's size, without VMs.

The host-side checks of a guest's list of changes, the export stream passed through
untouched, a hostile guest's answers to ``diff`` refused cleanly (a fake agent
behind the real runtime and Docker API), the guest's walk of an overlay upper
directory and its export of a root, and ``--storage-opt size=`` parsing.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import stat
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import fake_agent
from fake_agent import json_frame
from fake_machine import FakeBackend
from husk import sizes
from husk.cli.createopts import build_create_request
from husk.cli.filesystem import change_lines
from husk.daemon.docker import build_app
from husk.daemon.docker.create_config import inspect_fields, spec_from_create
from husk.errors import GuestError, HuskError, InvalidArgument, NotFound
from husk.guest import protocol
from husk.guest.agent import archive as guest_archive
from husk.guest.agent import changes as guest_changes
from husk.guest.protocol import Frame, MsgType
from husk.runtime.changes import MAX_CHANGES, BadChanges, parse_changes
from husk.runtime.collect import OutputTooLarge
from husk.runtime.create import UPPER_DISK_BYTES
from husk.runtime.model import ContainerStatus
from husk.runtime.offline import maintenance_dir
from husk.spec import ContainerSpec
from test_launch import backend, guests, runtime_with  # noqa: F401
from test_runtime_hostile import dirs, flooding, run, running_container  # noqa: F401
from testimages import BUSYBOX_NAME

MIB = 1024 * 1024

# ------------------------------------------------------------ the list's checks


def test_a_valid_list_becomes_dockers_shape() -> None:
    data = json.dumps([["/etc", 0], ["/etc/group", 2], ["/new file", 1]]).encode()
    assert parse_changes(data) == [
        {"Path": "/etc", "Kind": 0},
        {"Path": "/etc/group", "Kind": 2},
        {"Path": "/new file", "Kind": 1},
    ]
    assert parse_changes(b"[]") == []


@pytest.mark.parametrize(
    ("data", "word"),
    [
        (b"not json", "is not JSON"),
        (b"\xff\xfe", "is not JSON"),
        (b'{"Path": "/a"}', "not a list"),
        (b'[["/a", 1, 2]]', "not [path, kind]"),
        (b'[{"Path": "/a", "Kind": 1}]', "not [path, kind]"),
        (b'[["a", 1]]', "not absolute"),
        (b'[["/", 0]]', "names the root"),
        (b'[["/a/", 0]]', "not absolute"),
        (b'[["/a/../../etc", 1]]', "not normalised"),
        (b'[["/a//b", 1]]', "not normalised"),
        (b'[["/a/./b", 1]]', "not normalised"),
        (b'[["/a\\nD /etc/passwd", 1]]', "control characters"),
        (b'[["/a\\u001b[2J", 1]]', "control characters"),
        (b"[[7, 1]]", "not text"),
        (b'[["/a", 3]]', "unknown kind"),
        (b'[["/a", true]]', "unknown kind"),
        (b'[["/a", "1"]]', "unknown kind"),
        (b'[["/a", 1], ["/a", 0]]', "twice"),
        (json.dumps([["/" + "a" * 5000, 1]]).encode(), "longer than"),
    ],
)
def test_a_bad_list_is_refused_with_what_is_wrong(data: bytes, word: str) -> None:
    with pytest.raises(BadChanges) as caught:
        parse_changes(data)
    assert word in str(caught.value)
    assert isinstance(caught.value, GuestError)


def test_too_many_changes_are_refused() -> None:
    data = json.dumps([[f"/f{i}", 1] for i in range(MAX_CHANGES + 1)]).encode()
    with pytest.raises(BadChanges, match="more than"):
        parse_changes(data)


def test_cli_prints_dockers_lines_and_escapes_paths() -> None:
    lines = change_lines([{"Path": "/a", "Kind": 1}, {"Path": "/b\x1b", "Kind": 2}])
    assert lines[0] == "A /a" and lines[1].startswith("D /b") and "\x1b" not in lines[1]
    with pytest.raises(HuskError):
        change_lines([{"Path": "/a", "Kind": 9}])


# ------------------------------------------------------ a fake guest behind the runtime


def answering(agent: Any, stdout: bytes, *, stderr: bytes = b"", code: int = 0) -> Any:
    """An ARCHIVE reply: a session that writes ``stdout`` (in pieces), ``stderr``, exits."""

    def reply(frame: Frame) -> bytes:
        wire = json_frame(MsgType.STARTED, frame.channel, {"pid": 7})
        for start in range(0, len(stdout), 1000):
            wire += protocol.encode(MsgType.STDOUT, frame.channel, stdout[start : start + 1000])
        if stderr:
            wire += protocol.encode(MsgType.STDERR, frame.channel, stderr)
        return wire + json_frame(MsgType.EXITED, frame.channel, {"code": code})

    return reply


@pytest.mark.parametrize(
    "stdout", [b'[["../../etc/shadow", 1]]', b'[["/a", 5]]', b"<html>", b'[["/x\\u0000", 1]]']
)
def test_a_hostile_guests_diff_is_refused_through_the_api(dirs: Path, stdout: bytes) -> None:  # noqa: F811
    async def body() -> None:
        async with running_container(dirs) as guest:
            guest.agent.replies[MsgType.ARCHIVE] = answering(guest.agent, stdout)
            with pytest.raises(BadChanges):
                await guest.runtime.changes(guest.record.id)
            modes = [json.loads(f.payload)["mode"] for f in guest.agent.frames_of(MsgType.ARCHIVE)]
            assert modes == ["diff"]
            app = build_app(guest.runtime)
            async with TestClient(TestServer(app)) as client:
                answer = await client.get(f"/v1.45/containers/{guest.record.id}/changes")
                assert answer.status == 500
                message = (await answer.json())["message"]
                assert "Traceback" not in message and "changes" in message, message
            # The container's connection goes on working.
            guest.agent.replies[MsgType.ARCHIVE] = answering(guest.agent, b'[["/ok", 1]]')
            assert await guest.runtime.changes(guest.record.id) == [{"Path": "/ok", "Kind": 1}]

    run(body)


def test_a_guest_flooding_its_diff_gets_an_error(dirs: Path) -> None:  # noqa: F811
    async def body() -> None:
        async with running_container(dirs) as guest:
            guest.agent.replies[MsgType.ARCHIVE] = flooding(guest.agent, MsgType.STDOUT, 40 * MIB)
            with pytest.raises(OutputTooLarge, match="list of changes"):
                await guest.runtime.changes(guest.record.id)

    run(body)


def test_a_failed_diff_says_so(dirs: Path) -> None:  # noqa: F811
    async def body() -> None:
        async with running_container(dirs) as guest:
            guest.agent.replies[MsgType.ARCHIVE] = answering(
                guest.agent, b"", stderr=b"more than 100000 changes", code=1
            )
            with pytest.raises(GuestError, match="more than 100000 changes"):
                await guest.runtime.changes(guest.record.id)

    run(body)


def test_export_is_passed_through_untouched(dirs: Path) -> None:  # noqa: F811
    payload = os.urandom(300_000)  # not even a tar: the host never reads it

    async def body() -> None:
        async with running_container(dirs) as guest:
            guest.agent.replies[MsgType.ARCHIVE] = answering(guest.agent, payload)
            received = b"".join([chunk async for chunk in guest.runtime.export(guest.record.id)])
            assert received == payload
            modes = [json.loads(f.payload) for f in guest.agent.frames_of(MsgType.ARCHIVE)]
            assert modes == [{"path": "/", "mode": "export"}]
            app = build_app(guest.runtime)
            async with TestClient(TestServer(app)) as client:
                answer = await client.get(f"/containers/{guest.record.id}/export")
                assert answer.status == 200
                assert answer.headers["Content-Type"] == "application/x-tar"
                assert await answer.read() == payload

    run(body)


def test_an_export_failing_at_once_is_a_proper_error(dirs: Path) -> None:  # noqa: F811
    async def body() -> None:
        async with running_container(dirs) as guest:
            guest.agent.replies[MsgType.ARCHIVE] = answering(
                guest.agent, b"", stderr=b"/x: Input/output error", code=1
            )
            app = build_app(guest.runtime)
            async with TestClient(TestServer(app)) as client:
                answer = await client.get(f"/containers/{guest.record.id}/export")
                assert answer.status == 400
                assert "Input/output error" in (await answer.json())["message"]

    run(body)


# ------------------------------------------------------------- the guest's side


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def test_guest_walk_lists_changes_as_docker(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "whiteouts and trusted xattrs need root (the suite runs as root)"
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for directory in ("etc", "usr/lib", "opaque/old", "bin"):
        (lower / directory).mkdir(parents=True)
    for name in ("etc/group", "etc/passwd", "etc/hostname", "bin/sh", "usr/lib/x"):
        (lower / name).write_text("image\n")
    os.symlink("/", lower / "escape")
    (upper / "etc").mkdir(parents=True)
    _whiteout(upper / "etc" / "group")
    (upper / "etc" / "passwd").write_text("changed\n")
    (upper / "etc" / "hostname").write_text("husk's own\n")
    (upper / ".dockerenv").write_text("")
    (upper / "dev").mkdir()
    (upper / "dev" / "null").write_text("")
    (upper / "new").write_text("new\n")
    (upper / "usr" / "lib").mkdir(parents=True)  # copied up, nothing else changed
    (upper / "usr" / "lib" / "y").write_text("y\n")
    (upper / "opaque").mkdir()
    os.setxattr(upper / "opaque", guest_changes.OPAQUE, b"y")
    (upper / "opaque" / "fresh").write_text("f\n")
    (upper / "escape").mkdir()  # replaces the image's link: never followed into the host
    (upper / "escape" / "tmp").write_text("t\n")
    walk = guest_changes.Walk(str(upper), str(lower))
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walk._walk(fd, "")
    finally:
        os.close(fd)
    assert walk.changes == [
        ("/escape", 0),  # a link in the image, a directory now
        ("/escape/tmp", 1),
        ("/etc", 0),
        ("/etc/group", 2),
        ("/etc/passwd", 0),
        ("/new", 1),
        ("/opaque", 2),
        ("/opaque/fresh", 1),
        ("/usr/lib", 0),
        ("/usr/lib/y", 1),
    ]
    assert parse_changes(json.dumps(walk.changes).encode())  # what the host accepts


def test_guest_export_keeps_links_and_leaves_out_kernel_trees(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for directory in ("proc/1", "dev/pts", "etc"):
        (root / directory).mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "dev" / "null").write_text("")
    os.symlink("/etc/passwd", root / "link")
    os.link(root / "etc" / "passwd", root / "hard")
    buffer = io.BytesIO()
    device = os.lstat(root).st_dev
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(os.listdir(root)):
            guest_archive._export_tree(tar, str(root / child), child, device)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"dev", "etc", "etc/passwd", "hard", "link", "proc"}
        assert members["link"].issym() and members["link"].linkname == "/etc/passwd"
        assert members["hard"].islnk() and members["hard"].linkname == "etc/passwd"
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None and passwd.read().startswith(b"root:")


# ------------------------------------------------------------ --storage-opt size=


def test_storage_sizes() -> None:
    assert sizes.parse_storage_opt(None) is None and sizes.parse_storage_opt({}) is None
    assert sizes.parse_storage_opt({"size": "64M"}) == 64 * MIB
    assert sizes.parse_storage_opt({"size": "20000001"}) == 20000768  # whole 4 KiB blocks
    for bad, word in (
        ({"size": "lots"}, "invalid storage size"),
        ({"size": "1M"}, "between 16M and 16T"),
        ({"size": "100T"}, "between 16M and 16T"),
        ({"size": 64}, "expected a string"),
        ({"quota": "1G"}, "'quota' is not supported"),
        (["size=1G"], "invalid StorageOpt"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            sizes.parse_storage_opt(bad)
        assert word in str(caught.value)


def test_storage_opt_from_cli_and_api_to_inspect() -> None:
    from test_cli_format import _options

    body = build_create_request("img", (), _options(storage_opt=("size=1G",)), attach=False).body
    assert body["HostConfig"]["StorageOpt"] == {"size": "1G"}
    for bad in (("size",), ("size=1Q",), ("driver=x",)):
        with pytest.raises(InvalidArgument):
            build_create_request("img", (), _options(storage_opt=bad), attach=False)
    spec = spec_from_create({"Image": "img", "HostConfig": {"StorageOpt": {"size": "1G"}}}, None)
    assert spec.storage_size == 1024**3
    assert inspect_fields(spec)["StorageOpt"] == {"size": str(1024**3)}
    assert "StorageOpt" not in inspect_fields(spec_from_create({"Image": "img"}, None))
    with pytest.raises(InvalidArgument, match="not supported"):
        spec_from_create({"Image": "img", "HostConfig": {"StorageOpt": {"x": "1"}}}, None)


# --------------------------------------------- the maintenance VM (fake machines)


class Maintenance:
    """The fake guest of maintenance VMs: records PREPARE bodies, answers each ARCHIVE."""

    def __init__(self) -> None:
        self.prepared: list[dict[str, Any]] = []
        self.archives: list[dict[str, Any]] = []
        self.mounts: list[dict[str, Any]] = []
        self.answer = b"[]"

    def reply(self, frame: Frame) -> bytes:
        if frame.type is MsgType.PREPARE:
            self.prepared.append(json.loads(frame.payload))
        if frame.type is MsgType.MOUNT:
            self.mounts.append(json.loads(frame.payload))
        if frame.type is MsgType.ARCHIVE:
            self.archives.append(json.loads(frame.payload))
            started = json_frame(MsgType.STARTED, frame.channel, {"pid": 9})
            out = protocol.encode(MsgType.STDOUT, frame.channel, self.answer)
            return started + out + json_frame(MsgType.EXITED, frame.channel, {"code": 0})
        return original_reply(frame)


original_reply = fake_agent.default_reply


def test_a_created_containers_files_come_from_a_maintenance_vm_that_ends(
    guests: Any,  # noqa: F811
    backend: FakeBackend,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guest = Maintenance()
    monkeypatch.setattr(fake_agent, "default_reply", guest.reply)

    async def body() -> None:
        runtime, _ = await runtime_with(backend, tmp_path)
        record = await runtime.create(ContainerSpec(image=BUSYBOX_NAME, cmd=["true"]))
        upper = runtime.containers.directory(record.id) / "upper.ext4"
        guest.answer = b'[["/copied", 1]]'
        assert await runtime.changes(record.id) == [{"Path": "/copied", "Kind": 1}]
        machine = backend.created[-1]
        assert [d.path for d in machine.config.disks][1] == upper
        assert machine.config.egress is False and not machine.config.shares
        assert guest.prepared[-1]["maintenance"] is True
        assert guest.archives == [{"path": "/", "mode": "diff"}]
        assert not machine.running and not maintenance_dir(record.id).exists()
        assert runtime.get(record.id).state.status is ContainerStatus.CREATED

        # A start waits for the maintenance VM (the container's lock is held).
        container = runtime.container(record.id)
        async with container.lock:
            waiting = asyncio.ensure_future(runtime.changes(record.id))
            await asyncio.sleep(0.2)
            assert not waiting.done() and len(backend.created) == 1
        await waiting

        # cp into a container whose writable disk is missing makes it (its start's disk).
        upper.unlink()

        async def tar() -> AsyncIterator[bytes]:
            yield b""

        await runtime.put_archive(record.id, "/", tar())
        assert upper.stat().st_size == UPPER_DISK_BYTES
        assert [d.path for d in backend.created[-1].config.disks][1] == upper

        # Removed while a copy waited: no VM, a clear NotFound.
        async with container.lock:
            waiting = asyncio.ensure_future(runtime.changes(record.id))
            await asyncio.sleep(0.1)
            shutil.rmtree(runtime.containers.directory(record.id))
        with pytest.raises(NotFound):
            await waiting

    run(body)


def test_a_maintenance_vm_left_by_a_dead_daemon_is_ended_at_startup(
    backend: FakeBackend,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from husk.runtime import recovery
    from husk.sandbox.provisioner import Provisioner

    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    left = maintenance_dir("0123456789abcdef" * 4)
    left.mkdir(parents=True)
    other = left.parent / "not-a-vm"
    other.mkdir()
    registry = SimpleNamespace(live={}, store=SimpleNamespace(all=list))
    recovery.end_orphan_vms(registry, Provisioner(backend))  # type: ignore[arg-type]
    assert not left.exists() and other.exists()


def test_a_guest_that_never_lists_its_changes_meets_a_deadline(
    dirs: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from husk.runtime import offline

    monkeypatch.setattr(offline, "ANSWER_DEADLINE", 0.3)

    async def body() -> None:
        async with running_container(dirs) as guest:
            # The fake agent's default: the session starts and never says more.
            with pytest.raises(GuestError, match="did not answer the changes within"):
                await guest.runtime.changes(guest.record.id)
            for _ in range(100):  # the fake agent reads the host's frames on its own thread
                signals = [json.loads(f.payload) for f in guest.agent.frames_of(MsgType.SIGNAL)]
                if signals:
                    break
                await asyncio.sleep(0.05)
            assert {"signal": 9} in signals  # the session was ended in the guest

    run(body)


def test_a_stopped_containers_binds_are_mounted_and_a_read_only_root_refuses_copies(
    guests: Any,  # noqa: F811
    backend: FakeBackend,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from husk.runtime.offline import check_writable
    from husk.spec import BindMount

    guest = Maintenance()
    monkeypatch.setattr(fake_agent, "default_reply", guest.reply)
    shared = tmp_path / "shared"
    shared.mkdir()

    async def body() -> None:
        runtime, _ = await runtime_with(backend, tmp_path)
        binds = [BindMount(source=str(shared), target="/data")]
        spec = ContainerSpec(image=BUSYBOX_NAME, cmd=["true"], binds=binds, read_only=True)
        record = await runtime.create(spec)

        async def tar() -> AsyncIterator[bytes]:
            yield b""

        with pytest.raises(InvalidArgument, match="container rootfs is marked read-only"):
            await runtime.put_archive(record.id, "/etc", tar())
        assert not backend.created  # refused before any VM
        await runtime.put_archive(record.id, "/data/sub/..", tar())
        machine = backend.created[-1]
        assert [(s.tag, s.path) for s in machine.config.shares] == [("bind0", shared)]
        bind = {"fstype": "9p", "source": "bind0", "target": "/data", "readonly": False}
        assert guest.mounts == [bind]

    run(body)
    check_writable(ContainerSpec(image="x"), "/etc")  # a writable root takes anything
