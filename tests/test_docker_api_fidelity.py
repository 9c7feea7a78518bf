"""API versions, endpoints husk lacks, sizes and detach keys, without VMs.

The HTTP tests serve the real application (real Runtime and image store in a temporary
data directory) through aiohttp's test server; the attach pump runs over a real socket
pair against a scripted process.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer

from husk.daemon.docker import build_app
from husk.daemon.docker.container_io import pump
from husk.daemon.docker.sizes import writable_layer_bytes
from husk.daemon.docker.streams import HijackedConnection
from husk.detachkeys import DetachScanner, parse_detach_keys
from husk.errors import InvalidArgument
from husk.oci.rootfs import make_ext4_disk
from husk.runtime.streams import ProcessStream
from testimages import BUSYBOX_NAME, install_busybox_image

MIB = 1024 * 1024

# ------------------------------------------------------------------ detach keys


def test_detach_keys_parse_as_dockers() -> None:
    assert parse_detach_keys("") == b"\x10\x11"  # ctrl-p,ctrl-q
    assert parse_detach_keys("ctrl-x,y") == b"\x18y"
    assert parse_detach_keys("ctrl-@,ctrl-[,ctrl-\\,ctrl-],ctrl-^,ctrl-_") == bytes(
        [0, 27, 28, 29, 30, 31]
    )
    assert parse_detach_keys("a,b,c") == b"abc"
    for bad in ("ctrl-1", "ctrlp", "ctrl-p,,q", "ctrl-P"):
        with pytest.raises(InvalidArgument, match="invalid detach keys"):
            parse_detach_keys(bad)


def test_the_scanner_finds_the_keys_across_chunks_and_passes_the_rest() -> None:
    scanner = DetachScanner(b"\x10\x11")
    assert scanner.feed(b"ls\r") == (b"ls\r", False)
    assert scanner.feed(b"x\x10") == (b"x", False)  # held: may start the sequence
    assert scanner.feed(b"\x11tail") == (b"", True)  # neither key reaches the process
    scanner = DetachScanner(b"\x10\x11")
    assert scanner.feed(b"\x10") == (b"", False)
    assert scanner.feed(b"a") == (b"\x10a", False)  # not the sequence: both go on, in order
    assert scanner.feed(b"one\x10\x11two") == (b"one", True)
    scanner = DetachScanner(b"aab")
    assert scanner.feed(b"aa") == (b"", False)
    assert scanner.feed(b"a") == (b"a", False)  # "aaa": the last two may still start it
    assert scanner.feed(b"b") == (b"", True)
    scanner = DetachScanner(b"\x10\x11")
    assert scanner.feed(b"q\x10") == (b"q", False)
    assert scanner.flush() == b"\x10"  # the input ended: what was held goes on


class ScriptedProcess:
    """A ProcessStream whose output the test releases and whose stdin it records."""

    def __init__(self, tty: bool) -> None:
        self.stdin = bytearray()
        self.stdin_closed = False
        self.output_queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()

        async def output() -> AsyncIterator[tuple[str, bytes]]:
            while (item := await self.output_queue.get()) is not None:
                yield item

        async def write_stdin(data: bytes) -> None:
            self.stdin += data
            if data.endswith(b"\n"):
                await self.output_queue.put(("stdout", b"echo:" + bytes(data)))

        async def close_stdin() -> None:
            self.stdin_closed = True

        async def resize(rows: int, cols: int) -> None:
            return None

        self.stream = ProcessStream(
            tty=tty,
            output=output,
            write_stdin=write_stdin,
            close_stdin=close_stdin,
            resize=resize,
            exit_code=lambda: None,
        )


async def _session(
    process: ScriptedProcess,
    *,
    close_stdin: bool,
    detach_keys: bytes | None,
    on_detach: Callable[[], None] | None = None,
) -> tuple[asyncio.Task[bool], socket.socket]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=ours)
    task = asyncio.ensure_future(
        pump(
            HijackedConnection(reader, writer),
            process.stream,
            stdin=True,
            streams={"stdout", "stderr"},
            close_stdin=close_stdin,
            detach_keys=detach_keys,
            on_detach=on_detach,
        )
    )
    return task, theirs


async def _read_until_closed(client: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = b""
    while chunk := await asyncio.wait_for(loop.sock_recv(client, 4096), 5):
        received += chunk
    return received


def test_daemon_detaches_a_terminal_session_on_its_keys_and_leaves_stdin_open() -> None:
    async def body() -> None:
        process = ScriptedProcess(tty=True)
        detaches: list[bool] = []
        task, client = await _session(
            process, close_stdin=True, detach_keys=b"\x18y", on_detach=lambda: detaches.append(True)
        )
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"echo hi\n")
        assert await asyncio.wait_for(loop.sock_recv(client, 100), 5) == b"echo:echo hi\n"
        await loop.sock_sendall(client, b"ab\x18")
        await asyncio.sleep(0.05)
        await loop.sock_sendall(client, b"y-never-sent")
        assert await _read_until_closed(client) == b""  # the daemon ended the session
        assert await asyncio.wait_for(task, 5) is True and detaches == [True]
        assert bytes(process.stdin) == b"echo hi\nab"  # the keys and the rest never arrive
        assert not process.stdin_closed  # the workload runs on with its stdin
        client.close()

    asyncio.run(body())


def test_a_terminal_sessions_end_leaves_stdin_open_a_plain_one_closes_it() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        process = ScriptedProcess(tty=True)
        task, client = await _session(process, close_stdin=True, detach_keys=b"\x10\x11")
        await loop.sock_sendall(client, b"x\x10")
        client.shutdown(socket.SHUT_WR)  # the terminal went away
        assert await asyncio.wait_for(task, 5) is False  # ended, not detached
        assert not process.stdin_closed and bytes(process.stdin) == b"x\x10"
        client.close()

        process = ScriptedProcess(tty=False)  # no terminal: keys are data, EOF closes stdin
        task, client = await _session(process, close_stdin=True, detach_keys=b"\x10\x11")
        await loop.sock_sendall(client, b"\x10\x11data")
        client.shutdown(socket.SHUT_WR)
        for _ in range(100):
            if process.stdin_closed:
                break
            await asyncio.sleep(0.02)
        assert process.stdin_closed and bytes(process.stdin) == b"\x10\x11data"
        assert not task.done()  # output still flows after the client's half-close
        await process.output_queue.put(("stdout", b"late"))
        await process.output_queue.put(None)
        await asyncio.wait_for(task, 5)
        assert await _read_until_closed(client) == b"\x01\x00\x00\x00\x00\x00\x00\x04late"
        client.close()

    asyncio.run(body())


# ------------------------------------------------------------------- sizes


def test_writable_layer_size_is_what_the_disk_holds_beyond_an_empty_one(tmp_path: Path) -> None:
    container = tmp_path / "containers" / "c1"
    container.mkdir(parents=True)
    upper = container / "upper.ext4"
    assert writable_layer_bytes(upper) == 0  # never started: no disk yet
    make_ext4_disk(upper, 1024 * MIB)
    assert writable_layer_bytes(upper) == 0
    with open(upper, "r+b") as disk:  # what a guest's writes do to the sparse image
        disk.seek(600 * MIB)
        disk.write(b"\xa5" * (3 * MIB))
    assert writable_layer_bytes(upper) == 3 * MIB


# ---------------------------------------------------------------- HTTP API


@pytest.fixture
def api_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    return tmp_path


@asynccontextmanager
async def api_client() -> AsyncIterator[tuple[TestClient[Any, Any], Any]]:
    from husk.runtime.runtime import Runtime

    runtime = Runtime()
    async with TestClient(TestServer(build_app(runtime))) as client:
        yield client, runtime


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_every_version_up_to_1_50_is_served(api_dirs: Path) -> None:
    async def body() -> None:
        async with api_client() as (client, _):
            ping = await client.get("/_ping")
            assert ping.headers["API-Version"] == "1.50"
            for version in ("1.41", "1.44", "1.46", "1.47", "1.48", "1.49", "1.50"):
                answer = await client.get(f"/v{version}/version")
                assert answer.status == 200, version
                document = await answer.json()
                assert (document["ApiVersion"], document["MinAPIVersion"]) == ("1.50", "1.41")
            too_new = await client.get("/v1.51/containers/json")
            assert too_new.status == 400
            assert "Maximum supported API version is 1.50" in (await too_new.json())["message"]

    run(body)


def test_fields_follow_the_version_asked_for(api_dirs: Path) -> None:
    async def body() -> None:
        async with api_client() as (client, runtime):
            install_busybox_image(runtime.images, workdir=api_dirs)

            async def get(path: str) -> Any:
                answer = await client.get(path)
                assert answer.status == 200, path
                return await answer.json()

            assert "VirtualSize" in (await get("/v1.43/images/json"))[0]
            assert "VirtualSize" not in (await get("/v1.44/images/json"))[0]
            old = await get(f"/v1.44/images/{BUSYBOX_NAME}/json")
            assert old["ContainerConfig"]["Cmd"] == old["Config"]["Cmd"]
            assert "VirtualSize" not in old and old["Container"] == ""
            new = await get(f"/v1.45/images/{BUSYBOX_NAME}/json")
            assert "ContainerConfig" not in new and "Container" not in new
            assert new["Config"]["Hostname"] == "" and new["Config"]["Tty"] is False
            latest = await get(f"/v1.50/images/{BUSYBOX_NAME}/json")
            assert "Hostname" not in latest["Config"] and "AttachStdin" not in latest["Config"]
            assert latest["Config"]["Cmd"] == new["Config"]["Cmd"]

            info = await get("/v1.48/info")
            assert info["BridgeNfIptables"] is False
            assert "AllowNondistributableArtifactsCIDRs" in info["RegistryConfig"]
            info = await get("/v1.49/info")
            assert "BridgeNfIptables" in info
            assert "AllowNondistributableArtifactsCIDRs" not in info["RegistryConfig"]
            info = await get("/v1.50/info")
            assert "BridgeNfIptables" not in info and "BridgeNfIp6tables" not in info
            assert info["RegistryConfig"]["InsecureRegistryCIDRs"] == ["127.0.0.0/8"]

    run(body)


def test_endpoints_husk_lacks_answer_501_and_prunes_succeed(api_dirs: Path) -> None:
    async def body() -> None:
        async with api_client() as (client, _):
            for method, path, word in (
                ("POST", "/build/cancel", "building images"),
                ("POST", "/v1.50/swarm/init", "swarm"),
                ("GET", "/v1.50/services", "swarm"),
                ("GET", "/v1.50/nodes/abc", "swarm"),
                ("GET", "/plugins", "plugins"),
                ("GET", "/v1.50/distribution/busybox/json", "registry"),
                ("POST", "/session", "BuildKit"),
            ):
                answer = await client.request(method, path)
                assert answer.status == 501, path
                message = (await answer.json())["message"]
                assert word in message and "not supported by husk" in message, message
            for path in ("/v1.50/containers/nope/export", "/v1.50/containers/nope/changes"):
                assert (await client.get(path)).status == 404  # served now: no such container
            # Builds and commits are served now: an empty context, an unknown container.
            assert (await client.post("/v1.50/build")).status == 400
            assert (await client.post("/v1.47/commit?container=nope")).status == 404
            pruned = await client.post("/v1.50/build/prune?all=1")
            assert pruned.status == 200
            assert await pruned.json() == {"CachesDeleted": None, "SpaceReclaimed": 0}
            volumes = await client.post("/v1.50/volumes/prune")
            assert await volumes.json() == {"VolumesDeleted": None, "SpaceReclaimed": 0}
            missing = await client.get("/v1.50/no/such/endpoint")
            assert missing.status == 404 and await missing.json() == {"message": "page not found"}

    run(body)


def test_bad_detach_keys_are_refused(api_dirs: Path) -> None:
    async def body() -> None:
        async with api_client() as (client, _):
            answer = await client.post("/v1.50/containers/nope/start?detachKeys=ctrl-1")
            assert answer.status == 400
            assert "invalid detach keys" in (await answer.json())["message"]

    run(body)


def test_platform_parameters_of_image_endpoints(api_dirs: Path) -> None:
    async def body() -> None:
        async with api_client() as (client, runtime):
            record = install_busybox_image(runtime.images, workdir=api_dirs)
            own = quote(json.dumps({"os": record.os, "architecture": record.architecture}))
            other = quote(json.dumps({"os": "linux", "architecture": "s390x"}))
            path = f"/v1.50/images/{BUSYBOX_NAME}/json"
            assert (await client.get(f"{path}?platform={own}")).status == 200
            wrong = await client.get(f"{path}?platform={other}")
            assert wrong.status == 404
            message = (await wrong.json())["message"]
            assert "does not match the specified platform: wanted linux/s390x" in message
            assert (await client.get(f"{path}?platform=linux")).status == 400
            kept = await client.delete(f"/v1.50/images/{BUSYBOX_NAME}?platforms={other}")
            assert kept.status == 404
            assert (await client.get(path)).status == 200  # nothing was removed
            removed = await client.delete(f"/v1.50/images/{BUSYBOX_NAME}?platforms={own}")
            assert removed.status == 200
            assert (await client.get(path)).status == 404

    run(body)
