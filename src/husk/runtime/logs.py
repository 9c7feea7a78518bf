"""Container logs on disk: JSON lines (Docker's json-file shape), rotated by size.

Each line is ``{"log": text, "stream": "stdout"|"stderr", "time": RFC 3339}``; bytes that
are not UTF-8 survive through surrogate escapes. Followers are woken in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from husk.runtime.model import now_iso

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 10 * 1024 * 1024
KEEP_FILES = 3


@dataclass
class LogEntry:
    stream: str
    data: bytes
    time: str

    def unix_time(self) -> float:
        return parse_time(self.time)


def parse_time(stamp: str) -> float:
    """RFC 3339 (with up to nanoseconds) to unix seconds."""
    main, _, frac = stamp.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(main + "+00:00").timestamp()
    return seconds + (float("0." + frac) if frac else 0.0)


def _encode(entry: LogEntry) -> bytes:
    text = entry.data.decode("utf-8", errors="surrogateescape")
    record = {"log": text, "stream": entry.stream, "time": entry.time}
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _decode(line: bytes) -> LogEntry | None:
    try:
        record = json.loads(line)
        data = str(record["log"]).encode("utf-8", errors="surrogateescape")
        return LogEntry(str(record["stream"]), data, str(record["time"]))
    except (ValueError, KeyError, TypeError):
        return None  # a line torn by a crash mid-write


class LogFile:
    """The log of one container; one writer (the runtime), any number of readers."""

    def __init__(self, path: Path, max_bytes: int = MAX_FILE_BYTES, keep: int = KEEP_FILES):
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._changed = asyncio.Event()
        self._partial: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.write_error: str | None = None
        """Why output is being lost right now (None while writes work)."""
        self.dropped_bytes = 0

    def files(self) -> list[Path]:
        """Oldest first."""
        rotated = [
            self.path.with_name(f"{self.path.name}.{i}") for i in range(self.keep - 1, 0, -1)
        ]
        return [p for p in [*rotated, self.path] if p.exists()]

    def write(self, stream: str, data: bytes, *, split_lines: bool = True) -> None:
        """Appends output; complete lines become entries (a tty's raw chunks pass as they come)."""
        if not split_lines:
            self._append([LogEntry(stream, data, now_iso())])
            return
        buffer = self._partial[stream]
        buffer += data
        entries = []
        stamp = now_iso()
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                break
            entries.append(LogEntry(stream, bytes(buffer[: newline + 1]), stamp))
            del buffer[: newline + 1]
        if len(buffer) >= 16 * 1024:  # a very long line is logged in parts, as Docker does
            entries.append(LogEntry(stream, bytes(buffer), stamp))
            buffer.clear()
        self._append(entries)

    def flush_partial(self) -> None:
        """At exit, an unterminated last line is still logged."""
        entries = [
            LogEntry(stream, bytes(buf), now_iso()) for stream, buf in self._partial.items() if buf
        ]
        for buf in self._partial.values():
            buf.clear()
        self._append(entries)

    def _append(self, entries: list[LogEntry]) -> None:
        """Appends whole entries; a write the disk refuses drops them and is reported once.

        Output of a running container must keep flowing whatever the host's disk
        does (a full or read-only data directory): the workload would block on its
        pipes otherwise. A short write is cut back so no torn line stays behind.
        """
        if not entries:
            return
        payload = b"".join(_encode(e) for e in entries)
        try:
            size = self._write(payload)
        except OSError as err:
            self.dropped_bytes += len(payload)
            if self.write_error is None:
                log.warning("container log %s: output is being lost: %s", self.path, err)
            self.write_error = err.strerror or str(err)
            return
        if size >= self.max_bytes:
            try:
                self._rotate()
            except OSError as err:
                log.warning("container log %s: cannot rotate: %s", self.path, err)
        if self.write_error is not None:
            log.warning(
                "container log %s: writing again after losing %d bytes of output",
                self.path,
                self.dropped_bytes,
            )
            self.write_error = None
        self._changed.set()
        self._changed = asyncio.Event()

    def _write(self, payload: bytes) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        for i in range(self.keep - 1, 0, -1):
            source = self.path if i == 1 else self.path.with_name(f"{self.path.name}.{i - 1}")
            if source.exists():
                os.replace(source, self.path.with_name(f"{self.path.name}.{i}"))

    def bytes_since(self, started_at: str) -> dict[str, int]:
        """Output bytes logged per stream since ``started_at``: where a resumed run picks up."""
        since = parse_time(started_at)
        totals = {"stdout": 0, "stderr": 0}
        for entry in self.read():
            if entry.stream in totals and entry.unix_time() >= since:
                totals[entry.stream] += len(entry.data)
        return totals

    def read(self) -> list[LogEntry]:
        entries: list[LogEntry] = []
        for path in self.files():
            with open(path, "rb") as fh:
                for line in fh:
                    entry = _decode(line)
                    if entry is not None:
                        entries.append(entry)
        return entries

    async def entries(
        self,
        *,
        follow: bool,
        tail: int | None = None,
        since: float | None = None,
        until: float | None = None,
        streams: tuple[str, ...] = ("stdout", "stderr"),
        stopped: asyncio.Event | None = None,
    ) -> AsyncIterator[LogEntry]:
        """Existing entries (filtered), then with ``follow`` new ones until ``stopped`` is set."""

        def wanted(entry: LogEntry) -> bool:
            if entry.stream not in streams:
                return False
            if since is None and until is None:
                return True
            stamp = entry.unix_time()
            return (since is None or stamp >= since) and (until is None or stamp <= until)

        changed = self._changed
        # Where the follow starts is taken together with the read, before the first
        # yield: anything written while the caller consumes these is read afterwards.
        existing = [e for e in self.read() if wanted(e)]
        position = self._position()
        if tail is not None:
            existing = existing[-tail:] if tail > 0 else []
        for entry in existing:
            yield entry
        if not follow:
            return
        while True:
            if stopped is not None and stopped.is_set():
                # drain what was written before the stop, then end
                for entry in self._read_from(position)[0]:
                    if wanted(entry):
                        yield entry
                return
            waiters = [asyncio.ensure_future(changed.wait())]
            if stopped is not None:
                waiters.append(asyncio.ensure_future(stopped.wait()))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            changed = self._changed
            new, position = self._read_from(position)
            for entry in new:
                if wanted(entry):
                    yield entry
            if until is not None and datetime.now().timestamp() > until:
                return

    def _position(self) -> tuple[int, int]:
        """(inode, offset) of the end of the current file."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return (0, 0)
        return (info.st_ino, info.st_size)

    def _read_from(self, position: tuple[int, int]) -> tuple[list[LogEntry], tuple[int, int]]:
        inode, offset = position
        entries: list[LogEntry] = []
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return entries, position
        if info.st_ino != inode:
            # Rotated (maybe more than once): finish the file we were reading, wherever it
            # went, then every newer rotated file, then the current one from the start.
            rotated = [self.path.with_name(f"{self.path.name}.{i}") for i in range(1, self.keep)]
            newer: list[Path] = []
            for path in rotated:
                try:
                    if path.stat().st_ino == inode:
                        entries += self._read_file(path, offset)[0]
                        break
                except FileNotFoundError:
                    continue
                newer.append(path)
            else:  # our file was rotated out entirely: everything still on disk is newer
                newer = [path for path in rotated if path.exists()]
            for path in reversed(newer):
                entries += self._read_file(path, 0)[0]
            offset = 0
        new, offset = self._read_file(self.path, offset)
        return entries + new, (info.st_ino, offset)

    @staticmethod
    def _read_file(path: Path, offset: int) -> tuple[list[LogEntry], int]:
        """Complete lines from ``offset`` on, and the offset after the last one."""
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        entries = []
        for line in data[:end].splitlines():
            entry = _decode(line)
            if entry is not None:
                entries.append(entry)
        return entries, offset + end
