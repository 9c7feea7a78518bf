"""Paths of the container, resolved by the agent without ever leaving the container's root.

The agent touches the container's files from its own root (the initramfs), where an
image's symlink such as ``/etc -> /husk/lib`` would lead into the agent itself. Here
every component is opened through a file descriptor with ``O_NOFOLLOW``; a symlink is
read and followed by hand, an absolute one from the container's root and ``..`` never
above it, as the container itself would resolve it. Nothing is looked up by path twice,
so a component swapped for a link meanwhile cannot redirect the agent either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from husk.guest.agent import syscalls

_MAX_LINKS = 40
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# The kernel's own resolution beneath a root (openat2): what open_path does by hand, in
# one call instead of an open and an fstat per component. Its answers that mean "not
# this way" (ENOSYS: an older kernel; EAGAIN: a rename raced the lookup; EXDEV, ELOOP
# and EINVAL for what it refuses) send the caller back to open_path.
_RESOLVE = syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS
_RETRY_BY_HAND = frozenset({errno.ENOSYS, errno.EAGAIN, errno.EXDEV, errno.ELOOP, errno.EINVAL})
_kernel_resolves = True


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part and part != "."]


def open_path(root: str, path: str, *, create_dirs: bool = False, follow: bool = True) -> int:
    """An ``O_PATH`` descriptor of the container's ``path`` (the caller closes it).

    ``create_dirs`` makes missing directories (mode 0755) on the way; ``follow=False``
    returns a final symlink itself instead of its target.
    """
    stack = [os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
    pending = _components(path)
    links = 0
    try:
        while pending:
            part = pending.pop(0)
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            try:
                fd = os.open(part, _O_PATH, dir_fd=stack[-1])
            except FileNotFoundError:
                if not create_dirs:
                    raise
                with contextlib.suppress(FileExistsError):  # made meanwhile: open what is there
                    os.mkdir(part, 0o755, dir_fd=stack[-1])
                fd = os.open(part, _O_PATH, dir_fd=stack[-1])
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode) and (pending or follow):
                links += 1
                target = os.readlink("", dir_fd=fd)
                os.close(fd)
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, f"too many symlinks resolving {path}")
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                pending = _components(target) + pending
                continue
            if pending and not stat.S_ISDIR(mode):
                os.close(fd)
                raise NotADirectoryError(errno.ENOTDIR, f"{part} in {path} is not a directory")
            stack.append(fd)
        result = stack.pop()
        return result
    finally:
        for fd in stack:
            os.close(fd)


def _open_file(root: str, path: str) -> int:
    """An ``O_PATH`` descriptor of the container's ``path``, its final symlink followed."""
    global _kernel_resolves
    if _kernel_resolves:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            relative = "/".join(_components(path)) or "."
            return syscalls.openat2(root_fd, relative, os.O_PATH | os.O_CLOEXEC, _RESOLVE)
        except OSError as exc:
            if exc.errno not in _RETRY_BY_HAND:
                raise
            if exc.errno == errno.ENOSYS:
                _kernel_resolves = False
        finally:
            os.close(root_fd)
    return open_path(root, path)


def proc_path(fd: int) -> str:
    """A path naming exactly what ``fd`` refers to (for mount(2) and reopening)."""
    return f"/proc/self/fd/{fd}"


def read_file(root: str, path: str, limit: int) -> bytes:
    """The first ``limit`` bytes of a regular file of the container ("" if it is missing).

    Anything but a regular file (a FIFO, a device) reads as empty: the agent never
    blocks on, or streams without end from, what an image put there.
    """
    try:
        fd = _open_file(root, path)
    except (FileNotFoundError, NotADirectoryError):
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        reader = os.open(proc_path(fd), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(fd)
    try:
        chunks = []
        size = 0
        while size < limit:
            chunk = os.read(reader, min(65536, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(reader)


def write_file(root: str, path: str, content: str) -> None:
    """Writes a fresh regular file at the container's ``path``, replacing any link there."""
    parent, _, name = path.rstrip("/").rpartition("/")
    if not name or name == "..":
        raise IsADirectoryError(errno.EISDIR, f"{path} names a directory")
    directory = open_path(root, parent, create_dirs=True)
    try:
        try:
            existing = os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode
        except FileNotFoundError:
            existing = None
        if existing is not None and not stat.S_ISREG(existing):
            os.unlink(name, dir_fd=directory)  # e.g. a symlink into /run: never write through
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=directory,
        )
    finally:
        os.close(directory)
    with os.fdopen(fd, "w") as fh:
        fh.write(content)
