"""The VM backend: configuration rules, the QEMU command, accelerator choice, real TCG boots."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner

from husk import paths
from husk.errors import GuestError, InvalidArgument
from husk.sandbox import accel
from husk.vm import accel as host_accel
from husk.vm.machine import (
    MIN_MEMORY_MIB,
    DiskConfig,
    MachineConfig,
    NetConfig,
    ShareConfig,
    VirtualMachine,
    clamp_resources,
    host_cpu_count,
    host_memory_mib,
    random_mac,
)
from husk.vm.qemu import QemuBackend, QemuMachine
from husk.vm.qemu_argv import SANDBOX

T = TypeVar("T")
QEMU = QemuBackend()
BOOT_DEADLINE = 60.0


def run(coro: Coroutine[Any, Any, T], deadline: float = BOOT_DEADLINE) -> T:
    """Every test coroutine runs under a deadline."""
    return asyncio.run(asyncio.wait_for(coro, deadline))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A state directory short enough for unix socket paths (108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="husk-vm-", dir="/tmp") as directory:
        yield Path(directory)


def make_config(bundle: Any, state_dir: Path, **overrides: Any) -> MachineConfig:
    settings: dict[str, Any] = {
        "kernel": bundle.kernel,
        "initrd": bundle.initrd,
        "state_dir": state_dir,
        "memory_mib": 256,
        "accel": "tcg",
    }
    settings.update(overrides)
    return MachineConfig(**settings)


@asynccontextmanager
async def booted(config: MachineConfig) -> AsyncIterator[QemuMachine]:
    machine = QemuMachine(config)
    await machine.boot()
    try:
        yield machine
    finally:
        await machine.kill()


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.05)


def process_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists, not even as a zombie."""
    return not Path(f"/proc/{pid}").exists()


def qemu_argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


# -- configuration -----------------------------------------------------------------------


def test_random_mac_is_local_unicast_and_unique() -> None:
    macs = {random_mac() for _ in range(200)}
    assert len(macs) == 200
    for mac in macs:
        first = int(mac[:2], 16)
        assert first & 0x02, mac
        assert not first & 0x01, mac
        NetConfig(mac)


@pytest.mark.parametrize(
    "build",
    [
        lambda: DiskConfig(Path("/x"), "a-serial-that-is-far-too-long"),
        lambda: DiskConfig(Path("/x"), "bad serial"),
        lambda: DiskConfig(Path("/x"), "ok", cache="sometimes"),
        lambda: ShareConfig("bad tag", Path("/x")),
        lambda: ShareConfig("tag", Path("/a,b")),
        lambda: NetConfig("02:00:00:00:00"),
        lambda: NetConfig("03:00:00:00:00:01"),
        lambda: MachineConfig(Path("k"), Path("i"), Path("s"), cpus=0),
        lambda: MachineConfig(Path("k"), Path("i"), Path("s"), memory_mib=0),
        lambda: MachineConfig(Path("k"), Path("i"), Path("s"), accel="xen"),  # type: ignore[arg-type]
        lambda: MachineConfig(Path("k"), Path("i"), Path("s"), cmdline_extra=["two words"]),
        lambda: MachineConfig(
            Path("k"),
            Path("i"),
            Path("s"),
            disks=[DiskConfig(Path("/a"), "same"), DiskConfig(Path("/b"), "same")],
        ),
    ],
)
def test_bad_configuration_is_invalid_argument(build: Callable[[], object]) -> None:
    with pytest.raises(InvalidArgument):
        build()


def test_resources_are_clamped_to_the_host() -> None:
    assert clamp_resources(1, 16) == (1, MIN_MEMORY_MIB)
    assert clamp_resources(10_000, 10**9) == (host_cpu_count(), host_memory_mib())
    assert clamp_resources(1, 300) == (1, 300)
    config = MachineConfig(Path("k"), Path("i"), Path("s"), cpus=999, memory_mib=64)
    assert config.resources() == (host_cpu_count(), MIN_MEMORY_MIB)


# -- accelerator choice --------------------------------------------------------------------


def test_accel_forced_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_ACCEL", "kvm")
    choice = run(accel.choose_accel(QEMU, Path("/nonexistent"), Path("/nonexistent")))
    assert (choice.name, choice.reason) == ("kvm", "forced by HUSK_ACCEL=kvm")
    monkeypatch.setenv("HUSK_ACCEL", "TCG")
    assert run(accel.choose_accel(QEMU)).name == "tcg"
    monkeypatch.setenv("HUSK_ACCEL", "hyperv")
    with pytest.raises(InvalidArgument, match="HUSK_ACCEL"):
        run(accel.choose_accel(QEMU))


def test_accel_without_kvm_device_is_tcg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HUSK_ACCEL", raising=False)
    monkeypatch.setattr(host_accel, "KVM_DEVICE", tmp_path / "no-kvm")
    choice = run(accel.choose_accel(QEMU, Path("/nonexistent"), Path("/nonexistent")))
    assert choice.name == "tcg"
    assert "does not exist" in choice.reason


def test_accel_on_pvm_host_skips_the_probe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HUSK_ACCEL", raising=False)
    fake_kvm = tmp_path / "kvm"
    fake_kvm.touch()
    pvm = tmp_path / "kvm_pvm"
    pvm.mkdir()
    monkeypatch.setattr(host_accel, "KVM_DEVICE", fake_kvm)
    monkeypatch.setattr(host_accel, "PVM_MODULE", pvm)
    choice = run(accel.choose_accel(QEMU, Path("/nonexistent"), Path("/nonexistent")))
    assert choice.name == "tcg"
    assert "PVM" in choice.reason


def test_accel_verdict_is_cached_per_kernel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Unit test of the cache; the real probe runs in test_kvm_probe_falls_back_to_tcg."""
    monkeypatch.delenv("HUSK_ACCEL", raising=False)
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    fake_kvm = tmp_path / "kvm"
    fake_kvm.touch()
    monkeypatch.setattr(host_accel, "KVM_DEVICE", fake_kvm)
    monkeypatch.setattr(host_accel, "PVM_MODULE", tmp_path / "no-pvm")
    monkeypatch.setattr(accel, "_decisions", {})
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(b"kernel one")
    initrd.write_bytes(b"initrd")
    probes: list[Path] = []

    async def fake_probe(backend: object, kernel: Path, initrd: Path, *, timeout: float) -> float:
        probes.append(kernel)
        return 0.5

    monkeypatch.setattr(accel, "probe_kvm", fake_probe)
    first = run(accel.choose_accel(QEMU, kernel, initrd))
    assert (first.name, first.cached) == ("kvm", False)
    monkeypatch.setattr(accel, "_decisions", {})  # a new process: only the file remains
    second = run(accel.choose_accel(QEMU, kernel, initrd))
    assert (second.name, second.cached) == ("kvm", True)
    assert len(probes) == 1
    assert (tmp_path / "data" / "accel.json").stat().st_mode & 0o777 == 0o600
    kernel.write_bytes(b"kernel two")
    run(accel.choose_accel(QEMU, kernel, initrd))
    assert len(probes) == 2


def test_a_machine_never_probes_for_its_accelerator(
    monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    """ "auto" that only a probe boot could settle is the provisioning layer's job: refused."""
    monkeypatch.delenv("HUSK_ACCEL", raising=False)
    fake_kvm = short_dir / "kvm"
    fake_kvm.touch()
    monkeypatch.setattr(host_accel, "KVM_DEVICE", fake_kvm)
    monkeypatch.setattr(host_accel, "PVM_MODULE", short_dir / "no-pvm")
    kernel, initrd = short_dir / "vmlinux", short_dir / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    machine = QemuMachine(MachineConfig(kernel, initrd, short_dir / "vm", accel="auto"))
    with pytest.raises(InvalidArgument, match=r"husk\.sandbox"):
        run(machine.boot())
    assert not (short_dir / "vm").exists()  # refused before anything was spawned


def test_the_qemu_backend_implements_the_protocols(tmp_path: Path) -> None:
    machine = QEMU.create(MachineConfig(Path("k"), Path("i"), tmp_path))
    # (isinstance would read pid, which an unbooted machine refuses; mypy checks the rest.)
    for name in ("replace_disk", "move_state_dir", "snapshot", "restore", "boot", "kill"):
        assert callable(getattr(machine, name)), name
    assert machine.config.state_dir == tmp_path and machine.returncode is None
    assert QEMU.default_cpu_model("kvm") == "host"
    assert QEMU.kill_recorded(tmp_path / "nothing") is False


# -- real VMs (TCG) ------------------------------------------------------------------------


@pytest.mark.vm
@pytest.mark.timeout(120)
def test_boot_pause_resume_stop(guest_bundle: Any, short_dir: Path) -> None:
    config = make_config(guest_bundle, short_dir / "vm", cmdline_extra=["loglevel=7"])

    async def scenario() -> None:
        machine = QemuMachine(config)
        await machine.boot()
        assert isinstance(machine, VirtualMachine)
        assert await machine.status() == "running"
        await wait_for(
            lambda: b"Linux version" in machine.console_log.read_bytes(), 30, "kernel output"
        )
        machine.check_alive()
        await machine.pause()
        assert await machine.status() == "paused"
        cpu_paused = machine.cpu_seconds()
        await asyncio.sleep(0.5)
        # A paused guest burns (almost) no CPU.
        assert machine.cpu_seconds() - cpu_paused < 0.2
        await machine.resume()
        assert await machine.status() == "running"
        assert machine.rss_bytes() > 32 * 2**20
        assert machine.cpu_seconds() > 0
        pid = machine.pid
        code = await machine.stop(timeout=10)
        assert code == 0
        # Reaped: not even a zombie is left.
        assert process_gone(pid)
        assert await machine.status() == "exited"
        assert ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}) in machine.events

    run(scenario())


@pytest.mark.vm
@pytest.mark.timeout(120)
def test_files_are_private_and_qemu_is_sandboxed(guest_bundle: Any, short_dir: Path) -> None:
    disk = short_dir / "scratch.img"
    disk.write_bytes(b"\0" * 1024 * 1024)
    disk.chmod(0o644)
    config = make_config(
        guest_bundle,
        short_dir / "vm",
        memory_mib=64,
        disks=[DiskConfig(disk, "husk-upper")],
        shares=[ShareConfig("share0", short_dir)],
        net=NetConfig(random_mac()),
    )

    async def scenario() -> None:
        async with booted(config) as machine:
            assert await machine.status() == "running"
            state = machine.state_dir
            assert stat.S_IMODE(state.stat().st_mode) == 0o700
            for name in ("qmp.sock", "agent.sock"):
                info = (state / name).stat()
                assert stat.S_ISSOCK(info.st_mode)
                assert stat.S_IMODE(info.st_mode) & 0o077 == 0, name
            for name in ("console.log", "qemu.log", "machine.json"):
                assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
            assert stat.S_IMODE(disk.stat().st_mode) & 0o077 == 0
            argv = qemu_argv(machine.pid)
            assert argv[argv.index("-sandbox") + 1] == SANDBOX
            # The memory floor applies: 64 MiB asked, 128 MiB given.
            assert argv[argv.index("-m") + 1] == f"{MIN_MEMORY_MIB}M"
            status = Path(f"/proc/{machine.pid}/status").read_text()
            assert "Seccomp:\t2" in status
            # QEMU leads its own session, so it outlives the daemon's.
            assert os.getsid(machine.pid) == machine.pid
            blocks = {b["device"]: b for b in await machine.monitor_command("query-block")}
            assert blocks["disk0"]["inserted"]["ro"] is False

    run(scenario())


@pytest.mark.vm
@pytest.mark.timeout(120)
def test_killed_qemu_is_noticed_promptly(guest_bundle: Any, short_dir: Path) -> None:
    async def scenario() -> None:
        async with booted(make_config(guest_bundle, short_dir / "vm")) as machine:
            machine.check_alive()
            os.kill(machine.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(GuestError, match="killed by signal 9"):
                while True:
                    machine.check_alive()
                    await asyncio.sleep(0.02)
            assert time.monotonic() - started < 2.0
            assert await machine.wait(5) == -signal.SIGKILL
            assert process_gone(machine.pid)
            with pytest.raises(GuestError):
                await machine.pause()

    run(scenario())


@pytest.mark.vm
@pytest.mark.timeout(60)
def test_missing_kernel_is_a_clear_error(short_dir: Path) -> None:
    config = MachineConfig(
        kernel=short_dir / "no-such-vmlinux",
        initrd=short_dir / "no-such-initrd",
        state_dir=short_dir / "vm",
        accel="tcg",
    )
    with pytest.raises(InvalidArgument, match="no-such-vmlinux does not exist"):
        run(QemuMachine(config).boot(), 10)


@pytest.mark.vm
@pytest.mark.timeout(60)
def test_garbage_kernel_fails_fast_with_qemus_reason(short_dir: Path) -> None:
    kernel = short_dir / "vmlinux"
    kernel.write_bytes(os.urandom(64 * 1024))
    initrd = short_dir / "initrd"
    initrd.write_bytes(b"07070100")
    machine = QemuMachine(
        MachineConfig(kernel=kernel, initrd=initrd, state_dir=short_dir / "vm", accel="tcg")
    )
    started = time.monotonic()
    with pytest.raises(GuestError, match=r"QEMU exited with status 1.*qemu: .*kernel"):
        run(machine.boot(), 15)
    assert time.monotonic() - started < 10
    assert process_gone(machine.pid)


@pytest.mark.vm
@pytest.mark.timeout(120)
def test_guest_panic_is_reported(guest_bundle: Any, short_dir: Path) -> None:
    """No init in the initramfs and no root disk: the kernel panics, QEMU exits."""
    config = make_config(
        guest_bundle, short_dir / "vm", cmdline_extra=["rdinit=/no-such-init", "root=/dev/none"]
    )

    async def scenario() -> None:
        async with booted(config) as machine:
            code = await machine.wait(BOOT_DEADLINE - 10)
            assert code is not None
            with pytest.raises(GuestError, match="the guest kernel panicked"):
                machine.check_alive()

    run(scenario())


@pytest.mark.vm
@pytest.mark.timeout(120)
def test_attach_from_a_new_object(guest_bundle: Any, short_dir: Path) -> None:
    config = make_config(guest_bundle, short_dir / "vm")

    async def scenario() -> None:
        first = QemuMachine(config)
        await first.boot()
        try:
            await first.detach()  # what a stopping daemon does
            second = await QemuMachine.attach(config.state_dir)
            assert second.pid == first.pid
            assert second.config == config
            assert second.accel == "tcg"
            assert await second.status() == "running"
            await second.pause()
            assert await second.status() == "paused"
            await second.resume()
            second.check_alive()
            assert await second.stop(10) == 0
            await wait_for(lambda: process_gone(first.pid), 10, "QEMU reaped")
            with pytest.raises(GuestError, match="no longer running"):
                await QemuMachine.attach(config.state_dir)
        finally:
            await first.kill()

    run(scenario())


_ORPHAN_SCRIPT = """
import asyncio, os, sys
from pathlib import Path
from husk.vm.machine import MachineConfig
from husk.vm.qemu import QemuMachine

async def main():
    machine = QemuMachine(MachineConfig(kernel=Path(sys.argv[1]), initrd=Path(sys.argv[2]),
                                        state_dir=Path(sys.argv[3]), memory_mib=256, accel="tcg"))
    await machine.boot()
    print(machine.pid, flush=True)
    os._exit(0)  # the "daemon" dies without a word

asyncio.run(main())
"""


@pytest.mark.vm
@pytest.mark.timeout(120)
def test_vm_outlives_its_parent_and_is_killable(guest_bundle: Any, short_dir: Path) -> None:
    state_dir = short_dir / "vm"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _ORPHAN_SCRIPT,
            str(guest_bundle.kernel),
            str(guest_bundle.initrd),
            str(state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pid = int(result.stdout.strip())

    async def scenario() -> None:
        try:
            machine = await QemuMachine.attach(state_dir)
            assert machine.pid == pid
            assert await machine.status() == "running"
            machine.check_alive()
            await machine.kill()
            await wait_for(lambda: process_gone(pid), 10, "orphaned QEMU reaped by init")
            with pytest.raises(GuestError, match="no longer running"):
                await QemuMachine.attach(state_dir)
        finally:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)

    run(scenario())


@pytest.mark.vm
@pytest.mark.timeout(120)
def test_accel_forced_to_kvm_reaches_qemu(
    guest_bundle: Any, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HUSK_ACCEL=kvm is obeyed without a probe; whether KVM works is the host's business."""
    monkeypatch.setenv("HUSK_ACCEL", "kvm")
    machine = QemuMachine(make_config(guest_bundle, short_dir / "vm", accel="auto"))

    async def scenario() -> None:
        try:
            await machine.boot()
        except GuestError:
            pass  # e.g. this PVM host: QEMU aborts setting an MSR
        finally:
            await machine.kill()

    run(scenario())
    command = json.loads((short_dir / "vm" / "machine.json").read_text())["command"]
    assert command[command.index("-accel") + 1] == "kvm"
    assert machine.accel_reason == "forced by HUSK_ACCEL=kvm"


@pytest.mark.vm
@pytest.mark.timeout(120)
def test_kvm_probe_falls_back_to_tcg(
    guest_bundle: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real probe boot, forced even where PVM would short-circuit it."""
    monkeypatch.delenv("HUSK_ACCEL", raising=False)
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(accel, "_decisions", {})
    kvm_usable = host_accel.kvm_unusable_reason() is None
    started = time.monotonic()
    choice = run(
        accel.choose_accel(
            QEMU, guest_bundle.kernel, guest_bundle.initrd, probe_pvm=True, probe_timeout=10
        )
    )
    elapsed = time.monotonic() - started
    assert elapsed < 20
    cache = json.loads((tmp_path / "data" / "accel.json").read_text())
    assert [entry["name"] for entry in cache.values()] == [choice.name]
    if choice.name == "tcg":
        assert "KVM probe boot failed" in choice.reason or not kvm_usable
    else:
        assert "reached the guest agent" in choice.reason
    # No probe VM is left behind.
    assert list(paths.vms_dir().glob("kvm-probe-*")) == []


@pytest.mark.vm
@pytest.mark.timeout(120)
def test_kvm_probe_of_a_hanging_guest_ends_at_its_deadline(guest_bundle: Any) -> None:
    """Under PVM KVM, QEMU's default CPU model boots into a silent hang: the deadline ends it."""
    started = time.monotonic()
    try:
        seconds = run(
            accel.probe_kvm(
                QEMU, guest_bundle.kernel, guest_bundle.initrd, timeout=5, cpu_model="qemu64"
            ),
            30,
        )
    except GuestError as err:
        assert time.monotonic() - started < 8, err
    else:
        assert seconds < 5  # a host where KVM really works


@pytest.mark.vm
@pytest.mark.timeout(60)
@pytest.mark.vm
@pytest.mark.timeout(180)
def test_system_check_boots_to_the_agent(guest_bundle: Any) -> None:
    from husk.cli.main import cli

    result = CliRunner().invoke(cli, ["system", "check", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    assert report["qemu_version"].startswith("7.") or report["qemu_version"][0].isdigit()
    assert report["accel"] == "tcg"
    assert "HUSK_ACCEL" in report["accel_reason"]
    from husk.bundle import locate

    assert report["bundle_digest"] == locate().digest
    assert report["kernel"] == str(guest_bundle.kernel)
    probe = report["probe"]
    assert probe["ok"] is True
    assert 0 < probe["first_console_byte_s"] < probe["agent_ready_s"] < 60
    assert probe["rss_bytes"] > 0
    human = CliRunner().invoke(cli, ["system", "check"])
    assert human.exit_code == 0, human.output
    assert "agent ready" in human.output


def test_qemus_own_log_is_capped_as_the_console_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's stderr (qemu.log, on /run: memory) carries messages a guest can repeat at
    will (a guest that owns its kernel sends virtio-serial control messages naming no
    port: one error line each). The console watch keeps it under the cap too, its last
    lines (what a failure report quotes) kept. No VM: the watch on a log the test grows."""
    from husk.vm import qemu

    monkeypatch.setattr(qemu, "CONSOLE_CHECK_INTERVAL", 0.01)
    machine = QemuMachine(MachineConfig(Path("k"), Path("i"), tmp_path / "vm"))
    (tmp_path / "vm").mkdir()
    line = b"qemu-system-x86_64: virtio-serial-bus: Unexpected port id 4242 for device x\n"

    async def main() -> int:
        watch = asyncio.create_task(machine._cap_console())
        try:
            with machine.qemu_log.open("ab") as log:  # as QEMU writes it: O_APPEND
                for _ in range(8):
                    log.write(line * (qemu.CONSOLE_MAX_BYTES // len(line)))
                    log.flush()
                    await asyncio.sleep(0.05)
                log.write(b"the last word\n")
                log.flush()
            await asyncio.sleep(0.05)
            return machine.qemu_log.stat().st_size
        finally:
            watch.cancel()

    size = asyncio.run(main())
    assert size <= 2 * qemu.CONSOLE_MAX_BYTES, size
    assert machine.qemu_log.read_bytes().endswith(line + b"the last word\n")
