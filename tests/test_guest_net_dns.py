"""The guest agent's embedded resolver, on the host: its packet code and the server itself.

dnswire is pure; the Resolver runs on the agent's own loop with real UDP sockets on
127.0.0.1 (a fake upstream on another loopback port), nothing beyond the loopback.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from husk.guest.agent import dnswire
from husk.guest.agent.loop import Loop
from husk.guest.agent.resolver import MAX_IN_FLIGHT, Resolver


def query(name: str, qtype: int = dnswire.TYPE_A, ident: int = 0x1234, rd: bool = True) -> bytes:
    flags = dnswire.RD if rd else 0
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split(".") if part)
    return (
        dnswire.HEADER.pack(ident, flags, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack(">HH", qtype, dnswire.CLASS_IN)
    )


def answers(packet: bytes) -> tuple[int, int, list[str]]:
    """(message id, rcode, A record addresses) of a reply with one question."""
    ident, flags, qdcount, ancount, _ns, _ar = dnswire.HEADER.unpack_from(packet)
    assert flags & dnswire.QR and qdcount == 1
    _name, offset = dnswire._read_name(packet, dnswire.HEADER_SIZE)
    offset += 4
    found = []
    for _ in range(ancount):
        pointer, rtype, _class, _ttl, length = struct.unpack_from(">HHHIH", packet, offset)
        assert pointer == 0xC00C
        offset += 12
        if rtype == dnswire.TYPE_A:
            found.append(socket.inet_ntoa(packet[offset : offset + length]))
        offset += length
    return ident, flags & 0xF, found


# -- packets ---------------------------------------------------------------------------------


def test_a_query_parses_and_is_answered_with_its_question_and_id() -> None:
    parsed = dnswire.parse_query(query("Web.Example.", ident=77))
    assert (parsed.name, parsed.qtype, parsed.ident) == ("Web.Example", dnswire.TYPE_A, 77)
    reply = dnswire.answer(parsed, ["172.18.0.3", "172.18.0.4"])
    assert answers(reply) == (77, dnswire.NOERROR, ["172.18.0.3", "172.18.0.4"])
    flags = struct.unpack_from(">H", reply, 2)[0]
    assert flags & dnswire.AA and flags & dnswire.RD  # authoritative, RD echoed
    # The question is echoed byte for byte (clients match it).
    assert reply[12 : 12 + len(parsed.question)] == parsed.question


def test_other_types_get_an_empty_answer() -> None:
    parsed = dnswire.parse_query(query("web", qtype=28))  # AAAA
    assert answers(dnswire.answer(parsed, ["172.18.0.3"])) == (0x1234, dnswire.NOERROR, [])


def test_answers_stay_within_512_bytes() -> None:
    parsed = dnswire.parse_query(query("many"))
    reply = dnswire.answer(parsed, [f"10.0.{i // 256}.{i % 256}" for i in range(200)])
    assert len(reply) <= dnswire.MAX_UDP
    assert 0 < len(answers(reply)[2]) < 200


@pytest.mark.parametrize(
    "packet, problem",
    [
        (b"", "shorter"),
        (b"\x00" * 11, "shorter"),
        (dnswire.HEADER.pack(1, dnswire.QR, 1, 0, 0, 0) + b"\0\0\1\0\1", "response"),
        (dnswire.HEADER.pack(1, 0x2800, 1, 0, 0, 0) + b"\0\0\1\0\1", "standard"),  # UPDATE
        (dnswire.HEADER.pack(1, 0, 2, 0, 0, 0) + b"\0\0\1\0\1" * 2, "questions"),
        (dnswire.HEADER.pack(1, 0, 1, 0, 0, 0) + b"\xc0\x0c\0\1\0\1", "compressed"),
        (dnswire.HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x05ab", "past the end"),
        (dnswire.HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x03abc", "past the end"),
        (dnswire.HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x03abc\0\0", "no type"),
        (dnswire.HEADER.pack(1, 0, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 5, "255"),
    ],
)
def test_malformed_queries_are_refused_by_name(packet: bytes, problem: str) -> None:
    with pytest.raises(dnswire.DnsError, match=problem):
        dnswire.parse_query(packet)


def test_hostile_bytes_only_ever_raise_dns_error() -> None:
    rng = random.Random(12)
    valid = query("some.name.example")
    for _ in range(5000):
        packet = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            packet[rng.randrange(len(packet))] = rng.randrange(256)
        packet = packet[: rng.randint(0, len(packet))] if rng.random() < 0.3 else packet
        try:
            parsed = dnswire.parse_query(bytes(packet))
        except dnswire.DnsError:
            reply = dnswire.error_reply(bytes(packet), dnswire.FORMERR)
            assert reply is None or len(reply) == dnswire.HEADER_SIZE
            continue
        dnswire.answer(parsed, ["1.2.3.4"])
    for _ in range(2000):
        junk = os.urandom(rng.randint(0, 300))
        with contextlib.suppress(dnswire.DnsError):
            dnswire.parse_query(junk)


def test_a_response_is_never_answered() -> None:
    response = dnswire.HEADER.pack(9, dnswire.QR, 0, 0, 0, 0)
    assert dnswire.error_reply(response, dnswire.FORMERR) is None
    reply = dnswire.error_reply(dnswire.HEADER.pack(9, dnswire.RD, 5, 0, 0, 0), dnswire.FORMERR)
    assert reply is not None and struct.unpack_from(">HH", reply) == (
        9,
        dnswire.QR | dnswire.RD | dnswire.RA | dnswire.FORMERR,
    )


def test_upstream_replies_must_match_id_and_question() -> None:
    parsed = dnswire.parse_query(query("far.example"))
    reply = dnswire.answer(parsed, ["9.9.9.9"])
    renumbered = dnswire.relay_reply(reply, 4242)
    assert dnswire.is_reply_to(renumbered, 4242, parsed.question)
    assert not dnswire.is_reply_to(renumbered, 4243, parsed.question)
    other = dnswire.parse_query(query("elsewhere.example"))
    assert not dnswire.is_reply_to(renumbered, 4242, other.question)
    assert not dnswire.is_reply_to(query("far.example", ident=4242), 4242, parsed.question)


# -- the resolver on the agent's loop --------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[Loop]:
    agent_loop = Loop()
    yield agent_loop
    signal.set_wakeup_fd(-1)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ask(loop: Loop, port: int, packet: bytes, timeout: float = 5.0) -> bytes | None:
    """Sends ``packet`` to the resolver and runs the loop until a reply (None: none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.setblocking(False)
        client.sendto(packet, ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            loop.call_later(0.02, lambda: None)  # run_once returns by then at the latest
            loop.run_once()
            try:
                return client.recv(65535)
            except BlockingIOError:
                continue
    return None


def test_the_resolver_answers_its_names_case_insensitively(loop: Loop) -> None:
    port = free_port()
    resolver = Resolver(loop, "127.0.0.1", port)
    resolver.update({"Web": ["172.18.0.3"]}, [])
    resolver.start()
    try:
        for name in ("web", "WEB.", "wEb"):
            reply = ask(loop, port, query(name, ident=5))
            assert reply is not None and answers(reply) == (5, dnswire.NOERROR, ["172.18.0.3"])
        reply = ask(loop, port, query("web", qtype=28))
        assert reply is not None and answers(reply)[1:] == (dnswire.NOERROR, [])
        reply = ask(loop, port, b"\x00\x07garbage-that-is-no-query")
        assert reply is not None and struct.unpack_from(">H", reply)[0] == 7
        assert struct.unpack_from(">H", reply, 2)[0] & 0xF == dnswire.FORMERR
        assert ask(loop, port, b"tiny", timeout=0.3) is None  # not even a header
    finally:
        resolver.stop()


def test_unknown_names_are_forwarded_and_failures_are_servfail(loop: Loop) -> None:
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.setblocking(False)
    served: list[str] = []

    def serve() -> None:
        packet, peer = upstream.recvfrom(65535)
        parsed = dnswire.parse_query(packet)
        served.append(parsed.name)
        if parsed.name == "silent.example":
            return  # never answers: the resolver's deadline must fire
        # A stray reply with the wrong id first: ignored by the resolver.
        upstream.sendto(dnswire.relay_reply(dnswire.answer(parsed, ["6.6.6.6"]), 1), peer)
        upstream.sendto(dnswire.answer(parsed, ["9.9.9.9"]), peer)

    loop.add_reader(upstream.fileno(), serve)
    port = free_port()
    resolver = Resolver(loop, "127.0.0.1", port)
    resolver.upstream_port = upstream.getsockname()[1]
    resolver.update({"web": ["172.18.0.3"]}, ["127.0.0.1"])
    resolver.start()
    try:
        reply = ask(loop, port, query("far.example", ident=31))
        assert reply is not None and answers(reply) == (31, dnswire.NOERROR, ["9.9.9.9"])
        started = time.monotonic()
        reply = ask(loop, port, query("silent.example", ident=32), timeout=10)
        assert reply is not None and answers(reply)[:2] == (32, dnswire.SERVFAIL)
        assert time.monotonic() - started < 5
        assert served == ["far.example", "silent.example"]
        # Nobody listening upstream: refused at once, SERVFAIL.
        resolver.upstream_port = free_port()
        reply = ask(loop, port, query("gone.example", ident=33), timeout=5)
        assert reply is not None and answers(reply)[:2] == (33, dnswire.SERVFAIL)
        assert resolver._pending == {}
    finally:
        resolver.stop()
        loop.forget(upstream.fileno())
        upstream.close()


def test_forwarded_queries_in_flight_are_bounded(loop: Loop) -> None:
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))  # receives, never answers
    port = free_port()
    resolver = Resolver(loop, "127.0.0.1", port)
    resolver.upstream_port = upstream.getsockname()[1]
    resolver.update({}, ["127.0.0.1"])
    resolver.start()
    try:
        replies: list[bytes] = []
        client = replies.append
        for index in range(MAX_IN_FLIGHT):
            assert resolver.handle(query(f"n{index}.example"), client) is None
        over = resolver.handle(query("one-too-many.example", ident=44), client)
        assert over is not None and answers(over)[:2] == (44, dnswire.SERVFAIL)
        assert len(resolver._pending) == MAX_IN_FLIGHT
        resolver.stop()
        assert resolver._pending == {} and not resolver.running and replies == []
    finally:
        resolver.stop()
        upstream.close()


def test_tcp_clients_get_length_prefixed_answers(loop: Loop) -> None:
    port = free_port(socket.SOCK_STREAM)
    resolver = Resolver(loop, "127.0.0.1", port)
    resolver.update({"web": ["172.18.0.3"]}, [])
    resolver.start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.setblocking(False)
            # Two queries, the second split across two sends.
            queries = (query("web", ident=1), query("WEB", ident=2))
            stream = b"".join(struct.pack(">H", len(q)) + q for q in queries)
            received = b""
            deadline = time.monotonic() + 5
            for part in (stream[:-5], stream[-5:], b""):
                client.sendall(part)
                while time.monotonic() < deadline and len(_messages(received)) < 2:
                    loop.call_later(0.02, lambda: None)
                    loop.run_once()
                    with contextlib.suppress(BlockingIOError):
                        received += client.recv(65535)
                    if part and len(_messages(received)) == 1:
                        break
            first, second = _messages(received)
            assert answers(first) == (1, dnswire.NOERROR, ["172.18.0.3"])
            assert answers(second) == (2, dnswire.NOERROR, ["172.18.0.3"])
        # A client that sends a huge length and never completes it is dropped, not kept.
        with socket.create_connection(("127.0.0.1", port)) as greedy:
            greedy.sendall(b"\xff\xff" + b"x" * 100)
            for _ in range(10):
                loop.call_later(0.02, lambda: None)
                loop.run_once()
            assert len(resolver._tcp_clients) == 1  # waiting for the rest, within its bounds
    finally:
        resolver.stop()
    assert resolver._tcp_clients == {}


def _messages(stream: bytes) -> list[bytes]:
    found = []
    while len(stream) >= 2:
        (length,) = struct.unpack_from(">H", stream)
        if len(stream) < 2 + length:
            break
        found.append(stream[2 : 2 + length])
        stream = stream[2 + length :]
    return found
