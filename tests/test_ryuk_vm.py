"""testcontainers with Ryuk enabled, against a real husk daemon.

Docker Hub is out of reach, so the image testcontainers asks for (``testcontainers/ryuk``)
is a stand-in built here: Debian's python3 with docker-py running a small program that
speaks Ryuk's protocol (the ``Started!`` log line, ``label=K=V`` filter lines answered with
``ACK`` on port 8080, and, once the last connection has been gone for the reconnection
timeout, the removal of everything matching the filters through the bound Docker socket).
The test process dies without cleaning up, as a crashed test run does: only Ryuk can then
remove its container.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    RunningDaemon,
    husk_daemon,
    registry,
)
from registry_fixtures import RunningRegistry
from testimages import file, python_testcontainers_image_layout

pytestmark = [pytest.mark.vm, pytest.mark.registry]

RYUK_STAND_IN = r"""
import os, signal, socket, sys, threading, time
from urllib.parse import parse_qs

def seconds(text):
    text = text.strip()
    return float(text[:-1]) if text.endswith("s") else float(text or 10)

TIMEOUT = seconds(os.environ.get("RYUK_RECONNECTION_TIMEOUT", "10s"))
lock = threading.Lock()
filters = []
state = {"open": 0, "seen": False, "idle_since": None}

def prune():
    import docker  # slow to import in an emulated VM: not before listening

    client = docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=120)
    for wanted in filters:
        for container in client.containers.list(all=True, filters=wanted):
            print(f"removing container {container.name}", flush=True)
            container.remove(force=True, v=True)
        for network in client.networks.list(filters=wanted):
            network.remove()
        for volume in client.volumes.list(filters=wanted):
            volume.remove(force=True)
        for image in client.images.list(filters=wanted):
            client.images.remove(image.id, force=True)
    print("reaped", flush=True)

def serve(conn):
    with lock:
        state["open"] += 1
        state["seen"] = True
    print("client connected", flush=True)
    buffer = b""
    try:
        while chunk := conn.recv(4096):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                query = line.decode().strip()
                if not query:
                    continue
                parsed = parse_qs(query)
                with lock:
                    filters.append(parsed)
                print(f"filter {parsed}", flush=True)
                conn.sendall(b"ACK\n")
    except OSError:
        pass
    finally:
        conn.close()
        with lock:
            state["open"] -= 1
            if state["open"] == 0:
                state["idle_since"] = time.monotonic()
        print("client gone", flush=True)

def on_term(*_):
    prune()
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
server = socket.create_server(("0.0.0.0", 8080))
threading.Thread(target=lambda: [
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
    for _ in iter(int, 1)
], daemon=True).start()
print("ryuk stand-in Started!", flush=True)
while True:
    time.sleep(0.2)
    with lock:
        idle = state["idle_since"]
        done = state["seen"] and state["open"] == 0 and idle is not None
    if done and time.monotonic() - idle >= TIMEOUT:
        prune()
        break
"""

SESSION_SCRIPT = """
import sys, time
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer

testcontainers_config.ryuk_disabled = False
container = DockerContainer(sys.argv[1]).with_command(["sleep", "600"]).start()
print("started=" + container.get_wrapped_container().id, flush=True)
time.sleep(600)
"""

RYUK_IMAGE = "testcontainers/ryuk:0.8.1"


@pytest.fixture(scope="module")
def ryuk_image(husk_daemon: RunningDaemon, registry: RunningRegistry) -> str:  # noqa: F811
    layout = Path(tempfile.mkdtemp(prefix="husk-ryuk-")) / "layout"
    try:
        image = python_testcontainers_image_layout(
            layout,
            extra=[file("ryuk.py", RYUK_STAND_IN)],
            cmd=["python3", "-u", "/ryuk.py"],
        )
        ref = registry.push_oci_layout(image, "husk/ryuk")
    finally:
        shutil.rmtree(layout.parent, ignore_errors=True)
    husk_daemon.docker("pull", f"{ref}:latest")
    husk_daemon.docker("tag", f"{ref}:latest", RYUK_IMAGE)
    return f"{ref}:latest"


def _ids(daemon: RunningDaemon, *filters: str) -> list[str]:
    args = [arg for f in filters for arg in ("--filter", f)]
    out = daemon.docker("ps", "-a", "-q", "--no-trunc", *args).stdout.decode()
    return out.split()


def test_ryuk_reaps_a_dead_sessions_container(
    husk_daemon: RunningDaemon,  # noqa: F811
    ryuk_image: str,
    tmp_path: Path,
) -> None:
    script = tmp_path / "session.py"
    script.write_text(SESSION_SCRIPT)
    env = {
        **husk_daemon.env,
        "TESTCONTAINERS_CONNECTION_MODE": "docker_host",
        "RYUK_RECONNECTION_TIMEOUT": "2s",
    }
    session = subprocess.Popen(
        [sys.executable, str(script), ryuk_image],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = ""
    try:
        assert session.stdout is not None
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and session.poll() is None:
            line = session.stdout.readline()
            if line.startswith("started="):
                started = line.strip().removeprefix("started=")
                break
        if not started:
            session.kill()
            _, err = session.communicate(timeout=30)
            pytest.fail(f"no container started: {err[-2000:]}\n{husk_daemon.log()[-3000:]}")

        ryuk = husk_daemon.client().containers.list(filters={"name": "testcontainers-ryuk-"})
        assert len(ryuk) == 1
        mounts = ryuk[0].attrs["Mounts"]
        assert any(m["Destination"] == "/var/run/docker.sock" for m in mounts), mounts
        # testcontainers 4.15 sets Ryuk's log wait after starting it, so it never waits:
        # it dials at once and husk holds the connection until the port opens.
        end = time.monotonic() + 120
        while "filter {" not in (ryuk_log := ryuk[0].logs().decode()) and time.monotonic() < end:
            time.sleep(1)
        assert "Started!" in ryuk_log
        assert "filter {'label': ['org.testcontainers.session-id=" in ryuk_log, ryuk_log
        assert _ids(husk_daemon, f"id={started}") == [started]
    finally:
        session.send_signal(signal.SIGKILL)  # a crashed test run: no atexit, no stop
        session.communicate(timeout=30)

    deadline = time.monotonic() + 180
    while _ids(husk_daemon, f"id={started}") and time.monotonic() < deadline:
        time.sleep(1)
    assert _ids(husk_daemon, f"id={started}") == [], husk_daemon.log()[-3000:]
    # Ryuk then exits and, started with auto_remove, goes too.
    while _ids(husk_daemon, "name=testcontainers-ryuk-") and time.monotonic() < deadline:
        time.sleep(1)
    assert _ids(husk_daemon, "name=testcontainers-ryuk-") == []
