"""``husk load``, ``husk save`` and ``husk import``: images in and out of tarballs."""

from __future__ import annotations

import contextlib
import os
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import click

from husk.cli.format import escape_text
from husk.client.daemon import connect
from husk.client.images import import_rootfs, load_images, save_images


@click.command(name="load")
@click.option(
    "-i",
    "--input",
    "source",
    type=click.Path(exists=True, path_type=Path),
    help="Archive file or OCI layout directory (default: standard input).",
)
@click.option("--name", help="Name for an image whose archive carries no repository name.")
@click.option("--platform", help="Platform to pick from a multi-platform archive.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the loaded names (or IDs).")
def load(source: Path | None, name: str | None, platform: str | None, quiet: bool) -> None:
    """Load images from a docker-archive or OCI archive (docker save / skopeo copy)."""
    api = connect()
    if source is None:
        if sys.stdin.isatty():
            raise click.UsageError("give an archive with --input or pipe one to standard input")
        lines = load_images(api, sys.stdin.buffer, name=name, platform=platform)
    elif source.is_dir():
        with _tarred(source) as archive:
            lines = load_images(api, archive, name=name, platform=platform)
    else:
        with source.open("rb") as archive:
            lines = load_images(api, archive, name=name, platform=platform)
    for line in lines:
        if quiet:
            # The daemon says "Loaded image: NAME" or "Loaded image ID: ID".
            click.echo(escape_text(line.rpartition(": ")[2]))
        else:
            # The name comes from the archive's own manifest.
            click.echo(escape_text(line))


@contextlib.contextmanager
def _tarred(directory: Path) -> Iterator[BinaryIO]:
    """An OCI layout directory as a tar archive the daemon can load."""
    with tempfile.TemporaryFile() as spool:
        with tarfile.open(fileobj=spool, mode="w") as archive:
            for child in sorted(directory.iterdir()):
                archive.add(child, arcname=child.name)
        spool.seek(0)
        yield spool


@click.command(name="save")
@click.argument("references", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file (default: standard output).",
)
@click.option(
    "--format",
    "archive_format",
    type=click.Choice(["docker-archive", "oci-archive"]),
    default="docker-archive",
    show_default=True,
)
def save(references: tuple[str, ...], output: Path | None, archive_format: str) -> None:
    """Save images to a tar archive."""
    api = connect()
    if output is None:
        if sys.stdout.isatty():
            raise click.UsageError("refusing to write an archive to a terminal; use --output")
        save_images(api, list(references), sys.stdout.buffer, archive_format=archive_format)
        sys.stdout.buffer.flush()
        return
    # Written beside the target and renamed: a failed save leaves no partial archive.
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            save_images(api, list(references), handle, archive_format=archive_format)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@click.command(name="import")
@click.argument("source")
@click.argument("reference", required=False)
@click.option(
    "-c", "--change", "changes", multiple=True, help="Dockerfile instruction (CMD, ENV …)."
)
@click.option("-m", "--message", default="", help="Commit message for the image history.")
@click.option("--platform", help="Platform the image is for (default: the host's).")
def import_(
    source: str,
    reference: str | None,
    changes: tuple[str, ...],
    message: str,
    platform: str | None,
) -> None:
    """Create a single-layer image from a root filesystem tarball ('-' for stdin)."""
    api = connect()
    if source == "-":
        image_id = import_rootfs(
            api, sys.stdin.buffer, reference, changes=changes, message=message, platform=platform
        )
    else:
        path = Path(source)
        if not path.is_file():
            raise click.UsageError(f"no such file: {source}")
        with path.open("rb") as stream:
            image_id = import_rootfs(
                api, stream, reference, changes=changes, message=message, platform=platform
            )
    click.echo(image_id)
