"""Starts that fail never hang or leak (issue 18 item 3), through the real daemon.

The docker CLI 28, docker-py and the husk CLI against husk's socket, each container
a real VM booted under TCG. What Docker 20.10 does is the reference: a command that
does not exist is exit code 127, one that cannot run 126, a missing user 128; the
container stays ``created`` with State.ExitCode and State.Error set; ``--rm`` (and
AutoRemove) removes it before the client is answered; the API answers 400 for
126/127 and 500 otherwise.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    RunningDaemon,
    daemon_busybox,
    husk_daemon,
    registry,
    registry_busybox,
)

pytestmark = [pytest.mark.vm, pytest.mark.registry]

# A failed start boots a VM and fails at once: well within this, or it hung.
START_FAILURE_DEADLINE = 150.0


def _names(daemon: RunningDaemon) -> list[str]:
    listed = daemon.docker("ps", "-a", "--format", "{{.Names}}")
    return listed.stdout.decode().split()


def _state(daemon: RunningDaemon, name: str) -> dict[str, Any]:
    client = daemon.client()
    try:
        return dict(client.api.inspect_container(name)["State"])
    finally:
        client.close()


@pytest.mark.timeout(900)
def test_docker_cli_failed_starts(husk_daemon: RunningDaemon, daemon_busybox: str) -> None:  # noqa: F811
    before = _names(husk_daemon)
    since = str(int(time.time()) - 1)

    # --rm: the client returns 127 at once (it waits for the removal) and nothing is left.
    missing = husk_daemon.docker(
        "run", "--rm", daemon_busybox, "/nonexistent", check=False, timeout=START_FAILURE_DEADLINE
    )
    assert missing.returncode == 127, missing.stderr
    assert b"executable file not found" in missing.stderr
    assert _names(husk_daemon) == before

    # Without --rm the container stays, created, with Docker's code and the reason.
    kept = husk_daemon.docker(
        "run", "--name", "fails-127", daemon_busybox, "/nonexistent", check=False
    )
    assert kept.returncode == 127, kept.stderr
    state = _state(husk_daemon, "fails-127")
    assert (state["Status"], state["ExitCode"], state["Running"]) == ("created", 127, False)
    assert "executable file not found" in state["Error"]

    cannot_run = husk_daemon.docker(
        "run", "--name", "fails-126", daemon_busybox, "/etc/passwd", check=False
    )
    assert cannot_run.returncode == 126, cannot_run.stderr
    state = _state(husk_daemon, "fails-126")
    assert (state["Status"], state["ExitCode"]) == ("created", 126)
    assert "permission denied" in state["Error"]

    # A user the image lacks: Docker's 128, and the CLI's own 125.
    no_user = husk_daemon.docker(
        "run", "--rm", "-u", "nosuchuser", daemon_busybox, "true", check=False
    )
    assert no_user.returncode == 125, no_user.stderr
    assert b"nosuchuser" in no_user.stderr
    assert set(_names(husk_daemon)) == {*before, "fails-126", "fails-127"}

    # Each failed start fired `die` with its code.
    events = husk_daemon.docker(
        "events",
        "--since",
        since,
        "--until",
        str(int(time.time()) + 1),
        "--filter",
        "event=die",
        "--format",
        "{{.Actor.Attributes.exitCode}}",
    )
    assert sorted(events.stdout.decode().split()) == ["126", "127", "127", "128"]

    # Starting it again fails the same way, and stays created.
    again = husk_daemon.docker("start", "fails-127", check=False)
    assert again.returncode != 0 and b"executable file not found" in again.stderr
    assert _state(husk_daemon, "fails-127")["Status"] == "created"
    husk_daemon.docker("rm", "fails-127", "fails-126")


@pytest.mark.timeout(900)
def test_dockerpy_and_husk_cli_failed_starts(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    import docker

    client = husk_daemon.client()
    try:
        before = {c.id for c in client.containers.list(all=True)}
        # AutoRemove: the error, and nothing left behind.
        with pytest.raises(docker.errors.APIError) as raised:
            client.containers.run(daemon_busybox, "/nonexistent", auto_remove=True)
        assert raised.value.status_code == 400
        assert "executable file not found" in str(raised.value)
        assert {c.id for c in client.containers.list(all=True)} == before

        # remove=True is docker-py's own removal after a wait it never reaches: as with
        # Docker, the start's error is raised and the created container is left.
        with pytest.raises(docker.errors.APIError) as raised:
            client.containers.run(daemon_busybox, "/nonexistent", remove=True, name="py-127")
        assert raised.value.status_code == 400
        left = client.containers.get("py-127")
        assert left.status == "created"
        assert left.attrs["State"]["ExitCode"] == 127
        left.remove()
    finally:
        client.close()

    husk = subprocess.run(
        [sys.executable, "-m", "husk.cli.main", "run", "--rm", daemon_busybox, "/nonexistent"],
        env=husk_daemon.env,
        capture_output=True,
        timeout=START_FAILURE_DEADLINE,
        check=False,
    )
    assert husk.returncode == 127, husk.stderr
    assert b"executable file not found" in husk.stderr
    assert b"Traceback" not in husk.stderr
    client = husk_daemon.client()
    try:
        assert {c.id for c in client.containers.list(all=True)} == before
    finally:
        client.close()
