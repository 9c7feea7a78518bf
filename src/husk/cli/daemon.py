"""``husk daemon``: serve the API (the Docker Engine API) in the foreground."""

from __future__ import annotations

from pathlib import Path

import click

_FILE = click.Path(dir_okay=False, path_type=Path)


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
    help="Also listen on this loopback TCP address; requires --tlsverify "
    "(clients must present a certificate signed by --tlscacert).",
)
@click.option(
    "--tlsverify",
    is_flag=True,
    help="Serve --tcp over TLS and require client certificates, as dockerd's --tlsverify.",
)
@click.option("--tlscacert", type=_FILE, help="CA that signs client certificates [ca.pem].")
@click.option("--tlscert", type=_FILE, help="The daemon's TLS certificate [cert.pem].")
@click.option("--tlskey", type=_FILE, help="The daemon's TLS key [key.pem].")
@click.option("--debug", is_flag=True, help="Log every request and debug details.")
def daemon(
    socket_path: Path | None,
    tcp: str | None,
    tlsverify: bool,
    tlscacert: Path | None,
    tlscert: Path | None,
    tlskey: Path | None,
    debug: bool,
) -> None:
    """Run the husk daemon: owns the containers' VMs and serves the Docker Engine API.

    Point Docker clients at it with DOCKER_HOST=unix://SOCKET. On SIGTERM or
    SIGINT it exits and leaves running containers running; the next daemon
    re-attaches to them. TLS files default to DOCKER_CERT_PATH (else ~/.docker)
    as dockerd's do; a TCP client then sets DOCKER_TLS_VERIFY=1.
    """
    from husk.daemon.server import run_daemon  # lazy: CLI start-up (aiohttp, runtime: ~400 ms)

    run_daemon(
        socket=socket_path,
        tcp=tcp,
        debug=debug,
        tlsverify=tlsverify,
        tlscacert=tlscacert,
        tlscert=tlscert,
        tlskey=tlskey,
    )
