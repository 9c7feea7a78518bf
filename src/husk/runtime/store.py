"""Container records on disk: one directory per container, its record written atomically."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from husk import paths
from husk.errors import Conflict, InvalidArgument, NotFound
from husk.runtime.model import ContainerRecord

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
RECORD = "config.json"


def validate_name(name: str) -> str:
    name = name.lstrip("/")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"invalid container name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )
    return name


class ContainerStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or paths.data_dir() / "containers"
        paths.ensure_private_dir(self.root)
        self._records: dict[str, ContainerRecord] = {}
        for entry in sorted(self.root.iterdir()):
            path = entry / RECORD
            if not path.exists():
                continue
            try:
                self._records[entry.name] = ContainerRecord.from_json(json.loads(path.read_text()))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("ignoring unreadable container record %s: %s", path, exc)

    def directory(self, container_id: str) -> Path:
        return self.root / container_id

    def save(self, record: ContainerRecord) -> None:
        directory = paths.ensure_private_dir(self.directory(record.id))
        tmp = directory / f".{RECORD}.tmp"
        with open(tmp, "w") as fh:
            json.dump(record.to_json(), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / RECORD)
        self._records[record.id] = record

    def add(self, record: ContainerRecord) -> None:
        if self.find_by_name(record.name) is not None:
            raise Conflict(
                f'the container name "/{record.name}" is already in use by container '
                f'"{self.find_by_name(record.name).id}"'  # type: ignore[union-attr]
                ". You have to remove (or rename) that container to be able to reuse that name."
            )
        self.save(record)

    def delete(self, container_id: str) -> None:
        self._records.pop(container_id, None)
        shutil.rmtree(self.directory(container_id), ignore_errors=True)

    def all(self) -> list[ContainerRecord]:
        return sorted(self._records.values(), key=lambda r: r.created, reverse=True)

    def find_by_name(self, name: str) -> ContainerRecord | None:
        name = name.lstrip("/")
        for record in self._records.values():
            if record.name == name:
                return record
        return None

    def get(self, ref: str) -> ContainerRecord:
        """By full id, name, or unique id prefix (Docker's lookup order)."""
        if not ref:
            raise NotFound("No such container: (empty name)")
        record = self._records.get(ref) or self.find_by_name(ref)
        if record is not None:
            return record
        matches = [r for r in self._records.values() if r.id.startswith(ref.lower())]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InvalidArgument(f"multiple containers match the id prefix {ref!r}")
        raise NotFound(f"No such container: {ref}")

    def names(self) -> set[str]:
        return {r.name for r in self._records.values()}
