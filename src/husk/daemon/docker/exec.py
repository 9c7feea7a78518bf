"""Exec endpoints: create, start (detached or hijacked), resize, inspect."""

from __future__ import annotations

import contextlib
import json

from aiohttp import web

from husk.daemon.docker import shapes
from husk.daemon.docker.container_io import pump
from husk.daemon.docker.containers import terminal_size
from husk.daemon.docker.context import context
from husk.daemon.docker.create_config import exec_argv
from husk.daemon.docker.errors import json_reply
from husk.daemon.docker.limits import check_exec
from husk.daemon.docker.params import json_body
from husk.daemon.docker.routing import add_route
from husk.daemon.docker.streams import (
    MULTIPLEXED_STREAM,
    RAW_STREAM,
    HijackedConnection,
    HijackedResponse,
    encode_output,
    frame,
)
from husk.detachkeys import parse_detach_keys
from husk.errors import HuskError, InvalidArgument, NotSupported
from husk.runtime.execs import ExecSpec
from husk.runtime.streams import ProcessStream

EXIT_STATUS_HEADER = "X-Husk-Exit-Status"
"""Sent by husk's own CLI with a non-tty exec start (value ``frame``): after the session's
output, the stream then carries one frame of EXIT_STATUS_STREAM whose payload is
``{"ExitCode": N}``, which saves the client the ``GET /exec/{id}/json`` that Docker's
clients make once the stream ends. Other clients never ask, so never see it."""
EXIT_STATUS_STREAM = 4
"""Beyond Docker's stream numbers (0-3): only a client that asked reads it."""


async def create_exec(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    record = ctx.runtime.get(request.match_info["id"])
    body = await json_body(request)
    if body.get("Privileged"):
        raise NotSupported("privileged exec is not supported: each container is a VM")
    env = body.get("Env") or []
    if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
        raise InvalidArgument("invalid Env: expected a list of strings")
    workdir = str(body.get("WorkingDir") or "")
    if workdir and not workdir.startswith("/"):
        raise InvalidArgument(
            f"the working directory '{workdir}' is invalid, it needs to be an absolute path"
        )
    spec = ExecSpec(
        argv=exec_argv(body.get("Cmd")),
        env=list(env),
        user=str(body.get("User") or ""),
        workdir=workdir,
        tty=bool(body.get("Tty")),
        stdin=bool(body.get("AttachStdin")),
        detach_keys=str(body.get("DetachKeys") or ""),
    )
    check_exec(spec)
    parse_detach_keys(spec.detach_keys)  # refused now, not when the session starts
    exec_id = await ctx.runtime.exec_create(record.id, spec)
    return json_reply({"Id": exec_id}, status=201)


async def _drain(process: ProcessStream) -> None:
    """A detached exec still produces output; read it so the process never blocks."""
    with contextlib.suppress(HuskError, ConnectionError):
        await process.close_stdin()
    async for _ in process.output():
        pass


async def start_exec(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    body = await json_body(request, required=False)
    size = console_size(body)  # before anything starts: a bad value is the client's 400
    execution = ctx.runtime.exec_inspect(request.match_info["id"])
    detach = bool(body.get("Detach"))
    ctx.runtime.exec_check_startable(execution.id)  # the usual refusals stay HTTP errors
    connection = None
    if not detach:
        # Take the connection over before the process starts, as Docker does: output
        # sent right behind the 101 headers can land in the client's header buffer
        # (docker-py reads the body from the raw socket) and be lost there.
        connection = await HijackedConnection.take_over(
            request, content_type=RAW_STREAM if execution.spec.tty else MULTIPLEXED_STREAM
        )
    try:
        process = await ctx.runtime.exec_start(execution.id)
    except HuskError as err:
        if connection is None:
            raise
        await connection.send(encode_output("stderr", f"{err}\n".encode(), tty=False))
        await connection.close()
        return HijackedResponse()
    if process.tty and size is not None:
        with contextlib.suppress(HuskError):
            await process.resize(*size)
    if connection is None:
        ctx.spawn(_drain(process), f"detached exec {execution.id[:12]}")
        return web.Response(status=200)
    wants_status = request.headers.get(EXIT_STATUS_HEADER, "").lower() == "frame"
    await pump(
        connection,
        process,
        stdin=execution.spec.stdin,
        streams={"stdout", "stderr"},
        close_stdin=True,
        detach_keys=parse_detach_keys(execution.spec.detach_keys),
        after_output=(lambda: exit_status_frame(process)) if wants_status else None,
    )
    return HijackedResponse()


def exit_status_frame(process: ProcessStream) -> bytes:
    """The exit code as the frame a client asked for with EXIT_STATUS_HEADER; nothing for a
    tty session (its stream has no frames) or when the code is unknown (the client then
    asks ``GET /exec/{id}/json``, as Docker's do)."""
    code = process.exit_code
    if process.tty or code is None:
        return b""
    return frame(EXIT_STATUS_STREAM, json.dumps({"ExitCode": code}).encode())


def console_size(body: dict[str, object]) -> tuple[int, int] | None:
    """``ConsoleSize`` of an exec start, Docker's ``[height, width]`` (``[0, 0]``: none).

    Checked before the process starts: a value ``int()`` refused (a string, 1e400) was
    an internal error once the connection had been taken over, the exec left running."""
    console = body.get("ConsoleSize")
    if console is None:
        return None
    if not (
        isinstance(console, list)
        and len(console) == 2
        and all(type(v) is int and 0 <= v <= 65535 for v in console)
    ):
        raise InvalidArgument(
            f"invalid ConsoleSize {console!r}: expected [height, width], integers 0-65535"
        )
    height, width = console
    return (height, width) if height and width else None


async def resize_exec(request: web.Request) -> web.StreamResponse:
    rows, cols = terminal_size(request)
    await context(request).runtime.exec_resize(request.match_info["id"], rows, cols)
    return web.Response(status=201)


async def inspect_exec(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    execution = ctx.runtime.exec_inspect(request.match_info["id"])
    container = None
    with contextlib.suppress(HuskError):
        container = ctx.runtime.get(execution.container_id)
    return json_reply(shapes.exec_inspect(execution, container))


def register(app: web.Application) -> None:
    add_route(app, "POST", "/containers/{id}/exec", create_exec)
    add_route(app, "POST", "/exec/{id}/start", start_exec)
    add_route(app, "POST", "/exec/{id}/resize", resize_exec)
    add_route(app, "GET", "/exec/{id}/json", inspect_exec)
