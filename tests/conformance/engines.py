"""The two engines of the conformance suite: husk's Docker API socket and a real dockerd.

Both are driven the same way, by the installed docker CLI (28) through ``DOCKER_HOST``
and by docker-py, and both hold the same busybox test image, pulled from the session's
docker-registry on 127.0.0.1 (loopback registries are insecure-allowed by dockerd's
defaults, and husk pulls plain HTTP from loopback too).

The real engine (:func:`start_dockerd`) is Debian's docker.io 20.10, started as root
with every path of its own under one temporary directory::

    dockerd --iptables=false --bridge=none --data-root D/data --exec-root D/exec
            --pidfile D/docker.pid -H unix://D/docker.sock --storage-driver overlay2|vfs

dockerd starts its own containerd (state under the exec root, content under the data
root), so nothing is shared with a system docker or containerd. What was found on this
machine (kernel 6.18, cgroup v1 hierarchy plus an empty cgroup2 at /sys/fs/cgroup/unified,
/tmp on ext4, running as root with no stdin):

- dockerd starts and runs containers; "Cgroup Driver: cgroupfs, Cgroup Version: 1".
  The only warnings are "Your kernel does not support cgroup blkio weight(_device)",
  which no scenario uses.
- With ``--bridge=none`` there is no default ``bridge`` network: every container must
  be run with ``--network none`` (``Engine.run_args``), as the rules ask anyway.
- overlay2 works on ext4 /tmp. On an overlayfs /tmp (a container-based CI) overlay2
  cannot stack, so :func:`storage_driver_for` picks vfs there (slower, same behaviour).
- dockerd 20.10 speaks Engine API 1.41 at most: the CLI 28 negotiates down to it, and a
  client pinned to 1.46/1.47 is refused by it ("client version 1.47 is too new"). The
  API-version scenarios therefore compare at 1.41 and check 1.46/1.47 on husk alone.
- husk refuses ``--network none`` (its containers always get their own user-mode NAT),
  so husk containers run on their default network; no scenario sends traffic, and the
  /etc/hosts scenario compares only the ``--add-host`` lines.
- dockerd needs nothing beyond the Debian packages (docker.io pulls in containerd, runc
  and tini, which is its ``docker-init``): no kernel module or cgroup setting to change.
- Seen twice in about 150 dockerd runs, only while husk's TCG VMs loaded both cores, never
  when repeated alone: a ``run`` exiting 127 with no output where 126/0 was due (once for
  ``/etc/passwd``, once for ``sh -c``). Failures now print both engines' latest errors.
- Shutdown: containers are force-removed, dockerd gets SIGTERM (it stops its
  containerd), then any process still naming the directory (a containerd or shim left
  behind by a crash) is killed and every mount under it is unmounted before the
  directory is deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DOCKER_CLI = shutil.which("docker") or "/usr/local/bin/docker"
DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
DOCKERD_STARTUP_DEADLINE = 60.0
DOCKERD_STOP_DEADLINE = 30.0
CLI_TIMEOUT = 120.0
EXPECTED_MISSING = ("/nonexistent",)
"""Commands the scenarios run expecting 127: never repeated as a flake."""


@dataclass(frozen=True)
class Ran:
    """What a ``docker run`` showed: exit code, output, and the container's inspect."""

    code: int
    out: str
    err: str
    inspect: dict[str, Any]

    def host(self, key: str) -> Any:
        return (self.inspect.get("HostConfig") or {}).get(key)

    def state(self, key: str) -> Any:
        return (self.inspect.get("State") or {}).get(key)


@dataclass
class Engine:
    """One engine under test, as the docker CLI and docker-py see it."""

    name: str
    env: dict[str, str]
    image: str = ""
    # Arguments every ``run``/``create`` gets on this engine (dockerd: no bridge).
    run_args: tuple[str, ...] = ()
    log: Callable[[], str] = field(default=lambda: "")
    cache: dict[str, Any] = field(default_factory=dict)
    # The stderr of the latest failed commands, shown when husk and docker differ.
    errors: list[str] = field(default_factory=list)
    flakes: list[str] = field(default_factory=list)
    """dockerd runs repeated because of the 127 flake (see :meth:`_oracle_flake`)."""

    @property
    def docker_host(self) -> str:
        return self.env["DOCKER_HOST"]

    def docker(
        self,
        *args: str,
        input: bytes | None = None,
        timeout: float = CLI_TIMEOUT,
        check: bool = False,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """The docker CLI against this engine (``check``: raise with context on failure)."""

        def once() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [DOCKER_CLI, *args],
                env={**self.env, **(env or {})},
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )

        result = once()
        if self._oracle_flake(args, result):
            # dockerd 20.10 on this host, under load, now and then reports a command the
            # image has as missing (module docstring): such a run is repeated once.
            self.flakes.append(f"docker {' '.join(args)[:200]}: {result.stderr[-300:]!r}")
            if "--name" in args:
                name = args[args.index("--name") + 1]
                subprocess.run(
                    [DOCKER_CLI, "rm", "-f", name], env=self.env, capture_output=True, check=False
                )
            result = once()
        if result.returncode != 0:
            self.errors[:] = [
                *self.errors[-4:],
                f"docker {' '.join(args)[:200]} -> {result.returncode}: "
                f"{result.stderr.decode(errors='replace')[-500:]}",
            ]
        if check and result.returncode != 0:
            raise AssertionError(
                f"[{self.name}] docker {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout.decode(errors='replace')}\n"
                f"stderr: {result.stderr.decode(errors='replace')}\n"
                f"engine log tail:\n{self.log()[-3000:]}"
            )
        return result

    def _oracle_flake(
        self, args: tuple[str, ...], result: subprocess.CompletedProcess[bytes]
    ) -> bool:
        """A dockerd ``run`` that exited 127 for a command the scenarios never expect missing."""
        return (
            self.name == "docker"
            and args[:1] == ("run",)
            and result.returncode == 127
            and not any(arg.startswith(EXPECTED_MISSING) for arg in args)
        )

    def run(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        """``docker run --rm`` with this engine's run arguments; ``args`` end with the command."""
        return self.docker("run", "--rm", *self.run_args, *args, timeout=timeout)

    def run_kept(self, *args: str, timeout: float = CLI_TIMEOUT) -> Ran:
        """``docker run`` without ``--rm``: its result and inspect, then the container removed."""
        name = f"conf-{uuid.uuid4().hex[:12]}"
        result = self.docker("run", "--name", name, *self.run_args, *args, timeout=timeout)
        try:
            found = self.docker("inspect", name, timeout=60)
            details = json.loads(found.stdout)[0] if found.returncode == 0 else {}
        finally:
            self.docker("rm", "-f", name, timeout=60)
        return Ran(
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
            details,
        )

    def inspect(self, *names: str, kind: str = "container") -> list[dict[str, Any]]:
        out = self.docker(kind, "inspect", *names, check=True).stdout
        result: list[dict[str, Any]] = json.loads(out)
        return result

    def client(self, timeout: int = 180, version: str | None = "auto") -> Any:
        import docker

        return docker.DockerClient(base_url=self.docker_host, timeout=timeout, version=version)

    def container_ids(self) -> set[str]:
        out = self.docker("ps", "-aq", "--no-trunc", check=True).stdout.decode()
        return set(out.split())


def observe(engine: Engine, key: str, scenario: Callable[[Engine], T]) -> T:
    """``scenario(engine)``, run once per engine and session (keyed by ``key``)."""
    if key not in engine.cache:
        engine.cache[key] = scenario(engine)
    result: T = engine.cache[key]
    return result


# ------------------------------------------------------------------- dockerd


@dataclass
class Dockerd:
    process: subprocess.Popen[bytes]
    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def storage_driver_for(directory: Path) -> str:
    """overlay2 where the directory's filesystem can be an overlay's upper layer, else vfs."""
    out = subprocess.run(
        ["stat", "-f", "-c", "%T", str(directory)], capture_output=True, text=True, check=False
    ).stdout.strip()
    return "vfs" if out in {"overlayfs", "overlay", "aufs"} else "overlay2"


def _answers(path: Path) -> bool:
    """Whether an HTTP server answers ``GET /_ping`` on the unix socket ``path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(path))
            sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def start_dockerd() -> Dockerd:
    """A dockerd of our own under a short temporary directory (socket paths ≤ 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="hcd-", dir="/tmp"))
    command = [
        DOCKERD,
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        "--data-root",
        str(root / "data"),
        "--exec-root",
        str(root / "exec"),
        "--pidfile",
        str(root / "docker.pid"),
        "-H",
        f"unix://{root / 'docker.sock'}",
        "--storage-driver",
        storage_driver_for(root),
        "--log-level",
        "warn",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    with open(root / "dockerd.log", "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    daemon = Dockerd(process, root)
    deadline = time.monotonic() + DOCKERD_STARTUP_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log_text = daemon.log()
            cleanup_dockerd_root(root)
            raise RuntimeError(f"dockerd exited with {process.returncode}:\n{log_text[-3000:]}")
        if _answers(daemon.socket):
            return daemon
        time.sleep(0.2)
    stop_dockerd(daemon)
    raise RuntimeError(f"dockerd did not answer on {daemon.socket} in {DOCKERD_STARTUP_DEADLINE}s")


def processes_naming(marker: bytes) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def mounts_under(root: Path) -> list[str]:
    """Mount points under ``root``, deepest first (from /proc/self/mountinfo)."""
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(str(root) + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def cleanup_dockerd_root(root: Path) -> None:
    """Kill what still names ``root`` (containerd, shims), unmount under it, delete it."""
    for pid in processes_naming(str(root).encode()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for point in mounts_under(root):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(root, ignore_errors=True)


def stop_dockerd(daemon: Dockerd, engine: Engine | None = None) -> None:
    if engine is not None and daemon.process.poll() is None:
        with contextlib.suppress(Exception):
            ids = engine.container_ids()
            if ids:
                engine.docker("rm", "-f", *ids, timeout=60)
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(DOCKERD_STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait(10)
    cleanup_dockerd_root(daemon.root)
