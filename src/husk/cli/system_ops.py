"""``husk system df`` and ``husk system prune`` (added to the ``system`` group by its owner)."""

from __future__ import annotations

import time
from typing import Any

import click

from husk.cli.format import (
    Formatter,
    align_table,
    escape_text,
    escaped_row,
    human_duration,
    human_size,
)
from husk.cli.ps import parse_filters
from husk.client.daemon import connect

DF_TABLE = "{{.Type}}\t{{.TotalCount}}\t{{.Active}}\t{{.Size}}\t{{.Reclaimable}}"
DF_HEADERS = {
    "Type": "TYPE",
    "TotalCount": "TOTAL",
    "Active": "ACTIVE",
    "Size": "SIZE",
    "Reclaimable": "RECLAIMABLE",
}


def _reclaimable(reclaimable: float, total: float) -> str:
    if total <= 0:
        return human_size(reclaimable)
    return f"{human_size(reclaimable)} ({int(reclaimable * 100 / total)}%)"


def summarize_df(df: dict[str, Any]) -> list[dict[str, str]]:
    """The four rows of ``system df`` from ``GET /system/df``."""
    images = df.get("Images") or []
    active_images = [i for i in images if int(i.get("Containers") or 0) > 0]
    image_size = int(df.get("LayersSize") or sum(int(i.get("Size") or 0) for i in images))
    unused_image_bytes = sum(
        int(i.get("Size") or 0) - max(int(i.get("SharedSize") or 0), 0)
        for i in images
        if int(i.get("Containers") or 0) <= 0
    )
    containers = df.get("Containers") or []
    running = [c for c in containers if c.get("State") in ("running", "paused", "restarting")]
    container_size = sum(int(c.get("SizeRw") or 0) for c in containers)
    stopped_size = sum(int(c.get("SizeRw") or 0) for c in containers if c not in running)
    volumes = df.get("Volumes") or []
    used_volumes = [v for v in volumes if int((v.get("UsageData") or {}).get("RefCount") or 0) > 0]
    volume_size = sum(max(int((v.get("UsageData") or {}).get("Size") or 0), 0) for v in volumes)
    unused_volume_size = sum(
        max(int((v.get("UsageData") or {}).get("Size") or 0), 0)
        for v in volumes
        if v not in used_volumes
    )
    cache = df.get("BuildCache") or []
    cache_size = sum(int(c.get("Size") or 0) for c in cache)
    return [
        {
            "Type": "Images",
            "TotalCount": str(len(images)),
            "Active": str(len(active_images)),
            "Size": human_size(image_size),
            "Reclaimable": _reclaimable(min(unused_image_bytes, image_size), image_size),
        },
        {
            "Type": "Containers",
            "TotalCount": str(len(containers)),
            "Active": str(len(running)),
            "Size": human_size(container_size),
            "Reclaimable": _reclaimable(stopped_size, container_size),
        },
        {
            "Type": "Local Volumes",
            "TotalCount": str(len(volumes)),
            "Active": str(len(used_volumes)),
            "Size": human_size(volume_size),
            "Reclaimable": _reclaimable(unused_volume_size, volume_size),
        },
        {
            "Type": "Build Cache",
            "TotalCount": str(len(cache)),
            "Active": "0",
            "Size": human_size(cache_size),
            "Reclaimable": human_size(cache_size),
        },
    ]


def _verbose_df(df: dict[str, Any]) -> str:
    now = time.time()
    image_lines = ["REPOSITORY\tTAG\tIMAGE ID\tCREATED\tSIZE\tSHARED SIZE\tUNIQUE SIZE\tCONTAINERS"]
    for image in df.get("Images") or []:
        tags = image.get("RepoTags") or ["<none>:<none>"]
        size = int(image.get("Size") or 0)
        shared = max(int(image.get("SharedSize") or 0), 0)
        for tag in tags:
            repo, _, name = tag.rpartition(":")
            image_lines.append(
                escaped_row(
                    [
                        repo,
                        name,
                        str(image.get("Id", "")).removeprefix("sha256:")[:12],
                        human_duration(now - int(image.get("Created") or 0)) + " ago",
                        human_size(size),
                        human_size(shared),
                        human_size(size - shared),
                        str(max(int(image.get("Containers") or 0), 0)),
                    ]
                )
            )
    container_lines = ["CONTAINER ID\tIMAGE\tCOMMAND\tSIZE\tCREATED\tSTATUS\tNAMES"]
    for container in df.get("Containers") or []:
        names = ",".join(str(n).lstrip("/") for n in container.get("Names") or [])
        container_lines.append(
            escaped_row(
                [
                    str(container.get("Id", ""))[:12],
                    str(container.get("Image", "")),
                    f'"{container.get("Command", "")}"',
                    human_size(int(container.get("SizeRw") or 0)),
                    human_duration(now - int(container.get("Created") or 0)) + " ago",
                    str(container.get("Status", "")),
                    names,
                ]
            )
        )
    volume_lines = ["VOLUME NAME\tLINKS\tSIZE"]
    for volume in df.get("Volumes") or []:
        usage = volume.get("UsageData") or {}
        size = int(usage.get("Size") or 0)
        volume_lines.append(
            escaped_row(
                [
                    str(volume.get("Name", "")),
                    str(max(int(usage.get("RefCount") or 0), 0)),
                    human_size(size) if size >= 0 else "N/A",
                ]
            )
        )
    return (
        "Images space usage:\n\n"
        + align_table(image_lines)
        + "\n\nContainers space usage:\n\n"
        + align_table(container_lines)
        + "\n\nLocal Volumes space usage:\n\n"
        + align_table(volume_lines)
    )


@click.command(name="df")
@click.option("-v", "--verbose", is_flag=True, help="Show detailed information on space usage.")
@click.option("--format", "format_spec", default="", help="table, json or a Go template.")
def df(verbose: bool, format_spec: str) -> None:
    """Show husk disk usage."""
    usage = connect().get("/system/df") or {}
    if verbose and not format_spec:
        click.echo(_verbose_df(usage))
        return
    output = Formatter(format_spec, DF_TABLE, DF_HEADERS).render(summarize_df(usage))
    if output:
        click.echo(output)


PRUNE_WARNING = """WARNING! This will remove:
  - all stopped containers{volumes}
  - all {images}
Are you sure you want to continue?"""


def _filters(values: tuple[str, ...]) -> dict[str, list[str]]:
    return parse_filters(values)


@click.command(name="prune")
@click.option("-a", "--all", "all_images", is_flag=True, help="Remove all unused images.")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.option("--volumes", is_flag=True, help="Prune anonymous volumes.")
@click.option("--filter", "filters", multiple=True, help="Provide filter values (until=24h).")
def prune(all_images: bool, force: bool, volumes: bool, filters: tuple[str, ...]) -> None:
    """Remove stopped containers and unused images."""
    if not force:
        images = "images without at least one container" if all_images else "dangling images"
        extra = "\n  - all anonymous volumes not used by at least one container" if volumes else ""
        if not click.confirm(PRUNE_WARNING.format(images=images, volumes=extra), default=False):
            return
    api = connect()
    container_filters = _filters(filters)
    image_filters = {**container_filters, "dangling": ["false" if all_images else "true"]}
    containers = api.post("/containers/prune", {"filters": container_filters or None}) or {}
    pruned_volumes: dict[str, Any] = {}
    if volumes:
        labels = {"label": container_filters["label"]} if "label" in container_filters else None
        pruned_volumes = api.post("/volumes/prune", {"filters": labels}) or {}
    pruned_images = api.post("/images/prune", {"filters": image_filters}) or {}
    deleted_containers = containers.get("ContainersDeleted") or []
    if deleted_containers:
        click.echo("Deleted Containers:")
        for container_id in deleted_containers:
            click.echo(escape_text(str(container_id)))
        click.echo()
    deleted_volumes = pruned_volumes.get("VolumesDeleted") or []
    if deleted_volumes:
        click.echo("Deleted Volumes:")
        for name in deleted_volumes:
            click.echo(escape_text(str(name)))
        click.echo()
    deleted_images = pruned_images.get("ImagesDeleted") or []
    if deleted_images:
        click.echo("Deleted Images:")
        for entry in deleted_images:
            for key, value in entry.items():
                click.echo(f"{escape_text(key.lower())}: {escape_text(str(value))}")
        click.echo()
    reclaimed = (
        int(containers.get("SpaceReclaimed") or 0)
        + int(pruned_images.get("SpaceReclaimed") or 0)
        + int(pruned_volumes.get("SpaceReclaimed") or 0)
    )
    click.echo(f"Total reclaimed space: {human_size(reclaimed)}")
