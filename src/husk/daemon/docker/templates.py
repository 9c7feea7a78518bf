"""husk's own extension to the API: build a boot template ahead of time (``husk system warm``).

``POST /husk/templates`` with ``{"Memory": bytes, "Cpus": n, "Binds": n, "Rebuild": bool}``
builds (or finds current) the template containers of that shape are restored from, in
the daemon, where the runtime builds templates for starts too. Docker clients never
call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from husk.daemon.docker.errors import json_reply
from husk.daemon.docker.params import json_body
from husk.daemon.docker.routing import add_route
from husk.errors import InvalidArgument
from husk.runtime.runtime import UPPER_DISK_BYTES
from husk.sandbox.template_boot import warm
from husk.sandbox.templates import MEMORY, SNAPSHOT, templates_enabled

MAX_BINDS = 64


async def build_template(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    memory = _number(body, "Memory", int, minimum=1)
    cpus = _number(body, "Cpus", float, minimum=0.01)
    binds = _number(body, "Binds", int, minimum=0) if body.get("Binds") is not None else 0
    if binds > MAX_BINDS:
        raise InvalidArgument(f"Binds must be at most {MAX_BINDS}, not {binds}")
    rebuild = body.get("Rebuild", False)
    if not isinstance(rebuild, bool):
        raise InvalidArgument(f"Rebuild must be true or false, not {rebuild!r}")
    result = await warm(
        memory_bytes=memory,
        cpus=cpus,
        upper_disk_bytes=UPPER_DISK_BYTES,
        shares=binds,
        rebuild=rebuild,
    )
    snapshot_bytes, stored_memory = stored_sizes(result.path)
    return json_reply(
        {
            "key": result.key,
            "path": str(result.path),
            "built": result.built,
            "seconds": round(result.seconds, 3),
            "snapshot_bytes": snapshot_bytes,
            "memory_bytes": stored_memory,
            "inputs": result.inputs.to_json(),
            "description": result.inputs.describe(),
            "enabled": templates_enabled(),
        }
    )


def stored_sizes(directory: Path) -> tuple[int, int]:
    """Bytes of the template's device state, and of its memory file really on disk."""
    try:
        snapshot = (directory / SNAPSHOT).stat().st_size
        memory = (directory / MEMORY).stat().st_blocks * 512
    except OSError:
        return 0, 0
    return snapshot, memory


def _number(
    body: dict[str, Any], key: str, kind: type[int] | type[float], *, minimum: float
) -> Any:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{key} must be a number, not {value!r}")
    if kind is int and value != int(value):
        raise InvalidArgument(f"{key} must be a whole number, not {value!r}")
    if value < minimum:
        raise InvalidArgument(f"{key} must be at least {minimum}, not {value!r}")
    return kind(value)


def register(app: web.Application) -> None:
    add_route(app, "POST", "/husk/templates", build_template)
