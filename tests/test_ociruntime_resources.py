"""husk-runtime's resources without VMs: runc's LinuxResources and update flags as the
container's cgroup files in its VM, what a VM cannot honour refused, the update command
talking to a (fake) keeper, and the guest's side of the cgroup (its checks and writes)."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from husk.guest.agent import cgroup2
from husk.ociruntime import resources, state
from husk.ociruntime.errors import RuntimeFailure
from husk.ociruntime.resources import VmShape
from test_ociruntime import assert_runc_error, runtime

VM = VmShape(cpus=2, memory_bytes=512 << 20)


# -- LinuxResources -> cgroup files -------------------------------------------------------


def test_docker_updates_become_cgroup_files() -> None:
    """What the docker engine sends for `docker update --memory 64m --cpus 0.5` (its
    whole resources: zeros mean unchanged)."""
    body = {
        "memory": {"limit": 64 << 20, "swap": 128 << 20},
        "cpu": {"shares": 0, "quota": 50000, "period": 100000, "cpus": "", "mems": ""},
        "pids": {"limit": -1},
    }
    assert resources.cgroup_files(body, VM) == {
        "memory.max": str(64 << 20),
        "cpu.max": "50000 100000",
        "pids.max": "max",
    }


def test_podman_resources_with_devices_and_defaults_are_accepted() -> None:
    body = {
        "devices": [{"allow": False, "access": "rwm"}],
        "memory": {"limit": 100 << 20, "swappiness": 60},
        "cpu": {"shares": 1024, "quota": 200000},
        "pids": {"limit": 2048},
        "hugepageLimits": [],
        "blockIO": {},
    }
    assert resources.cgroup_files(body, VM) == {
        "memory.max": str(100 << 20),
        "cpu.weight": "39",  # runc's conversion of 1024 shares
        "cpu.max": "200000 100000",
        "pids.max": "2048",
    }


def test_unlimited_and_reservations_and_cpusets() -> None:
    body = {
        "memory": {"limit": -1, "reservation": 32 << 20},
        "cpu": {"quota": -1, "period": 50000, "cpus": "0-1", "mems": "0"},
    }
    assert resources.cgroup_files(body, VM) == {
        "memory.max": "max",
        "memory.low": str(32 << 20),
        "cpu.max": "max 50000",
        "cpuset.cpus": "0-1",
        "cpuset.mems": "0",
    }
    assert resources.cgroup_files({}, VM) == {}
    assert resources.cgroup_files({"unified": {"memory.high": "1000000"}}, VM) == {
        "memory.high": "1000000"
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"memory": {"limit": 1 << 30}}, "exceeds the VM's memory"),
        ({"cpu": {"quota": 300000, "period": 100000}}, "exceeds the VM's 2 vCPU"),
        ({"cpu": {"cpus": "0,3"}}, "names CPU 3, the VM has 2 vCPU"),
        ({"cpu": {"cpus": "zero"}}, "must be a list"),
        ({"cpu": {"mems": "1"}}, "one memory node"),
        ({"cpu": {"period": 10}}, "cpu.period must be between"),
        ({"cpu": {"realtimeRuntime": 950000}}, "realtimeRuntime is not supported"),
        ({"memory": {"kernel": 1 << 20}}, "memory.kernel limits are not supported"),
        ({"memory": {"limit": 64 << 20, "swap": 32 << 20}}, r"memory\+swap"),
        ({"memory": {"disableOOMKiller": True}}, "OOM killer"),
        ({"blockIO": {"weight": 500}}, "block I/O"),
        ({"rdma": {"mlx5_0": {"hcaHandles": 3}}}, "RDMA"),
        ({"network": {"classID": 3}}, "network class"),
        ({"memory": {"limit": "64m"}}, "must be an integer"),
        ({"pids": {"limit": -5}}, "must be -1"),
        ({"unified": {"io.max": "8:0 rbps=1"}}, "io.max is not supported"),
        ({"unified": {"memory.max": str(2 << 30)}}, "exceeds the VM's memory"),
        ({"memory": []}, "memory must be an object"),
    ],
)
def test_what_a_vm_cannot_honour_is_refused(body: dict[str, Any], message: str) -> None:
    with pytest.raises(RuntimeFailure, match=message):
        resources.cgroup_files(body, VM)


def test_at_create_the_vm_size_is_the_memory_limit() -> None:
    """The VM is sized from the limit (or io.husk.memory made it smaller than asked):
    the cgroup does not repeat it; a smaller limit is applied."""
    at_create = {"memory": {"limit": 512 << 20}, "pids": {"limit": 2048}}
    assert resources.cgroup_files(at_create, VM, at_create=True) == {"pids.max": "2048"}
    larger = {"memory": {"limit": 4 << 30}}
    assert resources.cgroup_files(larger, VM, at_create=True) == {}
    smaller = {"memory": {"limit": 128 << 20}}
    assert resources.cgroup_files(smaller, VM, at_create=True) == {"memory.max": str(128 << 20)}


def test_runc_update_flags_and_their_merge_over_the_file() -> None:
    flags: dict[str, str | None] = dict.fromkeys(("memory", "cpu-quota"), None)
    flags.update({"memory": "64m", "cpu-quota": "25000", "cpu-period": "100000"})
    flags.update({"pids-limit": "100", "cpuset-cpus": "1", "cpu-share": "512"})
    from_flags = resources.from_flags(flags)
    assert from_flags == {
        "memory": {"limit": 64 << 20},
        "cpu": {"quota": 25000, "period": 100000, "shares": 512, "cpus": "1"},
        "pids": {"limit": 100},
    }
    merged = resources.merge({"memory": {"limit": 1, "reservation": 2}, "pids": {}}, from_flags)
    assert merged["memory"] == {"limit": 64 << 20, "reservation": 2}
    with pytest.raises(RuntimeFailure, match="--memory must be a size"):
        resources.from_flags({"memory": "lots"})
    with pytest.raises(RuntimeFailure, match="--pids-limit must be an integer"):
        resources.from_flags({"pids-limit": "x"})
    with pytest.raises(RuntimeFailure, match="Intel RDT"):
        resources.from_flags({"l3-cache-schema": "L3:0=f"})


def test_the_resources_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text('{"memory": {"limit": 5}}')
    assert resources.read(str(path)) == {"memory": {"limit": 5}}
    assert resources.read("-", '{"pids": {"limit": 3}}') == {"pids": {"limit": 3}}
    with pytest.raises(RuntimeFailure, match="not valid JSON"):
        resources.read("-", "{")
    with pytest.raises(RuntimeFailure, match="cannot read"):
        resources.read(str(tmp_path / "missing.json"))
    with pytest.raises(RuntimeFailure, match="must be an object"):
        resources.read("-", "[1]")


# -- the update command and the keeper ------------------------------------------------------


class FakeKeeper:
    """A control socket answering like a keeper; remembers the requests."""

    def __init__(self, path: Path, reply: dict[str, Any]) -> None:
        self.requests: list[dict[str, Any]] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            with sock:
                line = sock.makefile("rb").readline()
                self.requests.append(json.loads(line))
                sock.sendall((json.dumps(self.reply) + "\n").encode())


def running_record(root: Path, control_path: Path, status: str = "running") -> None:
    (root / "c1").mkdir(parents=True)
    record = state.StateRecord(
        id="c1",
        bundle="/b",
        rootfs="/r",
        created="t",
        status=status,
        pid=os.getpid(),  # alive: this test stands for the keeper
        pid_start=state.process_start(os.getpid()) or 0,
        control=str(control_path),
    )
    state.save(root / "c1", record)


def test_update_sends_the_file_and_flags_to_the_keeper(tmp_path: Path) -> None:
    root = tmp_path / "root"
    keeper = FakeKeeper(tmp_path / "k.sock", {"cgroup": {}})
    running_record(root, tmp_path / "k.sock")
    (tmp_path / "r.json").write_text(json.dumps({"memory": {"limit": 1}, "pids": {"limit": 9}}))
    args = ("update", "--resources", str(tmp_path / "r.json"), "--memory", "64m", "c1")
    result = runtime(root, *args)
    assert result.returncode == 0, result.stderr
    assert keeper.requests == [
        {"op": "update", "resources": {"memory": {"limit": 64 << 20}, "pids": {"limit": 9}}}
    ]
    result = runtime(root, "update", "--cpu-shares", "512", "--pids-limit", "-1", "c1")
    assert result.returncode == 0, result.stderr
    assert keeper.requests[-1]["resources"] == {"cpu": {"shares": 512}, "pids": {"limit": -1}}


def test_update_reports_the_keepers_refusal_as_runc_does(tmp_path: Path) -> None:
    root = tmp_path / "root"
    FakeKeeper(tmp_path / "k.sock", {"error": "cannot update container resources: too much"})
    running_record(root, tmp_path / "k.sock")
    assert_runc_error(runtime(root, "update", "--memory", "9g", "c1"), root, "too much")
    assert_runc_error(runtime(root, "update", "--memory", "x", "c1"), root, "must be a size")


def test_update_of_a_paused_or_stopped_container_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    running_record(root, tmp_path / "k.sock", status="paused")
    assert_runc_error(runtime(root, "update", "--memory", "1m", "c1"), root, "is paused")
    (root / "c2").mkdir()
    state.save(root / "c2", state.StateRecord(id="c2", bundle="/b", rootfs="/r", created="t"))
    assert_runc_error(runtime(root, "update", "--memory", "1m", "c2"), root, "is stopped")


# -- the guest's side ---------------------------------------------------------------------


def test_the_guest_checks_the_form_of_every_file() -> None:
    good = {"memory.max": "67108864", "cpu.max": "max 100000", "cpuset.cpus": "0-1,3"}
    assert cgroup2.check(good) == good
    for bad in (
        {"memory.max": "64m"},
        {"cpu.max": "1; reboot"},
        {"cgroup.procs": "1"},
        {"../memory.max": "1"},
        {"pids.max": 5},
        [],
    ):
        with pytest.raises(cgroup2.CgroupError):
            cgroup2.check(bad)


def test_the_guest_writes_the_files_in_order_and_reads_them_back(tmp_path: Path) -> None:
    group = tmp_path / "container"
    group.mkdir()
    for name in ("memory.max", "cpu.max", "pids.max", "cpuset.cpus", "cpuset.mems"):
        (group / name).write_text("max\n")
    now = cgroup2.apply({"memory.max": "1048576", "cpuset.cpus": "0"}, str(group))
    assert now["memory.max"] == "1048576" and now["cpuset.cpus"] == "0"
    assert now["pids.max"] == "max"
    with pytest.raises(cgroup2.CgroupError, match=r"cpu\.weight is not available"):
        cgroup2.apply({"cpu.weight": "100"}, str(group))


# -- preserved descriptors and ps ---------------------------------------------------------


def test_preserved_descriptors_are_refused_before_anything_is_made(tmp_path: Path) -> None:
    from test_ociruntime import make_bundle

    root = tmp_path / "root"
    bundle_dir = make_bundle(tmp_path / "bundle")
    result = runtime(root, "create", "--bundle", str(bundle_dir), "--preserve-fds", "2", "c1")
    assert_runc_error(result, root, "--preserve-fds 2 is not supported")
    assert not (root / "c1").exists()
    running_record(root, tmp_path / "k.sock")
    result = runtime(root, "exec", "--preserve-fds", "1", "c1", "true")
    assert_runc_error(result, root, "cannot receive the host's file descriptors")


def test_ps_lists_the_keeper_and_what_it_started(tmp_path: Path) -> None:
    """The container's host processes: its pid (here this test) and its descendants."""
    import subprocess
    import sys

    root = tmp_path / "root"
    running_record(root, tmp_path / "k.sock")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        listed = json.loads(runtime(root, "ps", "--format", "json", "c1").stdout)
        assert listed[0] == os.getpid() and child.pid in listed
        table = runtime(root, "ps", "c1").stdout.splitlines()
        assert table[0].split() == ["PID", "CMD"]
        assert any(line.startswith(str(child.pid)) and "time.sleep" in line for line in table)
    finally:
        child.kill()
        child.wait()


# -- the engines' hot commands, parsed without argparse -------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["state", "c1"],
        ["--root", "/run/r", "start", "c1"],
        ["--root=/run/r", "--log", "/l", "--log-format", "json", "kill", "c1", "9"],
        ["--systemd-cgroup", "kill", "--all", "c1", "SIGKILL"],
        ["kill", "c1"],
        ["--log-format=text", "delete", "--force", "c1"],
        ["delete", "-f", "c1"],
    ],
)
def test_the_fast_parser_agrees_with_the_full_one(argv: list[str]) -> None:
    from husk.ociruntime import cli

    fast = cli.fast_arguments(argv)
    assert fast is not None
    full = cli.build_parser().parse_args(argv)
    for name in ("root", "log", "log_format", "systemd_cgroup", "id", "handler", "debug"):
        assert getattr(fast, name) == getattr(full, name), name
    for name in ("signal", "all", "force"):
        if hasattr(full, name):
            assert getattr(fast, name) == getattr(full, name), name


@pytest.mark.parametrize(
    "argv",
    [
        ["create", "--bundle", "/b", "c1"],
        ["--debug", "state", "c1"],
        ["state", "--unknown", "c1"],
        ["state"],
        ["state", "a", "b"],
        ["kill", "a", "9", "x"],
        ["--log-format", "xml", "state", "c1"],
        ["--root"],
        ["update", "--memory", "1m", "c1"],
    ],
)
def test_anything_else_goes_to_the_full_parser(argv: list[str]) -> None:
    from husk.ociruntime import cli

    assert cli.fast_arguments(argv) is None


# -- the keeper's side of update (a stand-in VM) --------------------------------------------


class StandInClient:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, dict[str, Any]]] = []

    async def request(self, frame_type: Any, body: dict[str, Any]) -> dict[str, Any]:
        self.sent.append((frame_type, body))
        return {"cgroup": {"memory.max": body["cgroup"].get("memory.max", "max")}}


class StandInSandbox:
    def __init__(self) -> None:
        self.client = StandInClient()
        self.machine = SimpleNamespace(config=SimpleNamespace(resources=lambda: (1, 256)))


def stand_in_keeper(tmp_path: Path, status: str) -> Any:
    from husk.ociruntime import bundle as bundles
    from husk.ociruntime import keeper as keepers
    from test_ociruntime import make_bundle

    root = tmp_path / "root"
    (root / "c1").mkdir(parents=True)
    state.save(root / "c1", state.StateRecord(id="c1", bundle="/b", rootfs="/r", created="t"))
    spec = bundles.load(make_bundle(tmp_path / "bundle"))
    keeper = keepers.Keeper(keepers.KeeperOptions(root, "c1", spec, None, None, "text"))
    keeper.sandbox = StandInSandbox()
    keeper.record.status = status
    return keeper


def test_the_keeper_applies_updates_in_the_guest_or_at_start(tmp_path: Path) -> None:
    import asyncio

    from husk.guest.protocol import MsgType

    created = stand_in_keeper(tmp_path / "a", "created")
    body = {"resources": {"memory": {"limit": 64 << 20}, "pids": {"limit": 50}}}
    reply = asyncio.run(created.op_update(body))
    assert reply == {"cgroup": {"memory.max": str(64 << 20), "pids.max": "50"}}
    assert created.sandbox.client.sent == []  # kept for the RUN body's "cgroup"
    assert created.cgroup == {"memory.max": str(64 << 20), "pids.max": "50"}

    running = stand_in_keeper(tmp_path / "b", "running")
    reply = asyncio.run(running.op_update(body))
    assert running.sandbox.client.sent == [
        (MsgType.RESOURCES, {"cgroup": {"memory.max": str(64 << 20), "pids.max": "50"}})
    ]
    assert reply == {"cgroup": {"memory.max": str(64 << 20)}}

    with pytest.raises(RuntimeFailure, match="exceeds the VM's memory"):
        asyncio.run(running.op_update({"resources": {"memory": {"limit": 1 << 30}}}))
    paused = stand_in_keeper(tmp_path / "c", "paused")
    with pytest.raises(RuntimeFailure, match="cannot update a container that is paused"):
        asyncio.run(paused.op_update(body))
