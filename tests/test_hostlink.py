"""Unix-socket binds and the gateway relay without VMs: the guest's listener in a
directory tree standing for a container root, the host's checks at create, and the
gateway's allow-list in a network namespace the test makes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from husk.daemon.docker.create_config import spec_from_create
from husk.errors import InvalidArgument
from husk.guest.agent import listen
from husk.guest.agent.system import SystemError_
from husk.runtime.gateway import Gateway
from husk.runtime.socket_relay import socket_source


def _unix_server(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server


def test_socket_source_resolves_sockets_once_and_refuses_other_files(tmp_path: Path) -> None:
    real = tmp_path / "real.sock"
    server = _unix_server(real)
    try:
        link = tmp_path / "link.sock"
        link.symlink_to(real)
        assert socket_source(str(link)) == str(real)
        plain = tmp_path / "plain"
        plain.write_text("x")
        assert socket_source(str(plain)) == ""  # a single-file bind, shared at start
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(InvalidArgument, match="neither a directory, a regular file nor"):
            socket_source(str(fifo))
    finally:
        server.close()


def test_volumes_that_binds_cover_are_no_anonymous_volumes() -> None:
    """docker-py lists every bind target in Config.Volumes (testcontainers' Ryuk does so
    for the docker socket): those are no volumes, a path nothing binds is an anonymous one."""
    body = {
        "Image": "busybox",
        "Volumes": {"/var/run/docker.sock": {}},
        "HostConfig": {"Binds": ["/run/husk.sock:/var/run/docker.sock:rw"]},
    }
    spec = spec_from_create(body, None)
    assert [b.target for b in spec.binds] == ["/var/run/docker.sock"]
    body["Volumes"] = {"/var/run/docker.sock": {}, "/data": {}}
    spec = spec_from_create(body, None)
    assert [(b.target, b.anonymous) for b in spec.binds] == [
        ("/var/run/docker.sock", False),
        ("/data", True),
    ]


@pytest.fixture
def container_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # Debian's /var/run, resolved inside the root
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return root


def test_guest_socket_lands_inside_the_root_through_its_links(container_root: Path) -> None:
    sock = listen.bind_inside(str(container_root), "/var/run/docker.sock", 0o660)
    try:
        made = container_root / "run" / "docker.sock"
        assert made.is_socket()
        assert made.stat().st_mode & 0o777 == 0o660
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(made))
        client.close()
    finally:
        sock.close()


def test_guest_socket_never_replaces_other_files(container_root: Path) -> None:
    with pytest.raises(SystemError_, match="exists in the container and is not a socket"):
        listen.bind_inside(str(container_root), "/etc/passwd", 0o660)
    assert (container_root / "etc" / "passwd").read_text().startswith("root:")
    with pytest.raises(SystemError_, match=r"without '\.\.'"):
        listen.bind_inside(str(container_root), "/run/../../escape.sock", 0o660)


# -- the gateway in a test-made network namespace ---------------------------------------

_CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"ping")
s.shutdown(socket.SHUT_WR)
print(s.recv(100).decode() or "closed")
"""


@pytest.fixture
def netns_pid() -> Iterator[int]:
    with _network_namespace() as pid:
        yield pid


@pytest.fixture
def other_netns_pid() -> Iterator[int]:
    with _network_namespace() as pid:
        yield pid


@contextlib.contextmanager
def _network_namespace() -> Iterator[int]:
    """A process in a network namespace of its own, with its loopback up."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a network namespace")
    process = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    try:
        for _ in range(100):
            if os.readlink(f"/proc/{process.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            subprocess.run(["sleep", "0.02"], check=True)
        subprocess.run(
            ["nsenter", f"--net=/proc/{process.pid}/ns/net", "ip", "link", "set", "lo", "up"],
            check=True,
        )
        yield process.pid
    finally:
        process.kill()
        process.wait()


def _connect_from(pid: int, port: int) -> str:
    result = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", _CLIENT, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout.strip() or result.stderr.strip().splitlines()[-1]


async def _echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(b"pong:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_gateway_offers_published_ports_and_nothing_else(netns_pid: int) -> None:
    async def main() -> None:
        published, published_port = await _echo_server()
        host_only, host_only_port = await _echo_server()
        gateway = Gateway()
        owner = object()
        try:
            await gateway.join("c1", netns_pid)
            await gateway.publish(owner, published_port, "0.0.0.0")
            reach = asyncio.to_thread
            assert await reach(_connect_from, netns_pid, published_port) == "pong:ping"
            assert "refused" in (await reach(_connect_from, netns_pid, host_only_port)).lower()
            await gateway.unpublish(owner)
            after = await reach(_connect_from, netns_pid, published_port)
            assert "refused" in after.lower()
        finally:
            await gateway.close()
            published.close()
            host_only.close()

    asyncio.run(main())


def test_gateway_rechecks_the_allow_list_per_connection(netns_pid: int) -> None:
    """A listener that outlives its port's publication (a race) relays nothing."""

    async def main() -> None:
        server, port = await _echo_server()
        gateway = Gateway()
        owner = object()
        try:
            await gateway.join("c1", netns_pid)
            await gateway.publish(owner, port, "127.0.0.1")
            gateway._published.clear()  # unpublished behind the listeners' back
            answer = await asyncio.to_thread(_connect_from, netns_pid, port)
            assert "pong" not in answer  # closed at once, never relayed
        finally:
            await gateway.close()
            server.close()

    asyncio.run(main())


_HOLDER = """
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    try:
        held.append(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5))
    except OSError:
        pass
time.sleep(60)
"""


def test_one_vm_cannot_take_every_gateway_connection(netns_pid: int, other_netns_pid: int) -> None:
    """A guest that opens and holds hundreds of connections to a published port at the
    gateway holds at most its own share of relays (each costs the daemon three
    descriptors): another VM's connection is still relayed."""

    async def main() -> None:
        held: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)
            await reader.read()

        holding = await asyncio.start_server(hold, "127.0.0.1", 0)
        holding_port = holding.sockets[0].getsockname()[1]
        echo, echo_port = await _echo_server()
        gateway = Gateway()
        owner = object()
        hog = None
        try:
            await gateway.join("hog", netns_pid)
            await gateway.join("other", other_netns_pid)
            await gateway.publish(owner, holding_port, "127.0.0.1")
            await gateway.publish(owner, echo_port, "127.0.0.1")
            count = str(gateway_limit() + 100)
            enter = ["nsenter", f"--net=/proc/{netns_pid}/ns/net"]
            hog = subprocess.Popen(
                [*enter, sys.executable, "-c", _HOLDER, str(holding_port), count]
            )
            await _until_steady(held, gateway_limit())
            assert 0 < len(held) <= gateway_limit()
            answer = await asyncio.to_thread(_connect_from, other_netns_pid, echo_port)
            assert answer == "pong:ping"
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            await gateway.close()
            holding.close()
            echo.close()

    asyncio.run(main())


async def _until_steady(held: list[asyncio.StreamWriter], limit: int) -> None:
    """Until ``limit`` relays are held, or none was added for 3 s (60 s at most)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    changed, count = loop.time(), 0
    while len(held) < limit and loop.time() < deadline:
        await asyncio.sleep(0.1)
        if len(held) != count:
            changed, count = loop.time(), len(held)
        elif count and loop.time() - changed > 3:
            return


def gateway_limit() -> int:
    from husk.runtime import gateway

    return getattr(gateway, "MAX_CONNECTIONS_PER_VM", gateway.MAX_CONNECTIONS)
