"""``husk cp``: copy files between the host and a container, as tar archives.

The daemon's archive endpoints carry tar streams; this side decides names the
way Docker does: a destination directory that exists receives the source under
its own name, a destination that does not exist becomes the source's new name,
and ``SRC/.`` copies a directory's contents rather than the directory.

An archive from a container is hostile input (its guest may be owned by the
workload): it is spooled, checked whole, then written by the hardened extractor
of :mod:`husk.oci.extract`, below DEST only. Where it lands is decided from the
command line alone; owners and setuid/setgid bits are kept only with ``-a`` as
root; device nodes and FIFOs are refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

import click

from husk import errors
from husk.cli.format import human_size
from husk.client.daemon import connect
from husk.client.http import ApiClient
from husk.client.session import container_path, inspect

if TYPE_CHECKING:
    from husk.oci.extract import ExtractPolicy

# Go's os.FileMode bits, which Docker's path-stat header uses.
GO_MODE_DIR = 1 << 31
GO_MODE_SYMLINK = 1 << 27
SPOOL_BYTES = 16 * 1024 * 1024
SPOOL_CHECK_BYTES = 16 * 1024 * 1024
"""Bytes spooled between two looks at the spool's free space."""
SPOOL_RESERVE = 0.1
SPOOL_RESERVE_MAX = 1 << 30
"""An archive from a container is refused once its spool would leave less than this
share of its file system free (at most SPOOL_RESERVE_MAX bytes): the guest makes the
archive, and may stream it for ever whatever its stat said."""
UPLOAD_BLOCK = 1024 * 1024
"""Bytes read from the spooled archive per chunk of the upload (and per copy while
building it): the HTTP client's default is 64 KiB, tarfile's 16 KiB."""
STAT_HEADER = "x-docker-container-path-stat"


def split_cp_arg(arg: str) -> tuple[str | None, str]:
    """``container:path`` → (container, path); a local path → (None, path).

    As in Docker, an absolute or ``./``-prefixed path is always local, so local
    names with a colon stay reachable.
    """
    if arg == "-" or arg.startswith("/") or arg.startswith("."):
        return None, arg
    container, sep, path = arg.partition(":")
    if not sep or not container:
        return None, arg
    return container, path


def stat_is_dir(stat: dict[str, Any]) -> bool:
    mode = int(stat.get("mode") or 0)
    return bool(mode & GO_MODE_DIR) or (mode & 0o170000) == 0o040000


def decode_stat(header: str | None) -> dict[str, Any] | None:
    if not header:
        return None
    try:
        doc = json.loads(base64.b64decode(header))
    except (ValueError, binascii.Error):
        raise errors.Internal("the husk daemon sent an unreadable path stat header") from None
    return doc if isinstance(doc, dict) else None


def _archive_path(container: str) -> str:
    return container_path(container, "archive")


def stat_container_path(api: ApiClient, container: str, path: str) -> dict[str, Any] | None:
    """The path's stat in the container, or None when it does not exist."""
    inspect(api, container)  # a clear "No such container" before a bare 404
    try:
        with api.open("HEAD", _archive_path(container), query={"path": path}) as response:
            return decode_stat(response.headers.get(STAT_HEADER)) or {}
    except errors.NotFound:
        return None


@dataclass(frozen=True)
class Placement:
    """Where an archive from a container lands: below ``root``, its top-level entry at
    ``top`` (components; () is ``root`` itself, for a directory's contents)."""

    root: Path
    top: tuple[str, ...]


def place_copy(src: str, src_is_dir: bool, dest_text: str) -> Placement:
    """Docker's naming for ``cp CONTAINER:SRC DEST``, decided from the command line alone.

    An existing directory receives the source under its own name (or its contents,
    for ``SRC/.``); an existing file is replaced by a file; a new name becomes the
    source's name. The archive's own names never choose where anything lands.
    """
    dest = Path(dest_text)
    contents_only = src == "." or src.endswith("/.")
    source_name = os.path.basename(src.rstrip("/"))
    if dest.is_dir():
        if (contents_only and src_is_dir) or source_name in ("", ".", ".."):
            return Placement(dest, ())
        return Placement(dest, (source_name,))
    if dest.name in ("", ".", ".."):
        raise errors.InvalidArgument(f"invalid destination {dest_text!r}")
    if os.path.lexists(dest):
        if src_is_dir:
            raise errors.InvalidArgument(f"cannot copy a directory to a file: {dest}")
        return Placement(dest.parent, (dest.name,))
    if dest_text.endswith("/"):
        raise errors.InvalidArgument(f"the destination directory {dest} does not exist")
    if not dest.parent.is_dir():
        raise errors.InvalidArgument(
            f"the destination's parent directory {dest.parent} does not exist"
        )
    if contents_only and src_is_dir:
        dest.mkdir()
        return Placement(dest, ())
    return Placement(dest.parent, (dest.name,))


def copy_policy(keep_owner: bool) -> ExtractPolicy:
    """Files from a container: no device nodes or FIFOs, no xattrs; owners (and with them
    setuid/setgid bits) only with ``-a`` as root, as Docker does."""
    from husk.oci.extract import ExtractPolicy  # lazy: CLI start-up (decimal, ~15 ms)

    keep = keep_owner and os.geteuid() == 0
    return ExtractPolicy(keep_owner=keep, keep_setid=keep)


def extract_copy(
    spool: IO[bytes],
    src: str,
    stat: dict[str, Any],
    dest: str,
    *,
    label: str,
    keep_owner: bool = False,
) -> None:
    """Extract the archive of ``src`` (seekable ``spool``) to ``dest`` by Docker's rules."""
    from husk.oci.extract import TopMapper, extract_archive  # lazy: as in copy_policy

    placement = place_copy(src, stat_is_dir(stat), dest)
    try:
        extract_archive(
            spool,
            placement.root,
            copy_policy(keep_owner),
            label=label,
            mapper=TopMapper(placement.top, label),
        )
    except OSError as err:
        where = os.path.join(placement.root, *placement.top)
        raise errors.InvalidArgument(
            f"{label}: cannot write below {where}: {err.strerror or err}"
            + (f" ({err.filename})" if err.filename else "")
        ) from None


def copy_from_container(
    api: ApiClient, container: str, src: str, dest: str, *, quiet: bool, keep_owner: bool = False
) -> None:
    inspect(api, container)
    with api.open("GET", _archive_path(container), query={"path": src}) as response:
        if dest == "-":
            for data in response.iter_body():
                sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return

        stat = decode_stat(response.headers.get(STAT_HEADER)) or {}
        label = f"archive of {container}:{src}"
        # The archive is checked whole before anything is written: spool it, small
        # archives in memory, big ones beside the destination (the file system the user
        # chose to write to; the temporary directory is often a tmpfs: memory).
        where = _spool_dir(dest)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=where) as spool:
            checked = 0
            for data in response.iter_body():
                spool.write(data)
                if spool.tell() - checked >= SPOOL_CHECK_BYTES:
                    checked = spool.tell()
                    _check_room(where, label, checked)
            size = spool.tell()
            spool.seek(0)
            extract_copy(spool, src, stat, dest, label=label, keep_owner=keep_owner)
    if not quiet:
        click.echo(f"Successfully copied {human_size(size)} to {dest}", err=True)


def _spool_dir(dest: str) -> str | None:
    """The directory a copy to ``dest`` spools in (None: the temporary directory, when
    the destination's directory does not exist; the copy then fails on placing it)."""
    path = Path(dest)
    directory = path if path.is_dir() else path.parent
    return str(directory) if directory.is_dir() else None


def _check_room(where: str | None, label: str, size: int) -> None:
    info = os.statvfs(where or tempfile.gettempdir())
    free = info.f_bavail * info.f_frsize
    reserve = min(SPOOL_RESERVE_MAX, int(info.f_blocks * info.f_frsize * SPOOL_RESERVE))
    if free < reserve:
        raise errors.InvalidArgument(
            f"{label}: stopped after {human_size(size)}: it would leave less than "
            f"{human_size(reserve)} free in {where or tempfile.gettempdir()}"
        )


def copy_to_container(
    api: ApiClient, src: str, container: str, dest: str, *, follow_link: bool, quiet: bool
) -> None:
    query = {"path": dest, "noOverwriteDirNonDir": True}
    if src == "-":
        api.call("PUT", _archive_path(container), query=query, body=sys.stdin.buffer)
        return
    source = Path(src)
    if follow_link:
        source = source.resolve()
    if not os.path.lexists(source):
        raise errors.InvalidArgument(f"the source path {src} does not exist")
    src_is_dir = source.is_dir() and (follow_link or not source.is_symlink())
    contents_only = src.endswith("/.") or src == "."
    dest_stat = stat_container_path(api, container, dest)
    if dest_stat is not None and stat_is_dir(dest_stat):
        put_dir, arcname = dest, source.name
    elif dest_stat is not None:
        if src_is_dir:
            raise errors.InvalidArgument(f"cannot copy a directory to a file: {container}:{dest}")
        put_dir, arcname = os.path.dirname(dest) or "/", os.path.basename(dest)
    else:
        if dest.endswith("/"):
            raise errors.InvalidArgument(
                f"the destination directory {container}:{dest} does not exist"
            )
        put_dir, arcname = os.path.dirname(dest.rstrip("/")) or "/", os.path.basename(dest)
    with tempfile.TemporaryFile() as spool:
        # GNU rather than PAX: no extended headers for sub-second mtimes, which
        # minimal extractors (busybox tar among them) may not understand.
        with tarfile.open(fileobj=spool, mode="w", format=tarfile.GNU_FORMAT) as archive:
            archive.copybufsize = UPLOAD_BLOCK  # type: ignore[attr-defined]
            if contents_only and src_is_dir:
                if dest_stat is None:
                    archive.add(source, arcname=arcname, recursive=False)
                    prefix = arcname + "/"
                else:
                    prefix = ""
                for child in sorted(source.iterdir()):
                    archive.add(child, arcname=prefix + child.name)
            else:
                archive.add(source, arcname=arcname)
        size = spool.tell()
        spool.seek(0)
        query["path"] = put_dir
        api.call("PUT", _archive_path(container), query=query, body=cast(BinaryIO, _Blocks(spool)))
    if not quiet:
        click.echo(f"Successfully copied {human_size(size)} to {container}:{dest}", err=True)


class _Blocks:
    """A spooled archive read in UPLOAD_BLOCK pieces whatever size the client asks for."""

    def __init__(self, spool: IO[bytes]) -> None:
        self._spool = spool

    def read(self, size: int = -1) -> bytes:
        return self._spool.read(max(size, UPLOAD_BLOCK))


@click.command(name="cp")
@click.option("-a", "--archive", is_flag=True, help="Archive mode (copy all uid/gid information).")
@click.option("-L", "--follow-link", is_flag=True, help="Always follow symbol link in SRC_PATH.")
@click.option("-q", "--quiet", is_flag=True, help="Suppress progress output.")
@click.argument("source")
@click.argument("destination")
def cp(archive: bool, follow_link: bool, quiet: bool, source: str, destination: str) -> None:
    """Copy files between a container and the host.

    \b
    husk cp CONTAINER:SRC_PATH DEST_PATH|-
    husk cp SRC_PATH|- CONTAINER:DEST_PATH
    """
    src_container, src_path = split_cp_arg(source)
    dest_container, dest_path = split_cp_arg(destination)
    if src_container and dest_container:
        raise errors.InvalidArgument("copying between two containers is not supported")
    if not src_container and not dest_container:
        raise errors.InvalidArgument("one of the paths must be CONTAINER:PATH")
    if (src_container and not src_path) or (dest_container and not dest_path):
        raise errors.InvalidArgument("the path inside the container cannot be empty")
    api = connect()
    if src_container:
        copy_from_container(
            api, src_container, src_path, dest_path, quiet=quiet, keep_owner=archive
        )
    else:
        assert dest_container is not None
        copy_to_container(
            api, src_path, dest_container, dest_path, follow_link=follow_link, quiet=quiet
        )
