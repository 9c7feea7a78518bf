"""Docker's error contract: ``{"message": …}`` with the status a client expects.

A failed start or exec also carries its exit code (``ExitCode``).

husk errors carry their status (``http_status``); a not-modified start or stop
is an empty 304; anything unexpected is logged with its traceback and reported
as a one-line 500. Routing misses answer like Docker's ``page not found``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from husk.errors import HuskError

log = logging.getLogger("husk.daemon.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Set by handlers once their response is under way (its status can no longer change).
STARTED_RESPONSE = web.RequestKey("started_response", web.StreamResponse)


def json_reply(data: Any, status: int = 200) -> web.Response:
    """A JSON response typed exactly ``application/json``: Go clients compare it verbatim."""
    return web.Response(
        body=json.dumps(data).encode(), status=status, content_type="application/json"
    )


def error_response(status: int, message: str, exit_code: int | None = None) -> web.Response:
    """Docker's ``{"message": …}``; a failed start or exec adds the code it recorded as
    ``ExitCode`` (Docker clients ignore fields they do not know)."""
    if status == 304:
        return web.Response(status=304)
    body: dict[str, Any] = {"message": message}
    if exit_code is not None:
        body["ExitCode"] = exit_code
    return json_reply(body, status=status)


@web.middleware
async def docker_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HuskError as err:
        if err.http_status >= 500:
            log.warning("%s %s: %s", request.method, request.path, err)
        else:
            log.debug("%s %s: %s", request.method, request.path, err)
        return _after_start(request) or error_response(err.http_status, err.message, err.exit_code)
    except web.HTTPNotFound:
        return error_response(404, "page not found")
    except web.HTTPMethodNotAllowed:
        return error_response(405, "method not allowed")
    except web.HTTPException as err:
        return error_response(err.status, err.reason)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as err:
        log.exception("%s %s failed", request.method, request.path)
        return _after_start(request) or error_response(
            500, f"internal error: {type(err).__name__}: {err}"
        )


def _after_start(request: web.Request) -> web.StreamResponse | None:
    """A response already under way cannot change its status: end it instead."""
    return request.get(STARTED_RESPONSE)
