"""Container log files: JSON lines, rotation by size, filters, following across rotation."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from husk.runtime.logs import LogFile, parse_time


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
