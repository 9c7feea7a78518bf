"""A named volume shared by containers in turn, with real VMs: what one container writes
in it, a second (started after the first is gone) reads; the volume outlives both."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    RunningDaemon,
    daemon_busybox,
    husk_daemon,
    registry,
    registry_busybox,
)

pytestmark = [pytest.mark.vm, pytest.mark.registry]


@pytest.mark.timeout(900)
def test_a_named_volume_outlives_its_writer_and_is_read_by_the_next(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    d = husk_daemon
    since = str(int(time.time()) - 1)
    try:
        d.docker(
            "run", "--rm", "-v", "vmdata:/data", daemon_busybox, "sh", "-c", "echo hi > /data/f"
        )
        assert "vmdata" in d.docker("volume", "ls", "-q").stdout.decode().split()
        read = d.docker("run", "--rm", "-v", "vmdata:/data:ro", daemon_busybox, "cat", "/data/f")
        assert read.stdout == b"hi\n"
        refused = d.docker(
            "run", "--rm", "-v", "vmdata:/data:ro", daemon_busybox, "sh", "-c", "echo x > /data/g",
            check=False,
        )  # fmt: skip
        assert refused.returncode != 0 and b"Read-only" in refused.stderr + refused.stdout
        before = set(d.docker("volume", "ls", "-q").stdout.decode().split())
        d.docker("run", "--rm", "-v", "/scratch", daemon_busybox, "touch", "/scratch/x")
        husk = [sys.executable, "-c", "from husk.cli.main import main; main()"]
        ran = subprocess.run(
            [*husk, "run", "--rm", "-v", "/scratch", daemon_busybox, "true"],
            env=d.env,
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert ran.returncode == 0, ran.stderr
        # --rm (docker's and husk's) takes the anonymous volumes with the container.
        assert set(d.docker("volume", "ls", "-q").stdout.decode().split()) == before
        until = str(int(time.time()) + 1)
        events = d.docker(
            "events", "--since", since, "--until", until, "--filter", "type=volume",
            "--format", "{{.Action}} {{.Actor.ID}} {{index .Actor.Attributes \"destination\"}}",
        ).stdout.decode().splitlines()  # fmt: skip
        assert events.count("mount vmdata /data") == 3, events
        mountpoint = d.docker("volume", "inspect", "-f", "{{.Mountpoint}}", "vmdata").stdout
        assert (Path(mountpoint.decode().strip()) / "f").read_text() == "hi\n"
    finally:
        d.docker("volume", "rm", "-f", "vmdata", check=False)


@pytest.mark.timeout(900)
def test_a_container_filling_a_sized_volume_gets_enospc_and_the_host_keeps_its_disk(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    d = husk_daemon
    try:
        d.docker("volume", "create", "--opt", "size=16M", "capped")
        inspect = d.docker("volume", "inspect", "-f", "{{json .Options}}", "capped").stdout
        assert inspect.strip() == b'{"size":"16M"}'
        fill = "dd if=/dev/zero of=/data/big bs=1M count=64; echo dd=$?; sync; du -m /data/big"
        ran = d.docker("run", "--rm", "-v", "capped:/data", daemon_busybox, "sh", "-c", fill)
        text = (ran.stdout + ran.stderr).decode()
        assert "No space left on device" in text and "dd=1" in text, text
        mountpoint = Path(
            d.docker("volume", "inspect", "-f", "{{.Mountpoint}}", "capped").stdout.decode().strip()
        )
        disk = mountpoint.parent / "disk.ext4"
        assert disk.stat().st_blocks * 512 <= 16 * 1024 * 1024
        # The volume is still a volume: freed room can be used again by the next container.
        again = "rm /data/big && echo small > /data/f && cat /data/f"
        ran = d.docker("run", "--rm", "-v", "capped:/data", daemon_busybox, "sh", "-c", again)
        assert ran.stdout == b"small\n"
        refused = d.docker("volume", "create", "--opt", "size=huge", "capped2", check=False)
        assert refused.returncode != 0 and b"invalid volume size" in refused.stderr
    finally:
        d.docker("volume", "rm", "-f", "capped", check=False)
    assert "capped" not in Path("/proc/self/mounts").read_text()
