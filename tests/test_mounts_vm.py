"""Mounts at start in real VMs: copy-up into a new volume, single-file binds, a read-only
root with writable mounts, a non-root user writing to its volume.

The volume is simulated as the runtime sees one (a ``BindMount`` with ``volume`` and
``copy_up`` set on an empty host directory): how it came to be (``-v name:/path``) is
the volumes slice's; what happens at start is the same.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from daemon_fixtures import RunningDaemon, daemon_busybox, husk_daemon  # noqa: F401 - fixtures
from husk.runtime.runtime import Runtime
from husk.runtime.store import RECORD
from husk.spec import BindMount, ContainerSpec, parse_tmpfs
from husk.vm.qemu_argv import MAPPED_OWNER_XATTR
from testimages import (
    ImageSpec,
    Layer,
    LayoutWriter,
    busybox_entries,
    directory,
    file,
    hardlink,
    symlink,
)

pytestmark = pytest.mark.vm

IMAGE = "husk.local/mounts-test:latest"
DEADLINE = 420.0


@pytest.fixture(scope="module")
def mounts_image(guest_bundle: object, tmp_path_factory: pytest.TempPathFactory) -> str:
    """busybox, plus /data made for the user husk (1000) with files, links and a setuid
    file, and /etc/app/app.conf."""
    from husk.oci.archive import load_path
    from husk.oci.store import ImageStore

    entries = [
        *busybox_entries(),
        directory("data", 0o750, 1000, 1000),
        file("data/owned.txt", "image data\n", 0o640, 1000, 1000),
        directory("data/sub", 0o700, 1000, 1000),
        file("data/sub/deep.txt", "deep\n", 0o600, 1000, 1000),
        symlink("data/link", "owned.txt"),
        symlink("data/escape", "/etc/passwd"),
        hardlink("data/hard", "data/owned.txt"),
        file("data/suid", "s\n", 0o4755),
        directory("etc/app"),
        file("etc/app/app.conf", "from image\n"),
    ]
    layout = tmp_path_factory.mktemp("mounts-image") / "layout"
    writer = LayoutWriter(layout)
    writer.tag(writer.image(ImageSpec(layers=[Layer(entries, "gzip")])), "latest")
    load_path(layout, store=ImageStore(), name=IMAGE)
    shutil.rmtree(layout, ignore_errors=True)
    return IMAGE


def with_runtime(body: Callable[[Runtime], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        runtime = Runtime()
        before = {r.id for r in runtime.list(all=True)}
        try:
            return await asyncio.wait_for(body(runtime), DEADLINE)
        finally:
            for record in runtime.list(all=True):
                if record.id not in before:
                    await runtime.remove(record.id, force=True)
            await runtime.shutdown()

    return asyncio.run(main())


async def sh(runtime: Runtime, ref: str, script: str) -> tuple[int, str]:
    code, out, err = await runtime.exec_simple(ref, ["sh", "-c", script], timeout=120)
    return code, (out + err).decode()


@pytest.mark.timeout(900)
def test_volume_copy_up_file_binds_and_read_only_root(mounts_image: str, tmp_path: Path) -> None:
    ro_file = tmp_path / "app.conf"
    ro_file.write_text("from host\n")
    rw_file = tmp_path / "rw.conf"
    rw_file.write_text("before\n")

    async def body(runtime: Runtime) -> None:
        record = await runtime.create(
            ContainerSpec(
                image=mounts_image,
                cmd=["sleep", "600"],
                read_only=True,
                binds=[
                    BindMount("", "/data", volume="v1", copy_up=True),
                    BindMount(str(ro_file), "/etc/app/app.conf", readonly=True),
                    BindMount(str(rw_file), "/etc/new/rw.conf"),
                    # Mounted before the file bind inside it (parents first), copied up
                    # although read-only.
                    BindMount("", "/etc/app", readonly=True, volume="v3", copy_up=True),
                ],
                tmpfs=[parse_tmpfs("/scratch:size=8m,mode=1770")],
            )
        )
        # The named volumes were made at create: their directories in husk's data dir.
        volume = Path(record.spec.binds[0].source)
        app = Path(record.spec.binds[3].source)
        await runtime.start(record.id)
        # Copied once: the record no longer asks for it (and says so on disk).
        assert [b.copy_up for b in runtime.get(record.id).spec.binds] == [False] * 4
        saved = json.loads((runtime.containers.directory(record.id) / RECORD).read_text())
        assert [b["copy_up"] for b in saved["spec"]["binds"]] == [False] * 4

        # Copy-up: the image's files, owners, modes and links, in the volume.
        code, out = await sh(
            runtime,
            record.id,
            "cd /data && stat -c '%n %u %g %a' . owned.txt sub sub/deep.txt suid"
            " && readlink link && readlink escape && cat owned.txt sub/deep.txt"
            " && [ $(stat -c %i owned.txt) = $(stat -c %i hard) ] && echo hard-linked",
        )
        assert code == 0, out
        lines = out.splitlines()
        assert lines[:5] == [
            ". 1000 1000 750",
            "owned.txt 1000 1000 640",
            "sub 1000 1000 700",
            "sub/deep.txt 1000 1000 600",
            "suid 0 0 4755",
        ], out
        assert lines[5:] == ["owned.txt", "/etc/passwd", "image data", "deep", "hard-linked"], out
        assert (volume / "owned.txt").read_text() == "image data\n"
        assert (volume / "sub" / "deep.txt").read_text() == "deep\n"
        assert os.stat(volume / "owned.txt").st_ino == os.stat(volume / "hard").st_ino
        # On the host: plain files of the volume's owner; the guest's owners live in
        # 9p's mapped-xattr attributes (no host privilege was needed to chown).
        host_view = os.stat(volume / "owned.txt")
        assert (host_view.st_uid, stat.S_IMODE(host_view.st_mode)) == (0, 0o600)
        assert MAPPED_OWNER_XATTR in os.listxattr(volume / "owned.txt")

        # The image's user writes to its volume; root does too, under a read-only root.
        code, out = await sh(
            runtime,
            record.id,
            "su -s /bin/sh husk -c 'echo by-husk > /data/by-husk.txt' && echo root > /data/r"
            " && rm /data/sub/deep.txt && echo ok",
        )
        assert code == 0 and out.strip().endswith("ok"), out
        assert (volume / "by-husk.txt").read_text() == "by-husk\n"

        # Read-only root: writes refused, tmpfs (size and mode honoured) writable.
        code, out = await sh(runtime, record.id, "touch /rootfile")
        assert code != 0 and "Read-only file system" in out, out
        code, out = await sh(
            runtime,
            record.id,
            "touch /scratch/x && stat -c %a /scratch && grep ' /scratch ' /proc/mounts",
        )
        assert code == 0, out
        assert out.splitlines()[0] == "1770", out
        assert "size=8192k" in out, out

        # Single-file binds: read-only shows the host's content and refuses writes;
        # read-write writes through to the host file (same inode).
        code, out = await sh(runtime, record.id, "cat /etc/app/app.conf")
        assert (code, out) == (0, "from host\n")
        code, out = await sh(runtime, record.id, "echo changed > /etc/app/app.conf")
        assert code != 0 and "Read-only file system" in out, out
        assert ro_file.read_text() == "from host\n"
        code, out = await sh(
            runtime, record.id, "cat /etc/new/rw.conf; echo after > /etc/new/rw.conf"
        )
        assert (code, out) == (0, "before\n"), out
        assert rw_file.read_text() == "after\n"
        # The read-only volume got the image's /etc/app and refuses writes.
        assert (app / "app.conf").read_text() == "from image\n"
        code, out = await sh(runtime, record.id, "touch /etc/app/new")
        assert code != 0 and "Read-only file system" in out, out
        rw_file.write_text("from the host again\n")
        code, out = await sh(runtime, record.id, "cat /etc/new/rw.conf")
        assert out == "from the host again\n", out
        await runtime.stop(record.id, timeout=1)

        # A second container on the same volume, as the image's user: no copy again
        # (the deleted file stays deleted), its writes land; a new volume where the
        # image has nothing is root's, 0755, as Docker makes it.
        second = await runtime.create(
            ContainerSpec(
                image=mounts_image,
                user="husk",
                cmd=[
                    "sh",
                    "-c",
                    "ls /data/sub; id -u > /data/uid; stat -c '%u %g %a' /fresh;"
                    " touch /fresh/x 2>/dev/null || echo fresh-refused",
                ],
                binds=[
                    BindMount("", "/data", volume="v1", copy_up=True),
                    BindMount("", "/fresh", volume="v2", copy_up=True),
                ],
            )
        )
        await runtime.start(second.id)
        assert await runtime.wait(second.id) == 0
        logs = "".join([e.data.decode() async for e in runtime.logs(second.id)])
        assert logs.splitlines() == ["0 0 755", "fresh-refused"], logs
        assert (volume / "uid").read_text() == "1000\n"
        assert not (volume / "sub" / "deep.txt").exists()

    with_runtime(body)


@pytest.mark.timeout(600)
def test_docker_run_binds_a_single_file_beside_a_read_only_root(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The docker CLI through the real daemon: ``-v file:/etc/app.conf:ro`` shows the host
    file and refuses writes, a rw file bind writes through, ``--read-only`` refuses writes
    to the root while ``--tmpfs`` (size and mode) and a bind stay writable."""
    conf = tmp_path / "app.conf"
    conf.write_text("from host\n")
    log = tmp_path / "app.log"
    log.write_text("")
    data = tmp_path / "data"
    data.mkdir()
    script = (
        "cat /etc/app.conf; echo x 2>/dev/null > /etc/app.conf || echo conf-refused;"
        " echo logged >> /var/log/app.log; echo w > /data/w && echo data-written;"
        " touch /rootfile 2>/dev/null || echo root-refused;"
        " touch /tmp/t && stat -c %a /tmp && grep ' /tmp ' /proc/mounts"
    )
    result = husk_daemon.docker(
        "run", "--rm", "--read-only", "--tmpfs", "/tmp:size=4m,mode=1770",
        "-v", f"{conf}:/etc/app.conf:ro", "-v", f"{log}:/var/log/app.log",
        "-v", f"{data}:/data", daemon_busybox, "sh", "-c", script,
    )  # fmt: skip
    lines = result.stdout.decode().splitlines()
    assert lines[:5] == ["from host", "conf-refused", "data-written", "root-refused", "1770"]
    assert "size=4096k" in lines[5], lines
    assert conf.read_text() == "from host\n"
    assert log.read_text() == "logged\n"
    assert (data / "w").read_text() == "w\n"
