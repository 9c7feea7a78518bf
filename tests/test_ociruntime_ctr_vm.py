"""containerd's ``io.containerd.runc.v2`` shim runs husk-runtime (``ctr run --runc-binary``).

containerd 1.6 is started by the test with its own root, state and socket in a
temporary directory (the CRI plugin off); the busybox image is imported from an OCI
archive built from Debian's busybox-static. After every test nothing of husk-runtime's
containers remains.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ociruntime_fixtures import (
    EngineDaemon,
    assert_no_leftovers,
    kill_processes,
    kill_shims,
    leftovers,
    run_checked,
    write_wrapper,
)
from testimages import busybox_image_layout

pytestmark = pytest.mark.vm

IMAGE = "localhost/husk-oci-busybox:latest"
NAMESPACE = "husk-oci"
STARTUP_DEADLINE = 30.0


class Containerd:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.socket = work / "containerd.sock"
        self.run_dir = Path(tempfile.mkdtemp(prefix="hr-oci-", dir="/tmp"))
        self.state_root = work / "runc-root"
        self.wrapper = write_wrapper(work, self.run_dir, self.state_root)
        config = work / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{work / "root"}"\n'
            f'state = "{work / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
        )
        self.daemon = EngineDaemon(["containerd", "--config", str(config)], work / "containerd.log")

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_checked(
            ["ctr", "--address", str(self.socket), "-n", NAMESPACE, *args], check=check
        )

    def run_args(self) -> list[str]:
        return [
            "--runtime",
            "io.containerd.runc.v2",
            "--runc-binary",
            str(self.wrapper),
            "--runc-root",
            str(self.state_root),
        ]

    def wait_ready(self) -> None:
        self.daemon.wait_ready(
            lambda: self.ctr("version", check=False).returncode == 0, STARTUP_DEADLINE
        )

    def stop(self) -> None:
        self.daemon.stop()

    def assert_clean(self) -> None:
        assert_no_leftovers(lambda: leftovers(self.run_dir, self.state_root))
        tasks = self.work / "state" / "io.containerd.runtime.v2.task" / NAMESPACE
        assert not tasks.is_dir() or list(tasks.iterdir()) == []


@pytest.fixture(scope="module")
def engine(guest_bundle: object) -> Iterator[Containerd]:
    work = Path(tempfile.mkdtemp(prefix="husk-oci-ctr-"))
    containerd = Containerd(work)
    try:
        containerd.wait_ready()
        layout = busybox_image_layout(work / "layout")
        archive = work / "image.tar"
        with tarfile.open(archive, "w") as tar:
            for entry in sorted(layout.iterdir()):
                tar.add(entry, arcname=entry.name)
        containerd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(archive))
        yield containerd
    finally:
        for task in containerd.ctr("tasks", "ls", "-q", check=False).stdout.split():
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
            containerd.ctr("tasks", "delete", "-f", task, check=False)
        containerd.stop()
        kill_processes(containerd.run_dir)
        kill_shims(work)
        subprocess.run(["umount", "-R", str(work / "state")], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(containerd.run_dir, ignore_errors=True)


@pytest.fixture
def containerd(engine: Containerd) -> Iterator[Containerd]:
    yield engine
    engine.assert_clean()


def test_run_prints_and_returns_the_exit_code(containerd: Containerd) -> None:
    result = containerd.ctr("run", "--rm", *containerd.run_args(), IMAGE, "c-echo", "echo", "hi")
    assert result.stdout == "hi\n"
    failed = containerd.ctr(
        "run", "--rm", *containerd.run_args(), IMAGE, "c-exit", "sh", "-c", "exit 5", check=False
    )
    assert failed.returncode == 5, failed.stderr


def test_exec_kill_and_delete(containerd: Containerd) -> None:
    name = "c-detached"
    containerd.ctr("run", "-d", *containerd.run_args(), IMAGE, name, "sleep", "600")
    try:
        tasks = containerd.ctr("tasks", "ls").stdout
        assert name in tasks and "RUNNING" in tasks
        executed = containerd.ctr(
            "tasks",
            "exec",
            "--exec-id",
            "e1",
            name,
            "sh",
            "-c",
            "echo in-exec; exit 3",
            check=False,
        )
        assert (executed.returncode, executed.stdout) == (3, "in-exec\n")
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", name)
        deadline = time.monotonic() + 30
        while "STOPPED" not in containerd.ctr("tasks", "ls").stdout:
            assert time.monotonic() < deadline, "the task did not stop"
            time.sleep(0.2)
        containerd.ctr("tasks", "delete", name)
    finally:
        containerd.ctr("tasks", "delete", "-f", name, check=False)
        containerd.ctr("containers", "delete", name, check=False)
