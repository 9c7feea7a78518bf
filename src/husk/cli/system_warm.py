"""``husk system warm``: build the boot template containers will be restored from."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click


@click.command()
@click.option(
    "-m",
    "--memory",
    default="512m",
    show_default=True,
    help="Memory of the containers the template is for (e.g. 512m, 1g).",
)
@click.option(
    "--cpus",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="CPUs of the containers the template is for.",
)
@click.option(
    "--binds",
    type=click.IntRange(min=0, max=64),
    default=0,
    show_default=True,
    help="Number of bind mounts of the containers the template is for.",
)
@click.option(
    "--pool",
    type=click.IntRange(min=0),
    default=0,
    help="Also keep N restored idle VMs ready (needs the daemon; not available yet).",
)
@click.option("--rebuild", is_flag=True, help="Replace the template even if it is current.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def warm(memory: str, cpus: float, binds: int, pool: int, rebuild: bool, as_json: bool) -> None:
    """Build the boot template ahead of time, so that even the first start is fast."""
    from husk.errors import NotSupported
    from husk.runtime.runtime import UPPER_DISK_BYTES
    from husk.runtime.template_boot import warm as build
    from husk.runtime.templates import templates_enabled
    from husk.spec import parse_size

    if pool:
        raise NotSupported("a warm pool of idle VMs (--pool) is not implemented yet")
    memory_bytes = parse_size(memory, "memory")
    enabled = templates_enabled()
    result = asyncio.run(
        build(
            memory_bytes=memory_bytes,
            cpus=cpus,
            upper_disk_bytes=UPPER_DISK_BYTES,
            shares=binds,
            rebuild=rebuild,
        )
    )
    snapshot_bytes, memory_bytes = stored_sizes(result.path)
    if as_json:
        payload = {
            "key": result.key,
            "path": str(result.path),
            "built": result.built,
            "seconds": round(result.seconds, 3),
            "snapshot_bytes": snapshot_bytes,
            "memory_bytes": memory_bytes,
            "inputs": result.inputs.to_json(),
        }
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
        return
    if not enabled:
        click.echo("note: templates are disabled (HUSK_NO_TEMPLATE or config.json); built anyway")
    verb = "built" if result.built else "already current"
    click.echo(
        f"template {result.key} {verb} in {result.seconds:.2f}s "
        f"({result.inputs.describe()}, device state {snapshot_bytes / 1e3:.0f} kB, "
        f"memory {memory_bytes / 1e6:.0f} MB on disk): {result.path}"
    )


def stored_sizes(directory: Path) -> tuple[int, int]:
    """Bytes of the template's device state, and of its memory file really on disk."""
    from husk.runtime.templates import MEMORY, SNAPSHOT

    try:
        snapshot = (directory / SNAPSHOT).stat().st_size
        memory = (directory / MEMORY).stat().st_blocks * 512
    except OSError:
        return 0, 0
    return snapshot, memory
