"""Container log files: JSON lines, rotation by size, filters, following across rotation."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import husk.runtime.logs as logs_module
from husk.runtime.logs import MAX_FILE_BYTES, READ_BLOCK, LogEntry, LogFile, parse_time


def test_lines_streams_and_binary_survive(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "c.log")
    log.write("stdout", b"first line\nsecond ")
    log.write("stderr", b"oops\n")
    log.write("stdout", b"half\xff\xfe\n")
    log.flush_partial()
    entries = log.read()
    assert [(e.stream, e.data) for e in entries] == [
        ("stdout", b"first line\n"),
        ("stderr", b"oops\n"),
        ("stdout", b"second half\xff\xfe\n"),
    ]
    record = json.loads((tmp_path / "c.log").read_text().splitlines()[0])
    assert set(record) == {"log", "stream", "time"}  # Docker's json-file shape
    assert abs(parse_time(record["time"]) - time.time()) < 5


def test_rotation_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "c.log", max_bytes=2000, keep=3)
    for i in range(400):
        log.write("stdout", f"line {i:04d}\n".encode())
    files = log.files()
    assert 1 < len(files) <= 3
    assert all(f.stat().st_size < 2000 + 200 for f in files)
    numbers = [int(e.data.split()[1]) for e in log.read()]
    assert numbers == list(range(numbers[0], 400))  # the newest lines, in order


def test_filters_tail_since_until(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "c.log")
    log.write("stdout", b"old\n")
    time.sleep(0.05)
    middle = time.time()
    log.write("stderr", b"new-err\n")
    log.write("stdout", b"new-out\n")

    async def collect(**kwargs: object) -> list[bytes]:
        return [e.data async for e in log.entries(follow=False, **kwargs)]  # type: ignore[arg-type]

    assert asyncio.run(collect(tail=1)) == [b"new-out\n"]
    assert asyncio.run(collect(tail=0)) == []
    assert asyncio.run(collect(since=middle)) == [b"new-err\n", b"new-out\n"]
    assert asyncio.run(collect(until=middle)) == [b"old\n"]
    assert asyncio.run(collect(streams=("stderr",))) == [b"new-err\n"]


def test_follow_sees_new_lines_across_rotation_until_stopped(tmp_path: Path) -> None:
    async def main() -> list[int]:
        log = LogFile(tmp_path / "c.log", max_bytes=1500, keep=3)
        stopped = asyncio.Event()
        log.write("stdout", b"line 0000\n")
        seen: list[int] = []

        async def follow() -> None:
            async for entry in log.entries(follow=True, stopped=stopped):
                seen.append(int(entry.data.split()[1]))

        follower = asyncio.ensure_future(follow())
        for i in range(1, 300):
            log.write("stdout", f"line {i:04d}\n".encode())
            if i % 7 == 0:
                await asyncio.sleep(0)  # let the follower run between writes
        stopped.set()
        await asyncio.wait_for(follower, 10)
        return seen

    assert asyncio.run(main()) == list(range(300))


# -------------------------------------------------- bounded reading (issue 10)


def write_big_log(path: Path, size: int, line_bytes: int = 200) -> LogFile:
    """A log of at least ``size`` bytes in full rotated files (written directly: quicker)."""
    log = LogFile(path)
    stamp = "2024-05-01T10:00:00.000000000Z"
    record = {"log": "z" * line_bytes + "\n", "stream": "stdout", "time": stamp}
    line = json.dumps(record).encode() + b"\n"
    per_file = log.max_bytes // len(line)
    names = [path.with_name(f"{path.name}.{i}") for i in range(log.keep - 1, 0, -1)]
    for name in [*names, path]:
        with open(name, "wb") as fh:
            for start in range(0, per_file, 1000):
                fh.write(line * min(1000, per_file - start))
    assert sum(f.stat().st_size for f in log.files()) >= size
    return log


def _numbered_log(path: Path, count: int, *, max_bytes: int = MAX_FILE_BYTES) -> LogFile:
    log = LogFile(path, max_bytes=max_bytes, keep=3)
    for i in range(count):
        log.write("stderr" if i % 3 == 0 else "stdout", f"line {i:07d}\n".encode())
    return log


def _numbers(entries: list[LogEntry]) -> list[int]:
    return [int(e.data.split()[1]) for e in entries]


async def _collect(log: LogFile, **kwargs: Any) -> list[LogEntry]:
    return [e async for e in log.entries(follow=False, **kwargs)]


def test_tail_reads_backwards_across_files_and_filters(tmp_path: Path) -> None:
    log = _numbered_log(tmp_path / "c.log", 3000, max_bytes=20_000)
    assert len(log.files()) == 3
    everything = _numbers(list(log.read()))
    stderr_only = [n for n in everything if n % 3 == 0]
    for tail in (1, 2, 7, 100, 499, 500, 501, 1000, len(everything) - 1, len(everything), 10**9):
        got = asyncio.run(_collect(log, tail=tail))
        assert _numbers(got) == everything[-tail:], tail
        got = asyncio.run(_collect(log, tail=tail, streams=("stderr",)))
        assert _numbers(got) == stderr_only[-tail:], tail
    assert asyncio.run(_collect(log, tail=0)) == []


def test_tail_with_lines_longer_than_a_block(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "c.log")
    sizes = [10, READ_BLOCK - 50, 3 * READ_BLOCK + 7, 5, READ_BLOCK * 2, 1]
    for i, size in enumerate(sizes):
        log.write("stdout", f"{i} ".encode() + b"x" * size + b"\n", split_lines=False)
    for tail in range(1, len(sizes) + 1):
        got = asyncio.run(_collect(log, tail=tail))
        assert [int(e.data.split()[0]) for e in got] == list(range(len(sizes)))[-tail:]
        assert [len(e.data) for e in got] == [len(f"{i} ") + s + 1 for i, s in enumerate(sizes)][
            -tail:
        ]


def test_torn_and_oversized_lines_are_skipped_not_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs_module, "MAX_LINE", 4096)
    path = tmp_path / "c.log"
    log = LogFile(path)
    log.write("stdout", b"before\n")
    with open(path, "ab") as fh:  # a line no writer of husk makes: skipped, both ways
        fh.write(
            b'{"log":"' + b"y" * 50_000 + b'","stream":"stdout","time":"2024-01-01T00:00:00Z"}\n'
        )
    log.write("stdout", b"after\n")
    with open(path, "ab") as fh:
        fh.write(b'{"log":"torn')  # a crash mid-line
    assert [e.data for e in log.read()] == [b"before\n", b"after\n"]
    assert [e.data for e in asyncio.run(_collect(log))] == [b"before\n", b"after\n"]
    assert [e.data for e in asyncio.run(_collect(log, tail=1))] == [b"after\n"]
    assert [e.data for e in asyncio.run(_collect(log, tail=5))] == [b"before\n", b"after\n"]


def test_a_reader_without_follow_ends_where_the_log_ended_when_asked(tmp_path: Path) -> None:
    """Written and rotated while a slow reader is half-way: it ends at its start's end."""

    async def main() -> tuple[list[int], list[int], int]:
        log = _numbered_log(tmp_path / "c.log", 2000, max_bytes=20_000)
        expected = _numbers(list(log.read()))
        rotated = log.generation
        seen: list[int] = []
        async for entry in log.entries(follow=False):
            seen.append(int(entry.data.split()[1]))
            if len(seen) % 50 == 0:  # the writer goes on meanwhile, rotating the files
                for i in range(60):
                    log.write("stdout", f"late {i:07d}\n".encode())
        return seen, expected, log.generation - rotated

    seen, expected, rotations = asyncio.run(main())
    assert rotations >= 2
    assert seen == expected  # all of it, in order, and nothing written after


def test_memory_per_reader_is_bounded_whatever_the_log_size(tmp_path: Path) -> None:
    """The reproduction: every ``logs`` request read the whole log (~30 MB) into memory."""
    log = write_big_log(tmp_path / "c.log", 26 * 1024 * 1024, line_bytes=2000)

    async def consume(**kwargs: Any) -> int:
        count = 0
        async for _ in log.entries(**kwargs):
            count += 1
        return count

    for kwargs in (
        {"follow": False},
        {"follow": False, "tail": 10**9},
        {"follow": False, "tail": 5},
    ):
        tracemalloc.start()
        try:
            count = asyncio.run(consume(**kwargs))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert count > 1000 or kwargs.get("tail") == 5
        assert peak < 4 * 1024 * 1024, (kwargs, peak)
    tracemalloc.start()
    try:
        total = sum(log.bytes_since("1970-01-01T00:00:00Z").values())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 20 * 1024 * 1024
    assert peak < 4 * 1024 * 1024, peak


@pytest.mark.parametrize(
    "text",
    [
        "plain\n",
        "a\nb\n\n\nlast\n",
        'quotes " and \\ backslashes \\n not newlines\n\ttab\r\n',
        "control \x00\x01\x1f\x7f and \u00e9\u4e2d\U0001f600 and \udcff\udc80 escapes\n",
        "every candidate ~ ` ^ | so the per-line way\nsecond ~`^|\n",
        "some ~ and ` but no caret\n" * 50,
        "\n",
    ],
)
def test_chunk_encoding_equals_json_dumps_line_by_line(text: str) -> None:
    """A chunk of lines is quoted at once (one placeholder for its newlines): the result is
    byte for byte what json.dumps gives for each line."""
    from husk.runtime import logs

    stamp = "2026-11-30T15:00:00.123456789Z"
    expected = "".join(
        json.dumps({"log": line + "\n", "stream": "stderr", "time": stamp}, separators=(",", ":"))
        + "\n"
        for line in text.split("\n")[:-1]
    ).encode()
    assert logs._encode_complete_lines(text, "stderr", stamp) == expected
