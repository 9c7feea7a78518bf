"""``husk system``: facts about the host husk runs VMs on."""

from __future__ import annotations

import json

import click

from husk.cli.system_ops import df, prune
from husk.cli.system_warm import warm
from husk.errors import GuestError


@click.group()
def system() -> None:
    """Inspect the host: QEMU, accelerator, guest bundle."""


@system.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--no-boot", is_flag=True, help="Skip the probe boot.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    help="Seconds the probe boot may take to reach the guest agent.",
)
@click.option(
    "--retry-templates",
    is_flag=True,
    help="Forget the templates remembered as impossible here (tried again at the next start).",
)
def check(as_json: bool, no_boot: bool, timeout: float, retry_templates: bool) -> None:
    """Show QEMU's version, the accelerator and why, the bundle, and time a real boot."""
    # lazy: CLI start-up (asyncio and the diagnostics' sandbox, VM and agent code, ~60 ms)
    import asyncio

    from husk.diagnostics import format_report, run_check

    if retry_templates:
        # lazy: as above (the sandbox layer)
        from husk.sandbox.template_failures import forget_all

        click.echo(f"templates: {forget_all()} remembered failure(s) forgotten", err=True)

    report = asyncio.run(run_check(boot=not no_boot, probe_timeout=timeout))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        for line in format_report(report):
            click.echo(line)
        # lazy: as above (file reads only, for this command)
        from husk.ociruntime.engines import report as engine_report

        for engine in engine_report():
            click.echo(f"engine:        {engine.describe()}")
    if not report.ok:
        raise GuestError("system check failed: " + "; ".join(report.problems))


system.add_command(warm)
system.add_command(df)
system.add_command(prune)
