"""The WireGuard overlay between two hosts, played by two husk daemons on this machine.

Each daemon (its own data and run directories) runs one busybox container; the test
generates X25519 keys and makes the two containers WireGuard peers through the CLI
(``overlay attach``, the group ``husk network overlay`` is made of). Every peer endpoint
is on 127.0.0.1: a guest reaches the other daemon's published listen port through its
own daemon's gateway relay, and nothing leaves the host's loopback.

* A wrong public key: no connectivity, and ``overlay status`` answers at once that there
  is no handshake (no hang).
* Bad input (bad key, bad CIDR): exit 125, one line naming the field; nothing changed.
* The right keys: each container pings the other's overlay IP and fetches HTTP from it
  (busybox httpd, fetched with nc); inspect shows the overlay address and the public key
  the guest kernel derived; resolv.conf has the overlay's server and domain.
* Daemon A killed with SIGKILL and started again: its relay and published listen port
  come back (the guest kept its interface), and the peers reach each other again.
* Detach: the interface and inspect's HuskOverlay are gone.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from daemon_fixtures import RunningDaemon, short_root, start_daemon

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

IMAGE = "husk.local/busybox:latest"
OVERLAY_CLI = [sys.executable, "-c", "from husk.cli.main import main; main()", "network"]
IP_A, IP_B = "10.200.0.1", "10.200.0.2"
PAGE_A, PAGE_B = "overlay-page-of-a", "overlay-page-of-b"


def keypair() -> tuple[str, str]:
    key = X25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(private).decode(), base64.b64encode(public).decode()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def overlay_config(
    ip: str, private: str, host_port: int, peer_ip: str, peer_key: str, peer_port: int
) -> dict[str, Any]:
    return {
        "overlay_ip": ip,
        "prefix_len": 24,
        "private_key": private,
        "listen_port": 51820,
        "host_port": host_port,
        "peers": [
            {
                "public_key": peer_key,
                "endpoint": f"127.0.0.1:{peer_port}",
                "allowed_ips": [f"{peer_ip}/32"],
                "persistent_keepalive_secs": 5,
            }
        ],
        "dns_server": "10.200.0.53",
        "dns_domain": "overlay.test",
    }


class Host:
    """One daemon ("host") and its container."""

    def __init__(self, daemon: RunningDaemon, container: str, workdir: Path) -> None:
        self.daemon = daemon
        self.container = container
        self.workdir = workdir

    def overlay(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*OVERLAY_CLI, "overlay", *args],
            env=self.daemon.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def attach(self, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        path = self.workdir / f"{self.container}-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(config))
        return self.overlay("attach", "--config", str(path), "--json", self.container)

    def sh(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return self.daemon.docker(
            "exec", self.container, "sh", "-c", script, check=False, timeout=timeout
        )

    def inspect_overlay(self) -> Any:
        out = self.daemon.docker(
            "inspect", "--format", "{{json .NetworkSettings.HuskOverlay}}", self.container
        )
        return json.loads(out.stdout)


def _start_host(name: str, workdir: Path) -> Host:
    daemon = start_daemon(short_root(f"husk-ov{name}-"), templates_from_session=True)
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("testimages.py")), "busybox"],
        env=daemon.env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    daemon.docker("run", "-d", "--name", name, IMAGE, "sleep", "3600")
    return Host(daemon, name, workdir)


@pytest.fixture
def two_hosts(guest_bundle: object, tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    hosts: list[Host] = []
    try:
        for name in ("a", "b"):
            hosts.append(_start_host(name, tmp_path))
        yield hosts[0], hosts[1]
    finally:
        for host in hosts:
            host.daemon.remove_all_containers()
            host.daemon.stop()
            shutil.rmtree(host.daemon.root, ignore_errors=True)


def _ping(host: Host, ip: str, tries: int = 5) -> bool:
    return any(host.sh(f"ping -c 1 -W 3 {ip}").returncode == 0 for _ in range(tries))


def _fetch(host: Host, ip: str) -> str:
    result = host.sh(f'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 10 {ip} 8080')
    return result.stdout.decode(errors="replace")


def test_two_daemons_join_their_containers_over_wireguard(two_hosts: tuple[Host, Host]) -> None:
    a, b = two_hosts
    private_a, public_a = keypair()
    private_b, public_b = keypair()
    _, public_stranger = keypair()
    port_a, port_b = free_udp_port(), free_udp_port()
    good_a = overlay_config(IP_A, private_a, port_a, IP_B, public_b, port_b)
    good_b = overlay_config(IP_B, private_b, port_b, IP_A, public_a, port_a)
    # B expects someone else's key: A's handshakes are never answered.
    wrong_b = overlay_config(IP_B, private_b, port_b, IP_A, public_stranger, port_a)

    # Shipped in the initramfs but not loaded at boot: boot time does not pay for it.
    assert a.sh("test -d /sys/module/wireguard").returncode != 0
    attached = a.attach(good_a)
    assert attached.returncode == 0, attached.stderr
    assert a.sh("test -d /sys/module/wireguard").returncode == 0
    report = json.loads(attached.stdout)
    assert report["PublicKey"] == public_a  # what the guest kernel derived
    assert report["HostIP"] == "127.0.0.1" and report["HostPort"] == port_a
    assert report["Relays"] == [{"Target": f"127.0.0.1:{port_b}", "GatewayPort": port_b}]
    attached = b.attach(wrong_b)
    assert attached.returncode == 0, attached.stderr

    # -- a wrong key: nothing gets through, and the status says so at once -------------
    assert not _ping(a, IP_B, tries=2)
    started = time.monotonic()
    status = a.overlay("status", a.container)
    assert status.returncode == 0, status.stderr
    assert time.monotonic() - started < 30
    assert f"peer {public_b}: no handshake" in status.stdout
    as_json = json.loads(a.overlay("status", "--json", a.container).stdout)
    assert as_json["Attached"] is True
    [peer] = as_json["Peers"]
    assert peer["Handshake"] is False and peer["LatestHandshake"] == 0
    assert peer["TxBytes"] > 0  # A did try

    # -- bad input: a clear one-line error, and nothing changes --------------------------
    before = a.inspect_overlay()
    for bad, words in (
        ({**good_a, "private_key": "bm90IGEga2V5"}, "private_key must be 32 bytes"),
        (
            {**good_a, "peers": [{**good_a["peers"][0], "allowed_ips": ["10.200.0.0/33"]}]},
            "not a valid IPv4 CIDR",
        ),
    ):
        refused = a.attach(bad)
        assert refused.returncode == 125
        assert words in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "Traceback" not in refused.stderr
    assert a.inspect_overlay() == before
    assert a.overlay("attach", "--config", "/nonexistent.json", a.container).returncode == 125

    # -- the right keys: ping and HTTP both ways ---------------------------------------
    attached = b.attach(good_b)
    assert attached.returncode == 0, attached.stderr
    for host, page in ((a, PAGE_A), (b, PAGE_B)):
        served = host.sh(f"mkdir -p /www && echo {page} > /www/index.html && httpd -p 8080 -h /www")
        assert served.returncode == 0, served.stderr
    assert _ping(a, IP_B), a.daemon.log()[-2000:]
    assert _ping(b, IP_A), b.daemon.log()[-2000:]
    assert PAGE_B in _fetch(a, IP_B)
    assert PAGE_A in _fetch(b, IP_A)

    status_a = json.loads(a.overlay("status", "--json", a.container).stdout)
    [peer] = status_a["Peers"]
    assert peer["Handshake"] is True and peer["RxBytes"] > 0
    shown = a.inspect_overlay()
    assert shown["IPAddress"] == IP_A and shown["PrefixLen"] == 24
    assert shown["PublicKey"] == public_a
    assert shown["ListenPort"] == 51820 and shown["HostPort"] == port_a
    resolv = a.sh("cat /etc/resolv.conf").stdout.decode().splitlines()
    assert resolv[:2] == ["search overlay.test", "nameserver 10.200.0.53"]

    # -- daemon A killed outright: the next one restores the host side ------------------
    os.kill(a.daemon.process.pid, signal.SIGKILL)
    a.daemon.process.wait(10)
    a.daemon = start_daemon(a.daemon.root)
    assert a.inspect_overlay()["HostPort"] == port_a
    assert _ping(a, IP_B), a.daemon.log()[-2000:]
    assert _ping(b, IP_A), a.daemon.log()[-2000:]
    assert PAGE_A in _fetch(b, IP_A)

    # -- detach ---------------------------------------------------------------------------
    detached = a.overlay("detach", a.container)
    assert detached.returncode == 0, detached.stderr
    assert a.sh("ip link show wg0").returncode != 0
    assert a.inspect_overlay() is None
    assert "nameserver 10.200.0.53" not in a.sh("cat /etc/resolv.conf").stdout.decode()
    assert json.loads(a.overlay("status", "--json", a.container).stdout)["Attached"] is False
    again = a.overlay("detach", a.container)
    assert again.returncode == 125 and "has no overlay" in again.stderr
    assert not _ping(b, IP_A, tries=1)
