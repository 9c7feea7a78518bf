"""Images by any name Docker accepts, and archives from other engines, through husk's socket.

The docker CLI and docker-py drive a husk daemon of this module's own: ``docker load`` of
archives written by a real docker engine (Debian's dockerd 20.10, in a temporary
directory) and by podman 4.3 (docker-archive and oci-archive), save -> load round trips
of an image already present (one image, every id spelling still resolving), and
containers created and run by full and short ids, ``sha256:`` ids, ``repo@digest``
and docker-py image objects. The engines pull the busybox test image from the
session's registry on 127.0.0.1; nothing leaves the loopback interface.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    DOCKER_CLI,
    RunningDaemon,
    registry,
    registry_busybox,
    short_root,
    start_daemon,
)

pytestmark = [pytest.mark.vm, pytest.mark.registry]

ENGINE_DEADLINE = 60.0
ENGINE_TIMEOUT = 300.0
CONTAINERS_CONF = """\
[containers]
default_ulimits=["nofile=1024:1024","nproc=1024:1024"]
[engine]
runtime="runc"
"""


@dataclass(frozen=True)
class EngineArchives:
    """The busybox test image as other engines save it, and the id they give it."""

    name: str
    image_id: str
    registry_digest: str
    archives: dict[str, Path]


def _run(argv: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=ENGINE_TIMEOUT, check=False
    )
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stdout}\n{result.stderr}"
    return result.stdout


def _dockerd_archive(workdir: Path, name: str) -> tuple[Path, str, str]:
    """``docker save`` of ``name`` by a dockerd of its own: (archive, image id, repo digest)."""
    workdir.mkdir(parents=True)
    socket = workdir / "dockerd.sock"
    env = {**os.environ, "DOCKER_HOST": f"unix://{socket}", "DOCKER_CONFIG": str(workdir)}
    with open(workdir / "dockerd.log", "wb") as log:
        dockerd = subprocess.Popen(
            [
                "dockerd",
                "--iptables=false",
                "--bridge=none",
                "--data-root",
                str(workdir / "data"),
                "--exec-root",
                str(workdir / "exec"),
                "--pidfile",
                str(workdir / "dockerd.pid"),
                "-H",
                f"unix://{socket}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + ENGINE_DEADLINE
        while subprocess.run([DOCKER_CLI, "version"], env=env, capture_output=True).returncode:
            assert dockerd.poll() is None, (workdir / "dockerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "dockerd did not answer"
            time.sleep(0.3)
        _run([DOCKER_CLI, "pull", name], env)  # 127.0.0.1: insecure is allowed for loopback
        archive = workdir / "dockerd-save.tar"
        _run([DOCKER_CLI, "save", "-o", str(archive), name], env)
        image_id, digests = _run(
            [DOCKER_CLI, "image", "inspect", "-f", "{{.Id}} {{json .RepoDigests}}", name], env
        ).split(" ", 1)
        return archive, image_id, json.loads(digests)[0].split("@", 1)[1]
    finally:
        dockerd.terminate()
        try:
            dockerd.wait(30)
        except subprocess.TimeoutExpired:
            dockerd.kill()
            dockerd.wait(10)


def _podman_archives(workdir: Path, name: str) -> dict[str, Path]:
    """``podman save`` of ``name`` in both formats, with storage of its own."""
    workdir.mkdir(parents=True)
    conf = workdir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    podman = ["podman", "--root", str(workdir / "root"), "--runroot", str(workdir / "run")]
    _run([*podman, "pull", "--tls-verify=false", name], env)
    archives = {}
    for archive_format in ("docker-archive", "oci-archive"):
        archive = workdir / f"podman-{archive_format}.tar"
        _run([*podman, "save", "--format", archive_format, "-o", str(archive), name], env)
        archives[f"podman {archive_format}"] = archive
    return archives


@pytest.fixture(scope="module")
def engine_archives(registry_busybox: str) -> Iterator[EngineArchives]:  # noqa: F811
    name = f"{registry_busybox}:latest"
    workdir = Path(tempfile.mkdtemp(prefix="husk-engines-"))
    try:
        archive, image_id, digest = _dockerd_archive(workdir / "dockerd", name)
        archives = {"docker 20.10": archive, **_podman_archives(workdir / "podman", name)}
        yield EngineArchives(name, image_id, digest, archives)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(guest_bundle: object) -> Iterator[RunningDaemon]:
    """A daemon of this module's own: its image store starts empty."""
    root = short_root("husk-names-")
    running = start_daemon(root, templates_from_session=True)
    try:
        yield running
    finally:
        running.remove_all_containers()
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def image_ids(daemon: RunningDaemon) -> list[str]:
    return daemon.docker("images", "-q", "--no-trunc").stdout.decode().split()


def store_entries(daemon: RunningDaemon) -> int:
    """How many images the daemon's store records (one per id, never two manifests)."""
    index = json.loads((daemon.data_dir / "images" / "index.json").read_text())
    return len(index["images"])


def test_docker_load_of_archives_written_by_docker_and_podman(
    daemon: RunningDaemon, engine_archives: EngineArchives
) -> None:
    for engine, archive in engine_archives.archives.items():
        for image_id in image_ids(daemon):
            daemon.docker("rmi", "-f", image_id)
        assert image_ids(daemon) == []
        loaded = daemon.docker("load", "-i", str(archive)).stdout.decode()
        assert loaded.strip() == f"Loaded image: {engine_archives.name}", engine
        assert image_ids(daemon) == [engine_archives.image_id], engine
        inspected = json.loads(daemon.docker("image", "inspect", engine_archives.name).stdout)
        assert inspected[0]["Id"] == engine_archives.image_id, engine
        assert inspected[0]["RepoTags"] == [engine_archives.name], engine
        # Docker records no repo digest on load: it cannot know the registry's.
        assert inspected[0]["RepoDigests"] == [], engine


def test_save_then_load_of_a_present_image_keeps_one_unambiguous_image(
    daemon: RunningDaemon, engine_archives: EngineArchives, tmp_path: Path
) -> None:
    name, image_id = engine_archives.name, engine_archives.image_id
    if name not in daemon.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.decode():
        daemon.docker("load", "-i", str(engine_archives.archives["docker 20.10"]))
    saved = daemon.docker("save", name).stdout
    for _ in range(2):
        again = daemon.docker("load", input=saved).stdout.decode()
        assert again.strip() == f"Loaded image: {name}"
    # Every archive of the same image, from every engine, is the same image here too.
    for archive in engine_archives.archives.values():
        daemon.docker("load", "-i", str(archive))
    assert image_ids(daemon) == [image_id]
    assert store_entries(daemon) == 1
    hex_id = image_id.removeprefix("sha256:")
    for spelling in (image_id, hex_id, hex_id[:12], f"sha256:{hex_id[:12]}"):
        got = daemon.docker("image", "inspect", "-f", "{{.Id}}", spelling).stdout.decode()
        assert got.strip() == image_id, spelling


def _create_config(daemon: RunningDaemon, container: str) -> tuple[str, str]:
    """(.Image, .Config.Image) of a container."""
    out = daemon.docker("inspect", "-f", "{{.Image}} {{.Config.Image}}", container).stdout
    image, config_image = out.decode().split()
    return image, config_image


def test_containers_are_created_by_every_image_spelling_without_a_registry(
    daemon: RunningDaemon, engine_archives: EngineArchives
) -> None:
    name, image_id = engine_archives.name, engine_archives.image_id
    if image_id not in image_ids(daemon):
        daemon.docker("load", "-i", str(engine_archives.archives["docker 20.10"]))
    # repo@digest as a registry knows it: pulled by digest, then used by that name.
    by_digest = f"{name.rsplit(':', 1)[0]}@{engine_archives.registry_digest}"
    daemon.docker("pull", by_digest)
    hex_id = image_id.removeprefix("sha256:")
    spellings = [hex_id[:12], hex_id, image_id, f"sha256:{hex_id[:12]}", by_digest]
    for number, spelling in enumerate(spellings):
        created = daemon.docker("create", "--name", f"spelled-{number}", spelling, "true")
        # Found locally: the CLI never went looking for "<id>:latest" in a registry.
        assert b"Unable to find image" not in created.stderr, spelling
        assert _create_config(daemon, f"spelled-{number}") == (image_id, spelling)
    # The API's own spelling: ``Image: "sha256:…"`` in the create body (docker-py low level).
    client = daemon.client()
    try:
        container = client.api.create_container(image=image_id, command=["true"])
        assert client.api.inspect_container(container["Id"])["Image"] == image_id
        client.api.remove_container(container["Id"])
    finally:
        client.close()
    # The husk CLI resolves ids locally too.
    husk_create = [sys.executable, "-m", "husk.cli.main", "create", "--name", "husk-by-id"]
    husk = subprocess.run(
        [*husk_create, hex_id[:12], "true"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert husk.returncode == 0 and "Unable to find" not in husk.stderr, husk.stderr
    assert _create_config(daemon, "husk-by-id") == (image_id, hex_id[:12])
    daemon.docker("rm", "husk-by-id", *(f"spelled-{n}" for n in range(len(spellings))))


def test_run_by_short_id_and_by_docker_py_image_object(
    daemon: RunningDaemon, engine_archives: EngineArchives
) -> None:
    image_id = engine_archives.image_id
    if image_id not in image_ids(daemon):
        daemon.docker("load", "-i", str(engine_archives.archives["podman oci-archive"]))
    short = image_id.removeprefix("sha256:")[:12]
    ran = daemon.docker("run", "--rm", short, "echo", "by-short-id")
    assert ran.stdout == b"by-short-id\n"
    assert b"Unable to find image" not in ran.stderr
    client = daemon.client()
    try:
        image = client.images.get(engine_archives.name)
        assert image.id == image_id
        output = client.containers.run(image, ["echo", "by-image-object"], remove=True)
        assert output == b"by-image-object\n"
    finally:
        client.close()
