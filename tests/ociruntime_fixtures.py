"""Helpers for husk-runtime's engine tests: the runtime wrapper, the image, leftovers.

The wrapper is what an engine is told to run: it execs this checkout's
``husk.ociruntime.cli`` with the test session's husk directories, and gives the
runtime a ``--root`` of the test's own (an engine that passes one, as containerd does,
overrides it). The image is Debian's busybox-static laid out as a root file system
(:func:`guestfs.busybox_tree`), imported by each engine from a tar archive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from guestfs import busybox_tree

SRC = Path(__file__).resolve().parent.parent / "src"
TIMEOUT = 180.0
ENV_PASSED = ("HUSK_DATA_DIR", "HUSK_KERNEL", "HUSK_INITRD", "HUSK_ACCEL")


def write_wrapper(directory: Path, run_dir: Path, state_root: Path) -> Path:
    """An executable that runs husk-runtime with this session's settings."""
    exports = {name: os.environ[name] for name in ENV_PASSED if os.environ.get(name)}
    exports["PYTHONPATH"] = str(SRC)
    exports["HUSK_RUN_DIR"] = str(run_dir)
    lines = ["#!/bin/sh"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in exports.items()]
    lines.append(
        # as the installed console script does (`-m` would add runpy's imports)
        f"exec {shlex.quote(sys.executable)} -c "
        f"{shlex.quote('from husk.ociruntime.cli import main; main()')} "
        f"--root {shlex.quote(str(state_root))} "
        # the keeper's errors where a test can show them (an engine's own --log wins)
        f'--log {shlex.quote(str(directory / "husk-runtime.log"))} "$@"'
    )
    wrapper = directory / "husk-runtime"
    wrapper.write_text("\n".join(lines) + "\n")
    wrapper.chmod(0o755)
    return wrapper


def busybox_tar(directory: Path) -> Path:
    """A tar archive of the busybox root file system (for ``import``)."""
    tree = busybox_tree(directory / "rootfs")
    archive = directory / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        for entry in sorted(tree.iterdir()):
            tar.add(entry, arcname=entry.name)
    return archive


def qemu_processes(run_dir: Path, *, holder: bool = False) -> list[int]:
    """QEMU processes and keepers started with ``HUSK_RUN_DIR=run_dir`` (this test's
    runtime); with ``holder``, its RAM holder too (husk.ociruntime.ramholder), which
    outlives containers by design and holds nothing of theirs."""
    found = []
    marker = b"HUSK_RUN_DIR=" + str(run_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"qemu-system" not in cmdline and b"husk.ociruntime" not in cmdline:
                continue
            if b"husk.ociruntime.ramholderd" in cmdline and not holder:
                continue
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def leftovers(run_dir: Path, state_root: Path) -> list[str]:
    """Everything of husk-runtime's containers still there: processes (QEMU, keepers),
    control sockets, VM directories, container state directories."""
    found = [f"process {pid}" for pid in qemu_processes(run_dir)]
    for sub in ("oci", "vms"):
        directory = run_dir / sub
        if directory.is_dir():
            found += [str(p) for p in directory.iterdir()]
    if state_root.is_dir():
        # containerd's shim adds the namespace: <root>/<namespace>/<id>
        found += [str(p) for p in state_root.iterdir() if (p / "state.json").exists()]
        found += [str(p.parent) for p in state_root.glob("*/*/state.json")]
    return found


def kill_processes(run_dir: Path) -> None:
    for pid in qemu_processes(run_dir, holder=True):
        subprocess.run(["kill", "-9", str(pid)], check=False)


def kill_shims(work: Path) -> None:
    """containerd's shims of an engine whose state is under ``work``: a test that failed
    half-way can leave them running after their containerd is gone."""
    marker = str(work).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmdline and marker in cmdline:
            subprocess.run(["kill", "-9", entry.name], check=False)


def run_checked(
    argv: list[str], *, env: dict[str, str] | None = None, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Runs an engine's client; with ``check`` a failure names the command and its output."""
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False, **kwargs
    )
    if check:
        assert result.returncode == 0, f"{' '.join(argv)}: {result.stdout}{result.stderr}"
    return result


class EngineDaemon:
    """An engine's daemon (containerd, dockerd) the test started, logging to ``log_path``."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.name = Path(argv[0]).name
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, answers: Callable[[], bool], deadline_seconds: float) -> None:
        deadline = time.monotonic() + deadline_seconds
        while not answers():
            assert self.process.poll() is None, self.log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, f"{self.name} did not answer"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


def assert_no_leftovers(find: Callable[[], list[str]]) -> None:
    """What ``find`` lists is gone within a few seconds (teardown is asynchronous)."""
    deadline = time.monotonic() + 10
    while find() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert find() == []


@contextlib.contextmanager
def netns_holder() -> Iterator[int]:
    """The pid of a process in a network namespace of its own, made for the test (what a
    VM's jail gives its slirp4netns); the host's namespace is never handed out."""
    holder = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", "echo ready; exec sleep 600"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
        own = os.readlink(f"/proc/{holder.pid}/ns/net")
        assert own != os.readlink("/proc/self/ns/net"), "the holder is in the host's netns"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def start_husk_egress(pid: int, log: Path) -> None:
    """Starts husk's way out for ``pid``'s network namespace as a `husk run` VM's is
    started (:func:`husk.vm.network.start`: slirp4netns, sandboxed as root), waits until
    it is ready, and stops it."""
    from husk.vm import network

    exit_read, exit_write = os.pipe()
    try:
        egress = network.start(pid, exit_read, log, userns=False)
        try:
            asyncio.run(egress.wait_ready())
        finally:
            egress.stop()
    finally:
        os.close(exit_read)
        os.close(exit_write)


EGRESS_LOOP = """
import select, sys
from pathlib import Path
from ociruntime_fixtures import netns_holder, start_husk_egress
started = 0
with netns_holder() as pid:
    while True:
        start_husk_egress(pid, Path(sys.argv[1]))
        started += 1
        if sys.argv[2] == "once" or select.select([sys.stdin], [], [], 0)[0]:
            break
print(started)
"""


def _egress_argv(mount_ns_pid: int, log: Path, mode: str) -> list[str]:
    """husk's way out started in the mount namespace of ``mount_ns_pid`` (an engine's):
    what a `husk run` VM next to that engine does in the namespace they share."""
    return [
        "nsenter",
        f"--mount=/proc/{mount_ns_pid}/ns/mnt",
        sys.executable,
        "-c",
        EGRESS_LOOP,
        str(log),
        mode,
    ]


def _egress_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)])}


def start_husk_egress_in(mount_ns_pid: int, log: Path) -> None:
    """One husk egress started and stopped in ``mount_ns_pid``'s mount namespace."""
    run_checked(_egress_argv(mount_ns_pid, log, "once"), env=_egress_env())


def mounted_in(pid: int, path: str) -> bool:
    """Whether ``path`` is a mount point in the mount namespace of ``pid``."""
    points = (line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines())
    return path in {point.replace("\\040", " ") for point in points}


class EgressNeighbour:
    """husk VMs' ways out starting one after another in the mount namespace of
    ``mount_ns_pid`` (a `husk run` next to the engine) until the block ends; ``started``
    counts them, ``failure`` is the starter's output if it failed."""

    def __init__(self, mount_ns_pid: int, log: Path) -> None:
        self.argv = _egress_argv(mount_ns_pid, log, "loop")
        self.started = 0
        self.failure: str | None = None
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> EgressNeighbour:
        self._process = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_egress_env(),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        out, err = self._process.communicate("", timeout=TIMEOUT)  # EOF on stdin: stop
        if self._process.returncode == 0:
            self.started = int(out.split()[-1])
        else:
            self.failure = out + err
