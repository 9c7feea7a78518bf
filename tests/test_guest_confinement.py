"""Process settings inside real VMs: the docker CLI, docker-py and the husk CLI, one daemon.

One detached container carries most of the options at once and reports what its
workload sees; inspect, top, logs and an exec are checked against the same one.
The parsing and validation of each option is in test_confinement.py (no VM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    RunningDaemon,
    daemon_busybox,
    husk_daemon,
    registry,
    registry_busybox,
)

pytestmark = [pytest.mark.vm, pytest.mark.registry]

HOST_CPUS = sorted(os.sched_getaffinity(0))
CPUSET = ",".join(map(str, HOST_CPUS))

REPORT = r"""
exec 2>&1
touch /root-write 2>/dev/null && echo root=writable || echo root=readonly
touch /scratch/ok && echo tmpfs=writable
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status
grep 'open files' /proc/self/limits | tr -s ' '
echo oom_score_adj=$(cat /proc/self/oom_score_adj)
echo ip_forward=$(cat /proc/sys/net/ipv4/ip_forward) shmmax=$(cat /proc/sys/kernel/shmmax)
grep ' /dev/shm ' /proc/mounts
echo groups=$(id -G)
echo vcpus=$(grep -c ^processor /proc/cpuinfo)
cat /etc/hosts /etc/resolv.conf
sleep 500 &
echo via-proc-1 > /proc/1/fd/1
echo via-dev-stdout > /dev/stdout
echo report-done
exec sleep 600
"""


def _wait_for(daemon: RunningDaemon, name: str, token: str, deadline: float = 240.0) -> str:
    end = time.monotonic() + deadline
    logs = ""
    while time.monotonic() < end:
        logs = daemon.docker("logs", name).stdout.decode(errors="replace")
        if token in logs:
            return logs
        time.sleep(1)
    raise AssertionError(f"{token!r} never appeared in the logs of {name}: {logs!r}")


@pytest.mark.timeout(900)
def test_one_container_honours_every_process_setting(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    docker = husk_daemon.docker
    docker(
        "run", "-d", "--name", "confined",
        "--read-only", "--tmpfs", "/scratch",
        "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE", "--cap-add", "SETUID",
        "--security-opt", "no-new-privileges",
        "--ulimit", "nofile=512:1024",
        "--sysctl", "net.ipv4.ip_forward=1", "--sysctl", "kernel.shmmax=1048576",
        "--shm-size", "8m", "--group-add", "wheel", "--group-add", "4321",
        "--pids-limit", "40", "--cpuset-cpus", CPUSET, "--oom-score-adj", "-900",
        "--add-host", "db:192.0.2.7", "--add-host", "host.docker.internal:host-gateway",
        "--dns", "192.0.2.53", "--dns-search", "example.test", "--dns-option", "ndots:2",
        daemon_busybox, "sh", "-c", REPORT,
    )  # fmt: skip
    try:
        logs = _wait_for(husk_daemon, "confined", "report-done")
        lines = logs.splitlines()
        assert "root=readonly" in lines and "tmpfs=writable" in lines, logs
        # Docker's sets for root with --cap-drop ALL --cap-add …: bounding, permitted and
        # effective hold exactly those; inheritable and ambient are empty.
        wanted = f"{(1 << 10) | (1 << 7):016x}"
        for field in ("CapPrm", "CapEff", "CapBnd"):
            assert f"{field}:\t{wanted}" in lines, logs
        assert "CapInh:\t0000000000000000" in lines and "CapAmb:\t0000000000000000" in lines
        assert "NoNewPrivs:\t1" in lines, logs
        assert "Max open files 512 1024 files " in lines, logs
        # Lowered while the workload still had every capability (it has none of
        # CAP_SYS_RESOURCE, which lowering takes, once it runs).
        assert "oom_score_adj=-900" in lines, logs
        assert "ip_forward=1 shmmax=1048576" in lines, logs
        assert any("size=8192k" in line for line in lines if "/dev/shm" in line), logs
        groups = next(line for line in lines if line.startswith("groups=")).split("=")[1]
        assert {"0", "10", "4321"} <= set(groups.split()), logs
        # --cpuset-cpus without --cpus: one vCPU per CPU of the set.
        assert f"vcpus={len(HOST_CPUS)}" in lines, logs
        assert "192.0.2.7\tdb" in lines and "10.0.2.2\thost.docker.internal" in lines, logs
        assert "nameserver 192.0.2.53" in lines and "search example.test" in lines, logs
        assert "options ndots:2" in lines, logs
        # The workload is PID 1: its /proc/1/fd/1 and /dev/stdout are the log stream.
        assert "via-proc-1" in lines and "via-dev-stdout" in lines, logs

        [doc] = json.loads(docker("inspect", "confined").stdout)
        host = doc["HostConfig"]
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        assert host["CapAdd"] == ["CAP_NET_BIND_SERVICE", "CAP_SETUID"]
        assert host["Ulimits"] == [{"Name": "nofile", "Hard": 1024, "Soft": 512}]
        assert host["Sysctls"] == {"net.ipv4.ip_forward": "1", "kernel.shmmax": "1048576"}
        assert (host["ShmSize"], host["PidsLimit"]) == (8 * 1024 * 1024, 40)
        assert host["OomScoreAdj"] == -900
        assert host["GroupAdd"] == ["wheel", "4321"] and host["CpusetCpus"] == CPUSET
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["ExtraHosts"] == ["db:192.0.2.7", "host.docker.internal:host-gateway"]
        assert (host["Dns"], host["DnsSearch"], host["DnsOptions"]) == (
            ["192.0.2.53"],
            ["example.test"],
            ["ndots:2"],
        )

        # top: the container's processes only (its sleeps), never the agent or kernel threads.
        top = docker("top", "confined").stdout.decode()
        header, *rows = top.splitlines()
        commands = [row[header.index("CMD") :].strip() for row in rows if row.strip()]
        assert 1 <= len(commands) <= 2, top
        assert all(c.startswith(("sleep", "sh -c")) for c in commands), top

        # An exec inherits the container's settings, as Docker's do (docker-py here).
        client = husk_daemon.client()
        try:
            container = client.containers.get("confined")
            code, output = container.exec_run(
                [
                    "sh",
                    "-c",
                    "ulimit -n; id -G; grep NoNewPrivs /proc/self/status; "
                    "echo adj=$(cat /proc/self/oom_score_adj); touch /x",
                ]
            )
        finally:
            client.close()
        text = output.decode()
        assert code != 0 and "Read-only file system" in text, text
        assert text.startswith("512\n") and "4321" in text and "NoNewPrivs:\t1" in text, text
        assert "adj=-900\n" in text, text
    finally:
        docker("rm", "-f", "confined", check=False)


@pytest.mark.timeout(600)
def test_refusals_and_the_husk_cli(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    import docker as docker_py

    cpus = husk_daemon.docker("run", "--rm", "--cpus", "64", daemon_busybox, "true", check=False)
    assert cpus.returncode == 125
    assert b"range of CPUs is from 0.01 to" in cpus.stderr, cpus.stderr
    client = husk_daemon.client()
    try:
        for kwargs, words in (
            ({"sysctls": {"kernel.panic": "1"}}, "sysctl 'kernel.panic=1' is not allowed"),
            ({"oom_kill_disable": True}, "OomKillDisable"),
            ({"oom_score_adj": -1001}, "range for oom score adj is [-1000, 1000]"),
            ({"cpu_shares": 512}, "CpuShares"),
            ({"security_opt": ["seccomp=/profile.json"]}, "not supported"),
        ):
            with pytest.raises(docker_py.errors.APIError) as refused:
                client.containers.create(daemon_busybox, "true", **kwargs)
            assert refused.value.status_code == 400 and words in str(refused.value), kwargs
        # A group the image does not have fails the start, with runc's message.
        with pytest.raises(docker_py.errors.APIError) as missing:
            client.containers.run(daemon_busybox, "true", group_add=["nosuch"], remove=True)
        assert "Unable to find group nosuch" in str(missing.value)
    finally:
        client.close()

    husk = [sys.executable, "-m", "husk.cli.main"]
    done = subprocess.run(
        [
            *husk, "run", "--rm", "--cap-drop", "ALL", "--user", "1000", "--group-add", "wheel",
            "--ulimit", "nproc=64", "--read-only", "--add-host", "gw:host-gateway",
            "--pids-limit", "5", "-w", "/made/here", "--security-opt", "systempaths=unconfined",
            daemon_busybox, "sh", "-c",
            "grep CapBnd /proc/self/status; ulimit -u; id -G; grep gw /etc/hosts; pwd; "
            "grep -o ' /dev/shm .*size=[0-9]*k' /proc/mounts; "
            "echo masked=$(grep -c -e ' /proc/sys ' -e ' /proc/kcore ' /proc/mounts); "
            "touch /x 2>/dev/null || echo readonly; "
            # A shell that forks until the pids cgroup says no (it dies then), and a count
            # of what runs, with builtins only: no fork is left.
            "sh -c 'i=0; while [ $i -lt 20 ]; do sleep 30 & i=$((i+1)); done' 2>/dev/null; "
            "set -- /proc/[0-9]*; echo procs=$#",
        ],
        env=husk_daemon.env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[:2] == ["CapBnd:\t0000000000000000", "64"], done.stdout
    assert set(out[2].split()) == {"1000", "10"}, done.stdout
    assert "10.0.2.2\tgw" in out and "readonly" in out, done.stdout
    assert "/made/here" in out, done.stdout  # a workdir made before the root turned read-only
    assert any(line.endswith("size=65536k") for line in out), done.stdout  # Docker's 64m
    assert "masked=0" in out, done.stdout  # systempaths=unconfined
    procs = int(out[-1].removeprefix("procs="))
    assert 2 <= procs <= 5, f"the pids limit let {procs} processes run: {done.stdout}"
