"""``husk login`` / ``husk logout``: registry credentials in husk's own 0600 file."""

from __future__ import annotations

import sys

import click

from husk.errors import InvalidArgument
from husk.oci.auth import Credentials, registry_key, remove_credentials, store_credentials

DEFAULT_SERVER = "docker.io"


@click.command(name="login")
@click.argument("server", required=False, default=DEFAULT_SERVER)
@click.option("-u", "--username", help="Username.")
@click.option("-p", "--password", help="Password (prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def login(server: str, username: str | None, password: str | None, password_stdin: bool) -> None:
    """Log in to a registry; the credentials are checked before they are stored."""
    # lazy: CLI start-up (asyncio and the registry client with aiohttp, ~150 ms)
    import asyncio

    from husk.oci.registry import RegistryClient

    if password is not None and password_stdin:
        raise InvalidArgument("--password and --password-stdin are mutually exclusive")
    if password_stdin:
        if username is None:
            raise InvalidArgument("--password-stdin needs --username")
        password = sys.stdin.read().rstrip("\r\n")
    if username is None:
        username = click.prompt("Username")
    if password is None:
        password = click.prompt("Password", hide_input=True)
    host = registry_key(server)

    async def check() -> None:
        async with RegistryClient(host, credentials=Credentials(username, password)) as client:
            await client.check_credentials()

    asyncio.run(check())
    path = store_credentials(host, username, password)
    click.echo(f"Login Succeeded (credentials saved in {path})")


@click.command(name="logout")
@click.argument("server", required=False, default=DEFAULT_SERVER)
def logout(server: str) -> None:
    """Forget the credentials stored for a registry."""
    host = registry_key(server)
    if remove_credentials(host):
        click.echo(f"Removing login credentials for {host}")
    else:
        click.echo(f"Not logged in to {host}")
