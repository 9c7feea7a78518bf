"""podman 4.3 (through conmon) runs its containers in husk VMs with ``--runtime husk-runtime``.

podman keeps its own storage (--root/--runroot in a temporary directory) and imports
the busybox image from Debian's busybox-static; containers use ``--network none``.
After every test no QEMU, keeper, control socket, VM directory or container state of
husk-runtime remains.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from husk.vm import jail
from ociruntime_fixtures import (
    assert_no_leftovers,
    busybox_tar,
    kill_processes,
    leftovers,
    qemu_processes,
    run_checked,
    write_wrapper,
)

pytestmark = pytest.mark.vm

IMAGE = "localhost/husk-oci-busybox:latest"
CONTAINERS_CONF = """\
[containers]
default_ulimits=["nofile=1024:1024","nproc=1024:1024"]
[engine]
runtime="runc"
"""

Podman = Callable[..., subprocess.CompletedProcess[str]]


class Engine:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.run_dir = Path(tempfile.mkdtemp(prefix="hr-oci-", dir="/tmp"))
        self.state_root = work / "state"
        self.wrapper = write_wrapper(work, self.run_dir, self.state_root)
        conf = work / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.base = [
            "podman",
            "--root",
            str(work / "root"),
            "--runroot",
            str(work / "runroot"),
            "--runtime",
            str(self.wrapper),
        ]

    def __call__(
        self, *args: str, check: bool = True, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return run_checked([*self.base, *args], env=self.env, check=check, **kwargs)

    def assert_clean(self) -> None:
        assert_no_leftovers(lambda: leftovers(self.run_dir, self.state_root))


@pytest.fixture(scope="module")
def engine(guest_bundle: object) -> Iterator[Engine]:
    work = Path(tempfile.mkdtemp(prefix="husk-oci-podman-"))
    podman = Engine(work)
    try:
        archive = busybox_tar(work)
        podman("import", str(archive), IMAGE)
        yield podman
    finally:
        subprocess.run(
            [*podman.base, "rm", "-af", "-t", "0"], env=podman.env, capture_output=True, check=False
        )
        kill_processes(podman.run_dir)
        subprocess.run(
            [*podman.base, "system", "reset", "-f"],
            env=podman.env,
            capture_output=True,
            check=False,
        )
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(podman.run_dir, ignore_errors=True)


@pytest.fixture
def podman(engine: Engine) -> Iterator[Engine]:
    yield engine
    engine.assert_clean()


def test_run_prints_and_returns_the_exit_code(podman: Engine) -> None:
    result = podman("run", "--rm", "--network", "none", IMAGE, "echo", "hi")
    assert result.stdout == "hi\n"
    failed = podman("run", "--rm", "--network", "none", IMAGE, "sh", "-c", "exit 7", check=False)
    assert failed.returncode == 7, failed.stderr
    missing = podman("run", "--rm", "--network", "none", IMAGE, "no-such-program", check=False)
    assert missing.returncode == 127
    assert "executable file not found" in missing.stderr
    # The boot template's RAM, loaded by the first keeper, stays with the RAM holder for
    # the next (husk.ociruntime.ramholder); the holder keeps nothing else of theirs.
    holders = set(qemu_processes(podman.run_dir, holder=True)) - set(qemu_processes(podman.run_dir))
    assert len(holders) == 1, holders
    (holder,) = holders
    targets = [os.readlink(f"/proc/{holder}/fd/{fd}") for fd in os.listdir(f"/proc/{holder}/fd")]
    assert any(t.startswith("/memfd:husk-template-") for t in targets), targets
    assert not [t for t in targets if t.startswith(("pipe:", "/dev/pts"))], targets


def test_stderr_stdin_and_the_container_hostname(podman: Engine) -> None:
    result = podman(
        "run",
        "--rm",
        "-i",
        "--network",
        "none",
        "--hostname",
        "inside",
        IMAGE,
        "sh",
        "-c",
        "cat; hostname; echo oops >&2",
        input="from stdin\n",
    )
    assert result.stdout == "from stdin\ninside\n"
    assert "oops" in result.stderr


def test_detached_container_exec_logs_update_pause_top_stop_and_rm(podman: Engine) -> None:
    name = "husk-oci-detached"
    # The workload opts out of the OOM killer (process.oomScoreAdj, written in the VM
    # before it drops its capabilities): the memory limit below must end the exec'd dd,
    # never the workload. The kernel prefers dd anyway (its score is 1000), but when the
    # OOM reaper gives up on a victim that a loaded TCG host has not let exit yet, the
    # next process in the cgroup goes (seen once in CI).
    script = (
        "echo adj $(cat /proc/self/oom_score_adj); "
        "trap 'echo stopping; exit 3' TERM; echo started; while :; do echo tick; sleep 0.2; done"
    )
    podman(
        "run", "-d", "--name", name, "--network", "none", "--oom-score-adj", "-1000",
        IMAGE, "sh", "-c", script,
    )  # fmt: skip
    try:
        inspect = podman("inspect", "-f", "{{.State.Status}} {{.State.Pid}}", name).stdout.split()
        assert inspect[0] == "running"
        keeper = int(inspect[1])
        assert Path(f"/proc/{keeper}").exists()  # the keeper stands for the container
        assert_qemu_jailed(podman.run_dir)
        executed = podman("exec", name, "sh", "-c", "echo in $(hostname); exit 4", check=False)
        assert executed.returncode == 4
        assert executed.stdout.startswith("in ")
        deadline = time.monotonic() + 30
        while "started" not in podman("logs", name).stdout:
            assert time.monotonic() < deadline, "no output in the logs"
            time.sleep(0.3)
        assert "adj -1000\n" in podman("logs", name).stdout  # the spec's, inherited
        assert_updates_reach_the_guest_cgroup(podman, name)
        assert_pause_stops_the_workload(podman, name)
        # podman top with ps(1) options runs ps in the container: the VM's processes.
        top = podman("top", name, "-o", "pid,args").stdout
        assert "echo tick" in top and "podman" not in top, top
        podman("stop", "-t", "20", name)
        status = podman(
            "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name
        ).stdout.split()
        assert status == ["exited", "3"]
        assert "stopping" in podman("logs", name).stdout
    finally:
        podman("rm", "-f", name)


def cgroup_files(podman: Engine, name: str, *files: str) -> list[str]:
    paths = [f"/sys/fs/cgroup/{file}" for file in files]
    return podman("exec", name, "cat", *paths).stdout.split("\n")[: len(files)]


def assert_updates_reach_the_guest_cgroup(podman: Engine, name: str) -> None:
    """`podman update` (husk-runtime update --resources FILE): the limits are the
    container's cgroup in its VM, the workload sees them and the memory limit holds."""
    # podman's default pids limit, from the bundle's linux.resources at create
    assert cgroup_files(podman, name, "memory.max", "cpu.max", "pids.max") == [
        "max",
        "max 100000",
        "2048",
    ]
    # 64 MiB of dd's buffer (the VM has 512 MiB) fits before the update, not after
    # (dd, not the workload, is the one the OOM killer takes: as in any container)
    dd = "echo 1000 > /proc/self/oom_score_adj; exec dd if=/dev/zero of=/dev/null bs=64M count=1"
    allocate = ("exec", name, "sh", "-c", dd)
    assert podman(*allocate, check=False).returncode == 0
    podman("update", "--memory", "32m", "--cpus", "0.5", name)
    assert cgroup_files(podman, name, "memory.max", "cpu.max") == [str(32 << 20), "50000 100000"]
    assert podman(*allocate, check=False).returncode == 137  # OOM-killed in its cgroup
    status = podman("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name).stdout
    assert status.split()[0] == "running", status
    refused = podman("update", "--memory", "4g", name, check=False)
    assert refused.returncode != 0
    assert "exceeds the VM's memory" in refused.stderr
    refused = podman("update", "--cpuset-cpus", "3", name, check=False)
    assert refused.returncode != 0 and "the VM has 1 vCPU" in refused.stderr
    podman("update", "--memory", "200m", name)
    assert cgroup_files(podman, name, "memory.max") == [str(200 << 20)]
    assert podman(*allocate, check=False).returncode == 0


def assert_pause_stops_the_workload(podman: Engine, name: str) -> None:
    """`podman pause`: the VM stops (no tick reaches the logs), `unpause` resumes it."""

    def ticks() -> int:
        return podman("logs", name).stdout.count("tick")

    podman("pause", name)
    assert podman("inspect", "-f", "{{.State.Status}}", name).stdout.strip() == "paused"
    time.sleep(0.5)  # what the guest wrote before it stopped reaches the log
    paused = ticks()
    time.sleep(2.0)  # ten ticks' time
    assert ticks() == paused
    podman("unpause", name)
    assert podman("inspect", "-f", "{{.State.Status}}", name).stdout.strip() == "running"
    deadline = time.monotonic() + 30
    while ticks() <= paused:
        assert time.monotonic() < deadline, "the workload did not resume"
        time.sleep(0.3)


def assert_qemu_jailed(run_dir: Path) -> None:
    """The container's QEMU runs jailed: its own uid, only the four file capabilities."""
    qemus = [
        pid
        for pid in qemu_processes(run_dir)
        if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(qemus) == 1, qemus
    lines = Path(f"/proc/{qemus[0]}/status").read_text().splitlines()
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    assert jail.ID_BASE <= int(status["Uid"].split()[0]) < jail.ID_BASE + jail.ID_SLOTS
    mask = sum(1 << cap for cap in jail.FILE_CAPABILITIES)
    assert int(status["CapEff"], 16) == mask and int(status["CapBnd"], 16) == mask
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"


def test_bind_mounts_a_host_directory(podman: Engine, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("host data\n")
    files = tmp_path / "files"
    files.mkdir()
    (files / "ro").write_text("read only\n")
    (files / "rw").write_text("host\n")
    result = podman(
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        f"{shared}:/data",
        # Single-file binds: the VM gets a share holding that one file (a bind in the
        # keeper's mount namespace), never the file's directory.
        "-v",
        f"{files / 'ro'}:/ro:ro",
        "-v",
        f"{files / 'rw'}:/rw",
        IMAGE,
        "sh",
        "-c",
        "cat /data/from-host; echo guest data > /data/from-guest; cat /ro /rw;"
        " echo guest > /rw; echo changed > /ro || echo refused",
    )
    assert result.stdout == "host data\nread only\nhost\nrefused\n"
    assert (shared / "from-guest").read_text() == "guest data\n"
    assert (files / "rw").read_text() == "guest\n"
    assert (files / "ro").read_text() == "read only\n"
    assert sorted(os.listdir(files)) == ["ro", "rw"]


def test_a_killed_keeper_shows_as_exited(podman: Engine) -> None:
    name = "husk-oci-killed"
    podman("run", "-d", "--name", name, "--network", "none", IMAGE, "sleep", "600")
    try:
        pid = int(podman("inspect", "-f", "{{.State.Pid}}", name).stdout)
        os.kill(pid, 9)
        deadline = time.monotonic() + 30
        while True:
            status = podman(
                "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name
            ).stdout.split()
            if status[0] != "running":
                break
            assert time.monotonic() < deadline, "podman still shows it running"
            time.sleep(0.3)
        assert status[0] in ("exited", "stopped") and status[1] != "0"
    finally:
        podman("rm", "-f", name)


def _read_until(fd: int, wanted: bytes, deadline: float) -> bytes:
    seen = b""
    while wanted not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{wanted!r} not seen in {seen!r}"
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"terminal closed before {wanted!r}: {seen!r}"
            seen += chunk
    return seen


def _interactive_shell(podman: Engine, *args: str) -> None:
    """Runs podman with ``args`` on a real pty: a shell, its size, a resize, its exit."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs podman
        os.environ.update(podman.env)
        argv = [*podman.base, *args]
        os.execvp(argv[0], argv)
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        deadline = time.monotonic() + 120
        _read_until(fd, b"# ", deadline)
        os.write(fd, b"stty size\n")
        _read_until(fd, b"30 100", deadline)
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        time.sleep(0.5)  # SIGWINCH reaches the keeper (or exec stand-in), the resize the guest
        os.write(fd, b"stty size; exit 6\n")
        _read_until(fd, b"40 120", deadline)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 6
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def test_interactive_terminal_resizes(podman: Engine) -> None:
    """``run -it`` through a real pty (the console socket, the keeper's pty)."""
    _interactive_shell(podman, "run", "-it", "--rm", "--network", "none", IMAGE, "sh")


def test_interactive_exec_resizes(podman: Engine) -> None:
    """``exec -it``: the exec's stand-in makes the pty and forwards its resizes."""
    name = "husk-oci-exec-tty"
    podman("run", "-d", "--name", name, "--network", "none", IMAGE, "sleep", "600")
    try:
        _interactive_shell(podman, "exec", "-it", name, "sh")
    finally:
        podman("rm", "-f", "-t", "0", name)


def test_a_killed_qemu_shows_as_an_exited_container(podman: Engine) -> None:
    name = "husk-oci-qemu-killed"
    podman("run", "-d", "--name", name, "--network", "none", IMAGE, "sleep", "600")
    try:
        keeper = int(podman("inspect", "-f", "{{.State.Pid}}", name).stdout)
        children = Path(f"/proc/{keeper}/task/{keeper}/children").read_text().split()
        qemus = [
            int(pid)
            for pid in children
            if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(qemus) == 1
        os.kill(qemus[0], 9)
        deadline = time.monotonic() + 30
        while True:
            status = podman(
                "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name
            ).stdout.split()
            if status[0] != "running":
                break
            assert time.monotonic() < deadline, "podman still shows it running"
            time.sleep(0.3)
        assert status[0] in ("exited", "stopped") and status[1] != "0"
    finally:
        podman("rm", "-f", name)
