"""docker-py and testcontainers-python against husk's socket, with real VMs."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
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
from husk.daemon.docker.streams import FrameDecoder

pytestmark = [pytest.mark.vm, pytest.mark.registry]

STDIN_LOOP = "echo ready; while read line; do echo got:$line; done; echo stdin-closed"


class Collector:
    """Drains a blocking iterator (a docker-py stream) in a thread."""

    def __init__(self, iterator: Any) -> None:
        self.data = b""
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True)
        self._thread.start()

    def _run(self, iterator: Any) -> None:
        for chunk in iterator:
            self.data += chunk

    def wait_for(self, token: bytes, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        while token not in self.data:
            if time.monotonic() > end:
                raise AssertionError(f"{token!r} not received within {deadline}s: {self.data!r}")
            time.sleep(0.05)


def read_frames_until(sock: socket.socket, token: bytes, deadline: float = 60.0) -> bytes:
    decoder = FrameDecoder()
    stdout = b""
    end = time.monotonic() + deadline
    while token not in stdout:
        sock.settimeout(max(0.1, end - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            break
        stdout += b"".join(data for stream, data in decoder.feed(chunk) if stream == 1)
    return stdout


async def websocket_round_trip(daemon: RunningDaemon, container_id: str) -> bytes:
    """Attach over ``attach/ws``: send a line to the container's stdin, read its answer."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=str(daemon.socket))
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"http://husk/v1.45/containers/{container_id}/attach/ws"
        params = {"stream": "1", "stdin": "1", "stdout": "1"}
        async with session.ws_connect(url, params=params) as socket_:
            await socket_.send_bytes(b"over a websocket\n")
            message = await socket_.receive(timeout=60)
            assert message.type == aiohttp.WSMsgType.BINARY
            return bytes(message.data)


def tar_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o640
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.timeout(900)
def test_docker_py_containers(husk_daemon: RunningDaemon, daemon_busybox: str) -> None:  # noqa: F811
    import docker

    client = husk_daemon.client()
    try:
        assert client.containers.run(daemon_busybox, "echo hi", remove=True) == b"hi\n"
        with pytest.raises(docker.errors.ContainerError) as failed:
            client.containers.run(
                daemon_busybox, ["sh", "-c", "echo oops >&2; exit 2"], remove=True
            )
        assert failed.value.exit_status == 2 and failed.value.stderr == b"oops\n"

        container = client.containers.run(
            daemon_busybox,
            ["sh", "-c", STDIN_LOOP],
            detach=True,
            stdin_open=True,
            name="py-stdin",
            labels={"suite": "docker-py"},
        )
        try:
            container.reload()
            assert container.status == "running"
            assert [c.id for c in client.containers.list(filters={"label": "suite=docker-py"})] == [
                container.id
            ]
            logs = Collector(container.logs(stream=True, follow=True))
            logs.wait_for(b"ready\n")

            result = container.exec_run(
                ["sh", "-c", "id -u; pwd; echo $FOO; echo err >&2"],
                user="1000",
                workdir="/tmp",
                environment={"FOO": "bar"},
                demux=True,
            )
            assert result.exit_code == 0
            assert result.output == (b"1000\n/tmp\nbar\n", b"err\n")
            assert container.exec_run("sh -c 'exit 7'").exit_code == 7
            streamed = container.exec_run(["sh", "-c", "echo one; echo two"], stream=True)
            assert b"".join(streamed.output) == b"one\ntwo\n"

            payload = b"through the archive API\n" * 100
            assert container.put_archive("/tmp", tar_of("hello.txt", payload)) is True
            chunks, stat = container.get_archive("/tmp/hello.txt")
            assert stat["name"] == "hello.txt" and stat["size"] == len(payload)
            with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as archive:
                member = archive.getmember("hello.txt")
                extracted = archive.extractfile(member)
                assert extracted is not None and extracted.read() == payload
            with pytest.raises(docker.errors.NotFound):
                container.get_archive("/no/such/file")

            stats = next(container.stats(decode=True, stream=True))
            assert stats["id"] == container.id and stats["name"] == "/py-stdin"
            assert stats["cpu_stats"]["cpu_usage"]["total_usage"] > 0
            assert stats["memory_stats"]["usage"] > 0 and stats["pids_stats"]["current"] >= 1
            assert asyncio.run(websocket_round_trip(husk_daemon, container.id)) == (
                b"got:over a websocket\n"
            )

            attached = container.attach_socket(
                params={"stdin": 1, "stream": 1, "stdout": 1, "stderr": 1}
            )
            raw: socket.socket = attached._sock
            raw.sendall(b"hello\n")
            assert b"got:hello\n" in read_frames_until(raw, b"got:hello\n")
            raw.close()
            logs.wait_for(b"got:hello\n")
            assert logs.data == b"ready\ngot:over a websocket\ngot:hello\n"
            # Without StdinOnce, clients leaving does not close the container's stdin.
            assert container.exec_run("true").exit_code == 0
            container.reload()
            assert container.status == "running"
        finally:
            container.remove(force=True)

        # PID 1 of its namespace, the shell gets only the signals it handles (as under
        # Docker): send TERM once its trap is set.
        sleeper = client.containers.run(
            daemon_busybox,
            ["sh", "-c", "trap 'exit 143' TERM; echo armed; while true; do sleep 0.1; done"],
            detach=True,
        )
        try:
            deadline = time.monotonic() + 60
            while b"armed" not in sleeper.logs():
                assert time.monotonic() < deadline, "the sleeper never set its trap"
                time.sleep(0.1)
            sleeper.kill(signal="SIGTERM")
            assert sleeper.wait(timeout=60)["StatusCode"] == 143
            sleeper.reload()
            assert sleeper.status == "exited"
            assert sleeper.attrs["State"]["ExitCode"] == 143
            with pytest.raises(docker.errors.APIError) as not_running:
                sleeper.kill()
            assert not_running.value.status_code == 409
        finally:
            sleeper.remove(force=True)
    finally:
        client.close()


TESTCONTAINERS_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, urllib.request
    from testcontainers.core.container import DockerContainer

    image = sys.argv[1]
    command = ["sh", "-c", "mkdir -p /www && echo from-testcontainers > /www/index.html"
               " && exec httpd -f -p 80 -h /www"]
    with DockerContainer(image).with_command(command).with_exposed_ports(80) as container:
        host = container.get_container_host_ip()
        port = int(container.get_exposed_port(80))
        body, end = b"", time.monotonic() + 60
        while not body and time.monotonic() < end:
            try:
                body = urllib.request.urlopen(f"http://{host}:{port}/", timeout=5).read()
            except OSError:
                time.sleep(0.2)
        print(json.dumps({"host": host, "port": port, "body": body.decode(),
                          "id": container.get_wrapped_container().id}))
    """
)


@pytest.mark.timeout(600)
def test_testcontainers_reads_the_mapped_port(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    env = dict(husk_daemon.env)
    # These tests run inside a container themselves (/.dockerenv): tell testcontainers
    # that published ports are on this host's loopback, as they are with husk.
    env["TESTCONTAINERS_HOST_OVERRIDE"] = "127.0.0.1"
    env["TESTCONTAINERS_CONNECTION_MODE"] = "docker_host"
    result = subprocess.run(
        [sys.executable, "-c", TESTCONTAINERS_SCRIPT, daemon_busybox],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert report["host"] == "127.0.0.1" and report["port"] > 0
    assert report["body"] == "from-testcontainers\n"
    leftover = husk_daemon.docker("ps", "-a", "-q", "--no-trunc").stdout.decode().split()
    assert report["id"] not in leftover, "testcontainers removes its container on exit"
