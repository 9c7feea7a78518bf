"""The Docker API layer without VMs: framing, create translation, shapes, errors, routing.

The HTTP tests serve the real application (real Runtime, real image store in a
temporary data directory) through aiohttp's test server; nothing here boots a VM.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from husk.agent.client import ProcessSpec
from husk.daemon.docker import build_app, shapes
from husk.daemon.docker.container_io import go_file_mode, path_stat_header
from husk.daemon.docker.create_config import exec_argv, spec_from_create
from husk.daemon.docker.errors import docker_errors
from husk.daemon.docker.params import (
    nanos_to_iso,
    parse_filters,
    parse_timestamp,
    unix_to_iso,
)
from husk.daemon.docker.streams import (
    HEADER,
    MAX_FRAME,
    FrameDecoder,
    HijackedConnection,
    HijackedResponse,
    frame,
)
from husk.daemon.server import parse_tcp_address
from husk.errors import InvalidArgument, NotSupported
from husk.network.model import Endpoint
from husk.runtime.model import ContainerRecord, ContainerState
from husk.spec import ContainerSpec, PortBinding
from testimages import BUSYBOX_NAME, install_busybox_image

# ------------------------------------------------------------------ framing


def test_frames_carry_stream_and_big_endian_length() -> None:
    assert frame("stdout", b"hi") == b"\x01\x00\x00\x00\x00\x00\x00\x02hi"
    assert frame("stderr", b"x" * 300)[:8] == b"\x02\x00\x00\x00\x00\x00\x01\x2c"
    assert frame(0, b"in")[:1] == b"\x00"
    assert frame("stdout", b"") == b""


def test_large_chunks_are_split_and_decoded_back_across_partial_reads() -> None:
    data = bytes(range(256)) * ((MAX_FRAME * 2 + 1000) // 256)
    encoded = frame("stderr", data) + frame("stdout", b"tail")
    decoder = FrameDecoder()
    frames: list[tuple[int, bytes]] = []
    for start in range(0, len(encoded), 7777):  # odd-sized reads split headers too
        frames += decoder.feed(encoded[start : start + 7777])
    assert decoder.pending == 0
    assert [s for s, _ in frames] == [2, 2, 2, 1]
    assert all(len(d) <= MAX_FRAME for _, d in frames)
    assert b"".join(d for s, d in frames if s == 2) == data
    assert frames[-1] == (1, b"tail")


# ------------------------------------------------------- create translation


def test_docker_cli_create_body_becomes_a_spec(tmp_path: Path) -> None:
    body = {
        "Image": "busybox",
        "Cmd": ["sh", "-c", "echo hi"],
        "Entrypoint": [""],
        "Env": ["A=1"],
        "WorkingDir": "/srv",
        "User": "1000:1000",
        "Hostname": "box",
        "Labels": {"team": "husk"},
        "ExposedPorts": {"53/udp": {}},
        "Tty": True,
        "OpenStdin": True,
        "StopSignal": "SIGUSR1",
        "StopTimeout": 3,
        "Healthcheck": {
            "Test": ["CMD-SHELL", "true"],
            "Interval": 2_000_000_000,
            "Timeout": 1_000_000_000,
            "Retries": 5,
            "StartPeriod": 500_000_000,
        },
        "HostConfig": {
            "Binds": [f"{tmp_path}:/data:ro"],
            "Mounts": [
                {"Type": "bind", "Source": "/tmp", "Target": "/host-tmp", "ReadOnly": False},
                {"Type": "tmpfs", "Target": "/scratch", "TmpfsOptions": {"SizeBytes": 1048576}},
            ],
            "Tmpfs": {"/run": "rw,size=64m,mode=1777"},
            "PortBindings": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]},
            "PublishAllPorts": True,
            "Memory": 268435456,
            "NanoCpus": 1_500_000_000,
            "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 3},
            "NetworkMode": "default",
            "Privileged": False,
            "CapAdd": None,
            "IpcMode": "",
        },
    }
    spec = spec_from_create(body, "web")
    assert spec.image == "busybox" and spec.name == "web"
    assert spec.entrypoint == [] and spec.cmd == ["sh", "-c", "echo hi"]
    assert spec.env == ["A=1"] and spec.workdir == "/srv" and spec.user == "1000:1000"
    assert spec.hostname == "box" and spec.labels == {"team": "husk"}
    assert spec.tty and spec.open_stdin
    assert spec.stop_signal == "SIGUSR1" and spec.stop_timeout == 3
    assert spec.healthcheck is not None
    assert (spec.healthcheck.interval, spec.healthcheck.timeout) == (2.0, 1.0)
    assert (spec.healthcheck.retries, spec.healthcheck.start_period) == (5, 0.5)
    assert [(b.source, b.target, b.readonly) for b in spec.binds] == [
        (str(tmp_path), "/data", True),
        ("/tmp", "/host-tmp", False),
    ]
    assert [(t.target, t.size, t.mode) for t in spec.tmpfs] == [
        ("/run", 64 * 1024 * 1024, 0o1777),
        ("/scratch", 1048576, None),
    ]
    assert spec.ports == [PortBinding(80, "tcp", "127.0.0.1", 8080)]
    assert spec.publish_all
    assert set(spec.exposed_ports) == {"53/udp", "80/tcp"}
    assert spec.memory == 268435456 and spec.cpus == 1.5
    assert (spec.restart.name, spec.restart.max_retries) == ("on-failure", 3)
    assert not spec.auto_remove
    assert not spec.privileged and not spec.init


def test_privileged_and_init_reach_the_spec_and_back() -> None:
    body = {"Image": "b", "HostConfig": {"Privileged": True, "Init": True}}
    spec = spec_from_create(body, None)
    assert spec.privileged and spec.init
    assert ContainerSpec.from_json(spec.to_json()) == spec
    assert ProcessSpec(["true"], privileged=True, init=True).body()["privileged"] is True
    assert "privileged" not in ProcessSpec(["true"]).body()


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        ({}, InvalidArgument, "Image is required"),
        ({"Image": "b", "HostConfig": {"Binds": ["da/ta:/data"]}}, InvalidArgument, "invalid"),
        ({"Image": "b", "HostConfig": {"CapAdd": ["NOPE"]}}, InvalidArgument, "CAP_NOPE"),
        ({"Image": "b", "HostConfig": {"CpuShares": 512}}, InvalidArgument, "CpuShares"),
        ({"Image": "b", "HostConfig": {"NetworkMode": "host"}}, NotSupported, "network mode"),
        (
            {"Image": "b", "HostConfig": {"Mounts": [{"Type": "npipe", "Target": "/v"}]}},
            NotSupported,
            "npipe",
        ),
        ({"Image": "b", "ExposedPorts": {"http/tcp": {}}}, InvalidArgument, "invalid port"),
        ({"Image": "b", "ExposedPorts": {"80/sctp": {}}}, InvalidArgument, "tcp or udp"),
        ({"Image": "b", "StopSignal": "SIGNOPE"}, InvalidArgument, "invalid signal"),
        ({"Image": "b", "WorkingDir": "rel"}, InvalidArgument, "absolute path"),
        (
            {"Image": "b", "HostConfig": {"AutoRemove": True, "RestartPolicy": {"Name": "always"}}},
            InvalidArgument,
            "AutoRemove",
        ),
        (
            {"Image": "b", "HostConfig": {"RestartPolicy": {"Name": "sometimes"}}},
            InvalidArgument,
            "restart",
        ),
        ({"Image": "b", "Healthcheck": {"Test": ["SHELL", "x"]}}, InvalidArgument, "Healthcheck"),
        (
            {"Image": "b", "Healthcheck": {"Test": ["CMD", "x"], "Interval": 999_999}},
            InvalidArgument,
            "Healthcheck.Interval: cannot be less than 1ms",
        ),
        (
            {"Image": "b", "Healthcheck": {"Test": ["CMD", "x"], "Timeout": 1}},
            InvalidArgument,
            "Healthcheck.Timeout: cannot be less than 1ms",
        ),
        ({"Image": "b", "Cmd": [1, 2]}, InvalidArgument, "Cmd"),
        ({"Image": "b", "Volumes": {"data": {}}}, InvalidArgument, "absolute path"),
    ],
)
def test_create_body_errors_name_the_problem(
    body: dict[str, Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        spec_from_create(body, None)


def test_exec_command_forms() -> None:
    assert exec_argv(["ls", "-l"]) == ["ls", "-l"]
    assert exec_argv("sh -c 'echo a b'") == ["sh", "-c", "echo a b"]
    assert exec_argv(None) == []


# ------------------------------------------------------------------- shapes


def _record(**state: Any) -> ContainerRecord:
    spec = ContainerSpec(
        image="127.0.0.1:5000/husk/busybox",
        name="web",
        cmd=["httpd", "-f"],
        labels={"a": "b"},
        ports=[PortBinding(80, "tcp", "", 0)],
        exposed_ports=["80/tcp", "53/udp"],
    )
    return ContainerRecord(
        id="ab" * 32,
        name="web",
        spec=spec,
        image_id="sha256:" + "cd" * 32,
        image_ref=spec.image,
        created="2024-01-02T03:04:05.123456789Z",
        argv=["/bin/entry", "httpd", "-f"],
        env=["PATH=/bin"],
        workdir="/",
        user="",
        stop_signal="SIGTERM",
        stop_timeout=10,
        ports={"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}]},
        state=ContainerState(**state),
        ip_address="10.0.2.15",
        mac_address="52:54:00:12:34:56",
        networks={
            "bridge": Endpoint(
                network_id="f" * 64,
                network_name="bridge",
                slot=1,
                address="172.17.0.2",
                prefix_len=16,
                gateway="172.17.0.1",
                mac="02:42:ac:11:00:02",
            )
        },
    )


def test_human_durations_follow_docker() -> None:
    cases = {0.2: "Less than a second", 1: "1 second", 59: "59 seconds", 61: "About a minute"}
    cases |= {600: "10 minutes", 3600: "About an hour", 7200: "2 hours", 3 * 86400: "3 days"}
    for seconds, text in cases.items():
        assert shapes.human_duration(seconds) == text


def test_status_texts() -> None:
    now = 1_700_000_100.0
    started = unix_to_iso(1_700_000_000.0)
    running = ContainerState(status="running", started_at=started)
    assert shapes.status_text(running, now) == "Up About a minute"
    running.health = "healthy"
    assert shapes.status_text(running, now) == "Up About a minute (healthy)"
    paused = ContainerState(status="paused", started_at=started)
    assert shapes.status_text(paused, now) == "Up About a minute (Paused)"
    exited = ContainerState(status="exited", exit_code=3, finished_at=unix_to_iso(now - 5))
    assert shapes.status_text(exited, now) == "Exited (3) 5 seconds ago"
    assert shapes.status_text(ContainerState(), now) == "Created"


def test_container_summary_and_inspect_shapes() -> None:
    record = _record(status="running", pid=4242, started_at="2024-01-02T03:04:06.000000000Z")
    summary = shapes.container_summary(record)
    assert summary["Names"] == ["/web"]
    assert summary["Created"] == 1704164645 and isinstance(summary["Created"], int)
    assert summary["Ports"] == [
        {"PrivatePort": 80, "Type": "tcp", "IP": "0.0.0.0", "PublicPort": 32768}
    ]
    assert summary["Command"] == "/bin/entry httpd -f"
    assert summary["State"] == "running" and summary["Status"].startswith("Up ")
    image_config = {"config": {"Entrypoint": ["/bin/entry"], "Cmd": ["sh"]}}
    data = shapes.container_inspect(record, ["e" * 64], image_config)
    assert data["Name"] == "/web" and data["Id"] == record.id
    assert data["Path"] == "/bin/entry" and data["Args"] == ["httpd", "-f"]
    assert data["Config"]["Entrypoint"] == ["/bin/entry"]
    assert data["Config"]["Cmd"] == ["httpd", "-f"]
    assert data["State"]["Running"] and data["State"]["Pid"] == 4242
    assert data["NetworkSettings"]["Ports"] == {
        "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}],
        "53/udp": None,
    }
    assert data["NetworkSettings"]["Networks"]["bridge"]["IPAddress"] == "172.17.0.2"
    assert data["NetworkSettings"]["IPAddress"] == "172.17.0.2"
    assert data["NetworkSettings"]["MacAddress"] == "02:42:ac:11:00:02"
    assert data["NetworkSettings"]["Networks"]["bridge"]["DNSNames"] is None
    assert data["HostConfig"]["PortBindings"] == {"80/tcp": [{"HostIp": "", "HostPort": ""}]}
    assert data["HostConfig"]["LogConfig"]["Type"] == "json-file"
    assert data["ExecIDs"] == ["e" * 64]
    stopped = shapes.container_inspect(_record(status="exited", exit_code=1), None)
    assert stopped["State"]["Pid"] == 0 and stopped["ExecIDs"] is None
    # An endpoint's address is the container's from create to removal (kept while stopped).
    assert stopped["NetworkSettings"]["Networks"]["bridge"]["IPAddress"] == "172.17.0.2"


def test_stats_document_has_dockers_shape_and_cpu_deltas() -> None:
    record = _record(status="running")
    before = {"cpu_ns": 1_000, "system_cpu_ns": 10_000, "online_cpus": 1, "time_ns": 10**18}
    after = {
        "cpu_ns": 6_000,
        "cpu_user_ns": 4_000,
        "cpu_system_ns": 2_000,
        "system_cpu_ns": 20_000,
        "online_cpus": 1,
        "memory_used": 50 << 20,
        "memory_total": 512 << 20,
        "memory_cache": 1 << 20,
        "net_rx_bytes": 10,
        "net_tx_bytes": 20,
        "block_read_bytes": 30,
        "block_write_bytes": 40,
        "pids": 3,
        "time_ns": 10**18 + 10**9,
    }
    document = shapes.stats_json(record, after, before)
    assert document["name"] == "/web" and document["id"] == record.id
    assert document["read"] == "2001-09-09T01:46:41.000000000Z"
    assert document["preread"] == "2001-09-09T01:46:40.000000000Z"
    usage = document["cpu_stats"]["cpu_usage"]
    assert (usage["total_usage"], usage["usage_in_usermode"], usage["usage_in_kernelmode"]) == (
        6000,
        4000,
        2000,
    )
    assert document["precpu_stats"]["cpu_usage"]["total_usage"] == 1000
    assert document["memory_stats"] == {
        "usage": 50 << 20,
        "limit": 512 << 20,
        "stats": {"cache": 1 << 20},
    }
    assert document["networks"]["eth0"]["rx_bytes"] == 10
    assert document["pids_stats"] == {"current": 3}
    ops = {e["op"]: e["value"] for e in document["blkio_stats"]["io_service_bytes_recursive"]}
    assert ops == {"read": 30, "write": 40}
    idle = shapes.stats_json(_record(status="exited"), None, None)
    assert idle["read"] == "0001-01-01T00:00:00Z" and idle["memory_stats"] == {}


def test_names_as_docker_shows_them() -> None:
    assert shapes.familiar("docker.io/library/busybox:latest") == "busybox:latest"
    assert shapes.familiar("docker.io/me/app:1") == "me/app:1"
    assert shapes.familiar("127.0.0.1:5000/husk/busybox:latest") == (
        "127.0.0.1:5000/husk/busybox:latest"
    )


def test_path_stats_use_go_file_modes() -> None:
    assert go_file_mode(stat.S_IFREG | 0o644) == 0o644
    assert go_file_mode(stat.S_IFDIR | 0o1777) == (1 << 31) | (1 << 20) | 0o777
    assert go_file_mode(stat.S_IFLNK | 0o777) == (1 << 27) | 0o777
    assert go_file_mode(stat.S_IFREG | stat.S_ISUID | 0o755) == (1 << 23) | 0o755
    header = path_stat_header(
        {"name": "f", "size": 3, "mode": stat.S_IFREG | 0o600, "mtime": 1.5, "linkTarget": ""}
    )
    decoded = json.loads(base64.b64decode(header))
    assert decoded == {
        "name": "f",
        "size": 3,
        "mode": 0o600,
        "mtime": "1970-01-01T00:00:01.500000000Z",
        "linkTarget": "",
    }


# ------------------------------------------------------------------- params


def test_filters_and_timestamps() -> None:
    assert parse_filters('{"label":["a=b"],"status":{"running":true,"exited":false}}') == {
        "label": ["a=b"],
        "status": ["running"],
    }
    with pytest.raises(InvalidArgument, match="not JSON"):
        parse_filters("{nope")
    assert parse_timestamp("1700000000.25", "since") == 1700000000.25
    assert parse_timestamp("2023-11-14T22:13:20.5Z", "since") == 1700000000.5
    assert parse_timestamp("2023-11-14T23:13:20+01:00", "since") == 1700000000.0
    with pytest.raises(InvalidArgument, match="since"):
        parse_timestamp("yesterday", "since")
    assert unix_to_iso(1700000000.5) == "2023-11-14T22:13:20.500000000Z"
    assert nanos_to_iso(1700000000_000000007) == "2023-11-14T22:13:20.000000007Z"


def test_tcp_listener_must_be_loopback() -> None:
    assert parse_tcp_address("127.0.0.1:2375") == ("127.0.0.1", 2375)
    assert parse_tcp_address("[::1]:2375") == ("::1", 2375)
    with pytest.raises(InvalidArgument, match="loopback"):
        parse_tcp_address("0.0.0.0:2375")
    with pytest.raises(InvalidArgument, match="invalid --tcp"):
        parse_tcp_address("127.0.0.1:http")


# --------------------------------------------------------------- HTTP layer


@pytest.fixture
def api_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    return tmp_path


@asynccontextmanager
async def api_client(
    extra: Callable[[web.Application], None] | None = None,
) -> AsyncIterator[tuple[TestClient[Any, Any], Any]]:
    from husk.runtime.runtime import Runtime

    runtime = Runtime()
    app = build_app(runtime)
    if extra is not None:
        extra(app)
    async with TestClient(TestServer(app)) as client:
        yield client, runtime


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_ping_version_and_version_prefixes(api_dirs: Path) -> None:
    async def body() -> None:
        async with api_client() as (client, _):
            ping = await client.get("/_ping")
            assert ping.status == 200 and await ping.text() == "OK"
            assert ping.headers["API-Version"] == "1.50"
            assert ping.headers["OSType"] == "linux"
            assert ping.headers["Docker-Experimental"] == "false"
            head = await client.head("/v1.41/_ping")
            assert head.status == 200 and await head.read() == b""
            version = await (await client.get("/v1.43/version")).json()
            assert (version["ApiVersion"], version["MinAPIVersion"]) == ("1.50", "1.41")
            assert (version["Os"], version["Arch"]) == ("linux", "amd64")
            assert version["Components"][0]["Name"] == "Engine"
            too_new = await client.get("/v1.51/version")
            assert too_new.status == 400
            assert "too new" in (await too_new.json())["message"]
            too_old = await client.get("/v1.40/info")
            assert too_old.status == 400
            assert "too old" in (await too_old.json())["message"]
            missing = await client.get("/v1.45/no/such/endpoint")
            assert missing.status == 404
            assert missing.headers["Content-Type"] == "application/json"
            assert await missing.json() == {"message": "page not found"}

    run(body)


def test_errors_follow_dockers_contract(api_dirs: Path) -> None:
    async def explode(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("secret internals")

    def extra(app: web.Application) -> None:
        app.router.add_get("/test/explode", explode)

    async def body() -> None:
        async with api_client(extra) as (client, _):
            response = await client.get("/containers/nope/json")
            assert response.status == 404
            assert response.headers["Content-Type"] == "application/json"
            assert await response.json() == {"message": "No such container: nope"}
            response = await client.post(
                "/v1.45/containers/create", json={"Image": "husk.local/none:1"}
            )
            assert response.status == 404
            assert (await response.json())["message"] == "No such image: husk.local/none:1"
            response = await client.post("/containers/create", data=b"{not json")
            assert response.status == 400 and "invalid JSON" in (await response.json())["message"]
            response = await client.get(
                "/containers/json?filters=%7B%22bogus%22%3A%5B%221%22%5D%7D"
            )
            assert response.status == 400
            assert (await response.json())["message"] == "invalid filter 'bogus'"
            response = await client.post(
                "/volumes/create", json={"Name": "vt", "DriverOpts": {"type": "tmpfs"}}
            )
            assert response.status == 501 and "not supported" in (await response.json())["message"]
            response = await client.get("/test/explode")
            assert response.status == 500
            text = await response.text()
            assert "RuntimeError" in text and "Traceback" not in text

    run(body)


def test_images_endpoints_on_a_real_store(api_dirs: Path) -> None:
    async def body() -> None:
        async with api_client() as (client, runtime):
            record = install_busybox_image(runtime.images, workdir=api_dirs)
            listing = await (await client.get("/images/json")).json()
            assert [i["RepoTags"] for i in listing] == [["husk.local/busybox:latest"]]
            assert listing[0]["Id"] == record.id and isinstance(listing[0]["Created"], int)
            assert listing[0]["Containers"] == 0 and listing[0]["Size"] == record.size
            by_prefix = await client.get(f"/images/{record.id[7:19]}/json")
            assert by_prefix.status == 200
            inspect = await (await client.get(f"/v1.45/images/{BUSYBOX_NAME}/json")).json()
            assert inspect["Id"] == record.id and inspect["Os"] == "linux"
            history = await (await client.get(f"/images/{BUSYBOX_NAME}/history")).json()
            assert history[0]["Id"] == record.id
            assert history[0]["Tags"] == ["husk.local/busybox:latest"]
            tagged = await client.post(f"/images/{BUSYBOX_NAME}/tag?repo=husk.local/other&tag=v1")
            assert tagged.status == 201
            filtered = await (
                await client.get('/images/json?filters={"reference":["husk.local/other"]}')
            ).json()
            assert filtered[0]["RepoTags"] == ["husk.local/other:v1"]
            removed = await (await client.delete("/images/husk.local/other:v1")).json()
            assert removed == [{"Untagged": "husk.local/other:v1"}]
            missing = await client.delete("/images/husk.local/other:v1")
            assert missing.status == 404
            search = await client.get("/images/search?term=x")
            assert search.status == 501
            networks = await (await client.get("/networks")).json()
            assert [n["Name"] for n in networks] == ["bridge", "host", "none"]
            assert networks[0]["IPAM"]["Config"] == [
                {"Subnet": "172.17.0.0/16", "Gateway": "172.17.0.1"}
            ]
            assert await (await client.get("/volumes")).json() == {
                "Volumes": [],
                "Warnings": None,
            }

    run(body)


def test_created_container_lifecycle_without_booting(api_dirs: Path) -> None:
    """create/list/inspect/rename/kill/remove need no VM; none is started here."""

    async def body() -> None:
        async with api_client() as (client, runtime):
            install_busybox_image(runtime.images, workdir=api_dirs)
            since = time.time() - 1
            config = {
                "Image": BUSYBOX_NAME,
                "Cmd": ["echo", "hi"],
                "Labels": {"suite": "api"},
                "HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": ""}]}},
            }
            created = await client.post("/containers/create?name=first", json=config)
            assert created.status == 201
            answer = await created.json()
            container_id = answer["Id"]
            assert len(container_id) == 64 and answer["Warnings"] == []
            duplicate = await client.post("/containers/create?name=first", json=config)
            assert duplicate.status == 409
            running_only = await (await client.get("/containers/json")).json()
            assert running_only == []
            listed = await (
                await client.get('/containers/json?all=1&filters={"label":["suite=api"]}')
            ).json()
            assert [c["Names"] for c in listed] == [["/first"]]
            assert listed[0]["State"] == "created" and listed[0]["Status"] == "Created"
            inspect = await (await client.get(f"/containers/{container_id[:10]}/json")).json()
            assert inspect["Name"] == "/first" and inspect["State"]["Status"] == "created"
            assert inspect["Config"]["Cmd"] == ["echo", "hi"]
            assert inspect["Config"]["ExposedPorts"] == {"80/tcp": {}}
            killed = await client.post(f"/containers/{container_id}/kill")
            assert killed.status == 409
            stopped = await client.post("/containers/first/stop")
            assert stopped.status == 304 and await stopped.read() == b""
            renamed = await client.post("/containers/first/rename?name=second")
            assert renamed.status == 204
            assert (await (await client.get("/containers/second/json")).json())["Name"] == (
                "/second"
            )
            removed = await client.delete("/containers/second")
            assert removed.status == 204
            again = await client.delete(f"/containers/{container_id}")
            assert again.status == 404
            events = await client.get(
                f'/events?since={since}&until={time.time() + 0.5}&filters={{"type":["container"]}}'
            )
            actions = [json.loads(line)["Action"] for line in (await events.text()).splitlines()]
            assert actions == ["create", "rename", "destroy"]

    run(body)


# ------------------------------------------------------------------- hijack


def test_hijacked_connection_upgrades_streams_and_survives_half_close(tmp_path: Path) -> None:
    """A raw client: Upgrade request, 101, framed echo, half-close, then the tail output."""

    async def echo(request: web.Request) -> web.StreamResponse:
        connection = await HijackedConnection.take_over(request)
        received = b""
        async for chunk in connection.input_chunks():
            received += chunk
            await connection.send(frame("stdout", chunk.upper()))
        await connection.send(frame("stderr", b"eof after %d bytes" % len(received)))
        await connection.close()
        return HijackedResponse()

    async def body() -> None:
        app = web.Application(middlewares=[docker_errors])
        app.router.add_post("/hijack", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        path = str(tmp_path / "h.sock")
        await web.UnixSite(runner, path).start()
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(
                b"POST /hijack HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                b"Upgrade: tcp\r\nContent-Length: 0\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 101 UPGRADED\r\n")
            assert b"Upgrade: tcp" in head
            writer.write(b"hello")
            await writer.drain()
            header = await asyncio.wait_for(reader.readexactly(8), 10)
            stream, size = HEADER.unpack(header)
            assert (stream, await reader.readexactly(size)) == (1, b"HELLO")
            writer.write_eof()  # stdin is done; the output must still arrive
            stream, size = struct.unpack(
                ">BxxxL", await asyncio.wait_for(reader.readexactly(8), 10)
            )
            assert (stream, await reader.readexactly(size)) == (2, b"eof after 5 bytes")
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
        finally:
            await runner.cleanup()

    run(body)


def test_old_clients_get_200_and_a_raw_stream(tmp_path: Path) -> None:
    async def greet(request: web.Request) -> web.StreamResponse:
        connection = await HijackedConnection.take_over(request)
        await connection.send(b"raw bytes")
        await connection.close()
        return HijackedResponse()

    async def body() -> None:
        app = web.Application()
        app.router.add_post("/hijack", greet)
        runner = web.AppRunner(app)
        await runner.setup()
        path = str(tmp_path / "o.sock")
        await web.UnixSite(runner, path).start()
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                await asyncio.get_running_loop().run_in_executor(None, sock.connect, path)
                sock.sendall(b"POST /hijack HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                data = b""
                while chunk := await asyncio.get_running_loop().run_in_executor(
                    None, sock.recv, 4096
                ):
                    data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert b"application/vnd.docker.raw-stream" in head
            assert rest == b"raw bytes"
        finally:
            await runner.cleanup()

    assert os.path.isdir(tmp_path)
    run(body)
