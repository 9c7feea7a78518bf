"""The build context: unpacked safely, filtered by ``.dockerignore``, and the layers of
``COPY``/``ADD`` made from it on the host (never from outside it).

A COPY layer holds the copied entries only (their parents are implied, so directories
the image already has keep their owner and mode); it goes through the same check as a
guest's layer (:func:`husk.runtime.layertar.rewrite`) on its way into the store.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from husk.errors import InvalidArgument, NotSupported
from husk.oci.extract import ExtractPolicy, TarExtractor
from husk.oci.tarsafe import open_tar

MAX_CONTEXT_ENTRIES = 1_000_000
MAX_CONTEXT_BYTES = 16 * 1024**3
"""File contents a context (or an ADDed archive, or a stage's files) may unpack to: a
compressed tar of zeros is tiny, its contents need not be."""
MAX_COPY_BYTES = 16 * 1024**3
"""File contents one COPY/ADD layer may hold: hard links unpack to nothing, yet each is
a whole copy of its file in the layer."""


class ContextError(InvalidArgument):
    """A COPY/ADD source is missing, excluded or outside the context."""


def extract_context(source: IO[bytes], dest: Path, *, keep_owner: bool = False) -> None:
    """Unpacks a context tar (or a stage's files) into ``dest``: nothing lands outside it,
    device nodes are refused, absolute names are made relative."""
    policy = ExtractPolicy(keep_owner=keep_owner, keep_setid=True, strip_absolute=True)
    count = total = 0
    try:
        with (
            open_tar(source, "r|*") as tar,
            TarExtractor(dest, policy, label="build context") as extractor,
        ):
            while (member := tar.next()) is not None:
                # TarFile remembers every header; a million entries need not stay in memory.
                cast(Any, tar).members.clear()
                count += 1
                if count > MAX_CONTEXT_ENTRIES:
                    raise InvalidArgument(f"more than {MAX_CONTEXT_ENTRIES} entries")
                total += max(member.size, 0)
                if total > MAX_CONTEXT_BYTES:
                    raise InvalidArgument(f"more than {MAX_CONTEXT_BYTES} bytes of files")
                extractor.extract(tar, member)
            extractor.finish()
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidArgument(f"the build context is not a valid tar archive: {exc}") from None


# -- .dockerignore ---------------------------------------------------------------


@dataclass(frozen=True)
class IgnoreRule:
    pattern: Glob
    exclude: bool  # False: a "!" exception


# Kinds of a pattern's tokens.
_LITERAL, _ONE, _CLASS, _STAR, _ANY, _DIRS = range(6)


class Glob:
    """A Go filepath.Match pattern with ``**`` (any number of directories), matched in
    time linear in the name (a state-set walk): the patterns come from a client's
    ``.dockerignore`` or Dockerfile, and a backtracking regex (``**a**a**a**b``) would
    take hours on one long name."""

    def __init__(self, tokens: list[tuple[int, Any]], below: bool) -> None:
        self._tokens = tokens
        self._below = below  # a pattern matching a directory matches what is below it

    def _closure(self, states: set[tuple[int, bool]]) -> set[tuple[int, bool]]:
        # (token index, inside a ``**/`` that has consumed something): wildcards may match
        # nothing, so their state also stands for the next token's.
        result = set(states)
        stack = list(states)
        while stack:
            index, inside = stack.pop()
            wildcard = index < len(self._tokens) and self._tokens[index][0] in (_STAR, _ANY, _DIRS)
            if wildcard and not inside and (index + 1, False) not in result:
                result.add((index + 1, False))
                stack.append((index + 1, False))
        return result

    def _step(self, states: set[tuple[int, bool]], char: str) -> set[tuple[int, bool]]:
        after: set[tuple[int, bool]] = set()
        for index, _inside in states:
            if index == len(self._tokens):
                continue
            kind, value = self._tokens[index]
            if kind == _LITERAL:
                if char == value:
                    after.add((index + 1, False))
            elif kind == _ONE:
                if char != "/":
                    after.add((index + 1, False))
            elif kind == _CLASS:
                if value.fullmatch(char):
                    after.add((index + 1, False))
            elif kind == _STAR:
                if char != "/":
                    after.add((index, False))
            elif kind == _ANY:
                after.add((index, False))
            else:  # _DIRS: ``**/``, any text ending with "/", or nothing
                after.add((index, True))
                if char == "/":
                    after.add((index + 1, False))
        return self._closure(after)

    def match(self, text: str) -> bool:
        end = (len(self._tokens), False)
        states = self._closure({(0, False)})
        for char in text:
            if self._below and char == "/" and end in states:
                return True
            states = self._step(states, char)
            if not states:
                return False
        return end in states


def _translate(pattern: str, *, below: bool = True) -> Glob:
    """A Go filepath.Match pattern with ``**`` (any number of directories)."""
    tokens: list[tuple[int, Any]] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                tokens.append((_DIRS, None))
                i += 1
            else:
                tokens.append((_ANY, None))
            continue
        c = pattern[i]
        if c == "*":
            tokens.append((_STAR, None))
        elif c == "?":
            tokens.append((_ONE, None))
        elif c == "[" and pattern.find("]", i) > 0:
            end = pattern.find("]", i)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            try:
                cls = re.compile("[" + ("^" + body[1:] if body.startswith("^") else body) + "]")
            except re.error:
                raise InvalidArgument(f"syntax error in pattern {pattern[:200]!r}") from None
            tokens.append((_CLASS, cls))
            i = end
        else:
            tokens.append((_LITERAL, c))
        i += 1
    return Glob(tokens, below)


def parse_dockerignore(text: str) -> list[IgnoreRule]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        line = line.lstrip("!").strip()
        cleaned = posixpath.normpath(line).lstrip("/")
        if cleaned in ("", "."):
            continue
        rules.append(IgnoreRule(_translate(cleaned), exclude))
    return rules


def ignored(rel: str, rules: list[IgnoreRule]) -> bool:
    """Whether the context path ``rel`` is excluded (the last matching rule wins)."""
    result = False
    for rule in rules:
        if rule.pattern.match(rel):
            result = rule.exclude
    return result


# -- sources -----------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    path: Path  # on the host, inside the context (or a stage's unpacked files)
    rel: str  # its name relative to the context root


def resolve_sources(
    root: Path, patterns: list[str], rules: list[IgnoreRule], what: str
) -> list[Source]:
    """The context entries ``patterns`` name (wildcards allowed), each inside ``root``."""
    root = root.resolve()
    found: list[Source] = []
    for pattern in patterns:
        if "://" in pattern:
            raise NotSupported(f"{what} of a URL ({pattern}) is not supported by husk build")
        cleaned = posixpath.normpath("/" + pattern).lstrip("/")
        if cleaned.startswith("..") or pattern.startswith("../") or "/../" in f"/{pattern}/":
            raise ContextError(
                f"{what} failed: forbidden path outside the build context: {pattern}"
            )
        matches = _glob(root, cleaned) if _has_magic(cleaned) else [cleaned]
        kept = []
        for rel in matches:
            path = _inside(root, rel, pattern, what)
            if path is None or (rel and ignored(rel, rules)):
                continue
            kept.append(Source(path, rel))
        if not kept:
            raise ContextError(
                f"{what} failed: file not found in build context or excluded by"
                f" .dockerignore: stat {pattern}: file does not exist"
            )
        found.extend(kept)
    return found


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob(root: Path, pattern: str) -> list[str]:
    """Context paths matching ``pattern`` (``*`` never crosses a ``/``, as in Go)."""
    regex = _translate(pattern, below=False)
    matches = []
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in [*dirs, *sorted(files)]:
            rel = os.path.relpath(os.path.join(directory, name), root)
            if regex.match(rel):
                matches.append(rel)
    return sorted(matches)


def _inside(root: Path, rel: str, pattern: str, what: str) -> Path | None:
    candidate = root / rel if rel else root
    if not os.path.lexists(candidate):
        return None
    resolved = Path(os.path.realpath(candidate))
    if resolved != root and root not in resolved.parents:
        raise ContextError(f"{what} failed: {pattern} leads outside the build context")
    return resolved


# -- the layer ------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyOptions:
    owner: tuple[int, int] | None = None  # --chown; None: root (context) or kept (--from)
    mode: int | None = None  # --chmod
    keep_owner: bool = False  # sources from a stage keep their owners


def _numeric(part: str) -> bool:
    return part.isdigit() or part == "root"


def chown_needs_names(value: str) -> bool:
    """Whether ``--chown=value`` names a user or group the image's files must resolve."""
    user, _, group = value.partition(":")
    return not all(_numeric(part) for part in (user, group) if part)


def parse_chown(value: str, passwd: str = "", group: str = "") -> tuple[int, int]:
    """``--chown=USER[:GROUP]``: numbers, or names looked up in the image's ``passwd`` and
    ``group`` texts. Without a group the gid is the uid's number, as Docker takes it."""
    user_part, sep, group_part = value.partition(":")
    if not user_part or (sep and not group_part):
        raise InvalidArgument(f"--chown={value}: expected USER[:GROUP]")
    uid = _lookup(user_part, passwd, "user")
    gid = _lookup(group_part, group, "group") if sep else uid
    return uid, gid


def _lookup(name: str, table: str, what: str) -> int:
    if name.isdigit():
        number = int(name)
        if number > 2**32 - 2:
            raise InvalidArgument(f"--chown: {what} id {name} is out of range")
        return number
    if name == "root":
        return 0
    for line in table.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
            return int(fields[2])
    table_name = "passwd" if what == "user" else "group"
    raise InvalidArgument(f"unable to find {what} {name}: not in the image's /etc/{table_name}")


def parse_chmod(value: str) -> int:
    if not re.fullmatch(r"[0-7]{3,4}", value):
        raise InvalidArgument(f"--chmod={value}: expected an octal mode")
    return int(value, 8)


def copy_entries(
    sources: list[Source], dest: str, rules: list[IgnoreRule], *, honour_ignore: bool
) -> Iterator[tuple[Path, str]]:
    """(host path, layer name) pairs of a COPY, as Docker lays them out: a directory's
    contents go into ``dest``; a file goes to ``dest`` or, when ``dest`` is a directory
    (ends with ``/`` or several sources), into it."""
    into_dir = dest.endswith(("/", "/.")) or dest == "." or len(sources) > 1
    base = posixpath.normpath(dest).lstrip("/")
    for source in sources:
        if source.path.is_dir():
            # The directory's contents, not itself: ``dest`` keeps its own owner and mode.
            for directory, dirs, files in os.walk(source.path):
                dirs.sort()
                for name in [*dirs, *sorted(files)]:
                    full = Path(directory) / name
                    below = os.path.relpath(full, source.path)
                    rel = posixpath.join(source.rel, below) if source.rel else below
                    if honour_ignore and ignored(rel, rules):
                        continue
                    yield full, posixpath.join(base, below) if base != "." else below
        else:
            name = posixpath.join(base, source.path.name) if into_dir else base
            yield source.path, name


def write_copy_tar(
    entries: Iterator[tuple[Path, str]], out: IO[bytes], options: CopyOptions
) -> str:
    """Writes the COPY's layer tar to ``out``; returns a digest of its contents (the cache
    key's part for the copied files: names, modes, owners, data; never times)."""
    digest = hashlib.sha256()
    seen: set[str] = set()
    total = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path, name in entries:
            name = name.strip("/")
            if not name or name == "." or name in seen:
                continue
            seen.add(name)
            info = os.lstat(path)
            member = tarfile.TarInfo(name)
            member.mtime = int(info.st_mtime)
            member.mode = stat.S_IMODE(info.st_mode) if options.mode is None else options.mode
            if options.owner is not None:
                member.uid, member.gid = options.owner
            elif options.keep_owner:
                member.uid, member.gid = info.st_uid, info.st_gid
            if stat.S_ISDIR(info.st_mode):
                member.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(info.st_mode):
                member.type = tarfile.SYMTYPE
                member.linkname = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                member.size = info.st_size
                total += info.st_size
                if total > MAX_COPY_BYTES:
                    raise ContextError(f"the files copied are larger than {MAX_COPY_BYTES} bytes")
            else:
                continue  # FIFOs, sockets and devices of a context are not copied
            # Each entry's fields, its size among them, before its data: the digest of one
            # set of files is never that of another (a file's data cannot pose as entries).
            digest.update(
                f"\0{member.name}\0{member.type!r}\0{member.mode}\0{member.uid}:{member.gid}"
                f"\0{member.linkname}\0{member.size}\0".encode()
            )
            if not member.isreg():
                tar.addfile(member)
                continue
            with open(path, "rb") as handle:
                tar.addfile(member, handle)
                handle.seek(0)
                while chunk := handle.read(1024 * 1024):
                    digest.update(chunk)
    return "sha256:" + digest.hexdigest()
