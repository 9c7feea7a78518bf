"""A container's output for clients: its log (``logs``) and its live streams (``attach``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from husk.agent.client import GuestProcess
from husk.errors import Conflict, GuestError
from husk.runtime.container import Container
from husk.runtime.logs import LogEntry
from husk.runtime.registry import ContainerRegistry
from husk.runtime.streams import Chunk, ProcessStream

WORKLOAD_START_TIMEOUT = 120.0
"""How long stdin sent to a container that is starting waits for its workload."""


def log_batches(
    container: Container,
    *,
    follow: bool = False,
    tail: int | None = None,
    since: float | None = None,
    until: float | None = None,
    stdout: bool = True,
    stderr: bool = True,
) -> AsyncIterator[list[LogEntry]]:
    """The container's log in batches (:meth:`husk.runtime.logs.LogFile.batches`)."""
    streams = tuple(s for s, on in (("stdout", stdout), ("stderr", stderr)) if on)
    return container.log_file().batches(
        follow=follow,
        tail=tail,
        since=since,
        until=until,
        streams=streams,
        stopped=container.stopped,
    )


def attach(
    registry: ContainerRegistry, container: Container, *, logs: bool = False, stream: bool = True
) -> ProcessStream:
    """The container's streams: its past log (``logs``), then its live output (``stream``)."""
    record = container.record
    queue = container.bus().subscribe() if stream else None
    # The log's end is fixed now, with the subscription: no output is lost or shown
    # twice; the entries themselves are read from disk as the client takes them.
    past = container.log_file().entries(follow=False) if logs else None

    async def output() -> AsyncIterator[Chunk]:
        if past is not None:
            async for entry in past:
                yield entry.stream, entry.data
        if queue is None:
            return
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            container.bus().unsubscribe(queue)

    async def write_stdin(data: bytes) -> None:
        process = await workload_when_started(registry, record.id)
        await process.write_stdin(data)

    async def close_stdin() -> None:
        live = container.live
        if live is not None:
            with contextlib.suppress(GuestError):
                await live.process.close_stdin()

    async def resize(rows: int, cols: int) -> None:
        await registry.get(record.id).resize(rows, cols)

    def exit_code() -> int | None:
        current = registry.store.find(record.id)
        if current is None or current.state.running:
            return None
        return current.state.exit_code

    return ProcessStream(
        tty=record.spec.tty,
        output=output,
        write_stdin=write_stdin,
        close_stdin=close_stdin,
        resize=resize,
        exit_code=exit_code,
    )


async def workload_when_started(
    registry: ContainerRegistry, container_id: str, timeout: float = WORKLOAD_START_TIMEOUT
) -> GuestProcess:
    """The workload of a container that runs or is about to (a client attached first)."""
    deadline = time.monotonic() + timeout
    while True:
        live = registry.live_of(container_id)
        if live is not None:
            return live.process
        if time.monotonic() > deadline:
            raise Conflict(f"container {container_id} did not start within {timeout:.0f}s")
        await asyncio.sleep(0.05)
