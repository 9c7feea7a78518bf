"""husk's own extension to the API: a running container's WireGuard overlay.

``POST /husk/containers/{id}/overlay`` with the reference's ``OverlayConfig`` fields
(overlay_ip, prefix_len, private_key, listen_port, peers, dns_server, dns_domain; and
husk's host_port) attaches it; ``GET`` reports it with each peer's latest handshake;
``DELETE`` detaches it. Docker clients never call these.
"""

from __future__ import annotations

from aiohttp import web

from husk.daemon.docker.context import context
from husk.daemon.docker.errors import json_reply
from husk.daemon.docker.params import json_body
from husk.daemon.docker.routing import add_route
from husk.runtime import overlay

PATH = "/husk/containers/{id}/overlay"


async def attach_overlay(request: web.Request) -> web.StreamResponse:
    runtime = context(request).runtime
    container = runtime.container(request.match_info["id"])
    body = await json_body(request)
    shown = await overlay.attach(container, runtime.launcher.gateway, body)
    return json_reply(shown)


async def overlay_status(request: web.Request) -> web.StreamResponse:
    container = context(request).runtime.container(request.match_info["id"])
    return json_reply(await overlay.status(container))


async def detach_overlay(request: web.Request) -> web.StreamResponse:
    runtime = context(request).runtime
    container = runtime.container(request.match_info["id"])
    await overlay.detach(container, runtime.launcher.gateway)
    return web.Response(status=204)


def register(app: web.Application) -> None:
    add_route(app, "POST", PATH, attach_overlay)
    add_route(app, "GET", PATH, overlay_status)
    add_route(app, "DELETE", PATH, detach_overlay)
