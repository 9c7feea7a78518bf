"""DNS messages for the agent's embedded resolver: parsing queries, building answers.

Pure functions on bytes (standard library only), tested on the host. Every packet comes
from the workload, which is root in the guest: parsing is bounded and raises
:class:`DnsError` (a ValueError) on anything malformed, never anything else.
"""

from __future__ import annotations

import socket
import struct

HEADER = struct.Struct(">HHHHHH")
HEADER_SIZE = HEADER.size
MAX_NAME_BYTES = 255
MAX_LABEL = 63
MAX_UDP = 512
"""Answers without EDNS fit in 512 bytes (RFC 1035); ours stay far below."""

QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080

TYPE_A = 1
CLASS_IN = 1

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5


class DnsError(ValueError):
    """The packet is not a DNS query this resolver can read."""


class Query:
    """One question: its message id, flags, name (as asked, without the final dot) and type."""

    __slots__ = ("flags", "ident", "name", "qclass", "qtype", "question")

    def __init__(
        self, ident: int, flags: int, name: str, qtype: int, qclass: int, question: bytes
    ) -> None:
        self.ident = ident
        self.flags = flags
        self.name = name
        self.qtype = qtype
        self.qclass = qclass
        self.question = question
        """The question section as sent (name, type, class): echoed in the answer."""


def _read_name(packet: bytes, offset: int) -> tuple[str, int]:
    """The uncompressed name at ``offset`` and the offset after it."""
    labels: list[str] = []
    total = 0
    while True:
        if offset >= len(packet):
            raise DnsError("the name runs past the end of the packet")
        length = packet[offset]
        offset += 1
        if length == 0:
            break
        if length > MAX_LABEL:
            # 0xC0..: a compression pointer, which a question has no reason to use.
            raise DnsError("compressed or oversized label in the question")
        total += length + 1
        if total > MAX_NAME_BYTES:
            raise DnsError("the name is longer than 255 bytes")
        label = packet[offset : offset + length]
        if len(label) != length:
            raise DnsError("a label runs past the end of the packet")
        labels.append(label.decode("latin-1"))
        offset += length
    return ".".join(labels), offset


def parse_query(packet: bytes) -> Query:
    """The single question of a standard query; DnsError if it is anything else."""
    if len(packet) < HEADER_SIZE:
        raise DnsError("shorter than a DNS header")
    ident, flags, qdcount, _an, _ns, _ar = HEADER.unpack_from(packet)
    if flags & QR:
        raise DnsError("a response, not a query")
    if flags & OPCODE_MASK:
        raise DnsError("not a standard query")
    if qdcount != 1:
        raise DnsError(f"{qdcount} questions (exactly one is supported)")
    name, end = _read_name(packet, HEADER_SIZE)
    if end + 4 > len(packet):
        raise DnsError("the question has no type and class")
    qtype, qclass = struct.unpack_from(">HH", packet, end)
    return Query(ident, flags, name, qtype, qclass, packet[HEADER_SIZE : end + 4])


def error_reply(packet: bytes, rcode: int) -> bytes | None:
    """A bare reply with ``rcode`` to a packet that could not be read (None: not even
    a header, or itself a response, which must never be answered)."""
    if len(packet) < HEADER_SIZE:
        return None
    ident, flags = struct.unpack_from(">HH", packet)
    if flags & QR:
        return None
    reply_flags = QR | (flags & (OPCODE_MASK | RD)) | RA | (rcode & 0xF)
    return HEADER.pack(ident, reply_flags, 0, 0, 0, 0)


def answer(query: Query, addresses: list[str], *, rcode: int = NOERROR, ttl: int = 600) -> bytes:
    """The authoritative reply to ``query``: an A record per address (none: empty answer)."""
    records = b""
    count = 0
    if query.qtype == TYPE_A and query.qclass == CLASS_IN and rcode == NOERROR:
        for address in addresses:
            # 0xC00C: a pointer to the question's name, right after the header.
            record = struct.pack(">HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl, 4)
            candidate = record + socket.inet_aton(address)
            if HEADER_SIZE + len(query.question) + len(records) + len(candidate) > MAX_UDP:
                break
            records += candidate
            count += 1
    flags = QR | AA | (query.flags & RD) | RA | (rcode & 0xF)
    return HEADER.pack(query.ident, flags, 1, count, 0, 0) + query.question + records


def failure(query: Query, rcode: int = SERVFAIL) -> bytes:
    """A non-authoritative failure reply (the forwarder could not get an answer)."""
    flags = QR | (query.flags & RD) | RA | (rcode & 0xF)
    return HEADER.pack(query.ident, flags, 1, 0, 0, 0) + query.question


def forward_request(query: Query, ident: int, packet: bytes) -> bytes:
    """``packet`` (the client's query) with the forwarder's own message id."""
    return struct.pack(">H", ident) + packet[2:]


def is_reply_to(packet: bytes, ident: int, question: bytes) -> bool:
    """Whether ``packet`` is a response with ``ident`` to ``question`` (case-insensitive)."""
    if len(packet) < HEADER_SIZE + len(question):
        return False
    got_ident, flags, qdcount = struct.unpack_from(">HHH", packet)
    if got_ident != ident or not flags & QR or qdcount != 1:
        return False
    echoed = packet[HEADER_SIZE : HEADER_SIZE + len(question)]
    return echoed.lower() == question.lower()


def relay_reply(packet: bytes, client_ident: int) -> bytes:
    """An upstream response handed back to the client under the client's message id."""
    return struct.pack(">H", client_ident) + packet[2:]
