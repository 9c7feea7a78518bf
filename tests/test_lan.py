"""LAN slots and egress at the VM and sandbox layers, without a VM (fake backend).

The real thing (QEMU's socket netdevs, slirp4netns switched on a live VM) is in
test_lan_vm.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fake_machine import FakeBackend
from husk.errors import InvalidArgument
from husk.guest.netconfig import LAN_SLOTS, lan_boot_mac
from husk.sandbox import templates
from husk.sandbox.config import SandboxConfig
from husk.sandbox.lan import LanPorts
from husk.sandbox.pool import PoolShape, WarmPool
from husk.sandbox.provisioner import Provisioner
from husk.sandbox.sandbox import Sandbox
from husk.vm.machine import (
    VIRTIO_TRANSPORTS,
    DiskConfig,
    MachineConfig,
    NetConfig,
    ShareConfig,
    random_mac,
    virtio_devices,
)
from husk.vm.qemu import config_from_json, config_to_json
from husk.vm.qemu_argv import build_command

MIB = 1024 * 1024
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], deadline: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, deadline))


def machine(tmp_path: Path, **changes: Any) -> MachineConfig:
    settings: dict[str, Any] = {
        "kernel": tmp_path / "vmlinux",
        "initrd": tmp_path / "initrd",
        "state_dir": tmp_path / "vm",
        "disks": [
            DiskConfig(tmp_path / "image", "husk-image", readonly=True),
            DiskConfig(tmp_path / "upper", "husk-upper"),
        ],
        "net": NetConfig("02:11:22:33:44:55"),
    }
    settings.update(changes)
    return MachineConfig(**settings)


def argv(config: MachineConfig) -> list[str]:
    return build_command(config, binary="qemu", accel="tcg", qmp_fd=5, agent_fd=6, boot_time_ns=1)


# -- the command line and the device budget ------------------------------------------------


def test_every_lan_slot_is_a_virtio_net_device_on_its_socket_after_eth0(tmp_path: Path) -> None:
    command = argv(machine(tmp_path, lan_slots=4, lan_fds=(20, 21, 22, 23)))
    netdevs = [command[i + 1] for i, word in enumerate(command) if word == "-netdev"]
    assert netdevs == ["user,id=net0"] + [f"socket,id=lan{n},fd={19 + n}" for n in range(1, 5)]
    nics = [
        command[i + 1]
        for i, word in enumerate(command)
        if word == "-device" and command[i + 1].startswith("virtio-net-device")
    ]
    assert nics[0] == "virtio-net-device,netdev=net0,mac=02:11:22:33:44:55"
    assert nics[1:] == [
        f"virtio-net-device,netdev=lan{slot},mac={lan_boot_mac(slot)}" for slot in range(1, 5)
    ]
    # Boot MACs are distinct unicast, locally administered... and never eth0's.
    macs = {lan_boot_mac(slot) for slot in range(1, LAN_SLOTS + 1)}
    assert len(macs) == LAN_SLOTS and all(int(m[:2], 16) & 1 == 0 for m in macs)


def test_lan_slots_need_their_descriptors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="descriptors"):
        machine(tmp_path, lan_slots=4, lan_fds=(20, 21))
    with pytest.raises(InvalidArgument, match="descriptors"):
        argv(machine(tmp_path, lan_slots=4))  # described, but nothing to start it with
    with pytest.raises(InvalidArgument, match="LAN interfaces"):
        machine(tmp_path, lan_slots=99)
    assert "socket,id=lan" not in " ".join(argv(machine(tmp_path)))


def test_shares_beyond_the_virtio_transports_are_refused_clearly(tmp_path: Path) -> None:
    def with_shares(count: int) -> MachineConfig:
        shares = [ShareConfig(f"bind{i}", tmp_path) for i in range(count)]
        return machine(tmp_path, lan_slots=LAN_SLOTS, shares=shares)

    # serial + rng + 2 disks + eth0 + 4 LAN slots = 9: 15 shares fit in microvm's 24.
    fitting = VIRTIO_TRANSPORTS - 9
    assert virtio_devices(with_shares(fitting)) == VIRTIO_TRANSPORTS
    with pytest.raises(InvalidArgument, match=f"{fitting + 1} requested, at most {fitting} fit"):
        with_shares(fitting + 1)


def test_the_state_file_keeps_the_shape_and_egress_not_the_descriptors(tmp_path: Path) -> None:
    config = machine(tmp_path, lan_slots=4, lan_fds=(20, 21, 22, 23), egress=False)
    again = config_from_json(config_to_json(config))
    assert (again.lan_slots, again.lan_fds, again.egress) == (4, (), False)


def test_lan_slots_are_part_of_the_template_key(tmp_path: Path) -> None:
    for name in ("image", "upper"):
        (tmp_path / name).write_bytes(b"x")

    class Backend:
        def version(self) -> str:
            return "7.2"

        def default_cpu_model(self, accel: str) -> str:
            return "qemu64"

    def key(slots: int) -> str:
        config = machine(tmp_path, lan_slots=slots, accel="tcg")
        inputs = templates.template_inputs(config, bundle_digest="d", backend=Backend())  # type: ignore[arg-type]
        return inputs.key

    assert key(0) != key(LAN_SLOTS)


# -- the socketpairs ------------------------------------------------------------------------


def test_lan_ports_without_a_hook_stay_here_and_close_with_the_sandbox() -> None:
    lan = LanPorts()
    fds = lan.qemu_fds()
    assert len(fds) == LAN_SLOTS and len(set(fds)) == LAN_SLOTS
    kept = dict(lan.switch_ends)
    run(lan.hand_over("vm-1", None))
    assert lan.switch_ends == kept  # unplugged, but held
    lan.close()
    assert all(end.fileno() == -1 for end in kept.values())


def test_lan_ports_hook_gets_the_switch_ends_with_stale_bytes_drained() -> None:
    lan = LanPorts(2)
    # A QEMU that died mid-frame before the hand-over left bytes in the stream.
    vm_end = socket.socket(fileno=socket.dup(lan.qemu_fds()[0]))
    vm_end.sendall(b"\x00\x00\x00\x40partial")
    got: dict[str, dict[int, socket.socket]] = {}

    async def hook(machine_id: str, ends: dict[int, socket.socket]) -> None:
        got[machine_id] = ends

    run(lan.hand_over("vm-2", hook))
    assert set(got["vm-2"]) == {1, 2} and lan.switch_ends == {}
    vm_end.sendall(b"\x00\x00\x00\x01x")
    assert got["vm-2"][1].recv(100) == b"\x00\x00\x00\x01x"
    for end in got["vm-2"].values():
        end.close()
    vm_end.close()


def test_a_failing_hook_closes_the_ends_it_was_given() -> None:
    lan = LanPorts(1)
    given: list[socket.socket] = []

    async def hook(machine_id: str, ends: dict[int, socket.socket]) -> None:
        given.extend(ends.values())
        raise RuntimeError("switch is gone")

    with pytest.raises(RuntimeError):
        run(lan.hand_over("vm-3", hook))
    assert given and given[0].fileno() == -1


# -- sandboxes on the fake backend ---------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HUSK_ACCEL", "tcg")
    monkeypatch.delenv("HUSK_NO_TEMPLATE", raising=False)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "vmlinux").write_bytes(b"fake kernel")
    (bundle / "initrd").write_bytes(b"fake initrd")
    monkeypatch.setenv("HUSK_KERNEL", str(bundle / "vmlinux"))
    monkeypatch.setenv("HUSK_INITRD", str(bundle / "initrd"))
    yield tmp_path


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    fake = FakeBackend()
    yield fake
    fake.close()


def box_config(root: Path, name: str, **overrides: Any) -> SandboxConfig:
    disks = root / "disks"
    disks.mkdir(exist_ok=True)
    for suffix, size in (("img", 10 * MIB), ("upper", 64 * MIB)):
        with (disks / f"{name}.{suffix}").open("wb") as stream:
            stream.truncate(size)
    settings: dict[str, Any] = {
        "state_dir": root / "run" / "vms" / name,
        "image_disk": disks / f"{name}.img",
        "upper_disk": disks / f"{name}.upper",
        "hostname": name,
        "mac": random_mac(),
    }
    settings.update(overrides)
    return SandboxConfig(**settings)


class Hook:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[int, socket.socket]]] = []

    async def __call__(self, machine_id: str, ends: dict[int, socket.socket]) -> None:
        self.calls.append((machine_id, ends))


@pytest.mark.parametrize("use_template", [True, False])
def test_every_vm_gets_lan_slots_and_the_hook_their_switch_ends(
    env: Path, backend: FakeBackend, use_template: bool
) -> None:
    hook = Hook()

    async def scenario() -> None:
        config = box_config(env, "web", lan_ports=hook, egress=False, use_template=use_template)
        box = await Sandbox.boot(config, provisioner=Provisioner(backend), timeout=10)
        # The template's builder too: one device shape everywhere.
        for made in backend.created:
            assert made.config.lan_slots == LAN_SLOTS
            assert len(made.config.lan_fds) == LAN_SLOTS
        assert box.machine.config.egress is False
        assert [machine_id for machine_id, _ in hook.calls] == ["web"]
        assert sorted(hook.calls[0][1]) == list(range(1, LAN_SLOTS + 1))
        await box.set_egress(True)
        assert "set_egress True" in backend.created[-1].calls
        await box.discard()

    run(scenario())
    for _, ends in hook.calls:
        for end in ends.values():
            end.close()


def test_without_a_hook_the_sandbox_unplugs_its_lan_when_the_vm_ends(
    env: Path, backend: FakeBackend
) -> None:
    async def scenario() -> None:
        box = await Sandbox.boot(box_config(env, "db"), provisioner=Provisioner(backend))
        assert box.lan is not None
        ends = list(box.lan.switch_ends.values())
        assert len(ends) == LAN_SLOTS and all(end.fileno() >= 0 for end in ends)
        await box.discard()
        assert all(end.fileno() == -1 for end in ends)

    run(scenario())


def test_a_pooled_vm_is_handed_over_with_its_lan_and_without_egress(
    env: Path, backend: FakeBackend
) -> None:
    hook = Hook()

    async def scenario() -> None:
        pool = WarmPool(
            1, PoolShape(), asyncio.Semaphore(2), upper_disk_bytes=64 * MIB,
            provisioner=Provisioner(backend),
        )  # fmt: skip
        try:
            pool.refill()
            for _ in range(400):
                if pool.report()["idle"] == 1:
                    break
                await asyncio.sleep(0.01)
            config = box_config(env, "pooled", lan_ports=hook, egress=False)
            box = await pool.take(config)
            assert box is not None and box.boot_path == "pool"
            assert "set_egress False" in box.machine.calls  # type: ignore[attr-defined]
            assert [machine_id for machine_id, _ in hook.calls] == ["pooled"]
            await box.discard()
        finally:
            await pool.close()

    run(scenario())
    for _, ends in hook.calls:
        for end in ends.values():
            end.close()


@pytest.mark.parametrize("use_template", [True, False])
def test_tap_slots_reach_the_vm_and_have_no_switch_end(
    env: Path, backend: FakeBackend, use_template: bool
) -> None:
    hook = Hook()
    tap, other = os.pipe()  # stands for a tap descriptor (husk.ociruntime.netns)

    async def scenario() -> None:
        config = box_config(
            env, "tapped", lan_ports=hook, lan_taps={1: tap}, use_template=use_template
        )
        box = await Sandbox.boot(config, provisioner=Provisioner(backend), timeout=10)
        mine = [made for made in backend.created if made.config.state_dir == config.state_dir]
        assert mine and all(made.config.lan_taps == (1,) for made in mine)
        assert all(made.config.lan_fds[0] == tap for made in mine)
        # A template's own VM is never on the container's tap.
        assert all(made.config.lan_taps == () for made in backend.created if made not in mine)
        assert sorted(hook.calls[0][1]) == list(range(2, LAN_SLOTS + 1))
        await box.discard()

    try:
        run(scenario())
        os.fstat(tap)  # the caller's: still open
    finally:
        os.close(tap)
        os.close(other)
        for _, ends in hook.calls:
            for end in ends.values():
                end.close()


def test_a_config_with_taps_never_takes_a_pooled_vm(env: Path, backend: FakeBackend) -> None:
    tap, other = os.pipe()

    async def scenario() -> None:
        pool = WarmPool(
            1, PoolShape(), asyncio.Semaphore(2), upper_disk_bytes=64 * MIB,
            provisioner=Provisioner(backend),
        )  # fmt: skip
        try:
            pool.refill()
            for _ in range(400):
                if pool.report()["idle"] == 1:
                    break
                await asyncio.sleep(0.01)
            assert pool.report()["idle"] == 1
            assert await pool.take(box_config(env, "tapped", lan_taps={1: tap})) is None
        finally:
            await pool.close()

    try:
        run(scenario())
    finally:
        os.close(tap)
        os.close(other)
