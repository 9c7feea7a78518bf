"""Containers that reach the host on purpose: a bound unix socket, /.dockerenv.

Real daemon, real VMs, the docker CLI on both sides: inside the container the host's
static docker CLI talks to husk through the daemon's own socket bound at
/var/run/docker.sock, as Ryuk and testcontainers' in-container mode do.
"""

from __future__ import annotations

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
from testimages import docker_cli_image_layout

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


def test_file_bind_is_still_refused(
    husk_daemon: RunningDaemon,  # noqa: F811
    docker_cli_image: str,
    tmp_path: Path,
) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    result = husk_daemon.docker(
        "run", "--rm", "-v", f"{plain}:/plain.txt", docker_cli_image, "true", check=False
    )
    assert result.returncode == 125
    assert b"is a file: husk shares directories only (9p)" in result.stderr
