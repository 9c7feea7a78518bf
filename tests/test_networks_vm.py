"""Container networks end to end: real daemon, real VMs, the docker CLI.

Containers on one user network reach each other by name, alias and address (TCP, UDP,
ping); other networks do not; internal networks have no way out; the default bridge
network joins containers by address only; connect/disconnect and stop/start keep
working; a daemon killed with -9 comes back to containers that still reach each other.
All traffic stays inside the VMs and husk's user-space switch (and 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    RunningDaemon,
    daemon_busybox,
    husk_daemon,
    kill_leftover_vms,
    registry,
    registry_busybox,
    short_root,
    start_daemon,
)
from registry_fixtures import RunningRegistry
from testimages import python_testcontainers_image_layout

pytestmark = [pytest.mark.vm, pytest.mark.registry]

HTTPD = (
    "mkdir -p /www && echo hello-from-$(hostname) > /www/index.html && exec httpd -f -p 80 -h /www"
)
UDP_ECHO = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('0.0.0.0', 9000))\n"
    "while True:\n"
    "    data, peer = s.recvfrom(2048)\n"
    "    s.sendto(b'echo:' + data, peer)\n"
)
UDP_ASK = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.settimeout(2)\n"
    "for _ in range(15):\n"
    "    s.sendto(b'ping', (sys.argv[1], 9000))\n"
    "    try:\n"
    "        print(s.recvfrom(2048)[0].decode()); break\n"
    "    except OSError:\n"
    "        pass\n"
    "else:\n"
    "    sys.exit(1)\n"
)


def fetch(host: str, port: int = 80, wait: int = 5) -> str:
    """A shell line fetching / from ``host`` (busybox wget crashes here: nc instead)."""
    return f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w {wait} {host} {port}"


def retry_fetch(host: str, port: int = 80) -> str:
    """``fetch`` retried for a few seconds (an httpd that is still starting)."""
    return f"for i in $(seq 20); do {fetch(host, port)} && exit 0; sleep 0.5; done; exit 1"


def inspect(daemon: RunningDaemon, name: str) -> dict[str, object]:
    result = daemon.docker("inspect", name)
    data = json.loads(result.stdout)
    assert isinstance(data, list) and data
    item = data[0]
    assert isinstance(item, dict)
    return item


def address_on(daemon: RunningDaemon, name: str, network: str) -> str:
    settings = inspect(daemon, name)["NetworkSettings"]
    assert isinstance(settings, dict)
    address = settings["Networks"][network]["IPAddress"]
    assert isinstance(address, str) and address
    return address


def sh(daemon: RunningDaemon, container: str, script: str, check: bool = True) -> str:
    result = daemon.docker("exec", container, "sh", "-c", script, check=check)
    return result.stdout.decode(errors="replace")


@pytest.fixture(scope="module")
def python_image(husk_daemon: RunningDaemon, registry: RunningRegistry) -> str:  # noqa: F811
    layout = Path(tempfile.mkdtemp(prefix="husk-pynet-")) / "layout"
    try:
        ref = registry.push_oci_layout(python_testcontainers_image_layout(layout), "husk/pynet")
    finally:
        shutil.rmtree(layout.parent, ignore_errors=True)
    husk_daemon.docker("pull", f"{ref}:latest")
    return f"{ref}:latest"


@pytest.fixture(scope="module")
def lan(husk_daemon: RunningDaemon, daemon_busybox: str) -> Iterator[str]:  # noqa: F811
    """web (httpd, alias www) and client on network e2e-a; other (httpd) on e2e-b."""
    d = husk_daemon
    d.docker("network", "create", "e2e-a")
    d.docker("network", "create", "--subnet", "172.29.5.0/24", "e2e-b")
    box = daemon_busybox
    d.docker("run", "-d", "--name", "e2e-web", "--network", "e2e-a", "--network-alias", "www",
             "-p", "127.0.0.1::80", box, "sh", "-c", HTTPD)  # fmt: skip
    d.docker("run", "-d", "--name", "e2e-client", "--network", "e2e-a", box, "sleep", "3600")
    d.docker("run", "-d", "--name", "e2e-other", "--network", "e2e-b", box, "sh", "-c", HTTPD)
    try:
        yield box
    finally:
        for name in ("e2e-web", "e2e-client", "e2e-other"):
            d.docker("rm", "-f", name, check=False)
        for network in ("e2e-a", "e2e-b"):
            d.docker("network", "rm", network, check=False)


def test_members_reach_each_other_by_name_alias_and_address(
    husk_daemon: RunningDaemon,  # noqa: F811
    lan: str,
) -> None:
    d = husk_daemon
    web = address_on(d, "e2e-web", "e2e-a")
    client = address_on(d, "e2e-client", "e2e-a")
    assert web != client
    assert web.startswith("172.") and client.startswith("172.")
    assert "hello-from-" in sh(d, "e2e-client", retry_fetch("e2e-web"))
    assert "hello-from-" in sh(d, "e2e-client", fetch("www"))
    assert "hello-from-" in sh(d, "e2e-client", fetch(web))
    short_id = str(inspect(d, "e2e-web")["Id"])[:12]
    assert "hello-from-" in sh(d, "e2e-client", fetch(short_id))
    assert " 0% packet loss" in sh(d, "e2e-client", "ping -c 2 -W 5 e2e-web")
    # the embedded resolver answers by the member's address on this network
    assert web in sh(d, "e2e-client", "nslookup e2e-web 127.0.0.11")
    # and back: web reaches the client by name (ping), the table holds both ways
    assert " 0% packet loss" in sh(d, "e2e-web", "ping -c 1 -W 5 e2e-client")


def test_another_network_is_out_of_reach(
    husk_daemon: RunningDaemon,  # noqa: F811
    lan: str,
) -> None:
    d = husk_daemon
    web = address_on(d, "e2e-web", "e2e-a")
    other = address_on(d, "e2e-other", "e2e-b")
    assert other.startswith("172.29.5.")
    started = time.monotonic()
    out = sh(d, "e2e-other", f"{fetch(web, wait=3)} && echo REACHED || echo FAILED", check=False)
    assert "FAILED" in out and "hello-from-" not in out
    assert time.monotonic() - started < 30
    out = sh(d, "e2e-other", "nslookup e2e-web 127.0.0.11 && echo RESOLVED || echo NX", check=False)
    assert "RESOLVED" not in out
    # ...while its own network's member answers it
    assert "hello-from-" in sh(d, "e2e-other", retry_fetch(other))


def test_udp_between_members(
    husk_daemon: RunningDaemon,  # noqa: F811
    lan: str,
    python_image: str,
) -> None:
    d = husk_daemon
    d.docker("run", "-d", "--name", "e2e-udp", "--network", "e2e-a", python_image,
             "python3", "-c", UDP_ECHO)  # fmt: skip
    try:
        d.docker("run", "--rm", "--network", "e2e-a", python_image,
                 "python3", "-c", UDP_ASK, "e2e-udp")  # fmt: skip
    finally:
        d.docker("rm", "-f", "e2e-udp", check=False)


def test_connect_and_disconnect_a_running_container(
    husk_daemon: RunningDaemon,  # noqa: F811
    lan: str,
) -> None:
    d = husk_daemon
    d.docker("network", "connect", "--alias", "late", "e2e-b", "e2e-client")
    assert "hello-from-" in sh(d, "e2e-client", retry_fetch("e2e-other"))
    # the member that was already running resolves the newcomer, by its alias too
    assert address_on(d, "e2e-client", "e2e-b") in sh(d, "e2e-other", "nslookup late 127.0.0.11")
    listed = json.loads(d.docker("network", "inspect", "e2e-b").stdout)[0]["Containers"]
    assert any(entry["Name"] == "e2e-client" for entry in listed.values())
    d.docker("network", "disconnect", "e2e-b", "e2e-client")
    out = sh(d, "e2e-client", f"{fetch('172.29.5.2', wait=3)} && echo REACHED || echo FAILED")
    assert "FAILED" in out
    # e2e-a is untouched
    assert "hello-from-" in sh(d, "e2e-client", fetch("e2e-web"))


def test_stop_start_keeps_the_address(
    husk_daemon: RunningDaemon,  # noqa: F811
    lan: str,
) -> None:
    d = husk_daemon
    before = address_on(d, "e2e-client", "e2e-a")
    d.docker("stop", "-t", "1", "e2e-client")
    d.docker("start", "e2e-client")
    assert address_on(d, "e2e-client", "e2e-a") == before
    assert "hello-from-" in sh(d, "e2e-client", retry_fetch("e2e-web"))


def test_a_network_in_use_cannot_be_removed(
    husk_daemon: RunningDaemon,  # noqa: F811
    lan: str,
) -> None:
    result = husk_daemon.docker("network", "rm", "e2e-a", check=False)
    assert result.returncode != 0
    assert b"active endpoints" in result.stderr
    assert b"e2e-a" in husk_daemon.docker("network", "ls").stdout


def test_internal_network_has_no_way_out(
    husk_daemon: RunningDaemon,  # noqa: F811
    lan: str,
) -> None:
    """Not the host's published ports, not the world; its members still meet."""
    d = husk_daemon
    port = int(d.docker("port", "e2e-web", "80/tcp").stdout.decode().split(":")[-1])
    # a member of a normal network reaches the published port through the VM's gateway
    assert "hello-from-" in sh(d, "e2e-client", fetch("10.0.2.2", port))
    # ...and through its network's gateway address, the host as on Docker's bridge
    settings = inspect(d, "e2e-client")["NetworkSettings"]
    assert isinstance(settings, dict)
    gateway = settings["Networks"]["e2e-a"]["Gateway"]
    assert "hello-from-" in sh(d, "e2e-client", fetch(gateway, port))
    d.docker("network", "create", "--internal", "e2e-int")
    try:
        d.docker("run", "-d", "--name", "e2e-int1", "--network", "e2e-int", lan, "sh", "-c", HTTPD)
        out = sh(d, "e2e-int1", f"{fetch('10.0.2.2', port, wait=3)} && echo OUT || echo SHUT",
                 check=False)  # fmt: skip
        assert "SHUT" in out and "hello-from-" not in out
        d.docker("run", "--rm", "--network", "e2e-int", lan, "sh", "-c", retry_fetch("e2e-int1"))
    finally:
        d.docker("rm", "-f", "e2e-int1", check=False)
        d.docker("network", "rm", "e2e-int", check=False)


def test_default_bridge_joins_by_address_only(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    d = husk_daemon
    d.docker("run", "-d", "--name", "e2e-plain", daemon_busybox, "sh", "-c", HTTPD)
    try:
        settings = inspect(d, "e2e-plain")["NetworkSettings"]
        assert isinstance(settings, dict)
        address = settings["IPAddress"]
        assert isinstance(address, str) and address.startswith("172.17.")
        assert settings["Networks"]["bridge"]["IPAddress"] == address
        out = d.docker(
            "run", "--rm", daemon_busybox, "sh", "-c",
            f"{retry_fetch(address)}; nslookup e2e-plain 127.0.0.11 && echo RESOLVED || echo NX",
            check=False,
        ).stdout.decode()  # fmt: skip
        assert "hello-from-" in out
        assert "RESOLVED" not in out
    finally:
        d.docker("rm", "-f", "e2e-plain", check=False)


def test_network_none_and_host(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    d = husk_daemon
    out = d.docker(
        "run", "--rm", "--network", "none", daemon_busybox, "sh", "-c",
        "ip -o -4 addr show | grep -v ' lo ' | wc -l; ip route | wc -l",
    ).stdout.decode().split()  # fmt: skip
    assert out == ["0", "0"]
    result = d.docker("run", "--rm", "--network", "host", daemon_busybox, "true", check=False)
    assert result.returncode != 0
    assert b"not supported" in result.stderr


def test_lan_survives_a_daemon_killed_with_minus_9(
    guest_bundle: object,
    registry_busybox: str,  # noqa: F811
) -> None:
    root = short_root("husk-nk-")
    daemon = start_daemon(root, templates_from_session=True)
    try:
        daemon.docker("pull", registry_busybox)
        box = f"{registry_busybox}:latest"
        daemon.docker("network", "create", "kn")
        daemon.docker("run", "-d", "--name", "kn-web", "--network", "kn", box, "sh", "-c", HTTPD)
        daemon.docker("run", "-d", "--name", "kn-client", "--network", "kn", box, "sleep", "600")
        assert "hello-from-" in sh(daemon, "kn-client", retry_fetch("kn-web"))
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait(10)
        daemon = start_daemon(root)
        assert "hello-from-" in sh(daemon, "kn-client", fetch("kn-web"))
        assert address_on(daemon, "kn-web", "kn").startswith("172.")
        daemon.docker("rm", "-f", "kn-web", "kn-client")
        daemon.docker("network", "rm", "kn")
    finally:
        daemon.remove_all_containers()
        daemon.stop()
        kill_leftover_vms(root)
        shutil.rmtree(root, ignore_errors=True)
