"""``husk daemon`` as a process: socket, pid file, one daemon per directory, clean exit.

And the image half of the Docker API through real clients (the docker CLI and
docker-py) against a real registry on 127.0.0.1. Nothing here boots a VM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    RunningDaemon,
    daemon_busybox,
    daemon_env,
    husk_daemon,
    registry,
    registry_busybox,
    short_root,
    start_daemon,
)
from husk.daemon.location import daemon_answers
from registry_fixtures import FaultProxy
from testimages import small_image_layout

pytestmark = pytest.mark.registry
DAEMON_COMMAND = [sys.executable, "-c", "from husk.cli.main import main; main()", "daemon"]


def test_daemon_claims_its_socket_and_exits_cleanly() -> None:
    root = short_root()
    try:
        run_dir = root / "run"
        run_dir.mkdir(parents=True)
        stale = run_dir / "husk.sock"
        with socket.socket(socket.AF_UNIX) as leftover:  # a socket nobody serves any more
            leftover.bind(str(stale))
        daemon = start_daemon(root)
        try:
            assert daemon_answers(daemon.socket)
            assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
            assert (run_dir / "husk.pid").read_text().strip() == str(daemon.process.pid)
            assert "removing stale socket" in daemon.log()
            second = subprocess.run(
                DAEMON_COMMAND,
                env=daemon.env,
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert second.returncode == 125
            assert b"another husk daemon is running" in second.stderr
            assert b"Traceback" not in second.stderr
            assert daemon_answers(daemon.socket)  # the first one is undisturbed
        finally:
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(30) == 0
        assert not daemon.socket.exists()
        assert not (run_dir / "husk.pid").exists()
        assert "shutting down" in daemon.log()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_tcp_listener_is_loopback_only() -> None:
    """Even with TLS, never another address: guests and other hosts must not reach it.

    (Serving TCP with client certificates is in test_docker_api_tls.py.)
    """
    root = short_root()
    try:
        refused = subprocess.run(
            [*DAEMON_COMMAND, "--tcp", "0.0.0.0:2375", "--tlsverify"],
            env=daemon_env(root),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert refused.returncode == 125
        assert b"only loopback addresses are allowed" in refused.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_docker_cli_system_commands(husk_daemon: RunningDaemon) -> None:  # noqa: F811
    version = husk_daemon.docker("version", "--format", "{{json .Server}}")
    server = json.loads(version.stdout)
    assert server["ApiVersion"] == "1.50" and server["MinAPIVersion"] == "1.41"
    assert server["Os"] == "linux" and server["Arch"] == "amd64"
    assert any(c["Name"] == "Engine" for c in server["Components"])
    info = json.loads(husk_daemon.docker("info", "--format", "{{json .}}").stdout)
    assert info["OSType"] == "linux" and info["Driver"] == "husk"
    assert info["DockerRootDir"] == str(husk_daemon.data_dir)
    assert info["Swarm"]["LocalNodeState"] == "inactive"
    networks = husk_daemon.docker("network", "ls", "--format", "{{.Name}} {{.Driver}}")
    assert networks.stdout.decode().split("\n")[:3] == ["bridge bridge", "host host", "none null"]
    volumes = husk_daemon.docker("volume", "ls", "--quiet")
    assert volumes.stdout == b""
    refused = husk_daemon.docker("volume", "create", "-o", "type=tmpfs", "data", check=False)
    assert refused.returncode != 0 and b"not supported" in refused.stderr
    assert husk_daemon.docker("volume", "ls", "--quiet").stdout == b""


def test_docker_cli_pull_images_tag_save_load(
    husk_daemon: RunningDaemon,  # noqa: F811
    registry_busybox: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    pulled = husk_daemon.docker("pull", registry_busybox)
    text = pulled.stdout.decode()
    assert "latest: Pulling from husk/busybox" in text
    assert "Pull complete" in text or "Already exists" in text
    assert f"{registry_busybox}:latest" in text
    assert "Digest: sha256:" in text
    again = husk_daemon.docker("pull", registry_busybox).stdout.decode()
    assert f"Status: Image is up to date for {registry_busybox}:latest" in again

    rows = husk_daemon.docker("images", "--format", "{{.Repository}} {{.Tag}} {{.ID}}")
    assert f"{registry_busybox} latest " in rows.stdout.decode()
    inspect = json.loads(husk_daemon.docker("image", "inspect", registry_busybox).stdout)
    assert inspect[0]["RepoTags"] == [f"{registry_busybox}:latest"]
    assert inspect[0]["RepoDigests"][0].startswith(f"{registry_busybox}@sha256:")
    image_id = inspect[0]["Id"]
    history = husk_daemon.docker("history", "--format", "{{.ID}}", registry_busybox)
    assert history.stdout.decode().split()[0] == image_id[7:19]

    husk_daemon.docker("tag", registry_busybox, "husk.local/copy:v2")
    tagged = husk_daemon.docker("images", "--format", "{{.Repository}}:{{.Tag}}", "husk.local/copy")
    assert tagged.stdout.decode().split() == ["husk.local/copy:v2"]
    archive = tmp_path / "copy.tar"
    husk_daemon.docker("save", "-o", str(archive), "husk.local/copy:v2")
    assert archive.stat().st_size > 100_000
    removed = husk_daemon.docker("rmi", "husk.local/copy:v2").stdout.decode()
    assert "Untagged: husk.local/copy:v2" in removed
    assert "Deleted" not in removed  # the image keeps its registry name
    loaded = husk_daemon.docker("load", "-i", str(archive)).stdout.decode()
    assert "Loaded image: husk.local/copy:v2" in loaded
    husk_daemon.docker("rmi", "husk.local/copy:v2")

    missing = husk_daemon.docker("pull", f"{registry_busybox.split('/')[0]}/no/such", check=False)
    assert missing.returncode != 0
    assert b"Error response from daemon" in missing.stderr
    unknown = husk_daemon.docker("image", "inspect", "husk.local/nothing", check=False)
    assert unknown.returncode != 0 and b"No such image" in unknown.stderr


def test_docker_py_images_and_errors(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    import docker

    client = husk_daemon.client()
    try:
        assert client.ping() is True
        version = client.version()
        assert version["ApiVersion"] == "1.50" and version["Os"] == "linux"
        info = client.info()
        assert isinstance(info["Containers"], int) and info["OSType"] == "linux"

        repository = daemon_busybox.rsplit(":", 1)[0]
        messages: list[dict[str, Any]] = list(
            client.api.pull(repository, tag="latest", stream=True, decode=True)
        )
        assert messages[0] == {"status": "Pulling from husk/busybox", "id": "latest"}
        assert messages[-1]["status"] == f"Status: Image is up to date for {daemon_busybox}"
        layer_ids = {m["id"] for m in messages if "progressDetail" in m}
        assert layer_ids and all(len(i) == 12 for i in layer_ids)

        image = client.images.pull(repository, tag="latest")
        assert daemon_busybox in image.tags
        assert image.id in {i.id for i in client.images.list()}
        assert client.images.get(image.id[7:17]).id == image.id
        image.tag("husk.local/pytag", "t1")
        assert "husk.local/pytag:t1" in client.images.get(image.id).tags
        client.images.remove("husk.local/pytag:t1")
        assert "husk.local/pytag:t1" not in client.images.get(image.id).tags

        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get("husk.local/absent:1")
        with pytest.raises(docker.errors.NotFound):
            client.containers.get("absent-container")
        with pytest.raises(docker.errors.ImageNotFound):
            client.api.create_container("husk.local/absent:1")
        with pytest.raises(docker.errors.APIError) as bad:
            client.containers.list(filters={"colour": "blue"})
        assert bad.value.status_code == 400
        with pytest.raises(docker.errors.APIError) as unsupported:
            client.volumes.create("data", driver="nfs")
        assert unsupported.value.status_code == 501

        created = client.containers.create(daemon_busybox, "true", name="py-dup")
        try:
            with pytest.raises(docker.errors.APIError) as conflict:
                client.containers.create(daemon_busybox, "true", name="py-dup")
            assert conflict.value.status_code == 409
            with pytest.raises(docker.errors.APIError) as in_use:
                client.images.remove(daemon_busybox)
            assert in_use.value.status_code == 409
            assert created.status == "created"
            listed = client.containers.list(all=True, filters={"name": "py-dup"})
            assert [c.id for c in listed] == [created.id]
        finally:
            created.remove()
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(created.id)
    finally:
        client.close()
    assert os.path.exists(husk_daemon.socket)


def test_push_prune_and_disk_usage(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
    registry: Any,  # noqa: F811
) -> None:
    target = f"{registry.host}/husk/pushed:v1"
    husk_daemon.docker("tag", daemon_busybox, target)
    pushed = husk_daemon.docker("push", target).stdout.decode()
    assert f"The push refers to repository [{registry.host}/husk/pushed]" in pushed
    digest = registry.manifest_digest("husk/pushed:v1")
    assert f"v1: digest: {digest} size: " in pushed
    husk_daemon.docker("rmi", target)

    created = husk_daemon.docker("create", "--name", "never-started", daemon_busybox, "true")
    container_id = created.stdout.decode().strip()
    usage = json.loads(
        husk_daemon.docker("system", "df", "--format", "{{json .}}").stdout.decode().splitlines()[0]
    )
    assert usage["Type"] == "Images" and int(usage["TotalCount"]) >= 1
    images_pruned = husk_daemon.docker("image", "prune", "--force").stdout.decode()
    assert "Total reclaimed space" in images_pruned  # nothing dangling: nothing removed
    names = husk_daemon.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.decode()
    assert daemon_busybox in names.split()
    pruned = husk_daemon.docker("container", "prune", "--force").stdout.decode()
    assert container_id in pruned
    listed = husk_daemon.docker("ps", "-a", "-q", "--no-trunc").stdout.decode().split()
    assert container_id not in listed


def test_pull_failure_after_progress_is_reported_in_stream(
    husk_daemon: RunningDaemon,  # noqa: F811
    registry: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    reference = registry.push_oci_layout(
        small_image_layout(tmp_path / "layout", "corrupt me"), "husk/corrupt"
    )
    manifest = json.loads(registry.inspect("husk/corrupt:latest", raw=True))
    layer = manifest["layers"][0]["digest"]
    client = husk_daemon.client()
    try:
        with FaultProxy(registry) as proxy:
            proxy.faults[layer] = "corrupt"
            repository = reference.replace(registry.host, proxy.host)
            messages = list(client.api.pull(repository, tag="latest", stream=True, decode=True))
            cli = husk_daemon.docker("pull", repository, check=False)
    finally:
        client.close()
    assert messages[0]["status"] == "Pulling from husk/corrupt"
    assert any(m.get("status") == "Pulling fs layer" for m in messages)
    last = messages[-1]
    assert set(last) == {"error", "errorDetail"}
    assert last["error"] == last["errorDetail"]["message"] and "digest" in last["error"]
    assert cli.returncode != 0
    assert b"Pulling fs layer" in cli.stdout and b"digest" in cli.stderr
