"""``husk run`` and ``husk create``: click's parse; the work is :mod:`husk.cli.runflow`."""

from __future__ import annotations

from typing import Any

import click

from husk.cli import runflow
from husk.cli.createflags import create_options
from husk.cli.createopts import build_create_request
from husk.client.daemon import connect
from husk.detachkeys import parse_detach_keys

# Kept importable from here, where they lived before runflow.
create_container = runflow.create_container
remove_container = runflow.remove_container
exit_code_of = runflow.exit_code_of
REMOVAL_DEADLINE = runflow.REMOVAL_DEADLINE

_RUN_SETTINGS = {
    "ignore_unknown_options": True,
    "allow_interspersed_args": False,
    # -h is --hostname here, as in Docker.
    "help_option_names": ["--help"],
}


def _check_image_argument(image: str) -> None:
    if image.startswith("-"):
        raise click.UsageError(f"unknown flag: {image}")


@click.command(name="run", context_settings=_RUN_SETTINGS)
@click.option("-d", "--detach", is_flag=True, help="Run in the background, print the ID.")
@click.option(
    "--sig-proxy/--no-sig-proxy", default=True, help="Forward received signals to the process."
)
@click.option(
    "--detach-keys",
    default="",
    help="Key sequence that detaches from the container (default ctrl-p,ctrl-q).",
)
@create_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(
    image: str,
    command: tuple[str, ...],
    detach: bool,
    sig_proxy: bool,
    detach_keys: str,
    **options: Any,
) -> None:
    """Create and run a new container from an image."""
    _check_image_argument(image)
    parse_detach_keys(detach_keys)  # a bad sequence is refused before anything is created
    request = build_create_request(image, command, options, attach=not detach)
    runflow.run_request(request, detach=detach, sig_proxy=sig_proxy, detach_keys=detach_keys)


@click.command(name="create", context_settings=_RUN_SETTINGS)
@create_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def create(image: str, command: tuple[str, ...], **options: Any) -> None:
    """Create a new container without starting it; prints its ID."""
    _check_image_argument(image)
    request = build_create_request(image, command, options, attach=False)
    click.echo(runflow.create_container(connect(), request))
