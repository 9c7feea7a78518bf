"""The Docker Engine API, husk's native API (versions 1.41 to 1.50)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from husk.daemon.docker import (
    build,
    commit,
    container_io,
    containers,
    exec,
    images,
    networks,
    overlay,
    pool,
    system,
    templates,
    unsupported,
    volumes,
)
from husk.daemon.docker.context import CONTEXT_KEY, ApiContext, engine_id
from husk.daemon.docker.errors import docker_errors
from husk.daemon.docker.limits import MAX_JSON_BODY
from husk.daemon.docker.routing import add_common_headers, check_version

if TYPE_CHECKING:
    from husk.runtime.runtime import Runtime


def build_app(runtime: Runtime, *, debug: bool = False) -> web.Application:
    """The aiohttp application serving the Docker Engine API for ``runtime``."""
    # Bodies read whole (JSON) stop at MAX_JSON_BODY; streamed uploads are not read whole.
    app = web.Application(middlewares=[docker_errors, check_version], client_max_size=MAX_JSON_BODY)
    app[CONTEXT_KEY] = ApiContext(
        runtime=runtime,
        image_service=images.service_for(runtime),
        engine_id=engine_id(),
        debug=debug,
    )
    app.on_response_prepare.append(add_common_headers)
    for module in (
        system,
        images,
        containers,
        container_io,
        commit,
        build,
        exec,
        networks,
        volumes,
        pool,
        templates,
    ):
        module.register(app)
    overlay.register(app)  # husk's own: /husk/containers/{id}/overlay
    unsupported.register(app)  # last: only what no module above serves

    async def follow_events(app: web.Application) -> None:
        app[CONTEXT_KEY].events.start(runtime)

    async def stop_background(app: web.Application) -> None:
        await app[CONTEXT_KEY].close()

    app.on_startup.append(follow_events)
    app.on_shutdown.append(stop_background)
    return app


__all__ = ["build_app"]
