"""The LAN switch (husk.network.switch) as a real process, driven through its real client.

Fake "QEMU" peers hold the other end of each port's socketpair and speak QEMU's stream
framing (u32 big-endian length + Ethernet frame). No VM.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from husk.network import fabric, framing, switchstate
from husk.network.switchclient import (
    SwitchClient,
    SwitchError,
    SwitchIdentity,
    SwitchUnavailable,
    stop_switch,
)

T = TypeVar("T")
BROADCAST = b"\xff" * 6
ETHERTYPE = b"\x88\xb5"  # "local experimental"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def mac(n: int) -> bytes:
    return bytes([0x02, 0x42, 0xAC, 0x12, 0x00, n])


class Peer:
    """A fake QEMU: its end of a LAN slot's socketpair, the other end for the switch."""

    def __init__(self, number: int) -> None:
        self.switch_end, self.sock = socket.socketpair()
        self.mac = mac(number)
        self.buffer = bytearray()
        self.closed = False

    def fd(self) -> int:
        return self.switch_end.fileno()

    def handed_over(self) -> None:
        """The switch has its duplicate: drop ours, so that its EOF reaches the peer."""
        self.switch_end.close()

    def send(self, dst: bytes, payload: bytes = b"hello") -> bytes:
        frame = dst + self.mac + ETHERTYPE + payload
        self.sock.sendall(framing.frame(frame))
        return frame

    def _take(self) -> list[bytes]:
        frames, used = framing.split_frames(self.buffer)
        del self.buffer[:used]
        return frames

    def _recv(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        if not data:
            self.closed = True
            return False
        self.buffer += data
        return True

    def expect(self, count: int, timeout: float = 5.0) -> list[bytes]:
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"peer {self.mac.hex()} got {len(got)} of {count} frames"
            self._recv(min(left, 0.5))
            got += self._take()
            assert not self.closed or len(got) >= count, "the switch closed the port"
        return got

    def quiet(self, wait: float = 0.3) -> list[bytes]:
        """Whatever arrives within ``wait`` seconds (expected: nothing)."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and self._recv(left):
            pass
        return self._take()

    def eof(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._recv(0.2)
        return self.closed

    def close(self) -> None:
        self.sock.close()
        if self.switch_end.fileno() >= 0:
            self.switch_end.close()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short: a unix socket path must stay under 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="hsw-", dir="/tmp"))
    os.chmod(directory, 0o700)
    yield directory
    stop_switch(directory, timeout=5.0)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def peers() -> Iterator[Callable[[int], Peer]]:
    made: list[Peer] = []

    def make(number: int) -> Peer:
        peer = Peer(number)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


async def plug(client: SwitchClient, owner: str, peer: Peer, network: str | None) -> str:
    (port,) = await client.add(owner, {1: peer.fd()}, {1: network})
    peer.handed_over()
    return port


async def wait_for(predicate: Callable[[], Coroutine[Any, Any, bool]], what: str) -> None:
    deadline = time.monotonic() + 5.0
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def process_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # our child when this test started it: reap it
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


# -- forwarding ----------------------------------------------------------------------------


def test_unicast_learned_and_broadcast_flooded_within_a_network(
    run_dir: Path, peers: Callable[[int], Peer]
) -> None:
    async def scenario() -> None:
        client = SwitchClient(run_dir)
        a, b, c = peers(1), peers(2), peers(3)
        for name, peer in (("a", a), ("b", b), ("c", c)):
            await plug(client, name, peer, "net1")

        sent = a.send(BROADCAST, b"who is there")
        assert b.expect(1) == [sent]
        assert c.expect(1) == [sent]
        assert a.quiet() == []  # never back to the sender

        # B answers A: A's MAC was learned from its broadcast, so only A gets it.
        reply = b.send(a.mac, b"B here")
        assert a.expect(1) == [reply]
        assert c.quiet() == []

        # B's MAC is now known: unicast to B reaches B alone, in order, several at once.
        burst = [a.send(b.mac, bytes([i]) * 100) for i in range(50)]
        assert b.expect(50) == burst
        assert c.quiet() == []

        # An unknown destination is flooded; multicast too.
        unknown = c.send(mac(99), b"anyone?")
        multicast = c.send(b"\x01\x00\x5e\x00\x00\x01", b"group")
        assert a.expect(2) == [unknown, multicast]
        assert b.expect(2) == [unknown, multicast]
        await client.close()

    run(scenario())


def test_networks_and_unattached_ports_see_nothing(
    run_dir: Path, peers: Callable[[int], Peer]
) -> None:
    async def scenario() -> None:
        client = SwitchClient(run_dir)
        a, b, other, loose = peers(1), peers(2), peers(3), peers(4)
        await plug(client, "a", a, "net1")
        await plug(client, "b", b, "net1")
        await plug(client, "other", other, "net2")
        await plug(client, "loose", loose, None)
        assert await client.ports() == {
            "a/1": "net1",
            "b/1": "net1",
            "other/1": "net2",
            "loose/1": None,
        }

        frame = a.send(BROADCAST)
        assert b.expect(1) == [frame]
        b.send(a.mac)  # A is learned on net1 only
        assert a.expect(1)
        other.send(BROADCAST)
        other.send(a.mac)  # a MAC learned on another network is not reachable from here
        loose.send(BROADCAST)
        loose.send(a.mac)
        assert other.quiet() == []
        assert loose.quiet() == []
        assert a.quiet() == []
        assert b.quiet() == []
        await client.close()

    run(scenario())


def test_attach_and_detach_move_a_port_between_networks(
    run_dir: Path, peers: Callable[[int], Peer]
) -> None:
    async def scenario() -> None:
        client = SwitchClient(run_dir)
        a, b, c = peers(1), peers(2), peers(3)
        await plug(client, "a", a, "net1")
        port_b = await plug(client, "b", b, "net1")
        await plug(client, "c", c, "net1")
        b.send(BROADCAST)  # A and C learn nothing, the switch learns B on net1
        a.expect(1)
        c.expect(1)

        await client.attach(port_b, "net2")
        assert (await client.ports())[port_b] == "net2"
        # B's old MAC entry went with it: unicast to B is flooded on net1, B gets nothing.
        frame = a.send(b.mac)
        assert c.expect(1) == [frame]
        assert b.quiet() == []

        await client.detach(port_b)
        assert (await client.ports())[port_b] is None
        b.send(BROADCAST)
        assert a.quiet() == [] and c.quiet() == []

        await client.attach(port_b, "net1")
        frame = a.send(BROADCAST)
        assert b.expect(1) == [frame]
        await client.close()

    run(scenario())


def test_peer_eof_removes_its_port_and_others_carry_on(
    run_dir: Path, peers: Callable[[int], Peer]
) -> None:
    async def scenario() -> None:
        client = SwitchClient(run_dir)
        a, b, c = peers(1), peers(2), peers(3)
        await plug(client, "a", a, "net1")
        await plug(client, "b", b, "net1")
        await plug(client, "c", c, "net1")
        b.send(BROADCAST)
        a.expect(1)
        c.expect(1)
        b.sock.close()  # the VM's QEMU went away

        async def b_gone() -> bool:
            return "b/1" not in await client.ports()

        await wait_for(b_gone, "b/1 to be removed")
        frame = a.send(b.mac)  # B's MAC was forgotten: flooded to C
        assert c.expect(1) == [frame]
        assert await client.remove("b") == []
        await client.close()

    run(scenario())


@pytest.mark.parametrize("length", [0, 13, framing.MAX_FRAME + 1, 0xFFFFFFFF])
def test_bad_frame_length_drops_only_that_port(
    run_dir: Path, peers: Callable[[int], Peer], length: int
) -> None:
    async def scenario() -> None:
        client = SwitchClient(run_dir)
        a, b, bad = peers(1), peers(2), peers(3)
        await plug(client, "a", a, "net1")
        await plug(client, "b", b, "net1")
        await plug(client, "bad", bad, "net1")
        bad.sock.sendall(framing.HEADER.pack(length) + b"\x00" * 64)
        assert bad.eof(), "the switch kept a port that sent a bad length"
        assert "bad/1" not in await client.ports()
        assert a.quiet() == [] and b.quiet() == []
        # The largest legal frame still goes through, whole.
        big = a.send(BROADCAST, b"\xab" * (framing.MAX_FRAME - 14))
        assert b.expect(1, timeout=10.0) == [big]
        await client.close()

    run(scenario())


def test_a_stalled_peer_loses_frames_but_never_stops_the_others(
    run_dir: Path, peers: Callable[[int], Peer]
) -> None:
    limit = 64 * 1024
    switch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "husk.network.switch",
            "--socket",
            str(run_dir / "switch.sock"),
            "--state",
            str(run_dir / "switch.json"),
            "--queue-limit",
            str(limit),
        ],
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while switchstate.read_record(run_dir / "switch.json") is None:
        assert switch.poll() is None and time.monotonic() < deadline, "the switch did not start"
        time.sleep(0.05)

    async def scenario() -> None:
        client = SwitchClient(run_dir)
        identity = await client.ensure()
        assert identity.pid == switch.pid
        a, b, stalled = peers(1), peers(2), peers(3)
        await plug(client, "a", a, "net1")
        await plug(client, "b", b, "net1")
        await plug(client, "stalled", stalled, "net1")  # never reads
        payload = b"\x5a" * 1400
        total = 0
        # 2000 broadcast frames, 2.8 MB: far more than the stalled peer's socket and queue
        # hold. Small batches: B's share always fits its socket buffer, so B loses nothing.
        for _ in range(100):
            sent = [a.send(BROADCAST, payload + total.to_bytes(4, "big")) for _ in range(20)]
            total += 20
            assert b.expect(20) == sent  # in order
        stats = await client.stats()
        assert stats["stalled/1"]["dropped"] > 0
        assert stats["stalled/1"]["queued"] <= limit + fabric.READ_BUFFER
        assert stats["b/1"]["dropped"] == 0
        assert stats["a/1"]["rx"] == total
        await client.close()

    try:
        run(scenario())
    finally:
        switch.terminate()
        switch.wait(10)


# -- lifetime and the client ---------------------------------------------------------------


def test_a_second_client_finds_the_same_switch_and_ports(
    run_dir: Path, peers: Callable[[int], Peer]
) -> None:
    """A restarted daemon (new client) adopts the running switch: LANs keep working."""
    a, b = peers(1), peers(2)

    async def first_daemon() -> SwitchIdentity:
        client = SwitchClient(run_dir)
        identity = await client.ensure()
        await plug(client, "a", a, "net1")
        await plug(client, "b", b, "net1")
        await client.close()
        return identity

    async def second_daemon() -> SwitchIdentity:
        client = SwitchClient(run_dir)
        identity = await client.ensure()
        assert await client.ports() == {"a/1": "net1", "b/1": "net1"}
        assert not client.restarted
        await client.close()
        return identity

    first = run(first_daemon())
    frame = a.send(BROADCAST)
    assert b.expect(1) == [frame]  # no client connected: still switching
    assert run(second_daemon()) == first
    record = switchstate.read_record(run_dir / "switch.json")
    assert record is not None and (record.pid, record.started) == (first.pid, first.started)


def test_client_reconnects_to_a_restarted_switch(
    run_dir: Path, peers: Callable[[int], Peer]
) -> None:
    async def scenario() -> None:
        client = SwitchClient(run_dir)
        before = await client.ensure()
        await plug(client, "a", peers(1), "net1")
        os.kill(before.pid, signal.SIGKILL)  # no clean-up: its socket and state file stay
        assert process_gone(before.pid, 5.0)
        # The next call notices the lost connection, starts a new switch and says so.
        assert await client.ports() == {}
        assert client.restarted
        assert client.identity is not None and client.identity.pid != before.pid
        record = switchstate.read_record(run_dir / "switch.json")
        assert record is not None and record.pid == client.identity.pid
        await client.close()

    run(scenario())


def test_every_call_has_a_deadline(run_dir: Path, peers: Callable[[int], Peer]) -> None:
    async def scenario() -> None:
        client = SwitchClient(run_dir, timeout=0.5)
        identity = await client.ensure()
        os.kill(identity.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(SwitchUnavailable, match=r"did not answer list within 0.5 s"):
                await client.ports()
            assert time.monotonic() - started < 3.0
        finally:
            os.kill(identity.pid, signal.SIGCONT)
        # The connection that timed out was dropped; the next call reconnects to the same one.
        assert await client.ports() == {}
        assert client.identity == identity and not client.restarted
        # Concurrent callers share the connection one request at a time.
        owners = [f"m{n}" for n in range(8)]
        await asyncio.gather(
            *(plug(client, owner, peers(n), "net1") for n, owner in enumerate(owners))
        )
        await asyncio.gather(*(client.attach(f"{owner}/1", "net2") for owner in owners))
        assert await client.ports() == {f"{owner}/1": "net2" for owner in owners}
        await client.close()

    run(scenario())


def test_refused_requests_raise_clear_errors(run_dir: Path, peers: Callable[[int], Peer]) -> None:
    async def scenario() -> None:
        client = SwitchClient(run_dir)
        a = peers(1)
        await plug(client, "a", a, "net1")
        again = peers(2)
        with pytest.raises(SwitchError, match="port 'a/1' already exists"):
            await client.add("a", {1: again.fd()}, {1: "net1"})
        again.handed_over()
        assert again.eof(), "the switch kept the descriptor of a refused add"
        with pytest.raises(SwitchError, match="no port 'zz/1'"):
            await client.attach("zz/1", "net1")
        assert await client.remove("a") == ["a/1"]
        assert a.eof()
        assert await client.ports() == {}
        await client.close()

    run(scenario())


def _raw_request(sock: socket.socket, line: bytes, fds: list[int] | None = None) -> dict[str, Any]:
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([line], ancillary)
    else:
        sock.sendall(line)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "the switch closed the control connection"
        reply += chunk
    result: dict[str, Any] = json.loads(reply)
    return result


def test_bad_control_input_gets_errors_and_the_switch_survives(
    run_dir: Path, peers: Callable[[int], Peer]
) -> None:
    async def start() -> SwitchIdentity:
        client = SwitchClient(run_dir)
        identity = await client.ensure()
        await client.close()
        return identity

    identity = run(start())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(run_dir / "switch.sock"))
    bad_lines = {
        b"not json\n": "one JSON object",
        b"[1, 2]\n": "JSON object",
        b'{"op": "explode"}\n': "unknown op",
        b"{}\n": "unknown op",
        b'{"op": "add", "owner": "x", "slots": [9]}\n': "slot 9",
        b'{"op": "add", "owner": "x/y", "slots": [1]}\n': "owner",
        b'{"op": "add", "owner": "x", "slots": [1, 1]}\n': "twice",
        b'{"op": "add", "owner": "x", "slots": [1]}\n': "1 slots but 0 descriptors",
        b'{"op": "attach", "port": 5, "network": "n"}\n': "port",
        b'{"op": "attach", "port": "x/1"}\n': "no port",
        b'{"op": "remove", "owner": ""}\n': "owner",
        b'\xff\xfe{"op"\n': "one JSON object",
    }
    for line, error in bad_lines.items():
        reply = _raw_request(sock, line)
        assert reply["ok"] is False and error in reply["error"], (line, reply)

    # Descriptors with the wrong request, or of the wrong kind, are refused and closed.
    peer = peers(1)
    reply = _raw_request(sock, b'{"op": "ping"}\n', [peer.fd()])
    assert reply["ok"] is False and "descriptors" in reply["error"]
    reply = _raw_request(sock, b'{"op": "add", "owner": "x", "slots": [1, 2]}\n', [peer.fd()])
    assert reply["ok"] is False and "2 slots but 1 descriptors" in reply["error"]
    peer.handed_over()
    assert peer.eof(), "the switch kept a refused descriptor"
    read_end, write_end = os.pipe()
    try:
        reply = _raw_request(sock, b'{"op": "add", "owner": "x", "slots": [1]}\n', [read_end])
        assert reply["ok"] is False and "not a socket" in reply["error"]
        datagram, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        reply = _raw_request(
            sock, b'{"op": "add", "owner": "x", "slots": [1]}\n', [datagram.fileno()]
        )
        assert reply["ok"] is False and "stream" in reply["error"]
        datagram.close()
        other.close()
    finally:
        os.close(read_end)
        os.close(write_end)

    # Random junk, line by line: an error for each, never a crash.
    junk = random.Random(12)
    for _ in range(100):
        line = bytes(junk.randrange(256) for _ in range(junk.randrange(1, 300)))
        for piece in line.split(b"\n"):
            reply = _raw_request(sock, piece + b"\n")
            assert reply["ok"] is False, (piece, reply)
    for shape in ({"op": "add", "owner": ["x"]}, {"op": "attach", "port": None}, {"op": 1}):
        assert _raw_request(sock, json.dumps(shape).encode() + b"\n")["ok"] is False

    # An overlong line: one error, the rest of it skipped, the connection still usable.
    sock.sendall(b"x" * (200 * 1024))
    reply = _raw_request(sock, b"x" * 1024)
    assert reply["ok"] is False and "longer than" in reply["error"]
    reply = _raw_request(sock, b'\n{"op": "ping"}\n')
    assert reply == {"ok": True, "pid": identity.pid, "started": identity.started}
    sock.close()

    async def still_there() -> None:
        client = SwitchClient(run_dir)
        assert await client.ensure() == identity
        assert await client.ports() == {}
        await client.close()

    run(still_there())


def test_idle_switch_exits_and_cleans_up(run_dir: Path, peers: Callable[[int], Peer]) -> None:
    async def scenario() -> SwitchIdentity:
        client = SwitchClient(run_dir, idle_exit=0.5)
        identity = await client.ensure()
        peer = peers(1)
        await plug(client, "a", peer, "net1")
        await client.close()
        await asyncio.sleep(1.5)  # a port keeps it running
        assert Path(f"/proc/{identity.pid}").exists()
        peer.sock.close()
        return identity

    identity = run(scenario())
    assert process_gone(identity.pid, 10.0), "the idle switch did not exit"
    assert not (run_dir / "switch.sock").exists()
    assert not (run_dir / "switch.json").exists()
    assert "idle" in (run_dir / "switch.log").read_text()


def test_one_switch_per_run_directory_and_stale_socket_replaced(run_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run_dir / "switch.sock"))
    stale.close()  # a dead switch's socket: nothing answers

    async def start() -> SwitchIdentity:
        client = SwitchClient(run_dir)
        identity = await client.ensure()
        await client.close()
        return identity

    identity = run(start())
    assert os.stat(run_dir / "switch.sock").st_mode & 0o777 == 0o600
    second = subprocess.run(
        [sys.executable, "-m", "husk.network.switch", "--socket", str(run_dir / "switch.sock")],
        capture_output=True,
        timeout=30,
    )
    assert second.returncode == 3, second.stderr
    assert b"another switch" in second.stderr
    assert Path(f"/proc/{identity.pid}").exists()


def test_never_replaces_a_socket_that_answers(run_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as someone:
        someone.bind(str(run_dir / "switch.sock"))
        someone.listen(1)
        result = subprocess.run(
            [sys.executable, "-m", "husk.network.switch", "--socket", str(run_dir / "switch.sock")],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 2
        assert b"already answers" in result.stderr
        assert (run_dir / "switch.sock").is_socket()


def test_refuses_to_replace_something_that_is_not_a_socket(run_dir: Path) -> None:
    (run_dir / "switch.sock").write_text("precious")
    result = subprocess.run(
        [sys.executable, "-m", "husk.network.switch", "--socket", str(run_dir / "switch.sock")],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert b"not a socket" in result.stderr
    assert (run_dir / "switch.sock").read_text() == "precious"


def test_stop_switch_spares_a_process_that_reused_the_pid(run_dir: Path) -> None:
    record = switchstate.SwitchRecord(
        pid=os.getpid(),
        started=(switchstate.process_start_ticks(os.getpid()) or 0) + 1,
        socket=str(run_dir / "switch.sock"),
    )
    switchstate.write_record(run_dir / "switch.json", record)
    previous = signal.signal(signal.SIGTERM, lambda *_: pytest.fail("signalled the wrong process"))
    try:
        assert stop_switch(run_dir) is False
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not (run_dir / "switch.json").exists()


def test_client_reports_a_switch_that_cannot_start(run_dir: Path) -> None:
    async def scenario() -> None:
        client = SwitchClient(run_dir, idle_exit=-1.0)  # the switch rejects it and exits
        with pytest.raises(SwitchError) as caught:
            await client.ensure()
        message = str(caught.value)
        assert "exited with code 2 while starting" in message
        assert "not a positive number" in message
        assert str(run_dir / "switch.log") in message

    run(scenario())


# -- the forwarding table, in process --------------------------------------------------------


def test_mac_table_stays_bounded() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        switch = fabric.Switch(loop, mac_limit=8)
        ends = [socket.socketpair() for _ in range(2)]
        ports = [switch.add_port(f"p/{i}", "p", ends[i][0]) for i in range(2)]
        for port in ports:
            switch.attach(port, "net")
        segment = switch.segments["net"]
        for n in range(200):
            ends[0][1].sendall(framing.frame(BROADCAST + bytes([2, 0, 0, 0, 1, n]) + ETHERTYPE))
            await asyncio.sleep(0)
        await asyncio.sleep(0.1)
        assert 0 < len(segment.current) <= 8 and len(segment.previous) <= 8
        switch.age()
        switch.age()
        assert not segment.current and not segment.previous
        switch.close()
        assert not switch.segments and not switch.ports
        for _, peer in ends:
            peer.close()

    run(scenario())
