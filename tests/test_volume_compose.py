"""docker-compose 1.29 volumes against a real husk daemon, without VMs (``up --no-start``):
a project's named volume, a relative bind and an anonymous volume; recreation keeps the
anonymous volume; ``down -v`` removes the named volume, ``volume prune`` the anonymous one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon_fixtures import RunningDaemon, husk_daemon  # noqa: F401 - fixtures
from test_compose_api import COMPOSE, compose, compose_daemon  # noqa: F401 - fixtures
from testimages import BUSYBOX_NAME

pytestmark = pytest.mark.skipif(not Path(COMPOSE).exists(), reason="no docker-compose")


def _mounts(daemon: RunningDaemon, container: str) -> dict[str, dict[str, object]]:
    shown = json.loads(daemon.docker("inspect", container).stdout)[0]
    return {m["Destination"]: m for m in shown["Mounts"]}


@pytest.mark.timeout(600)
def test_compose_named_bind_and_anonymous_volumes(
    compose_daemon: RunningDaemon,  # noqa: F811
    tmp_path: Path,
) -> None:
    d = compose_daemon
    project = tmp_path / "proj"
    (project / "conf").mkdir(parents=True)
    (project / "docker-compose.yml").write_text(
        "services:\n"
        "  db:\n"
        f"    image: {BUSYBOX_NAME}\n"
        "    network_mode: none\n"
        "    volumes:\n"
        "      - data:/var/lib/db\n"
        "      - ./conf:/conf:ro\n"
        "      - /cache\n"
        "volumes:\n"
        "  data:\n"
        "    labels:\n"
        "      tier: db\n"
    )
    try:
        compose(d, project, "volproj", "up", "--no-start")
        volume = json.loads(d.docker("volume", "inspect", "volproj_data").stdout)[0]
        assert volume["Labels"]["com.docker.compose.project"] == "volproj"
        assert volume["Labels"]["tier"] == "db"
        mounts = _mounts(d, "volproj_db_1")
        assert mounts["/var/lib/db"]["Name"] == "volproj_data"
        assert mounts["/conf"]["Type"] == "bind" and mounts["/conf"]["Source"] == str(
            project / "conf"
        )
        assert mounts["/conf"]["RW"] is False
        anonymous = mounts["/cache"]["Name"]
        assert mounts["/cache"]["Type"] == "volume" and len(str(anonymous)) == 64
        compose(d, project, "volproj", "up", "--no-start", "--force-recreate")
        assert _mounts(d, "volproj_db_1")["/cache"]["Name"] == anonymous  # compose keeps it
        compose(d, project, "volproj", "down", "-v")
        left = d.docker("volume", "ls", "-q").stdout.decode().split()
        # As with Docker: the recreated container named the old anonymous volume, so
        # rm -v spares it; it stays anonymous (labelled), and prune takes it.
        assert "volproj_data" not in left and anonymous in left
        assert anonymous in d.docker("volume", "prune", "-f").stdout.decode()
    finally:
        compose(d, project, "volproj", "down", "-v", check=False)
