"""Faults are contained to their container, visible in it, and recoverable (issue 10, item 5).

The real daemon with real VMs for the real paths: a host disk that fills up under a
container, a read-only data directory, a QEMU killed under a running container. A
fake VM (tests/fake_guest.py: a QMP monitor and an agent port served by a test
process) for guests that speak the protocol badly. Plus unit tests of the record
store and the log writer against a real full (tmpfs) and read-only filesystem.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon_fixtures import RunningDaemon, kill_leftover_vms, short_root, start_daemon
from husk.runtime.logs import LogFile
from husk.runtime.model import ContainerRecord, now_iso
from husk.runtime.store import RECORD, ContainerStore
from husk.spec import ContainerSpec

IMAGE = "husk.local/busybox:latest"
TESTS = Path(__file__).parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs / read-only bind")


# -- helpers ----------------------------------------------------------------------------


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted on ``path`` for the block; always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` bind-mounted read-only over itself for the block."""
    run("mount", "--bind", str(path), str(path))
    try:
        run("mount", "-o", "remount,bind,ro", str(path))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def load_busybox(daemon: RunningDaemon) -> None:
    subprocess.run(
        [sys.executable, str(TESTS / "testimages.py"), "busybox"],
        env=daemon.env,
        check=True,
        capture_output=True,
        timeout=120,
    )


def state(daemon: RunningDaemon, name: str) -> dict[str, Any]:
    out = daemon.docker("inspect", name).stdout
    result: dict[str, Any] = json.loads(out)[0]["State"]
    return result


def names_and_states(daemon: RunningDaemon) -> dict[str, str]:
    out = daemon.docker("ps", "-a", "--format", "{{.Names}}\t{{.State}}").stdout.decode()
    return dict(line.split("\t", 1) for line in out.splitlines() if line)


def actions(daemon: RunningDaemon, name: str, since: float) -> list[str]:
    out = daemon.docker(
        "events",
        "--since",
        f"{since:.3f}",
        "--until",
        f"{time.time():.3f}",
        "--filter",
        f"container={name}",
        "--format",
        "{{.Action}}",
    ).stdout.decode()
    return out.split()


def hard_restart(daemon: RunningDaemon) -> RunningDaemon:
    """Ends the daemon as a crash would (its VMs keep running) and starts a new one."""
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait(10)
    return start_daemon(daemon.root)


@contextlib.contextmanager
def daemon_at(root: Path) -> Iterator[RunningDaemon]:
    """A daemon on ``root`` whose VMs restore from the session's boot templates (none is
    built here: a cold boot each costs more under TCG); cleaned up after."""
    holder = {"daemon": start_daemon(root, templates_from_session=True)}
    try:
        load_busybox(holder["daemon"])
        yield holder["daemon"]  # tests may replace it through hard_restart: see `holder`
    finally:
        holder["daemon"].stop()
        kill_leftover_vms(root)


def stop_daemon(daemon: RunningDaemon) -> None:
    daemon.process.send_signal(signal.SIGTERM)
    daemon.process.wait(30)


# -- a host disk that fills up under a container -----------------------------------------

FILL = "dd if=/dev/zero of=/fill bs=1M count={mib} 2>/dev/null; sync; echo done; sleep 1000"


def wait_disk_full(daemon: RunningDaemon, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        current = state(daemon, name)
        return current if "disk full" in current["Error"] else None

    return wait_for(check, f"{name} to report the full disk", timeout=180)  # type: ignore[no-any-return]


@needs_root
@pytest.mark.vm
def test_disk_full_pauses_visibly_and_every_way_out_works(guest_bundle: object) -> None:
    """A container writing until the host disk is full.

    Before: QEMU paused the VM silently, husk said "running", and stop/kill failed
    with a 500 because they saved the record (to the full disk) before acting.
    Now: the container shows paused with the reason in State.Error and an event;
    freeing space and unpausing lets it finish; stop, kill and rm -f all work.
    """
    root = short_root()
    try:
        with tmpfs(root / "data" / "containers", "160m") as containers, daemon_at(root) as daemon:
            since = time.time()
            # 1. Recoverable: space comes back, unpause retries the write, the workload finishes.
            daemon.docker("run", "-d", "--name", "filler", IMAGE, "sh", "-c", FILL.format(mib=60))
            ballast = containers / "ballast"
            free = shutil.disk_usage(containers).free
            with open(ballast, "wb") as out:
                out.truncate(0)
                out.write(b"\0" * max(0, free - 24 * 1024 * 1024))
            paused = wait_disk_full(daemon, "filler")
            assert paused["Status"] == "paused", paused
            assert "writable layer" in paused["Error"] and "unpause" in paused["Error"]
            assert {"pause", "io_error"} <= set(actions(daemon, "filler", since))
            assert names_and_states(daemon)["filler"] == "paused"
            ballast.unlink()
            daemon.docker("unpause", "filler")
            wait_for(lambda: b"done" in daemon.docker("logs", "filler").stdout, "dd to finish")
            after = state(daemon, "filler")
            assert after["Status"] == "running" and after["Error"] == "", after
            daemon.docker("rm", "-f", "filler")

            # 2. stop, kill and rm -f of a container stuck on the full disk.
            for name, way_out in (
                ("stopped", ("stop", "-t", "2")),
                ("killed", ("kill",)),
                ("removed", ("rm", "-f")),
            ):
                daemon.docker("run", "-d", "--name", name, IMAGE, "sh", "-c", FILL.format(mib=400))
                assert wait_disk_full(daemon, name)["Status"] == "paused"
                started = time.monotonic()
                result = daemon.docker(*way_out, name, check=False)
                assert result.returncode == 0, result.stderr
                assert time.monotonic() - started < 30
                if name == "removed":
                    assert name not in names_and_states(daemon)
                    continue
                ended = wait_for(
                    lambda n=name: (s := state(daemon, n))["Status"] == "exited" and s,  # type: ignore[misc]
                    f"{name} to exit",
                )
                assert "disk full" in ended["Error"], ended
                assert "die" in actions(daemon, name, since)
                daemon.docker("rm", name)
            assert not any(containers.iterdir()), list(containers.iterdir())
            assert "Traceback" not in daemon.log()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- a read-only data directory -----------------------------------------------------------


@needs_root
@pytest.mark.vm
def test_rm_on_a_read_only_data_directory_fails_and_says_what(guest_bundle: object) -> None:
    """Before: ``rm -f`` said it removed containers that came back after a daemon restart.

    The containers' directory is made read-only (the image store, beside it, needs its
    lock files writable to answer at all).
    """
    root = short_root()
    try:
        with daemon_at(root) as first:
            first.docker("run", "-d", "--name", "busy", IMAGE, "sleep", "1000")
            first.docker("create", "--name", "idle", IMAGE, "true")
            containers = first.data_dir / "containers"
            with read_only(containers):
                for name in ("busy", "idle"):
                    result = first.docker("rm", "-f", name, check=False)
                    message = result.stderr.decode()
                    assert result.returncode != 0, message
                    assert "could not delete" in message and "Read-only file system" in message
                    assert str(containers) in message
                    assert names_and_states(first)[name] == "dead"
                # The VM was ended all the same: rm acts first.
                assert state(first, "busy")["Pid"] == 0
                stop_daemon(first)
                second = start_daemon(root)  # on the read-only directory still
                try:
                    listed = names_and_states(second)
                    assert {"busy", "idle"} <= set(listed), listed
                    assert "lost the VM" in state(second, "busy")["Error"]
                finally:
                    stop_daemon(second)
            third = start_daemon(root)
            try:
                assert {"busy", "idle"} <= set(names_and_states(third))
                third.docker("rm", "-f", "busy", "idle")
                assert names_and_states(third) == {}
            finally:
                stop_daemon(third)
            fourth = start_daemon(root)
            try:
                assert names_and_states(fourth) == {}  # really gone: nothing comes back
                assert not any(containers.iterdir())
            finally:
                stop_daemon(fourth)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """``chattr +i`` on ``path`` for the block: not even root may replace or delete it."""
    run("chattr", "+i", str(path))
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)


def qemu_running_in(state_dir: Path) -> bool:
    marker = str(state_dir).encode()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                return True
    return False


@needs_root
@pytest.mark.vm
def test_a_start_that_cannot_be_recorded_and_a_partial_rm_stay_consistent(
    guest_bundle: object,
) -> None:
    """A started VM whose record cannot be saved is not left running unmanaged; an rm that
    deletes some files but not all leaves a dead container (after a restart too) that the
    next rm -f finishes."""
    root = short_root()
    try:
        with daemon_at(root) as daemon:
            container_id = daemon.docker(
                "create", "--name", "stuck", IMAGE, "sh", "-c", "echo up; sleep 1000"
            )
            directory = daemon.data_dir / "containers" / container_id.stdout.decode().strip()
            with immutable(directory / RECORD):
                failed = daemon.docker("start", "stuck", check=False)
                assert failed.returncode != 0
                assert b"cannot save the state of container stuck" in failed.stderr
                assert b"Operation not permitted" in failed.stderr
            assert not qemu_running_in(daemon.run_dir / "vms" / directory.name[:16])
            assert state(daemon, "stuck")["Status"] == "exited"

            daemon.docker("start", "stuck")
            wait_for(lambda: (directory / "container.log").exists(), "the container's log")
            with immutable(directory / "upper.ext4"):
                failed = daemon.docker("rm", "-f", "stuck", check=False)
                message = failed.stderr.decode()
                assert failed.returncode != 0
                assert f"{directory}/upper.ext4: Operation not permitted" in message, message
                assert "container.log" not in message  # that one went
                assert state(daemon, "stuck")["Status"] == "dead"
                stop_daemon(daemon)
                again = start_daemon(root)
                try:
                    dead = state(again, "stuck")
                    assert dead["Status"] == "dead" and "removal failed" in dead["Error"], dead
                    assert again.docker("start", "stuck", check=False).returncode != 0
                finally:
                    stop_daemon(again)
            final = start_daemon(root)
            try:
                final.docker("rm", "-f", "stuck")
                assert not directory.exists()
            finally:
                stop_daemon(final)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- guests that break the protocol, seen by a restarted daemon ----------------------------


def fake_vm(daemon: RunningDaemon, container_id: str, mode: str) -> subprocess.Popen[bytes]:
    """Puts a fake VM where the daemon will look for ``container_id``'s (see fake_guest.py)."""
    from husk.bundle import locate
    from husk.vm.machine import DiskConfig, MachineConfig
    from husk.vm.processes import process_start_ticks
    from husk.vm.qemu import config_to_json, write_json_atomic

    state_dir = daemon.run_dir / "vms" / container_id[:16]
    state_dir.mkdir(parents=True, mode=0o700)
    fake = subprocess.Popen(
        [sys.executable, str(TESTS / "fake_guest.py"), str(state_dir), mode],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert fake.stdout is not None and fake.stdout.readline() == b"ready\n"
    bundle = locate()
    container_dir = daemon.data_dir / "containers" / container_id
    disks = [
        DiskConfig(container_dir / "image.erofs", "husk-image", readonly=True),
        DiskConfig(container_dir / "upper.ext4", "husk-upper"),
    ]
    config = MachineConfig(
        kernel=bundle.kernel, initrd=bundle.initrd, state_dir=state_dir, disks=disks
    )
    write_json_atomic(
        state_dir / "machine.json",
        {
            "format": 1,
            "pid": fake.pid,
            "start_ticks": process_start_ticks(fake.pid),
            "accel": "tcg",
            "config": config_to_json(config),
        },
    )
    record_path = daemon.data_dir / "containers" / container_id / RECORD
    record = json.loads(record_path.read_text())
    record["state"].update(status="running", pid=fake.pid, started_at=now_iso())
    record_path.write_text(json.dumps(record))
    return fake


@pytest.mark.vm
def test_malformed_ready_and_exited_are_contained_to_their_containers(
    guest_bundle: object,
) -> None:
    """Before: a malformed READY made startup() die (AttributeError) and the daemon with
    it, until that QEMU was killed by hand; a malformed EXITED left a container "Up"
    forever, even after stop. Now: the daemon starts, each bad guest's VM is ended and
    its container exited with the reason, and a healthy container beside them works.
    """
    root = short_root()
    fakes: list[subprocess.Popen[bytes]] = []
    try:
        with daemon_at(root) as daemon:
            daemon.docker("run", "-d", "--name", "good", IMAGE, "sleep", "1000")
            ids = {}
            bad = {"badready": "bad-ready", "badexited": "bad-exited", "badtop": "bad-top"}
            for name in bad:
                ids[name] = daemon.docker("create", "--name", name, IMAGE, "true").stdout
            stop_daemon(daemon)  # detaches; "good" keeps running
            for name, mode in bad.items():
                fakes.append(fake_vm(daemon, ids[name].decode().strip(), mode))
            torn = daemon.data_dir / "containers" / ("e" * 64)  # a record cut short
            torn.mkdir(mode=0o700)
            (torn / RECORD).write_text('{"id": "' + "e" * 64 + '", "name": "to')
            restarted = start_daemon(root)
            try:
                dead = state(restarted, "unreadable-eeeeeeeeeeee")
                assert dead["Status"] == "dead" and "unreadable" in dead["Error"], dead
                restarted.docker("rm", "unreadable-eeeeeeeeeeee")
                assert not torn.exists()
                # A process list that breaks parsing fails that request, clearly, and only it.
                top = restarted.docker("top", "badtop", check=False)
                assert top.returncode != 0 and b"badtop" in top.stderr, top
                assert len(top.stderr.decode().strip().splitlines()) == 1, top.stderr
                assert restarted.docker("stop", "-t", "1", "badtop", check=False).returncode == 0
                assert state(restarted, "badtop")["Status"] == "exited"
                for fake in fakes:  # each bad guest's "QEMU" was ended
                    fake.wait(60)
                exited = wait_for(
                    lambda: (s := state(restarted, "badexited"))["Status"] == "exited" and s,
                    "the bad EXITED container to end",
                    timeout=60,
                )
                assert "guest agent" in exited["Error"], exited
                assert exited["ExitCode"] == 137
                bad_ready = state(restarted, "badready")
                assert bad_ready["Status"] == "exited", bad_ready
                assert "daemon restart" in bad_ready["Error"], bad_ready
                assert restarted.docker("logs", "badexited").stdout == (
                    b"hello from the fake guest\n"
                )
                assert restarted.docker("stop", "badexited", check=False).returncode == 0
                assert names_and_states(restarted)["good"] == "running"
                out = restarted.docker("exec", "good", "echo", "still here").stdout
                assert out == b"still here\n"
                restarted.docker("rm", "badready", "badexited", "badtop")
                assert "Traceback" not in restarted.log()
            finally:
                restarted.stop()
    finally:
        for fake in fakes:
            with contextlib.suppress(ProcessLookupError):
                fake.kill()
            fake.wait(10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.vm
def test_hypervisor_events_show_in_the_container(guest_bundle: object) -> None:
    """A host read error on the writable disk shows (the container runs on); a VM stopped
    on an internal error is ended, and its container exits with the reason.
    The hypervisor is a fake one (fake_guest.py ``vm-events``): these cannot be caused
    on demand in a real QEMU here."""
    root = short_root()
    fake: subprocess.Popen[bytes] | None = None
    try:
        with daemon_at(root) as daemon:
            since = time.time()
            created = daemon.docker("create", "--name", "shaky", IMAGE, "true")
            stop_daemon(daemon)
            fake = fake_vm(daemon, created.stdout.decode().strip(), "vm-events")
            restarted = start_daemon(root)
            try:
                running = wait_for(
                    lambda: (s := state(restarted, "shaky"))["Error"] and s,
                    "the read error to show",
                    timeout=30,
                )
                assert running["Status"] == "running", running
                assert running["Error"] == (
                    "host I/O error on the writable layer "
                    f"({restarted.data_dir / 'containers' / created.stdout.decode().strip()}"
                    "/upper.ext4): read failed: Input/output error"
                )
                ended = wait_for(
                    lambda: (s := state(restarted, "shaky"))["Status"] == "exited" and s,
                    "the stopped VM to end its container",
                    timeout=30,
                )
                assert "internal error" in ended["Error"], ended
                assert fake.wait(30) == -signal.SIGKILL
                assert {"io_error", "die"} <= set(actions(restarted, "shaky", since))
                restarted.docker("rm", "shaky")
            finally:
                restarted.stop()
    finally:
        if fake is not None and fake.poll() is None:
            fake.kill()
            fake.wait(10)
        shutil.rmtree(root, ignore_errors=True)


# -- a VM that dies under its container ---------------------------------------------------


@pytest.mark.vm
def test_a_killed_qemu_or_a_guest_panic_shows_in_the_container(guest_bundle: object) -> None:
    """Before: the container exited 137 with no word of why."""
    root = short_root()
    try:
        with daemon_at(root) as daemon:
            since = time.time()
            daemon.docker("run", "-d", "--name", "victim", IMAGE, "sleep", "1000")
            os.kill(state(daemon, "victim")["Pid"], signal.SIGKILL)
            ended = wait_for(
                lambda: (s := state(daemon, "victim"))["Status"] == "exited" and s,
                "the container to exit",
            )
            assert ended["ExitCode"] == 137
            assert "the VM ended unexpectedly" in ended["Error"], ended
            assert "signal 9" in ended["Error"], ended
            assert "die" in actions(daemon, "victim", since)
            daemon.docker("start", "victim")  # recoverable: a fresh VM on the same disk
            assert names_and_states(daemon)["victim"] == "running"
            assert state(daemon, "victim")["Error"] == ""
            daemon.docker("rm", "-f", "victim")

            # Root of a privileged container owns its VM and can panic its kernel: that
            # ends its container, visibly.
            crash = "sleep 1; echo c > /proc/sysrq-trigger; sleep 1000"
            daemon.docker(
                "run", "-d", "--privileged", "--name", "panicker", IMAGE, "sh", "-c", crash
            )
            panicked = wait_for(
                lambda: (s := state(daemon, "panicker"))["Status"] == "exited" and s,
                "the panicked container to exit",
            )
            assert "the guest kernel panicked" in panicked["Error"], panicked
            daemon.docker("rm", "panicker")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- unit: records and logs on a full or read-only filesystem ------------------------------


def record(name: str = "c") -> ContainerRecord:
    from husk.runtime.model import new_container_id

    return ContainerRecord(
        id=new_container_id(),
        name=name,
        spec=ContainerSpec(image=IMAGE),
        image_id="sha256:" + "0" * 64,
        image_ref=IMAGE,
        created=now_iso(),
        argv=["true"],
        env=[],
        workdir="/",
        user="",
        stop_signal="SIGTERM",
        stop_timeout=10,
    )


@needs_root
def test_a_full_disk_never_truncates_a_record(tmp_path: Path) -> None:
    from husk.runtime.store import StorageError

    with tmpfs(tmp_path / "containers", "1m") as root:
        store = ContainerStore(root)
        saved = record()
        store.add(saved)
        before = (root / saved.id / RECORD).read_bytes()
        (root / "ballast").write_bytes(b"\0" * (1024 * 1024 - 4096))  # ENOSPC on the way
        saved.state.health_log = [{"Output": "x" * 200_000}]
        with pytest.raises(StorageError, match="No space left on device"):
            store.save(saved)
        assert (root / saved.id / RECORD).read_bytes() == before
        assert sorted(p.name for p in (root / saved.id).iterdir()) == [RECORD]
        assert ContainerStore(root).get(saved.id).state.health_log == []


def test_an_unreadable_record_is_listed_dead_and_removable(tmp_path: Path) -> None:
    store = ContainerStore(tmp_path)
    good, bad = record("good"), record("bad")
    store.add(good)
    store.add(bad)
    path = tmp_path / bad.id / RECORD
    path.write_bytes(path.read_bytes()[:100])  # torn by a foreign tool
    reloaded = ContainerStore(tmp_path)
    assert reloaded.get("good").state.status == "created"
    stand_in = reloaded.get(bad.id)
    assert stand_in.state.status == "dead"
    assert "unreadable container record" in stand_in.state.error
    with pytest.raises(Exception, match="can only be removed"):
        reloaded.save(stand_in)
    reloaded.delete(bad.id)
    assert not (tmp_path / bad.id).exists()
    assert [r.name for r in ContainerStore(tmp_path).all()] == ["good"]


@needs_root
def test_delete_on_a_read_only_directory_names_what_stays(tmp_path: Path) -> None:
    from husk.runtime.store import StorageError

    store = ContainerStore(tmp_path)
    kept = record()
    store.add(kept)
    (tmp_path / kept.id / "upper.ext4").write_bytes(b"disk")
    with read_only(tmp_path), pytest.raises(StorageError) as failure:
        store.delete(kept.id)
    assert "upper.ext4: Read-only file system" in str(failure.value)
    assert store.get(kept.id) is kept
    assert ContainerStore(tmp_path).get(kept.id).id == kept.id  # still there after a restart
    store.delete(kept.id)
    assert not (tmp_path / kept.id).exists()
    assert ContainerStore(tmp_path).all() == []


@needs_root
def test_container_logs_survive_a_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "logs", "64k") as root:
        logfile = LogFile(root / "container.log")
        logfile.write("stdout", b"first\n")
        big = b"y" * 100_000 + b"\n"
        logfile.write("stdout", big)  # refused: dropped, reported, no exception
        assert logfile.write_error == "No space left on device"
        (root / "container.log").read_bytes().decode().splitlines()  # no torn line
        logfile.write("stdout", b"second\n")
        assert logfile.write_error is None
        assert [e.data for e in logfile.read()] == [b"first\n", b"second\n"]


def test_block_io_error_messages_and_protocol_violations() -> None:
    from husk.runtime.faults import block_io_error, guest_broke_protocol

    disks = {"disk1": ("writable layer", "/data/c/upper.ext4")}
    message, paused = block_io_error(
        {"device": "disk1", "action": "stop", "nospace": True, "operation": "write"}, disks
    )
    assert paused and message.startswith("disk full: the host has no space left for the writable")
    message, paused = block_io_error(
        {"node-name": "disk1", "action": "report", "operation": "read", "reason": "EIO"}, disks
    )
    assert not paused and "read failed: EIO" in message
    from husk.errors import GuestError
    from husk.guest.protocol import ProtocolError

    assert guest_broke_protocol(ProtocolError("bad"))
    assert guest_broke_protocol(AttributeError("'int' object has no attribute 'get'"))
    assert not guest_broke_protocol(GuestError("timed out"))
    violation = GuestError("bad shape")
    violation.protocol_violation = True  # type: ignore[attr-defined]
    assert guest_broke_protocol(violation)
    assert not guest_broke_protocol(asyncio.CancelledError())
