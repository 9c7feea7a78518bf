"""``husk commit`` and ``husk history``: a container's changes as an image, an image's steps."""

from __future__ import annotations

import time
from typing import Any

import click

from husk import errors
from husk.cli.format import Formatter, escape_text, truncate_text
from husk.client.daemon import connect
from husk.client.http import quote
from husk.humanize import human_duration, human_size

COMMIT_TIMEOUT = 3600.0
HISTORY_TABLE = "{{.ID}}\t{{.CreatedSince}}\t{{.CreatedBy}}\t{{.Size}}\t{{.Comment}}"
HISTORY_HEADERS = {
    "ID": "IMAGE",
    "CreatedSince": "CREATED",
    "CreatedAt": "CREATED AT",
    "CreatedBy": "CREATED BY",
    "Size": "SIZE",
    "Comment": "COMMENT",
}
CREATED_BY_WIDTH = 45


@click.command(name="commit")
@click.option("-a", "--author", default="", help='Author (e.g. "Jane <jane@example.com>").')
@click.option(
    "-c", "--change", "changes", multiple=True, help="Dockerfile instruction (CMD, ENV …)."
)
@click.option("-m", "--message", default="", help="Commit message.")
@click.option(
    "-p",
    "--pause",
    type=bool,
    default=True,
    help="Pause during commit (husk reads the layer while the container runs).",
)
@click.argument("container")
@click.argument("reference", required=False)
def commit(
    author: str,
    changes: tuple[str, ...],
    message: str,
    pause: bool,
    container: str,
    reference: str | None,
) -> None:
    """Create a new image from a container's changes."""
    repo, tag = "", ""
    if reference:
        name, at, _ = reference.partition("@")
        if at:
            raise errors.InvalidArgument(
                f"refusing to create a tag with a digest reference: {reference}"
            )
        slash, colon = name.rfind("/"), name.rfind(":")
        repo, tag = (name[:colon], name[colon + 1 :]) if colon > slash else (name, "")
    query: dict[str, Any] = {
        "container": container,
        "repo": repo,
        "tag": tag,
        "comment": message,
        "author": author,
        "pause": pause,
        # One parameter, a line per change (the daemon splits them; Docker repeats it).
        "changes": "\n".join(changes) or None,
    }
    answer = connect().post("/commit", query, timeout=COMMIT_TIMEOUT)
    image_id = answer.get("Id") if isinstance(answer, dict) else None
    if not isinstance(image_id, str):
        raise errors.Internal("the husk daemon sent no image id for the commit")
    click.echo(escape_text(image_id))


class HistoryRow:
    """One step of ``GET /images/{name}/history`` with the fields ``--format`` knows."""

    template_fields = tuple(HISTORY_HEADERS)

    def __init__(self, item: dict[str, Any], *, truncate: bool, human: bool, now: float) -> None:
        self._item = item
        self._truncate = truncate
        self._human = human
        self._now = now

    @property
    def ID(self) -> str:
        full = str(self._item.get("Id") or "<missing>")
        if self._truncate and full.startswith("sha256:"):
            return full[len("sha256:") :][:12]
        return full

    @property
    def CreatedSince(self) -> str:
        created = self._created()
        if not self._human:
            return self.CreatedAt
        return f"{human_duration(max(self._now - created, 0))} ago" if created else "N/A"

    @property
    def CreatedAt(self) -> str:
        created = self._created()
        return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(created)) if created else ""

    @property
    def CreatedBy(self) -> str:
        text = (
            " ".join(str(self._item.get("CreatedBy") or "").split())
            if self._truncate
            else str(self._item.get("CreatedBy") or "")
        )
        return truncate_text(text, CREATED_BY_WIDTH) if self._truncate else text

    @property
    def Size(self) -> str:
        size = int(self._item.get("Size") or 0)
        return human_size(size) if self._human else str(size)

    @property
    def Comment(self) -> str:
        return str(self._item.get("Comment") or "")

    def _created(self) -> int:
        value = self._item.get("Created")
        return value if isinstance(value, int) else 0


@click.command(name="history")
@click.option("-H", "--human/--no-human", default=True, help="Sizes and dates in human form.")
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@click.option("-q", "--quiet", is_flag=True, help="Only show image IDs.")
@click.option("--format", "format_spec", default="", help="table, json or a Go template.")
@click.argument("image")
def history(human: bool, no_trunc: bool, quiet: bool, format_spec: str, image: str) -> None:
    """Show the history of an image."""
    if quiet and not format_spec:
        format_spec = "{{.ID}}"
    formatter = Formatter(format_spec, HISTORY_TABLE, HISTORY_HEADERS)
    items = connect().get(f"/images/{quote(image)}/history", timeout=60)
    if not isinstance(items, list):
        raise errors.Internal("the husk daemon sent no history")
    now = time.time()
    rows = [
        HistoryRow(item, truncate=not no_trunc, human=human, now=now)
        for item in items
        if isinstance(item, dict)
    ]
    output = formatter.render(rows)
    if output:
        click.echo(output)
