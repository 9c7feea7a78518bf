"""``WORKDIR``: which directories of the path the image lacks, and the layer making them.

Docker's classic builder makes the working directory in a container of the image
(``mkdir -p`` as root, mode 0755: owned by root whatever ``USER`` says) and commits
it. husk finds the missing components from the image's layer tars (names and types
only, no file is unpacked on the host), following symlinks inside the image as
``mkdir -p`` in the container would, and writes a layer of the new directories only:
existing parents keep their owners and modes.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

from husk.errors import InvalidArgument
from husk.oci.tarsafe import open_tar

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_SYMLINKS = 40  # Linux's MAXSYMLINKS
PATH_MAX = 4096  # Linux's: a longer working directory could not be entered anyway
DIRECTORY_MODE = 0o755


class WorkdirError(InvalidArgument):
    """The working directory cannot be made (a component is a file, a symlink loop)."""


@dataclass(frozen=True)
class Node:
    kind: str  # "dir", "symlink" or "other"
    target: str = ""  # a symlink's


def _normal(name: str) -> str:
    name = name.removeprefix("./").strip("/")
    return posixpath.normpath(name) if name else ""


def _under(name: str, parent: str) -> bool:
    return name.startswith(parent + "/")


def lookup(layers: Iterable[IO[bytes]], wanted: set[str]) -> dict[str, Node]:
    """What each name of ``wanted`` (relative, normalised) is in the image whose layer
    tars (uncompressed, lowest first) ``layers`` are; absent names are left out."""
    found: dict[str, Node] = {}
    for stream in layers:
        added: set[str] = set()
        with open_tar(stream, "r|") as tar:
            for entry in tar:
                name = _normal(entry.name)
                parent, _, base = name.rpartition("/")
                # An entry's parents exist, even where a layer leaves them implied.
                ancestor = parent
                while ancestor and ancestor not in found:
                    if ancestor in wanted:
                        found[ancestor] = Node("dir")
                        added.add(ancestor)
                    ancestor = ancestor.rpartition("/")[0]
                if base == OPAQUE_MARKER:
                    for path in [p for p in found if _under(p, parent) or not parent]:
                        if path not in added and path != parent:
                            del found[path]
                    continue
                if base.startswith(WHITEOUT_PREFIX):
                    gone = posixpath.join(parent, base[len(WHITEOUT_PREFIX) :])
                    for path in [p for p in found if p == gone or _under(p, gone)]:
                        del found[path]
                    continue
                if not entry.isdir():
                    # A non-directory replaces a directory and everything below it.
                    for path in [p for p in found if _under(p, name)]:
                        del found[path]
                if name in wanted:
                    if entry.isdir():
                        found[name] = Node("dir")
                    elif entry.issym():
                        found[name] = Node("symlink", entry.linkname)
                    else:
                        found[name] = Node("other")
                    added.add(name)
    return found


def missing_directories(layers_of: Callable[[], Iterable[IO[bytes]]], path: str) -> list[str]:
    """The directories (absolute, parents first) that ``mkdir -p path`` would make in the
    image whose layers ``layers_of`` opens (once per symlink followed)."""
    parts = [p for p in _normal(path).split("/") if p]
    hops = 0
    while True:
        # Every prefix is looked up: a path of a million components would be a million
        # names of up to a million characters each.
        if len("/".join(parts).encode()) >= PATH_MAX:
            raise WorkdirError(f"WORKDIR {path[:80]}…: the path is longer than {PATH_MAX} bytes")
        names = {"/".join(parts[: i + 1]) for i in range(len(parts))}
        found = lookup(layers_of(), names)
        for index in range(len(parts)):
            name = "/".join(parts[: index + 1])
            node = found.get(name)
            if node is None:
                return ["/" + "/".join(parts[: i + 1]) for i in range(index, len(parts))]
            if node.kind == "dir":
                continue
            if node.kind == "other":
                raise WorkdirError(f"WORKDIR {path}: /{name} is not a directory")
            hops += 1
            if hops > MAX_SYMLINKS:
                raise WorkdirError(f"WORKDIR {path}: too many levels of symbolic links")
            base = "" if node.target.startswith("/") else "/".join(parts[:index])
            # ".." never climbs above the image's root, as inside the container.
            joined = posixpath.normpath("/" + posixpath.join(base, node.target))
            parts = [p for p in joined.split("/") if p] + parts[index + 1 :]
            break
        else:
            return []


def directories_tar(directories: list[str], mtime: int) -> bytes:
    """An uncompressed tar of ``directories``: root-owned, mode 0755."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in directories:
            member = tarfile.TarInfo(directory.lstrip("/"))
            member.type = tarfile.DIRTYPE
            member.mode = DIRECTORY_MODE
            member.uid = member.gid = 0
            member.mtime = mtime
            tar.addfile(member)
    return buffer.getvalue()
