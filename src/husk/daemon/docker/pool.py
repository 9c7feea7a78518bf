"""husk's own extension to the API: the warm pool (``husk system warm --pool N``).

``GET /husk/pool`` reports the pool; ``POST /husk/pool`` with
``{"Size": N, "Memory": bytes, "Cpus": n}`` sets it (and remembers it in the
data directory's config.json), ``Size`` 0 ends it. Docker clients never call these.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from husk.daemon.docker.context import context
from husk.daemon.docker.errors import json_reply
from husk.daemon.docker.params import json_body
from husk.daemon.docker.routing import add_route
from husk.errors import InvalidArgument
from husk.sandbox.pool import PoolShape


async def get_pool(request: web.Request) -> web.StreamResponse:
    return json_reply(context(request).runtime.pool_report())


async def set_pool(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    size = _number(body, "Size", int)
    memory = body.get("Memory")
    cpus = body.get("Cpus")
    shape = PoolShape(
        _number(body, "Memory", int) if memory else None,
        _number(body, "Cpus", float) if cpus else None,
    )
    runtime = context(request).runtime
    await runtime.configure_pool(size, shape)
    return json_reply(runtime.pool_report())


def _number(body: dict[str, Any], key: str, kind: type[int] | type[float]) -> Any:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{key} must be a number, not {value!r}")
    return kind(value)


def register(app: web.Application) -> None:
    add_route(app, "GET", "/husk/pool", get_pool)
    add_route(app, "POST", "/husk/pool", set_pool)
