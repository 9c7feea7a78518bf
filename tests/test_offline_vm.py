"""Stopped containers' files through the real daemon, the docker CLI and docker-py.

``cp`` in and out of exited and created containers, ``export`` and ``diff`` of an
exited one: each served by a maintenance VM that boots with the container's disks.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from daemon_fixtures import RunningDaemon

pytestmark = pytest.mark.vm

CHANGES = (
    "echo new > /new && echo more >> /etc/passwd && rm /etc/group"
    " && mkdir /newdir && echo f > /newdir/f"
)


def _tar_members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {member.name: member for member in tar.getmembers()}


def test_exited_container_cp_export_diff(
    husk_daemon: RunningDaemon, daemon_busybox: str, tmp_path: Path
) -> None:
    docker = husk_daemon.docker
    docker("run", "--name", "offline1", daemon_busybox, "sh", "-c", CHANGES)
    state = json.loads(docker("inspect", "offline1").stdout)[0]["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0

    lines = docker("diff", "offline1").stdout.decode().splitlines()
    expected = ["C /etc", "D /etc/group", "C /etc/passwd", "A /new", "A /newdir", "A /newdir/f"]
    assert [line for line in lines if line in expected] == expected, lines
    # husk's own files (Docker keeps them in its init layer) are no change.
    assert not [line for line in lines if line.split()[1] in ("/etc/hostname", "/.dockerenv")]

    exported = docker("export", "offline1").stdout
    members = _tar_members(exported)
    assert "new" in members and "etc/passwd" in members and "bin/sh" in members
    assert "etc/group" not in members
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
        extracted = tar.extractfile("new")
        assert extracted is not None and extracted.read() == b"new\n"

    # Out of and into the exited container; what went in is there for the next copy out.
    docker("cp", "offline1:/newdir/f", str(tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "f\n"
    (tmp_path / "in.txt").write_text("copied in\n")
    docker("cp", str(tmp_path / "in.txt"), "offline1:/in.txt")
    docker("cp", "offline1:/in.txt", str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_text() == "copied in\n"

    # husk's own CLI: diff as docker prints it, export to a file.
    husk = [sys.executable, "-m", "husk.cli.main"]
    env = husk_daemon.env
    shown = subprocess.run([*husk, "diff", "offline1"], env=env, capture_output=True, timeout=240)
    assert shown.returncode == 0
    assert shown.stdout.decode().splitlines() == sorted([*lines, "A /in.txt"], key=lambda x: x[2:])
    target = tmp_path / "out.tar"
    subprocess.run([*husk, "export", "-o", str(target), "offline1"], env=env, timeout=240)
    assert "in.txt" in _tar_members(target.read_bytes())
    missing = subprocess.run([*husk, "diff", "nope"], env=env, capture_output=True, timeout=60)
    assert missing.returncode == 125 and b"No such container" in missing.stderr

    client = husk_daemon.client()
    try:
        container = client.containers.get("offline1")
        kinds = {change["Path"]: change["Kind"] for change in container.diff()}
        assert kinds["/new"] == 1 and kinds["/etc/group"] == 2 and kinds["/etc/passwd"] == 0
        assert kinds["/in.txt"] == 1
        chunks, stat = container.get_archive("/in.txt")
        assert stat["name"] == "in.txt"
        assert _tar_members(b"".join(chunks))["in.txt"].size == len("copied in\n")
        assert "in.txt" in _tar_members(b"".join(container.export()))
    finally:
        client.close()
    # The writable layer is intact: the container runs again and sees everything.
    docker("start", "offline1")
    docker("wait", "offline1")
    docker("rm", "offline1")


def test_created_container_gets_the_copied_file_at_start(
    husk_daemon: RunningDaemon, daemon_busybox: str, tmp_path: Path
) -> None:
    docker = husk_daemon.docker
    bound = tmp_path / "bound"
    bound.mkdir()
    docker(
        "create",
        "--name",
        "offline2",
        "-v",
        f"{bound}:/bound",
        daemon_busybox,
        "cat",
        "/copied/in.txt",
        "/bound/via-cp",
    )
    source = tmp_path / "copied"
    source.mkdir()
    (source / "in.txt").write_text("present at start\n")
    docker("cp", str(source), "offline2:/copied")
    # A bind mount's path reaches the bound directory, as with Docker.
    (tmp_path / "via-cp").write_text("through the bind\n")
    docker("cp", str(tmp_path / "via-cp"), "offline2:/bound/via-cp")
    assert (bound / "via-cp").read_text() == "through the bind\n"
    # (/bound: the mount point, made in the writable layer as at a start.)
    assert docker("diff", "offline2").stdout.decode().splitlines() == [
        "A /bound",
        "A /copied",
        "A /copied/in.txt",
    ]
    output = docker("start", "-a", "offline2").stdout.decode()
    assert output == "present at start\nthrough the bind\n"
    docker("rm", "offline2")


def test_storage_opt_size_limits_the_writable_layer(
    husk_daemon: RunningDaemon, daemon_busybox: str
) -> None:
    docker = husk_daemon.docker
    for bad, word in (("size=lots", "invalid storage size"), ("quota=1G", "not supported")):
        refused = docker("create", "--storage-opt", bad, daemon_busybox, "true", check=False)
        assert refused.returncode != 0 and word in refused.stderr.decode(), refused.stderr
    size = 64 * 1024 * 1024
    fill = "dd if=/dev/zero of=/big bs=1M count=100; echo dd=$?; sync"
    docker(
        "run", "--name", "offline3", "--storage-opt", "size=64M", daemon_busybox, "sh", "-c", fill
    )
    logs = docker("logs", "offline3")
    text = (logs.stdout + logs.stderr).decode()
    assert "No space left on device" in text and "dd=1" in text, text
    container = json.loads(docker("inspect", "offline3").stdout)[0]
    assert container["HostConfig"]["StorageOpt"] == {"size": str(size)}
    disks = list(husk_daemon.data_dir.rglob(f"{container['Id']}/upper.ext4"))
    assert len(disks) == 1
    info = disks[0].stat()
    assert info.st_size == size and info.st_blocks * 512 <= size
    docker("rm", "offline3")


def test_running_container_export_and_diff_use_its_vm(
    husk_daemon: RunningDaemon, daemon_busybox: str, tmp_path: Path
) -> None:
    docker = husk_daemon.docker
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "host-file").write_text("not exported\n")
    script = "echo live > /live && rm /etc/group && touch /ready && exec sleep 600"
    docker(
        "run",
        "-d",
        "--name",
        "offline4",
        "-v",
        f"{shared}:/mnt/shared",
        daemon_busybox,
        "sh",
        "-c",
        script,
    )
    try:
        for _ in range(120):
            if docker("exec", "offline4", "test", "-e", "/ready", check=False).returncode == 0:
                break
        lines = docker("diff", "offline4").stdout.decode().splitlines()
        assert "A /live" in lines and "D /etc/group" in lines, lines
        members = _tar_members(docker("export", "offline4").stdout)
        assert "live" in members and "etc/group" not in members
        # Only the container's layers: its /proc, /sys and bind mounts stay out.
        assert "proc" in members and not [n for n in members if n.startswith("proc/")]
        assert not [n for n in members if n.startswith("sys/")]
        assert "mnt/shared" in members and "mnt/shared/host-file" not in members
        state = json.loads(docker("inspect", "offline4").stdout)[0]["State"]
        assert state["Running"]
    finally:
        docker("rm", "-f", "offline4")
