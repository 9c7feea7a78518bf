"""What every handler shares: the runtime, the event hub, the daemon's identity."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from husk.daemon.docker.events import EventHub
from husk.paths import data_dir

if TYPE_CHECKING:
    from husk.runtime.images import ImageService
    from husk.runtime.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class ApiContext:
    runtime: Runtime
    image_service: ImageService | None = None
    """The one door to the image store (built from ``runtime`` when not given)."""
    events: EventHub = field(default_factory=EventHub)
    started_at: float = field(default_factory=time.time)
    engine_id: str = ""
    debug: bool = False
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    # Docker's StdinOnce per container: a client's end of stdin closes the container's.
    # Kept in memory: ContainerSpec has no such field (after a restart it counts as false).
    stdin_once: dict[str, bool] = field(default_factory=dict)

    def spawn(self, coroutine: Coroutine[Any, Any, Any], what: str) -> None:
        """Run ``coroutine`` after the request ends (detached exec, drained streams)."""
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self.background.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("%s failed: %s", what, finished.exception())

        task.add_done_callback(done)

    async def close(self) -> None:
        for task in list(self.background):
            task.cancel()
        for task in list(self.background):
            with contextlib.suppress(BaseException):
                await task
        await self.events.stop()


def engine_id() -> str:
    """A stable identity for ``info``'s ID, kept in the data directory."""
    path: Path = data_dir() / "engine-id"
    with contextlib.suppress(OSError):
        text = path.read_text().strip()
        if text:
            return text
    value = secrets.token_hex(16)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return value


CONTEXT_KEY = web.AppKey("husk_api", ApiContext)


def context(request: web.Request) -> ApiContext:
    return request.app[CONTEXT_KEY]
