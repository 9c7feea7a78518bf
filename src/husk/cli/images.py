"""``husk images``, ``rmi``, ``tag`` and the ``husk image …`` group."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click

from husk.cli.archive import import_, load, save
from husk.cli.format import escape_text, human_size, safe_json
from husk.cli.pull import pull
from husk.cli.push import push
from husk.client.daemon import connect
from husk.client.images import inspect_image, list_images, prune_images, remove_image, tag_image
from husk.errors import HuskError
from husk.oci.reference import parse_reference


@dataclass(frozen=True)
class ImageRow:
    repository: str
    tag: str
    digest: str
    summary: dict[str, Any]

    @property
    def image_id(self) -> str:
        return str(self.summary.get("Id") or "")


def _split_name(name: str) -> tuple[str, str]:
    """``repo:tag`` → (repo, tag); the tag is after the last ``:`` of the last component."""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, "<none>"


def image_rows(summaries: list[dict[str, Any]]) -> list[ImageRow]:
    """One row per name (``<none>`` for untagged), as ``docker images`` lists them."""
    rows: list[ImageRow] = []
    for summary in summaries:
        digests: dict[str, str] = {}
        for entry in summary.get("RepoDigests") or []:
            repository, _, digest = str(entry).partition("@")
            digests.setdefault(repository, digest)
        tagged: set[str] = set()
        for name in summary.get("RepoTags") or []:
            repository, tag = _split_name(str(name))
            tagged.add(repository)
            rows.append(ImageRow(repository, tag, digests.get(repository, "<none>"), summary))
        if not tagged:
            for repository, digest in digests.items():
                rows.append(ImageRow(repository, "<none>", digest, summary))
        if not rows or rows[-1].summary is not summary:
            rows.append(ImageRow("<none>", "<none>", "<none>", summary))
    return rows


def _created_text(summary: dict[str, Any]) -> str:
    """The image's creation time as RFC 3339 (``""`` when it has none)."""
    created = summary.get("Created")
    if not isinstance(created, int | float) or created <= 0:
        return ""
    return datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@click.command(name="images")
@click.argument("repository", required=False)
@click.option("-a", "--all", "show_all", is_flag=True, help="Show intermediate images too.")
@click.option("-q", "--quiet", is_flag=True, help="Only show image IDs.")
@click.option("--digests", is_flag=True, help="Show digests.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate image IDs.")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table")
def images(
    repository: str | None,
    show_all: bool,
    quiet: bool,
    digests: bool,
    no_trunc: bool,
    output_format: str,
) -> None:
    """List images in the local store."""
    from husk.oci.inspect import human_age  # lazy: CLI start-up (the image store, ~45 ms)

    wanted = parse_reference(repository, default_tag=False) if repository is not None else None
    rows = image_rows(list_images(connect(), show_all=show_all))
    if wanted is not None:
        rows = [
            r
            for r in rows
            if r.repository != "<none>"
            and parse_reference(r.repository).repository == wanted.repository
            and (wanted.tag is None or r.tag == wanted.tag)
        ]

    def image_id(full_id: str) -> str:
        return full_id if no_trunc else full_id.removeprefix("sha256:")[:12]

    if quiet:
        seen: list[str] = []
        for row in rows:
            if row.image_id not in seen:
                seen.append(row.image_id)
                click.echo(image_id(row.image_id))
        return
    if output_format == "json":
        for row in rows:
            click.echo(
                safe_json(
                    {
                        "Repository": row.repository,
                        "Tag": row.tag,
                        "Digest": row.digest,
                        "ID": image_id(row.image_id),
                        "CreatedAt": _created_text(row.summary),
                        "Size": row.summary.get("Size") or 0,
                    }
                )
            )
        return
    columns = ["REPOSITORY", "TAG", *(["DIGEST"] if digests else []), "IMAGE ID", "CREATED", "SIZE"]
    table = [columns]
    for row in rows:
        cells = [row.repository, row.tag]
        if digests:
            cells.append(row.digest)
        cells += [
            image_id(row.image_id),
            human_age(_created_text(row.summary)),
            human_size(int(row.summary.get("Size") or 0)),
        ]
        table.append(cells)
    click.echo(format_table(table))


def format_table(cells: list[list[str]]) -> str:
    """Left-aligned columns separated by three spaces, as docker prints them.

    Cells come from images and registries: each is escaped (no terminal control
    reaches the terminal raw, and no newline adds a row).
    """
    table = [[escape_text(cell) for cell in row] for row in cells]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    )


@click.command(name="rmi")
@click.argument("references", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Force removal of the image.")
def rmi(references: tuple[str, ...], force: bool) -> None:
    """Remove one or more images (untag names; delete content no longer used).

    Through the daemon, which refuses to remove an image a container uses
    (a stopped one's only with --force), as Docker does.
    """
    api = connect()
    first_error: HuskError | None = None
    for reference in references:
        try:
            for line in remove_image(api, reference, force=force):
                click.echo(escape_text(line))
        except HuskError as err:
            if first_error is not None:
                click.echo(f"husk: {first_error}", err=True)
            first_error = err
    if first_error is not None:
        raise first_error


@click.command(name="tag")
@click.argument("source")
@click.argument("target")
def tag(source: str, target: str) -> None:
    """Give the image SOURCE the additional name TARGET."""
    parse_reference(target)  # a bad name fails here, with the parser's message
    tag_image(connect(), source, target)


@click.command(name="inspect")
@click.argument("references", nargs=-1, required=True)
def inspect(references: tuple[str, ...]) -> None:
    """Show details of images as JSON."""
    api = connect()
    # Labels, history and the rest of an image's config are the image author's text.
    click.echo(safe_json([inspect_image(api, r) for r in references], indent=4))


@click.command(name="prune")
@click.option(
    "-a", "--all", "all_images", is_flag=True, help="Remove all unused images, not just dangling."
)
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
def prune(all_images: bool, force: bool) -> None:
    """Remove unused images and free their blobs.

    Through the daemon: an image any container uses, running or stopped, is kept.
    """
    warning = (
        "WARNING! This will remove all images without at least one container associated to them."
        if all_images
        else "WARNING! This will remove all dangling images."
    )
    if not force and not click.confirm(
        f"{warning}\nAre you sure you want to continue?", default=False
    ):
        return
    result = prune_images(connect(), all_images=all_images)
    deleted = result.get("ImagesDeleted") or []
    if deleted:
        click.echo("Deleted Images:")
        for entry in deleted:
            for key, value in (entry if isinstance(entry, dict) else {}).items():
                click.echo(f"{escape_text(str(key).lower())}: {escape_text(str(value))}")
        click.echo()
    click.echo(f"Total reclaimed space: {human_size(int(result.get('SpaceReclaimed') or 0))}")


@click.group(name="image")
def image() -> None:
    """Manage images."""


image.add_command(images, name="ls")
image.add_command(images, name="list")
image.add_command(rmi, name="rm")
image.add_command(tag)
image.add_command(inspect)
image.add_command(prune)
image.add_command(pull)
image.add_command(push)
image.add_command(load)
image.add_command(save)
image.add_command(import_, name="import")
