"""``husk system warm``: build the boot template containers will be restored from."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

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
    default=None,
    help="Have the daemon keep N restored, idle VMs of this shape ready (0: none).",
)
@click.option("--rebuild", is_flag=True, help="Replace the template even if it is current.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def warm(
    memory: str, cpus: float, binds: int, pool: int | None, rebuild: bool, as_json: bool
) -> None:
    """Build the boot template ahead of time, so that even the first start is fast.

    With --pool N the daemon also keeps N VMs restored from it, idle, for
    containers of this shape without bind mounts (remembered across restarts).
    """
    from husk.errors import InvalidArgument
    from husk.runtime.runtime import UPPER_DISK_BYTES
    from husk.sandbox.template_boot import warm as build
    from husk.sandbox.templates import templates_enabled
    from husk.spec import parse_size

    memory_bytes = parse_size(memory, "memory")
    enabled = templates_enabled()
    if pool and binds:
        raise InvalidArgument("a warm pool serves containers without bind mounts (--binds 0)")
    if pool and not enabled:
        raise InvalidArgument("a warm pool needs boot templates, which are disabled")
    result = asyncio.run(
        build(
            memory_bytes=memory_bytes,
            cpus=cpus,
            upper_disk_bytes=UPPER_DISK_BYTES,
            shares=binds,
            rebuild=rebuild,
        )
    )
    snapshot_bytes, stored_memory = stored_sizes(result.path)
    report = None
    if pool is not None:
        report = set_pool(pool, memory_bytes, cpus)
    if as_json:
        payload = {
            "key": result.key,
            "path": str(result.path),
            "built": result.built,
            "seconds": round(result.seconds, 3),
            "snapshot_bytes": snapshot_bytes,
            "memory_bytes": stored_memory,
            "inputs": result.inputs.to_json(),
        }
        if report is not None:
            payload["pool"] = report
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
        return
    if not enabled:
        click.echo("note: templates are disabled (HUSK_NO_TEMPLATE or config.json); built anyway")
    verb = "built" if result.built else "already current"
    click.echo(
        f"template {result.key} {verb} in {result.seconds:.2f}s "
        f"({result.inputs.describe()}, device state {snapshot_bytes / 1e3:.0f} kB, "
        f"memory {stored_memory / 1e6:.0f} MB on disk): {result.path}"
    )
    if report is not None:
        click.echo(describe_pool(report))


POOL_FILL_TIMEOUT = 120.0


def set_pool(size: int, memory_bytes: int, cpus: float) -> dict[str, Any]:
    """Asks the daemon for the pool and waits (bounded) until it is full; its report."""
    import time

    from husk.client.daemon import connect
    from husk.errors import GuestError

    api = connect()
    report: dict[str, Any] = api.post(
        "/husk/pool", json_body={"Size": size, "Memory": memory_bytes, "Cpus": cpus}
    )
    deadline = time.monotonic() + POOL_FILL_TIMEOUT
    while report["idle"] < size:
        if not report.get("filling"):
            raise GuestError(f"the warm pool stopped filling: {report.get('last_error') or '?'}")
        if time.monotonic() > deadline:
            raise GuestError(f"the warm pool did not fill within {POOL_FILL_TIMEOUT:.0f}s")
        time.sleep(0.2)
        report = api.get("/husk/pool")
    return report


def describe_pool(report: dict[str, Any]) -> str:
    if not report["size"]:
        return "warm pool: none"
    return (
        f"warm pool: {report['idle']} of {report['size']} VMs idle, "
        f"{report['rss_bytes'] / 1e6:.0f} MB resident in total "
        f"(shared template pages counted in each), {report['cpu_percent']:.1f}% CPU"
    )


def stored_sizes(directory: Path) -> tuple[int, int]:
    """Bytes of the template's device state, and of its memory file really on disk."""
    from husk.sandbox.templates import MEMORY, SNAPSHOT

    try:
        snapshot = (directory / SNAPSHOT).stat().st_size
        memory = (directory / MEMORY).stat().st_blocks * 512
    except OSError:
        return 0, 0
    return snapshot, memory
