"""``husk pull``: fetch an image from a registry into the daemon's store."""

from __future__ import annotations

import sys

import click

from husk.cli.format import escape_text
from husk.client.daemon import connect
from husk.client.images import pull_image
from husk.oci.reference import parse_reference


def run_pull(reference: str, *, platform: str | None, policy: str, quiet: bool) -> str:
    """Pull through the daemon as ``policy`` says; prints Docker's lines, returns the name."""
    # lazy: CLI start-up (husk.oci.pull brings aiohttp, ~150 ms; the pull runs in the daemon)
    from husk.oci.pull import normalise_policy

    ref = parse_reference(reference)  # a bad name fails here, before the daemon is asked
    policy = normalise_policy(policy)
    if not quiet:
        click.echo(f"{ref.ref}: Pulling from {ref.repository}")

    def show(line: str) -> None:
        # Status lines (Digest, Status) always; per-layer progress only on a terminal.
        if not quiet and (line.startswith(("Digest:", "Status:")) or sys.stdout.isatty()):
            click.echo(escape_text(line))

    pull_image(connect(), str(ref), platform=platform, policy=policy, on_line=show)
    click.echo(str(ref))
    return str(ref)


@click.command()
@click.argument("reference")
@click.option(
    "--platform", help="Pull for this platform (os/arch[/variant]) instead of the host's."
)
@click.option(
    "--policy",
    default="always",
    show_default=True,
    type=click.Choice(["always", "missing", "if-not-present", "never", "newer"]),
    help="When to contact the registry.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the image name.")
def pull(reference: str, platform: str | None, policy: str, quiet: bool) -> None:
    """Pull an image from a registry into the local store."""
    run_pull(reference, platform=platform, policy=policy, quiet=quiet)
