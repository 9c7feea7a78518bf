"""Docker endpoints husk does not have: a clear 501 instead of Docker's 404 "page not found".

A client that reaches one of these learns that husk lacks the feature (and which one),
not that it mistyped a path. The build cache prune is the exception: husk has no build
cache, so there is nothing to prune, and ``docker system prune`` must succeed.

Registered last, and only where no other module already serves the path: an endpoint
that lands later in its own module takes precedence without touching this list.
"""

from __future__ import annotations

from aiohttp import web

from husk.daemon.docker.errors import json_reply
from husk.daemon.docker.routing import Handler, add_route
from husk.errors import NotSupported

# (method, path, what the endpoint does), in Docker's words.
UNSUPPORTED: list[tuple[str, str, str]] = [
    ("POST", "/build", "building images (docker build)"),
    ("POST", "/build/cancel", "building images (docker build)"),
    ("POST", "/commit", "committing a container to an image (docker commit)"),
    ("GET", "/containers/{id}/export", "exporting a container's filesystem (docker export)"),
    ("GET", "/containers/{id}/changes", "listing a container's filesystem changes (docker diff)"),
    ("POST", "/containers/{id}/update", "updating a container's resources (docker update)"),
    ("GET", "/distribution/{name:.+}/json", "querying a registry for image metadata"),
    ("POST", "/auth", "checking registry credentials on the daemon (use husk login)"),
    ("POST", "/session", "interactive build sessions (BuildKit)"),
    ("POST", "/grpc", "the BuildKit gRPC endpoint"),
]
# Whole families: swarm mode, plugins and secrets have no meaning for a VM per container.
UNSUPPORTED_FAMILIES: list[tuple[str, str]] = [
    ("/swarm", "swarm mode (docker swarm)"),
    ("/nodes", "swarm mode (docker node)"),
    ("/services", "swarm mode (docker service)"),
    ("/tasks", "swarm mode (docker service ps)"),
    ("/secrets", "swarm secrets (docker secret)"),
    ("/configs", "swarm configs (docker config)"),
    ("/plugins", "engine plugins (docker plugin)"),
]


def _refusal(what: str) -> Handler:
    async def refuse(request: web.Request) -> web.StreamResponse:
        raise NotSupported(f"{what} is not supported by husk")

    return refuse


async def prune_build_cache(request: web.Request) -> web.StreamResponse:
    """husk builds nothing, so its build cache is always empty."""
    return json_reply({"CachesDeleted": None, "SpaceReclaimed": 0})


def _served(app: web.Application) -> set[tuple[str, str]]:
    served: set[tuple[str, str]] = set()
    for route in app.router.routes():
        canonical = route.resource.canonical if route.resource is not None else ""
        served.add((route.method, canonical))
    return served


def register(app: web.Application) -> None:
    served = _served(app)

    def add(method: str, path: str, handler: Handler) -> None:
        canonical = web.DynamicResource(path).canonical if "{" in path else path
        if (method, canonical) not in served and ("*", canonical) not in served:
            add_route(app, method, path, handler)

    add("POST", "/build/prune", prune_build_cache)
    for method, path, what in UNSUPPORTED:
        add(method, path, _refusal(what))
    for prefix, what in UNSUPPORTED_FAMILIES:
        refuse = _refusal(what)
        add("*", prefix, refuse)
        add("*", prefix + "/{tail:.*}", refuse)


__all__ = ["UNSUPPORTED", "UNSUPPORTED_FAMILIES", "register"]
