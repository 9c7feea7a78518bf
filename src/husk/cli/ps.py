"""``husk ps``: list containers, in Docker's shapes.

This is the command whose start-up time is measured (≤ 100 ms against a
running daemon), so it imports only click, the small socket client and the
formatter.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import click

from husk.cli.format import Formatter, human_duration, human_size, truncate_text
from husk.client.daemon import connect
from husk.errors import InvalidArgument

DEFAULT_TABLE = (
    "{{.ID}}\t{{.Image}}\t{{.Command}}\t{{.RunningFor}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}"
)
HEADERS = {
    "ID": "CONTAINER ID",
    "Image": "IMAGE",
    "Command": "COMMAND",
    "CreatedAt": "CREATED AT",
    "RunningFor": "CREATED",
    "Ports": "PORTS",
    "State": "STATE",
    "Status": "STATUS",
    "Size": "SIZE",
    "Names": "NAMES",
    "Labels": "LABELS",
    "Label": "LABEL",
    "Mounts": "MOUNTS",
    "Networks": "NETWORKS",
    "LocalVolumes": "LOCAL VOLUMES",
}
SHORT_ID = 12
COMMAND_WIDTH = 20


def format_ports(ports: list[dict[str, Any]]) -> str:
    """``0.0.0.0:8080->80/tcp, 443/tcp`` from the API's Ports list."""
    published = []
    exposed = []
    for port in sorted(
        ports, key=lambda p: (p.get("PrivatePort", 0), p.get("Type", ""), p.get("IP", ""))
    ):
        private = f"{port.get('PrivatePort', '')}/{port.get('Type', 'tcp')}"
        if port.get("PublicPort"):
            host_ip = port.get("IP") or "0.0.0.0"
            if ":" in host_ip:
                host_ip = f"[{host_ip}]"
            published.append(f"{host_ip}:{port['PublicPort']}->{private}")
        elif private not in exposed:
            exposed.append(private)
    return ", ".join([*published, *exposed])


class ContainerRow:
    """One item of ``GET /containers/json`` with the fields ``--format`` knows."""

    template_fields = tuple(HEADERS)

    def __init__(self, item: dict[str, Any], *, truncate: bool, now: float) -> None:
        self._item = item
        self._truncate = truncate
        self._now = now

    @property
    def ID(self) -> str:
        full = str(self._item.get("Id", ""))
        return full[:SHORT_ID] if self._truncate else full

    @property
    def Image(self) -> str:
        image = str(self._item.get("Image", ""))
        if self._truncate and image.startswith("sha256:"):
            return image[len("sha256:") :][:SHORT_ID]
        return image

    @property
    def Command(self) -> str:
        command = str(self._item.get("Command", ""))
        if self._truncate:
            command = truncate_text(command, COMMAND_WIDTH)
        return f'"{command}"'

    @property
    def CreatedAt(self) -> str:
        created = datetime.fromtimestamp(int(self._item.get("Created", 0))).astimezone()
        return created.strftime("%Y-%m-%d %H:%M:%S %z %Z")

    @property
    def RunningFor(self) -> str:
        created = float(self._item.get("Created", 0))
        return human_duration(max(self._now - created, 0)) + " ago"

    @property
    def Ports(self) -> str:
        return format_ports(list(self._item.get("Ports") or []))

    @property
    def State(self) -> str:
        return str(self._item.get("State", ""))

    @property
    def Status(self) -> str:
        return str(self._item.get("Status", ""))

    @property
    def Size(self) -> str:
        rw = self._item.get("SizeRw")
        if rw is None:
            return "0B"
        root = self._item.get("SizeRootFs")
        text = human_size(int(rw))
        return f"{text} (virtual {human_size(int(root))})" if root is not None else text

    @property
    def Names(self) -> str:
        names = [str(n).lstrip("/") for n in self._item.get("Names") or []]
        # Docker shows only the canonical name (no "/other/alias" link names).
        return ",".join(n for n in names if "/" not in n)

    @property
    def Labels(self) -> str:
        labels = self._item.get("Labels") or {}
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))

    def Label(self, key: str) -> str:
        return str((self._item.get("Labels") or {}).get(key, ""))

    @property
    def Mounts(self) -> str:
        mounts = self._item.get("Mounts") or []
        names = [str(m.get("Name") or m.get("Source") or "") for m in mounts]
        if self._truncate:
            names = [truncate_text(n, 15) for n in names]
        return ",".join(names)

    @property
    def Networks(self) -> str:
        networks = (self._item.get("NetworkSettings") or {}).get("Networks") or {}
        return ",".join(sorted(networks))

    @property
    def LocalVolumes(self) -> str:
        mounts = self._item.get("Mounts") or []
        return str(sum(1 for m in mounts if m.get("Type") == "volume"))

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in self.template_fields if name != "Label"}


def parse_filters(values: tuple[str, ...]) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for value in values:
        key, sep, wanted = value.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"bad format of filter {value!r} (expected name=value)")
        filters.setdefault(key.strip().lower(), []).append(wanted)
    return filters


@click.command(name="ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all containers.")
@click.option("-q", "--quiet", is_flag=True, help="Only display container IDs.")
@click.option("-f", "--filter", "filters", multiple=True, help="Filter output (name=value).")
@click.option("--format", "format_spec", default="", help="table, json or a Go template.")
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@click.option("-n", "--last", type=int, default=-1, help="Show n last created containers.")
@click.option("-l", "--latest", is_flag=True, help="Show the latest created container.")
@click.option("-s", "--size", is_flag=True, help="Display total file sizes.")
def ps(
    show_all: bool,
    quiet: bool,
    filters: tuple[str, ...],
    format_spec: str,
    no_trunc: bool,
    last: int,
    latest: bool,
    size: bool,
) -> None:
    """List containers."""
    if quiet and not format_spec:
        format_spec = "{{.ID}}"
    if size and not format_spec:
        format_spec = "table " + DEFAULT_TABLE.replace("\t{{.Names}}", "\t{{.Names}}\t{{.Size}}")
    formatter = Formatter(format_spec, DEFAULT_TABLE, HEADERS)
    limit = 1 if latest else last
    query: dict[str, Any] = {"all": show_all or limit > 0}
    if limit > 0:
        query["limit"] = limit
    if filters:
        query["filters"] = parse_filters(filters)
    if size:
        query["size"] = True
    items = connect().get("/containers/json", query)
    now = time.time()
    rows = [ContainerRow(item, truncate=not no_trunc, now=now) for item in items or []]
    output = formatter.render(rows)
    if output:
        click.echo(output)
