"""Host end of unix-socket binds: connections a workload makes reach the socket the user bound.

The guest agent listens at the bind's target inside the container; this relay asks it
for one connection at a time (ACCEPT) and connects each one to the host socket
resolved when the container was created. The guest never names a host path: all it
can do is connect to the one socket the user bound, as often as the cap allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat

from husk.agent.client import AgentClient, Tunnel
from husk.errors import GuestError, InvalidArgument
from husk.runtime.lograte import LogLimiter
from husk.runtime.pumps import pump_to_guest, pump_to_host

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
"""Connections through one bound socket at once; further ones wait in the guest's backlog."""
_CONNECT_TIMEOUT = 10.0


def socket_source(source: str) -> str:
    """The real path of a bind source that is a unix socket; "" for a regular file (shared
    at start as a single-file bind, :mod:`husk.runtime.mounts`); other files are refused.

    Resolved once, when the container is created: later the relay connects to this
    path only, whatever becomes of the name the user gave.
    """
    resolved = os.path.realpath(source)
    try:
        mode = os.stat(resolved).st_mode
    except OSError as exc:
        raise InvalidArgument(f"bind source {source}: {exc.strerror}") from None
    if stat.S_ISREG(mode):
        return ""
    if not stat.S_ISSOCK(mode):
        raise InvalidArgument(
            f"bind source {source} is neither a directory, a regular file nor a unix socket"
        )
    return resolved


def socket_mode(path: str) -> int:
    """The permission bits the guest's socket copies from the bound host socket."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return 0o660


class SocketRelay:
    """Serves one listener the guest opened for a bind of the host socket ``host_path``."""

    def __init__(self, client: AgentClient, listener: int, host_path: str) -> None:
        # The VM's own client, not a lookup through the container: the relay starts
        # before the runtime records the container as live, and ends with this client.
        self._client = client
        self.listener = listener
        self.host_path = host_path
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._connections: set[asyncio.Task[None]] = set()
        self._unanswered = LogLimiter(log)  # the guest decides how often it connects
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                tunnel = await self._client.accept(self.listener)
            except GuestError as exc:
                self._slots.release()
                log.info("socket bind %s: the guest's listener ended: %s", self.host_path, exc)
                return
            task = asyncio.get_running_loop().create_task(self._serve(tunnel))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, tunnel: Tunnel) -> None:
        try:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.host_path), _CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as exc:
                self._unanswered.info("socket bind: cannot connect to %s: %s", self.host_path, exc)
                await tunnel.send_eof()
                return
            try:
                await asyncio.gather(pump_to_guest(reader, tunnel), pump_to_host(tunnel, writer))
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        finally:
            tunnel.release()
            self._slots.release()

    async def close(self) -> None:
        self._task.cancel()
        for task in list(self._connections):
            task.cancel()
        for task in [self._task, *self._connections]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(GuestError, TimeoutError):
            await asyncio.wait_for(self._client.unlisten(self.listener), 2.0)
