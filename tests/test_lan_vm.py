"""Two real VMs on one LAN: their slot-1 switch ends joined by a relay (the switch's stand-in).

Both start from the boot template (the first builds it), so this also proves restored
VMs have working LAN interfaces. One of them starts without egress: the host gives it
no slirp4netns, and egress can be switched on and off on the live VM, also after it
was let go and found again (as after a daemon restart).

Traffic stays between the two VMs (172.30.0.0/16 exists only on the relay) and the
VMs' own loopback; nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from husk.agent.client import ProcessSpec
from husk.errors import InvalidArgument
from husk.guest.netconfig import LAN_SLOTS
from husk.oci.rootfs import make_ext4_disk
from husk.sandbox.sandbox import Sandbox, SandboxConfig
from husk.vm.machine import random_mac
from husk.vm.processes import process_start_ticks

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the VM jail (own network namespace) needs root"),
]

MIB = 1024 * 1024
MEMORY = 256 * MIB
UPPER_BYTES = 256 * MIB
DEADLINE = 240.0
A_ADDRESS, B_ADDRESS = "172.30.0.2", "172.30.0.3"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, guest_bundle: object) -> Iterator[Path]:
    """A data directory of this module's own: the template is built here, from scratch."""
    saved = os.environ.get("HUSK_DATA_DIR")
    data = tmp_path_factory.mktemp("lan-data")
    os.environ["HUSK_DATA_DIR"] = str(data)
    os.environ.pop("HUSK_NO_TEMPLATE", None)
    yield data
    if saved is not None:
        os.environ["HUSK_DATA_DIR"] = saved


@pytest.fixture
def image(store: Path, busybox_disk: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "image.erofs"
    subprocess.run(["cp", "--sparse=always", str(busybox_disk), str(copy)], check=True)
    return copy


class Ports:
    """The lan_ports hook: keeps every VM's switch ends, by machine id."""

    def __init__(self) -> None:
        self.by_machine: dict[str, dict[int, socket.socket]] = {}

    async def __call__(self, machine_id: str, ends: dict[int, socket.socket]) -> None:
        self.by_machine[machine_id] = ends

    def close(self) -> None:
        for ends in self.by_machine.values():
            for end in ends.values():
                end.close()


def box_config(image: Path, directory: Path, name: str, **changes: Any) -> SandboxConfig:
    upper = directory / f"{name}.ext4"
    make_ext4_disk(upper, UPPER_BYTES)
    state = Path(os.environ["HUSK_RUN_DIR"]) / "vms" / f"lan-{name}-{os.urandom(3).hex()}"
    config = SandboxConfig(
        state_dir=state,
        image_disk=image,
        upper_disk=upper,
        hostname=name,
        mac=random_mac(),
        memory_bytes=MEMORY,
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@asynccontextmanager
async def started(config: SandboxConfig) -> AsyncIterator[Sandbox]:
    box = await Sandbox.boot(config)
    try:
        yield box
    finally:
        await box.client.close()
        await box.machine.kill()


async def relay(one: socket.socket, other: socket.socket) -> None:
    """Copies the byte streams both ways: QEMU's framing passes through untouched."""
    loop = asyncio.get_running_loop()

    async def pump(source: socket.socket, target: socket.socket) -> None:
        while data := await loop.sock_recv(source, 1 << 16):
            await loop.sock_sendall(target, data)

    for end in (one, other):
        end.setblocking(False)
    await asyncio.gather(pump(one, other), pump(other, one))


async def sh(box: Sandbox, script: str, timeout: float = 60.0) -> tuple[int, str]:
    process = await box.client.exec(ProcessSpec(argv=["sh", "-c", script]))
    code, out, err = await asyncio.wait_for(process.collect(), timeout)
    return code, (out + err).decode(errors="replace")


def network_state(address: str, *, egress: bool, names: dict[str, list[str]]) -> dict[str, Any]:
    octets = [int(o) for o in address.split(".")]
    mac = "02:42:" + ":".join(f"{o:02x}" for o in octets)
    return {
        "egress": egress,
        "lans": [{"slot": 1, "mac": mac, "address": f"{address}/16", "mtu": 65520}],
        "unreachable": ["172.31.0.0/16"],
        "names": names,
        # Unknown names go to the other VM, where nothing serves DNS: a clean failure.
        "dns": {"servers": [B_ADDRESS if address == A_ADDRESS else A_ADDRESS]},
        "hosts": {"hostname": "h-" + address.rsplit(".", 1)[1], "address": address},
    }


def recorded_egress(box: Sandbox) -> dict[str, Any] | None:
    state = json.loads((box.machine.state_dir / "machine.json").read_text())
    egress: dict[str, Any] | None = state["egress"]
    return egress


def slirp_running(record: dict[str, Any]) -> bool:
    return process_start_ticks(int(record["pid"])) == record["start_ticks"]


@pytest.mark.vm
def test_two_template_restored_vms_share_a_lan(image: Path, tmp_path: Path) -> None:
    ports = Ports()

    async def body() -> None:
        config_a = box_config(image, tmp_path, "a", lan_ports=ports)
        config_b = box_config(image, tmp_path, "b", lan_ports=ports, egress=False)
        async with started(config_a) as a, started(config_b) as b:
            assert a.boot_path == "template", a.cold_reason
            assert b.boot_path == "template", b.cold_reason
            # The hook got every slot of both, under the state directory's name.
            assert set(ports.by_machine) == {config_a.state_dir.name, config_b.state_dir.name}
            assert all(len(ends) == LAN_SLOTS for ends in ports.by_machine.values())
            # The host enforces "no egress": no slirp4netns exists for b.
            assert recorded_egress(b) is None
            record_a = recorded_egress(a)
            assert record_a is not None and slirp_running(record_a)

            link = asyncio.create_task(
                relay(
                    ports.by_machine[config_a.state_dir.name][1],
                    ports.by_machine[config_b.state_dir.name][1],
                )
            )
            try:
                names = {"bee": [B_ADDRESS], "ay": [A_ADDRESS]}
                # a as the runtime starts a container: its network before its workload
                # (the agent skips what it set itself at boot, e.g. IPv6 off, the MTU);
                # b the other way round, as a later connect does.
                reply_a = await a.client.configure_network(
                    network_state(A_ADDRESS, egress=True, names=names)
                )
                await a.client.run(ProcessSpec(argv=["sleep", "600"]))
                await b.client.run(ProcessSpec(argv=["sleep", "600"]))
                reply_b = await b.client.configure_network(
                    network_state(B_ADDRESS, egress=False, names=names)
                )
                assert reply_a["interfaces"]["1"] == "eth1", reply_a
                assert reply_b["interfaces"]["1"] == "eth1", reply_b
                # Idempotent: the same state again changes nothing and still works.
                await a.client.configure_network(network_state(A_ADDRESS, egress=True, names=names))
                await check_lan(a, b)
            finally:
                link.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await link
            await check_egress_switch(b)

    try:
        asyncio.run(asyncio.wait_for(body(), DEADLINE))
    finally:
        ports.close()


async def check_lan(a: Sandbox, b: Sandbox) -> None:
    code, out = await sh(a, f"ping -c 2 -W 5 {B_ADDRESS}")
    assert code == 0, out
    code, out = await sh(b, f"ping -c 2 -W 5 {A_ADDRESS}")
    assert code == 0, out
    for box, mac in ((a, "02:42:ac:1e:00:02"), (b, "02:42:ac:1e:00:03")):
        code, out = await sh(
            box,
            "cat /sys/class/net/eth1/address /sys/class/net/eth1/mtu"
            " /proc/sys/net/ipv6/conf/eth1/disable_ipv6; ip -6 addr show dev eth1",
        )
        # Its own MAC, the LAN MTU, no IPv6 (no link-local chatter on the switch).
        assert out.split() == [mac, "65520", "1"], out
    # b has no egress: its eth0 is down; a's is up.
    code, out = await sh(b, "cat /sys/class/net/eth0/operstate")
    assert out.strip() == "down", out
    code, out = await sh(a, "cat /sys/class/net/eth0/operstate")
    assert out.strip() == "up", out
    # No IPv6 on eth0 either: no autoconfiguration left for a clone to finish.
    code, out = await sh(
        a, "cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6; ip -6 addr show dev eth0"
    )
    assert out.split() == ["1"], out
    # TCP, b listening.
    await b.client.exec(ProcessSpec(argv=["sh", "-c", "echo tcp-from-b | nc -l -p 7000"]))
    code, out = await sh(
        a, f"for i in 1 2 3 4 5 6 7 8 9 10; do nc {B_ADDRESS} 7000 && exit 0; sleep 1; done"
    )
    assert code == 0 and "tcp-from-b" in out, out
    # UDP: traceroute's probes reach b, whose kernel answers "port unreachable".
    code, out = await sh(a, f"traceroute -n -m 2 -w 3 -q 1 {B_ADDRESS}")
    assert code == 0 and B_ADDRESS in out.split("\n", 1)[-1], out
    # Another husk subnet fails at once (reject route), it does not leave through eth0.
    code, out = await sh(a, "ip route")
    assert "unreachable 172.31.0.0/16" in out, out
    code, out = await sh(a, "ping -c 1 -W 3 172.31.0.9")
    assert code != 0 and "no route to host" in out.lower(), out
    # The embedded resolver: names of the table, any case, with the final dot.
    code, out = await sh(a, "cat /etc/resolv.conf")
    assert "nameserver 127.0.0.11" in out, out
    for query in ("bee", "BEE.", "Bee"):
        code, out = await sh(a, f"nslookup {query} 127.0.0.11")
        assert code == 0 and B_ADDRESS in out, out
    code, out = await sh(b, "nslookup ay")
    assert code == 0 and A_ADDRESS in out, out
    # Unknown names are forwarded (to the other VM, over the LAN): no server there,
    # so the client gets a clean failure, quickly.
    code, out = await sh(a, "nslookup nowhere.invalid 127.0.0.11", timeout=30)
    assert code != 0 and A_ADDRESS not in out, out
    code, out = await sh(a, "grep h-2 /etc/hosts")
    assert code == 0 and A_ADDRESS in out, out
    # Bringing the LAN down: slot 1 unlisted.
    await a.client.configure_network({"egress": True, "lans": [], "names": None})
    code, out = await sh(a, f"ping -c 1 -W 2 {B_ADDRESS}")
    assert code != 0, out
    code, out = await sh(a, "cat /sys/class/net/eth1/operstate")
    assert out.strip() == "down", out
    # No names: the resolver is gone and resolv.conf is PREPARE's again; no reject
    # route is left behind.
    code, out = await sh(a, "cat /etc/resolv.conf; ip route")
    assert "127.0.0.11" not in out and "nameserver 10.0.2.3" in out, out
    assert "172.31.0.0" not in out, out


async def check_egress_switch(b: Sandbox) -> None:
    await b.set_egress(True)
    record = recorded_egress(b)
    assert record is not None and slirp_running(record)
    await b.set_egress(False)
    assert recorded_egress(b) is None
    assert not slirp_running(record)
    # Let go of the VM and find it again (a daemon restart): egress still switches, and
    # the slirp4netns started then ends with the VM.
    state_dir = b.machine.state_dir
    await b.client.close()
    await b.machine.detach()
    adopted = await Sandbox.attach(state_dir)
    try:
        await adopted.set_egress(True)
        record = recorded_egress(adopted)
        assert record is not None and slirp_running(record)
        with pytest.raises(InvalidArgument):
            await adopted.client.configure_network({"lans": [{"slot": 9}]})
    finally:
        await adopted.client.close()
        await adopted.machine.kill()
    for _ in range(100):
        if not slirp_running(record):
            break
        await asyncio.sleep(0.05)
    assert not slirp_running(record)
    b.machine = adopted.machine  # the outer context kills what is already dead
