"""``husk push``: upload a local image to a registry."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from husk.oci.push import PushEvent


def _bar_callback(progress: Any) -> Any:
    tasks: dict[str, Any] = {}
    labels = {
        "waiting": "Waiting",
        "uploading": "Pushing",
        "done": "Pushed",
        "exists": "Layer already exists",
        "mounted": "Mounted",
    }

    def callback(event: PushEvent) -> None:
        task = tasks.get(event.digest)
        if task is None:
            task = progress.add_task(
                "", total=event.total or None, short=event.digest[7:19], status="Waiting"
            )
            tasks[event.digest] = task
        progress.update(
            task, completed=event.completed, status=labels.get(event.status, event.status)
        )

    return callback


@click.command(name="push")
@click.argument("reference")
@click.argument("destination", required=False)
@click.option("--chunk-size", type=int, help="Upload blobs in chunks of this many bytes.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the pushed digest.")
def push(reference: str, destination: str | None, chunk_size: int | None, quiet: bool) -> None:
    """Push an image (optionally under another name) to its registry."""
    from husk.oci.push import push as push_image

    if not quiet and sys.stdout.isatty():
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        progress = Progress(
            TextColumn("{task.fields[short]}"),
            TextColumn("{task.fields[status]:<20}"),
            BarColumn(),
            DownloadColumn(),
        )
        with progress:
            result = asyncio.run(
                push_image(
                    reference,
                    destination=destination,
                    chunk_size=chunk_size,
                    progress=_bar_callback(progress),
                )
            )
    else:
        result = asyncio.run(push_image(reference, destination=destination, chunk_size=chunk_size))
    if quiet:
        click.echo(result.digest)
    else:
        click.echo(f"{result.reference}: digest: {result.digest} size: {result.size}")
