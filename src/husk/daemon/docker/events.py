"""The daemon's event stream: one subscription to the runtime, fanned out to clients.

Docker clients may ask for events ``since`` a past moment, so the hub keeps the
most recent events (since the daemon started) in memory and replays them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from husk.runtime.runtime import Event, Runtime

log = logging.getLogger(__name__)

HISTORY = 2048
CLIENT_QUEUE = 4096


def event_json(event: Event) -> dict[str, Any]:
    """Docker's event message (``status``/``id``/``from`` are kept for old clients)."""
    attributes = dict(event.attributes)
    message: dict[str, Any] = {
        "Type": event.type,
        "Action": event.action,
        "Actor": {"ID": event.id, "Attributes": attributes},
        "scope": "local",
        "time": event.time_nano // 1_000_000_000,
        "timeNano": event.time_nano,
    }
    if event.type == "container":
        message["status"] = event.action
        message["id"] = event.id
        message["from"] = attributes.get("image", "")
    elif event.type == "image":
        message["status"] = event.action
        message["id"] = event.id
    return message


def event_matches(event: Event, filters: dict[str, list[str]]) -> bool:
    """Docker's event filters: values of one key are alternatives, keys must all hold."""
    attributes = event.attributes
    for key, values in filters.items():
        if not values:
            continue
        if key == "type":
            ok = event.type in values
        elif key == "event":
            action = event.action.split(":", 1)[0]
            ok = event.action in values or action in values
        elif key == "container":
            ok = event.type == "container" and any(
                event.id.startswith(v) or attributes.get("name") == v.lstrip("/") for v in values
            )
        elif key == "image":
            ok = any(
                attributes.get("image") == v or (event.type == "image" and event.id == v)
                for v in values
            )
        elif key == "label":
            ok = all(_label_holds(attributes, v) for v in values)
        elif key == "scope":
            ok = "local" in values
        else:
            ok = False
        if not ok:
            return False
    return True


def _label_holds(attributes: dict[str, str], wanted: str) -> bool:
    key, sep, value = wanted.partition("=")
    return key in attributes and (not sep or attributes[key] == value)


class EventHub:
    def __init__(self) -> None:
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self._clients: set[asyncio.Queue[Event]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self, runtime: Runtime) -> None:
        self._task = asyncio.ensure_future(self._follow(runtime))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _follow(self, runtime: Runtime) -> None:
        while True:
            try:
                async for event in runtime.subscribe():
                    self.publish(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event subscription failed; resubscribing")
            await asyncio.sleep(1.0)

    def publish(self, event: Event) -> None:
        self.history.append(event)
        for queue in list(self._clients):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

    async def stream(
        self, *, since: float | None, until: float | None, filters: dict[str, list[str]]
    ) -> AsyncIterator[Event]:
        """Past events from ``since``, then live ones until ``until`` (unix seconds)."""
        queue: asyncio.Queue[Event] = asyncio.Queue(CLIENT_QUEUE)
        self._clients.add(queue)
        try:
            since_nano = int(since * 1e9) if since is not None else None
            until_nano = int(until * 1e9) if until is not None else None
            last = 0
            if since_nano is not None:
                for event in list(self.history):
                    if event.time_nano < since_nano:
                        continue
                    if until_nano is not None and event.time_nano > until_nano:
                        return
                    last = max(last, event.time_nano)
                    if event_matches(event, filters):
                        yield event
            while True:
                timeout = None
                if until is not None:
                    timeout = until - time.time()
                    if timeout <= 0:
                        return
                try:
                    event = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    return
                if event.time_nano <= last and since_nano is not None:
                    continue  # already replayed from the history
                if until_nano is not None and event.time_nano > until_nano:
                    return
                if event_matches(event, filters):
                    yield event
        finally:
            self._clients.discard(queue)
