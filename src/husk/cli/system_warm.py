"""``husk system warm``: build the boot template containers will be restored from."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from husk.client.daemon import connect
from husk.client.images import build_template
from husk.errors import GuestError, InvalidArgument
from husk.spec import parse_size


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
    memory_bytes = parse_size(memory, "memory")
    if pool and binds:
        raise InvalidArgument("a warm pool serves containers without bind mounts (--binds 0)")
    # Built by the daemon, which builds templates for starts too (and knows whether
    # templates are enabled): the CLI never boots a VM of its own.
    api = connect()
    result = build_template(api, memory_bytes=memory_bytes, cpus=cpus, binds=binds, rebuild=rebuild)
    enabled = bool(result.get("enabled"))
    if pool and not enabled:
        raise InvalidArgument("a warm pool needs boot templates, which are disabled")
    report = None
    if pool is not None:
        report = set_pool(pool, memory_bytes, cpus)
    if as_json:
        payload = {
            key: result.get(key)
            for key in (
                "key",
                "path",
                "built",
                "seconds",
                "snapshot_bytes",
                "memory_bytes",
                "inputs",
            )
        }
        if report is not None:
            payload["pool"] = report
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
        return
    if not enabled:
        click.echo("note: templates are disabled (HUSK_NO_TEMPLATE or config.json); built anyway")
    verb = "built" if result.get("built") else "already current"
    snapshot_bytes = int(result.get("snapshot_bytes") or 0)
    stored_memory = int(result.get("memory_bytes") or 0)
    click.echo(
        f"template {result.get('key')} {verb} in {float(result.get('seconds') or 0):.2f}s "
        f"({result.get('description')}, device state {snapshot_bytes / 1e3:.0f} kB, "
        f"memory {stored_memory / 1e6:.0f} MB on disk): {result.get('path')}"
    )
    if report is not None:
        click.echo(describe_pool(report))


POOL_FILL_TIMEOUT = 120.0


def set_pool(size: int, memory_bytes: int, cpus: float) -> dict[str, Any]:
    """Asks the daemon for the pool and waits (bounded) until it is full; its report."""
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
