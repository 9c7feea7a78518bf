"""Container endpoints: create, list, inspect, lifecycle, wait, stats, top, prune."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from husk.daemon.docker import shapes, top
from husk.daemon.docker.context import ApiContext, context
from husk.daemon.docker.create_config import spec_from_create
from husk.daemon.docker.errors import STARTED_RESPONSE, json_reply
from husk.daemon.docker.images import find_image
from husk.daemon.docker.limits import check_name, check_spec
from husk.daemon.docker.params import (
    filters_of,
    iso_to_unix,
    json_body,
    label_matches,
    parse_timestamp,
    query_bool,
    query_int,
    query_str,
)
from husk.daemon.docker.routing import add_route
from husk.daemon.docker.sizes import container_sizes
from husk.detachkeys import parse_detach_keys
from husk.errors import Conflict, HuskError, InvalidArgument, NotFound, NotSupported
from husk.oci.platform import Platform, parse_platform
from husk.oci.reference import parse_reference
from husk.runtime.model import ContainerRecord, ContainerStatus

if TYPE_CHECKING:
    from husk.runtime.runtime import Runtime


LIST_FILTERS = {
    "id",
    "name",
    "label",
    "status",
    "ancestor",
    "exited",
    "before",
    "since",
    "health",
    "publish",
    "expose",
    "is-task",
}
PRUNE_FILTERS = {"label", "until"}
STATUSES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")
STATS_INTERVAL = 1.0


def container(ctx: ApiContext, ref: str) -> ContainerRecord:
    return ctx.runtime.get(ref)


def exec_ids(runtime: Runtime, container_id: str) -> list[str]:
    return runtime.execs.ids_of(container_id)


def image_config(runtime: Runtime, image_id: str) -> dict[str, Any] | None:
    with contextlib.suppress(HuskError):
        return runtime.images.resolve(image_id).config
    return None


# ------------------------------------------------------------------- create


async def create_container(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    body = await json_body(request)
    name = query_str(request, "name") or None
    spec = spec_from_create(body, name)
    check_spec(spec)
    platform = query_str(request, "platform")
    record = find_image(ctx.runtime.images, spec.image)
    if platform:
        wanted = parse_platform(platform)
        if not wanted.matches(Platform(record.os, record.architecture, record.variant)):
            raise NotFound(f"No such image: {spec.image} (for platform {platform})")
    created = await ctx.runtime.create(spec, pull_policy="never")
    if body.get("StdinOnce"):
        ctx.stdin_once[created.id] = True
    return json_reply({"Id": created.id, "Warnings": []}, status=201)


# --------------------------------------------------------------------- list


def _ancestor_ids(ctx: ApiContext, values: list[str]) -> tuple[set[str], set[str]]:
    """Image ids and normalised names the ``ancestor`` filter accepts."""
    ids: set[str] = set()
    names: set[str] = set()
    for value in values:
        with contextlib.suppress(HuskError):
            ids.add(ctx.runtime.images.resolve(value).id)
        with contextlib.suppress(HuskError):
            names.add(str(parse_reference(value)))
    return ids, names


def _matches(
    ctx: ApiContext,
    record: ContainerRecord,
    filters: dict[str, list[str]],
    pivots: dict[str, float],
) -> bool:
    state = record.state
    for key, values in filters.items():
        if not values:
            continue
        if key == "id":
            ok = any(record.id.startswith(v) for v in values)
        elif key == "name":
            ok = any(re.search(v.lstrip("/"), record.name) for v in values)
        elif key == "label":
            ok = label_matches(record.spec.labels, values)
        elif key == "status":
            for value in values:
                if value not in STATUSES:
                    raise InvalidArgument(
                        f"invalid filter 'status={value}': use one of {', '.join(STATUSES)}"
                    )
            ok = state.status in values
        elif key == "exited":
            try:
                codes = {int(v) for v in values}
            except ValueError:
                raise InvalidArgument("invalid filter 'exited': expected an integer") from None
            ok = state.status is ContainerStatus.EXITED and state.exit_code in codes
        elif key == "ancestor":
            ids, names = _ancestor_ids(ctx, values)
            with contextlib.suppress(HuskError):
                if str(parse_reference(record.image_ref)) in names:
                    continue
            ok = record.image_id in ids or any(
                record.image_id.removeprefix("sha256:").startswith(v.removeprefix("sha256:"))
                for v in values
            )
        elif key == "health":
            ok = (state.health or "none") in values
        elif key == "before":
            ok = iso_to_unix(record.created) < pivots["before"]
        elif key == "since":
            ok = iso_to_unix(record.created) > pivots["since"]
        elif key == "publish":
            ok = any(
                v in record.ports
                or f"{v}/tcp" in record.ports
                or any(
                    b.get("HostPort") == v.split("/")[0] for bs in record.ports.values() for b in bs
                )
                for v in values
            )
        elif key == "expose":
            keys = set(record.spec.exposed_ports) | set(record.ports)
            ok = any(v in keys or f"{v}/tcp" in keys for v in values)
        elif key == "is-task":
            ok = all(v.lower() in ("false", "0") for v in values)
        else:
            ok = False
        if not ok:
            return False
    return True


async def list_containers(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    filters = filters_of(request, LIST_FILTERS)
    limit = query_int(request, "limit", -1) or -1
    show_all = (
        query_bool(request, "all")
        or limit > 0
        or bool(set(filters) & {"status", "exited", "before", "since"})
    )
    pivots: dict[str, float] = {}
    for key in ("before", "since"):
        if filters.get(key):
            pivots[key] = iso_to_unix(container(ctx, filters[key][-1]).created)
    records = [r for r in ctx.runtime.list(all=show_all) if _matches(ctx, r, filters, pivots)]
    if limit > 0:
        records = records[:limit]
    summaries = [shapes.container_summary(r) for r in records]
    if query_bool(request, "size"):
        for summary, record in zip(summaries, records, strict=True):
            summary["SizeRw"], summary["SizeRootFs"] = container_sizes(ctx.runtime, record)
    return json_reply(summaries)


async def inspect_container(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    record = container(ctx, request.match_info["id"])
    data = shapes.container_inspect(
        record, exec_ids(ctx.runtime, record.id), image_config(ctx.runtime, record.image_id)
    )
    if query_bool(request, "size"):
        data["SizeRw"], data["SizeRootFs"] = container_sizes(ctx.runtime, record)
    return json_reply(data)


def _directory_bytes(runtime: Runtime, container_id: str) -> int:
    """Disk space the container's own files take (blocks really used; disks are sparse)."""
    store = getattr(runtime, "containers", None)
    if store is None:
        return 0
    total = 0
    with contextlib.suppress(OSError):
        for path in store.directory(container_id).rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    total += path.stat().st_blocks * 512
    return total


# ---------------------------------------------------------------- lifecycle


async def start_container(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    if request.body_exists:
        body = await json_body(request, required=False)
        if body:
            raise InvalidArgument(
                "starting a container with a HostConfig is no longer supported; give it at create"
            )
    parse_detach_keys(query_str(request, "detachKeys"))  # Docker's legacy parameter: checked
    await ctx.runtime.start(request.match_info["id"])
    return web.Response(status=204)


def _timeout(request: web.Request) -> int | None:
    return query_int(request, "t", None)


async def stop_container(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    signal = query_str(request, "signal") or None
    await ctx.runtime.stop(request.match_info["id"], timeout=_timeout(request), signal=signal)
    return web.Response(status=204)


async def restart_container(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    await ctx.runtime.restart(request.match_info["id"], timeout=_timeout(request))
    return web.Response(status=204)


async def kill_container(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    await ctx.runtime.kill(request.match_info["id"], query_str(request, "signal") or "KILL")
    return web.Response(status=204)


async def pause_container(request: web.Request) -> web.StreamResponse:
    await context(request).runtime.pause(request.match_info["id"])
    return web.Response(status=204)


async def unpause_container(request: web.Request) -> web.StreamResponse:
    await context(request).runtime.unpause(request.match_info["id"])
    return web.Response(status=204)


async def rename_container(request: web.Request) -> web.StreamResponse:
    name = query_str(request, "name")
    if not name:
        raise InvalidArgument("a new name (name) is required")
    check_name(name)
    await context(request).runtime.rename(request.match_info["id"], name)
    return web.Response(status=204)


def terminal_size(request: web.Request) -> tuple[int, int]:
    rows = query_int(request, "h", 0) or 0
    cols = query_int(request, "w", 0) or 0
    if rows <= 0 or cols <= 0 or rows > 65535 or cols > 65535:
        raise InvalidArgument(f"invalid terminal size {rows}x{cols}")
    return rows, cols


async def resize_container(request: web.Request) -> web.StreamResponse:
    rows, cols = terminal_size(request)
    await context(request).runtime.resize(request.match_info["id"], rows, cols)
    return web.Response(status=200)


async def remove_container(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    if query_bool(request, "link"):
        raise NotSupported("husk has no container links to remove")
    record = container(ctx, request.match_info["id"])
    await ctx.runtime.remove(
        record.id, force=query_bool(request, "force"), volumes=query_bool(request, "v")
    )
    ctx.stdin_once.pop(record.id, None)
    return web.Response(status=204)


async def prune_containers(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    filters = filters_of(request, PRUNE_FILTERS)
    until: float | None = None
    if filters.get("until"):
        until = parse_timestamp(filters["until"][-1], "until")
    removed: list[str] = []
    reclaimed = 0
    for record in ctx.runtime.list(all=True):
        if record.state.running or record.state.status is ContainerStatus.REMOVING:
            continue
        if filters.get("label") and not label_matches(record.spec.labels, filters["label"]):
            continue
        if until is not None and iso_to_unix(record.created) >= until:
            continue
        size = _directory_bytes(ctx.runtime, record.id)
        try:
            await ctx.runtime.remove(record.id)
        except Conflict:
            continue  # started meanwhile
        removed.append(record.id)
        ctx.stdin_once.pop(record.id, None)
        reclaimed += size
    return json_reply({"ContainersDeleted": removed or None, "SpaceReclaimed": reclaimed})


# --------------------------------------------------------------------- wait


async def wait_container(request: web.Request) -> web.StreamResponse:
    """Answers the headers at once, the body when the condition is met.

    The docker CLI sends ``wait`` before ``start`` and starts the container as
    soon as the headers arrive; so the waiter must be registered by then.
    """
    ctx = context(request)
    condition = query_str(request, "condition") or "not-running"
    if condition not in ("not-running", "next-exit", "removed"):
        raise InvalidArgument(
            f"invalid condition {condition!r}: use not-running, next-exit or removed"
        )
    record = container(ctx, request.match_info["id"])
    waiting = asyncio.ensure_future(ctx.runtime.wait(record.id, condition))
    await asyncio.sleep(0)  # the waiter registers itself before its first suspension
    if waiting.done() and waiting.exception() is not None:
        raise waiting.exception()  # type: ignore[misc]
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    request[STARTED_RESPONSE] = response
    try:
        code = await waiting
        result: dict[str, Any] = {"StatusCode": code, "Error": None}
    except HuskError as err:
        result = {"StatusCode": -1, "Error": {"Message": err.message}}
    finally:
        if not waiting.done():
            waiting.cancel()
    await response.write(json.dumps(result).encode() + b"\n")
    await response.write_eof()
    return response


# -------------------------------------------------------------- stats, top


async def _sample(runtime: Runtime, container_id: str) -> dict[str, Any] | None:
    try:
        return dict(await runtime.stats(container_id))
    except Conflict:
        return None  # not running (any more)


async def container_stats(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    runtime = ctx.runtime
    record = container(ctx, request.match_info["id"])
    stream = query_bool(request, "stream", True)
    one_shot = query_bool(request, "one-shot")
    if one_shot and stream:
        raise InvalidArgument("cannot have stream=true and one-shot=true")
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    if stream:
        response.enable_chunked_encoding()
    previous: dict[str, Any] | None = None
    if not stream:
        sample = await _sample(runtime, record.id) if record.state.running else None
        if sample is not None and not one_shot:
            previous = sample
            await asyncio.sleep(STATS_INTERVAL)
            sample = await _sample(runtime, record.id)
            if sample is None:
                previous = None
        body = json.dumps(shapes.stats_json(record, sample, previous)).encode() + b"\n"
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response
    await response.prepare(request)
    request[STARTED_RESPONSE] = response
    while True:
        began = time.monotonic()
        current = runtime.get(record.id)
        sample = await _sample(runtime, record.id) if current.state.running else None
        document = shapes.stats_json(current, sample, previous)
        await response.write(json.dumps(document).encode() + b"\n")
        previous = sample
        await asyncio.sleep(max(0.0, STATS_INTERVAL - (time.monotonic() - began)))


async def container_top(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    record = container(ctx, request.match_info["id"])
    if not record.state.running:
        raise Conflict(f"Container {record.id} is not running")
    titles, keys = top.columns(query_str(request, "ps_args"))
    processes = top.rows(await ctx.runtime.container(record.id).processes(), keys)
    return json_reply({"Titles": titles, "Processes": processes})


async def container_update(request: web.Request) -> web.StreamResponse:
    raise NotSupported(
        "docker update is not supported by husk: a container VM's resources are fixed at create"
    )


def register(app: web.Application) -> None:
    add_route(app, "POST", "/containers/create", create_container)
    add_route(app, "GET", "/containers/json", list_containers)
    add_route(app, "POST", "/containers/prune", prune_containers)
    add_route(app, "GET", "/containers/{id}/json", inspect_container)
    add_route(app, "POST", "/containers/{id}/start", start_container)
    add_route(app, "POST", "/containers/{id}/stop", stop_container)
    add_route(app, "POST", "/containers/{id}/restart", restart_container)
    add_route(app, "POST", "/containers/{id}/kill", kill_container)
    add_route(app, "POST", "/containers/{id}/pause", pause_container)
    add_route(app, "POST", "/containers/{id}/unpause", unpause_container)
    add_route(app, "POST", "/containers/{id}/rename", rename_container)
    add_route(app, "POST", "/containers/{id}/resize", resize_container)
    add_route(app, "POST", "/containers/{id}/wait", wait_container)
    add_route(app, "POST", "/containers/{id}/update", container_update)
    add_route(app, "GET", "/containers/{id}/stats", container_stats)
    add_route(app, "GET", "/containers/{id}/top", container_top)
    add_route(app, "DELETE", "/containers/{id}", remove_container)
