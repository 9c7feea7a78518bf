"""The provisioning layer's decisions, on fake machines (no QEMU): fast unit tests.

Templates (reuse, invalidation, a corrupt or failing one), the warm pool (refill,
claim, expiry when the bundle changes, giving up), the sandbox's attach, and the
accelerator chosen once and passed down to every machine. The real AgentClient
talks to a fake agent on each fake machine's socket; only the hypervisor is fake.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fake_machine import SNAPSHOT_MAGIC, FakeBackend, FakeMachine
from husk.agent import transfer
from husk.errors import GuestError
from husk.sandbox import accel as sandbox_accel
from husk.sandbox import pool as pool_module
from husk.sandbox import template_failures, templates
from husk.sandbox.config import SandboxConfig
from husk.sandbox.pool import PoolShape, WarmPool
from husk.sandbox.provisioner import Provisioner
from husk.sandbox.sandbox import Sandbox
from husk.vm import accel as host_accel
from husk.vm.machine import MachineConfig, random_mac

T = TypeVar("T")
MIB = 1024 * 1024
UPPER_BYTES = 64 * MIB


def run(coro: Coroutine[Any, Any, T], deadline: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, deadline))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Private data and run directories, a fake guest bundle, templates on, TCG forced."""
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


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as stream:
        stream.truncate(size)
    return path


def box_config(root: Path, name: str, **overrides: Any) -> SandboxConfig:
    disks = root / "disks"
    disks.mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "state_dir": root / "run" / "vms" / name,
        "image_disk": sparse(disks / f"{name}.img", 10 * MIB),
        "upper_disk": sparse(disks / f"{name}.upper", UPPER_BYTES),
        "hostname": name,
        "mac": random_mac(),
    }
    settings.update(overrides)
    return SandboxConfig(**settings)


def machines(backend: FakeBackend) -> list[FakeMachine]:
    return list(backend.created)


async def boot(config: SandboxConfig, backend: FakeBackend) -> Sandbox:
    return await Sandbox.boot(config, provisioner=Provisioner(backend), timeout=10)


# -- templates --------------------------------------------------------------------------


def test_first_start_builds_the_template_later_starts_reuse_it(
    env: Path, backend: FakeBackend
) -> None:
    async def scenario() -> None:
        first = await boot(box_config(env, "one"), backend)
        assert (first.boot_path, first.built_template) == ("template", True)
        assert "no template" in first.cold_reason
        builder, clone = machines(backend)
        # The VM the template is saved from never runs again; the start restores from it.
        assert builder.calls == ["boot", "snapshot", "kill"]
        assert clone.calls[:2] == ["restore", "resume"]
        assert clone.restored_from == SNAPSHOT_MAGIC + str(builder.state_dir).encode()
        await first.discard()

        second = await boot(box_config(env, "two"), backend)
        assert (second.boot_path, second.built_template) == ("template", False)
        assert second.template_key == first.template_key
        assert second.cold_reason == ""
        assert [m.calls[0] for m in machines(backend)] == ["boot", "restore", "restore"]
        assert second.machine.state_dir == env / "run" / "vms" / "two"
        await second.discard()

    run(scenario())


def test_another_shape_or_bundle_means_another_template(
    env: Path, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        small = await boot(box_config(env, "small"), backend)
        await small.discard()
        large = await boot(box_config(env, "large", memory_bytes=384 * MIB), backend)
        assert large.built_template and large.template_key != small.template_key
        await large.discard()
        keys = {small.template_key, large.template_key}
        assert {entry["key"] for entry in templates.list_templates()} == keys

        other = env / "bundle" / "initrd2"
        other.write_bytes(b"another initrd")
        monkeypatch.setenv("HUSK_INITRD", str(other))
        rebuilt = await boot(box_config(env, "rebuilt"), backend)
        assert rebuilt.built_template
        assert rebuilt.template_key not in keys
        await rebuilt.discard()
        # Templates of the old bundle can never be restored again: pruned.
        assert {entry["key"] for entry in templates.list_templates()} == {rebuilt.template_key}

    run(scenario())


def test_a_corrupt_template_is_discarded_and_rebuilt(env: Path, backend: FakeBackend) -> None:
    async def scenario() -> None:
        first = await boot(box_config(env, "one"), backend)
        await first.discard()
        assert first.template_key is not None
        state = templates.template_dir(first.template_key) / templates.SNAPSHOT
        size = state.stat().st_size
        os.chmod(state, 0o600)
        state.write_bytes(b"x" * size)  # same size: only the digest tells

        second = await boot(box_config(env, "two"), backend)
        assert second.boot_path == "template"
        assert second.built_template
        assert "restoring template" in second.cold_reason
        assert second.template_key == first.template_key
        await second.discard()

    run(scenario())


def test_a_failed_restore_boots_cold_and_keeps_the_template(
    env: Path, backend: FakeBackend
) -> None:
    async def scenario() -> None:
        first = await boot(box_config(env, "one"), backend)
        await first.discard()
        backend.fail_restores = 1  # e.g. a timeout on a loaded host: not the template's fault
        second = await boot(box_config(env, "two"), backend)
        assert second.boot_path == "cold"
        assert second.machine.boot_images_released  # type: ignore[attr-defined]
        assert "the fake restore timed out" in second.cold_reason
        assert second.template_key is None
        await second.discard()
        assert first.template_key is not None
        failures = templates.template_dir(first.template_key) / templates.FAILURES
        assert failures.read_text() == "1"
        third = await boot(box_config(env, "three"), backend)
        assert (third.boot_path, third.template_key) == ("template", first.template_key)
        assert not failures.exists()  # a good restore resets the count
        await third.discard()

    run(scenario())


def test_without_templates_the_sandbox_boots_cold(env: Path, backend: FakeBackend) -> None:
    async def scenario() -> None:
        box = await boot(box_config(env, "cold", use_template=False), backend)
        assert box.boot_path == "cold"
        assert [m.calls for m in machines(backend)] == [["boot"]]
        # Its agent answered: what only the boot needed is given back (husk.vm.bootimages).
        assert machines(backend)[0].boot_images_released
        assert templates.list_templates() == []
        roles = box.disk_roles()
        assert roles["disk0"] == ("image disk", str(env / "disks" / "cold.img"))
        assert roles["disk1-format"][0] == "writable layer"
        await box.destroy(timeout=0.1)
        assert machines(backend)[0].calls[-1] == "kill"

    run(scenario())


def test_attach_resumes_a_paused_vm_and_refuses_a_dead_one(env: Path, backend: FakeBackend) -> None:
    async def scenario() -> None:
        provisioner = Provisioner(backend)
        box = await boot(box_config(env, "kept", use_template=False), backend)
        await box.client.close()
        await box.machine.pause()
        again = await Sandbox.attach(box.machine.state_dir, timeout=5, provisioner=provisioner)
        assert again.machine is box.machine
        assert await again.machine.status() == "running"
        assert Sandbox.kill_recorded(box.machine.state_dir, provisioner=provisioner)
        assert backend.killed_recorded == [box.machine.state_dir]
        with pytest.raises(GuestError, match="no VM recorded"):
            await Sandbox.attach(box.machine.state_dir, timeout=5, provisioner=provisioner)

    run(scenario())


# -- the accelerator ----------------------------------------------------------------------


def test_the_accelerator_is_chosen_once_and_passed_to_every_machine(
    env: Path, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host where KVM looks usable: one probe, then every VM is configured with its verdict."""
    monkeypatch.delenv("HUSK_ACCEL")
    fake_kvm = env / "kvm"
    fake_kvm.touch()
    monkeypatch.setattr(host_accel, "KVM_DEVICE", fake_kvm)
    monkeypatch.setattr(host_accel, "PVM_MODULE", env / "no-pvm")
    monkeypatch.setattr(sandbox_accel, "_decisions", {})
    probes: list[Path] = []

    async def probe(backend: object, kernel: Path, initrd: Path, *, timeout: float) -> float:
        probes.append(kernel)
        return 0.25

    monkeypatch.setattr(sandbox_accel, "probe_kvm", probe)

    async def scenario() -> None:
        provisioner = Provisioner(backend)
        for name in ("a", "b", "c"):
            box = await Sandbox.boot(box_config(env, name), provisioner=provisioner, timeout=10)
            await box.discard()
            # The first verdict is remembered on disk for the next process; this
            # provisioner asks no one again (not the disk, not the module's memory).
            cache = env / "data" / sandbox_accel.CACHE_FILE
            assert cache.exists() == (name == "a")
            cache.unlink(missing_ok=True)
            sandbox_accel._decisions.clear()
        kernel, initrd = Path(os.environ["HUSK_KERNEL"]), Path(os.environ["HUSK_INITRD"])
        config = MachineConfig(kernel, initrd, env / "x")
        assert (await provisioner.resolve(config)).accel == "kvm"
        tcg = MachineConfig(Path("k"), Path("i"), env / "y", accel="tcg")
        assert await provisioner.resolve(tcg) is tcg  # a caller's explicit choice stands

    run(scenario())
    assert len(probes) == 1
    assert {machine.config.accel for machine in backend.created} == {"kvm"}


def test_a_forced_accelerator_needs_no_probe(
    env: Path, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(*_args: object, **_kwargs: object) -> float:
        raise AssertionError("no probe boot when HUSK_ACCEL decides")

    monkeypatch.setattr(sandbox_accel, "probe_kvm", never)
    choice = run(Provisioner(backend).accel(Path("k"), Path("i")))
    assert (choice.name, choice.reason) == ("tcg", "forced by HUSK_ACCEL=tcg")


# -- the warm pool ------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def new_pool(backend: FakeBackend, size: int = 2) -> WarmPool:
    return WarmPool(
        size,
        PoolShape(),
        asyncio.Semaphore(2),
        upper_disk_bytes=UPPER_BYTES,
        provisioner=Provisioner(backend),
    )


async def with_pool(
    backend: FakeBackend, body: Callable[[WarmPool], Awaitable[None]], size: int = 2
) -> None:
    pool = new_pool(backend, size)
    try:
        await body(pool)
    finally:
        await pool.close()


def test_the_pool_fills_hands_a_vm_over_and_refills(env: Path, backend: FakeBackend) -> None:
    async def body(pool: WarmPool) -> None:
        pool.refill()
        await until(lambda: pool.report()["idle"] == 2, "the pool to fill")
        report = pool.report()
        assert (report["size"], report["taken"], report["rss_bytes"]) == (2, 0, 2 << 20)
        idle = {vm.machine.state_dir for vm in pool._idle}
        assert all(path.name.startswith(pool_module.POOL_PREFIX) for path in idle)

        config = box_config(env, "claimed")
        box = await pool.take(config)
        assert box is not None and box.boot_path == "pool"
        machine = box.machine
        assert isinstance(machine, FakeMachine)
        # The VM's placeholder disks were swapped for the container's, its state moved.
        assert machine.calls[-3:] == ["replace_disk 0", "replace_disk 1", "move_state_dir"]
        # The transfer ring is not replaced: it moved with the state directory.
        assert [disk.path for disk in machine.config.disks] == [
            config.image_disk,
            config.upper_disk,
            config.state_dir / transfer.RING_FILE,
        ]
        assert machine.state_dir == config.state_dir and config.state_dir.is_dir()
        assert machine.state_dir not in idle
        await until(lambda: pool.report()["idle"] == 2, "the pool to refill")
        assert pool.report()["taken"] == 1
        await box.discard()

    run(with_pool(backend, body))


def test_the_pool_serves_only_starts_it_can(env: Path, backend: FakeBackend) -> None:
    async def body(pool: WarmPool) -> None:
        assert await pool.take(box_config(env, "early")) is None  # nothing idle yet
        pool.refill()
        await until(lambda: pool.report()["idle"] == 2, "the pool to fill")
        bigger = box_config(env, "bigger", memory_bytes=384 * MIB)
        assert await pool.take(bigger) is None  # another template: another shape
        no_upper = box_config(env, "no-upper", upper_disk=None)
        assert await pool.take(no_upper) is None
        assert pool.report()["idle"] == 2 and pool.report()["taken"] == 0

    run(with_pool(backend, body))


def test_the_pool_expires_its_vms_when_the_bundle_changes(
    env: Path, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(pool: WarmPool) -> None:
        pool.refill()
        await until(lambda: pool.report()["idle"] == 2, "the pool to fill")
        old = [vm.machine for vm in pool._idle]
        other = env / "bundle" / "initrd2"
        other.write_bytes(b"a new guest")
        monkeypatch.setenv("HUSK_INITRD", str(other))
        assert await pool.take(box_config(env, "after-upgrade")) is None
        # Those VMs can never serve a start again: ended, and the pool refills anew.
        assert all(machine.returncode is not None for machine in old)
        await until(lambda: pool.report()["idle"] == 2, "the pool to refill")
        box = await pool.take(box_config(env, "new"))
        assert box is not None and box.machine not in old
        await box.discard()

    run(with_pool(backend, body))


def test_the_pool_gives_up_after_failures_in_a_row(
    env: Path, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "_REFILL_BACKOFF", 0.0)
    backend.fail_boots = 100

    async def body(pool: WarmPool) -> None:
        pool.refill()
        await until(lambda: not pool.report()["filling"], "the filler to give up")
        report = pool.report()
        assert report["idle"] == 0
        assert "refused to boot" in report["last_error"]
        # Each attempt tried to build the template, then to boot cold, until the builds
        # failed BUILD_ATTEMPTS times in a row: then only the cold boot (template_failures).
        attempts = pool_module._MAX_FAILURES_IN_A_ROW
        builds = min(attempts, template_failures.BUILD_ATTEMPTS)
        assert len(backend.created) == attempts + builds
        # Nothing is left behind: no pool directories, no running machines.
        assert backend.running == {}
        assert list((env / "run" / "vms").glob(pool_module.POOL_PREFIX + "*")) == []

    run(with_pool(backend, body))


def test_closing_the_pool_ends_its_vms_and_leftovers_are_found(
    env: Path, backend: FakeBackend
) -> None:
    async def scenario() -> None:
        pool = new_pool(backend, 1)
        pool.refill()
        await until(lambda: pool.report()["idle"] == 1, "the pool to fill")
        orphan = pool._idle[0].machine
        pool._idle.clear()  # forgotten without closing, as by a crash
        await pool.close()
        assert orphan.returncode is None
        pool_module.remove_leftovers(Provisioner(backend))
        assert orphan.returncode is not None
        assert not orphan.state_dir.exists()

        pool = new_pool(backend, 1)
        pool.refill()
        await until(lambda: pool.report()["idle"] == 1, "the pool to fill")
        kept = pool._idle[0].machine
        await pool.close()
        assert kept.returncode is not None and not kept.state_dir.exists()

    run(scenario())
