"""A hostile guest against the daemon's end of the protocol: what it sends is bounded in
the daemon's memory and never holds the event loop for a whole frame
(docs/SECURITY.md, "The guest protocol, host end")."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from pathlib import Path

from husk.guest.protocol import MAX_PAYLOAD
from husk.runtime import logs


def test_a_frame_of_empty_lines_is_logged_in_bounded_memory(tmp_path: Path) -> None:
    """One 1 MiB output frame of newlines is a million log lines: encoding them at once
    held ~220 MB of the daemon's memory per frame (a str, a JSON line and a list slot per
    line). Lines are now encoded a slice of the frame at a time."""
    logfile = logs.LogFile(tmp_path / "log", max_bytes=1 << 40)
    tracemalloc.start()
    try:
        logfile.write("stdout", b"\n" * MAX_PAYLOAD)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * 1024 * 1024, f"{peak / 1e6:.0f} MB for one frame"
    lines = (tmp_path / "log").read_bytes().splitlines()
    assert len(lines) == MAX_PAYLOAD
    assert json.loads(lines[-1])["log"] == "\n"


def test_a_frame_split_into_slices_keeps_every_line_whole(tmp_path: Path) -> None:
    logfile = logs.LogFile(tmp_path / "log")
    line = "é" * 100 + "\n"  # two-byte characters across every slice boundary
    data = line.encode() * (3 * logs.LOG_SLICE // len(line.encode()) + 7) + b"tail"
    logfile.write("stdout", data)
    logfile.flush_partial()
    entries = [json.loads(raw) for raw in (tmp_path / "log").read_bytes().splitlines()]
    assert [entry["log"] for entry in entries[:-1]] == [line] * (len(entries) - 1)
    assert entries[-1]["log"] == "tail"
    assert "".join(entry["log"] for entry in entries).encode() == data


def test_logging_a_large_frame_lets_other_tasks_run(tmp_path: Path) -> None:
    """The daemon's event loop serves every container and client: a guest's 1 MiB frame
    of newlines held it for about a second (measured under load: several) in one go."""
    logfile = logs.LogFile(tmp_path / "log", max_bytes=1 << 40)
    turns = 0

    async def other_container() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    async def main() -> None:
        task = asyncio.create_task(other_container())
        await asyncio.sleep(0)
        before = turns
        await logs.write_in_slices(logfile, "stdout", b"\n" * MAX_PAYLOAD, split_lines=True)
        assert turns - before >= MAX_PAYLOAD // logs.LOG_SLICE - 1
        task.cancel()

    asyncio.run(main())
