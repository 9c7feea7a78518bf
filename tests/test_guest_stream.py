"""The guest agent's byte paths, on the host (no VM): a process's output framed without
copies, the history a reconnecting host replays from, stdin into the process's pipe, and
the port's batched reads and writes (readv/writev), against pipes and a FIFO."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from husk.guest import protocol
from husk.guest.agent import sessions
from husk.guest.agent.loop import Loop
from husk.guest.agent.port import Port
from husk.guest.agent.sessions import ProcessSession
from husk.guest.protocol import Frame, FrameError, MsgType

F_SETPIPE_SZ = 1031


@pytest.fixture
def loop() -> Iterator[Loop]:
    made = Loop()  # sets the signal wake-up fd: undone after the test
    try:
        yield made
    finally:
        signal.set_wakeup_fd(-1)


def _pattern(size: int, seed: int = 0) -> bytes:
    """Bytes whose every MiB differs, so a lost, doubled or reordered piece shows."""
    block = bytes((seed + i * 7) % 251 for i in range(65536))
    return b"".join(i.to_bytes(8, "big") + block[8:] for i in range(size // 65536 + 1))[:size]


def _frames(wire: bytes) -> list[Frame]:
    decoder = protocol.Decoder()
    items = decoder.feed(wire)
    assert decoder.pending == 0, "the output ends inside a frame"
    assert not [item for item in items if isinstance(item, FrameError)]
    return [item for item in items if isinstance(item, Frame)]


def _session(loop: Loop, sent: list[bytes], fds: dict[str, int]) -> ProcessSession:
    return ProcessSession(loop, sent.append, "exec", 7, os.getpid(), fds, lambda _: None)


def test_output_is_complete_in_order_and_in_bounded_frames(loop: Loop) -> None:
    read_end, write_end = os.pipe2(os.O_NONBLOCK)
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 1 << 20)
    sent: list[bytes] = []
    session = _session(loop, sent, {"stdout": read_end})
    data = _pattern(9 * (1 << 20) + 12345)
    view = memoryview(data)
    position = 0
    try:
        while position < len(data):
            with contextlib.suppress(BlockingIOError):
                position += os.write(write_end, view[position : position + (1 << 20)])
            session._read("stdout")
    finally:
        os.close(write_end)
    session._read("stdout")  # the rest, then end of file
    frames = _frames(b"".join(bytes(piece) for piece in sent))
    assert all(frame.type is MsgType.STDOUT and frame.channel == 7 for frame in frames)
    assert all(0 < len(frame.payload) <= protocol.MAX_PAYLOAD for frame in frames)
    assert b"".join(frame.payload for frame in frames) == data
    assert session.emitted["stdout"] == len(data)


def test_replay_sends_the_kept_tail_from_the_hosts_offset(loop: Loop) -> None:
    read_end, write_end = os.pipe2(os.O_NONBLOCK)
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 1 << 20)
    sent: list[bytes] = []
    session = _session(loop, sent, {"stdout": read_end})
    data = _pattern(7 * (1 << 20), seed=3)
    for start in range(0, len(data), 1 << 19):
        os.write(write_end, data[start : start + (1 << 19)])
        session._read("stdout")
    os.close(write_end)
    sent.clear()

    offset = len(data) - 100_000
    session.replay({"stdout": offset})
    assert b"".join(frame.payload for frame in _frames(b"".join(sent))) == data[offset:]

    sent.clear()
    session.replay({"stdout": 0})  # older than what is kept: from the oldest kept byte
    replayed = b"".join(frame.payload for frame in _frames(b"".join(sent)))
    assert sessions.RETAINED_OUTPUT <= len(replayed) < len(data)
    assert replayed == data[len(data) - len(replayed) :]

    sent.clear()
    session.replay({"stdout": len(data)})  # the host has it all: nothing to send
    assert sent == []


def test_stdin_reaches_the_pipe_whole_when_the_pipe_fills(loop: Loop) -> None:
    read_end, write_end = os.pipe2(os.O_NONBLOCK)
    sent: list[bytes] = []
    session = _session(loop, sent, {"stdin": write_end})
    data = _pattern(300_000, seed=5)
    received = bytearray()
    for start in range(0, len(data), 100_000):  # more than the 64 KiB pipe holds
        session.write_stdin(data[start : start + 100_000])
    session.close_stdin()
    while len(received) < len(data):
        received += os.read(read_end, 1 << 20)
        session._flush_stdin()
    assert bytes(received) == data
    assert os.read(read_end, 10) == b"", "stdin is closed once everything is written"
    os.close(read_end)


def _done_frames(sent: list[bytes]) -> list[tuple[int, int]]:
    found = []
    for frame in _frames(b"".join(bytes(piece) for piece in sent)):
        assert frame.type is MsgType.STDIN_DONE and frame.channel == 7
        body = frame.json()
        found.append((body["offset"], body["length"]))
    return found


@pytest.mark.parametrize("splice", [True, False])
def test_stdin_from_the_transfer_ring_keeps_order_and_answers_each_range_once_piped(
    loop: Loop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, splice: bool
) -> None:
    """STDIN_DISK ranges and STDIN bytes reach the pipe in the order sent, each range is
    answered STDIN_DONE only once all of it is in the pipe (the host then reuses the
    place), by splice or, where the kernel refuses that, through the bounce buffer."""
    if not splice:

        def refused(*args: object, **kwargs: object) -> int:
            raise OSError(22, "Invalid argument")

        monkeypatch.setattr(os, "splice", refused)
    ring = _pattern(4 * 1024 * 1024, seed=9)
    (tmp_path / "ring").write_bytes(ring)
    source = os.open(tmp_path / "ring", os.O_RDONLY)
    read_end, write_end = os.pipe2(os.O_NONBLOCK)  # 64 KiB: every range fills it
    sent: list[bytes] = []
    session = _session(loop, sent, {"stdin": write_end})
    ranges = [(1 << 20, 512 * 1024), (0, 3 * 4096), (2 << 20, 1 << 20)]
    expected = bytearray()
    try:
        session.write_stdin(b"head")
        expected += b"head"
        for offset, length in ranges:
            session.stdin_from_disk(source, offset, length)
            expected += ring[offset : offset + length]
        session.write_stdin(b"tail")
        expected += b"tail"
        session.close_stdin()
        received = bytearray()
        while len(received) < len(expected):
            received += os.read(read_end, 1 << 20)
            answered = _done_frames(sent)
            # Answered in order, and never before its last byte could be in the pipe.
            assert answered == ranges[: len(answered)]
            session._flush_stdin()
        assert bytes(received) == bytes(expected)
        assert _done_frames(sent) == ranges
        assert os.read(read_end, 10) == b"", "stdin is closed once everything is written"
    finally:
        os.close(read_end)
        os.close(source)


def test_ranges_a_process_will_never_read_are_answered_at_once(loop: Loop, tmp_path: Path) -> None:
    """A process that closed its stdin (or exited) frees the host's ring at once: the
    queued range and every later one are answered, nothing waits for a reader."""
    (tmp_path / "ring").write_bytes(bytes(1 << 20))
    source = os.open(tmp_path / "ring", os.O_RDONLY)
    read_end, write_end = os.pipe2(os.O_NONBLOCK)
    sent: list[bytes] = []
    session = _session(loop, sent, {"stdin": write_end})
    try:
        session.stdin_from_disk(source, 0, 512 * 1024)  # more than the pipe takes
        assert _done_frames(sent) == []
        os.close(read_end)  # the reader goes away: EPIPE
        session._flush_stdin()
        assert _done_frames(sent) == [(0, 512 * 1024)]
        session.stdin_from_disk(source, 4096, 4096)
        session.close_stdin()
        session.stdin_from_disk(source, 8192, 4096)
        assert _done_frames(sent) == [(0, 512 * 1024), (4096, 4096), (8192, 4096)]
    finally:
        os.close(source)


def test_port_writes_every_frame_in_order_and_decodes_batched_reads(
    loop: Loop, tmp_path: Path
) -> None:
    fifo = tmp_path / "port"
    os.mkfifo(fifo)
    frames: list[Frame] = []
    bad: list[FrameError] = []
    port = Port(loop, str(fifo), frames.append, bad.append, lambda _: None)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 1 << 20)
        payloads = [_pattern(size, seed) for seed, size in enumerate((9, 40_000, 1 << 20, 70_001))]
        wire = b"".join(protocol.encode(MsgType.STDOUT, 3, payload) for payload in payloads)
        for payload in payloads:  # a header and its payload as separate sends, as sessions do
            port.send(protocol.HEADER.pack(len(payload), int(MsgType.STDOUT), 3))
            port.send(payload)
        written = bytearray()
        while len(written) < len(wire):
            written += os.read(reader, 1 << 20)
            port._flush()
        assert bytes(written) == wire
        assert port.buffered == 0

        # The port's own reads: everything written into the FIFO, decoded at once.
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            incoming = wire[: len(wire) - 5]  # the last frame not complete yet
            os.write(writer, incoming[: 1 << 20])
            port._readable()
            os.write(writer, incoming[1 << 20 :])
            port._readable()
            assert [frame.payload for frame in frames] == payloads[:-1]
            os.write(writer, wire[len(wire) - 5 :])
            port._readable()
        finally:
            os.close(writer)
        assert [frame.payload for frame in frames] == payloads
        assert bad == []
    finally:
        os.close(reader)


def test_a_reaped_process_is_never_signalled_again(loop: Loop) -> None:
    """Once the agent has reaped a session's process its pid is free for reuse: a late
    kill (a client's stop racing the exit) must not reach whoever holds that pid now."""
    import subprocess

    stranger = subprocess.Popen(["sleep", "30"])  # stands for the pid's next owner
    try:
        session = ProcessSession(loop, [].append, "run", 3, stranger.pid, {}, lambda _: None)
        session.exited(0)  # reaped (as far as the session knows)
        session.signal(signal.SIGKILL)
        assert stranger.poll() is None  # still alive
        session = ProcessSession(loop, [].append, "run", 3, stranger.pid, {}, lambda _: None)
        session.signal(signal.SIGTERM)  # not reaped yet: it goes through
        assert stranger.wait(timeout=10) == -signal.SIGTERM
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize(
    "body",
    [
        {"offset": 1, "length": 4096},
        {"offset": 0, "length": 100},
        {"offset": 0, "length": 0},
        {"offset": -4096, "length": 4096},
        {"offset": 0, "length": 128 * 1024 * 1024},
        {"offset": 0, "length": "4096"},
    ],
)
def test_the_agent_refuses_a_transfer_range_it_could_not_read_safely(
    loop: Loop, monkeypatch: pytest.MonkeyPatch, body: dict[str, object]
) -> None:
    """STDIN_DISK is checked before the device is touched: unaligned, empty, negative or
    oversized ranges (and wrong types) are an ERROR on the channel, nothing more."""
    from husk.guest.agent import system
    from husk.guest.agent.main import Agent

    agent = Agent(loop)
    sent: list[bytes] = []
    monkeypatch.setattr(agent, "send", sent.append)
    read_end, write_end = os.pipe2(os.O_NONBLOCK)
    agent.sessions[9] = _session(loop, sent, {"stdin": write_end})  # a process to feed
    looked_up: list[str] = []

    def device(serial: str) -> str:
        looked_up.append(serial)
        raise system.SystemError_("no disk in this test")

    monkeypatch.setattr(system, "block_device_for_serial", device)
    try:
        agent.on_frame(Frame(MsgType.STDIN_DISK, 9, json.dumps(body).encode()))
        (answer,) = _frames(b"".join(sent))
        assert answer.type is MsgType.ERROR and looked_up == []
        assert agent._transfer_fd == -1
        # The same channel with a sound range does go for the device.
        agent.on_frame(Frame(MsgType.STDIN_DISK, 9, b'{"offset":4096,"length":8192}'))
        assert looked_up == [protocol.TRANSFER_SERIAL]
    finally:
        os.close(read_end)
        os.close(write_end)
