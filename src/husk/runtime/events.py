"""The runtime's event stream (``docker events``): emitted once, fanned out to subscribers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from husk.runtime.model import ContainerRecord


@dataclass
class Event:
    type: str
    action: str
    id: str
    attributes: dict[str, str]
    time_nano: int


class EventHub:
    """Hands every event to each current subscriber; nothing is kept for later ones."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()

    def emit(self, kind: str, action: str, obj_id: str, **attributes: str) -> None:
        event = Event(kind, action, obj_id, attributes, time.time_ns())
        for queue in self._subscribers:
            queue.put_nowait(event)

    def container_event(self, record: ContainerRecord, action: str, **extra: str) -> None:
        """A container's event, with the labels, name and image Docker attaches to each.

        Clients follow their own containers by label (``docker-compose`` filters the
        stream on ``com.docker.compose.project``), so the labels must be there.
        """
        attributes = {**record.spec.labels, "name": record.name, "image": record.image_ref}
        self.emit("container", action, record.id, **{**attributes, **extra})

    async def subscribe(self) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)
