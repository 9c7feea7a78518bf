"""Which registries may be spoken to over plain HTTP.

Loopback hosts always may. Others only when listed in ``HUSK_INSECURE_REGISTRIES``
(comma separated host[:port]) or in ``insecure-registries`` of
``data_dir()/registries.json``.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from husk import settings
from husk.errors import InvalidArgument
from husk.paths import data_dir

ENV_INSECURE = settings.HUSK_INSECURE_REGISTRIES


def registries_config_path() -> Path:
    return data_dir() / "registries.json"


def split_host_port(domain: str) -> tuple[str, str]:
    if domain.startswith("["):
        host, _, rest = domain[1:].partition("]")
        return host, rest.removeprefix(":")
    host, _, port = domain.partition(":")
    return host, port


def is_loopback(domain: str) -> bool:
    host, _ = split_host_port(domain)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_registries() -> set[str]:
    entries = settings.insecure_registries()
    path = registries_config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return entries
    except (OSError, ValueError) as err:
        raise InvalidArgument(f"cannot read {path}: {err}") from None
    listed = config.get("insecure-registries") if isinstance(config, dict) else None
    if isinstance(listed, list):
        entries.update(str(e).strip().lower() for e in listed if str(e).strip())
    return entries


def allows_plain_http(domain: str) -> bool:
    if is_loopback(domain):
        return True
    listed = insecure_registries()
    host, _ = split_host_port(domain.lower())
    return domain.lower() in listed or host in listed
