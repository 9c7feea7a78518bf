"""Files of a running container: stat a path, read it as a tar stream, extract one into it.

Each is a session of the guest's archive helper; its output is capped (a hostile
guest gets an error, never the daemon's memory) and a guest that breaks the
protocol ends its container (see :meth:`Container.guest_stream`).
"""

from __future__ import annotations

import contextlib
import json
import signal as signals
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from husk.errors import GuestError, HuskError, InvalidArgument, NotFound
from husk.runtime.collect import MAX_ERROR_OUTPUT, MAX_STAT_OUTPUT, CappedOutput
from husk.runtime.streams import Chunk

if TYPE_CHECKING:
    from husk.agent.client import GuestProcess
    from husk.runtime.container import Container


def _archive_error(stderr: bytes) -> HuskError:
    message = stderr.decode(errors="replace").strip() or "archive operation failed"
    if message.startswith("Could not find"):
        return NotFound(message)
    return InvalidArgument(message)


async def end_session(process: GuestProcess) -> None:
    """Releases a guest session; one that has not exited (cut short by husk) is killed first."""
    if process.exit_code is None:
        with contextlib.suppress(Exception):
            await process.signal(int(signals.SIGKILL))
    await process.release()


async def _session(
    container: Container, path: str, mode: str
) -> tuple[GuestProcess, Callable[[AsyncIterator[Chunk]], AsyncIterator[Chunk]]]:
    """The guest's archive session, and a guard for its output."""
    live = container.require_live()
    process = await container.guest_call(live, "archive", live.sandbox.client.archive(path, mode))

    def guarded(stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        return container.guest_stream(live, "archive", stream)

    return process, guarded


async def stat_path(container: Container, path: str) -> dict[str, Any]:
    process, guarded = await _session(container, path, "stat")
    collected = CappedOutput(f"the stat of {path}", MAX_STAT_OUTPUT, error_limit=MAX_ERROR_OUTPUT)
    try:
        await collected.read(guarded(process.output()))
    finally:
        await end_session(process)
    if process.exit_code != 0:
        raise _archive_error(collected.stderr)
    try:
        result = json.loads(collected.stdout)
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise GuestError(f"the guest answered a stat of {path} with something else")
    return result


async def get_archive(
    container: Container, path: str
) -> tuple[AsyncIterator[bytes], dict[str, Any]]:
    """A tar stream of ``path`` in the container and its stat."""
    info = await stat_path(container, path)
    process, guarded = await _session(container, path, "get")

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


async def put_archive(container: Container, path: str, data: AsyncIterator[bytes]) -> None:
    """Extracts a tar stream into the existing directory ``path`` in the container."""
    process, guarded = await _session(container, path, "put")
    collected = CappedOutput(f"the extraction into {path}", MAX_ERROR_OUTPUT)
    try:
        async for chunk in data:
            await process.write_stdin(chunk)
        await process.close_stdin()
        await collected.read(guarded(process.output()))
    finally:
        await end_session(process)
    if process.exit_code != 0:
        raise _archive_error(collected.stderr)
