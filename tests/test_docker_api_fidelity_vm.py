"""Detach keys, sizes, addresses, prune and pinned API versions with real VMs.

The docker CLI 28, docker-py and the husk CLI drive the real daemon; interactive
sessions run on pseudo-terminals as a user's shell runs them, the detach keys typed
one at a time as a user types them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    DOCKER_CLI,
    RunningDaemon,
    daemon_busybox,
    husk_daemon,
    registry,
    registry_busybox,
)
from terminal import Terminal

pytestmark = [pytest.mark.vm, pytest.mark.registry]

HUSK_CLI = [sys.executable, "-c", "from husk.cli.main import main; main()"]
MIB = 1024 * 1024


def state(daemon: RunningDaemon, name: str) -> dict[str, object]:
    inspect = daemon.docker("inspect", "--format", "{{json .State}}", name)
    result: dict[str, object] = json.loads(inspect.stdout)
    return result


def detach_from(terminal: Terminal, marker: str, keys: bytes = b"\x10\x11") -> int:
    """Run a command in the session, then type the detach keys; the CLI's exit code.

    The command goes in one write (no key of it matters to the CLI); the detach keys are
    typed one at a time, each a read of its own, as a user types them."""
    terminal.expect(b"# ")
    terminal.send(f"echo {marker}\r".encode())
    terminal.expect(marker.encode() + b"\r\n")
    terminal.type_keys(keys)
    return terminal.wait()


@pytest.mark.timeout(1200)
def test_detach_keys_leave_the_container_running(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    daemon = husk_daemon
    docker = [DOCKER_CLI]
    try:
        # docker run -it, then ctrl-p ctrl-q: the CLI returns 0, the shell runs on.
        session = Terminal(
            [*docker, "run", "-it", "--name", "dk", daemon_busybox, "sh"], daemon.env
        )
        assert detach_from(session, "one") == 0
        assert state(daemon, "dk")["Running"] is True

        # docker attach with the keys from the CLI's config file (sent as detachKeys too).
        config = tmp_path / "docker-config"
        config.mkdir()
        (config / "config.json").write_text(json.dumps({"detachKeys": "ctrl-e,e"}))
        env = {**daemon.env, "DOCKER_CONFIG": str(config)}
        session = Terminal([*docker, "attach", "dk"], env)
        session.send(b"\r")
        detach_from(session, "two", b"\x05e")
        assert b"two" in session.seen and state(daemon, "dk")["Running"] is True
        session = Terminal([*docker, "attach", "--detach-keys", "ctrl-x,y", "dk"], daemon.env)
        session.send(b"\r")
        detach_from(session, "three", b"\x18y")
        assert state(daemon, "dk")["Running"] is True

        # The daemon itself recognises the keys sent down the stream (docker-py's socket).
        client = daemon.client()
        try:
            sock = client.api.attach_socket(
                "dk", params={"stdin": 1, "stdout": 1, "stream": 1, "detachKeys": "ctrl-x,y"}
            )
            raw = sock._sock
            raw.settimeout(60)
            raw.sendall(b"echo four\n")
            received = b""
            while b"\nfour\r\n" not in received:  # the output, not the terminal's echo
                chunk = raw.recv(4096)
                assert chunk, f"the stream ended early: {received!r}"
                received += chunk
            raw.sendall(b"\x18yecho never\n")
            while chunk := raw.recv(4096):  # the daemon closes the stream on the keys
                received += chunk
            raw.close()
            time.sleep(1.1)  # --until counts whole seconds
            events = daemon.docker(
                "events",
                "--since",
                "5m",
                "--until",
                "0s",
                "--filter",
                "event=detach",
                "--format",
                "{{.Actor.Attributes.name}}",
            )
            assert b"dk" in events.stdout.split(), events.stdout
            assert state(daemon, "dk")["Running"] is True
            bad = client.api._post(
                client.api._url("/containers/dk/attach"),
                params={"stream": 1, "detachKeys": "ctrl-1"},
            )
            assert bad.status_code == 400 and "invalid detach keys" in bad.json()["message"]
        finally:
            client.close()

        # docker start -ai of a stopped container.
        daemon.docker("stop", "-t", "1", "dk")
        session = Terminal([*docker, "start", "-ai", "dk"], daemon.env)
        session.send(b"\r")
        assert detach_from(session, "five") == 0
        assert state(daemon, "dk")["Running"] is True

        # The husk CLI: run -it, attach --detach-keys, start -ai.
        session = Terminal(
            [*HUSK_CLI, "run", "-it", "--name", "hk", daemon_busybox, "sh"], daemon.env
        )
        assert detach_from(session, "six") == 0
        assert state(daemon, "hk")["Running"] is True
        session = Terminal([*HUSK_CLI, "attach", "--detach-keys", "ctrl-x,y", "hk"], daemon.env)
        session.send(b"\r")
        assert detach_from(session, "seven", b"\x18y") == 0
        assert state(daemon, "hk")["Running"] is True
        bad = subprocess.run(
            [*HUSK_CLI, "attach", "--detach-keys", "ctrl-1", "hk"],
            env=daemon.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert bad.returncode == 125 and b"invalid detach keys" in bad.stderr
        daemon.docker("stop", "-t", "1", "hk")
        session = Terminal([*HUSK_CLI, "start", "-ai", "hk"], daemon.env)
        session.send(b"\r")
        assert detach_from(session, "eight") == 0
        assert state(daemon, "hk")["Running"] is True
        # exec -it sessions detach the same way, through both CLIs.
        session = Terminal([*HUSK_CLI, "exec", "-it", "hk", "sh"], daemon.env)
        assert detach_from(session, "nine") == 0
        session = Terminal([*docker, "exec", "-it", "hk", "sh"], daemon.env)
        detach_from(session, "ten")
        assert state(daemon, "hk")["Running"] is True
        # Still a working shell after all that: its stdin stayed open.
        echoed = daemon.docker("exec", "hk", "sh", "-c", "echo alive")
        assert echoed.stdout == b"alive\n"
    finally:
        daemon.docker("rm", "-f", "dk", "hk", check=False)


@pytest.mark.timeout(900)
def test_sizes_address_prune_and_pinned_versions(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    import docker

    daemon = husk_daemon
    writer = "dd if=/dev/urandom of=/data bs=1M count=8 && sync && echo written && sleep 600"
    daemon.docker("run", "-d", "--name", "sized", daemon_busybox, "sh", "-c", writer)
    try:
        deadline = time.monotonic() + 120
        while b"written" not in daemon.docker("logs", "sized").stdout:
            assert time.monotonic() < deadline, "the writer did not finish"
            time.sleep(0.5)
        client = docker.APIClient(base_url=daemon.docker_host, version="1.50", timeout=120)
        try:
            (row,) = client.containers(filters={"name": "sized"}, size=True)
            image_size = client.inspect_image(daemon_busybox)["Size"]
            assert 8 * MIB <= row["SizeRw"] < 12 * MIB, row["SizeRw"]
            assert row["SizeRootFs"] == row["SizeRw"] + image_size
            sized = client._result(
                client._get(client._url("/containers/sized/json"), params={"size": 1}), json=True
            )
            assert sized["SizeRw"] == row["SizeRw"]
        finally:
            client.close()
        listing = daemon.docker("ps", "-s", "--filter", "name=sized", "--format", "{{.Size}}")
        assert re.match(rb"(8\.|9\.|1[01]\.)\d*MB \(virtual ", listing.stdout), listing.stdout

        # The address inspect reports is the one the guest has.
        network = json.loads(
            daemon.docker("inspect", "--format", "{{json .NetworkSettings}}", "sized").stdout
        )
        guest = daemon.docker(
            "exec",
            "sized",
            "sh",
            "-c",
            "ip -4 -o addr; cat /sys/class/net/*/address",
        ).stdout.decode()
        # The default bridge network's endpoint is one of the VM's LAN interfaces
        # (docs/NETWORKS.md); egress stays on eth0.
        assert f"inet {network['IPAddress']}/{network['IPPrefixLen']} " in guest, guest
        assert network["Gateway"] == "172.17.0.1"
        assert network["MacAddress"] in guest
        assert network["Networks"]["bridge"]["IPAddress"] == network["IPAddress"]

        # Pinned clients of every version in between are served.
        for version in ("1.44", "1.47", "1.50"):
            pinned = subprocess.run(
                [DOCKER_CLI, "version", "--format", "{{.Client.APIVersion}}"],
                env={**daemon.env, "DOCKER_API_VERSION": version},
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert pinned.returncode == 0 and pinned.stdout.strip() == version.encode(), pinned
            pinned_py = docker.DockerClient(base_url=daemon.docker_host, version=version)
            try:
                found = pinned_py.containers.list(filters={"name": "sized"})
                assert [c.name for c in found] == ["sized"]
            finally:
                pinned_py.close()

        # Endpoints husk lacks say so; prune of everything succeeds.
        update = daemon.docker("update", "--memory", "512m", "sized", check=False)
        assert update.returncode != 0 and b"not supported by husk" in update.stderr, update.stderr
        plugins = daemon.docker("plugin", "ls", check=False)
        assert plugins.returncode != 0 and b"not supported by husk" in plugins.stderr
        daemon.docker("create", "--name", "stopped", daemon_busybox, "true")
        pruned = daemon.docker("system", "prune", "-f", "-a", "--volumes")
        assert b"Total reclaimed space" in pruned.stdout
        names = daemon.docker("ps", "-a", "--format", "{{.Names}}").stdout.split()
        assert b"stopped" not in names and b"sized" in names
        assert daemon.docker("image", "inspect", daemon_busybox).returncode == 0  # in use: kept
    finally:
        daemon.docker("rm", "-f", "sized", "stopped", check=False)
