"""Container records on disk: one directory per container, its record written atomically.

A record is replaced by rename, never rewritten in place, so a full disk or a crash
leaves the previous record, never a truncated one. A record that cannot be read
anyway (damaged by hand, by a foreign tool) is reported and stands in the list as
a dead container with the reason, which ``rm`` can remove: it never stops the
daemon from starting. Removal deletes the record last, so a removal that fails
halfway leaves a record that names the container, and the next removal finishes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path

from husk import paths
from husk.errors import Conflict, HuskError, InvalidArgument, NotFound
from husk.fileio import fsync_directory, write_file_atomic
from husk.runtime.model import ContainerRecord

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
RECORD = "config.json"
_TEMPORARY_SUFFIX = ".tmp"


class StorageError(HuskError):
    """The data directory refused a write or a deletion (disk full, read-only, …)."""

    kind = "storage"


def validate_name(name: str) -> str:
    name = name.lstrip("/")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"invalid container name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )
    return name


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


class ContainerStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or paths.data_dir() / "containers"
        try:
            paths.ensure_private_dir(self.root)
        except OSError as err:
            if not self.root.is_dir():
                raise StorageError(f"cannot create {self.root}: {_reason(err)}") from err
            # A read-only data directory still lets the daemon list (and stop) containers.
            log.warning("container directory %s is not writable: %s", self.root, _reason(err))
        self._records: dict[str, ContainerRecord] = {}
        self.unreadable: set[str] = set()
        """Ids whose record on disk could not be read; they stand as dead placeholders."""
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                continue
            self._load(entry)

    def _load(self, directory: Path) -> None:
        for stale in directory.glob(f".{RECORD}*{_TEMPORARY_SUFFIX}"):
            with contextlib.suppress(OSError):
                stale.unlink()  # a save cut short by a crash; the record itself is whole
        path = directory / RECORD
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return  # created or removed halfway: nothing names a container
        except OSError as err:
            self._stand_in(directory.name, f"cannot read {path}: {_reason(err)}")
            return
        try:
            record = ContainerRecord.from_json(json.loads(text))
            if record.id != directory.name:
                raise ValueError(f"it names container {record.id!r}, not its directory's")
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
            self._stand_in(directory.name, f"unreadable container record {path}: {err}")
            return
        self._records[record.id] = record

    def _stand_in(self, container_id: str, reason: str) -> None:
        log.error("%s; the container is listed as dead until it is removed", reason)
        self._records[container_id] = ContainerRecord.unreadable(container_id, reason)
        self.unreadable.add(container_id)

    def directory(self, container_id: str) -> Path:
        return self.root / container_id

    def save(self, record: ContainerRecord) -> None:
        """Writes ``record`` atomically; StorageError (the old record stays) on failure."""
        if record.id in self.unreadable:
            raise Conflict(
                f"container {record.id} has an unreadable record ({record.state.error}); "
                "it can only be removed"
            )
        directory = self.directory(record.id)
        data = json.dumps(record.to_json(), indent=1).encode()
        try:
            if not directory.is_dir():
                paths.ensure_private_dir(directory)
            write_file_atomic(directory / RECORD, data)
        except OSError as err:
            raise StorageError(
                f"cannot save the state of container {record.name} ({record.id[:12]}) "
                f"in {directory}: {_reason(err)}"
            ) from err
        self._records[record.id] = record

    def add(self, record: ContainerRecord) -> None:
        existing = self.find_by_name(record.name)
        if existing is not None:
            raise Conflict(
                f'the container name "/{record.name}" is already in use by container '
                f'"{existing.id}". You have to remove (or rename) that container to be able '
                "to reuse that name."
            )
        self.save(record)

    def delete(self, container_id: str) -> None:
        """Deletes the container's directory, its record last.

        Raises StorageError naming every path that could not be deleted. The record
        is deleted only once everything else is gone, so after a failure the
        container is still listed (here and after a daemon restart) and a later
        delete finishes the job.
        """
        directory = self.directory(container_id)
        failures: list[str] = []

        def note(
            _function: object, path: str, exc_info: tuple[type, BaseException, object]
        ) -> None:
            error = exc_info[1]
            reason = _reason(error) if isinstance(error, OSError) else str(error)
            failures.append(f"{path}: {reason}")

        try:
            entries = sorted(directory.iterdir())
        except FileNotFoundError:
            entries = []
        except OSError as err:
            raise StorageError(f"cannot list {directory}: {_reason(err)}") from err
        for entry in entries:
            if entry.name == RECORD:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, onerror=note)
            else:
                try:
                    entry.unlink()
                except FileNotFoundError:
                    pass
                except OSError as err:
                    failures.append(f"{entry}: {_reason(err)}")
        if failures:
            raise StorageError("could not delete " + "; ".join(failures))
        try:
            (directory / RECORD).unlink(missing_ok=True)
            if directory.is_dir():
                fsync_directory(directory)
        except OSError as err:
            raise StorageError(f"could not delete {directory / RECORD}: {_reason(err)}") from err
        self._records.pop(container_id, None)
        self.unreadable.discard(container_id)
        try:
            directory.rmdir()
            fsync_directory(self.root)
        except FileNotFoundError:
            pass
        except OSError as err:
            # The record is gone, so nothing names the container any more.
            log.warning("left the empty directory %s behind: %s", directory, _reason(err))

    def forget(self, container_id: str) -> None:
        """Deletes whatever a create that failed left behind, silently (best effort)."""
        self._records.pop(container_id, None)
        shutil.rmtree(self.directory(container_id), ignore_errors=True)

    def all(self) -> list[ContainerRecord]:
        return sorted(self._records.values(), key=lambda r: r.created, reverse=True)

    def holds(self, container_id: str) -> bool:
        """Whether a record of ``container_id`` (by full id) is stored."""
        return container_id in self._records

    def find(self, container_id: str) -> ContainerRecord | None:
        """The record of ``container_id`` (by full id), or None."""
        return self._records.get(container_id)

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
