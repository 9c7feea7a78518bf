"""The guest core against real VMs: agent, protocol and QEMU backend together.

Each test boots the real bundle under QEMU with a busybox root and talks to the
agent through the host client, as the runtime does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from husk.agent.client import ProcessSpec
from husk.errors import GuestError
from husk.guest import protocol
from husk.guest.protocol import MsgType
from husk.sandbox.sandbox import Sandbox, SandboxConfig
from husk.vm.machine import random_mac

pytestmark = pytest.mark.vm

TEST_DEADLINE = 120.0
EXPECTED_PATH = "HUSK_TEST_EXPECT_BOOT_PATH"


@asynccontextmanager
async def sandbox(
    disk: Path, state: Path, *, upper: Path | None = None, memory: int = 256 * 1024 * 1024
) -> AsyncIterator[Sandbox]:
    box = await Sandbox.boot(
        SandboxConfig(
            state_dir=state,
            image_disk=disk,
            upper_disk=upper,
            hostname="guest-test",
            mac=random_mac(),
            memory_bytes=memory,
        )
    )
    expected = os.environ.get(EXPECTED_PATH)
    try:
        if expected:
            assert box.boot_path == expected, box.cold_reason
        yield box
    finally:
        await box.client.close()
        await box.machine.kill()


def run(disk: Path, state: Path, body: Callable[[Sandbox], Awaitable[Any]], **kwargs: Any) -> Any:
    async def main() -> Any:
        async with sandbox(disk, state, **kwargs) as box:
            return await asyncio.wait_for(body(box), TEST_DEADLINE)

    return asyncio.run(main())


async def run_workload(box: Sandbox, argv: list[str], **kwargs: Any) -> tuple[int, bytes, bytes]:
    process = await box.client.run(ProcessSpec(argv=argv, **kwargs))
    return await process.collect()


@pytest.fixture
def vm_state(tmp_path: Path, guest_bundle: object) -> Path:
    return tmp_path / "vm"


@pytest.fixture(scope="session")
def warm_template(busybox_disk: Path, guest_bundle: object, tmp_path_factory: Any) -> None:
    """One boot with the tests' VM shape, so the template exists before they run."""
    run(busybox_disk, tmp_path_factory.mktemp("warm") / "vm", lambda box: asyncio.sleep(0))


@pytest.fixture(params=["template", "cold"])
def boot_path(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Core scenarios run on both start paths: restored from the template, and cold."""
    if request.param == "cold":
        monkeypatch.setenv("HUSK_NO_TEMPLATE", "1")
    else:
        monkeypatch.delenv("HUSK_NO_TEMPLATE", raising=False)
        request.getfixturevalue("warm_template")
    monkeypatch.setenv(EXPECTED_PATH, request.param)
    return str(request.param)


def test_echo_hello_and_console(busybox_disk: Path, vm_state: Path, boot_path: str) -> None:
    code, out, err = run(busybox_disk, vm_state, lambda b: run_workload(b, ["echo", "hello"]))
    assert (code, out, err) == (0, b"hello\n", b"")
    console = (vm_state / "console.log").read_text(errors="replace")
    assert "husk-agent: ready" in console


def test_exit_code_and_stderr(busybox_disk: Path, vm_state: Path, boot_path: str) -> None:
    code, out, err = run(
        busybox_disk, vm_state, lambda b: run_workload(b, ["sh", "-c", "echo oops >&2; exit 7"])
    )
    assert code == 7
    assert out == b""
    assert err == b"oops\n"


def test_exec_beside_a_running_workload(busybox_disk: Path, vm_state: Path, boot_path: str) -> None:
    async def body(box: Sandbox) -> None:
        workload = await box.client.run(ProcessSpec(argv=["sleep", "300"]))
        hi = await box.client.exec(ProcessSpec(argv=["echo", "hi"]))
        assert await hi.collect() == (0, b"hi\n", b"")
        failing = await box.client.exec(ProcessSpec(argv=["sh", "-c", "exit 42"]))
        assert (await failing.collect())[0] == 42
        # execs run concurrently and see the workload
        ps = await box.client.exec(ProcessSpec(argv=["sh", "-c", "ps -o comm | grep -c sleep"]))
        assert (await ps.collect())[1].strip() == b"1"
        missing = box.client.exec(ProcessSpec(argv=["no-such-binary"]))
        with pytest.raises(GuestError, match="executable file not found"):
            await missing
        await workload.signal(signal.SIGKILL)
        assert await workload.wait() == 137
        with pytest.raises(GuestError, match="not running"):
            await box.client.exec(ProcessSpec(argv=["true"]))

    run(busybox_disk, vm_state, body)


def test_stdin_round_trip_through_cat(busybox_disk: Path, vm_state: Path, boot_path: str) -> None:
    async def body(box: Sandbox) -> tuple[int, bytes, bytes]:
        process = await box.client.run(ProcessSpec(argv=["cat"], stdin=True))
        payload = os.urandom(200_000)
        await process.write_stdin(payload)
        await process.close_stdin()
        code, out, err = await process.collect()
        assert out == payload
        return code, b"", err

    assert run(busybox_disk, vm_state, body) == (0, b"", b"")


def test_env_cwd_user_and_names(busybox_disk: Path, vm_state: Path) -> None:
    async def body(box: Sandbox) -> None:
        workload = await box.client.run(
            ProcessSpec(
                argv=["sh", "-c", 'echo "$GREETING $(pwd) $(id -u):$(id -g)"'],
                env=["GREETING=hola", "PATH=/bin"],
                cwd="/created/on/demand",
                user="1000:50",
            )
        )
        assert await workload.collect() == (0, b"hola /created/on/demand 1000:50\n", b"")

    run(busybox_disk, vm_state, body)

    async def by_name(box: Sandbox) -> None:
        workload = await box.client.run(ProcessSpec(argv=["sleep", "60"]))
        named = await box.client.exec(
            ProcessSpec(argv=["sh", "-c", "id -un; id -G; echo $HOME"], user="app")
        )
        code, out, _ = await named.collect()
        assert code == 0
        name, groups, home = out.decode().split("\n")[:3]
        assert name == "app"
        assert set(groups.split()) == {"1000", "50", "29"}  # primary + supplementary
        assert home == "/home/app"
        unknown = box.client.exec(ProcessSpec(argv=["true"], user="nobody-here"))
        with pytest.raises(GuestError, match="unable to find user nobody-here"):
            await unknown
        await workload.signal(signal.SIGKILL)

    run(busybox_disk, vm_state.with_name("vm2"), by_name)


def test_signal_deaths_are_128_plus_n(busybox_disk: Path, vm_state: Path, boot_path: str) -> None:
    async def body(box: Sandbox) -> None:
        workload = await box.client.run(ProcessSpec(argv=["sleep", "300"]))
        term = await box.client.exec(ProcessSpec(argv=["sleep", "300"]))
        await asyncio.sleep(0.2)
        await term.signal(signal.SIGTERM)
        assert await term.wait() == 143
        await workload.signal(signal.SIGKILL)
        assert await workload.wait() == 137

    run(busybox_disk, vm_state, body)


def test_guest_killed_mid_stream_is_a_clear_error(busybox_disk: Path, vm_state: Path) -> None:
    async def body(box: Sandbox) -> None:
        workload = await box.client.run(ProcessSpec(argv=["sh", "-c", "while :; do echo x; done"]))
        seen = 0
        with pytest.raises(GuestError, match=r"closed|lost"):
            async for _stream, data in workload.output():
                seen += len(data)
                if seen > 100_000:
                    os.kill(box.machine.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        with pytest.raises(GuestError, match=r"exited|killed|signal"):
            while time.monotonic() < deadline:  # the exit is noticed as soon as QEMU is reaped
                box.machine.check_alive()
                await asyncio.sleep(0.05)

    started = time.monotonic()
    run(busybox_disk, vm_state, body)
    assert time.monotonic() - started < TEST_DEADLINE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_forwarded_tcp_port_is_reachable(
    busybox_disk: Path, vm_state: Path, boot_path: str
) -> None:
    async def body(box: Sandbox) -> None:
        await box.client.run(ProcessSpec(argv=["httpd", "-f", "-p", "80", "-h", "/www"]))
        tunnel = None
        for _ in range(50):  # httpd needs a moment to listen
            try:
                tunnel = await box.client.forward(80)
                break
            except GuestError:
                await asyncio.sleep(0.1)
        assert tunnel is not None
        await tunnel.send(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        await tunnel.send_eof()
        response = b""
        while chunk := await tunnel.receive():
            response += chunk
        assert response.startswith(b"HTTP/1.") and b" 200 " in response.split(b"\r\n")[0]
        assert response.endswith(b"hello from husk\n")
        with pytest.raises(GuestError, match="refused"):
            await box.client.forward(81)

    run(busybox_disk, vm_state, body)


def test_writable_disk_persists_across_boots(busybox_disk: Path, vm_state: Path) -> None:
    from husk.oci.rootfs import make_ext4_disk

    upper = vm_state.parent / "upper.ext4"
    make_ext4_disk(upper, 256 * 1024 * 1024)

    async def write(box: Sandbox) -> None:
        assert await run_workload(box, ["sh", "-c", "echo kept > /etc/marker"]) == (0, b"", b"")
        await box.destroy()

    async def read(box: Sandbox) -> None:
        assert await run_workload(box, ["cat", "/etc/marker"]) == (0, b"kept\n", b"")

    run(busybox_disk, vm_state, write, upper=upper)
    run(busybox_disk, vm_state.with_name("vm2"), read, upper=upper)


def test_stats_clock_mounts_and_protocol_errors(busybox_disk: Path, vm_state: Path) -> None:
    async def body(box: Sandbox) -> None:
        client = box.client
        await client.mount(fstype="tmpfs", source="tmpfs", target="/scratch", options="size=1m")
        with pytest.raises(GuestError, match="not supported"):
            await client.mount(fstype="nfs", source="x", target="/nfs")
        workload = await client.run(ProcessSpec(argv=["sleep", "300"]))
        stats = await client.stats()
        assert stats["memory_total"] > 100 * 1024 * 1024
        assert 0 < stats["memory_used"] < stats["memory_total"]
        assert stats["cpu_ns"] > 0 and stats["pids"] >= 1
        assert stats["block_read_bytes"] > 0
        guest_time = await client.set_time()
        assert abs(guest_time["unix_ns"] - time.time_ns()) < 2_000_000_000
        df = await client.exec(ProcessSpec(argv=["sh", "-c", "grep /scratch /proc/mounts"]))
        assert b"tmpfs" in (await df.collect())[1]
        # An idle guest does not tick: its CPU has an always-running APIC timer (+arat), so
        # the kernel runs tickless and an idle VM costs the host almost nothing. Without it
        # the tick stays periodic, 250 a second (500 over the 2 s below).
        ticks = await client.exec(
            ProcessSpec(
                argv=["sh", "-c", "grep LOC: /proc/interrupts; sleep 2; grep LOC: /proc/interrupts"]
            )
        )
        before, after = (int(line.split()[1]) for line in (await ticks.collect())[1].splitlines())
        assert after - before < 200, f"{after - before} local timer interrupts in 2 s"
        # The workload's mount namespace is its own once it runs.
        with pytest.raises(GuestError, match="before the workload starts"):
            await client.mount(fstype="tmpfs", source="tmpfs", target="/later")
        # Garbage on the wire: the agent answers with an error and keeps serving.
        conn = client.connection
        inbox = conn.new_channel()
        await conn.send(protocol.encode(MsgType.RUN, inbox.channel, b"{not json"))
        reply = await inbox.get(10)
        assert reply.type is MsgType.ERROR and "JSON" in reply.json()["message"]
        inbox = conn.new_channel()
        await conn.send(protocol.encode(MsgType.EXEC, inbox.channel, b'{"argv":["true"],"env":5}'))
        reply = await inbox.get(10)
        assert reply.type is MsgType.ERROR
        bad = conn.open_channel(0x63)  # the host accepts the answer only on a channel it opened
        await conn.send(b"\x00\x00\x00\x02\xfa\x00\x00\x00\x63??")  # unknown type 250
        reply = await bad.get(10)
        assert reply.type is MsgType.ERROR
        hello = await client.exec(ProcessSpec(argv=["echo", "still alive"]))
        assert (await hello.collect())[1] == b"still alive\n"
        await workload.signal(signal.SIGKILL)

    run(busybox_disk, vm_state, body)


def test_exec_with_a_tty(busybox_disk: Path, vm_state: Path) -> None:
    async def body(box: Sandbox) -> None:
        workload = await box.client.run(ProcessSpec(argv=["sleep", "300"]))
        shell = await box.client.exec(ProcessSpec(argv=["sh"], tty=True, stdin=True))
        await shell.resize(33, 101)
        await shell.write_stdin(b"stty size; tty; exit 3\n")
        code, out, _ = await shell.collect()
        assert code == 3
        assert b"33 101" in out
        assert b"/dev/pts/" in out
        await workload.signal(signal.SIGKILL)

    run(busybox_disk, vm_state, body)
