"""The process-level options (read-only, capabilities, ulimits, sysctls, DNS …): no VM.

Each option is followed from the husk CLI's flags and the Docker API's HostConfig
to the ContainerSpec, to the RUN body the guest gets, to what inspect shows; bad
values are refused with Docker's words. The VM side is in test_guest_confinement.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from husk import confinement
from husk.agent.client import ProcessSpec
from husk.agent.messages import run_options
from husk.cli.main import cli, main
from husk.daemon.docker.create_config import inspect_fields, spec_from_create
from husk.errors import InvalidArgument
from husk.guest.agent import capabilities, limits, users
from husk.spec import ContainerSpec

CPUS = os.cpu_count() or 1


def _cli_body(monkeypatch: pytest.MonkeyPatch, *flags: str) -> dict[str, Any]:
    """The create body ``husk run FLAGS busybox`` sends, through click's own parsing."""
    from husk.cli import createopts, run

    captured: dict[str, Any] = {}

    def capture(image: str, command: tuple[str, ...], options: dict[str, Any], **kw: Any) -> Any:
        captured.update(createopts.build_create_request(image, command, options, **kw).body)
        raise SystemExit(0)

    monkeypatch.setattr(run, "build_create_request", capture)
    result = CliRunner().invoke(cli, ["run", *flags, "busybox"])
    assert result.exit_code == 0, result.output
    return captured


ALL_FLAGS = (
    "--read-only",
    "--tmpfs",
    "/scratch",
    "--cap-drop",
    "ALL",
    "--cap-add",
    "net_bind_service",
    "--ulimit",
    "nofile=512:1024",
    "--ulimit",
    "nproc=-1",
    "--sysctl",
    "net.ipv4.ip_forward=1",
    "--sysctl",
    "kernel.shmmax=1048576",
    "--shm-size",
    "8m",
    "--group-add",
    "audio",
    "--group-add",
    "1234",
    "--security-opt",
    "no-new-privileges",
    "--security-opt",
    "seccomp=unconfined",
    "--pids-limit",
    "50",
    "-m",
    "256m",
    "--memory-swap",
    "512m",
    "--cpuset-cpus",
    "0",
    "--add-host",
    "db:192.0.2.7",
    "--add-host",
    "host.docker.internal:host-gateway",
    "--dns",
    "192.0.2.53",
    "--dns-search",
    "example.test",
    "--dns-option",
    "ndots:2",
    "--oom-score-adj",
    "500",
)


def test_every_flag_travels_from_the_cli_to_the_guest_and_back_to_inspect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = _cli_body(monkeypatch, *ALL_FLAGS)
    host = body["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["CAP_NET_BIND_SERVICE"]
    assert host["Ulimits"] == [
        {"Name": "nofile", "Soft": 512, "Hard": 1024},
        {"Name": "nproc", "Soft": -1, "Hard": -1},
    ]
    assert host["Sysctls"] == {"net.ipv4.ip_forward": "1", "kernel.shmmax": "1048576"}
    assert host["ShmSize"] == 8 * 1024 * 1024 and host["PidsLimit"] == 50
    assert host["OomScoreAdj"] == 500
    assert host["MemorySwap"] == 512 * 1024 * 1024 and host["CpusetCpus"] == "0"
    assert host["GroupAdd"] == ["audio", "1234"]
    assert host["ExtraHosts"] == ["db:192.0.2.7", "host.docker.internal:host-gateway"]
    assert (host["Dns"], host["DnsSearch"], host["DnsOptions"]) == (
        ["192.0.2.53"],
        ["example.test"],
        ["ndots:2"],
    )

    spec = spec_from_create(body, None)
    assert ContainerSpec.from_json(spec.to_json()) == spec  # survives the store
    run = ProcessSpec(["true"], options=run_options(spec)).body()
    assert run["read_only"] is True and run["no_new_privileges"] is True
    assert run["ulimits"][0] == {"name": "nofile", "soft": 512, "hard": 1024}
    assert run["sysctls"]["kernel.shmmax"] == "1048576" and run["shm_size"] == 8 << 20
    assert run["pids_limit"] == 50 and run["group_add"] == ["audio", "1234"]
    assert run["oom_score_adj"] == 500
    # host-gateway is the address husk documents as the host's, resolved on the host.
    assert run["extra_hosts"] == ["192.0.2.7\tdb", "10.0.2.2\thost.docker.internal"]
    assert capabilities.from_spec(run) == {capabilities.NUMBERS["NET_BIND_SERVICE"]}

    shown = inspect_fields(spec)
    assert shown["ReadonlyRootfs"] is True and shown["CapDrop"] == ["ALL"]
    assert shown["Ulimits"] == [
        {"Name": "nofile", "Hard": 1024, "Soft": 512},
        {"Name": "nproc", "Hard": -1, "Soft": -1},
    ]
    assert shown["ExtraHosts"] == ["db:192.0.2.7", "host.docker.internal:host-gateway"]
    assert shown["SecurityOpt"] == ["no-new-privileges", "seccomp=unconfined"]
    assert (shown["ShmSize"], shown["PidsLimit"], shown["CpusetCpus"]) == (8 << 20, 50, "0")
    assert shown["OomScoreAdj"] == 500


def test_defaults_show_dockers_zero_values_and_send_nothing() -> None:
    spec = spec_from_create({"Image": "b", "HostConfig": {"PidsLimit": 0, "ShmSize": 0}}, None)
    assert run_options(spec) == {"shm_size": 64 * 1024 * 1024}  # Docker's /dev/shm
    shown = inspect_fields(spec)
    assert shown["ReadonlyRootfs"] is False and shown["ShmSize"] == 64 * 1024 * 1024
    assert shown["CapAdd"] is None and shown["PidsLimit"] is None and shown["Dns"] == []
    assert shown["OomScoreAdj"] == 0
    assert "Sysctls" not in shown  # omitted, as Docker's omitempty does


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sysctl", "vm.swappiness=1"], "sysctl 'vm.swappiness=1' is not allowed"),
        (["--sysctl", "kernel.hostname=x"], "is not allowed"),
        (["--ulimit", "foo=1"], "invalid ulimit type: foo"),
        (["--ulimit", "nofile=10:5"], "soft limit must be less than or equal to hard limit"),
        (["--ulimit", "nofile=abc"], "invalid ulimit value"),
        (["--dns", "notanip"], "IP address is not correctly formatted: notanip"),
        (["--add-host", "bad"], 'bad format for add-host: "bad"'),
        (["--add-host", "h:notip"], 'invalid IP address in add-host: "notip"'),
        (["--cap-add", "FOO"], 'unknown capability: "CAP_FOO"'),
        (
            ["--oom-score-adj", "1001"],
            "Invalid value 1001, range for oom score adj is [-1000, 1000]",
        ),
        (["--security-opt", "bogus"], 'Invalid --security-opt: "bogus"'),
        (["--security-opt", "seccomp=/p.json"], "not supported by husk"),
        (["--security-opt", "apparmor=docker-default"], "not supported by husk"),
        (["--shm-size", "-1"], "invalid size"),
    ],
)
def test_the_cli_refuses_bad_values_with_exit_125(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", *flags, "busybox"])
    assert exited.value.code == 125
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ({"NanoCpus": 64 * 10**9}, f"range of CPUs is from 0.01 to {CPUS}.00, as there are only"),
        ({"NanoCpus": 1_000_000}, "range of CPUs is from 0.01"),
        ({"NanoCpus": 10**9, "CpuQuota": 50000}, "Conflicting options: Nano CPUs"),
        ({"CpuQuota": 10}, "CPU cfs quota can not be less than 1ms"),
        ({"CpusetCpus": "0-99"}, "Requested CPUs are not available - requested 0-99"),
        ({"CpusetCpus": "x"}, "invalid value x for cpuset cpus"),
        ({"MemorySwap": 1 << 30}, "You should always set the Memory limit"),
        ({"Memory": 1 << 30, "MemorySwap": 1 << 29}, "Minimum memoryswap limit"),
        ({"ShmSize": -1}, "SHM size can not be less than 0"),
        ({"OomKillDisable": True}, "HostConfig.OomKillDisable"),
        ({"OomScoreAdj": -1001}, "Invalid value -1001, range for oom score adj is [-1000, 1000]"),
        ({"CpuShares": 512}, "HostConfig.CpuShares"),
        ({"BlkioWeight": 300}, "HostConfig.BlkioWeight"),
        ({"MemoryReservation": 1 << 20}, "HostConfig.MemoryReservation"),
        ({"Sysctls": {"kernel.panic": "1"}}, "sysctl 'kernel.panic=1' is not allowed"),
        ({"CapDrop": ["CAP_NOPE"]}, 'invalid CapDrop: unknown capability: "CAP_NOPE"'),
        ({"Ulimits": [{"Name": "nofile", "Soft": 9, "Hard": 2}]}, "soft limit"),
        ({"Ulimits": [{"Name": "bogus", "Soft": 1, "Hard": 2}]}, "invalid ulimit type"),
        ({"ExtraHosts": ["h:x"]}, "invalid IP address in add-host"),
        ({"Dns": ["1.2.3"]}, "IP address is not correctly formatted"),
        ({"SecurityOpt": ["label=type:x"]}, "not supported by husk"),
        ({"GroupAdd": ["a:b"]}, "GroupAdd"),
        ({"IpcMode": "host"}, "HostConfig.IpcMode"),
        ({"CgroupnsMode": "host"}, "HostConfig.CgroupnsMode"),
        ({"LogConfig": {"Type": "syslog", "Config": {}}}, "'syslog' logging driver"),
        ({"MaskedPaths": []}, "HostConfig.MaskedPaths"),
    ],
)
def test_the_api_refuses_what_husk_cannot_honour(host: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        spec_from_create({"Image": "b", "HostConfig": host}, None)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("config", "field"),
    [({"Domainname": "example.test"}, "Domainname"), ({"MacAddress": "02:42:ac:11:00:02"}, "Mac")],
)
def test_config_fields_husk_cannot_honour_are_refused(config: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"Config.{field}"):
        spec_from_create({"Image": "b", **config}, None)


def test_the_api_accepts_the_zero_values_clients_send() -> None:
    host: dict[str, Any] = {
        "CpuShares": 0,
        "BlkioWeight": 0,
        "MemorySwappiness": None,
        "OomKillDisable": False,
        "PidsLimit": None,
        "MemorySwap": -1,
        "CpusetCpus": "",
        "CapAdd": None,
        "CapDrop": None,
        "Sysctls": {},
        "MaskedPaths": None,
        "IpcMode": "private",
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m"}},
        "SecurityOpt": ["no-new-privileges:false", "label=disable", "apparmor=unconfined"],
        "NanoCpus": CPUS * 10**9,
    }
    spec = spec_from_create({"Image": "b", "HostConfig": host}, None)
    assert not spec.no_new_privileges and spec.memory_swap == -1
    assert spec.cpus == CPUS


def test_memory_swap_rules_follow_dockers() -> None:
    confinement.check_memory_swap(None, -1)
    confinement.check_memory_swap(1 << 30, 1 << 30)
    confinement.check_memory_swap(1 << 30, 2 << 30)
    with pytest.raises(InvalidArgument, match="unlimited"):
        confinement.check_memory_swap(1 << 30, -5)


def test_the_guest_reads_the_settings_and_refuses_broken_ones() -> None:
    settings = limits.Settings(
        {
            "read_only": True,
            "no_new_privileges": True,
            "group_add": ["audio"],
            "ulimits": [{"name": "nofile", "soft": 10, "hard": -1}],
            "pids_limit": 7,
        }
    )
    assert settings.read_only and settings.no_new_privileges and settings.pids_limit == 7
    assert settings.rlimits == [(7, 10, -1)]
    with pytest.raises(limits.LimitError, match="unknown ulimit"):
        limits.Settings({"ulimits": [{"name": "as-if", "soft": 1, "hard": 1}]})
    with pytest.raises(limits.LimitError, match="group_add"):
        limits.Settings({"group_add": "audio"})
    for bad in (-1001, 1001, "5", True):
        with pytest.raises(limits.LimitError, match="oom_score_adj must be an integer"):
            limits.Settings({"oom_score_adj": bad})
    assert limits.Settings({"oom_score_adj": -1000}).oom_score_adj == -1000
    with pytest.raises(limits.LimitError, match="not allowed"):
        limits.write_sysctl("kernel.core_pattern", "|/x")
    with pytest.raises(limits.LimitError, match="not allowed"):
        limits.write_sysctl("net.../../kernel/core_pattern", "x")


def test_group_add_resolves_names_in_the_image(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/:\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\naudio:x:29:\napp:x:1000:\n")
    identity = users.resolve("app", str(tmp_path), ["audio", "4321"])
    assert identity.groups == [1000, 29, 4321]
    with pytest.raises(users.UserError, match="Unable to find group video"):
        users.resolve("app", str(tmp_path), ["video"])


def test_cpuset_pins_every_thread_of_the_vm_process() -> None:
    import subprocess
    import sys

    from husk.runtime.cpu_pinning import pin

    threaded = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start()"
    child = subprocess.Popen([sys.executable, "-c", f"{threaded}; time.sleep(30)"])
    try:
        time.sleep(0.5)  # its second thread is running
        first = min(os.sched_getaffinity(0))
        pin(child.pid, str(first))
        threads = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(threads) == 2
        assert all(os.sched_getaffinity(t) == {first} for t in threads)
    finally:
        child.kill()
        child.wait()


def test_capabilities_are_kept_as_the_client_wrote_them_and_applied_normalised() -> None:
    spec = spec_from_create({"Image": "b", "HostConfig": {"CapAdd": ["net_admin"]}}, None)
    assert inspect_fields(spec)["CapAdd"] == ["net_admin"]  # as Docker's inspect shows it
    run = run_options(spec)
    assert capabilities.NUMBERS["NET_ADMIN"] in capabilities.from_spec(run)


def test_add_host_forms() -> None:
    assert confinement.hosts_entries(["a=192.0.2.1", "b:::1", "c:[2001:db8::1]"]) == [
        "192.0.2.1\ta",
        "::1\tb",
        "2001:db8::1\tc",
    ]


def test_a_cpu_quota_alone_uses_the_kernels_period() -> None:
    spec = spec_from_create({"Image": "b", "HostConfig": {"CpuQuota": 150_000}}, None)
    assert spec.cpus == 1.5
    spec = spec_from_create(
        {"Image": "b", "HostConfig": {"CpuQuota": 50_000, "CpuPeriod": 50_000}}, None
    )
    assert spec.cpus == 1.0


def test_a_cpuset_without_cpus_gives_the_vm_one_vcpu_per_cpu() -> None:
    from husk.runtime.cpu_pinning import vcpus_for_cpuset

    available = sorted(os.sched_getaffinity(0))
    assert vcpus_for_cpuset(None) is None
    assert vcpus_for_cpuset(",".join(map(str, available))) == len(available)


def test_systempaths_unconfined_reaches_the_guest() -> None:
    host = {"SecurityOpt": ["systempaths=unconfined"]}
    spec = spec_from_create({"Image": "b", "HostConfig": host}, None)
    assert run_options(spec)["unconfined_system_paths"] is True
    assert limits.Settings(run_options(spec)).unconfined_system_paths
    assert "unconfined_system_paths" not in run_options(spec_from_create({"Image": "b"}, None))
