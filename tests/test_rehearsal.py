"""A pooled VM's rehearsal of a start, without a VM: the host's disks and the pool's handling
of a failed rehearsal, and the guest's undoing (tests/test_pool.py runs it in real VMs)."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from husk.errors import GuestError
from husk.guest.agent import container_root
from husk.guest.agent import rehearsal as guest
from husk.guest.agent.system import SystemError_
from husk.guest.protocol import (
    REQUIRED_FIELDS,
    MsgType,
    ProtocolError,
    encode_json,
    validate_fields,
)
from husk.sandbox import pool, rehearsal
from husk.sandbox.pool import PoolShape, WarmPool

MIB = 1024 * 1024

# -- the host's side ------------------------------------------------------------------


def test_the_rehearsal_program_is_an_executable_that_exits_0(tmp_path: Path) -> None:
    program = tmp_path / "true"
    program.write_bytes(rehearsal.exit_zero_program())
    program.chmod(0o755)
    assert subprocess.run([program], check=False).returncode == 0


def test_placeholders_get_an_erofs_image_and_an_ext4_of_their_sizes(tmp_path: Path) -> None:
    image, upper = tmp_path / "image", tmp_path / "upper"
    with open(image, "wb") as fh:
        fh.truncate(64 * MIB)
    rehearsal.fill_placeholders(image, upper, 32 * MIB)
    with open(image, "rb") as fh:
        fh.seek(1024)
        assert struct.unpack("<I", fh.read(4))[0] == 0xE0F5E1E2  # erofs' magic
    assert image.stat().st_size == 64 * MIB  # the template's disk size is kept
    with open(upper, "rb") as fh:
        fh.seek(1024 + 56)
        assert struct.unpack("<H", fh.read(2))[0] == 0xEF53  # ext4's magic
    assert upper.stat().st_size == 32 * MIB
    listing = subprocess.run(
        ["dump.erofs", "--path=/bin", "--ls", str(image)], capture_output=True, text=True
    )
    if listing.returncode == 0:  # erofs-utils' dump tool, where installed
        assert "true" in listing.stdout


def test_rehearse_is_a_request_the_protocol_checks() -> None:
    assert REQUIRED_FIELDS[MsgType.REHEARSE] == {"image": str, "upper": str, "argv": "list[str]"}
    validate_fields(MsgType.REHEARSE, {"image": "a", "upper": "b", "argv": ["/bin/true"]})
    with pytest.raises(ProtocolError):
        validate_fields(MsgType.REHEARSE, {"image": "a", "argv": ["/bin/true"]})
    assert encode_json(MsgType.REHEARSE, 3, {"image": "a", "upper": "b", "argv": ["x"]})


@dataclass
class _Sketch:
    """What the fake launch reads of a machine configuration."""

    state_dir: Path
    tcg_cache_mib: int = 0


class _Machine:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.killed = False
        self.pid = 0
        self.tcg_cache_mib = 0

    async def kill(self) -> None:
        self.killed = True

    def cpu_seconds(self) -> float:
        return 1.5 if self.killed else 1.0

    def rss_bytes(self) -> int:
        return 100 * MIB


class _Client:
    closed = False

    async def close(self) -> None:
        self.closed = True


def _fake_launches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[_Machine]:
    """The pool's restores give fake VMs: what the pool does around them is real."""
    machines: list[_Machine] = []
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(pool, "machine_config", lambda config, fds=(): _Sketch(config.state_dir))

    async def make_plan(config: Any, **_: Any) -> tuple[Any, str]:
        return SimpleNamespace(config=config, inputs=SimpleNamespace(key="k")), ""

    async def launch(config: Any, prepare: Any, **_: Any) -> Any:
        machine = _Machine(config.state_dir)
        machine.tcg_cache_mib = config.tcg_cache_mib
        config.state_dir.mkdir()
        machines.append(machine)
        return SimpleNamespace(machine=machine, client=_Client(), template_key="k")

    monkeypatch.setattr(pool, "make_plan", make_plan)
    monkeypatch.setattr(pool, "launch", launch)
    return machines


def test_a_vm_whose_rehearsal_fails_is_killed_and_the_pool_fills_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    machines = _fake_launches(monkeypatch, tmp_path)
    asked: list[Any] = []

    async def failing(client: Any) -> None:
        asked.append(client)
        raise GuestError("cannot unmount /run/husk/root after the rehearsal: busy")

    monkeypatch.setattr(rehearsal, "rehearse", failing)
    monkeypatch.setattr(pool, "_REFILL_BACKOFF", 0.0)

    async def body() -> WarmPool:
        warm = WarmPool(1, PoolShape(), asyncio.Semaphore(1), upper_disk_bytes=32 * MIB)
        assert warm.rehearse
        warm.refill()
        assert warm._filler is not None
        await asyncio.wait_for(warm._filler, 30)
        return warm

    warm = asyncio.run(body())
    assert len(asked) == 1 and len(machines) == 2
    assert machines[0].killed  # never offered half-rehearsed
    assert [vm.machine for vm in warm._idle] == [machines[1]]  # restored again, plain
    assert not machines[1].killed and machines[1].tcg_cache_mib == 0
    assert not warm.rehearse and warm.report()["rehearsed"] is False
    assert "rehearsal failed" in warm.last_error and "busy" in warm.last_error
    # nothing of the failed VM is left: its state directory and placeholder disks are gone
    left = {p.name for p in (tmp_path / "run" / "vms").iterdir()}
    assert left == {machines[1].state_dir.name, machines[1].state_dir.name + pool.DISKS_SUFFIX}


def test_a_rehearsed_vm_is_offered_and_its_cost_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    machines = _fake_launches(monkeypatch, tmp_path)
    seen: list[tuple[bytes, int]] = []

    async def rehearse(client: Any) -> None:
        disks = next((tmp_path / "run" / "vms").glob("*" + pool.DISKS_SUFFIX))
        with open(disks / "image.placeholder", "rb") as fh:
            fh.seek(1024)
            image = fh.read(4)
        seen.append((image, (disks / "upper.placeholder").stat().st_size))
        machines[-1].killed = True  # (the fake's CPU clock moves on by 0.5 s)

    monkeypatch.setattr(rehearsal, "rehearse", rehearse)

    async def body() -> dict[str, Any]:
        warm = WarmPool(1, PoolShape(), asyncio.Semaphore(1), upper_disk_bytes=32 * MIB)
        warm.refill()
        assert warm._filler is not None
        await asyncio.wait_for(warm._filler, 30)
        assert len(warm._idle) == 1
        return warm.report()

    report = asyncio.run(body())
    # the guest rehearsed on real file systems, written before the VM started
    assert seen == [(struct.pack("<I", 0xE0F5E1E2), 32 * MIB)]
    # with room for the rehearsal's translated code and the start's (no flush between)
    assert machines[0].tcg_cache_mib == pool.REHEARSED_TCG_CACHE_MIB > 32
    assert report["rehearsed"] is True
    assert report["rehearsal_cpu_seconds"] == 0.5


def test_without_rehearsal_the_placeholders_stay_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_launches(monkeypatch, tmp_path)
    monkeypatch.setenv("HUSK_NO_REHEARSAL", "1")

    async def never(client: Any) -> None:
        raise AssertionError("rehearsed although disabled")

    monkeypatch.setattr(rehearsal, "rehearse", never)

    async def body() -> WarmPool:
        warm = WarmPool(1, PoolShape(), asyncio.Semaphore(1), upper_disk_bytes=32 * MIB)
        warm.refill()
        assert warm._filler is not None
        await asyncio.wait_for(warm._filler, 30)
        return warm

    warm = asyncio.run(body())
    assert len(warm._idle) == 1 and not warm.rehearse
    assert warm._idle[0].machine.tcg_cache_mib == 0  # QEMU's default bound
    upper = warm._idle[0].disks / "upper.placeholder"
    assert os.stat(upper).st_blocks == 0  # sparse, no file system written


# -- the guest's side -----------------------------------------------------------------


def test_mount_points_under_the_state_directory_are_found_in_mount_order() -> None:
    mountinfo = "\n".join(
        [
            "22 1 0:20 / /run rw - tmpfs run rw",
            "30 22 0:30 / /run/husk/image ro - erofs /dev/vda ro",
            "31 22 0:31 / /run/husk/upper rw - ext4 /dev/vdb rw",
            "32 22 0:32 / /run/husk/root rw - overlay overlay rw",
            "33 32 0:33 / /run/husk/root/dev rw - tmpfs tmpfs rw",
            "34 22 0:34 / /run/husky rw - tmpfs x rw",
            "35 22 0:35 / /run/husk/a\\040b rw - tmpfs x rw",
        ]
    )
    assert guest.mounts_under("/run/husk", mountinfo) == [
        "/run/husk/image",
        "/run/husk/upper",
        "/run/husk/root",
        "/run/husk/root/dev",
        "/run/husk/a b",
    ]


def test_tear_down_unmounts_only_the_rehearsals_mounts_innermost_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = ["/run/husk/cgroup-pids", "/run/husk/image", "/run/husk/root", "/run/husk/root/dev"]
    unmounted: list[str] = []
    dropped: list[str] = []
    monkeypatch.setattr(guest, "_mounts", lambda: list(now))
    monkeypatch.setattr(guest.syscalls, "umount", lambda point, flags=0: unmounted.append(point))
    monkeypatch.setattr(guest, "drop_cache", dropped.append)
    made = [tmp_path / "state", tmp_path / "state" / "root"]
    for path in made:
        path.mkdir()
    guest.tear_down(["/dev/vda", "/dev/vdb"], [str(p) for p in made], {"/run/husk/cgroup-pids"})
    assert unmounted == ["/run/husk/root/dev", "/run/husk/root", "/run/husk/image"]
    assert dropped == ["/dev/vda", "/dev/vdb"]
    assert not made[0].exists()  # the directories it made are gone, innermost first


def test_tear_down_fails_when_something_stays_mounted_or_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest, "_mounts", lambda: ["/run/husk/root"])

    def busy(point: str, flags: int = 0) -> None:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(guest.syscalls, "umount", busy)
    monkeypatch.setattr(guest, "drop_cache", lambda device: None)
    with pytest.raises(SystemError_, match="cannot unmount /run/husk/root"):
        guest.tear_down([], [], set())
    monkeypatch.setattr(guest, "_mounts", list)
    left = tmp_path / "root"
    left.mkdir()
    (left / "file").write_text("written")
    with pytest.raises(OSError):
        guest.tear_down([], [str(left)], set())


def _agent(**state: Any) -> Any:
    fields: dict[str, Any] = {
        "workload": None,
        "sessions": {},
        "tunnels": {},
        "listeners": {},
        "maintenance": False,
        "isolation": None,
        "networking": SimpleNamespace(rehearse=lambda hostname: hostname == "pool"),
        "_finish_background": lambda: None,
    }
    return SimpleNamespace(**{**fields, **state})


BODY = {"image": "husk-image", "upper": "husk-upper", "argv": ["/bin/true"]}


@pytest.fixture
def guest_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The guest's rehearsal with its system calls recorded (the host's hostname is safe)."""
    calls: dict[str, Any] = {"hostname": ["pool"], "torn_down": [], "code": 0, "fail": None}
    monkeypatch.setattr(guest.socket, "gethostname", lambda: "pool")
    monkeypatch.setattr(guest.socket, "sethostname", calls["hostname"].append)
    monkeypatch.setattr(container_root, "prepared", lambda: False)
    monkeypatch.setattr(guest, "block_device_for_serial", lambda serial: f"/dev/{serial}")
    monkeypatch.setattr(guest, "_mounts", lambda: ["/run/husk/cgroup-pids"])

    def prepare(body: dict[str, Any], address: str | None) -> dict[str, Any]:
        assert body["hostname"] == "pool" and body["hosts_later"] is True
        if calls["fail"] == "prepare":
            raise SystemError_("mounting /dev/husk-image on /run/husk/image failed")
        return {}

    def run(agent: Any, body: dict[str, Any], deadline: float) -> int:
        assert body["argv"] == ["/bin/true"] and deadline > time.monotonic()
        assert body["user"] == "" and body.get("shm_size") in (None, 64 * MIB)
        if calls["fail"] == "run":
            raise SystemError_("the rehearsal's process did not exit in time")
        code: int = calls["code"]
        return code

    monkeypatch.setattr(container_root, "prepare", prepare)
    monkeypatch.setattr(guest, "_run", run)
    monkeypatch.setattr(guest, "tear_down", lambda *args: calls["torn_down"].append(args))
    return calls


def test_a_rehearsal_runs_and_is_undone(guest_calls: dict[str, Any]) -> None:
    assert guest.rehearse(_agent(), dict(BODY)) == {"exit_code": 0, "networked": False}
    assert guest.rehearse(_agent(), {**BODY, "network": True}) == {
        "exit_code": 0,
        "networked": True,
    }
    devices, made, kept = guest_calls["torn_down"][0]
    assert devices == ["/dev/husk-image", "/dev/husk-upper"]
    assert kept == {"/run/husk/cgroup-pids"}
    assert set(made) <= set(guest._MADE_DIRECTORIES)  # those that did not exist before
    assert guest_calls["hostname"][-1] == "pool"


@pytest.mark.parametrize("failure", ["prepare", "run", "exit"])
def test_a_failed_rehearsal_is_undone_and_reported(
    guest_calls: dict[str, Any], failure: str
) -> None:
    guest_calls["fail"] = failure
    guest_calls["code"] = 3
    message = "exited with 3" if failure == "exit" else "mounting|did not exit"
    with pytest.raises(SystemError_, match=message):
        guest.rehearse(_agent(), dict(BODY))
    assert len(guest_calls["torn_down"]) == 1  # undone all the same
    assert guest_calls["hostname"][-1] == "pool"


@pytest.mark.parametrize(
    "state", [{"workload": object()}, {"sessions": {3: object()}}, {"maintenance": True}]
)
def test_a_vm_that_served_anything_is_not_rehearsed(
    guest_calls: dict[str, Any], state: dict[str, Any]
) -> None:
    with pytest.raises(SystemError_, match="served nothing yet"):
        guest.rehearse(_agent(**state), dict(BODY))
    assert guest_calls["torn_down"] == []


def test_a_bad_timeout_or_shm_size_is_refused(guest_calls: dict[str, Any]) -> None:
    with pytest.raises(SystemError_, match="positive number"):
        guest.rehearse(_agent(), {**BODY, "timeout": "soon"})
    with pytest.raises(SystemError_, match="shm_size"):
        guest.rehearse(_agent(), {**BODY, "shm_size": True})
    assert guest.rehearse(_agent(), {**BODY, "shm_size": 64 * MIB})["exit_code"] == 0


def test_a_process_that_overstays_is_killed_at_the_deadline() -> None:
    pid = os.posix_spawnp("sleep", ["sleep", "30"], dict(os.environ))
    began = time.monotonic()
    with pytest.raises(SystemError_, match="did not exit in time"):
        guest._wait(pid, time.monotonic() + 0.2)
    assert time.monotonic() - began < 5
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped, not left behind
    quick = os.posix_spawnp("sh", ["sh", "-c", "exit 3"], dict(os.environ))
    assert guest._wait(quick, time.monotonic() + 10) == 3
