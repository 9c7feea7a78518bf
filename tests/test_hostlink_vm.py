"""Containers that reach the host on purpose: a bound unix socket, /.dockerenv.

Real daemon, real VMs, the docker CLI on both sides: inside the container the host's
static docker CLI talks to husk through the daemon's own socket bound at
/var/run/docker.sock, as Ryuk and testcontainers' in-container mode do.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    RunningDaemon,
    husk_daemon,
    registry,
)
from registry_fixtures import RunningRegistry
from testimages import docker_cli_image_layout, python_testcontainers_image_layout

pytestmark = [pytest.mark.vm, pytest.mark.registry]


@pytest.fixture(scope="module")
def docker_cli_image(husk_daemon: RunningDaemon, registry: RunningRegistry) -> str:  # noqa: F811
    layout = Path(tempfile.mkdtemp(prefix="husk-dcli-")) / "layout"
    try:
        ref = registry.push_oci_layout(docker_cli_image_layout(layout), "husk/dockercli")
    finally:
        shutil.rmtree(layout.parent, ignore_errors=True)
    husk_daemon.docker("pull", f"{ref}:latest")
    return f"{ref}:latest"


@pytest.fixture(scope="module")
def python_image(husk_daemon: RunningDaemon, registry: RunningRegistry) -> str:  # noqa: F811
    layout = Path(tempfile.mkdtemp(prefix="husk-pytc-")) / "layout"
    try:
        ref = registry.push_oci_layout(python_testcontainers_image_layout(layout), "husk/pytc")
    finally:
        shutil.rmtree(layout.parent, ignore_errors=True)
    husk_daemon.docker("pull", f"{ref}:latest")
    return f"{ref}:latest"


def test_docker_socket_bind_reaches_the_daemon(
    husk_daemon: RunningDaemon,  # noqa: F811
    docker_cli_image: str,
) -> None:
    """Ryuk's way: the docker CLI in a container lists containers through the bound
    socket (it sees itself), and the container has Docker's /.dockerenv."""
    name = "hostlink-sockbind"
    script = (
        "stat -c 'dockerenv=%a:%s:%u' /.dockerenv; "
        "stat -c 'sock=%F' /var/run/docker.sock; "
        "docker ps --format 'seen={{.Names}}'; "
        "docker ps --format 'again={{.Names}}'"
    )
    result = husk_daemon.docker(
        "run",
        "--rm",
        "--name",
        name,
        "-v",
        f"{husk_daemon.socket}:/var/run/docker.sock",
        "-p",  # a published port too: the relay must not wait for the container's record
        "127.0.0.1::8080",
        docker_cli_image,
        "sh",
        "-c",
        script,
    )
    out = result.stdout.decode()
    assert "dockerenv=755:0:0" in out
    assert "sock=socket" in out
    assert f"seen={name}" in out
    assert f"again={name}" in out  # a second connection through the same bind


def test_fifo_bind_is_refused(
    husk_daemon: RunningDaemon,  # noqa: F811
    docker_cli_image: str,
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = husk_daemon.docker(
        "run", "--rm", "-v", f"{fifo}:/fifo", docker_cli_image, "true", check=False
    )
    assert result.returncode == 125
    assert b"neither a directory, a regular file nor a unix socket" in result.stderr


class _HostOnlyServer:
    """An HTTP server on the host's loopback that no container publishes."""

    def __init__(self) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"host-secret\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _wait_for_http(port: int, deadline: float = 120.0) -> bytes:
    import time
    import urllib.request

    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as r:
                return bytes(r.read())
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def test_gateway_reaches_published_ports_only(
    husk_daemon: RunningDaemon,  # noqa: F811
    docker_cli_image: str,
) -> None:
    """10.0.2.2:PORT from a guest reaches a port another husk container publishes on the
    host, and nothing else listening on the host's loopback (nor a port once unpublished)."""
    secret = _HostOnlyServer()
    try:
        husk_daemon.docker(
            "run",
            "-d",
            "--name",
            "hostlink-web",
            "-p",
            "127.0.0.1::80",
            docker_cli_image,
            "sh",
            "-c",
            "mkdir -p /w && echo hello-gateway > /w/index.html && exec httpd -f -p 80 -h /w",
        )
        mapped = husk_daemon.docker("port", "hostlink-web", "80/tcp").stdout.decode()
        published = int(mapped.strip().splitlines()[0].rsplit(":", 1)[1])
        assert _wait_for_http(published) == b"hello-gateway\n"
        probe = (
            "probe() { if timeout 20 wget -q -O- http://10.0.2.2:$1/index.html; "
            'then :; else echo "$2=refused"; fi; }; '
            f"probe {published} mapped; probe {secret.port} hostonly"
        )
        out = husk_daemon.docker("run", "--rm", docker_cli_image, "sh", "-c", probe)
        text = out.stdout.decode()
        assert "hello-gateway" in text, husk_daemon.log()[-3000:]
        assert "mapped=refused" not in text
        assert "hostonly=refused" in text
        assert "host-secret" not in text

        husk_daemon.docker("rm", "-f", "hostlink-web")
        after = husk_daemon.docker(
            "run",
            "--rm",
            docker_cli_image,
            "sh",
            "-c",
            probe.replace(f"probe {secret.port} hostonly", ""),
        )
        assert "mapped=refused" in after.stdout.decode()
    finally:
        secret.close()
        husk_daemon.docker("rm", "-f", "hostlink-web", check=False)


WEB_COMMAND = (
    "mkdir -p /w && echo hello-testcontainers > /w/index.html && exec httpd -f -p 80 -h /w"
)

TESTCONTAINERS_SCRIPT = """
import sys, time, urllib.request
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer
from testcontainers.core.utils import inside_container

testcontainers_config.ryuk_disabled = True
image = sys.argv[1]
with DockerContainer(image).with_exposed_ports(80).with_command(["sh", "-c", sys.argv[2]]) as web:
    host = web.get_container_host_ip()
    port = web.get_exposed_port(80)
    mode = web.get_docker_client().get_connection_mode().name
    print(f"inside={inside_container()} mode={mode} host={host}", flush=True)
    print(f"port={port} ports={web.get_wrapped_container().attrs['NetworkSettings']['Ports']}")
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/index.html", timeout=10) as r:
                print("body=" + r.read().decode().strip(), flush=True)
                break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
"""


def test_testcontainers_from_the_host(
    husk_daemon: RunningDaemon,  # noqa: F811
    python_image: str,
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    script = tmp_path / "tc.py"
    script.write_text(TESTCONTAINERS_SCRIPT)
    # The machine running the tests may itself be a container with a /.dockerenv:
    # say which mode is meant, as a user of a remote daemon would.
    env = {**husk_daemon.env, "TESTCONTAINERS_CONNECTION_MODE": "docker_host"}
    result = subprocess.run(
        [sys.executable, str(script), python_image, WEB_COMMAND],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-1000:] + husk_daemon.log()[-2000:]
    assert "mode=docker_host host=localhost" in result.stdout
    assert "body=hello-testcontainers" in result.stdout


def test_testcontainers_inside_a_container(
    husk_daemon: RunningDaemon,  # noqa: F811
    python_image: str,
) -> None:
    """testcontainers in a husk container: it sees /.dockerenv, drives husk through the
    bound socket, and reaches its sibling's mapped port at the gateway (10.0.2.2)."""
    result = husk_daemon.docker(
        "run",
        "--rm",
        "-v",
        f"{husk_daemon.socket}:/var/run/docker.sock",
        python_image,
        "python3",
        "-c",
        TESTCONTAINERS_SCRIPT,
        python_image,
        WEB_COMMAND,
        timeout=600,
    )
    out = result.stdout.decode()
    # testcontainers' own choice inside a container: the network's gateway (docker-py's
    # base URL names no unix scheme, so it does not take the docker_host route).
    assert "inside=True mode=gateway_ip host=172.17.0.1" in out
    assert "body=hello-testcontainers" in out
