"""The runtime API in-process, against real VMs: the reference runtime's acceptance scenarios."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import socket
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from husk.errors import Conflict, InvalidArgument, NotFound, StartFailed
from husk.runtime.runtime import ExecSpec, NotModified, Runtime
from husk.spec import (
    NO_TEMPLATE_LABEL,
    ContainerSpec,
    HealthCheck,
    RestartPolicy,
    parse_bind,
    parse_port_spec,
    parse_size,
    parse_tmpfs,
)

pytestmark = pytest.mark.vm

IMAGE = "husk.local/busybox:latest"
DEADLINE = 180.0


@pytest.fixture(scope="session")
def busybox_image(guest_bundle: object) -> str:
    from testimages import install_busybox_image

    install_busybox_image()
    return IMAGE


def with_runtime(body: Callable[[Runtime], Awaitable[Any]]) -> Any:
    """Runs ``body`` with a fresh Runtime; every container it made is removed afterwards."""

    async def main() -> Any:
        runtime = Runtime()
        before = {r.id for r in runtime.list(all=True)}
        try:
            return await asyncio.wait_for(body(runtime), DEADLINE)
        finally:
            for record in runtime.list(all=True):
                if record.id not in before:
                    await runtime.remove(record.id, force=True)
            await runtime.shutdown()

    return asyncio.run(main())


async def logs_text(runtime: Runtime, ref: str, **kwargs: Any) -> str:
    return "".join([e.data.decode() async for e in runtime.logs(ref, **kwargs)])


async def run_to_exit(runtime: Runtime, spec: ContainerSpec) -> tuple[int, str]:
    record = await runtime.create(spec)
    await runtime.start(record.id)
    code = await runtime.wait(record.id)
    return code, await logs_text(runtime, record.id)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def http_get(port: int, path: str = "/", attempts: int = 50) -> bytes:
    for _ in range(attempts):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
            writer.close()
            if data:
                return data
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing answered on port {port}")


def test_echo_hello_and_exit_codes(busybox_image: str) -> None:
    async def body(runtime: Runtime) -> None:
        assert await run_to_exit(
            runtime, ContainerSpec(image="husk.local/busybox", cmd=["echo", "hello"])
        ) == (0, "hello\n")
        code, _ = await run_to_exit(
            runtime, ContainerSpec(image=busybox_image, cmd=["sh", "-c", "exit 7"])
        )
        assert code == 7

    with_runtime(body)


@pytest.mark.parametrize("boot_path", ["template", "cold"])
def test_full_lifecycle(busybox_image: str, boot_path: str) -> None:
    port = free_port()
    labels = {NO_TEMPLATE_LABEL: "true"} if boot_path == "cold" else {}

    async def body(runtime: Runtime) -> None:
        record = await runtime.create(
            ContainerSpec(
                image=busybox_image,
                name="lifecycle",
                cmd=["sh", "-c", "echo banner-ready; exec httpd -f -p 80 -h /www"],
                ports=parse_port_spec(f"127.0.0.1:{port}:80"),
                memory=parse_size("256m"),
                labels=labels,
            )
        )
        assert runtime.get("lifecycle").state.status == "created"
        assert runtime.get(record.id[:8]).id == record.id
        if boot_path == "template":  # a first start of this shape makes the template
            warm = await runtime.create(
                ContainerSpec(image=busybox_image, cmd=["true"], memory=parse_size("256m"))
            )
            await runtime.start(warm.id)
            await runtime.wait(warm.id)
        await runtime.start("lifecycle")
        assert runtime.get(record.id).state.status == "running"
        assert runtime.live[record.id].sandbox.boot_path == boot_path
        with pytest.raises(NotModified):
            await runtime.start(record.id)
        response = await http_get(port, "/index.html")
        assert response.startswith(b"HTTP/1.") and response.endswith(b"hello from husk\n")
        assert runtime.port_mappings(record.id) == {
            "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]
        }
        assert "banner-ready" in await logs_text(runtime, record.id)
        stats = await runtime.stats(record.id)
        assert stats["cpu_ns"] > 0 and stats["memory_used"] > 0 and stats["vm_rss_bytes"] > 0
        assert stats["memory_total"] < 256 * 1024 * 1024
        code, out, err = await runtime.exec_simple(record.id, ["echo", "hi"])
        assert (code, out, err) == (0, b"hi\n", b"")
        code, _, _ = await runtime.exec_simple(record.id, ["sh", "-c", "exit 42"])
        assert code == 42
        titles, rows = await runtime.top(record.id)
        assert "PID" in titles and any("httpd" in row[-1] for row in rows)
        await runtime.pause(record.id)
        assert runtime.get(record.id).state.status == "paused"
        await runtime.unpause(record.id)
        assert (await runtime.exec_simple(record.id, ["true"]))[0] == 0
        await runtime.stop(record.id, timeout=1)
        state = runtime.get(record.id).state
        assert state.status == "exited"
        # httpd is PID 1 without a TERM handler: TERM is ignored (as under Docker), KILL ends it.
        assert state.exit_code == 137
        with pytest.raises(NotModified):
            await runtime.stop(record.id)
        with pytest.raises(Conflict, match="not running"):
            await runtime.exec_create(record.id, ExecSpec(argv=["true"]))
        await runtime.remove(record.id)
        with pytest.raises(NotFound):
            runtime.get(record.id)
        await runtime.remove(record.id)  # removing again (by id) still succeeds
        assert not runtime.vm_dir(record.id).exists()

    with_runtime(body)


def test_stop_signal_escalation_and_kill(busybox_image: str) -> None:
    async def body(runtime: Runtime) -> None:
        stubborn = await runtime.create(
            ContainerSpec(
                image=busybox_image,
                cmd=["sh", "-c", "trap 'echo ignored' TERM; echo armed; while :; do sleep 1; done"],
            )
        )
        await runtime.start(stubborn.id)
        async for entry in runtime.logs(stubborn.id, follow=True):
            if b"armed" in entry.data:
                break
        started = time.monotonic()
        await runtime.stop(stubborn.id, timeout=1)
        assert runtime.get(stubborn.id).state.exit_code == 137
        assert time.monotonic() - started < 30
        # The workload is PID 1: only the signals it handles reach it, as under Docker.
        victim = await runtime.create(
            ContainerSpec(
                image=busybox_image,
                cmd=["sh", "-c", "trap 'exit 10' USR1; echo armed; while :; do sleep 0.2; done"],
            )
        )
        await runtime.start(victim.id)
        async for entry in runtime.logs(victim.id, follow=True):
            if b"armed" in entry.data:
                break
        with pytest.raises(InvalidArgument, match="invalid signal"):
            await runtime.kill(victim.id, "SIGNOPE")
        await runtime.kill(victim.id, "SIGUSR1")
        assert await runtime.wait(victim.id) == 10

    with_runtime(body)


def test_bind_mount_tmpfs_env_user_and_archive(busybox_image: str, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    share.chmod(0o777)  # the workload runs as uid 1000
    (share / "from-host.txt").write_text("host data\n")

    async def body(runtime: Runtime) -> None:
        record = await runtime.create(
            ContainerSpec(
                image=busybox_image,
                cmd=["sleep", "300"],
                env=["COLOUR=teal"],
                user="1000",
                workdir="/work",
                binds=[parse_bind(f"{share}:/data")],
                tmpfs=[parse_tmpfs("/scratch:size=8m")],
                hostname="named-box",
                extra_hosts=["db:10.1.2.3"],
            )
        )
        await runtime.start(record.id)
        code, out, _ = await runtime.exec_simple(
            record.id,
            [
                "sh",
                "-c",
                "cat /data/from-host.txt; echo $COLOUR $(pwd) $(id -u) $(hostname);"
                " echo back > /data/from-guest.txt; grep /scratch /proc/mounts;"
                " grep -E 'named-box|db' /etc/hosts; cat /etc/hostname",
            ],
        )
        assert code == 0
        lines = out.decode().splitlines()
        assert lines[0] == "host data"
        assert lines[1] == "teal /work 1000 named-box"
        assert "tmpfs" in lines[2]
        # /etc/hosts as Docker writes it (by the start's NETWORK message, after PREPARE):
        # the --add-host entries, then the container's own address and name.
        assert lines[3] == "10.1.2.3\tdb", lines
        address, name = lines[4].split("\t")
        assert name == "named-box" and address.startswith("172.17."), lines
        assert lines[5] == "named-box", lines
        assert (share / "from-guest.txt").read_text() == "back\n"
        # docker cp in both directions
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo("copied.txt")
            payload = b"copied in\n"
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        async def once() -> AsyncIterator[bytes]:
            yield buffer.getvalue()

        await runtime.put_archive(record.id, "/tmp", once())
        # A gzip upload (Docker's API takes one) goes through tarfile's own stream.
        plain = io.BytesIO()
        with tarfile.open(fileobj=plain, mode="w") as tar:
            info = tarfile.TarInfo("gzipped.txt")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        zipped = gzip.compress(plain.getvalue())

        async def compressed() -> AsyncIterator[bytes]:
            yield zipped

        await runtime.put_archive(record.id, "/tmp", compressed())
        assert (await runtime.stat_path(record.id, "/tmp/gzipped.txt"))["size"] == 10
        stream, stat = await runtime.get_archive(record.id, "/tmp/copied.txt")
        assert stat["name"] == "copied.txt" and stat["size"] == len(payload)
        data = b"".join([chunk async for chunk in stream])
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            extracted = tar.extractfile("copied.txt")
            assert extracted is not None and extracted.read() == payload
        with pytest.raises(NotFound):
            await runtime.stat_path(record.id, "/no/such/file")

    with_runtime(body)


def test_restart_policy_health_and_auto_remove(busybox_image: str) -> None:
    async def body(runtime: Runtime) -> None:
        flaky = await runtime.create(
            ContainerSpec(
                image=busybox_image,
                cmd=["sh", "-c", "exit 3"],
                restart=RestartPolicy("on-failure", 2),
            )
        )
        await runtime.start(flaky.id)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            state = runtime.get(flaky.id).state
            if state.restart_count == 2 and state.status == "exited":
                break
            await asyncio.sleep(0.2)
        assert runtime.get(flaky.id).state.restart_count == 2
        assert runtime.get(flaky.id).state.exit_code == 3

        healthy = await runtime.create(
            ContainerSpec(
                image=busybox_image,
                cmd=["sleep", "300"],
                healthcheck=HealthCheck(
                    ["CMD-SHELL", "test -e /tmp/ok"], interval=0.5, timeout=5, retries=2
                ),
            )
        )
        await runtime.start(healthy.id)
        assert runtime.get(healthy.id).state.health == "starting"
        deadline = time.monotonic() + 30
        while runtime.get(healthy.id).state.health != "unhealthy" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert runtime.get(healthy.id).state.health == "unhealthy"
        await runtime.exec_simple(healthy.id, ["touch", "/tmp/ok"])
        while runtime.get(healthy.id).state.health != "healthy" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert runtime.get(healthy.id).state.health == "healthy"

        ephemeral = await runtime.create(
            ContainerSpec(image=busybox_image, cmd=["true"], auto_remove=True)
        )
        waiter = asyncio.ensure_future(runtime.wait(ephemeral.id, "removed"))
        await runtime.start(ephemeral.id)
        await asyncio.wait_for(waiter, 60)
        with pytest.raises(NotFound):
            runtime.get(ephemeral.id)

    with_runtime(body)


def test_bad_input_leaves_nothing_behind(busybox_image: str, tmp_path: Path) -> None:
    async def body(runtime: Runtime) -> None:
        before = {r.id for r in runtime.list(all=True)}
        with pytest.raises(NotFound):
            runtime.get("no-such-container")
        with pytest.raises(NotFound):
            await runtime.create(
                ContainerSpec(image="husk.local/nope:missing"), pull_policy="never"
            )
        with pytest.raises(InvalidArgument, match="invalid memory"):
            parse_size("12zz", "memory")
        with pytest.raises(InvalidArgument, match="bind source path does not exist"):
            await runtime.create(
                ContainerSpec(image=busybox_image, binds=[parse_bind(f"{tmp_path}/absent:/x")])
            )
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            # As with Docker: create succeeds, the start fails and says why.
            blocked = await runtime.create(
                ContainerSpec(image=busybox_image, ports=parse_port_spec(f"127.0.0.1:{port}:80"))
            )
            with pytest.raises(Conflict, match="already in use"):
                await runtime.start(blocked.id)
            state = runtime.get(blocked.id).state
            assert not state.running and "already in use" in state.error
            await runtime.remove(blocked.id)
        first = await runtime.create(ContainerSpec(image=busybox_image, name="twin", cmd=["true"]))
        with pytest.raises(Conflict, match="already in use"):
            await runtime.create(ContainerSpec(image=busybox_image, name="twin"))
        bad_cmd = await runtime.create(ContainerSpec(image=busybox_image, cmd=["no-such-cmd"]))
        with pytest.raises(StartFailed, match="executable file not found"):
            await runtime.start(bad_cmd.id)
        assert runtime.get(bad_cmd.id).state.exit_code == 127
        assert not runtime.get(bad_cmd.id).state.running
        await runtime.start(first.id)
        await runtime.wait(first.id)
        with pytest.raises(Conflict, match="not running"):
            await runtime.exec_create(first.id, ExecSpec(argv=["true"]))
        with pytest.raises(InvalidArgument, match="No exec command"):
            await runtime.exec_create(first.id, ExecSpec(argv=[]))
        after = {r.id for r in runtime.list(all=True)}
        assert after - before == {first.id, bad_cmd.id}

    with_runtime(body)


def _qemu_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if b"qemu-system" in fh.read().split(b"\0")[0]:
                        pids.add(int(entry))
            except OSError:
                continue
    return pids


def test_ten_concurrent_containers_leave_no_leaks(busybox_image: str) -> None:
    async def body(runtime: Runtime) -> None:
        qemus_before = _qemu_pids()
        specs = [
            ContainerSpec(image=busybox_image, cmd=["sleep", "300"], memory=parse_size("192m"))
            for _ in range(10)
        ]
        records = await asyncio.gather(*(runtime.create(s) for s in specs))
        await asyncio.gather(*(runtime.start(r.id) for r in records))
        assert all(runtime.get(r.id).state.status == "running" for r in records)
        mine = {runtime.get(r.id).state.pid for r in records}
        assert len(mine) == 10 and mine <= _qemu_pids()
        await asyncio.gather(*(runtime.remove(r.id, force=True) for r in records))
        deadline = time.monotonic() + 30
        while _qemu_pids() - qemus_before and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not (_qemu_pids() & mine)
        for record in records:
            assert not runtime.vm_dir(record.id).exists()
            assert not runtime.containers.directory(record.id).exists()

    with_runtime(body)


def test_published_udp_port_reaches_the_guest(busybox_image: str) -> None:
    port = free_port()

    def no_ports(snmp: bytes) -> int:
        header, values = [
            line.split() for line in snmp.decode().splitlines() if line.startswith("Udp:")
        ][:2]
        return int(values[header.index("NoPorts")])

    async def body(runtime: Runtime) -> None:
        record = await runtime.create(
            ContainerSpec(
                image=busybox_image,
                cmd=["sleep", "300"],
                ports=parse_port_spec(f"127.0.0.1:{port}:5353/udp"),
            )
        )
        await runtime.start(record.id)
        assert runtime.port_mappings(record.id) == {
            "5353/udp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]
        }
        before = no_ports((await runtime.exec_simple(record.id, ["cat", "/proc/net/snmp"]))[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(3):
                sender.sendto(b"ping", ("127.0.0.1", port))
        # Busybox has no UDP server: the guest kernel counting datagrams to a closed port
        # proves they crossed the tunnel onto the guest's loopback.
        deadline = time.monotonic() + 20
        after = before
        while after < before + 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            after = no_ports((await runtime.exec_simple(record.id, ["cat", "/proc/net/snmp"]))[1])
        assert after >= before + 3

    with_runtime(body)
