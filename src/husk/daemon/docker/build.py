"""``POST /build`` (the classic builder's protocol), ``POST /build/prune``.

The body is the context as a tar (plain or compressed); the reply is a stream of JSON
messages: ``{"stream": text}`` for output, ``{"aux": {"ID": id}}`` for the image, and
``{"error": …, "errorDetail": {"code": …, "message": …}}`` when the build fails (the
code is a failed RUN's exit code, which the docker CLI exits with).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

from aiohttp import web

from husk.build.cache import BuildCache
from husk.build.context import extract_context
from husk.build.executor import Builder, BuildFailed, BuildOptions
from husk.daemon.docker.context import context
from husk.daemon.docker.errors import json_reply
from husk.daemon.docker.images import JsonStream
from husk.daemon.docker.params import query_bool, query_str
from husk.daemon.docker.routing import add_route
from husk.errors import HuskError, InvalidArgument, NotSupported
from husk.oci.platform import host_platform, parse_platform

STREAM_CHUNK = 256 * 1024
MAX_CONTEXT_BYTES = 16 * 1024**3
MAX_DOCKERFILE = 4 * 1024 * 1024
# Resource options of RUN containers Docker takes; husk takes them only at their defaults.
DEFAULT_ONLY = {
    "cpuperiod": "0",
    "cpuquota": "0",
    "cpushares": "0",
    "memory": "0",
    "memswap": "0",
    "shmsize": "0",
    "cgroupparent": "",
    "cpusetcpus": "",
    "cpusetmems": "",
    "isolation": "",
    "extrahosts": "",
}


def _json_map(request: web.Request, name: str) -> dict[str, str]:
    text = request.query.get(name, "")
    if not text or text == "null":
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # a deep nest of brackets: RecursionError
        raise InvalidArgument(f"invalid {name}: not JSON") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"invalid {name}: expected an object")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _check_options(request: web.Request) -> None:
    for name, default in DEFAULT_ONLY.items():
        value = request.query.get(name, default)
        if value not in (default, "0", "", "null", "[]"):
            raise NotSupported(f"build option {name}={value} is not supported by husk build")
    if request.query.get("remote"):
        raise NotSupported("a remote build context is not supported by husk build")
    if request.query.get("version", "1") == "2":
        raise NotSupported("BuildKit builds are not supported by husk: use DOCKER_BUILDKIT=0")
    platform = request.query.get("platform", "")
    if platform and parse_platform(platform) != host_platform():
        raise NotSupported(f"building for platform {platform} is not supported by husk build")
    if query_bool(request, "squash"):
        raise NotSupported("--squash is not supported by husk build")


async def _save_body(request: web.Request, directory: Path) -> Path:
    path = directory / "context.tar"
    written = 0
    with open(path, "wb") as handle:
        async for chunk in request.content.iter_chunked(STREAM_CHUNK):
            written += len(chunk)
            if written > MAX_CONTEXT_BYTES:
                raise InvalidArgument(f"the build context is larger than {MAX_CONTEXT_BYTES} bytes")
            await asyncio.to_thread(handle.write, chunk)
    return path


def _dockerfile(root: Path, name: str) -> str:
    name = name or "Dockerfile"
    if "\0" in name:
        raise InvalidArgument(f"Cannot locate specified Dockerfile: {name!r}: a NUL byte")
    try:
        path = Path(os.path.realpath(root / name.lstrip("/")))
        if root.resolve() not in path.parents:
            raise InvalidArgument(f"the Dockerfile {name} is outside the build context")
        if not path.is_file():
            raise InvalidArgument(f"Cannot locate specified Dockerfile: {name}")
        if path.stat().st_size > MAX_DOCKERFILE:
            raise InvalidArgument(f"the Dockerfile is larger than {MAX_DOCKERFILE} bytes")
        return path.read_text(errors="replace")
    except OSError as err:  # a name no file can have (ENAMETOOLONG), or not readable
        raise InvalidArgument(
            f"Cannot locate specified Dockerfile: {name[:200]}: {err.strerror}"
        ) from None


async def build(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    _check_options(request)
    quiet = query_bool(request, "q")
    tags = request.query.getall("t", [])
    store = ctx.runtime.images
    stream = JsonStream(request)
    with tempfile.TemporaryDirectory(dir=store.ingest_dir, prefix="build-") as tmp:
        work = Path(tmp)
        raw = await _save_body(request, work)
        root = work / "context"
        root.mkdir()
        with open(raw, "rb") as handle:
            await asyncio.to_thread(extract_context, handle, root)
        raw.unlink()
        options = BuildOptions(
            dockerfile=_dockerfile(root, query_str(request, "dockerfile")),
            context=root,
            tags=tags,
            build_args=_json_map(request, "buildargs"),
            target=query_str(request, "target"),
            no_cache=query_bool(request, "nocache"),
            pull=query_bool(request, "pull"),
            labels=_json_map(request, "labels"),
            network=query_str(request, "networkmode")
            if query_str(request, "networkmode") not in ("", "default")
            else "",
        )

        async def output(text: str) -> None:
            if text and not quiet:
                await stream.send({"stream": text})

        try:
            image = await Builder(ctx.runtime, output).build(options)
        except BuildFailed as err:
            await stream.send(
                {"errorDetail": {"code": err.code, "message": err.message}, "error": err.message}
            )
            return await stream.finish()
        except HuskError as err:
            return await stream.fail(err)
    await stream.send({"aux": {"ID": image.id}})
    if quiet:
        await stream.send({"stream": image.id + "\n"})
    return await stream.finish()


async def prune_build_cache(request: web.Request) -> web.StreamResponse:
    """Forgets the build cache (its images stay until pruned as images are)."""
    count = await asyncio.to_thread(BuildCache().prune)
    return json_reply({"CachesDeleted": [] if count else None, "SpaceReclaimed": 0})


def register(app: web.Application) -> None:
    add_route(app, "POST", "/build", build)
    add_route(app, "POST", "/build/prune", prune_build_cache)
