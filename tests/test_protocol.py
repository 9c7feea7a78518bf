"""The wire codec shared by host and guest: round trips and hostile input."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from husk.guest import protocol
from husk.guest.protocol import Decoder, Frame, FrameError, MsgType, ProtocolError

SAMPLE_BODIES: dict[MsgType, dict[str, object]] = {
    MsgType.HELLO: {"version": 1},
    MsgType.READY: {"version": 1, "sessions": []},
    MsgType.RUN: {"argv": ["echo", "hello"], "env": ["A=1"], "cwd": "/", "user": "0:0"},
    MsgType.EXEC: {"argv": ["sh", "-c", "exit 42"], "tty": True},
    MsgType.SIGNAL: {"signal": 15},
    MsgType.STARTED: {"pid": 42},
    MsgType.EXITED: {"code": 137},
    MsgType.ERROR: {"message": "boom", "code": "error"},
    MsgType.FORWARD: {"port": 80, "protocol": "tcp"},
    MsgType.MOUNT: {"target": "/data", "fstype": "9p", "source": "vol0"},
    MsgType.STDIN_EOF: {},
    MsgType.SET_TIME: {"unix_ns": 1_700_000_000_000_000_000},
    MsgType.OVERLAY_CONFIG: {"address": "10.0.2.15/24", "gateway": "10.0.2.2"},
    MsgType.WIREGUARD: {"overlay_ip": "10.200.0.1", "prefix_len": 24, "peers": []},
    MsgType.STATS: {"cpu_ns": 1, "memory_used": 2},
    MsgType.RESIZE: {"rows": 24, "cols": 80},
    MsgType.CLOSE: {},
    MsgType.OK: {},
    MsgType.PREPARE: {"image": "husk-image", "upper": None, "hostname": "box"},
    MsgType.SHUTDOWN: {},
    MsgType.ARCHIVE: {"path": "/etc", "mode": "get"},
    MsgType.LISTEN: {"path": "/var/run/docker.sock", "mode": 0o660},
    MsgType.ACCEPT: {"listener": 3},
    MsgType.NETWORK: {"egress": True, "lans": [], "names": None},
    MsgType.RESOURCES: {"cgroup": {"memory.max": "67108864"}},
    MsgType.REHEARSE: {"image": "husk-image", "upper": "husk-upper", "argv": ["/bin/true"]},
    MsgType.STDIN_DISK: {"offset": 4096, "length": 4 * 1024 * 1024},
    MsgType.STDIN_DONE: {"offset": 4096, "length": 4 * 1024 * 1024},
}


def test_every_message_type_is_covered() -> None:
    assert set(SAMPLE_BODIES) | protocol.RAW_TYPES == set(MsgType)


@pytest.mark.parametrize("frame_type", list(SAMPLE_BODIES), ids=lambda t: t.name)
def test_json_messages_round_trip(frame_type: MsgType) -> None:
    body = SAMPLE_BODIES[frame_type]
    wire = protocol.encode_json(frame_type, 7, body)
    frames = Decoder().feed(wire)
    assert frames == [Frame(frame_type, 7, wire[protocol.HEADER_SIZE :])]
    frame = frames[0]
    assert isinstance(frame, Frame)
    assert frame.json() == body


@pytest.mark.parametrize("frame_type", sorted(protocol.RAW_TYPES), ids=lambda t: t.name)
def test_raw_messages_round_trip(frame_type: MsgType) -> None:
    data = bytes(range(256)) * (protocol.CHUNK_SIZE // 128 + 1)  # just over two chunks
    wire = b"".join(protocol.encode_data(frame_type, 3, data))
    frames = Decoder().feed(wire)
    assert all(isinstance(f, Frame) and f.type is frame_type for f in frames)
    assert len(frames) == 3
    assert b"".join(f.payload for f in frames if isinstance(f, Frame)) == data


def test_header_layout_is_length_type_channel() -> None:
    wire = protocol.encode(MsgType.STDOUT, 0x01020304, b"abc")
    assert wire == struct.pack(">IBI", 3, MsgType.STDOUT, 0x01020304) + b"abc"


def test_decoder_reassembles_byte_by_byte() -> None:
    wire = protocol.encode_json(MsgType.EXITED, 9, {"code": 7}) + protocol.encode(
        MsgType.STDERR, 9, b"x"
    )
    decoder = Decoder()
    out = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
    assert [f.type for f in out if isinstance(f, Frame)] == [MsgType.EXITED, MsgType.STDERR]
    assert decoder.pending == 0


def test_oversized_frame_is_skipped_and_stream_recovers() -> None:
    decoder = Decoder(max_payload=16)
    big = struct.pack(">IBI", 100, MsgType.STDOUT, 5) + b"z" * 100
    good = protocol.encode(MsgType.STDOUT, 5, b"ok")
    out = decoder.feed(big[:50]) + decoder.feed(big[50:] + good)
    assert isinstance(out[0], FrameError) and "exceeds" in out[0].reason
    assert out[1] == Frame(MsgType.STDOUT, 5, b"ok")


def test_unknown_type_is_reported_and_skipped() -> None:
    wire = struct.pack(">IBI", 2, 250, 4) + b"??" + protocol.encode(MsgType.CLOSE, 4, b"{}")
    out = Decoder().feed(wire)
    assert isinstance(out[0], FrameError) and out[0].channel == 4
    assert isinstance(out[1], Frame) and out[1].type is MsgType.CLOSE


@pytest.mark.parametrize(
    ("frame_type", "payload", "complaint"),
    [
        (MsgType.RUN, b"not json", "not valid JSON"),
        (MsgType.RUN, b"[1,2]", "not a JSON object"),
        (MsgType.RUN, b'{"argv": []}', "non-empty argv"),
        (MsgType.RUN, b'{"argv": "sh"}', "wrong type"),
        (MsgType.SIGNAL, b"{}", "lacks field 'signal'"),
        (MsgType.SIGNAL, b'{"signal": true}', "wrong type"),
        (MsgType.EXITED, b"\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_json_raises_protocol_error(
    frame_type: MsgType, payload: bytes, complaint: str
) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        Frame(frame_type, 1, payload).json()


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ProtocolError):
        protocol.encode(MsgType.STDOUT, 1, b"x" * (protocol.MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError):
        protocol.encode(MsgType.STDOUT, -1, b"")
    with pytest.raises(ProtocolError):
        protocol.encode_json(MsgType.RUN, 1, {"argv": []})
    with pytest.raises(ProtocolError):
        protocol.encode_json(MsgType.STDOUT, 1, {})


def test_deeply_nested_json_is_a_protocol_error() -> None:
    payload = ("[" * 100_000 + "]" * 100_000).encode()
    with pytest.raises(ProtocolError):
        Frame(MsgType.RUN, 1, payload).json()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_decoder_never_raises_on_garbage(chunks: list[bytes]) -> None:
    decoder = Decoder(max_payload=32)
    for chunk in chunks:
        for item in decoder.feed(chunk):
            assert isinstance(item, Frame | FrameError)
            if isinstance(item, Frame):
                assert len(item.payload) <= 32
                if item.type not in protocol.RAW_TYPES:
                    with contextlib.suppress(ProtocolError):
                        item.json()


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([t for t in MsgType if t not in protocol.RAW_TYPES]),
    st.integers(min_value=0, max_value=protocol.MAX_CHANNEL),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4),
)
def test_arbitrary_json_bodies_round_trip_or_fail_cleanly(
    frame_type: MsgType, channel: int, body: dict[str, object]
) -> None:
    payload = json.dumps(body).encode()
    wire = protocol.encode(frame_type, channel, payload)
    (frame,) = Decoder().feed(wire)
    assert isinstance(frame, Frame) and frame.channel == channel
    with contextlib.suppress(ProtocolError):
        assert frame.json() == body


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_truncated_streams_hold_back_partial_frames(data: bytes, cut: int) -> None:
    wire = b"".join(protocol.encode_data(MsgType.DATA, 2, data))
    decoder = Decoder()
    first = decoder.feed(wire[:-cut] if cut < len(wire) else b"")
    rest = decoder.feed(wire[-cut:] if cut < len(wire) else wire)
    frames = [f for f in first + rest if isinstance(f, Frame)]
    assert b"".join(f.payload for f in frames) == data
