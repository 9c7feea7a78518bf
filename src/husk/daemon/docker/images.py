"""Image endpoints: list, inspect, history, pull, push, tag, remove, prune, load, get."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fnmatch
import functools
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from husk.build.lineage import intermediate_ids
from husk.daemon.docker import shapes
from husk.daemon.docker.context import ApiContext, context
from husk.daemon.docker.errors import STARTED_RESPONSE, json_reply
from husk.daemon.docker.params import (
    filters_of,
    iso_to_unix,
    label_matches,
    query_bool,
    query_str,
)
from husk.daemon.docker.platforms import check_platforms
from husk.daemon.docker.routing import add_route, api_version
from husk.daemon.docker.streams import json_lines_response
from husk.errors import HuskError, InvalidArgument, NotFound, NotSupported
from husk.oci.auth import Credentials
from husk.oci.inspect import human_size
from husk.oci.pull import PullEvent
from husk.oci.push import PushEvent
from husk.oci.reference import Reference, names_an_id, parse_reference
from husk.oci.registry import RegistryClient
from husk.oci.store import ImageRecord, ImageStore
from husk.runtime.images import ImageService, ImageUser
from husk.runtime.runtime import Event

if TYPE_CHECKING:
    from husk.runtime.runtime import Runtime

LIST_FILTERS = {"dangling", "label", "reference", "before", "since"}
PRUNE_FILTERS = {"dangling", "label", "until"}
PROGRESS_INTERVAL = 0.1  # seconds between two "Downloading" messages of one layer
STREAM_CHUNK = 1 << 20


# ------------------------------------------------------------------ helpers


def service_for(runtime: Runtime) -> ImageService:
    """The image service of the daemon's runtime: its store, and its containers as users."""

    def users() -> list[ImageUser]:
        return [ImageUser(c.id, c.image_id, bool(c.state.running)) for c in runtime.list(all=True)]

    return ImageService(runtime.images, users)


def images_of(ctx: ApiContext) -> ImageService:
    if ctx.image_service is None:
        ctx.image_service = service_for(ctx.runtime)
    return ctx.image_service


def find_image(store: ImageStore, name: str) -> ImageRecord:
    """The image ``name`` names (name, id, id prefix or digest), with Docker's 404 message."""
    try:
        return store.resolve(name)
    except NotFound:
        raise NotFound(f"No such image: {name}") from None
    except InvalidArgument:
        raise NotFound(f"No such image: {name}") from None


def registry_credentials(request: web.Request) -> Credentials | None:
    """The credentials a client sent in ``X-Registry-Auth`` (base64url JSON), if any."""
    header = request.headers.get("X-Registry-Auth", "").strip()
    if not header:
        return None
    padded = header + "=" * (-len(header) % 4)
    try:
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, RecursionError):
        raise InvalidArgument("invalid X-Registry-Auth header: not base64-encoded JSON") from None
    if not isinstance(data, dict):
        return None
    username = str(data.get("username") or "")
    password = str(data.get("password") or "")
    token = str(data.get("identitytoken") or "")
    auth = str(data.get("auth") or "")
    if auth and not username:
        with contextlib.suppress(binascii.Error, ValueError):
            username, _, password = base64.b64decode(auth).decode().partition(":")
    if not username and not token:
        return None
    return Credentials(username=username, password=password, identity_token=token)


def image_event(ctx: ApiContext, action: str, image_id: str, name: str = "") -> None:
    attributes = {"name": name} if name else {}
    ctx.events.publish(Event("image", action, name or image_id, attributes, time.time_ns()))


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _progress_bar(current: int, total: int) -> str:
    if total <= 0:
        return f"{human_size(current)}"
    width = 50
    filled = min(width, int(width * current / total))
    arrow = ">" if filled < width else ""
    bar = "=" * max(0, filled - 1 if arrow else filled) + arrow
    return f"[{bar:<{width}}] {human_size(current)}/{human_size(total)}"


def _with_tag(image: str, tag: str) -> str:
    """``fromImage`` plus ``tag`` (a tag or a digest), the tag replacing any in the image."""
    if not tag:
        return image
    ref = parse_reference(image, default_tag=False)
    if tag.startswith("sha256:"):
        return f"{ref.repository}@{tag}"
    return f"{ref.repository}:{tag}"


class JsonStream:
    """A streamed reply of JSON messages that turns errors into in-stream error messages.

    Nothing is sent until the first message, so an error before it still gets a
    proper HTTP status (what Docker clients expect for e.g. an unknown image).
    """

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def send(self, message: dict[str, Any]) -> None:
        if self.response is None:
            self.response = await json_lines_response(self.request)
            self.request[STARTED_RESPONSE] = self.response
        await self.response.write(json.dumps(message).encode() + b"\r\n")

    async def fail(self, err: HuskError) -> web.StreamResponse:
        if self.response is None:
            raise err
        await self.send({"errorDetail": {"message": err.message}, "error": err.message})
        return await self.finish()

    async def finish(self) -> web.StreamResponse:
        if self.response is None:
            self.response = await json_lines_response(self.request)
        await self.response.write_eof()
        return self.response


async def _run_with_messages(
    stream: JsonStream,
    work: Callable[[Callable[[dict[str, Any]], None]], Awaitable[Any]],
) -> Any:
    """Run ``work`` (which reports messages through its callback) and stream the messages."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    task = asyncio.ensure_future(work(queue.put_nowait))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while True:
            message = await queue.get()
            if message is None:
                break
            await stream.send(message)
        return await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# --------------------------------------------------------------------- list


def _created(record: ImageRecord) -> float:
    return iso_to_unix(record.created)


def _matching_names(names: list[str], patterns: list[str]) -> list[str]:
    """The names (``repo:tag``) a ``reference`` filter pattern matches, as Docker does."""
    matched = []
    for name in names:
        if "@" in name:
            repository = name.split("@", 1)[0]
        elif ":" in name.split("/")[-1]:
            repository = name.rsplit(":", 1)[0]
        else:
            repository = name
        if any(
            fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(repository, p) for p in patterns
        ):
            matched.append(name)
    return matched


async def list_images(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    filters = filters_of(request, LIST_FILTERS)
    service = images_of(ctx)
    records = service.all()
    if not query_bool(request, "all"):  # a build's intermediate images, as Docker hides them
        hidden = intermediate_ids(records)
        records = [r for r in records if r.id not in hidden]
    use_count = service.use_counts()
    if "dangling" in filters:
        wanted = filters["dangling"][-1].lower() in ("true", "1")
        records = [r for r in records if (not shapes.repo_tags(r)) == wanted]
    if "label" in filters:
        records = [r for r in records if label_matches(r.labels, filters["label"])]
    if "reference" in filters:
        records = [r for r in records if _matching_names(shapes.repo_tags(r), filters["reference"])]
    for key in ("before", "since"):
        for value in filters.get(key, []):
            pivot = _created(service.find(value))
            records = [
                r
                for r in records
                if (_created(r) < pivot if key == "before" else _created(r) > pivot)
            ]
    version = api_version(request)
    summaries = [
        shapes.image_summary(r, containers=use_count.get(r.id, 0), version=version) for r in records
    ]
    if "reference" in filters:
        for summary in summaries:  # Docker lists only the names that matched
            summary["RepoTags"] = _matching_names(summary["RepoTags"], filters["reference"])
            summary["RepoDigests"] = _matching_names(summary["RepoDigests"], filters["reference"])
    if not query_bool(request, "shared-size"):
        for summary in summaries:
            summary["SharedSize"] = -1
    return json_reply(summaries)


async def inspect_image(request: web.Request) -> web.StreamResponse:
    record = images_of(context(request)).find(request.match_info["name"])
    check_platforms(request, record, request.match_info["name"])
    return json_reply(shapes.image_inspect(record, version=api_version(request)))


async def image_history(request: web.Request) -> web.StreamResponse:
    record = images_of(context(request)).find(request.match_info["name"])
    return json_reply(shapes.image_history(record))


# --------------------------------------------------------------------- pull


class _PullMessages:
    """Turns husk's per-blob pull events into Docker's progress messages."""

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        self.emit = emit
        self.last_sent: dict[str, float] = {}
        self.downloaded = False

    def __call__(self, event: PullEvent) -> None:
        if event.status == "resolved":
            return
        layer = _short(event.digest)
        if event.status == "waiting":
            self.emit({"status": "Pulling fs layer", "progressDetail": {}, "id": layer})
        elif event.status == "exists":
            self.emit({"status": "Already exists", "progressDetail": {}, "id": layer})
        elif event.status == "downloading":
            now = time.monotonic()
            if now - self.last_sent.get(layer, 0.0) < PROGRESS_INTERVAL and (
                event.completed < event.total
            ):
                return
            self.last_sent[layer] = now
            self.emit(
                {
                    "status": "Downloading",
                    "progressDetail": {"current": event.completed, "total": event.total},
                    "progress": _progress_bar(event.completed, event.total),
                    "id": layer,
                }
            )
        elif event.status == "done":
            self.downloaded = True
            self.emit({"status": "Download complete", "progressDetail": {}, "id": layer})
            self.emit({"status": "Pull complete", "progressDetail": {}, "id": layer})


async def pull_image(
    ctx: ApiContext,
    reference: str,
    *,
    platform: str | None,
    credentials: Credentials | None,
    progress: Callable[[PullEvent], None],
    policy: str = "always",
) -> ImageRecord:
    factory = None
    if credentials is not None:

        def factory(domain: str) -> RegistryClient:
            return RegistryClient(domain, credentials=credentials)

    record = await images_of(ctx).pull(
        reference,
        policy=policy,
        platform=platform or None,
        progress=progress,
        client_factory=factory,
    )
    image_event(ctx, "pull", record.id, reference)
    return record


async def create_image(request: web.Request) -> web.StreamResponse:
    if query_str(request, "fromSrc"):
        return await import_image(request)
    from_image = query_str(request, "fromImage")
    if not from_image:
        raise InvalidArgument("fromImage or fromSrc is required")
    if query_str(request, "repo") and not query_str(request, "fromSrc"):
        raise InvalidArgument("repo is only valid with fromSrc")
    if names_an_id(from_image):
        raise InvalidArgument(f"cannot pull an image by its id: {from_image}")
    ctx = context(request)
    reference = _with_tag(from_image, query_str(request, "tag"))
    ref = parse_reference(reference)
    platform = query_str(request, "platform") or None
    credentials = registry_credentials(request)
    # husk's own extension (Docker clients never send it): ``husk pull --policy``.
    policy = query_str(request, "policy") or "always"
    before: str | None = None
    with contextlib.suppress(NotFound, InvalidArgument):
        before = images_of(ctx).find(str(ref)).manifest_digest
    stream = JsonStream(request)
    shown = shapes.familiar(str(ref))

    async def work(emit: Callable[[dict[str, Any]], None]) -> ImageRecord:
        messages = _PullMessages(emit)
        started = False

        def on_event(event: PullEvent) -> None:
            nonlocal started
            if not started:
                started = True
                emit({"status": f"Pulling from {ref.path}", "id": ref.tag or ref.ref})
            messages(event)

        record = await pull_image(
            ctx,
            str(ref),
            platform=platform,
            credentials=credentials,
            progress=on_event,
            policy=policy,
        )
        if not started:
            emit({"status": f"Pulling from {ref.path}", "id": ref.tag or ref.ref})
        emit({"status": f"Digest: {record.manifest_digest}"})
        if before == record.manifest_digest and not messages.downloaded:
            emit({"status": f"Status: Image is up to date for {shown}"})
        else:
            emit({"status": f"Status: Downloaded newer image for {shown}"})
        return record

    try:
        await _run_with_messages(stream, work)
    except HuskError as err:
        return await stream.fail(err)
    return await stream.finish()


async def import_image(request: web.Request) -> web.StreamResponse:
    source = query_str(request, "fromSrc")
    if source != "-":
        raise NotSupported("husk imports only an uploaded tarball (fromSrc=-), not a URL")
    ctx = context(request)
    repo = query_str(request, "repo")
    reference = _with_tag(repo, query_str(request, "tag")) if repo else None
    changes = request.query.getall("changes", [])
    message = query_str(request, "message")
    platform = query_str(request, "platform") or None
    service = images_of(ctx)
    async with _uploaded_body(request, service.store) as path:
        record = await asyncio.to_thread(
            functools.partial(
                service.import_rootfs,
                path,
                reference,
                changes=changes,
                message=message,
                platform=platform,
            )
        )
    image_event(ctx, "import", record.id, reference or "")
    stream = JsonStream(request)
    await stream.send({"status": record.id})
    return await stream.finish()


@contextlib.asynccontextmanager
async def _uploaded_body(request: web.Request, store: ImageStore) -> AsyncIterator[Path]:
    """The request body, saved to a file in the store's ingest directory."""
    fd, name = tempfile.mkstemp(dir=store.ingest_dir, prefix="upload-")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            async for chunk in request.content.iter_chunked(STREAM_CHUNK):
                await asyncio.to_thread(handle.write, chunk)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --------------------------------------------------------------------- push


class _PushMessages:
    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        self.emit = emit
        self.last_sent: dict[str, float] = {}

    def __call__(self, event: PushEvent) -> None:
        layer = _short(event.digest)
        if event.status == "waiting":
            self.emit({"status": "Preparing", "progressDetail": {}, "id": layer})
        elif event.status == "exists":
            self.emit({"status": "Layer already exists", "progressDetail": {}, "id": layer})
        elif event.status == "mounted":
            self.emit(
                {"status": "Mounted from another repository", "progressDetail": {}, "id": layer}
            )
        elif event.status == "uploading":
            now = time.monotonic()
            if now - self.last_sent.get(layer, 0.0) < PROGRESS_INTERVAL:
                return
            self.last_sent[layer] = now
            self.emit(
                {
                    "status": "Pushing",
                    "progressDetail": {"current": event.completed, "total": event.total},
                    "progress": _progress_bar(event.completed, event.total),
                    "id": layer,
                }
            )
        elif event.status == "done":
            self.emit({"status": "Pushed", "progressDetail": {}, "id": layer})


def _push_targets(store: ImageStore, name: str, tag: str) -> list[Reference]:
    if tag:
        return [parse_reference(_with_tag(name, tag))]
    ref = parse_reference(name, default_tag=False)
    if ref.tag is not None or ref.digest is not None:
        return [ref]
    names = sorted({n for record in store.list_images() for n in record.names if "@" not in n})
    targets = [parse_reference(n) for n in names if parse_reference(n).repository == ref.repository]
    if not targets:
        raise NotFound(f"An image does not exist locally with the tag: {shapes.familiar(name)}")
    return targets


def _chunk_size(request: web.Request) -> int | None:
    text = query_str(request, "chunk-size")
    if not text:
        return None
    if not text.isdigit() or int(text) <= 0:
        raise InvalidArgument(f"chunk-size must be a positive number of bytes, not {text!r}")
    return int(text)


async def push_image(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    service = images_of(ctx)
    name = request.match_info["name"]
    # ``destination`` and ``chunk-size`` are husk's own extensions (``husk push SRC DEST``):
    # push the image ``name`` under another name, without tagging it locally.
    destination = query_str(request, "destination")
    chunk_size = _chunk_size(request)
    if destination:
        service.find(name)
        pushes = [(name, parse_reference(destination))]
    else:
        targets = _push_targets(service.store, name, query_str(request, "tag"))
        for target in targets:
            service.find(str(target))
        pushes = [(str(target), target) for target in targets]
    credentials = registry_credentials(request)
    stream = JsonStream(request)

    async def work(emit: Callable[[dict[str, Any]], None]) -> None:
        repository = shapes.familiar(pushes[0][1].repository)
        emit({"status": f"The push refers to repository [{repository}]"})
        factory = None
        if credentials is not None:

            def factory(domain: str) -> RegistryClient:
                return RegistryClient(domain, credentials=credentials)

        for source, target in pushes:
            result = await service.push(
                source,
                destination=str(target) if destination else None,
                progress=_PushMessages(emit),
                chunk_size=chunk_size,
                client_factory=factory,
            )
            tag = target.tag or "latest"
            emit({"status": f"{tag}: digest: {result.digest} size: {result.size}"})
            emit(
                {
                    "progressDetail": {},
                    "aux": {"Tag": tag, "Digest": result.digest, "Size": result.size},
                }
            )
            image_event(ctx, "push", result.digest, str(target))

    try:
        await _run_with_messages(stream, work)
    except HuskError as err:
        return await stream.fail(err)
    return await stream.finish()


# ------------------------------------------------------- tag, remove, prune


async def tag_image(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    repo = query_str(request, "repo")
    if not repo:
        raise InvalidArgument("repository name (repo) is required")
    target = _with_tag(repo, query_str(request, "tag") or "latest")
    record, name = images_of(ctx).tag(request.match_info["name"], target)
    image_event(ctx, "tag", record.id, name)
    return web.Response(status=201)


async def delete_image(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    service = images_of(ctx)
    name = request.match_info["name"]
    record = service.find(name)
    check_platforms(request, record, name)
    result = service.remove(name, force=query_bool(request, "force"))
    items: list[dict[str, str]] = [{"Untagged": shapes.familiar(n)} for n in result.untagged]
    items += [{"Deleted": d} for d in result.deleted]
    for untagged in result.untagged:
        image_event(ctx, "untag", record.id, untagged)
    for deleted in result.deleted:
        image_event(ctx, "delete", deleted)
    return json_reply(items)


async def prune_images(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    filters = filters_of(request, PRUNE_FILTERS)
    if "label" in filters or "until" in filters:
        raise NotSupported("husk prunes images by the dangling filter only")
    dangling = filters.get("dangling", ["true"])[-1].lower() in ("true", "1")
    service = images_of(ctx)
    result = await asyncio.to_thread(functools.partial(service.prune, all_images=not dangling))
    for deleted in result.deleted_images:
        image_event(ctx, "delete", deleted)
    return json_reply(
        {
            "ImagesDeleted": [{"Deleted": d} for d in result.deleted_images] or None,
            "SpaceReclaimed": result.reclaimed_bytes,
        }
    )


# --------------------------------------------------------------- load, get


async def load_images(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    service = images_of(ctx)
    query_bool(request, "quiet")  # validated; husk loads without progress bars either way
    # ``name`` is husk's own extension (``husk load --name``): a name for an image whose
    # archive carries none. ``platform``: os/arch[/variant] or Docker's JSON object.
    name = query_str(request, "name") or None
    platform = _platform_text(query_str(request, "platform"))
    async with _uploaded_body(request, service.store) as path:
        records = await asyncio.to_thread(
            functools.partial(service.load, path, name=name, platform=platform)
        )
    stream = JsonStream(request)
    for record in records:
        names = shapes.repo_tags(record)
        image_event(ctx, "load", record.id, names[0] if names else "")
        if names:
            for name in names:
                await stream.send({"stream": f"Loaded image: {name}\n"})
        else:
            await stream.send({"stream": f"Loaded image ID: {record.id}\n"})
    return await stream.finish()


async def _send_archive(request: web.Request, names: list[str]) -> web.StreamResponse:
    ctx = context(request)
    service = images_of(ctx)
    if not names:
        raise InvalidArgument("no image given to export")
    for name in names:
        service.find(name)
    # ``format`` is husk's own extension (``husk save --format oci-archive``).
    archive_format = query_str(request, "format") or "docker-archive"
    fd, tmp = tempfile.mkstemp(dir=service.store.ingest_dir, prefix="export-")
    os.close(fd)
    path = Path(tmp)
    try:
        await asyncio.to_thread(functools.partial(service.save, names, path, format=archive_format))
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        response.content_length = path.stat().st_size
        await response.prepare(request)
        request[STARTED_RESPONSE] = response
        with path.open("rb") as handle:
            while chunk := await asyncio.to_thread(handle.read, STREAM_CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _platform_text(value: str) -> str | None:
    """``os/arch[/variant]`` from either that text or Docker's JSON platform object."""
    if not value.startswith("{"):
        return value or None
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError):  # a deep nest of brackets: RecursionError
        raise InvalidArgument(f"invalid platform {value!r}: not JSON") from None
    if not isinstance(doc, dict) or not doc.get("os") or not doc.get("architecture"):
        raise InvalidArgument(f"invalid platform {value!r}: needs os and architecture")
    parts = [str(doc["os"]), str(doc["architecture"]), str(doc.get("variant") or "")]
    return "/".join(p for p in parts if p)


async def get_images(request: web.Request) -> web.StreamResponse:
    return await _send_archive(request, request.query.getall("names", []))


async def get_image(request: web.Request) -> web.StreamResponse:
    return await _send_archive(request, [request.match_info["name"]])


async def search_images(request: web.Request) -> web.StreamResponse:
    raise NotSupported("husk does not search registries; pull an image by its full name")


def register(app: web.Application) -> None:
    add_route(app, "GET", "/images/json", list_images)
    add_route(app, "POST", "/images/create", create_image)
    add_route(app, "POST", "/images/load", load_images)
    add_route(app, "GET", "/images/get", get_images)
    add_route(app, "POST", "/images/prune", prune_images)
    add_route(app, "GET", "/images/search", search_images)
    add_route(app, "GET", "/images/{name:.+}/json", inspect_image)
    add_route(app, "GET", "/images/{name:.+}/history", image_history)
    add_route(app, "GET", "/images/{name:.+}/get", get_image)
    add_route(app, "POST", "/images/{name:.+}/tag", tag_image)
    add_route(app, "POST", "/images/{name:.+}/push", push_image)
    add_route(app, "DELETE", "/images/{name:.+}", delete_image)
