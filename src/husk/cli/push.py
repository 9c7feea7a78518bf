"""``husk push``: upload a local image to a registry, through the daemon."""

from __future__ import annotations

import sys

import click

from husk.cli.format import escape_text
from husk.client.daemon import connect
from husk.client.images import push_image
from husk.errors import InvalidArgument
from husk.oci.reference import parse_reference


@click.command()
@click.argument("reference")
@click.argument("destination", required=False)
@click.option(
    "--chunk-size", type=click.IntRange(min=1), help="Upload blobs in chunks of this many bytes."
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the pushed digest.")
def push(reference: str, destination: str | None, chunk_size: int | None, quiet: bool) -> None:
    """Push an image (optionally under another name) to its registry."""
    target = parse_reference(destination or reference)  # a bad name fails before the daemon
    if target.digest is not None:
        raise InvalidArgument(f"cannot push to a digest reference: {destination or reference}")

    def show(line: str) -> None:
        # Per-layer progress only on a terminal; the result line is printed below.
        if not quiet and sys.stdout.isatty():
            click.echo(escape_text(line))

    result = push_image(
        connect(), reference, destination=destination, chunk_size=chunk_size, on_line=show
    )
    if quiet:
        click.echo(result["Digest"])
    else:
        click.echo(f"{target}: digest: {result['Digest']} size: {result['Size']}")
