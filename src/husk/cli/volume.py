"""``husk volume …``: create, ls, inspect, rm, prune (Docker's ``local`` volumes).

A request the daemon refuses prints one line and exits 1, as ``docker volume`` does;
a bad command line exits 125.
"""

from __future__ import annotations

from typing import Any

import click

from husk.cli.format import Formatter, escape_text
from husk.cli.objects import (
    confirmed,
    each,
    filter_query,
    key_values,
    once,
    parse_filters,
    print_inspected,
    print_rows,
)
from husk.client.daemon import connect
from husk.client.http import quote
from husk.humanize import human_size

DEFAULT_TABLE = "{{.Driver}}\t{{.Name}}"
HEADERS = {
    "Name": "VOLUME NAME",
    "Driver": "DRIVER",
    "Scope": "SCOPE",
    "Mountpoint": "MOUNTPOINT",
    "Labels": "LABELS",
    "CreatedAt": "CREATED AT",
}


class VolumeRow:
    """One item of ``GET /volumes`` with the fields ``--format`` knows."""

    template_fields = tuple(HEADERS)

    def __init__(self, item: dict[str, Any]) -> None:
        self._item = item

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.template_fields}

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
    def Mountpoint(self) -> str:
        return str(self._item.get("Mountpoint", ""))

    @property
    def Labels(self) -> str:
        labels = self._item.get("Labels") or {}
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))

    @property
    def CreatedAt(self) -> str:
        return str(self._item.get("CreatedAt", ""))


@click.group(name="volume")
def volume() -> None:
    """Manage volumes."""


@volume.command(name="create")
@click.option("-d", "--driver", default="local", show_default=True, help="Volume driver.")
@click.option("-l", "--label", "labels", multiple=True, help="Set metadata (key=value).")
@click.option("-o", "--opt", "options", multiple=True, help="Driver options (key=value).")
@click.option("--name", "name_option", default="", help="The volume's name (or give NAME).")
@click.argument("name", required=False, default="")
def create(
    driver: str, labels: tuple[str, ...], options: tuple[str, ...], name_option: str, name: str
) -> None:
    """Create a volume (an anonymous name when none is given)."""
    if name and name_option and name != name_option:
        raise click.UsageError(f"conflicting names: {name_option} and {name}")
    body: dict[str, Any] = {
        "Name": name or name_option,
        "Driver": driver,
        "Labels": key_values(labels, "--label"),
        "DriverOpts": key_values(options, "--opt"),
    }
    result = once(lambda: connect().post("/volumes/create", json_body=body))
    click.echo(escape_text(str((result or {}).get("Name", ""))))


@volume.command(name="ls")
@click.option("-f", "--filter", "filters", multiple=True, help="Filter output (name=value).")
@click.option("--format", "format_spec", default="", help="table, json or a Go template.")
@click.option("-q", "--quiet", is_flag=True, help="Only display volume names.")
def ls(filters: tuple[str, ...], format_spec: str, quiet: bool) -> None:
    """List volumes."""
    if quiet:
        format_spec = "{{.Name}}"
    query = filter_query(filters)
    reply = once(lambda: connect().get("/volumes", query)) or {}
    rows = [VolumeRow(item) for item in reply.get("Volumes") or []]
    print_rows(Formatter(format_spec, DEFAULT_TABLE, HEADERS), rows)


volume.add_command(ls, name="list")


@volume.command(name="inspect")
@click.option("-f", "--format", "format_spec", default="", help="A Go template.")
@click.argument("volumes", nargs=-1, required=True)
def inspect(format_spec: str, volumes: tuple[str, ...]) -> None:
    """Display detailed information on one or more volumes."""
    print_inspected("volumes", volumes, format_spec)


@volume.command(name="rm")
@click.option("-f", "--force", is_flag=True, help="Do not error if the volume does not exist.")
@click.argument("volumes", nargs=-1, required=True)
def rm(force: bool, volumes: tuple[str, ...]) -> None:
    """Remove one or more volumes (refused while a container uses one)."""
    api = connect()

    def remove(name: str) -> None:
        api.delete(f"/volumes/{quote(name)}", {"force": "1" if force else "0"})
        click.echo(escape_text(name))

    each(volumes, remove)


volume.add_command(rm, name="remove")


@volume.command(name="prune")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.option("-a", "--all", "all_volumes", is_flag=True, help="Named volumes too.")
@click.option("--filter", "filters", multiple=True, help="Filters (label=…).")
def prune(force: bool, all_volumes: bool, filters: tuple[str, ...]) -> None:
    """Remove unused anonymous volumes (with --all, unused named ones too)."""
    which = "all local volumes" if all_volumes else "all anonymous local volumes"
    if not confirmed(f"{which} not used by at least one container", force):
        return
    wanted = parse_filters(filters)
    if all_volumes:
        wanted["all"] = ["true"]
    query: dict[str, Any] = {"filters": wanted} if wanted else {}
    result = once(lambda: connect().post("/volumes/prune", query)) or {}
    deleted = result.get("VolumesDeleted") or []
    if deleted:
        click.echo("Deleted Volumes:")
        for name in deleted:
            click.echo(escape_text(str(name)))
        click.echo("")
    click.echo(f"Total reclaimed space: {human_size(int(result.get('SpaceReclaimed') or 0))}")
