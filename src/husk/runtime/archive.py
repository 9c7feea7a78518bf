"""A container's files: stat a path, read it as a tar stream, extract one into it, export
the whole root, list the changes against the image.

Each is a session of the guest's archive helper; its output is capped (a hostile
guest gets an error, never the daemon's memory) and a guest that breaks the
protocol ends its container (see :meth:`Container.guest_stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal as signals
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from husk.agent import transfer
from husk.errors import GuestError, HuskError, InvalidArgument, NotFound
from husk.humanize import escape_controls
from husk.runtime.changes import MAX_CHANGES_OUTPUT, parse_changes
from husk.runtime.collect import MAX_ERROR_OUTPUT, MAX_STAT_OUTPUT, CappedOutput
from husk.runtime.streams import Chunk

if TYPE_CHECKING:
    from husk.agent.client import AgentClient, GuestProcess
    from husk.runtime.container import Container, Live


def _archive_error(stderr: bytes) -> HuskError:
    """The guest's archive helper's complaint as the client's error: its control
    characters escaped (docker prints an API error raw, to a terminal)."""
    message = escape_controls(stderr.decode(errors="replace").strip()) or "archive operation failed"
    if message.startswith("Could not find"):
        return NotFound(message)
    return InvalidArgument(message)


async def end_session(process: GuestProcess) -> None:
    """Releases a guest session; one that has not exited (cut short by husk) is killed first."""
    if process.exit_code is None:
        with contextlib.suppress(Exception):
            await process.signal(int(signals.SIGKILL))
    await process.release()


class Files:
    """Where a container's archive sessions run: its own VM while it runs, else a
    maintenance VM (:mod:`husk.runtime.offline`) that serves only them."""

    def __init__(
        self,
        client: AgentClient,
        container: Container,
        live: Live | None,
        ring: transfer.TransferRing | None = None,
    ) -> None:
        self.client = client
        self._container = container
        self._live = live
        self.ring = ring
        """The VM's transfer ring (None: uploads go through the port)."""

    async def session(self, path: str, mode: str) -> GuestProcess:
        call = self.client.archive(path, mode)
        if self._live is None:
            return await call  # a maintenance VM ends with the request anyway
        return await self._container.guest_call(self._live, "archive", call)

    def guarded(self, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        if self._live is None:
            return stream
        return self._container.guest_stream(self._live, "archive", stream)


def live_files(container: Container) -> Files:
    """The running container's own VM (Conflict unless it runs)."""
    live = container.require_live()
    return Files(live.sandbox.client, container, live, live.sandbox.transfer_ring())


async def _session(
    files: Files, path: str, mode: str
) -> tuple[GuestProcess, Callable[[AsyncIterator[Chunk]], AsyncIterator[Chunk]]]:
    """The guest's archive session, and a guard for its output."""
    return await files.session(path, mode), files.guarded


async def stat_path(files: Files, path: str) -> dict[str, Any]:
    process, guarded = await _session(files, path, "stat")
    collected = CappedOutput(f"the stat of {path}", MAX_STAT_OUTPUT, error_limit=MAX_ERROR_OUTPUT)
    try:
        await collected.read(guarded(process.output()))
    finally:
        await end_session(process)
    if process.exit_code != 0:
        raise _archive_error(collected.stderr)
    try:
        result = json.loads(collected.stdout)
    except (ValueError, RecursionError):  # a deep nest of brackets: RecursionError
        result = None
    if not isinstance(result, dict):
        raise GuestError(f"the guest answered a stat of {path} with something else")
    return _checked_stat(result, path)


MAX_STAT_TEXT = 4096
"""Characters of a stat's name or link target (PATH_MAX)."""
_MTIME_RANGE = (-62135596800.0, 253402300799.0)
"""Unix seconds of years 1 to 9999: what Docker's RFC 3339 times can show."""


def _checked_stat(answer: dict[str, Any], path: str) -> dict[str, Any]:
    """The guest's stat with its fields' types and ranges checked (they become Docker's
    path-stat header and ``husk cp``'s choices): a GuestError naming the field, never an
    OverflowError or ValueError later."""

    def integer(name: str, limit: int) -> int:
        value = answer.get(name)
        if type(value) is not int or not 0 <= value < limit:
            raise GuestError(f"the guest's stat of {path} has a bad {name}: {value!r:.80}")
        return value

    def text(name: str) -> str:
        value = answer.get(name, "")
        if type(value) is not str or len(value) > MAX_STAT_TEXT:
            raise GuestError(f"the guest's stat of {path} has a bad {name}: {value!r:.80}")
        return value

    mtime = answer.get("mtime")
    in_range = isinstance(mtime, int | float) and _MTIME_RANGE[0] <= mtime <= _MTIME_RANGE[1]
    if type(mtime) is bool or not in_range:  # NaN is in no range
        raise GuestError(f"the guest's stat of {path} has a bad mtime: {mtime!r:.80}")
    return {
        "name": text("name"),
        "size": integer("size", 1 << 63),
        "mode": integer("mode", 1 << 16),
        "mtime": mtime,
        "linkTarget": text("linkTarget"),
    }


async def get_archive(files: Files, path: str) -> tuple[AsyncIterator[bytes], dict[str, Any]]:
    """A tar stream of ``path`` in the container and its stat."""
    info = await stat_path(files, path)
    process, guarded = await _session(files, path, "get")

    async def chunks() -> AsyncIterator[bytes]:
        errors = CappedOutput(f"the archive of {path}", MAX_ERROR_OUTPUT)
        try:
            async for stream, data in guarded(process.output()):
                if stream == "stdout":
                    yield data
                else:
                    errors.add(stream, data)
        finally:
            await end_session(process)
        if process.exit_code:
            raise _archive_error(errors.stderr)

    return chunks(), info


UPLOAD_BATCH = 1 << 20
"""Bytes of an upload gathered before they go to the guest (as 256 KiB frames): the
client's chunks (64 KiB from husk's CLI, often less as they arrive) each cost the
guest a wake-up, a decode and a pipe write; a MiB at once costs it four frames."""


async def batched(data: AsyncIterator[bytes], size: int = UPLOAD_BATCH) -> AsyncIterator[bytes]:
    """``data`` in pieces of at least ``size`` bytes (the last may be shorter)."""
    pending: list[bytes] = []
    held = 0
    async for chunk in data:
        pending.append(chunk)
        held += len(chunk)
        if held >= size:
            yield pending[0] if len(pending) == 1 else b"".join(pending)
            pending, held = [], 0
    if held:
        yield b"".join(pending)


async def put_archive(files: Files, path: str, data: AsyncIterator[bytes]) -> None:
    """Extracts a tar stream into the existing directory ``path`` in the container.

    The stream goes through the VM's transfer ring when it has one that no other upload
    is using (:mod:`husk.agent.transfer`), else through the port.
    """
    ring = files.ring
    if ring is None or ring.lock.locked():
        await _put_through_port(files, path, data)
        return
    async with ring.lock:
        fd = ring.open()
        if fd is None:
            await _put_through_port(files, path, data)
            return
        try:
            await _put_through_ring(files, fd, path, data)
        finally:
            transfer.empty(fd)
            os.close(fd)


async def _put_through_port(files: Files, path: str, data: AsyncIterator[bytes]) -> None:
    process, guarded = await _session(files, path, "put")
    collected = CappedOutput(f"the extraction into {path}", MAX_ERROR_OUTPUT)
    try:
        async for chunk in batched(data):
            await process.write_stdin(chunk)
        await process.close_stdin()
        await collected.read(guarded(process.output()))
    finally:
        await end_session(process)
    if process.exit_code != 0:
        raise _archive_error(collected.stderr)


async def _put_through_ring(files: Files, fd: int, path: str, data: AsyncIterator[bytes]) -> None:
    process, guarded = await _session(files, path, "put")
    collected = CappedOutput(f"the extraction into {path}", MAX_ERROR_OUTPUT)
    # The output is read from the start: it carries the guest's STDIN_DONEs.
    reader = asyncio.ensure_future(collected.read(guarded(process.output())))
    try:
        await transfer.send_stdin(process, fd, data, reader)
        await reader
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        await end_session(process)
    if process.exit_code != 0:
        raise _archive_error(collected.stderr)


async def export_root(files: Files) -> AsyncIterator[bytes]:
    """The container's whole file system as a tar stream, passed through untouched."""
    process, guarded = await _session(files, "/", "export")

    async def chunks() -> AsyncIterator[bytes]:
        errors = CappedOutput("the export", MAX_ERROR_OUTPUT)
        try:
            async for stream, data in guarded(process.output()):
                if stream == "stdout":
                    yield data
                else:
                    errors.add(stream, data)
        finally:
            await end_session(process)
        if process.exit_code:
            raise _archive_error(errors.stderr)

    return chunks()


async def list_changes(files: Files) -> list[dict[str, Any]]:
    """Docker's changes of the container against its image (checked, see changes)."""
    process, guarded = await _session(files, "/", "diff")
    collected = CappedOutput(
        "the list of changes", MAX_CHANGES_OUTPUT, error_limit=MAX_ERROR_OUTPUT
    )
    try:
        await collected.read(guarded(process.output()))
    finally:
        await end_session(process)
    if process.exit_code != 0:
        message = collected.stderr.decode(errors="replace").strip()
        raise GuestError(f"the guest could not list the changes: {message or 'it failed'}")
    return parse_changes(collected.stdout)
