"""``husk info`` and ``husk version``."""

from __future__ import annotations

import platform
import sys
from typing import Any

import click

from husk import __version__, errors
from husk.cli.format import Template, binary_size, expand_escapes
from husk.client.daemon import connect
from husk.client.http import API_VERSION

# Docker's order for the server section of ``info`` (key, label).
INFO_FIELDS = [
    ("ServerVersion", "Server Version"),
    ("Driver", "Storage Driver"),
    ("LoggingDriver", "Logging Driver"),
    ("CgroupDriver", "Cgroup Driver"),
    ("CgroupVersion", "Cgroup Version"),
    ("DefaultRuntime", "Default Runtime"),
    ("KernelVersion", "Kernel Version"),
    ("OperatingSystem", "Operating System"),
    ("OSType", "OSType"),
    ("Architecture", "Architecture"),
    ("NCPU", "CPUs"),
    ("MemTotal", "Total Memory"),
    ("Name", "Name"),
    ("ID", "ID"),
    ("DockerRootDir", "Docker Root Dir"),
    ("Debug", "Debug Mode"),
]
_COUNTS = {"Containers", "ContainersRunning", "ContainersPaused", "ContainersStopped", "Images"}


def client_version() -> dict[str, str]:
    return {
        "Version": __version__,
        "ApiVersion": API_VERSION,
        "PythonVersion": platform.python_version(),
        "Os": sys.platform,
        "Arch": _go_arch(platform.machine()),
    }


def _go_arch(machine: str) -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_version(client: dict[str, str], server: dict[str, Any] | None) -> str:
    lines = [
        "Client:",
        f" Version:           {client['Version']}",
        f" API version:       {client['ApiVersion']}",
        f" Python version:    {client['PythonVersion']}",
        f" OS/Arch:           {client['Os']}/{client['Arch']}",
    ]
    if server is None:
        return "\n".join(lines)
    lines += ["", f"Server: {(server.get('Platform') or {}).get('Name') or 'husk'}"]
    components = server.get("Components") or [
        {"Name": "Engine", "Version": server.get("Version", ""), "Details": {}}
    ]
    for component in components:
        lines.append(f" {component.get('Name', '')}:")
        lines.append(f"  Version:          {component.get('Version', '')}")
        if component.get("Name") == "Engine":
            api = server.get("ApiVersion", "")
            minimum = server.get("MinAPIVersion")
            lines.append(
                f"  API version:      {api}" + (f" (minimum version {minimum})" if minimum else "")
            )
            lines.append(f"  OS/Arch:          {server.get('Os', '')}/{server.get('Arch', '')}")
            if server.get("KernelVersion"):
                lines.append(f"  Kernel:           {server['KernelVersion']}")
        for key, value in sorted((component.get("Details") or {}).items()):
            if key in ("ApiVersion", "MinAPIVersion", "Os", "Arch", "KernelVersion"):
                continue
            lines.append(f"  {key + ':':<18}{_text(value)}")
    return "\n".join(lines)


@click.command(name="version")
@click.option("-f", "--format", "format_spec", help="Format the output using a Go template.")
def version(format_spec: str | None) -> None:
    """Show the husk version information."""
    client = client_version()
    server_error: errors.HuskError | None = None
    try:
        server = connect().get("/version")
    except errors.HuskError as err:
        server, server_error = None, err
    if format_spec:
        rendered = Template(expand_escapes(format_spec)).render(
            {"Client": client, "Server": server}
        )
        click.echo(rendered)
    else:
        click.echo(format_version(client, server))
    if server_error is not None:
        raise server_error


def format_info(info: dict[str, Any]) -> str:
    lines = [
        "Server:",
        f" Containers: {info.get('Containers', 0)}",
        f"  Running: {info.get('ContainersRunning', 0)}",
        f"  Paused: {info.get('ContainersPaused', 0)}",
        f"  Stopped: {info.get('ContainersStopped', 0)}",
        f" Images: {info.get('Images', 0)}",
    ]
    shown = set(_COUNTS)
    for key, label in INFO_FIELDS:
        if key not in info:
            continue
        shown.add(key)
        value = info[key]
        if key == "MemTotal" and isinstance(value, int | float):
            value = binary_size(value)
        lines.append(f" {label}: {_text(value)}")
    extras = {k: v for k, v in info.items() if k not in shown and v not in (None, "", [], {})}
    if extras:
        lines.append(" Husk:")
        for key, value in sorted(extras.items()):
            if isinstance(value, dict):
                lines.append(f"  {key}:")
                lines.extend(f"   {k}: {_text(v)}" for k, v in sorted(value.items()))
            elif isinstance(value, list):
                lines.append(f"  {key}: {', '.join(_text(v) for v in value)}")
            else:
                lines.append(f"  {key}: {_text(value)}")
    return "\n".join(lines)


@click.command(name="info")
@click.option("-f", "--format", "format_spec", help="Format the output using a Go template.")
def info(format_spec: str | None) -> None:
    """Display system-wide information."""
    doc = connect().get("/info") or {}
    if format_spec:
        click.echo(Template(expand_escapes(format_spec)).render(doc))
        return
    client = client_version()
    click.echo(f"Client:\n Version:    {client['Version']}\n\n" + format_info(doc))
