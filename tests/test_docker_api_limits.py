"""A local client cannot make the daemon read or store unbounded data.

Request bodies read whole (JSON) stop at ``MAX_JSON_BODY`` with a 413 and store
nothing; the fields a container or exec record keeps (name, labels, env, command …)
are bounded with a 400 naming the field. The HTTP tests serve the real application
(real Runtime and image store in a temporary directory) through aiohttp's test
server, and one test speaks raw HTTP to a real ``husk daemon``; no VM boots here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon_fixtures import short_root, start_daemon
from husk.daemon.docker import build_app
from husk.daemon.docker.create_config import spec_from_create
from husk.daemon.docker.limits import (
    MAX_ARG,
    MAX_JSON_BODY,
    MAX_LABELS_TOTAL,
    MAX_NAME,
    check_exec,
    check_spec,
)
from husk.errors import InvalidArgument
from testimages import BUSYBOX_NAME, install_busybox_image

MiB = 1024 * 1024


@pytest.fixture
def api_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    return tmp_path


@asynccontextmanager
async def api_client(workdir: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Any]]:
    from husk.runtime.runtime import Runtime

    runtime = Runtime()
    install_busybox_image(runtime.images, workdir=workdir)
    async with TestClient(TestServer(build_app(runtime))) as client:
        yield client, runtime


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def stored_containers(data_dir: Path) -> list[Path]:
    root = data_dir / "containers"
    return sorted(root.iterdir()) if root.exists() else []


def config_with_label(size: int) -> dict[str, Any]:
    return {"Image": BUSYBOX_NAME, "Cmd": ["true"], "Labels": {"big": "x" * size}}


# ---------------------------------------------------------------- body caps


def test_an_oversized_create_body_is_413_and_nothing_is_stored(api_dirs: Path) -> None:
    async def body() -> None:
        async with api_client(api_dirs) as (client, runtime):
            payload = json.dumps(config_with_label(MAX_JSON_BODY)).encode()
            response = await client.post(
                "/containers/create", data=payload, headers={"Content-Type": "application/json"}
            )
            assert response.status == 413
            message = (await response.json())["message"]
            assert message.startswith("request body too large") and "4 MiB" in message
            assert runtime.list(all=True) == []

    run(body)
    assert stored_containers(api_dirs / "data") == []


def test_a_chunked_oversized_body_is_413_too(api_dirs: Path) -> None:
    """No Content-Length to refuse early: reading stops at the limit all the same."""

    async def chunks() -> AsyncIterator[bytes]:
        head = b'{"Image": "%s", "Labels": {"big": "' % BUSYBOX_NAME.encode()
        yield head
        for _ in range(MAX_JSON_BODY // MiB + 2):
            yield b"x" * MiB
        yield b'"}}'

    async def body() -> None:
        async with api_client(api_dirs) as (client, runtime):
            response = await client.post("/containers/create", data=chunks())
            assert response.status == 413
            assert "request body too large" in (await response.json())["message"]
            assert runtime.list(all=True) == []

    run(body)
    assert stored_containers(api_dirs / "data") == []


def test_a_body_announced_too_large_is_refused_before_it_is_sent(api_dirs: Path) -> None:
    """A client announcing 1 TiB gets its 413 without sending (or the daemon reading) it."""

    async def body() -> None:
        async with api_client(api_dirs) as (client, runtime):
            assert client.server.host and client.server.port
            reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
            writer.write(
                b"POST /v1.45/containers/create HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1099511627776\r\n\r\n{"
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 413"), head
            writer.close()
            assert runtime.list(all=True) == []

    run(body)


def test_bodies_under_the_cap_still_work(api_dirs: Path) -> None:
    async def body() -> None:
        async with api_client(api_dirs) as (client, _):
            response = await client.post(
                "/containers/create?name=fine", json=config_with_label(64 * 1024)
            )
            assert response.status == 201, await response.text()

    run(body)


# ------------------------------------------------------------- field limits


@pytest.mark.parametrize(
    ("config", "name", "message"),
    [
        (config_with_label(MAX_LABELS_TOTAL + 1), None, "value of label 'big' is too long"),
        (
            {"Image": BUSYBOX_NAME, "Labels": {f"k{i}": "v" * 1000 for i in range(300)}},
            None,
            "Labels are too large",
        ),
        ({"Image": BUSYBOX_NAME, "Env": ["A=" + "x" * MAX_ARG]}, None, "an entry of Env"),
        ({"Image": BUSYBOX_NAME, "Env": ["A=1"] * 5000}, None, "Env has 5000 entries"),
        ({"Image": BUSYBOX_NAME, "Cmd": ["x" * 100_000] * 11}, None, "Cmd and Entrypoint"),
        ({"Image": BUSYBOX_NAME, "Hostname": "h" * 65}, None, "Hostname is too long"),
        ({"Image": BUSYBOX_NAME}, "n" * (MAX_NAME + 1), "container name is too long"),
    ],
)
def test_stored_fields_are_bounded_with_a_400(
    api_dirs: Path, config: dict[str, Any], name: str | None, message: str
) -> None:
    async def body() -> None:
        async with api_client(api_dirs) as (client, runtime):
            query = f"?name={name}" if name else ""
            response = await client.post(f"/containers/create{query}", json=config)
            assert response.status == 400, await response.text()
            assert message in (await response.json())["message"]
            assert runtime.list(all=True) == []

    run(body)
    assert stored_containers(api_dirs / "data") == []


def test_rename_and_exec_fields_are_bounded(api_dirs: Path) -> None:
    async def body() -> None:
        async with api_client(api_dirs) as (client, _):
            created = await client.post(
                "/containers/create?name=c", json={"Image": BUSYBOX_NAME, "Cmd": ["true"]}
            )
            assert created.status == 201
            renamed = await client.post("/containers/c/rename?name=" + "r" * (MAX_NAME + 1))
            assert renamed.status == 400
            assert "container name is too long" in (await renamed.json())["message"]
            exec_body = {"Cmd": ["echo"], "Env": ["X=" + "y" * MAX_ARG]}
            response = await client.post("/containers/c/exec", json=exec_body)
            assert response.status == 400
            assert "an entry of Env" in (await response.json())["message"]

    run(body)


def test_limit_checks_accept_what_docker_clients_send() -> None:
    spec = spec_from_create(
        {
            "Image": "busybox",
            "Cmd": ["sh", "-c", "echo " + "x" * 4000],
            "Env": [f"V{i}=value" for i in range(200)],
            "Labels": {f"org.example.{i}": "v" * 200 for i in range(100)},
            "Hostname": "h" * 64,
        },
        "n" * MAX_NAME,
    )
    check_spec(spec)
    from husk.runtime.runtime import ExecSpec

    check_exec(ExecSpec(argv=["sh", "-c", "true"], env=["A=1"], workdir="/srv"))
    with pytest.raises(InvalidArgument, match="Cmd has 5000 entries"):
        check_exec(ExecSpec(argv=["x"] * 5000))


# ------------------------------------------------------- the real daemon


def _raw_request(sock_path: Path, head: bytes, body: bytes = b"") -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(str(sock_path))
        sock.sendall(head)
        if body:
            # The daemon may answer and close before reading all of it.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(body)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def test_real_daemon_refuses_a_100_mb_config_and_stores_nothing() -> None:
    """The reproduction: a 100 MB container config used to be stored as config.json."""
    root = short_root()
    try:
        from husk.oci.store import ImageStore

        install_busybox_image(ImageStore(root / "data" / "images"), workdir=root)
        daemon = start_daemon(root)
        try:
            payload = json.dumps(config_with_label(100 * MiB)).encode()
            head = (
                b"POST /v1.45/containers/create HTTP/1.1\r\nHost: husk\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(payload)
            )
            reply = _raw_request(daemon.socket, head, payload)
            assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
            assert b"request body too large" in reply
            listing = _raw_request(
                daemon.socket, b"GET /v1.45/containers/json?all=1 HTTP/1.1\r\nHost: husk\r\n\r\n"
            )
            assert listing.startswith(b"HTTP/1.1 200") and listing.endswith(b"[]"), listing
            assert daemon.alive()
        finally:
            daemon.stop()
        assert stored_containers(root / "data") == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
