"""The husk guest protocol: framing and messages, with no I/O.

Imported by both the host and the guest agent, so it uses the standard library
only and imports little (the guest pays for every import at boot).

Wire format, big-endian::

    u32 length | u8 type | u32 channel | payload (length bytes)

``length`` counts the payload only. Control messages carry a JSON object;
stdio and tunnel data (STDOUT, STDERR, STDIN, DATA, ENTROPY) carry raw bytes.

Channels multiplex sessions over the single virtio-serial port: channel 0 is
the control channel (handshake, time, stats, mounts, shutdown); the host picks
a fresh channel for the workload (RUN), each EXEC and each FORWARD, and every
reply about that session comes back on the same channel.

Connections the guest starts (to a unix socket bound from the host) use host-picked
channels too: LISTEN opens a listener in the guest and names it by its channel;
each ACCEPT, on a fresh channel, takes the listener's next connection (the guest
answers OK once one arrives) and then carries it with DATA and CLOSE like a FORWARD.

A decoder never raises on bad input from the peer: a frame that is oversized,
of unknown type, or carries malformed JSON is skipped (its length is known) and
reported as a :class:`FrameError`, which the receiver answers with an ERROR
frame. Only a header that cannot be trusted at all leaves nothing to skip.
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import Any

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">IBI")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20
"""Largest payload either side accepts. Stdio is chunked well below it."""
CHUNK_SIZE = 256 * 1024
"""Size in which senders split stdio and tunnel data."""
CONTROL_CHANNEL = 0
MAX_CHANNEL = 0xFFFFFFFF
TRANSFER_SERIAL = "husk-transfer"
"""The read-only virtio-blk disk (the transfer ring) a process's stdin can come through:
the host writes the bytes into its file and sends STDIN_DISK with where they are."""
TRANSFER_ALIGN = 4096
"""Offsets and lengths in the transfer ring are multiples of this (the guest reads with
O_DIRECT, which needs the disk's block size; a page covers every logical block size)."""


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow."""


class MsgType(IntEnum):
    HELLO = 1
    READY = 2
    RUN = 3
    EXEC = 4
    SIGNAL = 5
    STDOUT = 6
    STDERR = 7
    STARTED = 8
    EXITED = 9
    ERROR = 10
    FORWARD = 11
    MOUNT = 12
    STDIN = 13
    STDIN_EOF = 14
    SET_TIME = 15
    OVERLAY_CONFIG = 16
    STATS = 17
    RESIZE = 18
    CLOSE = 19
    DATA = 20
    OK = 21
    PREPARE = 22
    SHUTDOWN = 23
    ENTROPY = 24
    ARCHIVE = 25
    LISTEN = 26
    ACCEPT = 27
    NETWORK = 28
    WIREGUARD = 29
    RESOURCES = 30
    REHEARSE = 31
    STDIN_DISK = 32
    """Host → guest: the process's next stdin bytes are ``length`` bytes of the transfer
    ring at ``offset`` (both multiples of TRANSFER_ALIGN), in order with STDIN frames."""
    STDIN_DONE = 33
    """Guest → host: that range has gone into the process's stdin (or was dropped with
    it): the host may write the ring there again."""


RAW_TYPES = frozenset(
    {MsgType.STDOUT, MsgType.STDERR, MsgType.STDIN, MsgType.DATA, MsgType.ENTROPY}
)

# Required fields of each JSON message and the Python types they must have.
# Optional fields are validated where they are used; unknown fields are ignored
# so that a newer peer can add them without breaking an older one.
_STR_LIST = "list[str]"
REQUIRED_FIELDS: dict[MsgType, dict[str, Any]] = {
    MsgType.HELLO: {"version": int},
    MsgType.READY: {"version": int},
    MsgType.RUN: {"argv": _STR_LIST},
    MsgType.EXEC: {"argv": _STR_LIST},
    MsgType.SIGNAL: {"signal": int},
    MsgType.STARTED: {"pid": int},
    MsgType.EXITED: {"code": int},
    MsgType.ERROR: {"message": str},
    MsgType.FORWARD: {"port": int},
    MsgType.MOUNT: {"target": str, "fstype": str},
    MsgType.STDIN_EOF: {},
    MsgType.SET_TIME: {"unix_ns": int},
    MsgType.OVERLAY_CONFIG: {},
    MsgType.STATS: {},
    MsgType.RESIZE: {"rows": int, "cols": int},
    MsgType.CLOSE: {},
    MsgType.OK: {},
    MsgType.PREPARE: {},
    MsgType.SHUTDOWN: {},
    MsgType.ARCHIVE: {"path": str, "mode": str},
    MsgType.LISTEN: {"path": str},
    MsgType.ACCEPT: {"listener": int},
    MsgType.NETWORK: {},
    MsgType.WIREGUARD: {},
    MsgType.RESOURCES: {},
    MsgType.REHEARSE: {"image": str, "upper": str, "argv": _STR_LIST},
    MsgType.STDIN_DISK: {"offset": int, "length": int},
    MsgType.STDIN_DONE: {"offset": int, "length": int},
}


class Frame:
    """One decoded frame. (No dataclasses: the guest's minimal stdlib lacks them.)"""

    __slots__ = ("channel", "payload", "type")

    def __init__(self, type: MsgType, channel: int, payload: bytes = b"") -> None:
        self.type = type
        self.channel = channel
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and (self.type, self.channel, self.payload) == (
            other.type,
            other.channel,
            other.payload,
        )

    def __hash__(self) -> int:
        return hash((self.type, self.channel, self.payload))

    def __repr__(self) -> str:
        return f"Frame({self.type.name}, {self.channel}, {self.payload[:64]!r})"

    def json(self) -> dict[str, Any]:
        """The payload as a validated JSON object (raises ProtocolError)."""
        return parse_json_payload(self.type, self.payload)


class FrameError:
    """A frame the decoder skipped; answer it with :func:`encode_error`."""

    __slots__ = ("channel", "reason")

    def __init__(self, channel: int, reason: str) -> None:
        self.channel = channel
        self.reason = reason

    def __repr__(self) -> str:
        return f"FrameError({self.channel}, {self.reason!r})"


def _check_channel(channel: int) -> None:
    if not 0 <= channel <= MAX_CHANNEL:
        raise ProtocolError(f"channel {channel} out of range")


def encode(frame_type: MsgType, channel: int, payload: bytes = b"") -> bytes:
    """One frame on the wire. Raises ProtocolError for an oversized payload."""
    _check_channel(channel)
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), int(frame_type), channel) + payload


def encode_json(frame_type: MsgType, channel: int, body: dict[str, Any] | None = None) -> bytes:
    """A control message; the body is validated like a received one."""
    if frame_type in RAW_TYPES:
        raise ProtocolError(f"{frame_type.name} carries raw bytes, not JSON")
    payload = json.dumps(body or {}, separators=(",", ":")).encode()
    validate_fields(frame_type, body or {})
    return encode(frame_type, channel, payload)


# Kinds of ERROR frames (the ``code`` field). A failed RUN or EXEC also carries the
# exit code the guest gave it (``exit_code``), so the host never parses the message.
ERROR_GENERIC = "error"
ERROR_PROTOCOL = "protocol"
ERROR_INTERNAL = "internal"
ERROR_COMMAND_NOT_FOUND = "command_not_found"
"""The command does not exist (exit code 127)."""
ERROR_NOT_EXECUTABLE = "not_executable"
"""The command exists but cannot be run (exit code 126)."""
ERROR_SPAWN_FAILED = "spawn_failed"
"""The process could not be set up: its user, workdir or isolation (exit code 126)."""
EXIT_NOT_EXECUTABLE = 126
EXIT_COMMAND_NOT_FOUND = 127


def encode_error(
    channel: int, message: str, code: str = ERROR_GENERIC, exit_code: int | None = None
) -> bytes:
    """An ERROR frame; ``exit_code`` for a process that could not be started.

    Older hosts read ``message`` and ``code`` only and ignore ``exit_code``.
    """
    body: dict[str, Any] = {"message": message, "code": code}
    if exit_code is not None:
        body["exit_code"] = exit_code
    return encode_json(MsgType.ERROR, channel, body)


def encode_data(frame_type: MsgType, channel: int, data: bytes) -> list[bytes]:
    """Raw data split into frames of at most CHUNK_SIZE bytes."""
    if frame_type not in RAW_TYPES:
        raise ProtocolError(f"{frame_type.name} carries JSON, not raw bytes")
    if not data:
        return [encode(frame_type, channel, b"")]
    return [
        encode(frame_type, channel, data[i : i + CHUNK_SIZE])
        for i in range(0, len(data), CHUNK_SIZE)
    ]


def _matches(value: Any, expected: Any) -> bool:
    if expected == _STR_LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def validate_fields(frame_type: MsgType, body: dict[str, Any]) -> None:
    for name, expected in REQUIRED_FIELDS.get(frame_type, {}).items():
        if name not in body:
            raise ProtocolError(f"{frame_type.name} lacks field {name!r}")
        if not _matches(body[name], expected):
            raise ProtocolError(f"{frame_type.name} field {name!r} has the wrong type")
    if frame_type in (MsgType.RUN, MsgType.EXEC) and not body["argv"]:
        raise ProtocolError(f"{frame_type.name} needs a non-empty argv")


def parse_json_payload(frame_type: MsgType, payload: bytes) -> dict[str, Any]:
    if frame_type in RAW_TYPES:
        raise ProtocolError(f"{frame_type.name} carries raw bytes, not JSON")
    try:
        body = json.loads(payload.decode("utf-8")) if payload else {}
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{frame_type.name} payload is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{frame_type.name} payload is not a JSON object")
    validate_fields(frame_type, body)
    return body


class Decoder:
    """Incremental decoder: feed bytes, get frames and skipped-frame errors."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._skip = 0

    def feed(self, data: bytes | memoryview) -> list[Frame | FrameError]:
        self._buffer += data
        out: list[Frame | FrameError] = []
        while True:
            if self._skip:
                dropped = min(self._skip, len(self._buffer))
                del self._buffer[:dropped]
                self._skip -= dropped
                if self._skip:
                    return out
            if len(self._buffer) < HEADER_SIZE:
                return out
            length, raw_type, channel = HEADER.unpack_from(self._buffer)
            if length > self.max_payload:
                del self._buffer[:HEADER_SIZE]
                self._skip = length
                reason = f"frame of {length} bytes exceeds {self.max_payload}"
                out.append(FrameError(channel, reason))
                continue
            if len(self._buffer) < HEADER_SIZE + length:
                return out
            with memoryview(self._buffer) as view:  # one copy, not a slice's two
                payload = bytes(view[HEADER_SIZE : HEADER_SIZE + length])
            del self._buffer[: HEADER_SIZE + length]
            try:
                frame_type = MsgType(raw_type)
            except ValueError:
                out.append(FrameError(channel, f"unknown message type {raw_type}"))
                continue
            out.append(Frame(frame_type, channel, payload))

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (0 at a frame boundary)."""
        return len(self._buffer) + self._skip
