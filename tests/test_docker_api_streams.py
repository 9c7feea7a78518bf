"""Slow and stalled clients never make the daemon buffer without bound (no VM).

The OutputBus (attach fan-out) holds at most its per-client byte bound, applies
back-pressure to the publisher, and drops a client that stays full past the stall
bound; the hijacked pump (exec, attach) takes one chunk at a time from the process,
only as fast as the client's socket drains, and closes the process's stream when the
client is cut off; aiohttp's streamed responses (logs, events, archives, image save)
wait for the transport too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from husk.daemon.docker import streams
from husk.daemon.docker.container_io import pump
from husk.daemon.docker.streams import HijackedConnection, HijackedResponse
from husk.runtime.streams import Chunk, OutputBus, OutputStalled, ProcessStream

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


# ------------------------------------------------------------------- OutputBus


def test_a_stalled_subscriber_holds_at_most_its_bound_then_is_dropped() -> None:
    async def body() -> None:
        bus = OutputBus(buffer=256 * KiB, stall_timeout=0.5)
        stalled = bus.subscribe()
        loop = asyncio.get_running_loop()
        for _ in range(3):  # room for these
            await asyncio.wait_for(bus.publish("stdout", b"x" * CHUNK), 0.1)
        # The publisher is held back once the client is full...
        started = loop.time()
        publishing = asyncio.ensure_future(bus.publish("stdout", b"x" * CHUNK))
        await asyncio.sleep(0.2)
        assert not publishing.done()
        assert stalled.pending_bytes <= 256 * KiB + CHUNK
        # ...for the stall bound, then the client is dropped and the workload goes on.
        await asyncio.wait_for(publishing, 5)
        assert 0.4 < loop.time() - started < 3
        assert bus.subscribers == 0 and bus.dropped == 1
        assert stalled.pending_bytes == 0  # its backlog is freed at once
        for _ in range(100):  # nothing waits any more
            await asyncio.wait_for(bus.publish("stdout", b"z" * CHUNK), 0.1)
        with pytest.raises(OutputStalled, match=r"read no output for 0\.5 s"):
            await stalled.get()

    run(body)


def test_a_slow_reader_gets_everything_in_order_and_slows_the_publisher() -> None:
    async def body() -> None:
        bus = OutputBus(buffer=64 * KiB, stall_timeout=5)
        reader = bus.subscribe()
        received: list[bytes] = []
        peak = 0

        async def read_slowly() -> None:
            nonlocal peak
            while (item := await reader.get()) is not None:
                peak = max(peak, reader.pending_bytes)
                received.append(item[1])
                await asyncio.sleep(0.001)

        task = asyncio.ensure_future(read_slowly())
        sent = [str(i).encode() * 1000 for i in range(300)]
        for data in sent:
            await bus.publish("stdout", data)
        bus.close()
        await asyncio.wait_for(task, 10)
        assert received == sent
        assert peak <= 64 * KiB + 4000
        assert bus.dropped == 0

    run(body)


def test_a_stalled_client_does_not_cost_another_one_its_output() -> None:
    async def body() -> None:
        bus = OutputBus(buffer=32 * KiB, stall_timeout=0.3)
        bus.subscribe()  # never read
        fast = bus.subscribe()
        got = bytearray()

        async def read() -> None:
            while (item := await fast.get()) is not None:
                got.extend(item[1])

        task = asyncio.ensure_future(read())
        for i in range(64):
            await bus.publish("stdout", bytes([i]) * 4096)
        bus.close()
        await asyncio.wait_for(task, 10)
        assert bytes(got) == b"".join(bytes([i]) * 4096 for i in range(64))
        assert bus.dropped == 1

    run(body)


def test_a_client_that_leaves_releases_a_waiting_publisher_at_once() -> None:
    async def body() -> None:
        bus = OutputBus(buffer=16 * KiB, stall_timeout=30)
        gone = bus.subscribe()
        publishing = asyncio.ensure_future(bus.publish("stdout", b"x" * 32 * KiB))
        await asyncio.sleep(0.1)
        assert not publishing.done()
        bus.unsubscribe(gone)
        await asyncio.wait_for(publishing, 1)
        assert await gone.get() == ("stdout", b"x" * 32 * KiB)  # what it had, then the end
        assert await gone.get() is None
        assert bus.dropped == 0

    run(body)


def test_subscribing_to_a_closed_bus_ends_at_once() -> None:
    async def body() -> None:
        bus = OutputBus()
        bus.close()
        assert await bus.subscribe().get() is None

    run(body)


# ------------------------------------------------------------------- the pump


class FloodingProcess:
    """A ProcessStream whose output never ends; counts what the daemon took from it."""

    def __init__(self) -> None:
        self.taken = 0
        self.closed = asyncio.Event()

    async def output(self) -> AsyncIterator[Chunk]:
        try:
            while True:
                self.taken += CHUNK
                yield "stdout", b"f" * CHUNK
                await asyncio.sleep(0)
        finally:
            self.closed.set()

    def stream(self) -> ProcessStream:
        async def nothing(*args: Any) -> None:
            return None

        return ProcessStream(
            tty=False,
            output=self.output,
            write_stdin=nothing,
            close_stdin=nothing,
            resize=nothing,
            exit_code=lambda: None,
        )


def test_the_pump_takes_output_only_as_fast_as_a_stalled_client_drains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reproduction of a stopped ``husk exec``: the daemon used to hold all of it."""
    monkeypatch.setattr(streams, "DRAIN_TIMEOUT", 1.5)
    process = FloodingProcess()

    async def hijack(request: web.Request) -> web.StreamResponse:
        connection = await HijackedConnection.take_over(request)
        await pump(connection, process.stream(), stdin=False, streams={"stdout"}, close_stdin=True)
        return HijackedResponse()

    async def body() -> None:
        app = web.Application()
        app.router.add_post("/hijack", hijack)
        runner = web.AppRunner(app)
        await runner.setup()
        path = str(tmp_path / "api.sock")
        await web.UnixSite(runner, path).start()
        client = socket.socket(socket.AF_UNIX)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
        client.connect(path)
        client.sendall(
            b"POST /hijack HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
        )
        try:
            await asyncio.sleep(1.0)  # the client reads nothing at all
            # Socket buffers (both ends, a few hundred KiB here) plus the transport's.
            assert process.taken < 8 * MiB, process.taken
            await asyncio.wait_for(process.closed.wait(), 5)  # cut off, output closed
            taken = process.taken
            await asyncio.sleep(0.3)
            assert process.taken == taken  # nothing more is taken from the process
        finally:
            client.close()
            await runner.cleanup()

    run(body)


def test_a_slow_reader_of_a_hijacked_stream_gets_every_byte(tmp_path: Path) -> None:
    async def output() -> AsyncIterator[Chunk]:
        for i in range(200):
            yield "stdout", bytes([i]) * CHUNK

    async def nothing(*args: Any) -> None:
        return None

    process = ProcessStream(
        tty=True,
        output=output,
        write_stdin=nothing,
        close_stdin=nothing,
        resize=nothing,
        exit_code=lambda: 0,
    )

    async def hijack(request: web.Request) -> web.StreamResponse:
        connection = await HijackedConnection.take_over(request)
        await pump(connection, process, stdin=False, streams={"stdout"}, close_stdin=True)
        return HijackedResponse()

    async def body() -> None:
        app = web.Application()
        app.router.add_post("/hijack", hijack)
        runner = web.AppRunner(app)
        await runner.setup()
        path = str(tmp_path / "api.sock")
        await web.UnixSite(runner, path).start()
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(
            b"POST /hijack HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
        )
        await reader.readuntil(b"\r\n\r\n")
        received = bytearray()
        while chunk := await reader.read(16 * KiB):
            received.extend(chunk)
            await asyncio.sleep(0.0005)
        writer.close()
        await runner.cleanup()
        assert bytes(received) == b"".join(bytes([i]) * CHUNK for i in range(200))

    run(body)


def test_the_pump_reports_a_dropped_attach_in_band() -> None:
    """An attach dropped by the bus ends with Docker's stream-3 error frame."""

    class Connection:
        def __init__(self) -> None:
            self.sent = bytearray()
            self.closed = False

        async def send(self, data: bytes) -> None:
            self.sent.extend(data)

        async def close(self) -> None:
            self.closed = True

        async def input_chunks(self) -> AsyncIterator[bytes]:
            return
            yield b""

    async def output() -> AsyncIterator[Chunk]:
        yield "stdout", b"before\n"
        raise OutputStalled("the attached client read no output for 10 s; disconnected")

    async def nothing(*args: Any) -> None:
        return None

    async def body() -> None:
        connection = Connection()
        process = ProcessStream(
            tty=False,
            output=output,
            write_stdin=nothing,
            close_stdin=nothing,
            resize=nothing,
            exit_code=lambda: None,
        )
        await pump(connection, process, stdin=False, streams={"stdout"}, close_stdin=False)  # type: ignore[arg-type]
        frames = streams.FrameDecoder().feed(bytes(connection.sent))
        assert frames[0] == (1, b"before\n")
        assert frames[1][0] == 3 and b"read no output" in frames[1][1]
        assert connection.closed

    run(body)


# ---------------------------------------------------- aiohttp streamed responses


def test_streamed_responses_wait_for_a_stalled_client(tmp_path: Path) -> None:
    """logs -f, events, archive GET and image save write through StreamResponse.write."""
    written = 0

    async def flood(request: web.Request) -> web.StreamResponse:
        nonlocal written
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(4096):  # 256 MiB if nothing held it back
                await response.write(b"l" * CHUNK)
                written += CHUNK
        return response

    async def body() -> None:
        app = web.Application()
        app.router.add_get("/flood", flood)
        runner = web.AppRunner(app)
        await runner.setup()
        path = str(tmp_path / "api.sock")
        await web.UnixSite(runner, path).start()
        client = socket.socket(socket.AF_UNIX)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
        client.connect(path)
        client.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            await asyncio.sleep(1.0)
            assert written < 8 * MiB, written
        finally:
            client.close()
            await runner.cleanup()

    run(body)
