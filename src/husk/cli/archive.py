"""``husk load``, ``husk save`` and ``husk import``: images in and out of tarballs."""

from __future__ import annotations

import sys
from pathlib import Path

import click


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
@click.option("-q", "--quiet", is_flag=True, help="Print only image IDs.")
def load(source: Path | None, name: str | None, platform: str | None, quiet: bool) -> None:
    """Load images from a docker-archive or OCI archive (docker save / skopeo copy)."""
    import shutil
    import tempfile

    from husk.cli.format import escape_text
    from husk.oci.archive import load_path
    from husk.oci.store import ImageStore

    store = ImageStore()
    if source is None:
        if sys.stdin.isatty():
            raise click.UsageError("give an archive with --input or pipe one to standard input")
        with tempfile.NamedTemporaryFile(dir=store.ingest_dir, prefix="stdin-") as tmp:
            shutil.copyfileobj(sys.stdin.buffer, tmp, 1024 * 1024)
            tmp.flush()
            records = load_path(Path(tmp.name), store=store, name=name, platform=platform)
    else:
        records = load_path(source, store=store, name=name, platform=platform)
    for record in records:
        if quiet:
            click.echo(record.id)
        elif record.names:
            for image_name in record.names:
                # The name comes from the archive's own manifest.
                click.echo(f"Loaded image: {escape_text(image_name)}")
        else:
            click.echo(f"Loaded image ID: {record.id}")


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
    from husk.oci.archive import save_images

    if output is None:
        if sys.stdout.isatty():
            raise click.UsageError("refusing to write an archive to a terminal; use --output")
        save_images(list(references), sys.stdout.buffer, format=archive_format)
        sys.stdout.buffer.flush()
    else:
        save_images(list(references), output, format=archive_format)


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
    from husk.oci.archive import import_rootfs

    if source == "-":
        record = import_rootfs(
            sys.stdin.buffer, reference, changes=changes, message=message, platform=platform
        )
    else:
        record = import_rootfs(
            Path(source), reference, changes=changes, message=message, platform=platform
        )
    click.echo(record.id)
