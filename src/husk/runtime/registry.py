"""The Container objects of the records in the store: one per container, while it exists."""

from __future__ import annotations

from husk.runtime.container import Container, Host, Live
from husk.runtime.model import ContainerRecord
from husk.runtime.store import ContainerStore


class ContainerRegistry:
    """Finds (and makes, when first needed) the :class:`Container` of a record."""

    def __init__(self, store: ContainerStore, host: Host) -> None:
        self.store = store
        self._host = host
        self._by_id: dict[str, Container] = {}
        """The Container of each record, made when first needed, dropped on removal."""

    def get(self, ref: str) -> Container:
        """The container ``ref`` names: full id, name or unique id prefix (NotFound)."""
        return self.of(self.store.get(ref))

    def of(self, record: ContainerRecord) -> Container:
        container = self._by_id.get(record.id)
        if container is not None and container.record is record:
            return container
        container = Container(record, self.store, self._host)
        # A late caller holding a removed container's record gets a detached object:
        # nothing of a removed container is kept.
        if self.store.holds(record.id):
            self._by_id[record.id] = container
        return container

    def find(self, container_id: str) -> Container | None:
        """The container of a full id, None once it is removed."""
        record = self.store.find(container_id)
        return None if record is None else self.of(record)

    def held(self, container_id: str) -> Container | None:
        """The Container already made for ``container_id``, if any (never makes one)."""
        return self._by_id.get(container_id)

    def held_ids(self) -> set[str]:
        return set(self._by_id)

    def all_held(self) -> list[Container]:
        return list(self._by_id.values())

    @property
    def live(self) -> dict[str, Live]:
        """The live VM handles of the running containers, by id (a snapshot)."""
        return {cid: c.live for cid, c in self._by_id.items() if c.live is not None}

    def live_of(self, container_id: str) -> Live | None:
        container = self._by_id.get(container_id)
        return container.live if container is not None else None

    def forget(self, container: Container) -> None:
        """Drops a removed container and everything it held (lock, bus, logs, waiters)."""
        if self._by_id.get(container.id) is container:
            del self._by_id[container.id]
