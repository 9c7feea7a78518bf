"""The docker engine (Debian's dockerd 20.10) runs containers in husk VMs with
``--add-runtime husk=<husk-runtime>`` and ``docker run --runtime husk``.

dockerd is started by the test with its data, exec root, pid file and socket in a
temporary directory, ``--iptables=false --bridge=none``, in a mount namespace of its own
(nothing else on the host can unmount its containers' root file systems); containers
use ``--network none``. The busybox image is imported from a tar of Debian's
busybox-static. After every test nothing of husk-runtime's containers remains
(processes, sockets, VM and state directories, including those under dockerd's exec
root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_fixtures import DOCKER_CLI
from ociruntime_fixtures import (
    EgressNeighbour,
    EngineDaemon,
    assert_no_leftovers,
    busybox_tar,
    kill_processes,
    kill_shims,
    leftovers,
    mounted_in,
    run_checked,
    start_husk_egress_in,
    write_wrapper,
)

pytestmark = pytest.mark.vm

IMAGE = "localhost/husk-oci-busybox:latest"
STARTUP_DEADLINE = 60.0


class Dockerd:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.socket = work / "dockerd.sock"
        self.run_dir = Path(tempfile.mkdtemp(prefix="hr-oci-", dir="/tmp"))
        self.state_root = work / "runtime-root"
        self.wrapper = write_wrapper(work, self.run_dir, self.state_root)
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(work),
        }
        self.daemon = EngineDaemon(
            [
                # dockerd in a mount namespace of its own (its mounts private there): no
                # other process on the host can unmount its root file systems, and husk's
                # egress is started in that namespace below to show that husk's does not
                *("unshare", "--mount", "--propagation", "private"),
                "dockerd",
                "--iptables=false",
                "--bridge=none",
                "--data-root",
                str(work / "data"),
                "--exec-root",
                str(work / "exec"),
                "--pidfile",
                str(work / "dockerd.pid"),
                "-H",
                f"unix://{self.socket}",
                "--add-runtime",
                f"husk={self.wrapper}",
            ],
            work / "dockerd.log",
        )

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_checked([DOCKER_CLI, *args], env=self.env, check=check)

    def wait_ready(self) -> None:
        self.daemon.wait_ready(
            lambda: self.docker("version", check=False).returncode == 0, STARTUP_DEADLINE
        )

    @property
    def pid(self) -> int:
        """dockerd's pid (``unshare`` execs it): its mount namespace is the engine's."""
        return self.daemon.process.pid

    def stop(self) -> None:
        self.daemon.stop()

    def assert_clean(self) -> None:
        assert_no_leftovers(self._leftovers)

    def _leftovers(self) -> list[str]:
        found = leftovers(self.run_dir, self.state_root)
        found += [str(p.parent) for p in (self.work / "exec").rglob("state.json")]
        return found


@pytest.fixture(scope="module")
def engine(guest_bundle: object) -> Iterator[Dockerd]:
    work = Path(tempfile.mkdtemp(prefix="husk-oci-docker-"))
    dockerd = Dockerd(work)
    try:
        dockerd.wait_ready()
        dockerd.docker("import", str(busybox_tar(work)), IMAGE)
        yield dockerd
    finally:
        dockerd.docker(
            "rm", "-f", *dockerd.docker("ps", "-aq", check=False).stdout.split(), check=False
        )
        dockerd.stop()
        kill_processes(dockerd.run_dir)
        kill_shims(work)
        subprocess.run(["umount", "-R", str(work / "exec")], capture_output=True, check=False)
        subprocess.run(["umount", "-R", str(work / "data")], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(dockerd.run_dir, ignore_errors=True)


@pytest.fixture
def dockerd(engine: Dockerd) -> Iterator[Dockerd]:
    yield engine
    engine.assert_clean()


def test_run_prints_and_returns_the_exit_code(dockerd: Dockerd) -> None:
    run = ("run", "--runtime", "husk", "--rm", "--network", "none", IMAGE)
    assert dockerd.docker(*run, "echo", "hi").stdout == "hi\n"
    failed = dockerd.docker(*run, "sh", "-c", "exit 9", check=False)
    assert failed.returncode == 9, failed.stderr
    # Back to back while husk VMs' ways out (slirp4netns) start next to the engine: each
    # start used to unmount dockerd's overlay roots on the host (its data root is a
    # shared mount), so a create that came next found an empty rootfs (issue 14's race).
    with EgressNeighbour(dockerd.pid, dockerd.work / "egress.log") as neighbour:
        outcomes = [dockerd.docker(*run, "true", check=False) for _ in range(4)]
    assert neighbour.failure is None, neighbour.failure
    assert neighbour.started > 0
    assert [(r.returncode, r.stderr) for r in outcomes] == [(0, "")] * 4


def test_detached_container_exec_logs_stop(dockerd: Dockerd) -> None:
    name = "husk-oci-detached"
    script = "trap 'exit 3' TERM; echo started; while :; do sleep 0.2; done"
    dockerd.docker(
        "run",
        "--runtime",
        "husk",
        "-d",
        "--name",
        name,
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        script,
    )
    try:
        # The container's root file system stays mounted on the host when a husk VM's
        # way out starts (slirp4netns unmounted it through dockerd's shared data root).
        rootfs = dockerd.docker("inspect", "-f", "{{.GraphDriver.Data.MergedDir}}", name)
        merged = rootfs.stdout.strip()
        assert mounted_in(dockerd.pid, merged)
        start_husk_egress_in(dockerd.pid, dockerd.work / "egress.log")
        assert mounted_in(dockerd.pid, merged), "a VM's slirp4netns unmounted dockerd's rootfs"
        executed = dockerd.docker("exec", name, "sh", "-c", "echo in-exec; exit 4", check=False)
        assert (executed.returncode, executed.stdout) == (4, "in-exec\n")
        # docker update: containerd's shim runs `husk-runtime update --resources -`
        dockerd.docker("update", "--memory", "48m", "--memory-swap", "96m", "--cpus", "0.5", name)
        limits = dockerd.docker(
            "exec", name, "cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max"
        )
        assert limits.stdout.split("\n")[:2] == [str(48 << 20), "50000 100000"]
        refused = dockerd.docker("update", "--cpus", "2", name, check=False)
        assert refused.returncode != 0 and "exceeds the VM's 1 vCPU" in refused.stderr
        # docker top: `husk-runtime ps` gives the keeper (the container's pid) and its QEMU
        keeper = dockerd.docker("inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
        top = dockerd.docker("top", name, "-o", "pid,args").stdout
        assert keeper in top.split() and "qemu-system" in top, top
        deadline = time.monotonic() + 30
        while "started" not in dockerd.docker("logs", name).stdout:
            assert time.monotonic() < deadline, "no output in the logs"
            time.sleep(0.3)
        dockerd.docker("stop", "-t", "20", name)
        assert dockerd.docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "3"
    finally:
        dockerd.docker("rm", "-f", name, check=False)


def test_a_terminal_through_the_shims_console_socket(dockerd: Dockerd) -> None:
    """``-t``: the shim's console socket gets the pty's master; the workload's stdio is it."""
    result = dockerd.docker(
        "run",
        "--runtime",
        "husk",
        "--rm",
        "-t",
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        "tty; test -t 0 && test -t 1 && echo both-ttys",
    )
    assert result.stdout.replace("\r", "").splitlines() == ["/dev/pts/0", "both-ttys"]
