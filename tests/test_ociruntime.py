"""husk-runtime without VMs: the bundle's checks, state records, signals, the VM plan,
and the command line's runc-style errors (JSON log lines, exit status, no leftovers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from husk.ociruntime import bundle, hooks, signals, state, vmplan
from husk.ociruntime.errors import RuntimeFailure

SRC = Path(__file__).resolve().parent.parent / "src"


def make_bundle(directory: Path, **overrides: Any) -> Path:
    (directory / "rootfs" / "bin").mkdir(parents=True, exist_ok=True)
    for program in ("sh", "app"):
        (directory / "rootfs" / "bin" / program).write_text("")
        (directory / "rootfs" / "bin" / program).chmod(0o755)
    config: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "args": ["sh", "-c", "echo hi"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
        },
        "root": {"path": "rootfs"},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
    }
    config.update(overrides)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# -- the bundle ----------------------------------------------------------------------


def test_a_bundle_is_read_into_what_the_vm_needs(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    make_bundle(
        tmp_path,
        process={
            "args": ["/bin/app", "--flag"],
            "env": ["A=1"],
            "cwd": "/work",
            "terminal": True,
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [5, 7]},
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 2048}],
            "noNewPrivileges": True,
            "capabilities": {"bounding": ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]},
            "oomScoreAdj": -999,
        },
        root={"path": "rootfs", "readonly": True},
        mounts=[
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/data",
                "type": "bind",
                "source": str(shared),
                "options": ["rbind", "ro"],
            },
            {
                "destination": "/scratch",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
        ],
        linux={
            "resources": {
                "memory": {"limit": 512 << 20},
                "cpu": {"quota": 150000, "period": 100000},
            },
            "namespaces": [{"type": "network", "path": "/var/run/netns/x"}],
        },
    )
    loaded = bundle.load(tmp_path)
    assert loaded.rootfs == tmp_path / "rootfs"
    assert loaded.readonly is True
    process = loaded.process
    assert (process.args, process.env, process.cwd, process.user) == (
        ["/bin/app", "--flag"],
        ["A=1"],
        "/work",
        "1000:1000",
    )
    assert process.additional_gids == [5, 7]
    assert process.rlimits == [("nofile", 1024, 2048)]
    assert process.no_new_privileges and process.terminal
    assert process.capabilities == ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]
    assert process.oom_score_adj == -999
    assert [(m.destination, m.kind, m.readonly) for m in loaded.mounts] == [
        ("/data", "bind", True),
        ("/scratch", "tmpfs", False),
    ]
    assert loaded.mounts[1].options == "nosuid,mode=755,size=65536k"
    assert loaded.memory_bytes == 512 << 20 and loaded.cpus == 1.5
    assert loaded.netns == "/var/run/netns/x"
    assert loaded.hooks == {}


def test_hooks_are_read_for_the_keeper_to_run(tmp_path: Path) -> None:
    make_bundle(tmp_path, hooks={"prestart": [{"path": "/bin/true"}], "poststop": []})
    assert bundle.load(tmp_path).hooks == {"prestart": [hooks.Hook("/bin/true")]}
    make_bundle(tmp_path, hooks={"startContainer": [{"path": "/bin/true"}]})
    with pytest.raises(RuntimeFailure, match="not supported by husk-runtime"):
        bundle.load(tmp_path)


def test_network_namespace_entries(tmp_path: Path) -> None:
    make_bundle(tmp_path)
    assert bundle.load(tmp_path).netns is None  # the host's network: husk's egress
    make_bundle(tmp_path, linux={"namespaces": [{"type": "network"}]})
    assert bundle.load(tmp_path).netns == ""  # a new namespace: loopback only


def test_annotations_choose_the_vm_size_and_a_cold_boot(tmp_path: Path) -> None:
    make_bundle(
        tmp_path,
        annotations={"io.husk.memory": "1g", "io.husk.cpus": "2", "io.husk.cold-boot": "true"},
        linux={"resources": {"memory": {"limit": 1 << 20}}},
    )
    loaded = bundle.load(tmp_path)
    assert (loaded.memory_bytes, loaded.cpus, loaded.cold_boot) == (1 << 30, 2.0, True)


def test_a_cpuset_sizes_the_vm_to_hold_its_cpus(tmp_path: Path) -> None:
    """`--cpuset-cpus 1` names the VM's second vCPU: the VM gets two (a quota below that
    stays the cgroup's cpu.max)."""
    resources = {"cpu": {"cpus": "0,1", "quota": 50000, "period": 100000}}
    make_bundle(tmp_path, linux={"resources": resources})
    assert bundle.load(tmp_path).cpus == 2.0
    make_bundle(tmp_path, linux={"resources": {"cpu": {"quota": 300000, "period": 100000}}})
    assert bundle.load(tmp_path).cpus == 3.0
    make_bundle(tmp_path, linux={"resources": {"cpu": {"cpus": "0"}}})
    assert bundle.load(tmp_path).cpus is None  # the default: one vCPU


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"process": {"args": []}}, "process.args must name the program"),
        ({"process": {"args": "sh"}}, "process.args must be a list of strings"),
        ({"process": {"args": ["sh"], "cwd": "relative"}}, "process.cwd must be an absolute path"),
        ({"process": None}, "process is missing"),
        (
            {"process": {"args": ["sh"], "oomScoreAdj": -1001}},
            "process.oomScoreAdj must be from -1000 to 1000",
        ),
        ({"process": {"args": ["sh"], "oomScoreAdj": "1"}}, "process.oomScoreAdj must be an"),
        ({"root": {}}, "root.path is missing"),
        ({"root": {"path": "missing"}}, "is not a directory"),
        (
            {"mounts": [{"destination": "/x", "type": "nfs", "source": "srv:/x"}]},
            "mount type 'nfs' on /x is not supported",
        ),
        ({"mounts": [{"destination": "x", "type": "tmpfs"}]}, "must be an absolute path"),
        ({"annotations": {"io.husk.memory": "lots"}}, "io.husk.memory must be a size"),
    ],
)
def test_bad_bundles_are_refused_naming_the_field(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    make_bundle(tmp_path, **overrides)
    with pytest.raises(RuntimeFailure, match=message):
        bundle.load(tmp_path)


def test_a_bundle_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match=r"config\.json not found"):
        bundle.load(tmp_path)
    (tmp_path / "config.json").write_text("[not json")
    with pytest.raises(RuntimeFailure, match="not valid JSON"):
        bundle.load(tmp_path)


# -- signals, ids, state ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "number"), [("KILL", 9), ("SIGTERM", 15), ("9", 9), ("hup", 1)])
def test_signals_by_name_or_number(text: str, number: int) -> None:
    assert signals.parse(text) == number


@pytest.mark.parametrize("text", ["SIGFOO", "0x9", "999", ""])
def test_unknown_signals(text: str) -> None:
    with pytest.raises(RuntimeFailure, match="unknown signal"):
        signals.parse(text)


@pytest.mark.parametrize("bad", ["", "..", "a/b", "a b", "x" * 1025])
def test_container_ids_are_checked(bad: str) -> None:
    with pytest.raises(RuntimeFailure, match="invalid container id"):
        state.check_id(bad)


def test_a_record_whose_keeper_is_gone_is_stopped(tmp_path: Path) -> None:
    directory = tmp_path / "c1"
    directory.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    record = state.StateRecord(
        id="c1",
        bundle="/b",
        rootfs="/b/rootfs",
        created="now",
        status="running",
        pid=gone.pid,
        pid_start=1,
    )
    state.save(directory, record)
    loaded = state.load(tmp_path, "c1")
    assert loaded == record
    oci = state.oci_state(loaded)
    assert (oci["status"], oci["pid"], oci["id"], oci["bundle"]) == ("stopped", 0, "c1", "/b")
    mine = state.StateRecord(
        id="c2",
        bundle="/b",
        rootfs="/r",
        created="now",
        status="running",
        pid=os.getpid(),
        pid_start=state.process_start(os.getpid()) or 0,
    )
    assert state.oci_state(mine)["status"] == "running"
    assert state.oci_state(mine)["pid"] == os.getpid()
    mine.pid_start += 1  # a recycled pid is not the keeper
    assert state.current_status(mine) == "stopped"


# -- the VM's shares ----------------------------------------------------------------------


def test_binds_become_shares_and_mount_requests(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    files = tmp_path / "files"
    files.mkdir()
    for name in ("hosts", "resolv.conf"):
        (files / name).write_text(name)
    make_bundle(
        tmp_path,
        mounts=[
            {"destination": "/etc/hosts", "type": "bind", "source": str(files / "hosts")},
            {
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": str(files / "resolv.conf"),
                "options": ["ro"],
            },
            {"destination": "/data", "type": "bind", "source": str(data)},
            {"destination": "/data/sub", "type": "bind", "source": str(data)},
            {"destination": "/t", "type": "tmpfs", "source": "tmpfs"},
        ],
    )
    plan = vmplan.plan(bundle.load(tmp_path), tmp_path / "private")
    # In mount order (parents first): /data, /t, /etc/hosts, /etc/resolv.conf, /data/sub
    assert [(s.tag, s.path, s.readonly) for s in plan.shares] == [
        ("root", tmp_path / "rootfs", False),
        ("m1", data, False),
        ("m2", tmp_path / "private" / "m2", False),
        ("m3", tmp_path / "private" / "m3", True),
    ]
    assert all(s.security_model == "none" for s in plan.shares)
    by_target = {m["target"]: m for m in plan.mounts}
    assert by_target["/etc/hosts"] == {
        "fstype": "9p",
        "source": "m2",
        "target": "/etc/hosts",
        "readonly": False,
        "file": "hosts",
    }
    assert by_target["/etc/resolv.conf"]["source"] == "m3"  # a file: a share of its own
    assert by_target["/data"]["source"] == by_target["/data/sub"]["source"] == "m1"
    assert by_target["/t"]["fstype"] == "tmpfs"
    targets = [m["target"] for m in plan.mounts]
    assert targets.index("/data") < targets.index("/data/sub")


def test_a_missing_or_special_bind_source_is_refused(tmp_path: Path) -> None:
    make_bundle(tmp_path, mounts=[{"destination": "/x", "type": "bind", "source": "/no/such"}])
    with pytest.raises(RuntimeFailure, match="does not exist"):
        vmplan.plan(bundle.load(tmp_path), tmp_path / "private")
    make_bundle(tmp_path, mounts=[{"destination": "/x", "type": "bind", "source": "/dev/null"}])
    with pytest.raises(RuntimeFailure, match="not supported"):
        vmplan.plan(bundle.load(tmp_path), tmp_path / "private")


def test_process_settings_for_the_guest() -> None:
    from husk.ociruntime.keeper import run_options

    process = bundle.Process(
        args=["x"],
        rlimits=[("nofile", 10, 20), ("unknownlimit", 1, 1)],
        additional_gids=[5],
        no_new_privileges=True,
        capabilities=["CAP_CHOWN", "CAP_NOT_A_THING"],
        oom_score_adj=300,
    )
    assert run_options(process, readonly=True) == {
        "read_only": True,
        "cap_drop": ["ALL"],
        "cap_add": ["CHOWN"],
        "ulimits": [{"name": "nofile", "soft": 10, "hard": 20}],
        "group_add": ["5"],
        "no_new_privileges": True,
        "oom_score_adj": 300,
    }


# -- the command line -------------------------------------------------------------------


def runtime(root: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    log = root.parent / "runtime.log"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "husk.ociruntime.cli",
            "--root",
            str(root),
            "--log",
            str(log),
            "--log-format",
            "json",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def last_log(root: Path) -> dict[str, Any]:
    lines = (root.parent / "runtime.log").read_text().splitlines()
    entry: dict[str, Any] = json.loads(lines[-1])
    return entry


def assert_runc_error(result: subprocess.CompletedProcess[str], root: Path, message: str) -> None:
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    entry = last_log(root)
    assert entry["level"] == "error" and message in entry["msg"] and entry["time"]


def test_create_without_config_json_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (tmp_path / "b").mkdir()
    result = runtime(root, "create", "--bundle", str(tmp_path / "b"), "c1")
    assert_runc_error(result, root, "config.json not found")
    assert not (root / "c1").exists()


def test_create_with_bad_process_args_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_bundle(tmp_path / "b", process={"args": [""]})
    result = runtime(
        root, "create", "--bundle", str(tmp_path / "b"), "--pid-file", str(tmp_path / "pid"), "c1"
    )
    assert_runc_error(result, root, "process.args must name the program")
    assert not (root / "c1").exists() and not (tmp_path / "pid").exists()


def test_a_second_create_of_an_id_fails_and_keeps_the_first(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_bundle(tmp_path / "b")
    (root / "c1").mkdir(parents=True)
    first = state.StateRecord(id="c1", bundle="/first", rootfs="/first/rootfs", created="t")
    state.save(root / "c1", first)
    result = runtime(root, "create", "--bundle", str(tmp_path / "b"), "c1")
    assert_runc_error(result, root, "container with id exists: c1")
    assert state.load(root, "c1") == first


def test_a_terminal_needs_a_console_socket(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_bundle(tmp_path / "b", process={"args": ["sh"], "terminal": True})
    result = runtime(root, "create", "--bundle", str(tmp_path / "b"), "c1")
    assert_runc_error(result, root, "no --console-socket")
    assert not (root / "c1").exists()


def test_kill_with_an_unknown_signal(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = runtime(root, "kill", "c1", "SIGNOPE")
    assert_runc_error(result, root, "unknown signal 'SIGNOPE'")


def test_commands_on_a_container_that_does_not_exist(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for command in (
        ["state", "nope"],
        ["start", "nope"],
        ["kill", "nope", "KILL"],
        ["delete", "nope"],
    ):
        assert_runc_error(runtime(root, *command), root, 'container "nope" does not exist')
    assert runtime(root, "delete", "--force", "nope").returncode == 0


def test_a_stopped_container_is_listed_and_deleted(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "c1").mkdir(parents=True)
    state.save(
        root / "c1",
        state.StateRecord(
            id="c1",
            bundle="/b",
            rootfs="/b/rootfs",
            created="t",
            status="running",
            pid=2**22 + 1,
            pid_start=5,
        ),
    )
    listed = json.loads(runtime(root, "list", "--format", "json").stdout)
    assert [(c["id"], c["status"], c["pid"]) for c in listed] == [("c1", "stopped", 0)]
    shown = json.loads(runtime(root, "state", "c1").stdout)
    assert shown["status"] == "stopped" and shown["ociVersion"]
    assert_runc_error(runtime(root, "kill", "c1", "TERM"), root, "container not running")
    assert_runc_error(
        runtime(root, "exec", "c1", "true"), root, "cannot exec in a container that is stopped"
    )
    assert runtime(root, "delete", "c1").returncode == 0
    assert not (root / "c1").exists()
    assert runtime(root, "delete", "--force", "c1").returncode == 0  # idempotent


def test_bad_arguments_are_a_one_line_error(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = runtime(root, "create", "--no-such-flag", "c1")
    assert_runc_error(result, root, "unrecognized arguments")
    assert_runc_error(runtime(root), root, "a command is needed")


def test_version_features_and_spec(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert "husk-runtime version" in runtime(root, "--version").stdout
    features = json.loads(runtime(root, "features").stdout)
    assert features["ociVersionMax"] == state.OCI_VERSION
    (tmp_path / "rootfs").mkdir()
    assert runtime(root, "spec", cwd=tmp_path).returncode == 0
    assert bundle.load(tmp_path).process.args == ["sh"]
    assert_runc_error(runtime(root, "spec", cwd=tmp_path), root, "exists")


# -- the program, found before the VM boots ----------------------------------------------


def test_the_program_is_looked_up_in_the_rootfs_as_the_container_would(tmp_path: Path) -> None:
    from husk.ociruntime.lookup import check_program

    rootfs = tmp_path / "rootfs"
    (rootfs / "usr" / "bin").mkdir(parents=True)
    (rootfs / "bin").symlink_to("usr/bin")
    tool = rootfs / "usr" / "bin" / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (rootfs / "usr" / "bin" / "data").write_text("not a program")
    (rootfs / "usr" / "bin" / "abs").symlink_to("/usr/bin/tool")  # absolute: inside rootfs
    (rootfs / "usr" / "bin" / "escape").symlink_to("/../../../../bin/sh")
    path = ["PATH=/bin"]
    check_program(rootfs, "tool", path)
    check_program(rootfs, "/bin/tool", [])
    check_program(rootfs, "abs", path)
    check_program(rootfs, "./bin/tool", [], cwd="/usr")
    with pytest.raises(RuntimeFailure, match=r'exec: "nope": executable file not found in \$PATH'):
        check_program(rootfs, "nope", path)
    with pytest.raises(RuntimeFailure, match="no such file or directory"):
        check_program(rootfs, "/bin/nope", path)
    with pytest.raises(RuntimeFailure, match="permission denied"):
        check_program(rootfs, "/bin/data", path)
    with pytest.raises(RuntimeFailure, match="executable file not found"):
        check_program(rootfs, "escape", path)  # never the host's /bin/sh


def test_create_of_a_missing_program_fails_as_runc_does(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_bundle(tmp_path / "b", process={"args": ["no-such-program"], "env": ["PATH=/bin"]})
    result = runtime(root, "create", "--bundle", str(tmp_path / "b"), "c1")
    assert_runc_error(result, root, 'exec: "no-such-program": executable file not found in $PATH')
    assert not (root / "c1").exists()


def test_the_root_share_uses_the_hosts_files_as_they_are(tmp_path: Path) -> None:
    """QEMU's fsdev for husk-runtime's shares: security_model=none, no mapped modes."""
    from husk.vm.machine import MachineConfig, NetConfig, ShareConfig
    from husk.vm.qemu_argv import build_command

    config = MachineConfig(
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd",
        state_dir=tmp_path / "vm",
        shares=[
            ShareConfig("root", tmp_path / "rootfs", security_model="none"),
            ShareConfig("vol0", tmp_path / "vol", readonly=True),
        ],
        net=NetConfig("02:11:22:33:44:55"),
    )
    argv = build_command(
        config,
        binary="qemu",
        accel="tcg",
        qmp_fd=5,
        agent_fd=6,
        boot_time_ns=1,
        disk_fds=[],
        console_fd=9,
    )
    fsdevs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-fsdev"]
    assert fsdevs[0] == f"local,id=fs0,path={tmp_path / 'rootfs'},security_model=none"
    assert "security_model=mapped-xattr" in fsdevs[1] and "readonly=on" in fsdevs[1]


# -- husk system check: the engines ----------------------------------------------------------


def test_engines_configured_for_husk_runtime_are_reported(tmp_path: Path) -> None:
    from husk.ociruntime import engines

    podman_conf = tmp_path / ".config" / "containers" / "containers.conf"
    podman_conf.parent.mkdir(parents=True)
    podman_conf.write_text('[engine.runtimes]\nhusk = ["/usr/local/bin/husk-runtime"]\n')
    daemon_json = tmp_path / "daemon.json"
    daemon_json.write_text('{"runtimes": {"husk": {"path": "/usr/local/bin/husk-runtime"}}}')
    containerd_toml = tmp_path / "config.toml"
    containerd_toml.write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk.options]\n'
        'BinaryName = "/usr/local/bin/husk-runtime"\n'
    )
    installed = {"podman": "/usr/bin/podman", "dockerd": "/usr/sbin/dockerd"}
    statuses = engines.report(
        home=tmp_path,
        which=installed.get,
        docker_config=daemon_json,
        containerd_config=containerd_toml,
    )
    assert [(s.name, s.binary, s.configured_in) for s in statuses] == [
        ("podman", "/usr/bin/podman", str(podman_conf)),
        ("docker engine", "/usr/sbin/dockerd", str(daemon_json)),
        ("containerd", None, None),  # configured, but not installed
    ]
    assert "configured for husk-runtime in" in statuses[0].describe()
    assert statuses[2].describe() == "containerd: not installed"


def test_engines_not_configured_for_husk_runtime(tmp_path: Path) -> None:
    from husk.ociruntime import engines

    (tmp_path / ".config" / "containers").mkdir(parents=True)
    (tmp_path / ".config" / "containers" / "containers.conf").write_text(
        '[engine]\nruntime = "runc"\n'
    )
    (tmp_path / "daemon.json").write_text('{"runtimes": {"other": {"path": "/bin/runsc"}}}')
    (tmp_path / "config.toml").write_text("not = [valid toml")
    statuses = engines.report(
        home=tmp_path,
        which=lambda name: f"/usr/bin/{name}",
        docker_config=tmp_path / "daemon.json",
        containerd_config=tmp_path / "config.toml",
    )
    assert [s.configured_in for s in statuses] == [None, None, None]
    assert statuses[1].describe().endswith("not configured for husk-runtime")


def test_husk_system_check_reports_the_engines(tmp_path: Path) -> None:
    """`husk system check` ends with a line per engine: installed here (Debian's podman,
    dockerd, containerd), podman configured by the user's containers.conf."""
    conf = tmp_path / ".config" / "containers" / "containers.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text('[engine.runtimes]\nhusk = ["/usr/local/bin/husk-runtime"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "husk.cli.main", "system", "check", "--no-boot"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC), "HOME": str(tmp_path)},
        timeout=120,
        check=False,
    )
    engines = [line for line in result.stdout.splitlines() if line.startswith("engine:")]
    assert engines[0].split(None, 1)[1] == (
        f"podman: installed, configured for husk-runtime in {conf}"
    ), result.stdout + result.stderr
    assert engines[1].startswith("engine:        docker engine: installed (")
    assert engines[2].startswith("engine:        containerd: installed (")
    assert len(engines) == 3


def test_what_the_keeper_and_the_hot_commands_import() -> None:
    """Every engine call is a fresh Python process and create's keeper imports the VM's
    stack: neither loads the image store (husk.oci.store: tar, zstandard, registries) nor
    importlib.metadata, which a container's boot does not use (start-up time of each run);
    state/start/kill/delete do not load argparse or the keeper's stack."""
    script = (
        "import json, sys\n"
        "from husk.ociruntime import cli\n"
        "hot = set(sys.modules)\n"
        "from husk.ociruntime import keeper\n"
        "print(json.dumps([sorted(hot), sorted(sys.modules)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    hot, with_keeper = (set(names) for names in json.loads(result.stdout))
    assert "husk.ociruntime.keeper" in with_keeper
    assert not {"husk.oci.store", "husk.oci.rootfs", "importlib.metadata"} & with_keeper
    assert not {"argparse", "husk.sandbox.sandbox", "asyncio", "husk.settings"} & hot


@pytest.mark.parametrize(
    ("status", "returncode"),
    [
        (0, 0),
        (7, 7),
        (130, -2),  # SIGINT: dies of it, as the workload did
        (137, -9),  # SIGKILL
        (143, -15),  # SIGTERM
        (149, 149),  # SIGTTIN would stop the stand-in for ever: an exit status instead
        (148, 148),  # SIGTSTP
        (150, 150),  # SIGTTOU
        (146, 146),  # SIGCONT is ignored by default: nothing to re-raise
        (300, 300 & 0xFF),
    ],
)
def test_the_stand_in_ends_as_the_guest_reports_and_never_stops(
    status: int, returncode: int
) -> None:
    """A guest chooses the status the keeper and the exec stand-in end with; a status
    that names a stop signal must not leave them stopped (the engine would wait for ever)."""
    child = subprocess.run(
        [sys.executable, "-c", f"from husk.ociruntime import signals; signals.exit_like({status})"],
        timeout=20,
        check=False,
    )
    assert child.returncode == returncode
