"""docker-compose 1.29 (Debian's, unmodified) against a real husk daemon, without VMs.

``docker-compose up --no-start`` creates a project's containers (and its network)
without starting them, so compose's own create, recreate, label-filtered listing
and event paths run here against the real daemon and nothing boots. What needs
running containers is in test_compose_vm.py.
"""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon_fixtures import RunningDaemon, husk_daemon  # noqa: F401 - fixtures
from testimages import BUSYBOX_NAME, install_busybox_image

COMPOSE = shutil.which("docker-compose") or "/usr/bin/docker-compose"
COMPOSE_AGENT = "docker-compose/1.29.2 docker-py/5.0.3 Linux/6.1.0"
COMPOSE_TIMEOUT = 120.0
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
ONEOFF_LABEL = "com.docker.compose.oneoff"

# docker-compose is one of the project's Debian packages (packaging/apt-packages.txt):
# missing, these tests fail at their first call, they are never skipped.


@pytest.fixture(scope="module")
def compose_daemon(husk_daemon: RunningDaemon) -> RunningDaemon:  # noqa: F811
    """The session's daemon with the busybox image, imported offline."""
    from husk.oci.store import ImageStore

    install_busybox_image(ImageStore(husk_daemon.data_dir / "images"))
    return husk_daemon


def compose(
    daemon: RunningDaemon, project_dir: Path, project: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [COMPOSE, "-p", project, *args],
        cwd=project_dir,
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=COMPOSE_TIMEOUT,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker-compose {' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\n"
            f"daemon log tail:\n{daemon.log()[-3000:]}"
        )
    return result


def write_project(directory: Path, job_command: str, *, bridge: bool = True) -> Path:
    """A two-service project: ``job`` depends on ``web``; no ports (nothing starts here)."""
    mode = "    network_mode: bridge\n" if bridge else ""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "docker-compose.yml").write_text(
        "services:\n"
        "  web:\n"
        f"    image: {BUSYBOX_NAME}\n"
        '    command: ["httpd", "-f", "-p", "80", "-h", "/www"]\n'
        f"{mode}"
        "  job:\n"
        f"    image: {BUSYBOX_NAME}\n"
        f"    command: {json.dumps(['sh', '-c', job_command])}\n"
        "    depends_on: [web]\n"
        f"{mode}"
    )
    return directory


def project_containers(daemon: RunningDaemon, project: str) -> list[dict[str, Any]]:
    client = daemon.client(timeout=60)
    try:
        found: list[dict[str, Any]] = client.api.containers(
            all=True, filters={"label": f"{PROJECT_LABEL}={project}"}
        )
        return found
    finally:
        client.close()


@pytest.fixture
def cleanup(compose_daemon: RunningDaemon) -> Iterator[list[str]]:
    """Projects to take down (containers force-removed) whatever the test did."""
    projects: list[str] = []
    yield projects
    client = compose_daemon.client(timeout=60)
    try:
        for project in projects:
            for item in project_containers(compose_daemon, project):
                client.api.remove_container(item["Id"], force=True)
    finally:
        client.close()


# -------------------------------------------------------------- unit tests


@pytest.mark.parametrize(
    ("agent", "offered"),
    [
        (COMPOSE_AGENT, "1.41"),
        ("docker-compose/1.25.0 docker-py/4.1.0 Linux/5.10", "1.41"),
        ("docker-compose/2.24.0", "1.50"),  # v2 (Go) reads the current fields
        ("docker-sdk-python/7.1.0", "1.50"),
        ("Docker-Client/28.0.0 (linux)", "1.50"),
        ("", "1.50"),
    ],
)
def test_version_offered_by_user_agent(agent: str, offered: str) -> None:
    from aiohttp.test_utils import make_mocked_request

    from husk.daemon.docker.routing import API_VERSION, offered_version

    request = make_mocked_request("GET", "/version", headers={"User-Agent": agent})
    assert offered_version(request) == offered
    assert API_VERSION == "1.50"


def test_container_events_carry_the_labels_name_and_image_winning() -> None:
    """A label called ``name`` or ``image`` cannot disguise the container (Docker's
    attributes are the labels overlaid with name and image)."""
    from types import SimpleNamespace

    from husk.runtime.events import Event, EventHub

    hub = EventHub()
    labels = {"name": "spoof", "image": "spoof", PROJECT_LABEL: "p"}
    record: Any = SimpleNamespace(
        id="ab" * 32, name="web", image_ref="busybox", spec=SimpleNamespace(labels=labels)
    )

    async def first_event() -> Event:
        events = hub.subscribe()
        waiting = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)  # subscribed
        hub.container_event(record, "die", exitCode="3")
        try:
            return await waiting
        finally:
            await events.aclose()

    event = asyncio.run(first_event())
    assert event.attributes == {
        "name": "web",
        "image": "busybox",
        PROJECT_LABEL: "p",
        "exitCode": "3",
    }
    assert labels["name"] == "spoof"  # the record's labels are not changed


# ------------------------------------------------------------------ version


def test_compose_is_offered_the_api_version_it_was_written_for(
    compose_daemon: RunningDaemon,
) -> None:
    """docker-py 5 adopts whatever ``/version`` says; compose 1.x then reads an image's
    ``ContainerConfig``, which Docker dropped in API 1.45: it is offered 1.41."""
    import docker

    legacy = docker.APIClient(
        base_url=compose_daemon.docker_host, version="auto", user_agent=COMPOSE_AGENT
    )
    current = docker.APIClient(base_url=compose_daemon.docker_host, version="auto")
    try:
        assert legacy.api_version == "1.41"
        assert current.api_version == "1.50"
        assert legacy.inspect_image(BUSYBOX_NAME)["ContainerConfig"]["Cmd"] == ["sh"]
        assert "ContainerConfig" not in current.inspect_image(BUSYBOX_NAME)
        assert legacy.version()["MinAPIVersion"] == "1.41"
    finally:
        legacy.close()
        current.close()


# ----------------------------------------------------------------- recreate


def test_compose_recreates_a_changed_service(
    compose_daemon: RunningDaemon, tmp_path: Path, cleanup: list[str]
) -> None:
    """A changed service is recreated (stop, rename, create, remove): the path that
    reads the old image's ``ContainerConfig``; nothing is left of the old container."""
    cleanup.append("recr")
    project_dir = write_project(tmp_path / "recr", "echo one")
    first = compose(compose_daemon, project_dir, "recr", "up", "--no-start")
    assert "Creating recr_web_1" in first.stderr and "Creating recr_job_1" in first.stderr
    before = {
        c["Labels"]["com.docker.compose.service"]: c
        for c in project_containers(compose_daemon, "recr")
    }
    assert set(before) == {"web", "job"}
    assert all(c["State"] == "created" for c in before.values())

    write_project(project_dir, "echo two")
    second = compose(compose_daemon, project_dir, "recr", "up", "--no-start")
    assert "Recreating recr_job_1" in second.stderr, second.stderr
    after = project_containers(compose_daemon, "recr")
    names = sorted(name for c in after for name in c["Names"])
    assert names == ["/recr_job_1", "/recr_web_1"]  # the renamed old job is gone
    job = next(c for c in after if c["Names"] == ["/recr_job_1"])
    assert job["Id"] != before["job"]["Id"]
    assert job["Command"] == "sh -c 'echo two'"
    web = next(c for c in after if c["Names"] == ["/recr_web_1"])
    assert web["Id"] == before["web"]["Id"]  # unchanged: kept

    ps = compose(compose_daemon, project_dir, "recr", "ps", "-q")
    assert sorted(ps.stdout.split()) == sorted(c["Id"] for c in after)

    compose(compose_daemon, project_dir, "recr", "down")
    assert project_containers(compose_daemon, "recr") == []


# ------------------------------------------------------------------- events


def _lines(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for_events(
    lines: queue.Queue[str], wanted: set[tuple[str, str]], deadline: float
) -> list[dict[str, Any]]:
    """Events compose printed until it has printed each (container name, action)."""
    seen: list[dict[str, Any]] = []
    while not wanted <= {(e["attributes"].get("name", ""), e["action"]) for e in seen}:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"events {wanted} not all seen; got {seen}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line.startswith("{"):
            seen.append(json.loads(line))
    return seen


def _wait_until_subscribed(daemon: RunningDaemon, lines: queue.Queue[str], project: str) -> None:
    """Creates and removes a stand-in container of the project until compose's event
    stream shows it: from then on compose sees every event of the project."""
    client = daemon.client(timeout=60)
    labels = {PROJECT_LABEL: project, SERVICE_LABEL: "web", ONEOFF_LABEL: "False"}
    deadline = time.monotonic() + 60
    try:
        while True:
            probe = client.api.create_container(BUSYBOX_NAME, "true", labels=labels)
            client.api.remove_container(probe["Id"])
            try:
                while True:
                    line = lines.get(timeout=2.0)
                    if probe["Id"] in line and '"destroy"' in line:
                        return
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        "docker-compose events never showed the stand-in container"
                    ) from None
    finally:
        client.close()


def test_compose_events_follow_its_project_by_label(
    compose_daemon: RunningDaemon, tmp_path: Path, cleanup: list[str]
) -> None:
    """``docker-compose events`` (and ``up``'s log printer) filter the stream on the
    project label: container events carry the container's labels, as Docker's do."""
    cleanup.append("evts")
    project_dir = write_project(tmp_path / "evts", "echo job")
    process = subprocess.Popen(
        [COMPOSE, "-p", "evts", "events", "--json"],
        cwd=project_dir,
        env=compose_daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = _lines(process)
        _wait_until_subscribed(compose_daemon, lines, "evts")
        compose(compose_daemon, project_dir, "evts", "up", "--no-start")
        created = _wait_for_events(
            lines, {("evts_web_1", "create"), ("evts_job_1", "create")}, time.monotonic() + 60
        )
        web = next(e for e in created if e["attributes"]["name"] == "evts_web_1")
        # compose takes "service" from the label and shows the other attributes
        assert web["service"] == "web"
        assert web["attributes"] == {"name": "evts_web_1", "image": BUSYBOX_NAME}

        compose(compose_daemon, project_dir, "evts", "down")
        _wait_for_events(
            lines, {("evts_web_1", "destroy"), ("evts_job_1", "destroy")}, time.monotonic() + 60
        )
    finally:
        process.terminate()
        process.wait(10)

    # Another project's events do not match the filter.
    client = compose_daemon.client(timeout=60)
    try:
        since = time.time() - 600
        other = list(
            client.api.events(
                since=since,
                until=time.time(),
                filters={"label": [f"{PROJECT_LABEL}=not-evts"]},
                decode=True,
            )
        )
        mine = list(
            client.api.events(
                since=since,
                until=time.time(),
                filters={"label": [f"{PROJECT_LABEL}=evts", "com.docker.compose.service=job"]},
                decode=True,
            )
        )
    finally:
        client.close()
    assert other == []
    assert [e["Action"] for e in mine] == ["create", "destroy"]


# ---------------------------------------------------------- project network


def test_compose_project_network_is_created_labelled_and_removed(
    compose_daemon: RunningDaemon, tmp_path: Path, cleanup: list[str]
) -> None:
    """Without ``network_mode`` compose makes ``<project>_default`` (labelled), gives
    each container an endpoint there with its service name as alias, and ``down``
    removes it."""
    import docker

    cleanup.append("pnet")
    project_dir = write_project(tmp_path / "pnet", "echo job", bridge=False)
    compose(compose_daemon, project_dir, "pnet", "up", "--no-start")
    # A second run compares the network with the file (driver, Options, IPAM, Internal,
    # EnableIPv6): an Options or Internal the daemon made up would be "changed".
    again = compose(compose_daemon, project_dir, "pnet", "up", "--no-start")
    assert "needs to be recreated" not in again.stderr, again.stderr
    client = compose_daemon.client(timeout=60)
    try:
        network = client.api.inspect_network("pnet_default")
        assert network["Labels"][PROJECT_LABEL] == "pnet"
        assert network["Labels"]["com.docker.compose.network"] == "default"
        listed = client.api.networks(filters={"label": [f"{PROJECT_LABEL}=pnet"]})
        assert [n["Name"] for n in listed] == ["pnet_default"]
        for service in ("web", "job"):
            inspected = client.api.inspect_container(f"pnet_{service}_1")
            endpoint = inspected["NetworkSettings"]["Networks"]["pnet_default"]
            assert service in (endpoint["Aliases"] or [])
            assert endpoint["NetworkID"] == network["Id"]
        # What compose does right before starting a container (Service.start_container
        # with its API version, 1.41): the endpoint it created lacks the short id as an
        # alias, so it disconnects the created container and connects it again with it.
        legacy = docker.APIClient(
            base_url=compose_daemon.docker_host, version="auto", user_agent=COMPOSE_AGENT
        )
        try:
            web = legacy.inspect_container("pnet_web_1")
            short_id = web["Id"][:12]
            legacy.disconnect_container_from_network(web["Id"], "pnet_default")
            legacy.connect_container_to_network(
                web["Id"], "pnet_default", aliases=["web", short_id], links=[]
            )
            again_web = legacy.inspect_container("pnet_web_1")
            endpoint = again_web["NetworkSettings"]["Networks"]["pnet_default"]
            assert {"web", short_id} <= set(endpoint["Aliases"] or []), endpoint
        finally:
            legacy.close()
    finally:
        client.close()
    compose(compose_daemon, project_dir, "pnet", "down")
    assert project_containers(compose_daemon, "pnet") == []
    client = compose_daemon.client(timeout=60)
    try:
        assert [n["Name"] for n in client.api.networks(names=["pnet_default"])] == []
    finally:
        client.close()
