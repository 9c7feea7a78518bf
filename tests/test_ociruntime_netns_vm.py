"""A real VM joins a network namespace set up as an engine would (husk.ociruntime.netns).

The test makes two network namespaces of its own joined by a veth pair: the "container"
one (``eth0``, 10.88.0.2/24, a default route and a route to 10.99.0.0/24 via the peer,
as CNI/netavark leave it) and the "peer" one (10.88.0.1/24, and 10.99.0.1 on its
loopback, standing for the engine's bridge and what lies behind it), and a second veth
pair for a second network (``net1``, 10.77.0.2/24, MTU 1400). A VM restored from
the boot template gets the container namespace's interfaces through :func:`attach`
(``SandboxConfig.lan_taps``) and the NETWORK body it returns. Nothing leaves these two
namespaces; the host's own is never changed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from husk.agent.client import ProcessSpec
from husk.oci.rootfs import make_ext4_disk
from husk.ociruntime import netns
from husk.sandbox.sandbox import Sandbox, SandboxConfig
from husk.vm.machine import random_mac

pytestmark = [
    pytest.mark.vm,
    pytest.mark.usefixtures("as_root"),
]

MIB = 1024 * 1024
DEADLINE = 300.0
GUEST, PEER, BEYOND = "10.88.0.2", "10.88.0.1", "10.99.0.1"
SECOND_GUEST, SECOND_PEER = "10.77.0.2", "10.77.0.1"
"""A second network of the engine's: interface ``net1`` (slot 2), MTU 1400, no routes."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, guest_bundle: object) -> Iterator[Path]:
    """A data directory of this module's own: the template is built here, from scratch."""
    saved = os.environ.get("HUSK_DATA_DIR")
    data = tmp_path_factory.mktemp("netns-data")
    os.environ["HUSK_DATA_DIR"] = str(data)
    os.environ.pop("HUSK_NO_TEMPLATE", None)
    yield data
    if saved is not None:
        os.environ["HUSK_DATA_DIR"] = saved


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def in_netns(name: str, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """(container, peer) namespaces joined by a veth pair; always deleted."""
    tag = os.urandom(3).hex()
    container, peer = f"husk-test-c-{tag}", f"husk-test-p-{tag}"
    made: list[str] = []
    try:
        for name in (container, peer):
            ip("netns", "add", name)
            made.append(name)
        veth = ["type", "veth", "peer", "name", f"hp{tag}", "netns", peer]
        ip("-n", container, "link", "add", "eth0", *veth)
        ip("-n", container, "addr", "add", f"{GUEST}/24", "dev", "eth0")
        ip("-n", container, "link", "set", "eth0", "up")
        ip("-n", container, "link", "set", "lo", "up")
        ip("-n", container, "route", "add", "default", "via", PEER)
        ip("-n", container, "route", "add", "10.99.0.0/24", "via", PEER)
        ip("-n", peer, "addr", "add", f"{PEER}/24", "dev", f"hp{tag}")
        ip("-n", peer, "link", "set", f"hp{tag}", "up")
        ip("-n", peer, "addr", "add", f"{BEYOND}/32", "dev", "lo")
        second = ["type", "veth", "peer", "name", f"hq{tag}", "netns", peer]
        ip("-n", container, "link", "add", "net1", "mtu", "1400", *second)
        ip("-n", container, "addr", "add", f"{SECOND_GUEST}/24", "dev", "net1")
        ip("-n", container, "link", "set", "net1", "up")
        ip("-n", peer, "link", "set", f"hq{tag}", "mtu", "1400")
        ip("-n", peer, "addr", "add", f"{SECOND_PEER}/24", "dev", f"hq{tag}")
        ip("-n", peer, "link", "set", f"hq{tag}", "up")
        ip("-n", peer, "link", "set", "lo", "up")
        yield container, peer
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


async def sh(box: Sandbox, script: str, timeout: float = 60.0) -> tuple[int, str]:
    process = await box.client.exec(ProcessSpec(argv=["sh", "-c", script]))
    code, out, err = await asyncio.wait_for(process.collect(), timeout)
    return code, (out + err).decode(errors="replace")


CLIENT = """
import socket, sys, time
for attempt in range(30):
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
            print(s.recv(100).decode().strip())
            sys.exit(0)
    except OSError as exc:
        print(exc, file=sys.stderr)
        time.sleep(1)
sys.exit(1)
"""

SERVER = """
import socket, sys
with socket.create_server((sys.argv[1], int(sys.argv[2]))) as server:
    server.settimeout(120)
    print("listening", flush=True)
    with server.accept()[0] as conn:
        conn.sendall(b"from-peer " + repr(conn.getpeername()[0]).encode() + b"\\n")
"""


def plumbing(container: str) -> str:
    """What husk may have left in the namespace: links and eth0's qdiscs."""
    links = json.loads(ip("-n", container, "-json", "link", "show"))
    qdiscs = "".join(
        in_netns(container, "tc", "qdisc", "show", "dev", device).stdout
        for device in ("eth0", "net1")
    )
    return " ".join(link["ifname"] for link in links) + " | " + qdiscs


def test_a_vm_serves_and_reaches_through_an_engine_namespace(
    store: Path, busybox_disk: Path, tmp_path: Path, namespaces: tuple[str, str]
) -> None:
    container, peer = namespaces
    mac = json.loads(ip("-n", container, "-json", "link", "show", "eth0"))[0]["address"]
    before = plumbing(container)
    image = tmp_path / "image.erofs"
    subprocess.run(["cp", "--sparse=always", str(busybox_disk), str(image)], check=True)
    upper = tmp_path / "upper.ext4"
    make_ext4_disk(upper, 256 * MIB)

    attachment = netns.attach(f"/run/netns/{container}")
    assert attachment is not None
    assert list(attachment.taps) == [1, 2] and attachment.interfaces == {1: "eth0", 2: "net1"}
    lan = attachment.network["lans"][0]
    assert (lan["mac"], lan["address"], lan["mtu"]) == (mac, f"{GUEST}/24", 1500)
    assert lan["routes"] == [
        {"destination": "0.0.0.0/0", "gateway": PEER},
        {"destination": "10.99.0.0/24", "gateway": PEER},
    ]
    assert "husktap0" in plumbing(container) and "ingress" in plumbing(container)

    config = SandboxConfig(
        state_dir=Path(os.environ["HUSK_RUN_DIR"]) / "vms" / f"netns-{os.urandom(3).hex()}",
        image_disk=image,
        upper_disk=upper,
        hostname="netns",
        mac=random_mac(),
        memory_bytes=256 * MIB,
        egress=False,
        lan_taps=attachment.taps,
    )
    server: subprocess.Popen[str] | None = None

    async def body() -> None:
        nonlocal server
        box = await Sandbox.boot(config)
        try:
            # The tap slot works on a VM restored from a template booted on sockets.
            assert box.boot_path == "template", box.cold_reason
            await box.client.run(ProcessSpec(argv=["sleep", "600"]))
            reply = await box.client.configure_network(attachment.network)
            assert reply["interfaces"]["1"] == "eth1" and reply["interfaces"]["2"] == "eth2", reply
            code, out = await sh(box, "cat /sys/class/net/eth1/address /sys/class/net/eth1/mtu")
            assert out.split() == [mac, "1500"], out
            code, out = await sh(box, "cat /sys/class/net/eth2/mtu; ip -4 -o addr show eth2")
            assert out.split()[0] == "1400" and f"{SECOND_GUEST}/24" in out, out
            code, out = await sh(box, f"ping -c 2 -W 5 {SECOND_PEER}")
            assert code == 0, out
            code, out = await sh(box, "ip route")
            assert f"default via {PEER} dev eth1" in out, out
            assert f"10.99.0.0/24 via {PEER} dev eth1" in out, out

            # A client in the peer namespace reaches a server in the guest on the address
            # the engine gave the interface.
            await box.client.exec(
                ProcessSpec(argv=["sh", "-c", "echo tcp-from-guest | nc -l -p 7000"])
            )
            done = await asyncio.to_thread(
                in_netns, peer, sys.executable, "-c", CLIENT, GUEST, "7000"
            )
            assert done.returncode == 0 and "tcp-from-guest" in done.stdout, done

            # The guest reaches a server behind the peer through its route.
            server = subprocess.Popen(
                ["ip", "netns", "exec", peer, sys.executable, "-c", SERVER, BEYOND, "7001"],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert server.stdout is not None
            assert (await asyncio.to_thread(server.stdout.readline)).strip() == "listening"
            code, out = await sh(
                box, f"for i in 1 2 3 4 5 6 7 8 9 10; do nc {BEYOND} 7001 && exit 0; sleep 1; done"
            )
            assert code == 0 and f"from-peer '{GUEST}'" in out, out
        finally:
            await box.client.close()
            await box.machine.kill()

    try:
        asyncio.run(asyncio.wait_for(body(), DEADLINE))
    finally:
        if server is not None:
            server.kill()
            server.wait()
        attachment.close()
    # Nothing of husk's is left: no tap, eth0's qdiscs as they were; the engine's
    # address and routes never left.
    assert plumbing(container) == before
    assert f"{GUEST}/24" in ip("-n", container, "addr", "show", "dev", "eth0")
    assert f"10.99.0.0/24 via {PEER}" in ip("-n", container, "route")
