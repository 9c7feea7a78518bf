"""What the runtime keeps in memory for a guest's answers and a client's execs is bounded.

A hostile guest (the fake agent of tests/fake_agent.py, speaking the real protocol
to the real AgentClient) answers a path stat, an archive or husk's own exec with
endless output: the runtime used to collect all of it in memory. A client calls
exec create in a loop, or runs execs forever: every record was kept until the
container was removed. The container here is a real record (real image, real
store); only its VM is replaced by the fake agent, so no VM boots.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fake_agent import FakeAgent, json_frame, rss_bytes
from husk.agent.client import AgentClient
from husk.daemon.docker import build_app
from husk.daemon.docker.shapes import stats_json
from husk.errors import Conflict, GuestError, NotFound
from husk.guest import protocol
from husk.guest.protocol import Frame, MsgType
from husk.runtime import execs as execs_module
from husk.runtime.collect import MAX_STAT_OUTPUT, CappedOutput, OutputTooLarge
from husk.runtime.execs import ExecRecord, ExecSpec, ExecTable
from husk.runtime.model import ContainerStatus
from husk.runtime.runtime import Live, Runtime
from husk.spec import ContainerSpec
from testimages import BUSYBOX_NAME, install_busybox_image

MIB = 1024 * 1024
INT64_MAX = (1 << 63) - 1
FLOOD_BYTES = 96 * MIB


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    return tmp_path


class Guest:
    """A running container whose VM is a fake agent: ``runtime`` and ``record`` are real."""

    def __init__(self, runtime: Runtime, record: Any, agent: FakeAgent) -> None:
        self.runtime = runtime
        self.record = record
        self.agent = agent


@asynccontextmanager
async def running_container(workdir: Path) -> AsyncIterator[Guest]:
    runtime = Runtime()
    install_busybox_image(runtime.images, workdir=workdir)
    record = await runtime.create(ContainerSpec(image=BUSYBOX_NAME, cmd=["true"]))
    with FakeAgent(workdir / "agent.sock") as agent:
        client = await AgentClient.connect(agent.path, timeout=5.0)
        try:
            machine = SimpleNamespace(kill=_nothing, on_event=lambda *_: None)
            sandbox = SimpleNamespace(client=client, machine=machine, transfer_ring=lambda: None)
            live = Live(sandbox=sandbox, process=None, publisher=None)  # type: ignore[arg-type]
            container = runtime.container(record.id)
            container.live = live
            container.transition(ContainerStatus.RUNNING)
            yield Guest(runtime, record, agent)
        finally:
            container.live = None
            await client.close()


async def _nothing() -> None:
    return None


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 120))


def flooding(agent: FakeAgent, stream: MsgType, total: int, *, exit_code: int = 0) -> Any:
    """A reply that starts a session and then sends ``total`` bytes on it, then EXITED."""
    chunk = protocol.MAX_PAYLOAD - 64

    def reply(frame: Frame) -> bytes:
        agent.send(json_frame(MsgType.STARTED, frame.channel, {"pid": 7}))
        payload = protocol.encode(stream, frame.channel, b"{" * chunk)
        tail = json_frame(MsgType.EXITED, frame.channel, {"code": exit_code})

        def flood() -> None:
            for _ in range(total // chunk):
                agent.send(payload)
            agent.send(tail)

        import threading

        threading.Thread(target=flood, daemon=True).start()
        return b""

    return reply


async def peak_rss_while(task: Awaitable[Any]) -> tuple[Any, int]:
    """(outcome of ``task`` or the exception it raised, highest RSS growth meanwhile)."""
    before = rss_bytes()
    future = asyncio.ensure_future(task)
    peak = 0
    while not future.done():
        peak = max(peak, rss_bytes() - before)
        await asyncio.sleep(0.01)
    try:
        return future.result(), peak
    except Exception as exc:
        return exc, peak


# ----------------------------------------------------- output read whole


def test_a_guest_answering_a_stat_with_96_mb_gets_an_error_not_the_daemons_memory(
    dirs: Path,
) -> None:
    async def body() -> None:
        async with running_container(dirs) as guest:
            guest.agent.replies[MsgType.ARCHIVE] = flooding(
                guest.agent, MsgType.STDOUT, FLOOD_BYTES
            )
            outcome, peak = await peak_rss_while(guest.runtime.stat_path(guest.record.id, "/etc"))
            assert isinstance(outcome, GuestError), outcome
            assert "more than 64 KiB" in str(outcome) and "/etc" in str(outcome)
            assert peak < 24 * MIB, f"grew by {peak / MIB:.0f} MiB"
            # The session was ended: killed and released in the guest.
            await asyncio.sleep(0.2)
            signals = [json.loads(f.payload) for f in guest.agent.frames_of(MsgType.SIGNAL)]
            assert {"signal": 9} in signals
            assert guest.agent.frames_of(MsgType.CLOSE)
            # The container's connection goes on working.
            assert (await guest.runtime.stats(guest.record.id))["cpu_ns"] == 5

    with_vm_figures(body)


def test_error_text_of_an_archive_is_capped_too(dirs: Path) -> None:
    async def body() -> None:
        async with running_container(dirs) as guest:
            guest.agent.replies[MsgType.ARCHIVE] = flooding(
                guest.agent, MsgType.STDERR, FLOOD_BYTES, exit_code=1
            )

            async def nothing() -> AsyncIterator[bytes]:
                return
                yield b""

            outcome, peak = await peak_rss_while(
                guest.runtime.put_archive(guest.record.id, "/tmp", nothing())
            )
            assert isinstance(outcome, OutputTooLarge), outcome
            assert "stderr" in str(outcome)
            assert peak < 24 * MIB, f"grew by {peak / MIB:.0f} MiB"

    with_vm_figures(body)


def test_exec_simple_output_is_capped_and_health_output_truncated(dirs: Path) -> None:
    async def body() -> None:
        async with running_container(dirs) as guest:
            runtime, record = guest.runtime, guest.record
            guest.agent.replies[MsgType.EXEC] = flooding(guest.agent, MsgType.STDOUT, FLOOD_BYTES)
            outcome, peak = await peak_rss_while(runtime.exec_simple(record.id, ["yes"]))
            assert isinstance(outcome, OutputTooLarge), outcome
            assert peak < 24 * MIB, f"grew by {peak / MIB:.0f} MiB"
            assert len(runtime.execs) == 0
            # A health check keeps the start and reads (drops) the rest, to the exit code.
            guest.agent.replies[MsgType.EXEC] = flooding(
                guest.agent, MsgType.STDOUT, 8 * MIB, exit_code=3
            )
            code, out, err = await runtime.exec_simple(
                record.id, ["yes"], limit=4096, truncate=True
            )
            assert (code, len(out), err) == (3, 4096, b"")

    with_vm_figures(body)


def with_vm_figures(body: Callable[[], Awaitable[None]]) -> None:
    """Runs ``body`` with the machine's host figures stubbed (there is no QEMU)."""
    original = Runtime.stats

    async def stats(self: Runtime, ref: str) -> dict[str, Any]:
        live = self.container(ref).require_live()
        live.sandbox.machine.rss_bytes = lambda: 0
        live.sandbox.machine.cpu_seconds = lambda: 0.0
        return await original(self, ref)

    Runtime.stats = stats  # type: ignore[method-assign]
    try:
        run(body)
    finally:
        Runtime.stats = original  # type: ignore[method-assign]


def test_capped_output_unit() -> None:
    capped = CappedOutput("x", 10, error_limit=4)
    capped.add("stdout", b"0123456789")
    with pytest.raises(OutputTooLarge, match="more than 10 bytes on stdout"):
        capped.add("stdout", b"!")
    capped = CappedOutput("x", 10, error_limit=4, truncate=True)
    capped.add("stderr", b"abc")
    capped.add("stderr", b"defgh")
    capped.add("stdout", b"z" * 50)
    assert (capped.stdout, capped.stderr, capped.overflowed) == (b"z" * 10, b"abcd", True)
    assert MAX_STAT_OUTPUT == 64 * 1024


# ------------------------------------------------------------ exec records


def exiting_at_once(agent: FakeAgent) -> Any:
    def reply(frame: Frame) -> bytes:
        return json_frame(MsgType.STARTED, frame.channel, {"pid": 9}) + json_frame(
            MsgType.EXITED, frame.channel, {"code": 0}
        )

    return reply


def test_exec_create_in_a_loop_is_refused_past_the_pending_limit(dirs: Path) -> None:
    """The reproduction: every exec create was kept until the container was removed."""

    async def body() -> None:
        async with running_container(dirs) as guest:
            app = build_app(guest.runtime)
            async with TestClient(TestServer(app)) as http:
                url = f"/containers/{guest.record.id}/exec"
                big_env = ["A=" + "x" * 100_000] * 10  # ~1 MB a record
                statuses = []
                for _ in range(execs_module.MAX_PENDING_EXECS + 20):
                    response = await http.post(url, json={"Cmd": ["true"], "Env": big_env})
                    statuses.append(response.status)
                    if response.status == 409:
                        message = (await response.json())["message"]
                assert statuses.count(201) == execs_module.MAX_PENDING_EXECS
                assert statuses[-1] == 409
                assert "not started" in message and str(execs_module.MAX_PENDING_EXECS) in message
                assert len(guest.runtime.execs) == execs_module.MAX_PENDING_EXECS
                # Husk's own execs (health checks) are not refused for it.
                guest.agent.replies[MsgType.EXEC] = exiting_at_once(guest.agent)
                assert (await guest.runtime.exec_simple(guest.record.id, ["true"]))[0] == 0
                # Stopping the container drops them (they can never start).
                guest.runtime.execs.container_stopped(guest.record.id)
                assert len(guest.runtime.execs) == 0

    run(body)


def test_finished_execs_are_pruned_to_the_newest_per_container(dirs: Path) -> None:
    async def body() -> None:
        async with running_container(dirs) as guest:
            runtime, record = guest.runtime, guest.record
            guest.agent.replies[MsgType.EXEC] = exiting_at_once(guest.agent)
            ids = []
            for _ in range(execs_module.MAX_FINISHED_EXECS + 30):
                exec_id = await runtime.exec_create(record.id, ExecSpec(argv=["true"]))
                stream = await runtime.exec_start(exec_id)
                async for _ in stream.output():
                    pass
                ids.append(exec_id)
            assert len(runtime.execs) == execs_module.MAX_FINISHED_EXECS
            with pytest.raises(NotFound):
                runtime.exec_inspect(ids[0])
            newest = runtime.exec_inspect(ids[-1])
            assert (newest.exit_code, newest.running) == (0, False)
            with pytest.raises(Conflict, match="already been started"):
                await runtime.exec_start(ids[-1])

    run(body)


def test_exec_table_ages_out_and_forgets_removed_containers() -> None:
    now = [1000.0]
    table = ExecTable(clock=lambda: now[0])
    records = [
        ExecRecord(f"{i:x}" + "0" * 63, "c1" if i % 2 else "c2", ExecSpec(["x"])) for i in range(6)
    ]
    for record in records:
        table.add(record)
    for record in records[:4]:
        record.started = True
        table.finished(record)
    assert len(table) == 6
    now[0] += execs_module.FINISHED_EXEC_TTL + 1
    table.prune()
    assert len(table) == 2  # the pending ones stay
    assert table.get(records[5].id[:10]) is records[5]
    table.container_removed("c1")
    assert len(table) == 1
    with pytest.raises(NotFound):
        table.get("")  # an empty prefix names no exec


# ------------------------------------------------------------------ stats


def test_stats_documents_never_fail_and_stay_within_dockers_types() -> None:
    """Whatever a sample holds, the document is built, with counts Docker's Go types hold."""
    record = SimpleNamespace(id="c" * 64, name="hostile")
    absurd: dict[str, Any] = {
        "cpu_ns": 10**30,
        "cpu_system_ns": -5,
        "cpu_user_ns": float("nan"),
        "system_cpu_ns": float("inf"),
        "online_cpus": INT64_MAX,
        "memory_used": "lots",
        "memory_total": None,
        "pids": True,
        "net_rx_bytes": [1],
        "block_read_bytes": 1.5e300,
        "time_ns": 10**40,
        "vm_cpu_seconds": float("-inf"),
        "processes": [{"pid": 1}],
    }
    document = stats_json(record, absurd, absurd)  # type: ignore[arg-type]
    json.dumps(document, allow_nan=False)
    cpu = document["cpu_stats"]
    assert cpu["cpu_usage"]["total_usage"] == INT64_MAX
    assert cpu["cpu_usage"]["usage_in_kernelmode"] == 0
    assert cpu["cpu_usage"]["usage_in_usermode"] == 0
    assert cpu["system_cpu_usage"] == 0
    assert cpu["online_cpus"] == 2**32 - 1  # Docker's uint32
    assert document["memory_stats"]["usage"] == 0
    assert document["pids_stats"]["current"] == 0
    assert document["networks"]["eth0"]["rx_bytes"] == 0
    assert document["husk_host"]["vm_cpu_seconds"] == 0.0

    def counts(value: Any) -> list[int]:
        if isinstance(value, dict):
            return [n for v in value.values() for n in counts(v)]
        if isinstance(value, list):
            return [n for v in value for n in counts(v)]
        return [value] if isinstance(value, int) else []

    assert all(0 <= n <= INT64_MAX for n in counts(document))


def test_stats_through_the_api_with_a_guest_sending_extremes(dirs: Path) -> None:
    async def body() -> None:
        async with running_container(dirs) as guest:
            extremes = {
                "cpu_ns": INT64_MAX,
                "online_cpus": INT64_MAX,
                "memory_used": INT64_MAX,
                "memory_total": 0,
                "time_ns": 0,
                "processes": [{"pid": 1, "ppid": 0, "uid": 0, "time": "0", "cmd": "x" * 8000}],
            }
            guest.agent.replies[MsgType.STATS] = lambda frame: json_frame(
                MsgType.STATS, frame.channel, extremes
            )
            async with TestClient(TestServer(build_app(guest.runtime))) as http:
                response = await http.get(
                    f"/containers/{guest.record.id}/stats", params={"stream": "0", "one-shot": "1"}
                )
                assert response.status == 200, await response.text()
                document = await response.json()
            assert document["cpu_stats"]["online_cpus"] == 2**32 - 1
            assert document["memory_stats"]["usage"] == INT64_MAX
            assert document["read"].startswith(time.strftime("%Y"))  # the host's clock
            assert "processes" not in guest.runtime.live[guest.record.id].last_stats

    with_vm_figures(body)


# ------------------------------------------------------------------- wait


def test_waits_given_up_by_their_clients_leave_nothing_behind(dirs: Path) -> None:
    """A client looping ``wait`` and hanging up (its handler is cancelled) grew a list."""

    async def body() -> None:
        async with running_container(dirs) as guest:
            runtime, record = guest.runtime, guest.record
            for condition in ("not-running", "next-exit", "removed"):
                waits = [
                    asyncio.ensure_future(runtime.wait(record.id, condition)) for _ in range(500)
                ]
                await asyncio.sleep(0)
                container = runtime.container(record.id)
                waiting = len(container.exit_waiters) + len(container.removal_waiters)
                assert waiting == len(waits)
                for task in waits:
                    task.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
                assert container.exit_waiters == [] and container.removal_waiters == []
            # A wait that is not given up still gets its answer.
            kept = asyncio.ensure_future(runtime.wait(record.id))
            await asyncio.sleep(0)
            runtime.launcher.mark_exited(runtime.container(record.id), 7)
            assert await kept == 7

    run(body)


def test_running_execs_per_container_are_bounded(
    dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(execs_module, "MAX_RUNNING_EXECS", 5)

    async def body() -> None:
        async with running_container(dirs) as guest:
            runtime, record = guest.runtime, guest.record
            # Execs that start and never end (each holds a guest channel).
            channels: list[int] = []

            def started(frame: Frame) -> bytes:
                channels.append(frame.channel)
                return json_frame(MsgType.STARTED, frame.channel, {"pid": 11})

            guest.agent.replies[MsgType.EXEC] = started
            streams = []
            for _ in range(5):
                exec_id = await runtime.exec_create(record.id, ExecSpec(argv=["sleep", "1d"]))
                streams.append(await runtime.exec_start(exec_id))
            extra = await runtime.exec_create(record.id, ExecSpec(argv=["sleep", "1d"]))
            with pytest.raises(Conflict, match="already runs 5 execs"):
                await runtime.exec_start(extra)
            # Husk's own execs are not refused for it.
            guest.agent.replies[MsgType.EXEC] = exiting_at_once(guest.agent)
            assert (await runtime.exec_simple(record.id, ["true"]))[0] == 0
            # Once one ends, a start is accepted again.
            guest.agent.send(json_frame(MsgType.EXITED, channels[0], {"code": 0}))
            async for _ in streams[0].output():
                pass
            guest.agent.replies[MsgType.EXEC] = started
            await runtime.exec_start(extra)

    run(body)
