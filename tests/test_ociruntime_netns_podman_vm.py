"""A real VM joins the network namespace podman (with runc, its CNI bridge) made.

Everything podman does happens inside a network and mount namespace this test creates
(``unshare --net --mount``, with a private ``/run/netns``, its own storage, run and
temporary directories): its bridge, its NAT rules for ``-p``, its container's network
namespace. The VM then takes the container's interface over (:func:`attach` on
``/proc/PID/ns/net`` of the container's process) and a server in the guest is reached
through podman's bridge and through podman's published port, as clients of the
engine would reach it. Nothing touches the host's own network namespace.

husk-runtime (podman driving husk directly) is tested by the ocicore slice; this test
proves the network half with the engine's real plumbing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
SUBNET, BRIDGE = "10.89.7.0/24", "10.89.7.1"
HOST_PORT, GUEST_PORT = 8089, 7000

CONTAINERS_CONF = """
[containers]
default_ulimits=["nofile=1024:1024","nproc=1024:1024"]
[engine]
runtime="runc"
cgroup_manager="cgroupfs"
events_logger="file"
"""

SETUP = textwrap.dedent(
    """
    set -e
    mkdir -p /run/netns && mount -t tmpfs tmpfs /run/netns
    ip link set lo up
    cd "$WORK"
    mkdir -p image/bin
    cp /bin/busybox image/bin/
    for applet in sh sleep; do ln -s busybox image/bin/$applet; done
    tar -C image -cf image.tar .
    $PODMAN import image.tar localhost/husk-netns-test:1 >/dev/null
    $PODMAN network create --subnet {subnet} husknet >/dev/null
    $PODMAN run -d --name husk-netns-test --network husknet \\
        -p 127.0.0.1:{host_port}:{guest_port} localhost/husk-netns-test:1 sleep 600 >/dev/null
    echo READY $($PODMAN inspect husk-netns-test --format \\
        '{{{{.State.Pid}}}} {{{{.NetworkSettings.Networks.husknet.IPAddress}}}}')
    exec sleep 900
    """
).format(subnet=SUBNET, host_port=HOST_PORT, guest_port=GUEST_PORT)


@dataclass
class Engine:
    holder: int
    """A process in the engine's network and mount namespaces (for nsenter)."""
    container_pid: int
    container_ip: str

    def run(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.holder), "--net", "--mount", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, guest_bundle: object) -> Iterator[Path]:
    saved = os.environ.get("HUSK_DATA_DIR")
    data = tmp_path_factory.mktemp("podman-netns-data")
    os.environ["HUSK_DATA_DIR"] = str(data)
    os.environ.pop("HUSK_NO_TEMPLATE", None)
    yield data
    if saved is not None:
        os.environ["HUSK_DATA_DIR"] = saved


@contextlib.contextmanager
def podman_in_a_namespace(
    setup: str, container: str, extra_env: Callable[[Path], dict[str, str]] | None = None
) -> Iterator[tuple[Engine, str]]:
    """podman with its own storage and CNI configuration, inside a network and mount
    namespace made for it, running ``setup`` (which prints ``READY pid address`` of
    ``container``); yields the engine and podman's command line, and removes everything."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        raise AssertionError("podman and runc must be installed (install.sh)")
    # Short: podman refuses a run root longer than 50 characters.
    work = Path(tempfile.mkdtemp(prefix="husk-pm-"))
    for name in ("root", "runroot", "tmp", "cni"):
        (work / name).mkdir(parents=True)
    (work / "containers.conf").write_text(CONTAINERS_CONF)
    podman = (
        f"podman --root {work}/root --runroot {work}/runroot --tmpdir {work}/tmp "
        f"--network-config-dir {work}/cni --network-backend cni"
    )
    env = {
        **os.environ,
        "WORK": str(work),
        "PODMAN": podman,
        "CONTAINERS_CONF": str(work / "containers.conf"),
        **(extra_env(work) if extra_env is not None else {}),
    }
    holder = subprocess.Popen(
        ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", setup],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started: Engine | None = None
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline().split()
        if not line or line[0] != "READY":
            holder.kill()
            _, err = holder.communicate(timeout=30)
            raise AssertionError(f"podman could not start its container: {err[-2000:]}")
        started = Engine(holder.pid, int(line[1]), line[2])
        yield started, podman
    finally:
        if started is not None:
            started.run(*podman.split(), "rm", "-f", "-t", "0", container, timeout=120)
        holder.kill()
        holder.communicate(timeout=30)
        subprocess.run(["rm", "-rf", str(work)], check=False)


@pytest.fixture
def engine() -> Iterator[Engine]:
    with podman_in_a_namespace(SETUP, "husk-netns-test") as (started, _podman):
        yield started


async def sh(box: Sandbox, script: str, timeout: float = 60.0) -> tuple[int, str]:
    process = await box.client.exec(ProcessSpec(argv=["sh", "-c", script]))
    code, out, err = await asyncio.wait_for(process.collect(), timeout)
    return code, (out + err).decode(errors="replace")


CLIENT = """
import socket, sys, time
for attempt in range(30):
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
            data = s.recv(100).decode().strip()
            if data:
                print(data)
                sys.exit(0)
    except OSError as exc:
        print(exc, file=sys.stderr)
    time.sleep(1)
sys.exit(1)
"""


def test_a_vm_on_podmans_network_is_reached_through_its_bridge_and_published_port(
    store: Path, busybox_disk: Path, tmp_path: Path, engine: Engine
) -> None:
    attachment = netns.attach(f"/proc/{engine.container_pid}/ns/net")
    assert attachment is not None
    lan = attachment.network["lans"][0]
    assert lan["address"] == f"{engine.container_ip}/24"
    assert {"destination": "0.0.0.0/0", "gateway": BRIDGE} in lan["routes"]

    image = tmp_path / "image.erofs"
    subprocess.run(["cp", "--sparse=always", str(busybox_disk), str(image)], check=True)
    upper = tmp_path / "upper.ext4"
    make_ext4_disk(upper, 256 * MIB)
    config = SandboxConfig(
        state_dir=Path(os.environ["HUSK_RUN_DIR"]) / "vms" / f"podman-{os.urandom(3).hex()}",
        image_disk=image,
        upper_disk=upper,
        hostname="podman-netns",
        mac=random_mac(),
        memory_bytes=256 * MIB,
        egress=False,
        lan_taps=attachment.taps,
    )

    async def body() -> None:
        box = await Sandbox.boot(config)
        try:
            await box.client.run(ProcessSpec(argv=["sleep", "600"]))
            await box.client.configure_network(attachment.network)
            await box.client.exec(
                ProcessSpec(
                    argv=["sh", "-c", f"while true; do echo from-vm | nc -l -p {GUEST_PORT}; done"]
                )
            )
            # Through podman's bridge, to the address podman's IPAM gave the container.
            done = await asyncio.to_thread(
                engine.run, sys.executable, "-c", CLIENT, engine.container_ip, str(GUEST_PORT)
            )
            assert done.returncode == 0 and "from-vm" in done.stdout, done
            # Through podman's published port (its NAT rules in the engine's namespace).
            done = await asyncio.to_thread(
                engine.run, sys.executable, "-c", CLIENT, "127.0.0.1", str(HOST_PORT)
            )
            assert done.returncode == 0 and "from-vm" in done.stdout, done
            # The guest reaches the engine's side (its bridge address) by its route.
            code, out = await sh(box, f"ping -c 2 -W 5 {BRIDGE}")
            assert code == 0, out
        finally:
            await box.client.close()
            await box.machine.kill()

    try:
        asyncio.run(asyncio.wait_for(body(), DEADLINE))
    finally:
        attachment.close()
    # The container's namespace is as podman made it: no tap, no ingress qdisc.
    inside = ["nsenter", "-t", str(engine.container_pid), "--net"]
    links = subprocess.run([*inside, "ip", "-o", "link"], capture_output=True, text=True)
    assert links.returncode == 0 and "husktap" not in links.stdout, links
    qdiscs = subprocess.run(
        [*inside, "tc", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True
    )
    assert qdiscs.returncode == 0 and "ingress" not in qdiscs.stdout, qdiscs
