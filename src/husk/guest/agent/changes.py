"""``diff``: what the container changed against its image, as Docker lists it.

The writable layer's upper directory holds exactly what the container changed:
a whiteout (a character device 0/0) is a deleted path, an opaque directory
(``trusted.overlay.opaque=y``) one whose image contents are hidden, anything
else was added (not in the image) or modified (in the image). Kinds are
Docker's: 0 modified, 1 added, 2 deleted; a parent directory of an added or
deleted path counts as modified, as Docker reports it.

Runs in a child of the agent outside the container's namespaces (it must read
the layers, which no container path reaches), walking by descriptor and never
following a link: the container may change its upper directory meanwhile.
"""

from __future__ import annotations

import json
import os
import stat

MODIFIED, ADDED, DELETED = 0, 1, 2
MAX_CHANGES = 100_000
"""More changes than this are refused (the host caps what it reads as well)."""
OPAQUE = "trusted.overlay.opaque"
HUSK_FILES = frozenset({"/.dockerenv", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf"})
"""What husk itself writes in every container root (Docker keeps these out of a diff)."""
HUSK_TREES = ("/dev", "/proc", "/sys")
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TooManyChanges(Exception):
    pass


def _ours(path: str) -> bool:
    return path in HUSK_FILES or any(path == t or path.startswith(t + "/") for t in HUSK_TREES)


class Walk:
    def __init__(self, upper: str, lower: str) -> None:
        self.upper = upper
        self.lower = lower
        self.changes: list[tuple[str, int]] = []
        self._changed_dirs: set[str] = set()

    def run(self) -> None:
        """The child's job: the list as JSON (``[[path, kind], ...]``) on stdout."""
        fd = os.open(self.upper, _DIRECTORY)
        try:
            self._walk(fd, "")
        except TooManyChanges:
            os.write(2, f"more than {MAX_CHANGES} changes".encode())
            os._exit(1)
        finally:
            os.close(fd)
        data = json.dumps(self.changes).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(1, view) :]

    def _walk(self, fd: int, prefix: str) -> None:
        for name in sorted(os.listdir(fd)):
            path = f"{prefix}/{name}"
            info = os.lstat(name, dir_fd=fd)
            self._record(fd, name, path, info)
            if stat.S_ISDIR(info.st_mode):
                try:
                    child = os.open(name, _DIRECTORY, dir_fd=fd)
                except OSError:
                    continue  # replaced meanwhile
                try:
                    self._walk(child, path)
                finally:
                    os.close(child)

    def _record(self, fd: int, name: str, path: str, info: os.stat_result) -> None:
        if _ours(path):
            return
        kind: int | None
        lower = self._lower(path)
        if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
            kind = DELETED
        elif stat.S_ISDIR(info.st_mode) and lower is not None and self._opaque(fd, name):
            kind = DELETED  # as Docker: the image's directory went, this one replaced it
        elif lower is None:
            kind = ADDED
        elif stat.S_ISDIR(info.st_mode) and stat.S_ISDIR(lower.st_mode):
            # Copied up to hold a change below (that makes it modified, see the parents
            # rule) or changed itself (its mode or owner).
            same = (info.st_mode, info.st_uid, info.st_gid) == (
                lower.st_mode,
                lower.st_uid,
                lower.st_gid,
            )
            kind = None if same else MODIFIED
        else:
            kind = MODIFIED
        if kind is None:
            return
        if stat.S_ISDIR(info.st_mode):
            self._changed_dirs.add(path)
        if kind in (ADDED, DELETED):
            parent = path.rsplit("/", 1)[0]
            if parent and parent not in self._changed_dirs:
                self._add(parent, MODIFIED)
                self._changed_dirs.add(parent)
        self._add(path, kind)

    def _add(self, path: str, kind: int) -> None:
        if len(self.changes) >= MAX_CHANGES:
            raise TooManyChanges
        self.changes.append((path, kind))

    def _opaque(self, fd: int, name: str) -> bool:
        try:
            child = os.open(name, _DIRECTORY, dir_fd=fd)
        except OSError:
            return False
        try:
            return os.getxattr(child, OPAQUE) == b"y"
        except OSError:
            return False
        finally:
            os.close(child)

    def _lower(self, path: str) -> os.stat_result | None:
        """The image's entry at ``path`` (None: none), never through one of its links."""
        parts = path.strip("/").split("/")
        try:
            fd = os.open(self.lower, _DIRECTORY)
        except OSError:
            return None
        try:
            for part in parts[:-1]:
                child = os.open(part, _DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
            return os.lstat(parts[-1], dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)
