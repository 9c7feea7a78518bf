"""``husk bundle``: build and inspect the guest bundle (kernel + initramfs)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from husk.bundle import locate


@click.group()
def bundle() -> None:
    """Build and inspect the guest bundle the VMs boot."""


@bundle.command()
@click.option(
    "--deb-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Use the .deb files in this directory instead of downloading with apt.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Install the bundle here instead of the data directory.",
)
def build(deb_dir: Path | None, output: Path | None) -> None:
    """Build vmlinux, initramfs.cpio and manifest.json from Debian packages."""
    # lazy: CLI start-up (the builder: ctypes, ELF, cpio, ~30 ms)
    from husk.bundle.builder import build as build_bundle

    result = build_bundle(
        output, deb_dir=deb_dir, progress=lambda step: click.echo(f"  {step}", err=True)
    )
    click.echo(f"{result.kernel.parent}  {result.digest}")


@bundle.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--verify", is_flag=True, help="Check the sha256 of every artifact.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Inspect the bundle in this directory instead of the data directory.",
)
def info(as_json: bool, verify: bool, directory: Path | None) -> None:
    """Show where the bundle is, its digest and what it was built from."""
    found = locate(directory, verify=verify)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "kernel": str(found.kernel),
                    "initrd": str(found.initrd),
                    "digest": found.digest,
                    "manifest": found.manifest,
                },
                indent=2,
                sort_keys=True,
            )
        )
        return
    click.echo(f"digest:  {found.digest}")
    click.echo(f"kernel:  {found.kernel} ({found.kernel.stat().st_size} bytes)")
    click.echo(f"initrd:  {found.initrd} ({found.initrd.stat().st_size} bytes)")
    manifest = found.manifest
    if "kernel_release" in manifest:
        click.echo(f"release: {manifest['kernel_release']}")
    for package in manifest.get("inputs", {}).get("packages", []):
        click.echo(f"package: {package['name']} {package['version']}")
    if "modules" in manifest:
        click.echo(f"modules: {' '.join(manifest['modules'])}")
    if "overrides" in manifest:
        click.echo("(HUSK_KERNEL / HUSK_INITRD override the installed bundle)")


@bundle.command()
@click.argument("reference")
def push(reference: str) -> None:
    """Push the installed bundle to a registry as an OCI artifact."""
    # lazy: CLI start-up (asyncio and the registry client with aiohttp, ~150 ms)
    import asyncio

    from husk.bundle.artifact import push as push_bundle

    digest = asyncio.run(push_bundle(reference))
    click.echo(f"{reference}@{digest}")


@bundle.command()
@click.argument("reference")
def pull(reference: str) -> None:
    """Install the bundle stored at REFERENCE (only if it differs from the installed one)."""
    # lazy: CLI start-up (asyncio and the registry client with aiohttp, ~150 ms)
    import asyncio

    from husk.bundle.artifact import pull as pull_bundle

    outcome = asyncio.run(pull_bundle(reference))
    if outcome.warning:
        click.echo(f"husk: warning: {outcome.warning}", err=True)
    click.echo(f"{outcome.action}: {outcome.bundle.digest}")
