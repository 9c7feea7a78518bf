"""A hostile guest against the daemon's end of the protocol: what it sends is bounded in
the daemon's memory and never holds the event loop for a whole frame
(docs/SECURITY.md, "The guest protocol, host end")."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

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


def test_a_line_longer_than_a_slice_is_still_one_entry(tmp_path: Path) -> None:
    logfile = logs.LogFile(tmp_path / "log")
    long_line = b"x" * (3 * logs.LOG_SLICE) + b"\n"
    logfile.write("stdout", b"a\n" + long_line + b"b\n")
    entries = [json.loads(raw)["log"] for raw in (tmp_path / "log").read_bytes().splitlines()]
    assert entries == ["a\n", long_line.decode(), "b\n"]


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


class _Process:
    def __init__(self, stdout: bytes) -> None:
        self.stdout = stdout
        self.exit_code: int | None = 0

    async def output(self) -> Any:
        yield ("stdout", self.stdout)

    async def release(self) -> None:
        pass


class _Files:
    """A container whose guest answers a stat with ``stdout``."""

    def __init__(self, stdout: bytes) -> None:
        self.stdout = stdout

    async def session(self, path: str, mode: str) -> _Process:
        return _Process(self.stdout)

    def guarded(self, stream: Any) -> Any:
        return stream


@pytest.mark.parametrize(
    "answer",
    [
        {"name": "x", "size": "big", "mode": 0o100644, "mtime": 0, "linkTarget": ""},
        {"name": "x", "size": 1, "mode": 1e400, "mtime": 0, "linkTarget": ""},
        {"name": "x", "size": 1, "mode": 0o100644, "mtime": float("nan"), "linkTarget": ""},
        {"name": "x", "size": 1, "mode": 0o100644, "mtime": 1e300, "linkTarget": ""},
        {"name": "x", "size": 1, "mode": 2**70, "mtime": 0, "linkTarget": ""},
        {"name": ["x"], "size": 1, "mode": 0o100644, "mtime": 0, "linkTarget": ""},
        {"name": "x", "size": -1, "mode": 0o100644, "mtime": 0, "linkTarget": {"a": 1}},
        {"name": "x", "size": 1, "mode": 0o100644, "mtime": True, "linkTarget": ""},
    ],
)
def test_a_guests_stat_answer_is_checked_field_by_field(answer: dict[str, Any]) -> None:
    """``HEAD``/``GET /containers/ID/archive`` turn the guest's stat into Docker's
    ``X-Docker-Container-Path-Stat`` header: a size of ``"big"``, a mode of ``1e400`` or
    a ``NaN`` time was an unhandled ValueError/OverflowError (a 500 with a traceback in
    the daemon's log) instead of an error naming the guest's answer."""
    from husk.errors import GuestError
    from husk.runtime import archive

    payload = json.dumps(answer).encode()  # json writes NaN and Infinity as such
    with pytest.raises(GuestError, match="stat of /x"):
        asyncio.run(archive.stat_path(_Files(payload), "/x"))  # type: ignore[arg-type]


def test_a_plain_stat_answer_still_makes_dockers_header() -> None:
    from husk.daemon.docker.container_io import path_stat_header
    from husk.runtime import archive

    answer = {"name": "f", "size": 3, "mode": 0o100644, "mtime": 1.5, "linkTarget": ""}
    info = asyncio.run(archive.stat_path(_Files(json.dumps(answer).encode()), "/f"))  # type: ignore[arg-type]
    assert info == answer
    path_stat_header(info)


def test_a_deeply_nested_answer_is_a_guest_error_not_a_recursion_error() -> None:
    """A guest's stat or list of changes of 100,000 ``[`` raised RecursionError out of
    ``json.loads`` (neither ValueError nor a GuestError): a 500 with a traceback."""
    from husk.errors import GuestError
    from husk.runtime import archive
    from husk.runtime.changes import BadChanges, parse_changes

    nested = b"[" * 100_000
    with pytest.raises(GuestError, match="stat of /x"):
        asyncio.run(archive.stat_path(_Files(nested), "/x"))  # type: ignore[arg-type]
    with pytest.raises(BadChanges, match="not JSON"):
        parse_changes(nested)


def test_a_stat_name_with_a_lone_surrogate_is_kept_as_text() -> None:
    from husk.daemon.docker.container_io import path_stat_header
    from husk.runtime import archive

    answer = b'{"name": "\\ud800", "size": 0, "mode": 33188, "mtime": 0, "linkTarget": ""}'
    info = asyncio.run(archive.stat_path(_Files(answer), "/x"))  # type: ignore[arg-type]
    assert info["name"] == "\ud800"
    path_stat_header(info)


def test_a_commit_change_of_nested_brackets_is_a_clear_error() -> None:
    """``POST /commit?changes=VOLUME [[[[...`` (a client's text) raised RecursionError."""
    from husk.errors import InvalidArgument
    from husk.runtime.commit import apply_commit_changes

    with pytest.raises(InvalidArgument, match="invalid JSON array"):
        apply_commit_changes(["VOLUME " + "[" * 100_000], {})


TERMINAL_ATTACK = "no such file\r\x1b[2J\x1b]0;owned\x07\x9b1;1H\nforged: line"


def test_a_guests_error_message_reaches_no_terminal_raw() -> None:
    """A guest's ERROR text became the API's error message (``docker exec`` prints it
    raw), the daemon's log and the CLI's error: its control characters are escaped where
    the host reads it."""
    import json as json_module

    from husk.agent import messages
    from husk.guest.protocol import Frame, MsgType

    body = {"message": TERMINAL_ATTACK, "code": "error"}
    frame = Frame(MsgType.ERROR, 3, json_module.dumps(body).encode())
    shown = str(messages.error(frame, "exec"))
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in shown), repr(shown)
    assert shown.startswith("exec: no such file\\r\\x1b[2J")


def test_a_guests_archive_error_reaches_no_terminal_raw() -> None:
    """The archive helper's stderr (``docker cp``'s 400 or 404 message)."""
    from husk.runtime.archive import _archive_error

    for stderr in (TERMINAL_ATTACK, "Could not find the file /x\x1b[2J"):
        shown = str(_archive_error(stderr.encode() + b"\n"))
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in shown), repr(shown)
    assert type(_archive_error(b"Could not find the file /x\x1b")).__name__ == "NotFound"
