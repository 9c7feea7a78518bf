"""``husk daemon``: serve the API (the Docker Engine API) in the foreground."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket to listen on (default: /run/husk/husk.sock for root, "
    "else the user's runtime directory; HUSK_SOCKET or HUSK_RUN_DIR change it).",
)
@click.option(
    "--tcp",
    metavar="127.0.0.1:PORT",
    help="Also listen on this loopback TCP address (the API has no authentication).",
)
@click.option("--debug", is_flag=True, help="Log every request and debug details.")
def daemon(socket_path: Path | None, tcp: str | None, debug: bool) -> None:
    """Run the husk daemon: owns the containers' VMs and serves the Docker Engine API.

    Point Docker clients at it with DOCKER_HOST=unix://SOCKET. On SIGTERM or
    SIGINT it exits and leaves running containers running; the next daemon
    re-attaches to them.
    """
    from husk.daemon.server import run_daemon

    run_daemon(socket=socket_path, tcp=tcp, debug=debug)
