"""Where husk keeps its data and runtime files.

Root uses the system locations (/var/lib/husk, /run/husk); other users get XDG
locations. ``HUSK_DATA_DIR`` and ``HUSK_RUN_DIR`` override both, which is how the
tests isolate themselves.

The run directory holds the daemon's socket, so whoever controls it can impersonate
the daemon. Without ``XDG_RUNTIME_DIR`` a user's falls back to ``/tmp/husk-UID``,
which any other local user could create first. So the run directory is trusted only
when every directory on its way from ``/`` belongs to root or the user and nobody
else can write to it (a sticky root-owned directory such as ``/tmp`` excepted), and
the run directory itself is a real directory (not a symbolic link) that nobody else
can write to: see :func:`check_run_dir` and :func:`secure_run_dir`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from pathlib import Path

from husk import fileio, settings
from husk.errors import HuskError

_MAX_SYMLINKS = 40


# Where the data and run directories are is a setting (HUSK_DATA_DIR, XDG_…): husk.settings.
data_dir = settings.data_dir
run_dir = settings.run_dir
ensure_private_dir = fileio.ensure_private_dir

SOCKET_NAME = "husk.sock"


def socket_path() -> Path:
    """Where the daemon listens: ``HUSK_SOCKET`` if set, else ``run_dir()/husk.sock``
    (/run/husk/husk.sock for root)."""
    return settings.socket_override() or run_dir() / SOCKET_NAME


def bundle_dir() -> Path:
    """The user's own guest bundle (vmlinux, initramfs.cpio, manifest.json), where
    ``husk bundle build`` installs it."""
    return data_dir() / "bundle"


def bundle_dirs() -> tuple[Path, ...]:
    """Where a guest bundle is looked for, in order: the user's own, then the system's
    (settings.system_bundle_dirs), each once."""
    found: list[Path] = []
    for candidate in (bundle_dir(), *settings.system_bundle_dirs()):
        if candidate not in found:
            found.append(candidate)
    return tuple(found)


def cache_dir() -> Path:
    """Downloads that can be re-fetched (Debian packages for the bundle)."""
    return data_dir() / "cache"


def vms_dir() -> Path:
    """Per-VM runtime state: sockets, console logs. Private to the owner."""
    return run_dir() / "vms"


# -- trusting the run directory ------------------------------------------------------


class UnsafePath(HuskError):
    """A directory or socket that another user could control."""

    kind = "unsafe_path"


def trusted_uids() -> tuple[int, ...]:
    """Owners whose files a process of ours may trust: itself and root."""
    return (os.geteuid(), 0)


def _owner_text(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _refuse(path: Path, problem: str) -> UnsafePath:
    return UnsafePath(
        f"refusing to use {path}: {problem}; another user could impersonate the husk "
        "daemon there (remove it, or set XDG_RUNTIME_DIR or HUSK_RUN_DIR)"
    )


def _check_owner(path: Path, info: os.stat_result) -> None:
    if info.st_uid not in trusted_uids():
        raise _refuse(
            path,
            f"it belongs to {_owner_text(info.st_uid)}, not to you ({_owner_text(os.geteuid())}) "
            "or root",
        )


def check_ancestors(path: Path) -> Path:
    """Every existing directory on the way to ``path`` (itself excluded) is trustworthy.

    Each must belong to root or us and be writable by nobody else, unless it is a sticky
    directory owned by root (``/tmp``): there others can add entries but not replace
    ours. Symbolic links on the way are followed only when root or we own them (anyone
    could swap a link of their own). Returns the resolved parent of ``path``.
    """
    pending = list(Path(os.path.abspath(path)).parts[1:-1])
    current = Path("/")
    _check_ancestor(current, os.stat(current))
    hops = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return candidate.joinpath(*pending)  # the rest does not exist yet
        if stat.S_ISLNK(info.st_mode):
            _check_owner(candidate, info)
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise _refuse(candidate, "too many levels of symbolic links")
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = Path("/")
            pending = [*target.parts[1 if target.is_absolute() else 0 :], *pending]
            continue
        _check_ancestor(candidate, info)
        current = candidate
    return current


def _check_ancestor(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise _refuse(path, "it is not a directory")
    _check_owner(path, info)
    shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if shared and not (info.st_mode & stat.S_ISVTX and info.st_uid == 0):
        raise _refuse(path, f"others can write to it (mode {stat.S_IMODE(info.st_mode):04o})")


def check_private_dir(path: Path) -> None:
    """``path`` is a real directory of ours (or root's) that nobody else can write to."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(path, "it is a symbolic link")
    if not stat.S_ISDIR(info.st_mode):
        raise _refuse(path, "it is not a directory")
    _check_owner(path, info)
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _refuse(path, f"others can write to it (mode {stat.S_IMODE(info.st_mode):04o})")


def check_run_dir(path: Path | None = None) -> bool:
    """Whether the run directory exists; refuses one that another user could control."""
    directory = path or run_dir()
    check_ancestors(directory)
    try:
        check_private_dir(directory)
    except FileNotFoundError:
        return False
    return True


def check_socket(path: Path) -> bool:
    """Whether ``path`` exists; refuses one that is not a socket of ours or root's.

    Its directory is checked as an ancestor (a socket may sit in sticky ``/tmp``).
    """
    check_ancestors(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(path, "the socket is a symbolic link")
    if not stat.S_ISSOCK(info.st_mode):
        raise _refuse(path, "it is not a socket")
    _check_owner(path, info)
    return True


def secure_run_dir(path: Path | None = None, mode: int = 0o700) -> Path:
    """Create the run directory (and missing parents) safely, or verify the existing one.

    Each missing directory is made with ``mkdir`` (which never follows a symbolic link
    and fails if anything exists there) and mode 0700; whatever exists is checked as in
    :func:`check_run_dir`. A directory of ours that others can write to is set to
    ``mode`` through a descriptor opened without following links.
    """
    directory = Path(os.path.abspath(path or run_dir()))
    check_ancestors(directory)
    missing: list[Path] = []
    probe = directory
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    for component in reversed(missing):
        # If it appeared meanwhile (made by us or not), it is checked like any other.
        with contextlib.suppress(FileExistsError):
            os.mkdir(component, 0o700)
        if component != directory:
            _check_ancestor(component, os.lstat(component))
    if os.path.islink(directory):
        raise _refuse(directory, "it is a symbolic link")
    _tighten(directory, mode)
    check_private_dir(directory)
    return directory


def _tighten(directory: Path, mode: int) -> None:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(directory, flags)
    except OSError as err:
        raise _refuse(directory, f"it cannot be opened as a directory ({err.strerror})") from None
    try:
        info = os.fstat(fd)
        _check_owner(directory, info)
        if info.st_uid == os.geteuid() and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
