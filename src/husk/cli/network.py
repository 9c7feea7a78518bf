"""``husk network …``: create, ls, inspect, rm, prune, connect, disconnect (Docker's).

A request the daemon refuses prints one line and exits 1, as ``docker network`` does;
a bad command line exits 125.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from husk.cli.format import Formatter, escape_text
from husk.cli.objects import (
    confirmed,
    each,
    filter_query,
    key_values,
    once,
    print_inspected,
    print_rows,
)
from husk.cli.overlay import overlay
from husk.client.daemon import connect
from husk.client.http import quote
from husk.errors import HuskError

SHORT_ID = 12
DEFAULT_TABLE = "{{.ID}}\t{{.Name}}\t{{.Driver}}\t{{.Scope}}"
HEADERS = {
    "ID": "NETWORK ID",
    "Name": "NAME",
    "Driver": "DRIVER",
    "Scope": "SCOPE",
    "IPv6": "IPV6",
    "IPv4": "IPV4",
    "Internal": "INTERNAL",
    "Labels": "LABELS",
    "CreatedAt": "CREATED AT",
}


class NetworkRow:
    """One item of ``GET /networks`` with the fields ``--format`` knows."""

    template_fields = tuple(HEADERS)

    def __init__(self, item: dict[str, Any], *, truncate: bool) -> None:
        self._item = item
        self._truncate = truncate

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.template_fields}

    @property
    def ID(self) -> str:
        full = str(self._item.get("Id", ""))
        return full[:SHORT_ID] if self._truncate else full

    @property
    def Name(self) -> str:
        return str(self._item.get("Name", ""))

    @property
    def Driver(self) -> str:
        return str(self._item.get("Driver", ""))

    @property
    def Scope(self) -> str:
        return str(self._item.get("Scope", ""))

    @property
    def IPv6(self) -> str:
        return "true" if self._item.get("EnableIPv6") else "false"

    @property
    def IPv4(self) -> str:
        return "false" if self._item.get("EnableIPv4") is False else "true"

    @property
    def Internal(self) -> str:
        return "true" if self._item.get("Internal") else "false"

    @property
    def Labels(self) -> str:
        labels = self._item.get("Labels") or {}
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))

    @property
    def CreatedAt(self) -> str:
        text = str(self._item.get("Created", ""))
        try:
            created = datetime.fromisoformat(text[:26].rstrip("Z") + "+00:00").astimezone()
        except ValueError:
            return text
        return created.strftime("%Y-%m-%d %H:%M:%S.%f %z %Z")


@click.group(name="network")
def network() -> None:
    """Manage networks."""


@network.command(name="create")
@click.option("-d", "--driver", default="bridge", show_default=True, help="Network driver.")
@click.option("--subnet", help="Subnet in CIDR format (one IPv4 subnet).")
@click.option("--gateway", help="IPv4 gateway for the subnet.")
@click.option("--internal", is_flag=True, help="Restrict external access to the network.")
@click.option("--attachable", is_flag=True, help="Enable manual container attachment.")
@click.option("--ipv6", is_flag=True, help="Enable IPv6 (not supported by husk).")
@click.option("-l", "--label", "labels", multiple=True, help="Set metadata (key=value).")
@click.option("-o", "--opt", "options", multiple=True, help="Driver options (key=value).")
@click.argument("name")
def create(
    driver: str,
    subnet: str | None,
    gateway: str | None,
    internal: bool,
    attachable: bool,
    ipv6: bool,
    labels: tuple[str, ...],
    options: tuple[str, ...],
    name: str,
) -> None:
    """Create a network."""
    body: dict[str, Any] = {
        "Name": name,
        "Driver": driver,
        "Internal": internal,
        "Attachable": attachable,
        "EnableIPv6": ipv6,
        "Labels": key_values(labels, "--label"),
        "Options": key_values(options, "--opt"),
    }
    if subnet or gateway:
        config = {"Subnet": subnet or ""}
        if gateway:
            config["Gateway"] = gateway
        body["IPAM"] = {"Driver": "default", "Config": [config]}
    result = once(lambda: connect().post("/networks/create", json_body=body))
    click.echo(str((result or {}).get("Id", "")))


@network.command(name="ls")
@click.option("-f", "--filter", "filters", multiple=True, help="Filter output (name=value).")
@click.option("--format", "format_spec", default="", help="table, json or a Go template.")
@click.option("-q", "--quiet", is_flag=True, help="Only display network IDs.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate the output.")
def ls(filters: tuple[str, ...], format_spec: str, quiet: bool, no_trunc: bool) -> None:
    """List networks."""
    if quiet:
        format_spec = "{{.ID}}"
    query = filter_query(filters)
    items = once(lambda: connect().get("/networks", query)) or []
    rows = [NetworkRow(item, truncate=not no_trunc) for item in items]
    print_rows(Formatter(format_spec, DEFAULT_TABLE, HEADERS), rows)


network.add_command(ls, name="list")


@network.command(name="inspect")
@click.option("-f", "--format", "format_spec", default="", help="A Go template.")
@click.argument("networks", nargs=-1, required=True)
def inspect(format_spec: str, networks: tuple[str, ...]) -> None:
    """Display detailed information on one or more networks."""
    print_inspected("networks", networks, format_spec)


@network.command(name="rm")
@click.option("-f", "--force", is_flag=True, help="Do not error if the network does not exist.")
@click.argument("networks", nargs=-1, required=True)
def rm(force: bool, networks: tuple[str, ...]) -> None:
    """Remove one or more networks."""
    api = connect()

    def remove(ref: str) -> None:
        try:
            api.delete(f"/networks/{quote(ref)}")
        except HuskError as err:
            if force and getattr(err, "http_status", 0) == 404:
                return
            raise
        click.echo(escape_text(ref))

    each(networks, remove)


network.add_command(rm, name="remove")


@network.command(name="prune")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.option("--filter", "filters", multiple=True, help="Filters (label=…, until=…).")
def prune(force: bool, filters: tuple[str, ...]) -> None:
    """Remove all unused networks."""
    if not confirmed("all custom networks not used by at least one container", force):
        return
    query = filter_query(filters)
    result = once(lambda: connect().post("/networks/prune", query)) or {}
    deleted = result.get("NetworksDeleted") or []
    if deleted:
        click.echo("Deleted Networks:")
        for name in deleted:
            click.echo(escape_text(str(name)))


@network.command(name="connect")
@click.option("--alias", "aliases", multiple=True, help="Add a network-scoped alias.")
@click.option("--ip", help="IPv4 address (e.g. 172.30.100.104).")
@click.argument("network_ref", metavar="NETWORK")
@click.argument("container")
def connect_container(
    aliases: tuple[str, ...], ip: str | None, network_ref: str, container: str
) -> None:
    """Connect a container to a network."""
    endpoint: dict[str, Any] = {"Aliases": list(aliases)}
    if ip:
        endpoint["IPAMConfig"] = {"IPv4Address": ip}
    body = {"Container": container, "EndpointConfig": endpoint}
    once(lambda: connect().post(f"/networks/{quote(network_ref)}/connect", json_body=body))


@network.command(name="disconnect")
@click.option("-f", "--force", is_flag=True, help="Force the container to disconnect.")
@click.argument("network_ref", metavar="NETWORK")
@click.argument("container")
def disconnect_container(force: bool, network_ref: str, container: str) -> None:
    """Disconnect a container from a network."""
    body = {"Container": container, "Force": force}
    once(lambda: connect().post(f"/networks/{quote(network_ref)}/disconnect", json_body=body))


network.add_command(overlay)
