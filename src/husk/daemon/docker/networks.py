"""Networks and volumes, as far as husk has them.

husk has one kind of network: each container is a VM behind its own QEMU
user-mode NAT. It is listed as the single network ``bridge`` (the name Docker
clients expect as the default) whose driver and options say what it really is.
husk has no named volumes: the listing is empty and creating one is refused.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from husk.daemon.docker import shapes
from husk.daemon.docker.context import context
from husk.daemon.docker.errors import json_reply
from husk.daemon.docker.params import filters_of, nanos_to_iso
from husk.daemon.docker.routing import add_route
from husk.errors import NotFound, NotSupported

NETWORK_FILTERS = {"name", "id", "driver", "scope", "type", "label", "dangling"}
VOLUME_FILTERS = {"name", "driver", "label", "dangling"}


def _network(request: web.Request) -> dict[str, object]:
    ctx = context(request)
    created = nanos_to_iso(int(ctx.started_at * 1e9))
    return shapes.network_json(ctx.runtime.list(all=True), created)


def _network_listed(filters: dict[str, list[str]]) -> bool:
    checks: dict[str, Callable[[str], bool]] = {
        "name": lambda v: v in shapes.NETWORK_NAME,
        "id": lambda v: shapes.NETWORK_ID.startswith(v),
        "driver": lambda v: v == "qemu-user",
        "scope": lambda v: v == "local",
        "type": lambda v: v == "builtin",
        "label": lambda v: False,
        "dangling": lambda v: v.lower() in ("false", "0"),
    }
    return all(any(checks[key](v) for v in values) for key, values in filters.items() if values)


async def list_networks(request: web.Request) -> web.StreamResponse:
    filters = filters_of(request, NETWORK_FILTERS)
    return json_reply([_network(request)] if _network_listed(filters) else [])


async def inspect_network(request: web.Request) -> web.StreamResponse:
    name = request.match_info["id"]
    if name in (shapes.NETWORK_NAME, "default") or (
        len(name) >= 3 and shapes.NETWORK_ID.startswith(name)
    ):
        return json_reply(_network(request))
    raise NotFound(f"network {name} not found")


async def create_network(request: web.Request) -> web.StreamResponse:
    raise NotSupported(
        "husk cannot create networks: each container runs in its own VM behind its own "
        "user-mode NAT; publish ports (-p) to connect containers"
    )


async def change_network(request: web.Request) -> web.StreamResponse:
    raise NotSupported(
        "husk cannot connect or disconnect containers: each VM has exactly one NAT network"
    )


async def remove_network(request: web.Request) -> web.StreamResponse:
    name = request.match_info["id"]
    if name == shapes.NETWORK_NAME or shapes.NETWORK_ID.startswith(name):
        raise NotSupported(f"{name} is a pre-defined network and cannot be removed")
    raise NotFound(f"network {name} not found")


async def prune_networks(request: web.Request) -> web.StreamResponse:
    return json_reply({"NetworksDeleted": None})


async def list_volumes(request: web.Request) -> web.StreamResponse:
    filters_of(request, VOLUME_FILTERS)
    return json_reply({"Volumes": [], "Warnings": None})


async def inspect_volume(request: web.Request) -> web.StreamResponse:
    raise NotFound(f"get {request.match_info['name']}: no such volume")


async def create_volume(request: web.Request) -> web.StreamResponse:
    raise NotSupported(
        "husk has no named volumes: bind-mount a host directory instead "
        "(-v /host/path:/container/path)"
    )


async def prune_volumes(request: web.Request) -> web.StreamResponse:
    return json_reply({"VolumesDeleted": None, "SpaceReclaimed": 0})


def register(app: web.Application) -> None:
    add_route(app, "GET", "/networks", list_networks)
    add_route(app, "POST", "/networks/create", create_network)
    add_route(app, "POST", "/networks/prune", prune_networks)
    add_route(app, "GET", "/networks/{id}", inspect_network)
    add_route(app, "DELETE", "/networks/{id}", remove_network)
    add_route(app, "POST", "/networks/{id}/connect", change_network)
    add_route(app, "POST", "/networks/{id}/disconnect", change_network)
    add_route(app, "GET", "/volumes", list_volumes)
    add_route(app, "POST", "/volumes/create", create_volume)
    add_route(app, "POST", "/volumes/prune", prune_volumes)
    add_route(app, "GET", "/volumes/{name}", inspect_volume)
    add_route(app, "DELETE", "/volumes/{name}", inspect_volume)
