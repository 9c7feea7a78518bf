"""A container's byte streams: logs, attach (hijacked and websocket), and file archives."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import stat
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from husk.daemon.docker.context import context
from husk.daemon.docker.errors import STARTED_RESPONSE
from husk.daemon.docker.params import query_bool, query_str, query_time, unix_to_iso
from husk.daemon.docker.routing import add_route
from husk.daemon.docker.streams import (
    DRAIN_TIMEOUT,
    MULTIPLEXED_STREAM,
    RAW_STREAM,
    SYSTEM_ERROR,
    HijackedConnection,
    HijackedResponse,
    encode_output,
    frame,
)
from husk.detachkeys import DetachScanner, parse_detach_keys
from husk.errors import HuskError, InvalidArgument

if TYPE_CHECKING:
    from husk.runtime.model import ContainerRecord
    from husk.runtime.runtime import Runtime
    from husk.runtime.streams import ProcessStream

log = logging.getLogger(__name__)

UPLOAD_CHUNK = 1 << 20
PATH_STAT_HEADER = "X-Docker-Container-Path-Stat"

# Go's os.FileMode bits, which Docker puts in a path stat.
GO_MODE_DIR = 1 << 31
GO_MODE_SYMLINK = 1 << 27
GO_MODE_DEVICE = 1 << 26
GO_MODE_NAMED_PIPE = 1 << 25
GO_MODE_SOCKET = 1 << 24
GO_MODE_SETUID = 1 << 23
GO_MODE_SETGID = 1 << 22
GO_MODE_CHAR_DEVICE = 1 << 21
GO_MODE_STICKY = 1 << 20


def _stream_content_type(tty: bool) -> str:
    return RAW_STREAM if tty else MULTIPLEXED_STREAM


# --------------------------------------------------------------------- logs


def _tail(request: web.Request) -> int | None:
    value = query_str(request, "tail", "all").strip()
    if value in ("", "all"):
        return None
    try:
        count = int(value)
    except ValueError:
        raise InvalidArgument(f"invalid value for 'tail': {value!r}") from None
    return None if count < 0 else count


async def container_logs(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    record = ctx.runtime.get(request.match_info["id"])
    stdout = query_bool(request, "stdout")
    stderr = query_bool(request, "stderr")
    if not stdout and not stderr:
        raise InvalidArgument("Bad parameters: you must choose at least one stream")
    timestamps = query_bool(request, "timestamps")
    batches = ctx.runtime.log_batches(
        record.id,
        follow=query_bool(request, "follow"),
        tail=_tail(request),
        since=query_time(request, "since"),
        until=query_time(request, "until"),
        stdout=stdout,
        stderr=stderr,
    )
    tty = record.spec.tty
    response = web.StreamResponse(headers={"Content-Type": _stream_content_type(tty)})
    response.enable_chunked_encoding()
    await response.prepare(request)
    request[STARTED_RESPONSE] = response
    async for batch in batches:
        # One write per batch (a block of the log file), not one per line.
        await response.write(
            b"".join(
                encode_output(
                    entry.stream,
                    entry.time.encode() + b" " + entry.data if timestamps else entry.data,
                    tty=tty,
                )
                for entry in batch
            )
        )
    await response.write_eof()
    return response


# ------------------------------------------------------------------- attach


async def pump(
    connection: HijackedConnection,
    process: ProcessStream,
    *,
    stdin: bool,
    streams: set[str],
    close_stdin: bool,
    detach_keys: bytes | None = None,
    on_detach: Callable[[], None] | None = None,
    after_output: Callable[[], bytes] | None = None,
) -> bool:
    """Copy stdin from the client to the process and its output back, until it ends.

    ``after_output``: what to send once the output has ended (not when the client left or
    the stream failed), before the connection closes (an exec's exit status frame).

    True when the client left with the detach keys (``on_detach`` is called then, before
    the connection closes: closing it may cancel the request's handler).

    When the client closes its side, the process's stdin is closed too only if
    ``close_stdin`` (exec always; attach when the container has StdinOnce) and the
    session has no terminal. With a terminal the session ends there instead, the
    process left running with its stdin open, as Docker's does; so does typing the
    ``detach_keys`` on a terminal (the keys themselves never reach the process).

    Nothing piles up here: one chunk is taken from the process only once the previous
    one is in the socket's buffer (``send`` awaits the drain), so a slow client slows
    the process down (exec: through the guest channel; attach: through the bounded
    OutputBus). A client that accepts nothing for ``DRAIN_TIMEOUT`` seconds is
    disconnected, and its output stream is closed at once (an exec's channel is
    released, an attach unsubscribes) rather than whenever it is collected.
    """
    scanner = DetachScanner(detach_keys) if detach_keys and process.tty else None
    output = process.output()
    detached = False

    async def forward_input() -> None:
        nonlocal detached
        async for chunk in connection.input_chunks():
            if scanner is not None:
                chunk, detached = scanner.feed(chunk)
            if chunk:
                await process.write_stdin(chunk)
            if detached:
                log.debug("client detached with its detach keys")
                if on_detach is not None:
                    on_detach()
                break
        else:
            if scanner is not None and (held := scanner.flush()):
                await process.write_stdin(held)
            if close_stdin and not process.tty:
                await process.close_stdin()
                return
        if process.tty:  # detached, or the terminal's input ended: the session is over
            session_over.set()

    async def forward_output() -> None:
        try:
            async for stream, data in output:
                if stream in streams or process.tty:
                    await connection.send(encode_output(stream, data, tty=process.tty))
            if after_output is not None:
                await connection.send(after_output())
        except (ConnectionError, TimeoutError) as err:
            log.debug("client left a stream: %s", err)
        except HuskError as err:
            log.info("stream ended: %s", err)
            if not process.tty:  # Docker clients print stream 3 as the daemon's error
                with contextlib.suppress(ConnectionError, TimeoutError):
                    await connection.send(frame(SYSTEM_ERROR, f"{err}\n".encode()))

    session_over = asyncio.Event()
    output_task = asyncio.ensure_future(forward_output())
    input_task = asyncio.ensure_future(forward_input()) if stdin else None
    try:
        await _until_either(output_task, session_over)
    finally:
        await _cancel(output_task)
        await _close_iterator(output)
        if input_task is not None:
            input_task.cancel()
            with contextlib.suppress(BaseException):
                await input_task
        await connection.close()
    return detached


async def _until_either(task: asyncio.Task[None], event: asyncio.Event) -> None:
    """Wait until ``task`` ends or ``event`` is set."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for its end.

    Asked again until it ends: before Python 3.12, ``asyncio.wait_for`` (the drain of
    a send) drops a cancellation that arrives just as what it waits for completes.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()


async def _close_iterator(iterator: AsyncIterator[Any]) -> None:
    closer = getattr(iterator, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


def _attach_streams(request: web.Request) -> set[str]:
    return {name for name in ("stdout", "stderr") if query_bool(request, name)}


async def attach_container(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    record = ctx.runtime.get(request.match_info["id"])
    stdin = query_bool(request, "stdin")
    streams = _attach_streams(request)
    stream = query_bool(request, "stream")
    logs = query_bool(request, "logs")
    if not (stream or logs):
        raise InvalidArgument("Bad parameters: you must choose at least one of stream or logs")
    detach_keys = parse_detach_keys(query_str(request, "detachKeys"))
    if stdin and not record.spec.open_stdin:
        stdin = False  # Docker ignores stdin for a container created without OpenStdin
    process = await ctx.runtime.attach(record.id, stdin=stdin, logs=logs, stream=stream)
    connection = await HijackedConnection.take_over(
        request, content_type=_stream_content_type(process.tty)
    )
    close = ctx.stdin_once.get(record.id, False)
    await pump(
        connection,
        process,
        stdin=stdin,
        streams=streams,
        close_stdin=close,
        detach_keys=detach_keys,
        on_detach=lambda: _detach_event(ctx.runtime, record),
    )
    return HijackedResponse()


def _detach_event(runtime: Runtime, record: ContainerRecord) -> None:
    """Docker reports a client's detach as an event of the container."""
    runtime.emit("container", "detach", record.id, name=record.name, image=record.image_ref)


async def attach_websocket(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    record = ctx.runtime.get(request.match_info["id"])
    stdin = query_bool(request, "stdin") and record.spec.open_stdin
    streams = _attach_streams(request)
    detach_keys = parse_detach_keys(query_str(request, "detachKeys"))
    process = await ctx.runtime.attach(
        record.id,
        stdin=stdin,
        logs=query_bool(request, "logs"),
        stream=query_bool(request, "stream"),
    )
    socket = web.WebSocketResponse()
    await socket.prepare(request)
    scanner = DetachScanner(detach_keys) if process.tty else None
    output = process.output()

    async def forward_input() -> None:
        detached = False
        async for message in socket:
            if message.type == WSMsgType.BINARY:
                data = bytes(message.data)
            elif message.type == WSMsgType.TEXT:
                data = message.data.encode()
            else:  # CLOSE, ERROR
                break
            if scanner is not None:
                data, detached = scanner.feed(data)
            if data:
                await process.write_stdin(data)
            if detached:
                _detach_event(ctx.runtime, record)
                break
        if process.tty:  # detached, or the input ended: the session is over, as Docker's
            session_over.set()
        elif ctx.stdin_once.get(record.id, False):
            await process.close_stdin()

    async def forward_output() -> None:
        try:
            async for stream, data in output:
                if stream in streams or process.tty:
                    # send_bytes awaits the drain; a client that takes nothing is cut off.
                    await asyncio.wait_for(socket.send_bytes(data), DRAIN_TIMEOUT)
        except (ConnectionError, TimeoutError) as err:
            log.debug("websocket client left: %s", err)
        except HuskError as err:
            log.info("websocket stream ended: %s", err)

    session_over = asyncio.Event()
    output_task = asyncio.ensure_future(forward_output())
    input_task = asyncio.ensure_future(forward_input()) if stdin else None
    try:
        await _until_either(output_task, session_over)
    finally:
        await _cancel(output_task)
        await _close_iterator(output)
        if input_task is not None:
            input_task.cancel()
            with contextlib.suppress(BaseException):
                await input_task
        await socket.close()
    return socket


# ------------------------------------------------------------------ archive


def go_file_mode(mode: int) -> int:
    """A unix ``st_mode`` as Go's ``os.FileMode`` (what Docker clients decode)."""
    if not stat.S_IFMT(mode):
        return mode  # permission bits only, or already a Go mode
    result = stat.S_IMODE(mode) & 0o777
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFDIR:
        result |= GO_MODE_DIR
    elif kind == stat.S_IFLNK:
        result |= GO_MODE_SYMLINK
    elif kind == stat.S_IFIFO:
        result |= GO_MODE_NAMED_PIPE
    elif kind == stat.S_IFSOCK:
        result |= GO_MODE_SOCKET
    elif kind == stat.S_IFCHR:
        result |= GO_MODE_DEVICE | GO_MODE_CHAR_DEVICE
    elif kind == stat.S_IFBLK:
        result |= GO_MODE_DEVICE
    if mode & stat.S_ISUID:
        result |= GO_MODE_SETUID
    if mode & stat.S_ISGID:
        result |= GO_MODE_SETGID
    if mode & stat.S_ISVTX:
        result |= GO_MODE_STICKY
    return result


def path_stat_header(info: dict[str, Any]) -> str:
    """The base64 JSON of ``X-Docker-Container-Path-Stat``."""
    mtime = info.get("mtime", "")
    if isinstance(mtime, int | float):
        mtime = unix_to_iso(float(mtime))
    document = {
        "name": str(info.get("name", "")),
        "size": int(info.get("size", 0)),
        "mode": go_file_mode(int(info.get("mode", 0))),
        "mtime": str(mtime),
        "linkTarget": str(info.get("linkTarget", "") or info.get("link_target", "") or ""),
    }
    return base64.b64encode(json.dumps(document).encode()).decode()


def _archive_path(request: web.Request) -> str:
    path = query_str(request, "path")
    if not path:
        raise InvalidArgument("Bad parameters: path is required")
    if "\0" in path:
        raise InvalidArgument(f"Bad parameters: path {path!r} contains a NUL byte")
    # As Docker: a relative path is read from the container's root.
    return path if path.startswith("/") else "/" + path


async def archive_head(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    record = ctx.runtime.get(request.match_info["id"])
    info = await ctx.runtime.stat_path(record.id, _archive_path(request))
    return web.Response(status=200, headers={PATH_STAT_HEADER: path_stat_header(info)})


async def archive_get(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    record = ctx.runtime.get(request.match_info["id"])
    chunks, info = await ctx.runtime.get_archive(record.id, _archive_path(request))
    response = web.StreamResponse(
        headers={"Content-Type": "application/x-tar", PATH_STAT_HEADER: path_stat_header(info)}
    )
    response.enable_chunked_encoding()
    iterator = aiter(chunks)
    try:
        # The first chunk comes before the status line, so an early failure is still a
        # proper error; a failure later cuts the connection (the client sees a short read).
        first = await anext(iterator, b"")
        await response.prepare(request)
        request[STARTED_RESPONSE] = response
        await response.write(first)
        try:
            async for chunk in iterator:
                await response.write(chunk)
        except HuskError as err:
            log.warning("archive of %s failed mid-stream: %s", record.id[:12], err)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("archive stream failed") from None
    finally:
        closer = getattr(chunks, "aclose", None)
        if closer is not None:
            with contextlib.suppress(BaseException):
                await closer()
    await response.write_eof()
    return response


async def _body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(UPLOAD_CHUNK):
        yield chunk


async def archive_put(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    record = ctx.runtime.get(request.match_info["id"])
    await ctx.runtime.put_archive(record.id, _archive_path(request), _body_chunks(request))
    return web.Response(status=200)


async def _send_tar(
    request: web.Request, container_id: str, chunks: AsyncIterator[bytes], what: str
) -> web.StreamResponse:
    """Streams a tar from the guest as it comes, untouched (it is never read here)."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
    response.enable_chunked_encoding()
    iterator = aiter(chunks)
    try:
        # As archive_get: an early failure is still a proper error.
        first = await anext(iterator, b"")
        await response.prepare(request)
        request[STARTED_RESPONSE] = response
        await response.write(first)
        try:
            async for chunk in iterator:
                await response.write(chunk)
        except HuskError as err:
            log.warning("%s of %s failed mid-stream: %s", what, container_id[:12], err)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError(f"{what} stream failed") from None
    finally:
        closer = getattr(chunks, "aclose", None)
        if closer is not None:
            with contextlib.suppress(BaseException):
                await closer()
    await response.write_eof()
    return response


async def container_export(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    record = ctx.runtime.get(request.match_info["id"])
    return await _send_tar(request, record.id, ctx.runtime.export(record.id), "export")


async def container_changes(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    record = ctx.runtime.get(request.match_info["id"])
    return web.json_response(await ctx.runtime.changes(record.id))


def register(app: web.Application) -> None:
    add_route(app, "GET", "/containers/{id}/logs", container_logs)
    add_route(app, "POST", "/containers/{id}/attach", attach_container)
    add_route(app, "GET", "/containers/{id}/attach/ws", attach_websocket)
    add_route(app, "HEAD", "/containers/{id}/archive", archive_head)
    add_route(app, "GET", "/containers/{id}/archive", archive_get)
    add_route(app, "PUT", "/containers/{id}/archive", archive_put)
    add_route(app, "GET", "/containers/{id}/export", container_export)
    add_route(app, "GET", "/containers/{id}/changes", container_changes)
