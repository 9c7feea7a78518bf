"""husk.fileio: whole-file replacement that never leaves a torn or stray file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from husk.fileio import ensure_private_dir, write_file_atomic, write_json_atomic


def test_replaces_the_file_whole_and_privately(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    write_file_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["record.json"]


def test_mode_is_kept_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_file_atomic(tmp_path / "blob", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "blob").stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")

    def no_space(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(OSError, match="No space"):
        write_file_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_json(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1]})
    assert (tmp_path / "a.json").read_text() == '{\n "a": [\n  1\n ],\n "b": 1\n}'
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1], "b": 1}


def test_private_dir(tmp_path: Path) -> None:
    made = ensure_private_dir(tmp_path / "x" / "y")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
