"""Networks through the real daemon: the docker CLI (Docker 28), docker-py and husk's CLI.

Containers here are created, never started: no VM boots. The busybox image comes from a
local registry on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    RunningDaemon,
    daemon_busybox,
    husk_daemon,
    registry,
    registry_busybox,
)

pytestmark = [pytest.mark.registry]


def _inspect(daemon: RunningDaemon, *args: str) -> Any:
    return json.loads(daemon.docker("inspect", *args).stdout)[0]


def _fails(daemon: RunningDaemon, *args: str) -> str:
    result = daemon.docker(*args, check=False)
    assert result.returncode != 0, f"docker {' '.join(args)} succeeded: {result.stdout!r}"
    return result.stderr.decode()


def _names(daemon: RunningDaemon) -> list[str]:
    return daemon.docker("network", "ls", "--format", "{{.Name}}").stdout.decode().split()


def _cleanup(daemon: RunningDaemon, containers: list[str], networks: list[str]) -> None:
    daemon.docker("rm", "-f", *containers, check=False)
    for name in networks:
        daemon.docker("network", "rm", name, check=False)


@pytest.mark.timeout(600)
def test_docker_cli_networks_endpoints_and_refusals(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    d = husk_daemon
    containers = ["nc1", "nc2", "nc3", "nc4", "nc5", "nc6", "nc7"]
    networks = ["nweb", "nfixed", "nidle", "nbad"]
    since = str(int(time.time()) - 1)
    try:
        listed = d.docker("network", "ls", "--format", "{{.Name}} {{.Driver}} {{.Scope}}")
        rows = listed.stdout.decode().splitlines()
        assert {"bridge bridge local", "host host local", "none null local"} <= set(rows)

        web_id = d.docker("network", "create", "--label", "tier=front", "nweb").stdout.strip()
        assert len(web_id) == 64
        assert "already exists" in _fails(d, "network", "create", "nweb")
        d.docker(
            "network", "create", "--subnet", "10.77.0.0/24", "--gateway", "10.77.0.254", "nfixed"
        )
        before = _names(d)
        # Bad input: a clear error each, and no network made.
        assert "overlaps" in _fails(d, "network", "create", "--subnet", "10.77.0.128/25", "nbad")
        assert "10.0.2.0/24" in _fails(d, "network", "create", "--subnet", "10.0.2.0/24", "nbad")
        bad_cidr = _fails(d, "network", "create", "--subnet", "10.1.2.3/16", "nbad")
        assert "invalid subnet" in bad_cidr or "10.1.0.0/16" in bad_cidr
        # The docker CLI checks this one itself (husk's own CLI gets the daemon's word).
        assert "gateway 10.79.0.1" in _fails(
            d, "network", "create", "--subnet", "10.78.0.0/24", "--gateway", "10.79.0.1", "nbad"
        )
        assert "not supported" in _fails(d, "network", "create", "-d", "overlay", "nbad")
        assert _names(d) == before

        web = _inspect(d, "--type", "network", "nweb")
        assert web["Id"] == web_id.decode() and web["Driver"] == "bridge"
        assert web["IPAM"]["Config"] == [{"Subnet": "172.18.0.0/16", "Gateway": "172.18.0.1"}]
        assert web["Labels"] == {"tier": "front"} and web["Containers"] == {}

        d.docker(
            "create", "--name", "nc1", "--network", "nweb", "--network-alias", "api", daemon_busybox
        )
        d.docker(
            "create",
            "--name",
            "nc2",
            "--network",
            "nfixed",
            "--ip",
            "10.77.0.9",
            "--network",
            "nweb",
            daemon_busybox,
        )
        d.docker("create", "--name", "nc3", daemon_busybox)
        d.docker("create", "--name", "nc6", "--network", "none", daemon_busybox)

        nc1 = _inspect(d, "nc1")
        endpoint = nc1["NetworkSettings"]["Networks"]["nweb"]
        assert nc1["HostConfig"]["NetworkMode"] == "nweb"
        assert endpoint["IPAddress"] == "172.18.0.2" and endpoint["IPPrefixLen"] == 16
        assert endpoint["Gateway"] == "172.18.0.1"
        assert endpoint["MacAddress"] == "02:42:ac:12:00:02"
        assert endpoint["NetworkID"] == web_id.decode() and endpoint["Aliases"] == ["api"]
        assert endpoint["DNSNames"] == ["nc1", "api", nc1["Id"][:12]]
        assert nc1["NetworkSettings"]["IPAddress"] == ""  # not on the default bridge

        nc2 = _inspect(d, "nc2")["NetworkSettings"]["Networks"]
        assert nc2["nfixed"]["IPAddress"] == "10.77.0.9"
        assert nc2["nfixed"]["IPAMConfig"] == {"IPv4Address": "10.77.0.9"}
        assert nc2["nweb"]["IPAddress"] == "172.18.0.3"

        nc3 = _inspect(d, "nc3")
        assert list(nc3["NetworkSettings"]["Networks"]) == ["bridge"]
        assert nc3["NetworkSettings"]["IPAddress"].startswith("172.17.0.")
        assert nc3["NetworkSettings"]["Networks"]["bridge"]["DNSNames"] is None
        assert _inspect(d, "nc6")["NetworkSettings"]["Networks"] == {}

        # Refused creates leave no container behind.
        assert "alias api is already in use" in _fails(
            d,
            "create",
            "--name",
            "nc4",
            "--network",
            "nweb",
            "--network-alias",
            "api",
            daemon_busybox,
        )
        assert "network nghost not found" in _fails(
            d, "create", "--name", "nc4", "--network", "nghost", daemon_busybox
        )
        assert "not supported" in _fails(
            d, "create", "--name", "nc4", "--network", "host", daemon_busybox
        )
        assert "Address already in use" in _fails(
            d,
            "create",
            "--name",
            "nc4",
            "--network",
            "nfixed",
            "--ip",
            "10.77.0.9",
            daemon_busybox,
        )
        assert "user configured subnets" in _fails(
            d,
            "create",
            "--name",
            "nc4",
            "--network",
            "nweb",
            "--ip",
            "172.18.0.77",
            daemon_busybox,
        )
        listed_containers = d.docker("ps", "-a", "--format", "{{.Names}}").stdout.decode()
        assert "nc4" not in listed_containers.split()

        d.docker("network", "connect", "--alias", "db", "nweb", "nc3")
        nc3_web = _inspect(d, "nc3")["NetworkSettings"]["Networks"]["nweb"]
        assert nc3_web["IPAddress"] == "172.18.0.4" and nc3_web["Aliases"] == ["db"]
        members = _inspect(d, "--type", "network", "nweb")["Containers"]
        assert sorted(m["Name"] for m in members.values()) == ["nc1", "nc2", "nc3"]
        assert {m["IPv4Address"] for m in members.values()} == {
            "172.18.0.2/16",
            "172.18.0.3/16",
            "172.18.0.4/16",
        }
        assert "already exists in network nweb" in _fails(d, "network", "connect", "nweb", "nc3")
        assert "private (none) mode" in _fails(d, "network", "connect", "nweb", "nc6")

        refused = _fails(d, "network", "rm", "nweb")
        assert "has active endpoints" in refused and "nc1" in refused
        d.docker("network", "disconnect", "nweb", "nc3")
        assert "nweb" not in _inspect(d, "nc3")["NetworkSettings"]["Networks"]
        assert "is not connected" in _fails(d, "network", "disconnect", "nweb", "nc3")

        # Removing a container frees its address for the next member.
        d.docker("rm", "nc1")
        d.docker("create", "--name", "nc5", "--network", "nweb", daemon_busybox)
        assert _inspect(d, "nc5")["NetworkSettings"]["Networks"]["nweb"]["IPAddress"] == (
            "172.18.0.2"
        )

        d.docker("network", "create", "nidle")
        pruned = d.docker("network", "prune", "-f").stdout.decode()
        assert "nidle" in pruned and "nweb" not in pruned and "bridge" not in pruned
        assert "pre-defined" in _fails(d, "network", "rm", "bridge")

        filtered = d.docker(
            "network", "ls", "-q", "--no-trunc", "--filter", "label=tier=front"
        ).stdout.split()
        assert filtered == [web_id]
        custom = (
            d.docker("network", "ls", "--filter", "type=custom", "--format", "{{.Name}}")
            .stdout.decode()
            .split()
        )
        assert "nweb" in custom and "bridge" not in custom

        d.docker("rm", "nc2", "nc5")
        d.docker("network", "rm", "nweb", "nfixed")
        until = str(int(time.time()) + 1)
        events = (
            d.docker(
                "events",
                "--since",
                since,
                "--until",
                until,
                "--filter",
                "type=network",
                "--format",
                "{{.Action}} {{.Actor.Attributes.name}}",
            )
            .stdout.decode()
            .splitlines()
        )
        for wanted in (
            "create nweb",
            "connect nweb",
            "disconnect nweb",
            "destroy nweb",
            "destroy nidle",
        ):
            assert wanted in events, events
    finally:
        _cleanup(d, containers, networks)


def _husk(daemon: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from husk.cli.main import main; main()", *args],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(600)
def test_husk_cli_network_commands(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    d = husk_daemon
    try:
        created = _husk(d, "network", "create", "--subnet", "10.88.0.0/24", "-l", "k=v", "hnet")
        assert created.returncode == 0, created.stderr
        assert len(created.stdout.strip()) == 64
        again = _husk(d, "network", "create", "hnet")
        assert again.returncode == 1 and again.stderr.count("\n") == 1
        assert "already exists" in again.stderr
        usage = _husk(d, "network", "create")
        assert usage.returncode == 125
        outside = _husk(
            d, "network", "create", "--subnet", "10.89.0.0/24", "--gateway", "10.90.0.1", "hbad"
        )
        assert outside.returncode == 1 and "not in subnet 10.89.0.0/24" in outside.stderr

        listed = _husk(d, "network", "ls")
        assert listed.returncode == 0
        header, *rows = listed.stdout.splitlines()
        assert header.split() == ["NETWORK", "ID", "NAME", "DRIVER", "SCOPE"]
        assert any(row.split()[1:] == ["hnet", "bridge", "local"] for row in rows)
        quiet = _husk(d, "network", "ls", "-q", "--filter", "name=hnet")
        assert quiet.stdout.split() == [created.stdout.strip()[:12]]

        run = _husk(
            d,
            "create",
            "--name",
            "hc1",
            "--network",
            "hnet",
            "--ip",
            "10.88.0.50",
            "--network-alias",
            "svc",
            daemon_busybox,
        )
        assert run.returncode == 0, run.stderr
        inspected = _husk(d, "network", "inspect", "hnet")
        network = json.loads(inspected.stdout)[0]
        assert [c["IPv4Address"] for c in network["Containers"].values()] == ["10.88.0.50/24"]
        assert network["Labels"] == {"k": "v"}
        templated = _husk(d, "network", "inspect", "-f", "{{.IPAM.Config}}", "hnet")
        assert "10.88.0.0/24" in templated.stdout

        connected = _husk(d, "network", "connect", "--alias", "x", "bridge", "hc1")
        assert connected.returncode == 1 and "network-scoped alias" in connected.stderr
        assert _husk(d, "network", "connect", "bridge", "hc1").returncode == 0
        networks = _inspect(d, "hc1")["NetworkSettings"]["Networks"]
        assert sorted(networks) == ["bridge", "hnet"]
        assert _husk(d, "network", "disconnect", "bridge", "hc1").returncode == 0

        removed = _husk(d, "network", "rm", "hnet")
        assert removed.returncode == 1 and "active endpoints" in removed.stderr
        missing = _husk(d, "network", "rm", "nope")
        assert missing.returncode == 1 and "not found" in missing.stderr
        assert _husk(d, "rm", "hc1").returncode == 0
        gone = _husk(d, "network", "rm", "hnet")
        assert gone.returncode == 0 and gone.stdout.strip() == "hnet"
    finally:
        _cleanup(d, ["hc1"], ["hnet"])


@pytest.mark.timeout(600)
def test_docker_py_networking_config_and_bad_bodies(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    client = husk_daemon.client()
    api = client.api
    try:
        net = api.create_network(
            "pynet",
            driver="bridge",
            internal=True,
            options={"com.docker.network.driver.mtu": "1400"},
        )
        assert api.inspect_network(net["Id"])["Internal"] is True
        config = api.create_networking_config(
            {"pynet": api.create_endpoint_config(aliases=["web", "www"])}
        )
        created = api.create_container(
            daemon_busybox,
            name="pyc1",
            networking_config=config,
            host_config=api.create_host_config(network_mode="pynet"),
        )
        endpoint = api.inspect_container(created["Id"])["NetworkSettings"]["Networks"]["pynet"]
        assert endpoint["Aliases"] == ["web", "www"]
        assert endpoint["IPAddress"] == api.inspect_network("pynet")["IPAM"]["Config"][0][
            "Subnet"
        ].replace("0/16", "2")
        import docker.errors

        with pytest.raises(docker.errors.APIError, match="not supported"):
            api.create_network("pynet6", enable_ipv6=True)
        with pytest.raises(docker.errors.NotFound):
            api.inspect_network("no-such-network")
        with pytest.raises(docker.errors.APIError, match="not supported"):
            api.create_container(
                daemon_busybox,
                name="pyc2",
                host_config=api.create_host_config(network_mode="container:pyc1"),
            )
        dangling = api.networks(filters={"dangling": True})
        assert "pynet" not in [n["Name"] for n in dangling]
        assert api.prune_networks()["NetworksDeleted"] is None
        api.remove_container("pyc1")
        assert [n["Name"] for n in api.networks(filters={"dangling": True})] == ["pynet"]
        api.remove_network("pynet")
    finally:
        for name in ("pyc1", "pyc2"):
            with contextlib.suppress(Exception):
                api.remove_container(name, force=True)
        with contextlib.suppress(Exception):
            api.remove_network("pynet")
        client.close()
