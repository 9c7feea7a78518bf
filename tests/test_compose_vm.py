"""Issue 12's compose scenario: docker-compose 1.29 (Debian's, unmodified) runs a
three-service project on husk, real VMs, and ``down`` leaves nothing behind.

The project: ``web`` (busybox httpd serving a file, port published on 127.0.0.1),
``client`` (fetches from ``web`` by service name in a loop, with busybox ``nc``) and
``job`` (one shot). Two variants:

* ``bridge``: every service has ``network_mode: bridge``, so compose creates no
  network; ``web`` resolves (``extra_hosts: web:host-gateway``) to the host, where
  the client reaches the published port.
* ``project-network``: compose's default ``<project>_default`` network; the client
  reaches ``web:80`` through the network's embedded DNS (husk's switch and LAN slots).

One daemon for the module (its own data and run directories), so that "no VM and no
helper process of the daemon is left" means exactly that.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon_fixtures import RunningDaemon, short_root, start_daemon
from husk.daemon.docker.params import iso_to_unix
from testimages import BUSYBOX_NAME, install_busybox_image

pytestmark = pytest.mark.vm

COMPOSE = shutil.which("docker-compose") or "/usr/bin/docker-compose"
COMPOSE_TIMEOUT = 300.0
SETTLE_DEADLINE = 240.0
GONE_DEADLINE = 30.0
PAGE = "hello from husk"  # /www/index.html of the busybox test image
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
FETCH = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc web {port}"


@dataclass(frozen=True)
class Variant:
    name: str
    project_network: bool

    def compose_file(self, host_port: int) -> str:
        """The project; ``$$`` is compose's escape for a literal ``$``."""
        if self.project_network:
            placement = ""
            client_extra = ""
            fetch = FETCH.format(port=80)
        else:
            placement = "    network_mode: bridge\n"
            client_extra = '    extra_hosts: ["web:host-gateway"]\n'
            fetch = FETCH.format(port=host_port)
        loop = f"while true; do {fetch}; echo; echo fetched; sleep 1; done"
        services = {
            "web": (
                f'    command: ["httpd", "-f", "-p", "80", "-h", "/www"]\n'
                f'    ports: ["127.0.0.1:{host_port}:80"]\n'
            ),
            "client": (
                f"    command: {json.dumps(['sh', '-c', loop])}\n"
                "    depends_on: [web]\n"
                f"{client_extra}"
            ),
            "job": '    command: ["sh", "-c", "echo job ran as $$(id -u)"]\n',
        }
        text = "services:\n"
        for name, body in services.items():
            text += f"  {name}:\n    image: {BUSYBOX_NAME}\n    stop_grace_period: 1s\n"
            text += body + placement
        return text


VARIANTS = [Variant("bridge", False), Variant("project-network", True)]


@pytest.fixture(scope="module")
def compose_daemon(guest_bundle: object) -> Iterator[RunningDaemon]:
    """A daemon of this module's own, with the busybox image imported offline."""
    from husk.oci.store import ImageStore

    root = short_root("husk-cmp-")
    install_busybox_image(ImageStore(root / "data" / "images"), workdir=root)
    daemon = start_daemon(root, templates_from_session=True)
    try:
        yield daemon
    finally:
        daemon.remove_all_containers()
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Project:
    def __init__(self, daemon: RunningDaemon, directory: Path, name: str) -> None:
        self.daemon = daemon
        self.directory = directory
        self.name = name

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [COMPOSE, "-p", self.name, *args],
            cwd=self.directory,
            env=self.daemon.env,
            capture_output=True,
            text=True,
            timeout=COMPOSE_TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\n"
                f"daemon log tail:\n{self.daemon.log()[-3000:]}"
            )
        return result

    def containers(self) -> dict[str, dict[str, Any]]:
        """Inspect documents of the project's containers, by service."""
        client = self.daemon.client(timeout=60)
        try:
            listed = client.api.containers(
                all=True, filters={"label": f"{PROJECT_LABEL}={self.name}"}
            )
            found: dict[str, dict[str, Any]] = {}
            for item in listed:
                found[item["Labels"][SERVICE_LABEL]] = client.api.inspect_container(item["Id"])
            return found
        finally:
            client.close()

    def wait_for(
        self, what: str, check: Callable[[], bool], deadline: float = SETTLE_DEADLINE
    ) -> None:
        end = time.monotonic() + deadline
        while not check():
            if time.monotonic() > end:
                logs = self.compose("logs", "--no-color", check=False).stdout
                raise AssertionError(
                    f"{what} not within {deadline:.0f}s\nlogs:\n{logs[-3000:]}\n"
                    f"daemon log tail:\n{self.daemon.log()[-3000:]}"
                )
            time.sleep(1.0)

    def client_fetches(self) -> int:
        """How many times the client printed the server's page."""
        return self.compose("logs", "--no-color", "client").stdout.count(PAGE)


def daemon_processes(daemon: RunningDaemon) -> list[str]:
    """Command lines of the daemon's helper processes still running (QEMU, slirp4netns
    …): every process whose environment names its run directory, less the daemon and
    the network switch (which lives as long as the daemon, by design)."""
    marker = f"HUSK_RUN_DIR={daemon.run_dir}".encode()
    found: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == daemon.process.pid:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in environ and "husk.network.switch" not in cmdline and cmdline:
            found.append(cmdline)
    return found


def fetch_published(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.settimeout(30)
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_compose_project_up_ps_logs_exec_down(
    compose_daemon: RunningDaemon, tmp_path: Path, variant: Variant
) -> None:
    port = free_port()
    project = Project(compose_daemon, tmp_path / "app", f"app{variant.name.replace('-', '')}")
    project.directory.mkdir()
    (project.directory / "docker-compose.yml").write_text(variant.compose_file(port))
    network_name = f"{project.name}_default"
    try:
        up = project.compose("up", "-d")
        if variant.project_network:
            assert f'Creating network "{network_name}"' in up.stderr, up.stderr
        else:
            assert "Creating network" not in up.stderr, up.stderr

        # ps: web and client up, the job done with 0.
        project.wait_for(
            "the job's exit",
            lambda: project.containers()["job"]["State"]["Status"] == "exited",
        )
        states = project.containers()
        assert set(states) == {"web", "client", "job"}
        assert states["job"]["State"]["ExitCode"] == 0
        assert states["web"]["State"]["Running"] and states["client"]["State"]["Running"]
        # depends_on: compose started web before the client
        assert iso_to_unix(states["web"]["State"]["StartedAt"]) <= iso_to_unix(
            states["client"]["State"]["StartedAt"]
        )
        running = project.compose("ps", "--services", "--filter", "status=running")
        assert sorted(running.stdout.split()) == ["client", "web"]
        table = project.compose("ps").stdout
        rows = {line.split()[0]: line for line in table.splitlines()[2:] if line.strip()}
        assert "Exit 0" in rows[f"{project.name}_job_1"], table
        assert " Up " in rows[f"{project.name}_web_1"], table
        assert f"127.0.0.1:{port}->80/tcp" in rows[f"{project.name}_web_1"], table
        assert " Up " in rows[f"{project.name}_client_1"], table

        # logs: the client got the server's page by the service's name.
        project.wait_for("the client's fetches", lambda: project.client_fetches() >= 2)
        job_logs = project.compose("logs", "--no-color", "job").stdout
        assert "job ran as 0" in job_logs, job_logs

        # exec: output, exit status, environment, working directory, user.
        page = project.compose("exec", "-T", "web", "cat", "/www/index.html").stdout
        assert page.strip() == PAGE
        failed = project.compose("exec", "-T", "client", "sh", "-c", "exit 3", check=False)
        assert failed.returncode == 3
        shown = project.compose(
            "exec", "-T", "-e", "GREETING=hi", "-w", "/tmp", "--user", "1000",
            "client", "sh", "-c", 'echo "$GREETING $(pwd) $(id -u)"',
        ).stdout  # fmt: skip
        assert shown.strip() == "hi /tmp 1000"

        # the published port, from the host
        response = fetch_published(port)
        assert response.startswith(b"HTTP/1.") and PAGE.encode() in response

        if variant.project_network:
            listed = compose_daemon.docker("network", "ls", "--format", "{{.Name}}").stdout
            assert network_name in listed.decode().split()
            for service, inspected in states.items():
                endpoint = inspected["NetworkSettings"]["Networks"][network_name]
                assert service in (endpoint["Aliases"] or []), endpoint

        # stop and start the client: it fetches again
        project.compose("stop", "client")
        assert project.containers()["client"]["State"]["Status"] == "exited"
        before = project.client_fetches()
        project.compose("start", "client")
        project.wait_for("fetches after a restart", lambda: project.client_fetches() > before)

        down = project.compose("down")
        if variant.project_network:
            assert f"Removing network {network_name}" in down.stderr, down.stderr
    finally:
        project.compose("down", "-t", "1", check=False)

    # Nothing is left: no container, no VM, no helper process, no network, no state.
    assert project.containers() == {}
    assert compose_daemon.docker("ps", "-aq").stdout.strip() == b""
    names = compose_daemon.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert network_name.encode() not in names
    assert set(names) <= {b"bridge", b"host", b"none"}, names  # the predefined ones only
    end = time.monotonic() + GONE_DEADLINE
    while (left := daemon_processes(compose_daemon)) and time.monotonic() < end:
        time.sleep(0.5)
    assert left == []
    assert list((compose_daemon.run_dir / "vms").glob("*")) == []
    assert list((compose_daemon.data_dir / "containers").glob("*")) == []
    mounts = Path("/proc/self/mounts").read_text()
    assert str(compose_daemon.root) not in mounts
    networks_dir = compose_daemon.data_dir / "networks"
    if networks_dir.is_dir():
        leftovers = [p.name for p in networks_dir.iterdir() if project.name in p.read_text()]
        assert leftovers == []
