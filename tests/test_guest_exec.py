"""How a container process's command is found on PATH (sessions.exec_command), no VM.

execve is replaced by a recorder that raises what the real one would (or stops the
search as a successful exec would): the point is which execve calls are made.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from husk.guest.agent import sessions


class Executed(Exception):
    """What a successful execve does instead of returning."""


def recorder(
    monkeypatch: pytest.MonkeyPatch, failures: dict[str, OSError] | None = None
) -> list[str]:
    calls: list[str] = []

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append(path)
        if failures and path in failures:
            raise failures[path]
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        raise Executed(path)

    monkeypatch.setattr(os, "execve", execve)
    return calls


def program(directory: Path, name: str = "true") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(stat.S_IRWXU)
    return path


def path_of(*directories: Path) -> dict[str, str]:
    return {"PATH": ":".join(str(d) for d in directories)}


def test_only_the_directory_that_holds_the_command_is_executed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = recorder(monkeypatch)
    dirs = [tmp_path / name for name in ("usr-local-sbin", "usr-local-bin", "usr-sbin", "bin")]
    found = program(dirs[-1])
    with pytest.raises(Executed):
        sessions.exec_command(["true"], path_of(*dirs))
    assert calls == [str(found)]  # execvpe made four: three misses first


def test_a_command_found_nowhere_is_not_found_without_an_execve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = recorder(monkeypatch)
    (tmp_path / "a-file").write_text("")  # a PATH entry that is no directory: ENOTDIR
    with pytest.raises(FileNotFoundError):
        sessions.exec_command(["nope"], path_of(tmp_path / "missing", tmp_path))
    with pytest.raises(NotADirectoryError):
        sessions.exec_command(["nope"], path_of(tmp_path / "a-file"))
    with pytest.raises(FileNotFoundError):
        sessions.exec_command(["nope"], {"PATH": ""})
    assert calls == []


def test_execvpe_errors_are_kept_permission_first_then_the_last_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    denied, broken, good = (program(tmp_path / d) for d in ("denied", "broken", "good"))
    calls = recorder(
        monkeypatch,
        {
            str(denied): PermissionError(errno.EACCES, "Permission denied", str(denied)),
            # A script whose interpreter is missing: execve says ENOENT, the search goes on.
            str(broken): FileNotFoundError(errno.ENOENT, "No such file", str(broken)),
        },
    )
    with pytest.raises(Executed):
        sessions.exec_command(
            ["true"], path_of(tmp_path / "denied", tmp_path / "broken", good.parent)
        )
    assert calls == [str(denied), str(broken), str(good)]
    calls.clear()
    with pytest.raises(PermissionError):
        sessions.exec_command(["true"], path_of(tmp_path / "broken", tmp_path / "denied"))
    with pytest.raises(FileNotFoundError):
        sessions.exec_command(["true"], path_of(tmp_path / "broken", tmp_path / "missing"))


def test_a_command_with_a_slash_is_executed_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = recorder(monkeypatch)
    with pytest.raises(FileNotFoundError):
        sessions.exec_command(["./missing"], path_of(tmp_path))
    found = program(tmp_path / "bin")
    with pytest.raises(Executed):
        sessions.exec_command([str(found)], {"PATH": "/nowhere"})
    assert calls == ["./missing", str(found)]


def test_path_comes_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = recorder(monkeypatch)
    found = program(tmp_path / "bin", "tool")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # the agent's own PATH: not used
    with pytest.raises(FileNotFoundError):
        sessions.exec_command(["tool"], {"PATH": str(tmp_path / "elsewhere")})
    with pytest.raises(Executed):
        sessions.exec_command(["tool"], path_of(tmp_path / "elsewhere", found.parent))
    assert calls == [str(found)]
