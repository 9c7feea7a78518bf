"""``husk cp CONTAINER:SRC DEST``: a guest's endless archive stops before it fills a disk.

The CLI keeps a container's archive whole before extracting it (it is checked first).
The guest makes that archive and may stream for ever whatever its stat said: the CLI
spooled it into the temporary directory (often a tmpfs: host memory) until that was
full. It now spools beside the destination and stops, with a one-line error, once the
file system there would keep less than its reserve. No VM: a fake daemon's response
of endless tar blocks, the file system's free space as ``statvfs`` tells it."""

from __future__ import annotations

import base64
import json
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from husk import errors
from husk.cli import cp

STREAM_CAP = 256 << 20
"""Where the fake guest gives up (four times the file system): "for ever" in a test."""


class _EndlessArchive:
    """What the daemon relays from a hostile guest: a file's header, then data "for ever"."""

    def __init__(self, given: list[int]) -> None:
        stat = {"name": "f", "size": 1, "mode": 0o644, "mtime": 0, "linkTarget": ""}
        self.headers = {cp.STAT_HEADER: base64.b64encode(json.dumps(stat).encode()).decode()}
        self._given = given

    def iter_body(self) -> Iterator[bytes]:
        info = tarfile.TarInfo("f")
        info.size = 1 << 60
        yield info.tobuf(tarfile.GNU_FORMAT)
        block = bytes(1 << 20)
        while self._given[0] < STREAM_CAP:
            self._given[0] += len(block)
            yield block


class _Api:
    def __init__(self) -> None:
        self.given = [0]

    @contextmanager
    def open(self, method: str, path: str, **_: Any) -> Iterator[_EndlessArchive]:
        yield _EndlessArchive(self.given)


def test_an_endless_archive_stops_at_the_destinations_reserve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = _Api()
    monkeypatch.setattr(cp, "inspect", lambda api, container: {})
    dest = tmp_path / "dest"
    dest.mkdir()
    total = 64 << 20
    spools: list[str] = []
    real_statvfs = os.statvfs

    def statvfs(path: str | Path) -> os.statvfs_result:
        """A 64 MiB file system whose free space is what the spool left (what was read)."""
        spools.append(os.fspath(path))
        fields = list(real_statvfs(path))
        fields[0] = fields[1] = 4096  # f_bsize, f_frsize
        fields[2] = total // 4096  # f_blocks
        fields[3] = fields[4] = max(0, total - api.given[0]) // 4096  # f_bfree, f_bavail
        return os.statvfs_result(fields)

    monkeypatch.setattr(cp.os, "statvfs", statvfs)
    with pytest.raises(errors.HuskError) as refused:
        cp.copy_from_container(api, "c1", "/f", str(dest), quiet=True)  # type: ignore[arg-type]
    message = str(refused.value)
    assert "\n" not in message and "free" in message, message
    assert spools and all(Path(p) == dest for p in spools), spools
    assert api.given[0] <= total, f"read {api.given[0]} bytes of a {total}-byte file system"
    assert sorted(os.listdir(dest)) == []  # the spool is gone, nothing extracted
