"""``husk pull``: fetch an image from a registry, with per-layer progress bars on a terminal."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from husk.oci.pull import PullEvent


class _Bars:
    """Rich progress bars, one per layer, in manifest order."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.fields[short]}"),
            TextColumn("{task.fields[status]:<12}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            transient=False,
        )
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: PullEvent) -> None:
        if event.status == "resolved":
            return
        task = self.tasks.get(event.digest)
        if task is None:
            task = self.progress.add_task(
                "", total=event.total or None, short=event.digest[7:19], status="Waiting"
            )
            self.tasks[event.digest] = task
        labels = {
            "waiting": "Waiting",
            "downloading": "Downloading",
            "done": "Pull complete",
            "exists": "Already exists",
        }
        self.progress.update(
            task, completed=event.completed, status=labels.get(event.status, event.status)
        )


def run_pull(reference: str, *, platform: str | None, policy: str, quiet: bool) -> str:
    from husk.oci.pull import pull as pull_image
    from husk.oci.reference import parse_reference

    ref = parse_reference(reference)
    bars = _Bars() if not quiet and sys.stdout.isatty() else None
    downloaded: list[str] = []

    def on_event(event: PullEvent) -> None:
        if event.status == "done":
            downloaded.append(event.digest)
        if bars is not None:
            bars(event)

    if not quiet:
        click.echo(f"{ref.ref}: Pulling from {ref.repository}")
    run = pull_image(reference, policy=policy, platform=platform, progress=on_event)
    if bars is not None:
        with bars.progress:
            record = asyncio.run(run)
    else:
        record = asyncio.run(run)
    if not quiet:
        click.echo(f"Digest: {record.manifest_digest}")
        if downloaded:
            click.echo(f"Status: Downloaded newer image for {ref}")
        else:
            click.echo(f"Status: Image is up to date for {ref}")
    click.echo(str(ref))
    return str(ref)


@click.command()
@click.argument("reference")
@click.option(
    "--platform", help="Pull for this platform (os/arch[/variant]) instead of the host's."
)
@click.option(
    "--policy",
    default="always",
    show_default=True,
    type=click.Choice(["always", "missing", "if-not-present", "never", "newer"]),
    help="When to contact the registry.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the image name.")
def pull(reference: str, platform: str | None, policy: str, quiet: bool) -> None:
    """Pull an image from a registry into the local store."""
    run_pull(reference, platform=platform, policy=policy, quiet=quiet)
