"""Fuzzing the host's side of the guest protocol: decoder, router and message validators.

Whatever bytes a guest writes, split wherever the transport splits them, the host
gets only frames and frame errors, holds no more than one frame's worth per
partial frame, routes frames only to channels it opened, and turns every body into
either a valid value or a typed error (never KeyError, TypeError, AttributeError).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from husk.agent import messages
from husk.agent.channel import AgentConnection
from husk.agent.messages import GuestRefused, MalformedMessage
from husk.errors import GuestError
from husk.guest import protocol
from husk.guest.protocol import Decoder, Frame, FrameError, MsgType

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_PAYLOAD = 64

# -- decoder -------------------------------------------------------------------


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def decode(chunks: list[bytes], max_payload: int = SMALL_PAYLOAD) -> list[Any]:
    decoder = Decoder(max_payload=max_payload)
    out: list[Any] = []
    for chunk in chunks:
        items = decoder.feed(chunk)
        for item in items:
            assert isinstance(item, Frame | FrameError)
            if isinstance(item, Frame):
                assert len(item.payload) <= max_payload
        # A partial frame is all it keeps: never more than one frame's worth.
        assert len(decoder._buffer) < protocol.HEADER_SIZE + max_payload
        out += [
            (
                type(i).__name__,
                *(
                    (i.type, i.channel, i.payload)
                    if isinstance(i, Frame)
                    else (i.channel, i.reason)
                ),
            )
            for i in items
        ]
    return out


@FUZZ
@given(st.binary(max_size=2048), st.lists(st.integers(min_value=0), max_size=30))
def test_decoder_takes_any_bytes_split_anywhere(data: bytes, cuts: list[int]) -> None:
    whole = decode([data])
    assert decode(split(data, cuts)) == whole  # where the transport splits changes nothing


frames_strategy = st.lists(
    st.tuples(
        st.sampled_from(list(MsgType)),
        st.integers(min_value=0, max_value=protocol.MAX_CHANNEL),
        st.binary(max_size=SMALL_PAYLOAD),
    ),
    max_size=12,
)


@FUZZ
@given(frames_strategy, st.lists(st.integers(min_value=0), max_size=30))
def test_well_formed_streams_decode_exactly_however_split(
    frames: list[tuple[MsgType, int, bytes]], cuts: list[int]
) -> None:
    wire = b"".join(protocol.encode(t, ch, p) for t, ch, p in frames)
    assert decode(split(wire, cuts)) == [("Frame", t, ch, p) for t, ch, p in frames]


@FUZZ
@given(st.integers(min_value=SMALL_PAYLOAD + 1, max_value=2**32 - 1), st.binary(max_size=300))
def test_an_oversized_header_is_skipped_not_buffered(length: int, rest: bytes) -> None:
    wire = protocol.HEADER.pack(length, MsgType.STDOUT, 9) + rest
    items = decode(split(wire, [1, 5, 100]))
    assert items[0][0] == "FrameError"


# -- validators ------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


def near(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the expected field names and arbitrary values (deeper paths get hit)."""
    return st.dictionaries(st.sampled_from(keys), json_values, max_size=len(keys))


session_like = near(["channel", "kind", "pid", "emitted", "exit_code"]) | st.fixed_dictionaries(
    {
        "channel": st.integers(min_value=-5, max_value=2**33),
        "kind": st.sampled_from(["run", "exec", "archive", "evil"]),
        "pid": st.integers(min_value=-5, max_value=2**33),
    },
    optional={
        "emitted": st.dictionaries(st.sampled_from(["stdout", "stderr"]), json_values),
        "exit_code": json_values,
    },
)
process_like = near(["pid", "ppid", "uid", "time", "cmd"])

BODIES: dict[MsgType, st.SearchStrategy[Any]] = {
    MsgType.READY: json_values
    | st.fixed_dictionaries(
        {"version": st.just(protocol.PROTOCOL_VERSION) | json_values},
        optional={"sessions": st.lists(session_like, max_size=4) | json_values},
    ),
    MsgType.STARTED: json_values | near(["pid"]),
    MsgType.EXITED: json_values | near(["code"]),
    MsgType.ERROR: json_values | near(["message", "code"]),
    MsgType.STATS: json_values
    | st.dictionaries(st.sampled_from(["cpu_ns", "pids", "Bad key"]), json_values)
    | st.fixed_dictionaries({"processes": st.lists(process_like, max_size=3) | json_values}),
    MsgType.OK: json_values | near(["unix_ns", "address", "mac"]),
}

VALIDATORS: dict[MsgType, list[Callable[[Frame], Any]]] = {
    MsgType.READY: [messages.ready],
    MsgType.STARTED: [messages.started],
    MsgType.EXITED: [messages.exited],
    MsgType.ERROR: [lambda f: messages.error(f, "what")],
    MsgType.STATS: [messages.stats],
    MsgType.OK: [
        messages.ok,
        messages.time_reply,
        messages.network_reply,
        messages.network_config_reply,
    ],
}


def check_validators(frame: Frame) -> None:
    """Every validator gives a value or a typed error, for every message type."""
    for validators in VALIDATORS.values():
        for validate in validators:
            try:
                result = validate(frame)
            except MalformedMessage as exc:
                assert str(exc).startswith("guest agent ")
                continue
            except GuestRefused:
                continue
            if isinstance(result, GuestError):  # messages.error returns the error
                assert isinstance(result, GuestRefused | MalformedMessage)


@FUZZ
@given(st.data())
def test_validators_take_any_json_body(data: st.DataObject) -> None:
    frame_type = data.draw(st.sampled_from(list(BODIES)))
    body = data.draw(BODIES[frame_type])
    check_validators(Frame(frame_type, 1, json.dumps(body).encode()))


@FUZZ
@given(st.sampled_from(list(MsgType)), st.binary(max_size=200))
def test_validators_take_any_payload(frame_type: MsgType, payload: bytes) -> None:
    check_validators(Frame(frame_type, 1, payload))


@FUZZ
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "channel": st.integers(min_value=1, max_value=10**6),
                "kind": st.sampled_from(sorted(messages.SESSION_KINDS)),
                "pid": st.integers(min_value=1, max_value=messages.PID_MAX),
                "emitted": st.fixed_dictionaries(
                    {"stdout": st.integers(0, 2**40), "stderr": st.integers(0, 2**40)}
                ),
                "exit_code": st.none() | st.integers(0, 255),
            }
        ),
        max_size=5,
        unique_by=lambda s: s["channel"],
    )
)
def test_well_formed_ready_bodies_pass_unchanged(sessions: list[dict[str, Any]]) -> None:
    body = {"version": protocol.PROTOCOL_VERSION, "sessions": sessions, "unknown": [1]}
    ready = messages.ready(Frame(MsgType.READY, 0, json.dumps(body).encode()))
    assert ready.as_dict()["sessions"] == sessions


# -- the router --------------------------------------------------------------------


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        pass


class _Writer:
    """Stands in for the socket's writer: the router tests only read."""

    transport = _Transport()

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


OPENED = (3, 4)


async def route(chunks: list[bytes]) -> tuple[AgentConnection, dict[int, list[Frame]]]:
    reader = asyncio.StreamReader()
    connection = AgentConnection(reader, _Writer(), inbox_limit=1 << 30)  # type: ignore[arg-type]
    connection.complete_handshake(OPENED)
    connection.release(protocol.CONTROL_CHANNEL)
    for chunk in chunks:
        reader.feed_data(chunk)
        await asyncio.sleep(0)
        assert connection.buffered_bytes <= sum(map(len, chunks)) + 128 * 64
    reader.feed_eof()
    await asyncio.wait_for(connection.closed.wait(), 5)
    got: dict[int, list[Frame]] = {}
    for channel in OPENED:
        inbox = connection.open_channel(channel)
        frames = got.setdefault(channel, [])
        while len(inbox):
            frames.append(await inbox.get(1))
    assert connection._pump.done() and connection._pump.exception() is None
    await connection.close()
    return connection, got


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(MsgType)),
            st.sampled_from([0, 1, 2, 3, 4, 5, 2**32 - 1]),
            st.binary(max_size=100),
        ),
        max_size=20,
    ),
    st.lists(st.integers(min_value=0), max_size=20),
)
def test_router_queues_only_what_came_on_opened_channels(
    frames: list[tuple[MsgType, int, bytes]], cuts: list[int]
) -> None:
    wire = b"".join(protocol.encode(t, ch, p) for t, ch, p in frames)
    connection, got = asyncio.run(route(split(wire, cuts)))
    for channel in OPENED:
        expected = [Frame(t, ch, p) for t, ch, p in frames if ch == channel]
        assert got[channel] == expected
    others = [f for f in frames if f[1] not in OPENED]
    counters = connection.counters
    assert counters.unknown_frames + counters.late_frames == len(others)
    assert counters.unknown_bytes + counters.late_bytes == sum(len(p) for _, _, p in others)


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_router_survives_any_byte_stream(chunks: list[bytes]) -> None:
    _connection, got = asyncio.run(route(chunks))
    assert all(f.channel in OPENED for frames in got.values() for f in frames)
