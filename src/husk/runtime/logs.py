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
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from husk import timestamps
from husk.runtime.model import now_iso

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 10 * 1024 * 1024
KEEP_FILES = 3
LOG_SLICE = 64 * 1024
"""Output is split into lines and encoded this much at a time: a guest's 1 MiB frame of
newlines is a million lines, ~220 MB of the daemon's memory if encoded at once."""


@dataclass(slots=True)
class LogEntry:
    stream: str
    data: bytes
    time: str

    def unix_time(self) -> float:
        return parse_time(self.time)


parse_time = timestamps.parse
"""RFC 3339 (with up to nanoseconds) to unix seconds."""


_quote = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
"""A str as a JSON string literal, non-ASCII escaped: what ``json.dumps`` does to each string
(C code, without building an encoder and a dict per line)."""


def _encode(entry: LogEntry) -> bytes:
    text = entry.data.decode("utf-8", errors="surrogateescape")
    return _encode_lines([text], entry.stream, entry.time)


def _encode_lines(texts: list[str], stream: str, stamp: str) -> bytes:
    """One JSON line per text, byte for byte what ``json.dumps({"log": text, "stream":
    stream, "time": stamp}, separators=(",", ":"))`` gives, built in one join."""
    tail = ',"stream":' + _quote(stream) + ',"time":' + _quote(stamp) + "}\n"
    return "".join(['{"log":' + _quote(text) + tail for text in texts]).encode("ascii")


_PLACEHOLDERS = "~`^|"
"""Printable characters JSON leaves as they are, one of which stands for the newlines of
a chunk while it is quoted (:func:`_encode_complete_lines`)."""


def _encode_complete_lines(text: str, stream: str, stamp: str) -> bytes:
    """:func:`_encode_lines` of the lines of ``text`` (each ending with a newline), byte
    for byte, with one quoting of the whole chunk instead of a Python turn per line.

    JSON escapes each character on its own, so quoting the chunk equals quoting its lines
    one by one. The newlines are swapped for a printable character the chunk does not
    hold (which the quoting leaves alone), and that character then becomes each line's
    escaped newline and the end of its entry. A chunk holding all the candidates takes
    the per-line way.
    """
    tail = ',"stream":' + _quote(stream) + ',"time":' + _quote(stamp) + "}\n"
    for mark in _PLACEHOLDERS:
        if mark not in text:
            break
    else:
        return _encode_lines([line + "\n" for line in text.split("\n")[:-1]], stream, stamp)
    quoted = _quote(text.replace("\n", mark))[1:-1]  # without its enclosing quotes
    entries = quoted.replace(mark, '\\n"' + tail + '{"log":"')
    return ('{"log":"' + entries[: -len('{"log":"')]).encode("ascii")


_json_decode = json.JSONDecoder().decode


def _decode(line: bytes) -> LogEntry | None:
    try:
        # Decoded to text first: json.loads(bytes) would sniff the encoding of every line.
        record = _json_decode(line.decode("utf-8", errors="surrogateescape"))
        text, stream, stamp = record["log"], record["stream"], record["time"]
        if not (type(text) is str and type(stream) is str and type(stamp) is str):
            return None  # not a line husk wrote
        return LogEntry(stream, text.encode("utf-8", errors="surrogateescape"), stamp)
    except (ValueError, KeyError, TypeError):
        return None  # a line torn by a crash mid-write


def line_slices(data: bytes) -> Iterator[bytes]:
    """``data`` in pieces of at most :data:`LOG_SLICE` that end at a newline (a longer
    line is one piece of its own, so lines are logged as they would be all at once)."""
    start, size = 0, len(data)
    while size - start > LOG_SLICE:
        end = data.rfind(b"\n", start, start + LOG_SLICE) + 1
        if end <= start:
            end = data.find(b"\n", start + LOG_SLICE) + 1 or size
        yield data[start:end]
        start = end
    if start < size:
        yield data[start:]


async def write_in_slices(logfile: LogFile, stream: str, data: bytes, *, split_lines: bool) -> None:
    """``logfile.write`` a slice of lines at a time (:func:`line_slices`), letting the
    event loop serve other containers and clients between slices (a frame of empty
    lines takes about a second)."""
    if not split_lines:
        logfile.write(stream, data, split_lines=False)
        return
    for index, piece in enumerate(line_slices(data)):
        if index:
            await asyncio.sleep(0)
        logfile.write(stream, piece)


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
        self.generation = 0
        """How many times this log rotated: the current file is this generation, the file
        ``name.K`` generation - K. Readers name files so, not by inode (a deleted file's
        inode is soon reused by a new one)."""

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
        for piece in line_slices(data) if len(data) > LOG_SLICE else (data,):
            self._write_lines(stream, piece)

    def _write_lines(self, stream: str, data: bytes) -> None:
        buffer = self._partial[stream]
        if buffer:
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        # The whole chunk is decoded and split at once (a chunk holds many lines): a
        # newline is never part of a multi-byte sequence, so this is the same as
        # decoding line by line.
        complete = data.rfind(b"\n") + 1
        stamp = now_iso()
        lines = data[:complete].decode("utf-8", errors="surrogateescape")
        encoded = _encode_complete_lines(lines, stream, stamp) if lines else b""
        rest = data[complete:]
        if len(rest) >= 16 * 1024:  # a very long line is logged in parts, as Docker does
            rest_text = rest.decode("utf-8", errors="surrogateescape")
            encoded += _encode_lines([rest_text], stream, stamp)
        else:
            buffer += rest
        if encoded:
            self._commit(encoded)

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
        if entries:
            self._commit(b"".join(_encode(e) for e in entries))

    def _commit(self, payload: bytes) -> None:
        """Writes whole encoded entries (see :meth:`_append`), rotates, wakes followers."""
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
        self.generation += 1

    def bytes_since(self, started_at: str) -> dict[str, int]:
        """Output bytes logged per stream since ``started_at``: where a resumed run picks up."""
        since = parse_time(started_at)
        totals = {"stdout": 0, "stderr": 0}
        for entry in self.read():
            if entry.stream in totals and entry.unix_time() >= since:
                totals[entry.stream] += len(entry.data)
        return totals

    def read(self) -> Iterator[LogEntry]:
        """Every entry on disk, oldest first, read in bounded blocks."""
        reader = _Reader(self, self._oldest_start(), end=None)
        try:
            while (batch := reader.next_block()) is not None:
                yield from batch
        finally:
            reader.close()

    def entries(
        self,
        *,
        follow: bool,
        tail: int | None = None,
        since: float | None = None,
        until: float | None = None,
        streams: tuple[str, ...] = ("stdout", "stderr"),
        stopped: asyncio.Event | None = None,
    ) -> AsyncIterator[LogEntry]:
        """:meth:`batches`, one entry at a time."""
        batches = self.batches(
            follow=follow, tail=tail, since=since, until=until, streams=streams, stopped=stopped
        )
        return one_by_one(batches)

    def batches(
        self,
        *,
        follow: bool,
        tail: int | None = None,
        since: float | None = None,
        until: float | None = None,
        streams: tuple[str, ...] = ("stdout", "stderr"),
        stopped: asyncio.Event | None = None,
    ) -> AsyncIterator[list[LogEntry]]:
        """Existing entries (filtered), then with ``follow`` new ones until ``stopped`` is set,
        in batches of what one block of the file held (never empty): a client is sent one
        write per batch, not one per line.

        Where the output starts and (without ``follow``) ends is fixed here, when this is
        called, not when the caller first iterates: an attach subscribes to new output at
        the same moment. The entries themselves are read from the files block by block as
        the caller takes them, so a reader costs a few blocks of memory whatever the size
        of the log and however slowly it is consumed.
        """

        def wanted(entry: LogEntry) -> bool:
            if entry.stream not in streams:
                return False
            if since is None and until is None:
                return True
            stamp = entry.unix_time()
            return (since is None or stamp >= since) and (until is None or stamp <= until)

        end = self._end_position()
        if tail is None:
            start = self._oldest_start()
        else:
            start = self._tail_start(max(tail, 0), wanted, end)
        reader = _Reader(self, start, end=None if follow else end)
        return self._stream(reader, wanted, follow=follow, until=until, stopped=stopped)

    async def _stream(
        self,
        reader: _Reader,
        wanted: Callable[[LogEntry], bool],
        *,
        follow: bool,
        until: float | None,
        stopped: asyncio.Event | None,
    ) -> AsyncIterator[list[LogEntry]]:
        try:
            while True:
                batch = reader.next_block()
                if batch is not None:
                    kept = [entry for entry in batch if wanted(entry)]
                    if kept:
                        yield kept
                    continue
                # Caught up. Nothing is written between the read that said so and this
                # line (both run on the event loop), so no write can be missed here.
                changed = self._changed
                if not follow or (stopped is not None and stopped.is_set()):
                    return
                if until is not None and datetime.now().timestamp() > until:
                    return
                waiters = [asyncio.ensure_future(changed.wait())]
                if stopped is not None:
                    waiters.append(asyncio.ensure_future(stopped.wait()))
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
        finally:
            reader.close()

    # -- positions: (generation, offset) ------------------------------------------
    def chain(self) -> list[Path]:
        """The log's file names, newest first (whether or not each exists)."""
        rotated = [self.path.with_name(f"{self.path.name}.{i}") for i in range(1, self.keep)]
        return [self.path, *rotated]

    def path_of(self, generation: int) -> Path | None:
        """The name of the file of ``generation`` (None: rotated out, or not yet made)."""
        age = self.generation - generation
        return self.chain()[age] if 0 <= age < self.keep else None

    def _end_position(self) -> tuple[int, int]:
        """Where the log ends now."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        return (self.generation, size)

    def _oldest_start(self) -> tuple[int, int]:
        """The start of the oldest file that may still be on disk."""
        return (self.generation - self.keep + 1, 0)

    def _tail_start(
        self, count: int, wanted: Callable[[LogEntry], bool], end: tuple[int, int]
    ) -> tuple[int, int]:
        """Where the last ``count`` wanted entries begin, found by reading backwards.

        Files are read from their end in bounded blocks and only counted, never kept:
        memory does not grow with ``count`` or with the size of the log.
        """
        if count == 0:
            return end
        found = 0
        for age, path in enumerate(self.chain()):
            generation = self.generation - age
            try:
                fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
            except FileNotFoundError:
                continue
            with fh:
                size = end[1] if generation == end[0] else os.fstat(fh.fileno()).st_size
                for offset, line in _lines_backwards(fh.fileno(), size):
                    entry = _decode(line) if line is not None else None
                    if entry is not None and wanted(entry):
                        found += 1
                        if found == count:
                            return (generation, offset)
        return self._oldest_start()


async def one_by_one(batches: AsyncIterator[list[LogEntry]]) -> AsyncIterator[LogEntry]:
    async for batch in batches:
        for entry in batch:
            yield entry


MAX_LINE = 1024 * 1024
"""Longest line read back (the writer's are under 128 KiB); longer ones are skipped."""
READ_BLOCK = 64 * 1024


def _lines_backwards(fd: int, size: int) -> Iterator[tuple[int, bytes | None]]:
    """(offset, line) of each complete line before ``size``, newest first.

    A line longer than :data:`MAX_LINE` comes as ``None``. Bytes after the last
    newline (a line being torn by a crash) are not a line. At most one block and
    one line are held at a time.
    """
    block_start, block = size, b""

    def newline_before(position: int) -> int:
        """The offset of the last newline before ``position`` (-1: none)."""
        nonlocal block_start, block
        while True:
            if position > block_start:
                index = block.rfind(b"\n", 0, position - block_start)
                if index >= 0:
                    return block_start + index
                position = block_start
            if block_start == 0:
                return -1
            earlier = max(0, block_start - READ_BLOCK)
            block = os.pread(fd, block_start - earlier, earlier)
            if not block:  # the file shrank under us: treat what is left as its start
                return -1
            block_start = earlier

    line_end = newline_before(size)
    while line_end >= 0:
        previous = newline_before(line_end)
        start = previous + 1
        if line_end - start > MAX_LINE:
            line: bytes | None = None
        elif block_start <= start and line_end <= block_start + len(block):
            line = block[start - block_start : line_end - block_start]
        else:  # the line spans blocks
            line = os.pread(fd, line_end - start, start)
        yield start, line
        line_end = previous


class _Reader:
    """Reads a log forward from a position, block by block, across rotations.

    Files are named by generation (see :attr:`LogFile.generation`): rotation renames
    them while a slow reader is somewhere in the middle. The file being read stays
    open; once it has been rotated and read to its end, the next generation follows.
    Opening a file by name and deciding which generation it is happen together, with
    no await in between, so the writer (on the same event loop) cannot rotate between.
    """

    def __init__(self, log: LogFile, start: tuple[int, int], *, end: tuple[int, int] | None):
        self._log = log
        self._generation, self._offset = start
        self._end = end
        self._fd: int | None = None
        self._partial = bytearray()
        self._skipping = False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def next_block(self) -> list[LogEntry] | None:
        """The entries of the next block read (maybe none); None when there is nothing more now.

        "Nothing more now" is the end given (a reader with an end is then finished) or,
        without one, the end of what has been written so far (more may come).
        """
        if self._fd is None and not self._open_from(self._generation, self._offset):
            return None
        assert self._fd is not None
        limit = READ_BLOCK
        if self._end is not None and self._generation == self._end[0]:
            limit = min(limit, self._end[1] - self._offset)
            if limit <= 0:
                return None
        data = os.pread(self._fd, limit, self._offset)
        if data:
            self._offset += len(data)
            return self._lines(data)
        if self._generation >= self._log.generation:
            return None  # caught up with the writer
        # This file was rotated and is read to its end: on to the next generation.
        self.close()
        if self._end is not None and self._generation >= self._end[0]:
            return None
        return [] if self._open_from(self._generation + 1, 0) else None

    def _open_from(self, generation: int, offset: int) -> bool:
        """Opens the file of ``generation`` (at ``offset``), or the oldest newer one left."""
        for candidate in range(generation, self._log.generation + 1):
            if self._end is not None and candidate > self._end[0]:
                return False
            path = self._log.path_of(candidate)
            if path is None:
                continue  # rotated out before this reader got to it
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            self._generation = candidate
            self._offset = offset if candidate == generation else 0
            self._partial.clear()
            self._skipping = False
            return True
        # Nothing on disk yet (a log not written to): wait there.
        self._generation, self._offset = generation, offset
        return False

    def _lines(self, data: bytes) -> list[LogEntry]:
        """Entries of the complete lines in ``data`` (with what came before it)."""
        entries = []
        position = 0
        while (newline := data.find(b"\n", position)) >= 0:
            if self._skipping:
                self._skipping = False
            else:
                self._partial += data[position:newline]
                if len(self._partial) <= MAX_LINE:
                    entry = _decode(bytes(self._partial))
                    if entry is not None:
                        entries.append(entry)
            self._partial.clear()
            position = newline + 1
        if not self._skipping:
            self._partial += data[position:]
            if len(self._partial) > MAX_LINE:
                self._partial.clear()
                self._skipping = True
        return entries
