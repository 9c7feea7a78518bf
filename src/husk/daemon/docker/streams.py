"""Docker's stream framing and the hijacked connections of attach and exec.

Non-tty output is multiplexed: each chunk is preceded by an 8-byte header
``[stream, 0, 0, 0, size (u32 big-endian)]`` with stream 0 stdin, 1 stdout,
2 stderr, 3 an error from the daemon. Tty output is sent raw.

``attach`` and ``exec start`` take over the HTTP connection (Docker calls it
hijacking): the daemon answers ``101 UPGRADED`` (or ``200 OK`` to a client that
did not ask for an upgrade) and from then on the socket carries stdin one way
and the output stream the other. aiohttp has no such mode for a non-websocket
upgrade, so :class:`HijackedConnection` pauses aiohttp's transport and speaks on
a duplicate of its socket; the handler then returns :class:`HijackedResponse`,
which writes nothing and lets aiohttp close the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

STDIN, STDOUT, STDERR, SYSTEM_ERROR = 0, 1, 2, 3
STREAM_IDS = {"stdin": STDIN, "stdout": STDOUT, "stderr": STDERR}
HEADER = struct.Struct(">BxxxL")
MAX_FRAME = (
    1 << 20
)  # split larger chunks; the size field allows 4 GiB but readers buffer whole frames

RAW_STREAM = "application/vnd.docker.raw-stream"
MULTIPLEXED_STREAM = "application/vnd.docker.multiplexed-stream"
READ_CHUNK = 65536
# A hijacked client that accepts no output for this long is disconnected. Until then
# it is waited for: the daemon holds at most the transport's buffer (its high-water
# mark, 64 KiB) plus one chunk for it, whatever the process produces.
DRAIN_TIMEOUT = 30.0


def frame(stream: int | str, data: bytes) -> bytes:
    """``data`` as one or more multiplexed frames of ``stream``."""
    stream_id = STREAM_IDS[stream] if isinstance(stream, str) else stream
    if not data:
        return b""
    if len(data) <= MAX_FRAME:
        return HEADER.pack(stream_id, len(data)) + data
    return b"".join(
        HEADER.pack(stream_id, len(data[i : i + MAX_FRAME])) + data[i : i + MAX_FRAME]
        for i in range(0, len(data), MAX_FRAME)
    )


class FrameDecoder:
    """Splits a multiplexed byte stream back into ``(stream, data)`` frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames: list[tuple[int, bytes]] = []
        while len(self._buffer) >= HEADER.size:
            stream, size = HEADER.unpack_from(self._buffer)
            if len(self._buffer) < HEADER.size + size:
                break
            frames.append((stream, bytes(self._buffer[HEADER.size : HEADER.size + size])))
            del self._buffer[: HEADER.size + size]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)


def encode_output(stream: str, data: bytes, *, tty: bool) -> bytes:
    return data if tty else frame(stream, data)


def wants_upgrade(request: web.BaseRequest) -> bool:
    connection = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
    return "upgrade" in connection and request.headers.get("Upgrade", "").lower() == "tcp"


class HijackedResponse(web.StreamResponse):
    """What a hijacking handler returns: the connection is already answered and spent."""

    def __init__(self) -> None:
        super().__init__(status=101)
        self.force_close()

    async def prepare(self, request: web.BaseRequest) -> Any:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class HijackedConnection:
    """A raw bidirectional byte stream taken over from an aiohttp request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False

    @classmethod
    async def take_over(
        cls, request: web.BaseRequest, *, content_type: str = RAW_STREAM
    ) -> HijackedConnection:
        """Answer the request with 101 (or 200) and return the connection's socket."""
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away before the stream started")
        # aiohttp must read no further: from here on the bytes are stdin, not HTTP.
        transport.pause_reading()
        original = transport.get_extra_info("socket")
        duplicate = socket.socket(fileno=os.dup(original.fileno()))
        duplicate.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=duplicate, limit=READ_CHUNK * 4)
        if wants_upgrade(request):
            head = (
                "HTTP/1.1 101 UPGRADED\r\n"
                f"Content-Type: {content_type}\r\n"
                "Connection: Upgrade\r\n"
                "Upgrade: tcp\r\n"
                "\r\n"
            )
        else:
            head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode())
        connection = cls(reader, writer)
        await connection.drain()
        return connection

    async def drain(self) -> None:
        await asyncio.wait_for(self.writer.drain(), DRAIN_TIMEOUT)

    async def send(self, data: bytes) -> None:
        if data and not self.closed:
            self.writer.write(data)
            await self.drain()

    async def input_chunks(self) -> AsyncIterator[bytes]:
        """What the client sends, until it closes its side."""
        while True:
            chunk = await self.reader.read(READ_CHUNK)
            if not chunk:
                return
            yield chunk

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
        self.writer.close()
        with contextlib.suppress(OSError, RuntimeError, asyncio.TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


async def json_lines_response(request: web.Request, status: int = 200) -> web.StreamResponse:
    """A streamed ``application/json`` response whose body is one JSON document per line."""
    response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    return response
