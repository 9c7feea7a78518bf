"""A daemon killed outright leaves its VMs running; the next daemon re-attaches to them."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_fixtures import RunningDaemon, kill_leftover_vms, short_root, start_daemon

pytestmark = pytest.mark.vm

HUSK = [sys.executable, "-c", "from husk.cli.main import main; main()"]


def husk(
    daemon: RunningDaemon, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HUSK, *args], env=daemon.env, capture_output=True, text=True, timeout=timeout
    )


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^line (\d+)$", text, re.MULTILINE)]


def test_daemon_restart_keeps_containers_logs_and_exec(guest_bundle: object) -> None:
    root = short_root()
    daemon = start_daemon(root, templates_from_session=True)
    try:
        env = daemon.env
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("testimages.py")), "busybox"],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        started = husk(
            daemon,
            "run",
            "-d",
            "--name",
            "counter",
            "husk.local/busybox:latest",
            "sh",
            "-c",
            "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.02; done",
        )
        assert started.returncode == 0, started.stderr
        time.sleep(1.5)
        before = numbers(husk(daemon, "logs", "counter").stdout)
        assert before[:3] == [0, 1, 2]
        qemu_pid = int(husk(daemon, "inspect", "-f", "{{.State.Pid}}", "counter").stdout)

        os.kill(daemon.process.pid, signal.SIGKILL)  # no chance to clean up
        daemon.process.wait(10)
        os.kill(qemu_pid, 0)  # the VM survived its daemon
        time.sleep(1.0)  # the guest keeps producing output with no host attached

        daemon = start_daemon(root)
        ps = husk(daemon, "ps", "--format", "{{.Names}} {{.Status}}")
        assert ps.returncode == 0, ps.stderr
        assert re.search(r"^counter Up", ps.stdout, re.MULTILINE), ps.stdout
        assert int(husk(daemon, "inspect", "-f", "{{.State.Pid}}", "counter").stdout) == qemu_pid

        follow = subprocess.Popen(
            [*HUSK, "logs", "-f", "counter"], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            time.sleep(2.0)
            execd = husk(daemon, "exec", "counter", "echo", "exec after restart")
            assert execd.returncode == 0 and execd.stdout == "exec after restart\n"
            stop = husk(daemon, "stop", "-t", "1", "counter")
            assert stop.returncode == 0, stop.stderr
            out, _ = follow.communicate(timeout=60)
        finally:
            follow.kill()
        seen = numbers(out)
        # Nothing lost: one unbroken sequence across the restart, past what we saw before it.
        assert seen == list(range(len(seen)))
        assert len(seen) > len(before) + 20
        assert husk(daemon, "inspect", "-f", "{{.State.Status}}", "counter").stdout.strip() == (
            "exited"
        )
        assert husk(daemon, "rm", "counter").returncode == 0
    finally:
        daemon.remove_all_containers()
        daemon.stop()
        kill_leftover_vms(root)
        shutil.rmtree(root, ignore_errors=True)


def test_a_paused_container_stays_paused_across_a_daemon_restart(guest_bundle: object) -> None:
    """Before: its agent could not answer the new daemon (the guest was paused), so the
    container was marked exited while its VM ran on, paused, with nobody managing it."""
    root = short_root()
    daemon = start_daemon(root, templates_from_session=True)
    try:
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("testimages.py")), "busybox"],
            env=daemon.env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        loop = "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.1; done"
        started = husk(
            daemon, "run", "-d", "--name", "napper", "husk.local/busybox:latest", "sh", "-c", loop
        )
        assert started.returncode == 0, started.stderr
        time.sleep(1.0)
        assert husk(daemon, "pause", "napper").returncode == 0
        qemu_pid = int(husk(daemon, "inspect", "-f", "{{.State.Pid}}", "napper").stdout)
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait(10)

        daemon = start_daemon(root)
        status = husk(daemon, "inspect", "-f", "{{.State.Status}} {{.State.Pid}}", "napper")
        assert status.stdout.split() == ["paused", str(qemu_pid)], (status, daemon.log()[-2000:])
        before = numbers(husk(daemon, "logs", "napper").stdout)
        time.sleep(1.0)
        assert numbers(husk(daemon, "logs", "napper").stdout) == before  # still paused
        assert husk(daemon, "unpause", "napper").returncode == 0
        time.sleep(2.0)
        after = numbers(husk(daemon, "logs", "napper").stdout)
        assert after == list(range(len(after))) and len(after) > len(before)
        assert husk(daemon, "exec", "napper", "echo", "awake").stdout == "awake\n"
        assert husk(daemon, "rm", "-f", "napper").returncode == 0
    finally:
        daemon.remove_all_containers()
        daemon.stop()
        kill_leftover_vms(root)
        shutil.rmtree(root, ignore_errors=True)
