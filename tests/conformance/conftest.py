"""Fixtures of the conformance suite: one husk daemon and one real dockerd per session.

``engine`` is parametrized over ("husk", "docker"): every scenario runs against both,
through the docker CLI and docker-py. ``oracle`` is the dockerd engine, so a husk test
can ask what Docker does and assert husk does the same; its observations are cached
per session (``observe``), so each docker scenario runs once whichever test asks first.

See ``engines.py`` for how dockerd is run on this machine and what was found.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from engines import Engine, observe, start_dockerd, stop_dockerd

from daemon_fixtures import RunningDaemon
from registry_fixtures import RunningRegistry
from testimages import LayoutWriter, busybox_spec

ENGINES = ("husk", "docker")


@pytest.fixture(scope="session")
def variant_images(registry: RunningRegistry) -> dict[str, str]:
    """Busybox images with their own ids (another label), for scenarios that may damage one.

    ``roundtrip`` is saved and loaded back while present (husk once made such an image
    unrunnable: "image id prefix … is ambiguous"); ``fromdocker`` is saved by dockerd and
    loaded into husk. Neither is the shared test image, so a failure stays in its test.
    """
    refs = {}
    for name in ("roundtrip", "fromdocker"):
        layout = Path(tempfile.mkdtemp(prefix="conf-img-")) / "layout"
        try:
            spec = busybox_spec()
            spec.labels = {**spec.labels, "husk.conformance.variant": name}
            writer = LayoutWriter(layout)
            writer.tag(writer.image(spec), "latest")
            refs[name] = registry.push_oci_layout(layout, f"husk/{name}") + ":latest"
        finally:
            shutil.rmtree(layout.parent, ignore_errors=True)
    return refs


@pytest.fixture(scope="session")
def docker_engine(registry_busybox: str, registry: RunningRegistry) -> Iterator[Engine]:
    """A real dockerd (Debian's docker.io) with the busybox test image pulled from the registry."""
    daemon = start_dockerd()
    config = daemon.root / "docker-config"
    config.mkdir()
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": str(daemon.root),
        "DOCKER_HOST": f"unix://{daemon.socket}",
        "DOCKER_CONFIG": str(config),
    }
    engine = Engine(
        "docker",
        env,
        image=f"{registry_busybox}:latest",
        run_args=("--network", "none"),
        log=daemon.log,
    )
    try:
        engine.docker("pull", "-q", engine.image, check=True)
        yield engine
    finally:
        stop_dockerd(daemon, engine)


@pytest.fixture(scope="session")
def husk_engine(husk_daemon: RunningDaemon, daemon_busybox: str) -> Engine:
    """The session's husk daemon with the same image (husk has no ``--network none``)."""
    return Engine("husk", dict(husk_daemon.env), image=daemon_busybox, log=husk_daemon.log)


@pytest.fixture(scope="session", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each engine in turn: the test runs once against husk and once against dockerd."""
    result: Engine = request.getfixturevalue(f"{request.param}_engine")
    return result


@pytest.fixture(scope="session")
def oracle(docker_engine: Engine) -> Engine:
    return docker_engine


@pytest.fixture
def same_as_docker(
    engine: Engine, request: pytest.FixtureRequest
) -> Callable[[str, Callable[[Engine], Any]], Any]:
    """Run a scenario on ``engine``; on husk, assert its observation equals dockerd's."""

    def check(key: str, scenario: Callable[[Engine], Any]) -> Any:
        observed = observe(engine, key, scenario)
        if engine.name != "docker":
            oracle_engine: Engine = request.getfixturevalue("docker_engine")
            expected = observe(oracle_engine, key, scenario)
            assert observed == expected, (
                f"husk differs from docker in {key}\n"
                f"husk's latest failed commands: {engine.errors}\n"
                f"docker's latest failed commands: {oracle_engine.errors}"
            )
        return observed

    return check
