"""Volumes on disk: ``data_dir()/volumes/<name>/volume.json`` and the data in ``_data/``.

The JSON record is written (atomically) after the data directory exists and removed
before it, so a record always names a directory that is there. A sized volume also has
``disk.ext4``, its file system, mounted on ``_data`` (:mod:`husk.volumes.sized`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from husk import fileio
from husk.errors import HuskError
from husk.paths import data_dir
from husk.volumes import sized
from husk.volumes.model import Volume

log = logging.getLogger(__name__)

RECORD = "volume.json"
DATA = "_data"


class VolumeStorageError(HuskError):
    """The data directory refused a volume's files (disk full, read-only, …)."""

    kind = "storage"


class VolumeStore:
    """The volumes in memory, each change written to disk before it counts."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else data_dir() / "volumes"
        self._by_name: dict[str, Volume] = {}
        fileio.ensure_private_dir(self.root)
        self._load()

    def _load(self) -> None:
        for path in sorted(self.root.glob(f"*/{RECORD}")):
            try:
                volume = Volume.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as err:
                # One bad file costs its volume only; its data stays on disk.
                log.warning("ignoring the unreadable volume record %s: %s", path, err)
                continue
            if volume.name != path.parent.name:
                log.warning("ignoring the volume record %s: its name is not its directory", path)
                continue
            volume.mountpoint = str(self.data_dir(volume.name))  # follows a moved data dir
            self._by_name[volume.name] = volume
            try:
                sized.ensure_mounted(self.data_dir(volume.name))  # after a reboot
            except HuskError as err:
                # Containers using it are refused at their start (ensure_mounted again).
                log.warning("volume %s: %s", volume.name, err)

    def directory(self, name: str) -> Path:
        return self.root / name

    def data_dir(self, name: str) -> Path:
        return self.root / name / DATA

    def add(self, volume: Volume) -> None:
        """Makes the volume's directories and writes its record (nothing left on failure)."""
        directory = self.directory(volume.name)
        try:
            fileio.ensure_private_dir(directory)
            # Readable by everyone, as Docker's: the VM's 9p server serves it as is.
            data = self.data_dir(volume.name)
            data.mkdir(mode=0o755, exist_ok=True)
            os.chmod(data, 0o755)
            size = volume.size_bytes
            if size is not None:
                sized.make(data, size)
            fileio.write_json_atomic(directory / RECORD, volume.to_json())
        except BaseException as err:
            with contextlib.suppress(HuskError):
                sized.unmount(self.data_dir(volume.name))
            shutil.rmtree(directory, ignore_errors=True)
            if isinstance(err, OSError):
                raise VolumeStorageError(
                    f"cannot create volume {volume.name}: {err.strerror or err}"
                ) from None
            raise
        self._by_name[volume.name] = volume

    def delete(self, name: str) -> None:
        """The record first (the volume is gone for good), then its data."""
        directory = self.directory(name)
        try:
            with contextlib.suppress(FileNotFoundError):
                (directory / RECORD).unlink()
            if directory.exists():
                fileio.fsync_directory(directory)
        except OSError as err:
            raise VolumeStorageError(
                f"cannot remove volume {name}: {err.strerror or err}"
            ) from None
        self._by_name.pop(name, None)
        try:
            sized.unmount(self.data_dir(name))
        except HuskError as err:
            # Its files stay where they are rather than be deleted through a mount.
            log.warning("keeping the files of volume %s: %s", name, err)
            return

        def note(_function: object, path: str, exc_info: object) -> None:
            log.warning("could not delete %s of volume %s", path, name)

        shutil.rmtree(directory, onerror=note)

    def all(self) -> list[Volume]:
        return sorted(self._by_name.values(), key=lambda v: v.name)

    def find(self, name: str) -> Volume | None:
        return self._by_name.get(name)
