"""Mounts at start without a VM: the host's decisions (directory or file, hard link or
copy, the errors), the guest's copy-up on this host's file system, and the MOUNT
requests a start sends (through the real Launcher on a fake machine)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fake_agent
from fake_machine import FakeBackend
from husk.errors import StartFailed
from husk.guest.agent import copyup
from husk.guest.protocol import Frame, MsgType
from husk.runtime import mounts
from husk.runtime.mounts import COPY_UP_TIMEOUT, FILE_SHARES, NEW_VOLUME_OWNER, plan_mounts
from husk.runtime.runtime import Runtime
from husk.runtime.store import RECORD
from husk.sandbox.provisioner import Provisioner
from husk.spec import BindMount, ContainerSpec, TmpfsMount
from husk.vm.qemu_argv import MAPPED_OWNER_XATTR
from testimages import BUSYBOX_NAME, install_busybox_image

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="sets owners and makes device nodes")


def spec(*binds: BindMount, tmpfs: list[TmpfsMount] | None = None) -> ContainerSpec:
    return ContainerSpec(image="busybox", binds=list(binds), tmpfs=tmpfs or [])


# -- host: what each bind becomes ----------------------------------------------------------


def test_a_directory_is_shared_as_it_is_and_a_new_volume_is_roots(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    volume = tmp_path / "volume"
    volume.mkdir()
    plan = plan_mounts(
        spec(
            BindMount(str(data), "/data", readonly=True),
            BindMount(str(volume), "/vol", volume="v", copy_up=True, readonly=True),
        ),
        tmp_path / "container",
    )
    assert [(s.tag, s.path, s.readonly) for s in plan.shares] == [
        ("bind0", data, True),
        # A copy-up writes into the share first: writable for the VM, sealed by the guest.
        ("bind1", volume, False),
    ]
    assert [r.body for r in plan.requests] == [
        {"fstype": "9p", "source": "bind0", "target": "/data", "readonly": True},
        {
            "fstype": "9p",
            "source": "bind1",
            "target": "/vol",
            "readonly": True,
            "root_owner": NEW_VOLUME_OWNER,
            "copy_up": True,
        },
    ]
    assert plan.requests[1].timeout == COPY_UP_TIMEOUT > plan.requests[0].timeout


def test_a_volume_a_guest_already_owns_keeps_its_owner(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    try:
        os.setxattr(volume, MAPPED_OWNER_XATTR, (1000).to_bytes(4, "little"))
    except OSError as exc:
        pytest.skip(f"no user xattrs here: {exc}")
    plan = plan_mounts(spec(BindMount(str(volume), "/vol", volume="v")), tmp_path / "c")
    assert "root_owner" not in plan.requests[0].body
    assert "copy_up" not in plan.requests[0].body


def test_parents_are_mounted_before_children_binds_and_tmpfs_alike(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plan = plan_mounts(
        spec(
            BindMount(str(tmp_path / "a"), "/srv/data/inner"),
            BindMount(str(tmp_path / "b"), "/srv"),
            tmpfs=[TmpfsMount("/srv/data", size=1 << 20)],
        ),
        tmp_path / "c",
    )
    assert [r.target for r in plan.requests] == ["/srv", "/srv/data", "/srv/data/inner"]
    assert [s.tag for s in plan.shares] == ["bind0", "bind1"]  # tags stay the binds' order


def test_a_file_is_shared_by_a_hard_link_in_a_private_directory(tmp_path: Path) -> None:
    host = tmp_path / "nginx.conf"
    host.write_text("worker_processes 1;\n")
    link = tmp_path / "link.conf"
    link.symlink_to(host)  # resolved as the daemon, as Docker does: the file is linked
    container = tmp_path / "container"
    plan = plan_mounts(spec(BindMount(str(link), "/etc/nginx/nginx.conf")), container)
    [share] = plan.shares
    assert share.path == container / FILE_SHARES / "bind0" and not share.readonly
    assert plan.requests[0].body["file"] == "nginx.conf"
    shared = share.path / "nginx.conf"
    assert not shared.is_symlink() and shared.stat().st_ino == host.stat().st_ino
    assert stat.S_IMODE(share.path.stat().st_mode) == 0o700
    # A later start links the file the name holds then (an editor may have replaced it).
    host.unlink()
    host.write_text("replaced\n")
    plan_mounts(spec(BindMount(str(link), "/etc/nginx/nginx.conf")), container)
    assert shared.read_text() == "replaced\n"
    assert shared.stat().st_ino == host.stat().st_ino


@needs_root
def test_the_private_directory_is_the_files_owners(tmp_path: Path) -> None:
    """The jail maps the share directory's owner to the VM's uid: as the file's owner,
    QEMU can read and write the user's file."""
    host = tmp_path / "user.conf"
    host.write_text("x")
    os.chown(host, 1234, 5678)
    plan = plan_mounts(spec(BindMount(str(host), "/etc/user.conf")), tmp_path / "c")
    owner = plan.shares[0].path.stat()
    assert (owner.st_uid, owner.st_gid) == (1234, 5678)


def _no_hard_links(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(mounts.os, "link", refuse)


def test_without_a_hard_link_a_read_only_file_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = tmp_path / "app.conf"
    host.write_text("copied\n")
    host.chmod(0o640)
    _no_hard_links(monkeypatch, errno.EXDEV)
    plan = plan_mounts(spec(BindMount(str(host), "/app.conf", readonly=True)), tmp_path / "c")
    shared = plan.shares[0].path / "app.conf"
    assert shared.read_text() == "copied\n"
    assert shared.stat().st_ino != host.stat().st_ino
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    assert plan.shares[0].readonly and plan.requests[0].body["readonly"] is True


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.EXDEV, "on another file system than husk's container directory"),
        (errno.EPERM, "protected_hardlinks"),
    ],
)
def test_without_a_hard_link_a_read_write_file_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
) -> None:
    host = tmp_path / "app.conf"
    host.write_text("x")
    _no_hard_links(monkeypatch, code)
    with pytest.raises(StartFailed) as raised:
        plan_mounts(spec(BindMount(str(host), "/app.conf")), tmp_path / "c")
    message = str(raised.value)
    assert f"cannot bind the file {host} read-write" in message and reason in message
    assert "read-only (:ro)" in message and "\n" not in message


def test_a_file_on_another_file_system_for_real(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to bind from")
    host = shm / f"husk-test-mounts-{os.getpid()}.conf"
    host.write_text("on tmpfs\n")
    try:
        with pytest.raises(StartFailed, match="on another file system"):
            plan_mounts(spec(BindMount(str(host), "/x.conf")), tmp_path / "c")
        plan = plan_mounts(spec(BindMount(str(host), "/x.conf", readonly=True)), tmp_path / "c")
        assert (plan.shares[0].path / host.name).read_text() == "on tmpfs\n"
    finally:
        host.unlink()


def test_missing_and_unshareable_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StartFailed, match="bind source path does not exist: /no/such"):
        plan_mounts(spec(BindMount("/no/such", "/x")), tmp_path / "c")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StartFailed, match="neither a directory nor a regular file"):
        plan_mounts(spec(BindMount(str(fifo), "/x")), tmp_path / "c")


# -- guest: copy-up on this host ---------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    source = tmp_path / "image-dir"
    destination = tmp_path / "share"
    source.mkdir()
    destination.mkdir()
    yield source, destination


def copy(source: Path, destination: Path) -> copyup.CopyStats:
    flags = os.O_RDONLY | os.O_DIRECTORY
    src, dst = os.open(source, flags), os.open(destination, flags)
    try:
        return copyup.copy_tree(src, dst)
    finally:
        os.close(src)
        os.close(dst)


@needs_root
def test_copy_up_keeps_owners_modes_links_times_and_special_files(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    source, destination = pair
    os.chown(source, 1000, 1000)
    source.chmod(0o750)
    (source / "owned.txt").write_text("image data\n")
    os.chown(source / "owned.txt", 1000, 1001)
    (source / "owned.txt").chmod(0o640)
    os.link(source / "owned.txt", source / "hard")
    (source / "suid").write_text("s")
    (source / "suid").chmod(0o4755)
    (source / "sub" / "deeper").mkdir(parents=True)
    (source / "sub" / "deeper" / "f").write_text("deep")
    (source / "sub").chmod(0o500)  # read-only directory: its children are still copied
    (source / "rel").symlink_to("owned.txt")
    (source / "abs").symlink_to("/etc/shadow")
    os.lchown(source / "abs", 7, 8)
    os.mkfifo(source / "pipe")
    (source / "pipe").chmod(0o620)
    os.mknod(source / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.utime(source / "owned.txt", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))

    stats = copy(source, destination)

    def facts(path: Path) -> tuple[int, int, int]:
        info = path.lstat()
        return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)

    assert facts(destination) == (1000, 1000, 0o750)
    assert facts(destination / "owned.txt") == (1000, 1001, 0o640)
    assert (destination / "owned.txt").read_text() == "image data\n"
    assert (destination / "owned.txt").stat().st_mtime == 1_600_000_000
    assert (destination / "hard").stat().st_ino == (destination / "owned.txt").stat().st_ino
    assert facts(destination / "suid")[2] == 0o4755
    assert facts(destination / "sub")[2] == 0o500
    assert (destination / "sub" / "deeper" / "f").read_text() == "deep"
    assert os.readlink(destination / "rel") == "owned.txt"
    assert os.readlink(destination / "abs") == "/etc/shadow"
    assert facts(destination / "abs")[:2] == (7, 8)
    assert stat.S_ISFIFO((destination / "pipe").lstat().st_mode)
    assert facts(destination / "pipe")[2] == 0o620
    null = (destination / "null").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stats.entries == 10 and stats.skipped == []


def test_copy_up_never_follows_a_symlink_out_of_either_tree(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    source, destination = pair
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    # Links to directories outside: copied as links, never descended into.
    (source / "up").symlink_to("../outside")
    (source / "abs").symlink_to(str(outside))
    copy(source, destination)
    assert (destination / "up").is_symlink() and (destination / "abs").is_symlink()
    assert sorted(os.listdir(outside)) == ["secret"]  # nothing written there either


def test_copy_up_makes_holes_of_zeros_and_keeps_the_size(pair: tuple[Path, Path]) -> None:
    source, destination = pair
    with open(source / "sparse", "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
        fh.seek(32 * 1024 * 1024)
        fh.write(b"middle")
    stats = copy(source, destination)
    copied = destination / "sparse"
    assert copied.stat().st_size == 64 * 1024 * 1024
    assert copied.stat().st_blocks * 512 < 4 * 1024 * 1024
    with open(copied, "rb") as fh:
        fh.seek(32 * 1024 * 1024)
        assert fh.read(6) == b"middle"
    assert stats.bytes <= 256 * 1024


def test_copy_up_refuses_a_tree_deeper_than_the_bound(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, destination = pair
    monkeypatch.setattr(copyup, "MAX_DEPTH", 3)
    (source / "a" / "b" / "c" / "d").mkdir(parents=True)
    with pytest.raises(copyup.CopyError, match="nested deeper than 3"):
        copy(source, destination)


def test_copy_up_leaves_names_another_copier_made(pair: tuple[Path, Path]) -> None:
    source, destination = pair
    (source / "f").write_text("image")
    (source / "g").write_text("image")
    (destination / "f").write_text("theirs")
    stats = copy(source, destination)
    assert (destination / "f").read_text() == "theirs"
    assert (destination / "g").read_text() == "image"
    assert stats.skipped == ["f"]


@needs_root
def test_copy_up_stays_on_the_source_file_system(pair: tuple[Path, Path]) -> None:
    source, destination = pair
    (source / "mnt").mkdir()
    (source / "kept").write_text("k")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(source / "mnt")], check=True)
    try:
        (source / "mnt" / "other-fs").write_text("not the image's")
        stats = copy(source, destination)
    finally:
        subprocess.run(["umount", str(source / "mnt")], check=True)
    assert sorted(os.listdir(destination)) == ["kept"]
    assert stats.skipped == ["mnt"]


def test_is_empty(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert copyup.is_empty(fd)
        (tmp_path / "x").touch()
        assert not copyup.is_empty(fd)
    finally:
        os.close(fd)


# -- a start through the real Launcher on a fake machine -----------------------------------


@pytest.fixture
def mount_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Frame]]:
    """The MOUNT frames the fake agent receives (it answers RUN with a running workload)."""
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HUSK_ACCEL", "tcg")
    monkeypatch.setenv("HUSK_NO_TEMPLATE", "1")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("vmlinux", "initrd"):
        (bundle / name).write_bytes(b"fake")
    monkeypatch.setenv("HUSK_KERNEL", str(bundle / "vmlinux"))
    monkeypatch.setenv("HUSK_INITRD", str(bundle / "initrd"))
    frames: list[Frame] = []
    original = fake_agent.default_reply

    def reply(frame: Frame) -> bytes:
        if frame.type is MsgType.MOUNT:
            frames.append(frame)
        return original(frame)

    monkeypatch.setattr(fake_agent, "default_reply", reply)
    yield frames
    from husk.network.switchclient import stop_switch

    stop_switch(tmp_path / "run")  # the runtime's network switch, started in this run dir


def test_a_start_sends_the_mounts_and_clears_copy_up_in_the_saved_record(
    mount_frames: list[Frame], tmp_path: Path
) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    config = tmp_path / "app.conf"
    config.write_text("x")

    async def body() -> None:
        backend = FakeBackend()
        runtime = Runtime(provisioner=Provisioner(backend))
        try:
            install_busybox_image(runtime.images, workdir=tmp_path)
            record = await runtime.create(
                ContainerSpec(
                    image=BUSYBOX_NAME,
                    cmd=["sleep", "1"],
                    binds=[
                        # a new named volume (made at create, empty): copied up once
                        BindMount("", "/data", volume="appdata", copy_up=True),
                        BindMount(str(config), "/etc/app.conf", readonly=True),
                    ],
                )
            )
            await runtime.start(record.id)
            saved = json.loads((runtime.containers.directory(record.id) / RECORD).read_text())
            assert [b["copy_up"] for b in saved["spec"]["binds"]] == [False, False]
            assert not runtime.get(record.id).spec.binds[0].copy_up
            await runtime.remove(record.id, force=True)
        finally:
            await runtime.shutdown()
            backend.close()

    asyncio.run(asyncio.wait_for(body(), 60))
    bodies = [json.loads(frame.payload) for frame in mount_frames]
    assert bodies == [
        {
            "fstype": "9p",
            "source": "bind0",
            "target": "/data",
            "readonly": False,
            "root_owner": NEW_VOLUME_OWNER,
            "copy_up": True,
        },
        {
            "fstype": "9p",
            "source": "bind1",
            "target": "/etc/app.conf",
            "readonly": True,
            "file": "app.conf",
        },
    ]


# -- guest: MOUNT bodies refused before anything is mounted --------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"source": "../etc"}, "needs the share's tag"),
        ({"source": ".."}, "needs the share's tag"),
        ({"file": "../passwd"}, "invalid file name"),
        ({"file": ".."}, "invalid file name"),
        ({"root_owner": [0, 0]}, "root_owner must be"),
        ({"root_owner": [0, -1, 0o755]}, "root_owner must be"),
        ({"root_owner": [True, 0, 0o755]}, "root_owner must be"),
        ({"target": "/data/../etc"}, "without '..'"),
    ],
)
def test_the_agent_refuses_bad_mount_bodies(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], message: str
) -> None:
    from husk.guest.agent import container_root
    from husk.guest.agent.system import SystemError_

    monkeypatch.setattr(container_root.os.path, "ismount", lambda path: True)

    def no_mounts(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing may be mounted for a bad body")

    monkeypatch.setattr(container_root, "mount", no_mounts)
    body = {"fstype": "9p", "source": "bind0", "target": "/data", **extra}
    with pytest.raises(SystemError_, match=message):
        container_root.mount_into_root(body)
