"""Guest output that the daemon keeps whole in memory, within a bound.

Output streamed to a client is never collected (back-pressure bounds it); but a
path stat, an archive helper's error text, or the output of husk's own exec (a
health check) are read whole before use. The guest decides how much it sends, so
each is capped: a hostile guest that sends more gets an error, never the daemon's
memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from husk.errors import GuestError

KiB = 1024
MAX_STAT_OUTPUT = 64 * KiB
"""A path stat is one small JSON object."""
MAX_ERROR_OUTPUT = 64 * KiB
"""Error text of a guest helper (archive get, put, stat)."""
MAX_COLLECTED_OUTPUT = 1024 * KiB
"""Each stream of an exec run to completion by husk itself."""


class OutputTooLarge(GuestError):
    """A guest sent more than the daemon reads for an answer of that kind."""


def _human(size: int) -> str:
    return f"{size // KiB} KiB" if size % KiB == 0 else f"{size} bytes"


class CappedOutput:
    """Collects a guest session's stdout and stderr, each at most ``limit`` bytes.

    Beyond the limit :meth:`read` raises :class:`OutputTooLarge` (the caller then
    ends the session), or with ``truncate`` reads on and drops the excess.
    """

    def __init__(
        self,
        what: str,
        limit: int,
        *,
        error_limit: int | None = None,
        truncate: bool = False,
    ) -> None:
        self.what = what
        self.limits = {"stdout": limit, "stderr": limit if error_limit is None else error_limit}
        self.truncate = truncate
        self.overflowed = False
        self._buffers = {"stdout": bytearray(), "stderr": bytearray()}

    @property
    def stdout(self) -> bytes:
        return bytes(self._buffers["stdout"])

    @property
    def stderr(self) -> bytes:
        return bytes(self._buffers["stderr"])

    def add(self, stream: str, data: bytes) -> None:
        buffer = self._buffers["stdout" if stream == "stdout" else "stderr"]
        limit = self.limits["stdout" if stream == "stdout" else "stderr"]
        room = limit - len(buffer)
        if len(data) <= room:
            buffer += data
            return
        self.overflowed = True
        if not self.truncate:
            raise OutputTooLarge(
                f"{self.what}: the guest sent more than {_human(limit)} on {stream}; "
                "its session was ended"
            )
        buffer += data[: max(room, 0)]

    async def read(self, output: AsyncIterator[tuple[str, bytes]]) -> None:
        async for stream, data in output:
            self.add(stream, data)
