"""API versions and routes: every path is served bare and under ``/v1.NN``."""

from __future__ import annotations

import functools
import platform
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

from aiohttp import web

from husk.daemon.docker.errors import error_response

API_VERSION = "1.50"
MIN_API_VERSION = "1.41"
VERSION_PREFIX = r"/v{api_version:[0-9]+\.[0-9]+}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@functools.cache  # read from the package's metadata file: ~1.5 ms of every response
def husk_version() -> str:
    try:
        return version("husk")
    except PackageNotFoundError:
        return "0.0.0"


def server_header() -> str:
    return f"husk/{husk_version()} ({platform.system().lower()})"


ApiVersion = tuple[int, int]


def _as_tuple(text: str) -> ApiVersion:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


# Clients that adopt the daemon's newest API version as their own yet read fields Docker
# dropped later: docker-compose 1.x (docker-py 5) reads an image's ``ContainerConfig`` and
# looks for the container's short id in a network endpoint's ``Aliases`` (both gone in
# 1.45). ``/version`` offers them the version they were written for, and they then ask for
# it in every path, as they would of a Docker engine of that version.
LEGACY_CLIENTS: tuple[tuple[str, str], ...] = (("docker-compose/1.", "1.41"),)


def offered_version(request: web.Request) -> str:
    """The API version ``/version`` reports to this client (the newest, or a legacy one)."""
    agent = request.headers.get("User-Agent", "")
    for prefix, legacy in LEGACY_CLIENTS:
        if agent.startswith(prefix):
            return legacy
    return API_VERSION


def add_route(app: web.Application, method: str, path: str, handler: Handler) -> None:
    app.router.add_route(method, path, handler)
    app.router.add_route(method, VERSION_PREFIX + path, handler)


def api_version(request: web.Request) -> ApiVersion:
    """The version the client asked for (the newest one for unversioned paths)."""
    text = request.match_info.get("api_version")
    return _as_tuple(text) if text else LATEST


LATEST: ApiVersion = _as_tuple(API_VERSION)


@web.middleware
async def check_version(request: web.Request, handler: Handler) -> web.StreamResponse:
    text = request.match_info.get("api_version")
    if text:
        wanted = _as_tuple(text)
        if wanted > _as_tuple(API_VERSION):
            return error_response(
                400,
                f"client version {text} is too new. Maximum supported API version is {API_VERSION}",
            )
        if wanted < _as_tuple(MIN_API_VERSION):
            return error_response(
                400,
                f"client version {text} is too old. Minimum supported API version is "
                f"{MIN_API_VERSION}, please upgrade your client to a newer version",
            )
    return await handler(request)


async def add_common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Docker sends these on every response; clients negotiate from ``API-Version``."""
    response.headers.setdefault("Api-Version", API_VERSION)
    response.headers.setdefault("Docker-Experimental", "false")
    response.headers.setdefault("Ostype", "linux")
    response.headers["Server"] = server_header()
