"""WORKDIR's directories: what the image's layers hold (whiteouts, opaque directories,
implied parents, symlinks followed inside the image) and the layer of those missing."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterable
from typing import IO

import pytest

from husk.build.workdir import WorkdirError, directories_tar, lookup, missing_directories


def _layer(*entries: tuple[str, bytes, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, target in entries:
            member = tarfile.TarInfo(name)
            member.type = kind
            member.linkname = target
            tar.addfile(member, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


def _opener(*layers: bytes) -> tuple[list[int], Callable[[], Iterable[IO[bytes]]]]:
    opened = [0]

    def layers_of() -> Iterable[IO[bytes]]:
        opened[0] += 1
        return [io.BytesIO(layer) for layer in layers]

    return opened, layers_of


DIR, FILE, SYM = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE
BASE = _layer(
    ("usr", DIR, ""),
    ("usr/local", DIR, ""),
    ("etc/passwd", FILE, ""),  # etc implied
    ("var", DIR, ""),
    ("var/run", SYM, "../run"),
    ("opt", DIR, ""),
    ("opt/old", DIR, ""),
    ("loop", SYM, "/loop"),
    ("data", SYM, "/srv/data"),
)


def test_existing_paths_need_nothing() -> None:
    opened, layers_of = _opener(BASE)
    assert missing_directories(layers_of, "/usr/local") == []
    assert missing_directories(layers_of, "/etc") == []
    assert opened == [2]


def test_missing_components_parents_first() -> None:
    _, layers_of = _opener(BASE)
    assert missing_directories(layers_of, "/usr/src/app") == [
        "/usr/src",
        "/usr/src/app",
    ]
    assert missing_directories(layers_of, "/app/") == ["/app"]


def test_symlinks_are_followed_inside_the_image() -> None:
    _, layers_of = _opener(BASE)
    # var/run -> ../run: relative to /var; /run does not exist.
    assert missing_directories(layers_of, "/var/run/x") == [
        "/run",
        "/run/x",
    ]
    assert missing_directories(layers_of, "/data/app") == [
        "/srv",
        "/srv/data",
        "/srv/data/app",
    ]
    with pytest.raises(WorkdirError, match="too many levels of symbolic links"):
        missing_directories(layers_of, "/loop/x")
    with pytest.raises(WorkdirError, match="/etc/passwd is not a directory"):
        missing_directories(layers_of, "/etc/passwd/x")


def test_upper_layers_delete_and_replace() -> None:
    upper = _layer(
        ("usr/.wh.local", FILE, ""),  # usr/local removed
        ("opt", DIR, ""),
        ("opt/.wh..wh..opq", FILE, ""),  # everything of opt below gone...
        ("opt/new", DIR, ""),  # ...but what this layer adds
        ("var", FILE, ""),  # a file replaces the directory and its symlink
    )
    wanted = {"usr", "usr/local", "opt", "opt/old", "opt/new", "var", "var/run"}
    found = lookup([io.BytesIO(BASE), io.BytesIO(upper)], wanted)
    assert set(found) == {"usr", "opt", "opt/new", "var"}
    assert found["var"].kind == "other"


def test_the_layer_of_new_directories() -> None:
    data = directories_tar(["/usr/src", "/usr/src/app"], 1_700_000_000)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["usr/src", "usr/src/app"]
    assert all(m.isdir() and m.mode == 0o755 and (m.uid, m.gid) == (0, 0) for m in members)
