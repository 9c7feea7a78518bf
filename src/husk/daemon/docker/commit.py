"""``POST /commit``: a container's changes as a new image (``docker commit``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from husk.daemon.docker.context import context
from husk.daemon.docker.errors import json_reply
from husk.daemon.docker.params import json_body, query_str
from husk.daemon.docker.routing import add_route
from husk.errors import InvalidArgument
from husk.runtime.commit import CommitOptions

# Fields of the request's config that replace the container's in the new image.
CONFIG_FIELDS = (
    "Cmd",
    "Entrypoint",
    "Env",
    "WorkingDir",
    "User",
    "Labels",
    "ExposedPorts",
    "Volumes",
    "StopSignal",
)


def _reference(repo: str, tag: str) -> str | None:
    if not repo:
        if tag:
            raise InvalidArgument("a tag needs a repository")
        return None
    return f"{repo}:{tag}" if tag else repo


_STRING_LISTS = ("Cmd", "Entrypoint", "Env")
_STRINGS = ("WorkingDir", "User", "StopSignal")
_OBJECTS = ("Labels", "ExposedPorts", "Volumes")


def config_changes(config: dict[str, Any]) -> dict[str, Any]:
    """The request body's config fields that replace the container's (unset ones do not),
    each of the JSON type an image config has: the image outlives the request, and every
    later run, build or inspect of it reads them."""
    changes = {
        key: config[key] for key in CONFIG_FIELDS if config.get(key) not in (None, "", [], {})
    }
    for key, value in changes.items():
        if key in ("Cmd", "Entrypoint") and isinstance(value, str):
            changes[key] = value = [value]  # Docker's strslice: a string is one word
        if key in _STRING_LISTS:
            good = isinstance(value, list) and all(isinstance(item, str) for item in value)
        elif key in _STRINGS:
            good = isinstance(value, str)
        else:
            good = isinstance(value, dict) and all(isinstance(k, str) for k in value)
            if key == "Labels":
                good = good and all(isinstance(v, str) for v in value.values())
        if not good:
            raise InvalidArgument(f"invalid config field {key}: wrong JSON type")
    return changes


async def commit(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    container = query_str(request, "container")
    if not container:
        raise InvalidArgument("no container given to commit")
    options = CommitOptions(
        reference=_reference(query_str(request, "repo"), query_str(request, "tag")),
        changes=[c for item in request.query.getall("changes", []) for c in item.splitlines() if c],
        comment=query_str(request, "comment"),
        author=query_str(request, "author"),
        config=config_changes(await json_body(request, required=False)),
    )
    image = await ctx.runtime.commit(container, options)
    return json_reply({"Id": image.id}, status=201)


def register(app: web.Application) -> None:
    add_route(app, "POST", "/commit", commit)
