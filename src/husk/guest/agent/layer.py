"""``commit``: the writable layer's upper directory as one OCI layer tar on stdout.

The upper directory holds exactly what the container changed, so it is the
layer: walked by descriptor (never following a link: the container may change
it meanwhile), each entry is written with its owner, mode and times; overlayfs's
markers become OCI's: a whiteout (a character device 0/0) is an empty
``.wh.NAME``, an opaque directory (``trusted.overlay.opaque=y``) gets a
``.wh..wh..opq`` inside; files sharing an inode are stored once and then as
hard links. husk's own identity files and /dev, /proc, /sys stay out, as
Docker's init layer does. Extended attributes of files and directories go along
as PAX ``SCHILY.xattr.`` records when they are file capabilities or ``user.*``
ones (overlayfs's own ``trusted.overlay.*`` and security labels never do). The
host checks and rewrites what arrives.

Runs in a child of the agent outside the container's namespaces (see changes).
"""

from __future__ import annotations

import os
import stat
import tarfile

from husk.guest.agent.changes import OPAQUE, _ours

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# Features overlayfs may use that a layer of its own cannot express: refused, not lost.
REDIRECT = "trusted.overlay.redirect"
METACOPY = "trusted.overlay.metacopy"
CAPABILITY = "security.capability"
USER_XATTR = "user."
PAX_XATTR = "SCHILY.xattr."
MAX_DEPTH = 256
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CHUNK = 256 * 1024


def _fail(message: str) -> None:
    os.write(2, message.encode(errors="replace"))
    os._exit(1)


class _Reader:
    """A file object over a descriptor that yields at most ``size`` bytes, zero-padded
    if the file shrank meanwhile (the header already promised ``size``)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._left = size

    def read(self, n: int = -1) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        if want <= 0:
            return b""
        data = os.read(self._fd, min(want, _CHUNK)) or b"\0" * min(want, _CHUNK)
        data = data[:want]
        self._left -= len(data)
        return data


class LayerWriter:
    def __init__(self, upper: str) -> None:
        self.upper = upper
        self._links: dict[tuple[int, int], str] = {}

    def run(self) -> None:
        """The child's job: the layer tar on stdout."""
        tarfile.pwd = None  # type: ignore[attr-defined]  # numbers only, never a lookup
        tarfile.grp = None  # type: ignore[attr-defined]
        try:
            fd = os.open(self.upper, _DIRECTORY)
        except FileNotFoundError:
            fd = -1  # never started, no writable disk: nothing changed, an empty layer
        with (
            os.fdopen(1, "wb", buffering=_CHUNK) as out,
            tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            if fd >= 0:
                self._walk(tar, fd, "", 0)
        if fd >= 0:
            os.close(fd)

    def _walk(self, tar: tarfile.TarFile, fd: int, prefix: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            _fail(f"the writable layer nests deeper than {MAX_DEPTH} directories")
        for name in sorted(os.listdir(fd)):
            path = f"{prefix}/{name}"
            if _ours(path):
                continue
            try:
                info = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                continue  # removed meanwhile
            self._entry(tar, fd, name, path, info, depth)

    def _entry(
        self, tar: tarfile.TarFile, fd: int, name: str, path: str, info: os.stat_result, depth: int
    ) -> None:
        mode = info.st_mode
        member = tarfile.TarInfo(path[1:])
        member.mode = stat.S_IMODE(mode)
        member.uid, member.gid = info.st_uid, info.st_gid
        member.mtime = int(info.st_mtime)
        if stat.S_ISCHR(mode) and info.st_rdev == 0:
            parent = path[1:].rpartition("/")[0]
            whiteout = tarfile.TarInfo(f"{parent}/{WHITEOUT_PREFIX}{name}".lstrip("/"))
            whiteout.mode = 0o600
            whiteout.mtime = member.mtime
            tar.addfile(whiteout)
            return
        if stat.S_ISDIR(mode):
            member.type = tarfile.DIRTYPE
            try:
                child = os.open(name, _DIRECTORY, dir_fd=fd)
            except OSError:
                return  # replaced meanwhile
            try:
                if _has(child, REDIRECT):
                    _fail(
                        f"{path}: a renamed image directory (overlay redirect) cannot be committed"
                    )
                member.pax_headers = _carried_xattrs(child)
                tar.addfile(member)
                if _opaque(child):
                    marker = tarfile.TarInfo(f"{path[1:]}/{OPAQUE_MARKER}")
                    marker.mode = 0o600
                    marker.mtime = member.mtime
                    tar.addfile(marker)
                self._walk(tar, child, path, depth + 1)
            finally:
                os.close(child)
            return
        key = (info.st_dev, info.st_ino)
        if not stat.S_ISDIR(mode) and info.st_nlink > 1 and key in self._links:
            member.type = tarfile.LNKTYPE
            member.linkname = self._links[key]
            tar.addfile(member)
            return
        if stat.S_ISLNK(mode):
            member.type = tarfile.SYMTYPE
            member.linkname = os.readlink(name, dir_fd=fd)
            tar.addfile(member)
        elif stat.S_ISREG(mode):
            try:
                source = os.open(name, _FILE, dir_fd=fd)
            except OSError:
                return  # replaced by something else meanwhile
            try:
                if _has(source, METACOPY):
                    _fail(f"{path}: a metadata-only copy (overlay metacopy) cannot be committed")
                member.size = info.st_size
                # file capabilities (ping's cap_net_raw) and user.* attributes
                member.pax_headers = _carried_xattrs(source)
                tar.addfile(member, _Reader(source, info.st_size))  # type: ignore[arg-type]
            finally:
                os.close(source)
        elif stat.S_ISFIFO(mode):
            member.type = tarfile.FIFOTYPE
            tar.addfile(member)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            member.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            member.devmajor, member.devminor = os.major(info.st_rdev), os.minor(info.st_rdev)
            tar.addfile(member)
        else:
            return  # sockets have no place in a layer
        if info.st_nlink > 1:
            self._links[key] = member.name


def _carried_xattrs(fd: int) -> dict[str, str]:
    """The PAX records of the descriptor's file capability and ``user.*`` attributes."""
    try:
        names = os.listxattr(fd)
    except OSError:
        return {}
    records = {}
    for name in sorted(names):
        if name != CAPABILITY and not name.startswith(USER_XATTR):
            continue
        try:
            value = os.getxattr(fd, name)
        except OSError:
            continue  # removed meanwhile
        records[PAX_XATTR + name] = value.decode("utf-8", "surrogateescape")
    return records


def _has(fd: int, name: str) -> bool:
    try:
        os.getxattr(fd, name)
    except OSError:
        return False
    return True


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE) == b"y"
    except OSError:
        return False
