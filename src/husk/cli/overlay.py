"""``husk network overlay``: a running container's WireGuard overlay (the reference's
``OverlayConfig``), through the daemon's ``/husk/containers/{id}/overlay``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from husk.client.daemon import connect
from husk.client.session import container_path
from husk.errors import InvalidArgument

MAX_CONFIG_BYTES = 1 << 20
OVERLAY_TIMEOUT = 90.0
"""The first attach loads the guest kernel's WireGuard: seconds under TCG."""


def _overlay_path(ref: str) -> str:
    return "/husk" + container_path(ref, "overlay")


def read_config(path: str) -> Any:
    """The JSON configuration in ``path`` (``-``: standard input)."""
    try:
        if path == "-":
            text = click.get_text_stream("stdin").read(MAX_CONFIG_BYTES + 1)
        else:
            with Path(path).open(encoding="utf-8") as stream:
                text = stream.read(MAX_CONFIG_BYTES + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read overlay config {path}: {exc}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"overlay config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"overlay config {path} is not JSON: {exc}") from None


def describe(report: dict[str, Any], now: float | None = None) -> list[str]:
    """Lines for a person: the interface, then each peer and its latest handshake."""
    now = time.time() if now is None else now
    if not report.get("IPAddress") and report.get("Attached") is False:
        return ["no overlay"]
    lines = [
        f"address: {report.get('IPAddress')}/{report.get('PrefixLen')}",
        f"public key: {report.get('PublicKey')}",
        f"listen port: {report.get('ListenPort')} (host {report.get('HostIP')}:"
        f"{report.get('HostPort')}/udp)",
    ]
    for peer in report.get("Peers") or []:
        stamp = int(peer.get("LatestHandshake") or 0)
        seen = f"{max(0, int(now - stamp))}s ago" if stamp else "no handshake"
        lines.append(
            f"peer {peer.get('PublicKey')}: {seen}, endpoint {peer.get('Endpoint') or '-'}, "
            f"rx {peer.get('RxBytes', 0)} B, tx {peer.get('TxBytes', 0)} B"
        )
    return lines


@click.group()
def overlay() -> None:
    """Give a running container a WireGuard overlay interface (wg0)."""


@overlay.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    help="JSON file with overlay_ip, prefix_len, private_key, listen_port, peers, "
    "dns_server, dns_domain (and host_port, the host UDP port; 0: any). '-': stdin.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.argument("container")
def attach(config_path: str, as_json: bool, container: str) -> None:
    """Attach (or reconfigure) CONTAINER's overlay."""
    config = read_config(config_path)
    report = connect().post(_overlay_path(container), json_body=config, timeout=OVERLAY_TIMEOUT)
    _show(report, as_json)


@overlay.command()
@click.argument("container")
def detach(container: str) -> None:
    """Remove CONTAINER's overlay."""
    connect().delete(_overlay_path(container), timeout=OVERLAY_TIMEOUT)
    click.echo(container)


@overlay.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.argument("container")
def status(as_json: bool, container: str) -> None:
    """Show CONTAINER's overlay and each peer's latest handshake."""
    report = connect().get(_overlay_path(container), timeout=OVERLAY_TIMEOUT)
    _show(report, as_json)


def _show(report: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for line in describe(report if isinstance(report, dict) else {}):
        click.echo(line)
