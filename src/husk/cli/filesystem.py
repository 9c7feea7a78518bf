"""``husk export`` and ``husk diff``: a container's whole file system, its changes.

Both work on created and exited containers too (the daemon serves those through a
short-lived maintenance VM).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from husk import errors
from husk.cli.format import escape_text
from husk.client.daemon import connect
from husk.client.session import container_path

EXPORT_TIMEOUT = 3600.0
KIND_LETTERS = {0: "C", 1: "A", 2: "D"}


def _write_export(container: str, handle: Any) -> None:
    api = connect()
    with api.open("GET", container_path(container, "export"), timeout=EXPORT_TIMEOUT) as answer:
        for chunk in answer.iter_body():
            handle.write(chunk)


@click.command(name="export")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file (default: standard output).",
)
@click.argument("container")
def export(output: Path | None, container: str) -> None:
    """Export a container's file system as a tar archive."""
    if output is None:
        if sys.stdout.isatty():
            raise click.UsageError("refusing to write an archive to a terminal; use --output")
        _write_export(container, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    # Written beside the target and renamed: a failed export leaves no partial archive.
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            _write_export(container, handle)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def change_lines(changes: Any) -> list[str]:
    """Docker's ``A /path`` lines of the daemon's list of changes."""
    if not isinstance(changes, list):
        raise errors.Internal("the husk daemon sent something else than a list of changes")
    lines = []
    for change in changes:
        kind = change.get("Kind") if isinstance(change, dict) else None
        path = change.get("Path") if isinstance(change, dict) else None
        if kind not in KIND_LETTERS or not isinstance(path, str):
            raise errors.Internal(f"the husk daemon sent an unreadable change {change!r:.100}")
        lines.append(f"{KIND_LETTERS[kind]} {escape_text(path)}")
    return lines


@click.command(name="diff")
@click.argument("container")
def diff(container: str) -> None:
    """Inspect changes to files or directories on a container's file system."""
    api = connect()
    for line in change_lines(api.get(container_path(container, "changes"))):
        click.echo(line)
