"""Issue 18, item 1: every accepted ``run`` option has its effect (or is refused), as in Docker.

Each scenario runs one container per engine and observes the exit code, what the
workload sees (/proc/self/status, ulimit, /etc/hosts …) and the inspect fields the
option sets; on husk the observation must equal dockerd's, and on both it must be
what the option means (so the oracle itself is checked too).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from engines import Engine

pytestmark = [pytest.mark.vm, pytest.mark.registry]

Check = Callable[[str, Callable[[Engine], Any]], Any]


def test_read_only_root_with_tmpfs(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept(
            "--read-only",
            "--tmpfs",
            "/tmp",
            e.image,
            "sh",
            "-c",
            "touch /x 2>&1; echo root=$?; touch /tmp/y && echo tmp=$?",
        )
        return ran.code, ran.out, ran.host("ReadonlyRootfs"), ran.host("Tmpfs")

    code, out, readonly, tmpfs = same_as_docker("read-only", scenario)
    assert code == 0
    assert out == "touch: /x: Read-only file system\nroot=1\ntmp=0\n"
    assert readonly is True
    assert tmpfs == {"/tmp": ""}


def test_default_capabilities_and_process(engine: Engine, same_as_docker: Check) -> None:
    """No option: Docker's default capability set, 64 MB /dev/shm, the workload is PID 1."""

    def scenario(e: Engine) -> tuple[int, str]:
        result = e.run(
            e.image,
            "sh",
            "-c",
            "df -k /dev/shm | tail -1 | awk '{print $2}';"
            ' grep -E "^(CapPrm|CapEff|CapBnd|NoNewPrivs):" /proc/self/status;'
            " exec ps -o pid,args",
        )
        return result.returncode, result.stdout.decode()

    code, out = same_as_docker("defaults", scenario)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "65536"
    assert lines[1:5] == [
        "CapPrm:\t00000000a80425fb",
        "CapEff:\t00000000a80425fb",
        "CapBnd:\t00000000a80425fb",
        "NoNewPrivs:\t0",
    ]
    # ps sees one process, itself as PID 1: no agent, no kernel threads.
    assert lines[5].split() == ["PID", "COMMAND"]
    assert len(lines) == 7 and lines[6].split()[0] == "1"


def test_cap_drop_all_cap_add(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept(
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_ADMIN",
            e.image,
            "grep",
            "-E",
            "^Cap(Inh|Prm|Eff|Bnd|Amb):",
            "/proc/self/status",
        )
        return ran.code, ran.out, ran.host("CapDrop"), ran.host("CapAdd")

    code, out, dropped, added = same_as_docker("cap-drop", scenario)
    assert code == 0
    assert out.split() == [
        "CapInh:",
        "0000000000000000",
        "CapPrm:",
        "0000000000001000",
        "CapEff:",
        "0000000000001000",
        "CapBnd:",
        "0000000000001000",
        "CapAmb:",
        "0000000000000000",
    ]
    assert dropped == ["ALL"]
    assert added == ["CAP_NET_ADMIN"]  # the docker CLI 28 sends the canonical name


def test_ulimit_nofile(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept(
            "--ulimit", "nofile=1234:2345", e.image, "sh", "-c", "ulimit -n; ulimit -Hn"
        )
        return ran.code, ran.out, ran.host("Ulimits")

    code, out, ulimits = same_as_docker("ulimit", scenario)
    assert (code, out) == (0, "1234\n2345\n")
    assert ulimits == [{"Name": "nofile", "Hard": 2345, "Soft": 1234}]


def test_sysctl_namespaced(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept(
            "--sysctl",
            "kernel.msgmax=12345",
            "--sysctl",
            "net.ipv4.ip_forward=1",
            e.image,
            "cat",
            "/proc/sys/kernel/msgmax",
            "/proc/sys/net/ipv4/ip_forward",
        )
        return ran.code, ran.out, ran.host("Sysctls")

    code, out, sysctls = same_as_docker("sysctl", scenario)
    assert (code, out) == (0, "12345\n1\n")
    assert sysctls == {"kernel.msgmax": "12345", "net.ipv4.ip_forward": "1"}


def test_shm_size(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept(
            "--shm-size", "32m", e.image, "sh", "-c", "df -k /dev/shm | tail -1 | awk '{print $2}'"
        )
        return ran.code, ran.out, ran.host("ShmSize")

    assert same_as_docker("shm-size", scenario) == (0, "32768\n", 32 * 1024 * 1024)


def test_group_add(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept("-u", "husk", "--group-add", "wheel", "--group-add", "4242", e.image, "id")
        return ran.code, ran.out, ran.host("GroupAdd")

    code, out, groups = same_as_docker("group-add", scenario)
    assert (code, out) == (0, "uid=1000(husk) gid=1000(husk) groups=10(wheel),1000(husk),4242\n")
    assert groups == ["wheel", "4242"]


def test_no_new_privileges(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept(
            "--security-opt",
            "no-new-privileges",
            e.image,
            "grep",
            "^NoNewPrivs:",
            "/proc/self/status",
        )
        return ran.code, ran.out, ran.host("SecurityOpt")

    assert same_as_docker("no-new-privileges", scenario) == (
        0,
        "NoNewPrivs:\t1\n",
        ["no-new-privileges"],
    )


def test_pids_limit(engine: Engine, same_as_docker: Check) -> None:
    """Four processes at most: the shell and three ``sleep``s, the fourth fork fails."""

    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept(
            "--pids-limit",
            "4",
            e.image,
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6; do sleep 3 & done; echo all-forked",
        )
        return ran.code, ran.out, "can't fork" in ran.err, ran.host("PidsLimit")

    assert same_as_docker("pids-limit", scenario) == (2, "", True, 4)


def test_cpus_beyond_the_host_refused(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        before = e.container_ids()
        result = e.run("--cpus", "64", e.image, "true")
        message = result.stderr.decode()
        cpus = len(os.sched_getaffinity(0))
        return (
            result.returncode,
            # dockerd 20.10 capitalises "Range"; later engines (and husk) do not.
            f"range of cpus is from 0.01 to {cpus}.00" in message.lower(),
            e.container_ids() == before,
        )

    assert same_as_docker("cpus-64", scenario) == (125, True, True)


def test_add_host(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept(
            "--add-host",
            "foo.test:10.1.2.3",
            "--add-host",
            "bar.test:::1",
            e.image,
            "grep",
            "-E",
            r"\s(foo|bar)\.test$",
            "/etc/hosts",
        )
        return ran.code, ran.out, ran.host("ExtraHosts")

    assert same_as_docker("add-host", scenario) == (
        0,
        "10.1.2.3\tfoo.test\n::1\tbar.test\n",
        ["foo.test:10.1.2.3", "bar.test:::1"],
    )


def test_dns_options(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept(
            "--dns",
            "10.9.8.7",
            "--dns-search",
            "example.test",
            "--dns-option",
            "ndots:3",
            e.image,
            "cat",
            "/etc/resolv.conf",
        )
        return ran.code, ran.out, ran.host("Dns"), ran.host("DnsSearch"), ran.host("DnsOptions")

    assert same_as_docker("dns", scenario) == (
        0,
        "search example.test\nnameserver 10.9.8.7\noptions ndots:3\n",
        ["10.9.8.7"],
        ["example.test"],
        ["ndots:3"],
    )


def test_dockerpy_options_reach_the_workload(engine: Engine, same_as_docker: Check) -> None:
    """The same options through docker-py's create body (read_only, cap_drop, ulimits)."""

    def scenario(e: Engine) -> bytes:
        import docker

        client = e.client()
        try:
            output: bytes = client.containers.run(
                e.image,
                [
                    "sh",
                    "-c",
                    "touch /x 2>/dev/null; echo $?; ulimit -n; grep ^CapEff /proc/1/status",
                ],
                read_only=True,
                cap_drop=["ALL"],
                ulimits=[docker.types.Ulimit(name="nofile", soft=321, hard=321)],
                network_mode="none" if e.name == "docker" else None,
                remove=True,
            )
            return output
        finally:
            client.close()

    assert same_as_docker("dockerpy-options", scenario) == b"1\n321\nCapEff:\t0000000000000000\n"
