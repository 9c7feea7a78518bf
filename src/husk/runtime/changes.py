"""A guest's list of a container's changes (``diff``), checked before anyone sees it.

The guest walks the writable layer (:mod:`husk.guest.agent.changes`) and answers
``[[path, kind], ...]``; the guest is not trusted, so every entry is checked
here: an absolute, normalised path of printable text and one of Docker's kinds
(0 modified, 1 added, 2 deleted), no path twice, no more than MAX_CHANGES.
"""

from __future__ import annotations

import json
from typing import Any

from husk.errors import GuestError

MODIFIED, ADDED, DELETED = 0, 1, 2
KINDS = {MODIFIED: "C", ADDED: "A", DELETED: "D"}
MAX_CHANGES = 100_000
MAX_PATH = 4096
MAX_CHANGES_OUTPUT = 32 * 1024 * 1024
"""What the daemon reads of a guest's answer at most (MAX_CHANGES long paths)."""


class BadChanges(GuestError):
    """The guest's list of changes is not one."""


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise BadChanges(f"a path that is not text: {path!r:.80}")
    if len(path) > MAX_PATH:
        raise BadChanges(f"a path longer than {MAX_PATH} characters")
    if not path.startswith("/") or path == "/" or path.endswith("/"):
        raise BadChanges(f"a path that is not absolute or names the root: {path!r:.200}")
    parts = path[1:].split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BadChanges(f"a path that is not normalised: {path!r:.200}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise BadChanges(f"a path with control characters: {path!r:.200}")
    return path


def parse_changes(data: bytes) -> list[dict[str, Any]]:
    """Docker's ``[{"Path": ..., "Kind": ...}]`` of the guest's answer; BadChanges if it is
    not a valid list."""
    try:
        return _parse(data)
    except BadChanges as exc:
        raise BadChanges(f"the guest's list of changes was refused: {exc}") from None


def _parse(data: bytes) -> list[dict[str, Any]]:
    try:
        entries = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # a deep nest: RecursionError
        raise BadChanges("it is not JSON") from None
    if not isinstance(entries, list):
        raise BadChanges("it is not a list")
    if len(entries) > MAX_CHANGES:
        raise BadChanges(f"more than {MAX_CHANGES} changes")
    seen: set[str] = set()
    result = []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2:
            raise BadChanges(f"an entry that is not [path, kind]: {entry!r:.200}")
        path, kind = _check_path(entry[0]), entry[1]
        if type(kind) is not int or kind not in KINDS:
            raise BadChanges(f"an unknown kind of change {kind!r:.40} for {path!r:.200}")
        if path in seen:
            raise BadChanges(f"{path!r:.200} listed twice")
        seen.add(path)
        result.append({"Path": path, "Kind": kind})
    return result
