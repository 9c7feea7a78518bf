"""Volumes (Docker's ``local`` driver, kept by husk.volumes): list, create, inspect,
remove, prune, and their sizes for ``/system/df``."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from husk.daemon.docker.context import context
from husk.daemon.docker.errors import json_reply
from husk.daemon.docker.params import filters_of, json_body, label_matches, query_bool
from husk.daemon.docker.routing import add_route
from husk.errors import InvalidArgument, NotSupported
from husk.volumes.manager import VolumeManager, allocated_bytes
from husk.volumes.model import LOCAL_SCOPE, Volume

VOLUME_FILTERS = {"name", "driver", "label", "dangling"}
PRUNE_FILTERS = {"label", "all"}
UNKNOWN_SIZE = -1
"""Docker's Size when it is not known (a named bind's host directory is not counted)."""


def _manager(request: web.Request) -> VolumeManager:
    return context(request).runtime.volumes


def _bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise InvalidArgument(f"invalid filter '{key}={value}': expected true or false")


def volume_json(volume: Volume) -> dict[str, Any]:
    return {
        "CreatedAt": volume.created,
        "Driver": volume.driver,
        "Labels": dict(volume.labels),
        "Mountpoint": volume.mountpoint,
        "Name": volume.name,
        "Options": dict(volume.options) or None,
        "Scope": LOCAL_SCOPE,
    }


def volume_listed(volume: Volume, in_use: bool, filters: dict[str, list[str]]) -> bool:
    """Docker's volume filters: values of one key are alternatives, keys must all hold."""
    for key, values in filters.items():
        if not values:
            continue
        if key == "name":
            ok = any(v in volume.name for v in values)
        elif key == "driver":
            ok = volume.driver in values
        elif key == "label":
            ok = label_matches(volume.labels, values)
        elif key == "dangling":
            ok = any(_bool(key, v) == (not in_use) for v in values)
        else:
            ok = False
        if not ok:
            return False
    return True


async def list_volumes(request: web.Request) -> web.StreamResponse:
    filters = filters_of(request, VOLUME_FILTERS)
    manager = _manager(request)
    used = manager.usage()
    listed = [volume_json(v) for v in manager.list() if volume_listed(v, v.name in used, filters)]
    return json_reply({"Volumes": listed, "Warnings": None})


def _string_map(value: Any, field: str) -> dict[str, str]:
    if not value:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"invalid {field}: expected an object")
    return {str(k): str(v) for k, v in value.items()}


async def create_volume(request: web.Request) -> web.StreamResponse:
    body = await json_body(request, required=False)
    if body.get("ClusterVolumeSpec"):
        raise NotSupported("cluster volumes (swarm) are not supported by husk")
    name = body.get("Name") or ""
    if not isinstance(name, str):
        raise InvalidArgument("invalid Name: expected a string")
    volume = _manager(request).create(
        name,
        driver=str(body.get("Driver") or ""),
        options=_string_map(body.get("DriverOpts"), "DriverOpts"),
        labels=_string_map(body.get("Labels"), "Labels"),
    )
    return json_reply(volume_json(volume), status=201)


async def inspect_volume(request: web.Request) -> web.StreamResponse:
    return json_reply(volume_json(_manager(request).get(request.match_info["name"])))


async def remove_volume(request: web.Request) -> web.StreamResponse:
    _manager(request).remove(request.match_info["name"], force=query_bool(request, "force"))
    return web.Response(status=204)


async def volume_size(volume: Volume) -> int:
    """Bytes the volume's data takes (walked off the event loop)."""
    if volume.device:
        return UNKNOWN_SIZE
    return await asyncio.to_thread(allocated_bytes, volume.mountpoint)


async def prune_volumes(request: web.Request) -> web.StreamResponse:
    filters = filters_of(request, PRUNE_FILTERS)
    all_volumes = any(_bool("all", v) for v in filters.get("all") or [])
    labels = filters.get("label") or []
    manager = _manager(request)
    used = manager.usage()
    sizes: dict[str, int] = {}
    for volume in manager.list():  # sized before they go
        if volume.name not in used and (all_volumes or volume.anonymous):
            sizes[volume.name] = max(0, await volume_size(volume))
    removed = manager.prune(
        lambda volume: label_matches(volume.labels, labels), all_volumes=all_volumes
    )
    return json_reply(
        {
            "VolumesDeleted": [v.name for v in removed] or None,
            "SpaceReclaimed": sum(sizes.get(v.name, 0) for v in removed),
        }
    )


async def disk_usage(manager: VolumeManager) -> list[dict[str, Any]]:
    """``/system/df``'s Volumes: each with UsageData {Size, RefCount}."""
    used = manager.usage()
    listed = []
    for volume in manager.list():
        document = volume_json(volume)
        document["UsageData"] = {
            "Size": await volume_size(volume),
            "RefCount": len(used.get(volume.name, [])),
        }
        listed.append(document)
    return listed


def register(app: web.Application) -> None:
    add_route(app, "GET", "/volumes", list_volumes)
    add_route(app, "POST", "/volumes/create", create_volume)
    add_route(app, "POST", "/volumes/prune", prune_volumes)
    add_route(app, "GET", "/volumes/{name}", inspect_volume)
    add_route(app, "DELETE", "/volumes/{name}", remove_volume)
