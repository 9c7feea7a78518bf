"""The host end of the agent channel against a hostile fake guest (no VM).

Each test plays an attack a guest with root can make on the virtio-serial port:
floods on channels the host never opened, frames sent ahead on future channel
ids, a host consumer that stops reading, malformed messages. The host must stay
within its memory bounds, keep its own requests answered, and report typed errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_agent import GOOD_STATS, FakeAgent, json_frame, rss_bytes
from husk.agent import channel as channel_module
from husk.agent.channel import ConsumerStalled
from husk.agent.client import AgentClient, ProcessSpec
from husk.agent.messages import GuestRefused, MalformedMessage
from husk.errors import GuestError
from husk.guest import protocol
from husk.guest.protocol import Frame, MsgType

MIB = 1024 * 1024
LIMIT = 1 * MIB  # a small inbox bound, so the tests move little data


@pytest.fixture
def agent_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "agent.sock"


@pytest.fixture
def small_inboxes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel_module, "INBOX_LIMIT", LIMIT)
    monkeypatch.setattr(channel_module, "STALL_TIMEOUT", 1.0)


def with_client(agent: FakeAgent, body: Callable[[AgentClient], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        client = await AgentClient.connect(agent.path, timeout=5.0, **kw)
        try:
            return await asyncio.wait_for(body(client), 60)
        finally:
            await client.close()

    return asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def stdout_frames(channel: int, total: int, chunk: int = 256 * 1024) -> bytes:
    """``total`` bytes of numbered output on ``channel``, so loss or reordering shows."""
    data = pattern(total)
    return b"".join(
        protocol.encode(MsgType.STDOUT, channel, data[i : i + chunk])
        for i in range(0, total, chunk)
    )


def pattern(total: int) -> bytes:
    line_count = total // 16 + 1
    return b"".join(b"%015d\n" % i for i in range(line_count))[:total]


# -- channels the host did not open ---------------------------------------


def test_frames_on_unopened_channels_are_dropped_counted_and_logged_once(
    agent_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeAgent(agent_path) as agent:

        async def body(client: AgentClient) -> None:
            garbage = b"".join(
                protocol.encode(MsgType.STDOUT, channel, b"x" * 100) for channel in range(7, 2007)
            )
            agent.send(garbage)
            await until(lambda: client.counters.unknown_frames == 2000)
            assert client.counters.unknown_bytes == 200_000
            assert client.connection.open_channels == []
            assert client.connection.buffered_bytes == 0
            # The host still works.
            assert (await client.stats())["cpu_ns"] == 5

        with caplog.at_level(logging.WARNING, logger="husk.agent.channel"):
            with_client(agent, body)
    warnings = [r for r in caplog.records if "did not open" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited, not one line per frame


def test_flood_of_200_mb_on_unknown_channels_keeps_memory_bounded(agent_path: Path) -> None:
    chunk = b"".join(
        protocol.encode(MsgType.STDOUT, 1000 + i, b"\xa5" * (protocol.MAX_PAYLOAD - 64))
        for i in range(4)
    )
    repeat = (200 * MIB) // len(chunk) + 1
    with FakeAgent(agent_path) as agent:

        async def body(client: AgentClient) -> tuple[int, int]:
            before = rss_bytes()
            peak_rss = peak_buffered = 0
            flood = agent.send_in_background(chunk, repeat)
            while flood.is_alive() or client.counters.unknown_bytes < repeat * 4 * 1024:
                peak_buffered = max(peak_buffered, client.connection.buffered_bytes)
                peak_rss = max(peak_rss, rss_bytes() - before)
                await asyncio.sleep(0.005)
                if client.counters.unknown_frames == repeat * 4:
                    break
            assert client.counters.unknown_frames == repeat * 4
            assert client.counters.unknown_bytes > 200 * MIB
            return peak_buffered, peak_rss

        peak_buffered, peak_rss = with_client(agent, body)
    # Dropped, never queued: at most one frame being decoded plus one read.
    assert peak_buffered < 2 * MIB
    assert peak_rss < 48 * MIB


def test_frames_sent_early_on_a_future_channel_are_not_delivered(agent_path: Path) -> None:
    """A guest guesses the ids the host will use next and answers before being asked."""
    forged = b"".join(
        json_frame(MsgType.STARTED, ch, {"pid": 666})
        + protocol.encode(MsgType.STDOUT, ch, b"forged output\n")
        + json_frame(MsgType.EXITED, ch, {"code": 99})
        for ch in range(1, 6)
    )
    with FakeAgent(agent_path) as agent:

        def exec_reply(frame: Frame) -> bytes:
            return (
                json_frame(MsgType.STARTED, frame.channel, {"pid": 42})
                + protocol.encode(MsgType.STDOUT, frame.channel, b"real output\n")
                + json_frame(MsgType.EXITED, frame.channel, {"code": 0})
            )

        agent.replies[MsgType.EXEC] = exec_reply

        async def body(client: AgentClient) -> None:
            agent.send(forged)
            await until(lambda: client.counters.unknown_frames == 15)
            process = await client.exec(ProcessSpec(argv=["true"]))
            assert process.pid == 42
            assert await process.collect() == (0, b"real output\n", b"")

        with_client(agent, body)


def test_frames_before_ready_are_not_queued(agent_path: Path) -> None:
    with FakeAgent(agent_path) as agent:
        agent.before_ready = stdout_frames(1, 4 * MIB)

        async def body(client: AgentClient) -> None:
            assert client.counters.early_frames == 16
            assert client.connection.buffered_bytes == 0
            process = await client.exec(ProcessSpec(argv=["true"]))  # gets channel 1
            agent.send(json_frame(MsgType.EXITED, process.channel, {"code": 3}))
            assert await process.collect() == (3, b"", b"")

        with_client(agent, body)


def test_resumed_sessions_get_their_replay_and_others_are_dropped(agent_path: Path) -> None:
    ready = {
        "version": protocol.PROTOCOL_VERSION,
        "sessions": [{"channel": 5, "kind": "run", "pid": 7, "emitted": {"stdout": 6}}],
    }
    replay = protocol.encode(MsgType.STDOUT, 5, b"again\n") + json_frame(
        MsgType.EXITED, 5, {"code": 0}
    )
    with FakeAgent(agent_path, ready) as agent:
        agent.after_ready = replay  # in the same write as READY, as the real agent does

        async def adopt(client: AgentClient) -> None:
            assert client.ready["sessions"][0]["channel"] == 5
            process = client.reattach(5, 7)
            assert await process.collect() == (0, b"again\n", b"")
            # New ids never collide with the agent's sessions.
            assert (await client.exec(ProcessSpec(argv=["true"]))).channel == 6

        with_client(agent, adopt, resume={"run": {"stdout": 0, "stderr": 0}})
    with FakeAgent(agent_path.with_name("b.sock"), ready) as agent:
        agent.after_ready = replay

        async def look(client: AgentClient) -> None:
            await until(lambda: client.counters.unknown_frames == 2)
            assert client.connection.open_channels == []

        with_client(agent, look)  # not resuming: nothing is adopted


# -- back-pressure ----------------------------------------------------------


def test_a_full_inbox_stops_reading_so_the_guest_blocks(
    agent_path: Path, small_inboxes: None
) -> None:
    total = 48 * MIB
    with FakeAgent(agent_path) as agent:

        async def body(client: AgentClient) -> None:
            process = await client.exec(ProcessSpec(argv=["flood"]))
            flood = agent.send_in_background(
                stdout_frames(process.channel, total)
                + json_frame(MsgType.EXITED, process.channel, {"code": 0})
            )
            await asyncio.sleep(0.5)  # the host's consumer is not reading yet
            await until(lambda: client.connection.paused)
            sent_while_stalled = agent.sent
            await asyncio.sleep(0.3)  # (under STALL_TIMEOUT)
            assert client.connection.buffered_bytes <= LIMIT + 512 * 1024
            # The guest's writes block: it got rid of little more than the socket buffers.
            assert agent.sent - sent_while_stalled < 64 * 1024
            assert agent.sent < LIMIT + 8 * MIB
            code, out, _ = await process.collect()
            assert code == 0 and out == pattern(total)  # nothing lost, in order
            assert not flood.is_alive()
            assert client.counters.stalled_channels == 0

        with_client(agent, body)


def test_many_channels_each_just_below_their_bound_cannot_pin_more_than_the_total(
    agent_path: Path, small_inboxes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection a workload makes to a bound unix socket is a channel of its own (64
    per bind) whose consumer waits on the host socket. A guest that made that socket's
    server stop reading filled each inbox to just below its bound: 4 MiB apiece, 256 MiB
    of the daemon per bind, without ever stalling the reader. All inboxes together now
    hold at most the connection's total; the fullest silent one is dropped."""
    total_limit = 3 * LIMIT
    monkeypatch.setattr(channel_module, "TOTAL_INBOX_LIMIT", total_limit, raising=False)
    below = LIMIT - 64 * 1024
    with FakeAgent(agent_path) as agent:

        async def body(client: AgentClient) -> None:
            processes = [await client.exec(ProcessSpec(argv=["hold"])) for _ in range(12)]
            flood = b"".join(
                stdout_frames(process.channel, below, chunk=64 * 1024) for process in processes
            )
            agent.send_in_background(flood)
            most = 0
            deadline = time.monotonic() + 20
            while agent.sent < len(flood) and time.monotonic() < deadline:
                most = max(most, client.connection.buffered_bytes)
                await asyncio.sleep(0.01)
            most = max(most, client.connection.buffered_bytes)
            assert most <= total_limit + 512 * 1024, most
            assert client.counters.stalled_channels >= 6
            dropped = [p for p in processes if p.channel not in client.connection.open_channels]
            assert len(dropped) == client.counters.stalled_channels
            with pytest.raises(ConsumerStalled, match="took nothing"):
                await dropped[0].collect()

        with_client(agent, body)


def test_a_stalled_consumer_cannot_starve_the_hosts_requests(
    agent_path: Path, small_inboxes: None
) -> None:
    """An exec client stops reading; its inbox fills and reading stops; STATS still answers."""
    with FakeAgent(agent_path) as agent:

        async def body(client: AgentClient) -> None:
            process = await client.exec(ProcessSpec(argv=["flood"]))
            agent.send_in_background(stdout_frames(process.channel, 32 * MIB))
            await until(lambda: client.connection.paused)
            began = time.monotonic()
            assert await client.stats() == GOOD_STATS
            waited = time.monotonic() - began
            assert 0.5 < waited < 3.0  # held up by the stall, released by the stall rule
            assert client.counters.stalled_channels == 1
            assert process.channel not in client.connection.open_channels
            await until(lambda: bool(agent.frames_of(MsgType.CLOSE)))
            assert agent.frames_of(MsgType.CLOSE)[0].channel == process.channel
            with pytest.raises(ConsumerStalled, match="took nothing"):
                await process.collect()
            assert client.connection.buffered_bytes < 512 * 1024

        with_client(agent, body)


def test_a_slow_consumer_that_keeps_reading_is_never_dropped(
    agent_path: Path, small_inboxes: None
) -> None:
    total = 6 * MIB
    with FakeAgent(agent_path) as agent:

        async def body(client: AgentClient) -> None:
            process = await client.exec(ProcessSpec(argv=["flood"]))
            agent.send_in_background(
                stdout_frames(process.channel, total, chunk=64 * 1024)
                + json_frame(MsgType.EXITED, process.channel, {"code": 0})
            )
            out = bytearray()
            began = time.monotonic()
            async for _stream, data in process.output():
                out += data
                if time.monotonic() - began < 2.5:
                    # Far slower than the guest, but each pause is under the 1 s stall
                    # timeout: the consumer is alive and must not be dropped.
                    await asyncio.sleep(0.6)
            assert bytes(out) == pattern(total)
            assert client.counters.stalled_channels == 0
            assert client.counters.paused_seconds > 1.0

        with_client(agent, body)


def test_the_workload_channel_gets_more_patience_than_other_consumers(
    agent_path: Path, small_inboxes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workload's reader is the daemon's log pump; dropping it would end the container."""
    monkeypatch.setattr(channel_module, "WORKLOAD_STALL_TIMEOUT", 3.0)
    total = 8 * MIB
    with FakeAgent(agent_path) as agent:

        async def body(client: AgentClient) -> None:
            workload = await client.run(ProcessSpec(argv=["flood"]))
            agent.send_in_background(
                stdout_frames(workload.channel, total)
                + json_frame(MsgType.EXITED, workload.channel, {"code": 0})
            )
            await until(lambda: client.connection.paused)
            await asyncio.sleep(2.0)  # past STALL_TIMEOUT (1 s), within the workload's 3 s
            assert await workload.collect() == (0, pattern(total), b"")
            assert client.counters.stalled_channels == 0
            adopted = client.reattach(workload.channel, workload.pid)
            assert client.connection.open_channels == [adopted.channel]
            flood = stdout_frames(adopted.channel, 4 * MIB)
            agent.send_in_background(flood)
            await until(lambda: client.connection.paused)
            await asyncio.sleep(3.5)  # a reattached workload has the same patience, no more
            assert client.counters.stalled_channels == 1
            with pytest.raises(ConsumerStalled):
                await adopted.collect()

        with_client(agent, body)


def test_a_guest_that_never_reads_makes_sends_fail_in_time(
    agent_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_module, "SEND_TIMEOUT", 1.0)
    with FakeAgent(agent_path) as agent:

        async def body(client: AgentClient) -> None:
            process = await client.exec(ProcessSpec(argv=["cat"], stdin=True))
            agent.reading = False
            began = time.monotonic()
            with pytest.raises(GuestError, match="took none"):
                for _ in range(64):
                    await process.write_stdin(b"z" * MIB)
            assert time.monotonic() - began < 5
            transport = client.connection._writer.transport
            assert transport.get_write_buffer_size() < 4 * MIB

        with_client(agent, body)


# -- malformed messages -------------------------------------------------------

V = protocol.PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("ready", "complaint"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1]", "not a JSON object"),
        ({}, "'version' is missing"),
        ({"version": "1"}, "'version' must be an integer"),
        ({"version": V, "sessions": "all"}, "'sessions' must be a list"),
        ({"version": V, "sessions": [7]}, r"'sessions\[0\]' must be an object"),
        ({"version": V, "sessions": [{"channel": "5", "kind": "run", "pid": 1}]}, "channel"),
        ({"version": V, "sessions": [{"channel": 5, "kind": "run"}]}, r"sessions\[0\].pid"),
        ({"version": V, "sessions": [{"channel": 5, "kind": "run", "pid": True}]}, "pid"),
        ({"version": V, "sessions": [{"channel": 0, "kind": "run", "pid": 1}]}, "channel"),
        ({"version": V, "sessions": [{"channel": 2**32, "kind": "run", "pid": 1}]}, "channel"),
        ({"version": V, "sessions": [{"channel": 5, "kind": "x" * 99, "pid": 1}]}, "kind"),
        (
            {"version": V, "sessions": [{"channel": 5, "kind": "run", "pid": 1, "emitted": 3}]},
            "emitted",
        ),
        (
            {"version": V, "sessions": [{"channel": 5, "kind": "run", "pid": 1}] * 2},
            "repeats channel",
        ),
        ({"version": V, "sessions": [{"channel": 5, "kind": "run", "pid": 1}] * 2000}, "more"),
        (b'{"version": NaN}', "not valid JSON"),
        (("[" * 50 + "]" * 50).encode(), "JSON"),
        (b'{"version": 1, "x": ' + b"[" * 20 + b"]" * 20 + b"}", "nests deeper"),
    ],
)
def test_a_malformed_ready_is_a_typed_error_naming_the_field(
    agent_path: Path, ready: Any, complaint: str
) -> None:
    with FakeAgent(agent_path, ready):

        async def main() -> None:
            with pytest.raises(MalformedMessage, match=complaint) as caught:
                await AgentClient.connect(agent_path, timeout=5.0)
            assert "READY" in str(caught.value)

        asyncio.run(main())


def test_an_incompatible_version_is_refused_before_its_sessions_are_read(
    agent_path: Path,
) -> None:
    ready = {"version": V + 1, "sessions": {"future": "shape"}}
    with FakeAgent(agent_path, ready), pytest.raises(GuestError, match="speaks protocol"):
        asyncio.run(AgentClient.connect(agent_path, timeout=5.0))


@pytest.mark.parametrize(
    ("exited", "complaint"),
    [
        ({}, "'code' is missing"),
        ({"code": "0"}, "must be an integer"),
        ({"code": 1.5}, "must be an integer"),
        ({"code": 10**30}, "between 0 and 255"),
        ({"code": -1}, "between 0 and 255"),
        ([0], "not a JSON object"),
    ],
)
def test_a_malformed_exited_ends_the_process_with_a_typed_error(
    agent_path: Path, exited: Any, complaint: str
) -> None:
    with FakeAgent(agent_path) as agent:

        async def body(client: AgentClient) -> None:
            process = await client.exec(ProcessSpec(argv=["true"]))
            agent.send(json_frame(MsgType.EXITED, process.channel, exited))
            with pytest.raises(MalformedMessage, match=complaint):
                await asyncio.wait_for(process.wait(), 5)
            assert process.exit_code is None

        with_client(agent, body)


@pytest.mark.parametrize(
    ("started", "complaint"),
    [
        ({"pid": "42"}, "'pid' must be an integer"),
        ({"pid": 0}, "between 1"),
        ({}, "'pid' is missing"),
        (None, "not a JSON object"),
    ],
)
def test_a_malformed_started_is_a_typed_error(
    agent_path: Path, started: Any, complaint: str
) -> None:
    with FakeAgent(agent_path) as agent:
        agent.replies[MsgType.EXEC] = lambda f: json_frame(MsgType.STARTED, f.channel, started)

        async def body(client: AgentClient) -> None:
            with pytest.raises(MalformedMessage, match=complaint):
                await client.exec(ProcessSpec(argv=["true"]))
            assert client.connection.open_channels == []  # the failed session is released

        with_client(agent, body)


def test_a_wrong_reply_type_is_a_typed_error(agent_path: Path) -> None:
    with FakeAgent(agent_path) as agent:
        agent.replies[MsgType.EXEC] = lambda f: json_frame(MsgType.OK, f.channel, {})
        agent.replies[MsgType.STATS] = lambda f: json_frame(MsgType.EXITED, f.channel, {"code": 0})

        async def body(client: AgentClient) -> None:
            with pytest.raises(MalformedMessage, match="OK instead of STARTED"):
                await client.exec(ProcessSpec(argv=["true"]))
            with pytest.raises(MalformedMessage, match="EXITED instead of STATS"):
                await client.stats()

        with_client(agent, body)


@pytest.mark.parametrize(
    ("stats", "complaint"),
    [
        ({"cpu_ns": "5"}, "'cpu_ns' must be an integer"),
        ({"cpu_ns": -5}, "between 0"),
        ({"cpu_ns": 1.5}, "must be an integer"),
        ({"memory_used": [1]}, "must be an integer"),
        ({"cpu_ns": 2**64}, "between 0"),
        ({"Bad Name\x1b[2J": 1}, "not a plain name"),
        ({f"f{i}": 1 for i in range(100)}, "more than 64 fields"),
        ({"processes": "ps"}, "'processes' must be a list"),
        ({"processes": [{"pid": 1, "ppid": 0, "uid": 0, "time": "0:00"}]}, "cmd"),
        ({"processes": [{"pid": 1, "ppid": 0, "uid": "root", "time": "0", "cmd": "x"}]}, "uid"),
        (
            {"processes": [{"pid": 1, "ppid": 0, "uid": 0, "time": "0", "cmd": "x" * 9000}]},
            "longer than",
        ),
        (
            {"processes": [{"pid": 1, "ppid": 0, "uid": 0, "time": "0", "cmd": "x"}] * 5000},
            "more than 4096",
        ),
    ],
)
def test_malformed_stats_are_a_typed_error(agent_path: Path, stats: Any, complaint: str) -> None:
    with FakeAgent(agent_path) as agent:
        agent.replies[MsgType.STATS] = lambda f: json_frame(MsgType.STATS, f.channel, stats)

        async def body(client: AgentClient) -> None:
            with pytest.raises(MalformedMessage, match=complaint):
                await client.request(MsgType.STATS, {"processes": True})

        with_client(agent, body)


def test_stats_and_processes_of_the_expected_shape_pass(agent_path: Path) -> None:
    row = {"pid": 7, "ppid": 1, "uid": 0, "time": "0:01", "cmd": "sleep 1", "extra": {"x": 1}}
    with FakeAgent(agent_path) as agent:
        agent.replies[MsgType.STATS] = lambda f: json_frame(
            MsgType.STATS, f.channel, {**GOOD_STATS, "processes": [row]}
        )

        async def body(client: AgentClient) -> None:
            assert await client.processes() == [
                {"pid": 7, "ppid": 1, "uid": 0, "time": "0:01", "cmd": "sleep 1"}
            ]

        with_client(agent, body)


@pytest.mark.parametrize(
    ("error", "kind", "complaint"),
    [
        ({"message": "no such file", "code": "enoent"}, GuestRefused, "no such file"),
        ({"message": "plain"}, GuestRefused, "plain"),
        ({"code": "x"}, MalformedMessage, "'message' is missing"),
        ({"message": 5}, MalformedMessage, "'message' must be a string"),
        ({"message": "m", "code": ["x"]}, MalformedMessage, "'code' must be a string"),
        ({"message": "m" * 10_000}, MalformedMessage, "longer than"),
    ],
)
def test_error_replies_are_typed(
    agent_path: Path, error: Any, kind: type[GuestError], complaint: str
) -> None:
    with FakeAgent(agent_path) as agent:
        agent.replies[MsgType.EXEC] = lambda f: json_frame(MsgType.ERROR, f.channel, error)

        async def body(client: AgentClient) -> None:
            with pytest.raises(kind, match=complaint) as caught:
                await client.exec(ProcessSpec(argv=["true"]))
            if isinstance(caught.value, GuestRefused):
                assert str(caught.value).startswith("cannot start the process: ")
                assert caught.value.code == error.get("code", "error")

        with_client(agent, body)


def test_ok_replies_the_client_reads_are_checked(agent_path: Path) -> None:
    with FakeAgent(agent_path) as agent:
        agent.replies[MsgType.SET_TIME] = lambda f: json_frame(MsgType.OK, f.channel, {"x": 1})
        agent.replies[MsgType.OVERLAY_CONFIG] = lambda f: json_frame(
            MsgType.OK, f.channel, {"address": ["10.0.2.15"]}
        )
        agent.replies[MsgType.FORWARD] = lambda f: protocol.encode(MsgType.DATA, f.channel, b"x")

        async def body(client: AgentClient) -> None:
            with pytest.raises(MalformedMessage, match="'unix_ns' is missing"):
                await client.set_time()
            with pytest.raises(MalformedMessage, match="'address' must be a string"):
                await client.set_interface(mac="02:00:00:00:00:01")
            with pytest.raises(MalformedMessage, match="DATA instead of OK"):
                await client.forward(80)
            assert client.connection.open_channels == []

        with_client(agent, body)
