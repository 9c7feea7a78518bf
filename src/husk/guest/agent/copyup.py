"""Copy-up: a new volume is filled with what the image has where it is mounted.

Docker copies an image directory's content into an empty volume mounted over it,
owners, modes and links included, so that a database image's prepared data
directory (or a directory made for the image's ``USER``) works from a volume.
Here the agent does it, between two open directories: the container's directory
(its root's overlay, the image's files) and the share's mount point.

Nothing is looked up by path across directories: every entry is opened by name
relative to its parent's descriptor with ``O_NOFOLLOW``, symlinks are copied as
symlinks (never followed), and entries on another file system than the source
directory (mounts inside it: ``/dev``, ``/sys``) are left out. A hostile
image can therefore make the copy neither read outside its root nor write outside
the share. The copy is bounded by what the image holds: runs of zero bytes become
holes, so a sparse file in the image stays sparse in the volume, and hard links
stay links.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

MAX_DEPTH = 128
"""Directories nested deeper than this in the image are refused (each level holds two
descriptors open)."""
_CHUNK = 256 * 1024
_ZEROS = bytes(_CHUNK)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CopyError(Exception):
    """The copy could not be made; the message names the entry."""


class CopyStats:
    """What a copy did (the guest's CPython has no dataclasses)."""

    def __init__(self) -> None:
        self.entries = 0
        self.bytes = 0
        self.skipped: list[str] = []
        """Entries left out: sockets, mounts inside the directory, names already there."""


def is_empty(directory: int) -> bool:
    """Whether the open directory has no entry."""
    with os.scandir(directory) as entries:
        return next(iter(entries), None) is None


def copy_tree(source: int, destination: int) -> CopyStats:
    """Copies everything in directory ``source`` into directory ``destination``, then
    gives ``destination`` itself the owner, mode and times of ``source``.

    Both are descriptors of directories opened for reading (``O_RDONLY``); neither
    is closed. Existing names in ``destination`` are left alone (another container
    copying into the same new volume at the same moment made them).
    """
    stats = CopyStats()
    device = os.fstat(source).st_dev
    links: dict[tuple[int, int], str] = {}
    _copy_children(source, destination, "", 1, device, links, destination, stats)
    _apply_metadata(destination, os.fstat(source))
    return stats


def _copy_children(
    source: int,
    destination: int,
    relative: str,
    depth: int,
    device: int,
    links: dict[tuple[int, int], str],
    root: int,
    stats: CopyStats,
) -> None:
    if depth > MAX_DEPTH:
        raise CopyError(f"{relative or '.'}: directories nested deeper than {MAX_DEPTH}")
    for name in sorted(os.listdir(source)):
        path = f"{relative}{name}"
        try:
            info = os.stat(name, dir_fd=source, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_dev != device:
            # A mount inside the directory (/dev, /sys): not the image's. Only
            # directories tell: overlayfs shows a file's st_dev as its layer's, and
            # nothing mounted on a file can be inside (parents are mounted first).
            stats.skipped.append(path)
            continue
        try:
            _copy_entry(name, info, source, destination, path, depth, device, links, root, stats)
        except FileExistsError:
            stats.skipped.append(path)
        except CopyError:
            raise
        except OSError as exc:
            raise CopyError(f"{path}: {exc.strerror or exc}") from None


def _copy_entry(
    name: str,
    info: os.stat_result,
    source: int,
    destination: int,
    path: str,
    depth: int,
    device: int,
    links: dict[tuple[int, int], str],
    root: int,
    stats: CopyStats,
) -> None:
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        os.mkdir(name, 0o700, dir_fd=destination)
        child_source = os.open(name, _DIR_FLAGS, dir_fd=source)
        try:
            if os.fstat(child_source).st_ino != info.st_ino:
                raise CopyError(f"{path}: changed while it was copied")
            child_destination = os.open(name, _DIR_FLAGS, dir_fd=destination)
            try:
                _copy_children(
                    child_source,
                    child_destination,
                    path + "/",
                    depth + 1,
                    device,
                    links,
                    root,
                    stats,
                )
                # After the children: a read-only directory would refuse them, and
                # adding them would change its times.
                _apply_metadata(child_destination, info)
            finally:
                os.close(child_destination)
        finally:
            os.close(child_source)
    elif stat.S_ISREG(mode):
        key = (info.st_dev, info.st_ino)
        if info.st_nlink > 1 and key in links:
            os.link(
                links[key], name, src_dir_fd=root, dst_dir_fd=destination, follow_symlinks=False
            )
        else:
            _copy_file(name, info, source, destination, path, stats)
            if info.st_nlink > 1:
                links[key] = path
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(name, dir_fd=source), name, dir_fd=destination)
        os.chown(name, info.st_uid, info.st_gid, dir_fd=destination, follow_symlinks=False)
        with contextlib.suppress(OSError):  # times of a link: nice to have
            os.utime(
                name,
                ns=(info.st_atime_ns, info.st_mtime_ns),
                dir_fd=destination,
                follow_symlinks=False,
            )
    elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        os.mknod(name, stat.S_IFMT(mode) | 0o600, info.st_rdev, dir_fd=destination)
        node = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=destination)
        try:
            _apply_metadata(node, info)
        finally:
            os.close(node)
    else:  # a socket: nothing a copy could serve
        stats.skipped.append(path)
        return
    stats.entries += 1


def _copy_file(
    name: str,
    info: os.stat_result,
    source: int,
    destination: int,
    path: str,
    stats: CopyStats,
) -> None:
    reader = os.open(
        name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=source
    )
    try:
        current = os.fstat(reader)
        if not stat.S_ISREG(current.st_mode) or current.st_ino != info.st_ino:
            raise CopyError(f"{path}: changed while it was copied")
        writer = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=destination,
        )
        try:
            stats.bytes += _copy_data(reader, writer, current.st_size)
            _apply_metadata(writer, info)
        finally:
            os.close(writer)
    finally:
        os.close(reader)


def _copy_data(reader: int, writer: int, size: int) -> int:
    """Copies ``size`` bytes at most; chunks of zeros are skipped (holes). Returns the
    bytes written."""
    offset = 0
    written = 0
    while offset < size:
        chunk = os.read(reader, min(_CHUNK, size - offset))
        if not chunk:
            break
        if chunk != _ZEROS[: len(chunk)]:
            view = memoryview(chunk)
            position = offset
            while view:
                count = os.pwrite(writer, view, position)
                view = view[count:]
                position += count
            written += len(chunk)
        offset += len(chunk)
    os.ftruncate(writer, offset)
    return written


def _apply_metadata(fd: int, info: os.stat_result) -> None:
    """Owner, then mode (a chown clears setuid bits), then times, on an open descriptor
    (``O_PATH`` ones included: their /proc link names exactly that inode)."""
    target = f"/proc/self/fd/{fd}"
    os.chown(target, info.st_uid, info.st_gid)
    os.chmod(target, stat.S_IMODE(info.st_mode))
    try:
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES, errno.EROFS):
            raise
