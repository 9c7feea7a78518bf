"""A real ``husk daemon`` for the tests, started as a subprocess with its own directories.

Import the fixture into a test module (``from daemon_fixtures import husk_daemon``)
and use ``husk_daemon.docker(...)`` (the docker CLI), ``husk_daemon.client()``
(docker-py) or ``husk_daemon.env`` (for any other Docker client). The daemon
boots VMs with the session's guest bundle (conftest's ``guest_bundle``) under TCG.

At the end every container is force-removed through the API, the daemon is
stopped with SIGTERM, and any QEMU process still running from the daemon's run
directory is killed, so nothing leaks between sessions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from husk.network.switchclient import stop_switch
from registry_fixtures import RunningRegistry, registry
from testimages import busybox_image_layout

__all__ = [
    "RunningDaemon",
    "daemon_busybox",
    "husk_daemon",
    "registry",
    "registry_busybox",
    "seed_templates",
    "start_daemon",
]

DOCKER_CLI = shutil.which("docker") or "/usr/local/bin/docker"
STARTUP_DEADLINE = 30.0
STOP_DEADLINE = 20.0
CLI_TIMEOUT = 180.0


@dataclass
class RunningDaemon:
    process: subprocess.Popen[bytes]
    root: Path
    socket: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "daemon.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def docker(
        self,
        *args: str,
        input: bytes | None = None,
        timeout: float = CLI_TIMEOUT,
        check: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the docker CLI against this daemon."""
        result = subprocess.run(
            [DOCKER_CLI, *args],
            env=self.env,
            input=input,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout.decode(errors='replace')}\n"
                f"stderr: {result.stderr.decode(errors='replace')}\n"
                f"daemon log tail:\n{self.log()[-3000:]}"
            )
        return result

    def client(self, timeout: int = 180) -> Any:
        """A docker-py client of this daemon."""
        import docker

        return docker.DockerClient(base_url=self.docker_host, timeout=timeout)

    def alive(self) -> bool:
        return self.process.poll() is None

    def remove_all_containers(self) -> None:
        with contextlib.suppress(Exception):
            client = self.client(timeout=60)
            try:
                for item in client.api.containers(all=True):
                    with contextlib.suppress(Exception):
                        client.api.remove_container(item["Id"], force=True)
            finally:
                client.close()

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        kill_leftover_vms(self.root)
        stop_switch(self.run_dir)


def kill_leftover_vms(root: Path) -> list[int]:
    """Kill QEMU processes of a daemon under ``root`` (ours only).

    A jailed QEMU's command line names no data path (it gets descriptors), so its
    environment, inherited from the daemon, says whose it is.
    """
    killed: list[int] = []
    marker = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes() if b"qemu-system" in cmdline else b""
        except OSError:
            continue
        ours = marker in cmdline or any(
            line.startswith(b"HUSK_RUN_DIR=" + marker) for line in environ.split(b"\0")
        )
        if b"qemu-system" in cmdline and ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def daemon_env(
    root: Path, base: dict[str, str] | None = None, *, data_dir: Path | None = None
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["HUSK_DATA_DIR"] = str(data_dir if data_dir is not None else root / "data")
    env["HUSK_RUN_DIR"] = str(root / "run")
    env.setdefault("HUSK_ACCEL", "tcg")
    env.pop("HUSK_SOCKET", None)
    env["DOCKER_HOST"] = f"unix://{root / 'run' / 'husk.sock'}"
    docker_config = root / "docker-config"
    docker_config.mkdir(parents=True, exist_ok=True)
    env["DOCKER_CONFIG"] = str(docker_config)
    env["TESTCONTAINERS_RYUK_DISABLED"] = "true"
    return env


# The data directories of the daemons this session started: where seed_templates looks.
_DATA_DIRS: list[Path] = []
# What a published template holds (husk.sandbox.templates); its "failures" count stays.
_TEMPLATE_FILES = ("template.json", "vm.state", "memory.ram", "console.log")


def seed_templates(data_dir: Path) -> list[str]:
    """Hard-links into ``data_dir`` every boot template the session's daemons (and its
    in-process runtimes) have built; the keys linked.

    A fresh daemon then restores its first VM from the template instead of booting cold
    and saving one of its own (~10 s under TCG), on exactly the path its later VMs take.
    Sharing the files is safe: a published template is never written again, and
    removing or replacing one renames its directory away (husk.sandbox.templates).
    For tests that are not about building templates.
    """
    target = data_dir / "templates"
    sources = [Path(os.environ["HUSK_DATA_DIR"]), *_DATA_DIRS]
    seeded: list[str] = []
    for source in sources:
        base = source / "templates"
        if source == data_dir or not base.is_dir():
            continue
        for template in base.iterdir():
            if template.name.startswith(".") or not template.is_dir():
                continue
            if (target / template.name).exists() or template.name in seeded:
                continue
            if _link_template(template, target):
                seeded.append(template.name)
    return seeded


def _link_template(template: Path, target: Path) -> bool:
    """Links one template's files into ``target``, renamed into place whole (or not at all:
    a template its daemon is replacing right now is skipped)."""
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = Path(tempfile.mkdtemp(prefix=".seed-", dir=target))
    try:
        for name in _TEMPLATE_FILES:
            os.link(template / name, partial / name)
        os.rename(partial, target / template.name)
        return True
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        return False


def start_daemon(
    root: Path,
    *,
    extra_args: tuple[str, ...] = (),
    data_dir: Path | None = None,
    templates_from_session: bool = False,
) -> RunningDaemon:
    """Start ``husk daemon`` with data and run directories under ``root`` (or the data
    directory ``data_dir``); wait for it. ``templates_from_session``: seed its data
    directory with the session's boot templates first (:func:`seed_templates`)."""
    from husk.daemon.location import daemon_answers

    env = daemon_env(root, data_dir=data_dir)
    data = Path(env["HUSK_DATA_DIR"])
    if data not in _DATA_DIRS:
        _DATA_DIRS.append(data)
    if templates_from_session:
        seed_templates(data)
    socket = root / "run" / "husk.sock"
    (root / "run").mkdir(parents=True, exist_ok=True)
    with open(root / "daemon.stderr", "ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", "from husk.cli.main import main; main()", "daemon", *extra_args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
        )
    daemon = RunningDaemon(process=process, root=root, socket=socket, env=env)
    deadline = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = (root / "daemon.stderr").read_text(errors="replace")
            raise RuntimeError(f"husk daemon exited with {process.returncode}: {output[-3000:]}")
        if daemon_answers(socket, timeout=1.0):
            return daemon
        time.sleep(0.1)
    daemon.stop()
    raise RuntimeError(f"husk daemon did not answer on {socket} within {STARTUP_DEADLINE}s")


def short_root(prefix: str = "husk-d-") -> Path:
    """A short directory (unix socket paths are limited to 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="session")
def husk_daemon(guest_bundle: object) -> Iterator[RunningDaemon]:
    """One daemon for the session, with the guest bundle, isolated directories, TCG.

    A module that imports this fixture gets a daemon of its own (pytest makes one
    instance per module that defines a fixture): each restores from the boot templates
    an earlier daemon of the session built rather than building its own.
    """
    root = short_root()
    daemon = start_daemon(root, templates_from_session=True)
    try:
        yield daemon
    finally:
        daemon.remove_all_containers()
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def registry_busybox(registry: RunningRegistry) -> str:
    """The busybox test image in the session's local registry: ``127.0.0.1:PORT/husk/busybox``."""
    layout = Path(tempfile.mkdtemp(prefix="husk-bb-")) / "layout"
    try:
        return registry.push_oci_layout(busybox_image_layout(layout), "husk/busybox")
    finally:
        shutil.rmtree(layout.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon_busybox(husk_daemon: RunningDaemon, registry_busybox: str) -> str:
    """``registry_busybox`` pulled into the daemon (through its API); its ``name:latest``."""
    client = husk_daemon.client()
    try:
        client.images.pull(registry_busybox, tag="latest")
    finally:
        client.close()
    return f"{registry_busybox}:latest"
