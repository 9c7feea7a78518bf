"""Image operations through the daemon: list, inspect, pull, tag, remove, prune, load,
save, import, and building boot templates.

Every image command goes through the daemon's image service, the one place with
the rules (only the daemon knows which containers use an image: Docker's rule is
that an image a container uses, running or stopped, is kept).
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, TextIO
from urllib.parse import urlencode

from husk import errors
from husk.client.http import ApiClient, quote

PULL_TIMEOUT = 3600.0
LOAD_TIMEOUT = 3600.0
TEMPLATE_TIMEOUT = 1800.0  # a template boots a VM: minutes under TCG on a busy host


def split_reference(reference: str) -> tuple[str, str]:
    """(fromImage, tag) as the API's ``/images/create`` takes them; a digest is the tag."""
    name, at, digest = reference.partition("@")
    if at:
        return name, digest
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, "latest"


def image_exists(api: ApiClient, reference: str) -> bool:
    try:
        api.get(f"/images/{quote(reference)}/json", timeout=60)
    except errors.NotFound:
        return False
    return True


def remove_image(api: ApiClient, reference: str, *, force: bool = False) -> list[str]:
    """``DELETE /images/{name}``: Docker's "Untagged: …" / "Deleted: …" lines."""
    items = api.delete(f"/images/{quote(reference)}", {"force": force}, timeout=600) or []
    lines: list[str] = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            lines += [f"{key}: {value}" for key, value in item.items()]
    return lines


def prune_images(api: ApiClient, *, all_images: bool = False) -> dict[str, Any]:
    """``POST /images/prune``: unused images (with ``all_images``) or dangling ones only."""
    filters = {"dangling": ["false" if all_images else "true"]}
    result = api.post("/images/prune", {"filters": filters}, timeout=600)
    return result if isinstance(result, dict) else {}


def pull(
    api: ApiClient,
    reference: str,
    *,
    platform: str | None = None,
    progress: TextIO | None = None,
) -> None:
    """Pull through the daemon, printing Docker-style status lines to ``progress``."""
    out = progress if progress is not None else sys.stderr

    def write(line: str) -> None:
        out.write(f"{line}\n")
        out.flush()

    pull_image(api, reference, platform=platform, on_line=write)


def pull_image(
    api: ApiClient,
    reference: str,
    *,
    platform: str | None = None,
    policy: str | None = None,
    on_line: Callable[[str], None],
) -> None:
    """``POST /images/create``; each status line (no byte counts) goes to ``on_line``.

    ``policy`` is husk's own extension (missing, never, newer; Docker's API always pulls).
    """
    # lazy: CLI start-up (`husk run` loads this module; the reference regexes cost ~1.5 ms)
    from husk.oci.reference import names_an_id

    if names_an_id(reference):
        # An id names no registry image: never asked of a registry as ``sha256:<tag>``.
        raise errors.NotFound(f"No such image: {reference}")
    image, tag = split_reference(reference)
    query = {"fromImage": image, "tag": tag, "platform": platform, "policy": policy}
    with api.open(
        "POST",
        "/images/create",
        query=query,
        headers=registry_auth_header(reference),
        timeout=PULL_TIMEOUT,
    ) as response:
        for message in _messages(response.iter_lines()):
            if message.get("error"):
                raise errors.PullFailed(str(message["error"]))
            line = _status_line(message)
            if line:
                on_line(line)


def _status_line(message: dict[str, object]) -> str:
    detail = message.get("progressDetail")
    if isinstance(detail, dict) and detail.get("current"):
        return ""  # byte counts: a terminal UI's business, not a log's
    status = str(message.get("status") or "").strip()
    if not status:
        return ""
    ident = message.get("id")
    return f"{ident}: {status}" if ident else status


def list_images(api: ApiClient, *, show_all: bool = False) -> list[dict[str, Any]]:
    """``GET /images/json``: one summary per image, newest first (``show_all``: a build's
    intermediate images too)."""
    summaries = api.get("/images/json", {"all": True} if show_all else None)
    return [s for s in summaries if isinstance(s, dict)] if isinstance(summaries, list) else []


def inspect_image(api: ApiClient, reference: str) -> dict[str, Any]:
    document = api.get(f"/images/{quote(reference)}/json", timeout=60)
    if not isinstance(document, dict):
        raise errors.Internal(f"the husk daemon sent no inspect document for {reference}")
    return document


def tag_image(api: ApiClient, source: str, target: str) -> None:
    """``POST /images/{source}/tag``: the daemon parses ``target`` (``repo[:tag]``)."""
    repository, tag = split_reference(target)
    if tag.startswith("sha256:"):
        raise errors.InvalidArgument(f"refusing to create a tag with a digest reference: {target}")
    api.post(f"/images/{quote(source)}/tag", {"repo": repository, "tag": tag})


def load_images(
    api: ApiClient, archive: BinaryIO, *, name: str | None = None, platform: str | None = None
) -> list[str]:
    """``POST /images/load``, the archive streamed from ``archive``; the daemon's lines."""
    query = {"name": name, "platform": platform}
    lines: list[str] = []
    with api.open(
        "POST",
        "/images/load",
        query=query,
        body=archive,
        headers={"Content-Type": "application/x-tar"},
        timeout=LOAD_TIMEOUT,
    ) as response:
        for message in _messages(response.iter_lines()):
            if message.get("error"):
                raise errors.HuskError(str(message["error"]))
            text = str(message.get("stream") or "").rstrip("\n")
            if text:
                lines.append(text)
    return lines


def save_images(
    api: ApiClient, references: list[str], output: BinaryIO, *, archive_format: str
) -> None:
    """``GET /images/get``: the archive written to ``output`` as it arrives."""
    # ``names`` repeats, as Docker's API takes it (encode_query would send a JSON list).
    query = urlencode([("names", r) for r in references] + [("format", archive_format)])
    with api.open("GET", f"/images/get?{query}", timeout=LOAD_TIMEOUT) as response:
        for chunk in response.iter_body():
            output.write(chunk)


def import_rootfs(
    api: ApiClient,
    source: BinaryIO,
    reference: str | None,
    *,
    changes: tuple[str, ...] = (),
    message: str = "",
    platform: str | None = None,
) -> str:
    """``POST /images/create?fromSrc=-``: a single-layer image of a rootfs tarball; its id."""
    pairs = [("fromSrc", "-"), *(("changes", change) for change in changes)]
    if message:
        pairs.append(("message", message))
    if platform:
        pairs.append(("platform", platform))
    if reference is not None:
        repository, tag = split_reference(reference)
        pairs += [("repo", repository), ("tag", tag)]
    image_id = ""
    # ``changes`` repeats, as Docker's API takes it (encode_query would send a JSON list).
    with api.open(
        "POST",
        f"/images/create?{urlencode(pairs)}",
        body=source,
        headers={"Content-Type": "application/x-tar"},
        timeout=LOAD_TIMEOUT,
    ) as response:
        for item in _messages(response.iter_lines()):
            if item.get("error"):
                raise errors.HuskError(str(item["error"]))
            image_id = str(item.get("status") or image_id)
    return image_id


def build_template(
    api: ApiClient, *, memory_bytes: int, cpus: float, binds: int, rebuild: bool
) -> dict[str, Any]:
    """``POST /husk/templates``: the daemon builds the boot template of this shape."""
    report = api.post(
        "/husk/templates",
        json_body={"Memory": memory_bytes, "Cpus": cpus, "Binds": binds, "Rebuild": rebuild},
        timeout=TEMPLATE_TIMEOUT,
    )
    if not isinstance(report, dict):
        raise errors.Internal("the husk daemon sent no template report")
    return report


def _messages(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    for line in lines:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            yield message


def registry_auth_header(reference: str) -> dict[str, str]:
    """``X-Registry-Auth`` with the user's credentials for the reference's registry, as the
    docker CLI sends it (the daemon reads no user's configuration)."""
    # lazy: CLI start-up (oci.auth brings subprocess, ~3 ms, for a pull or push alone)
    from husk.oci.auth import lookup_credentials
    from husk.oci.reference import parse_reference

    try:
        domain = parse_reference(reference).domain
    except errors.InvalidArgument:
        return {}  # not a name (an id): no registry to authenticate to
    credentials = lookup_credentials(domain)
    if credentials is None:
        return {}
    document = {
        "username": credentials.username,
        "password": credentials.password,
        "identitytoken": credentials.identity_token,
    }
    encoded = base64.urlsafe_b64encode(json.dumps(document).encode()).decode()
    return {"X-Registry-Auth": encoded}


def push_image(
    api: ApiClient,
    reference: str,
    *,
    destination: str | None = None,
    chunk_size: int | None = None,
    on_line: Callable[[str], None],
) -> dict[str, Any]:
    """``POST /images/{name}/push``; status lines to ``on_line``; the pushed Digest and Size."""
    query = {"destination": destination, "chunk-size": chunk_size}
    result: dict[str, Any] = {}
    with api.open(
        "POST",
        f"/images/{quote(reference)}/push",
        query=query,
        headers=registry_auth_header(destination or reference),
        timeout=PULL_TIMEOUT,
    ) as response:
        for message in _messages(response.iter_lines()):
            if message.get("error"):
                raise errors.HuskError(str(message["error"]))
            aux = message.get("aux")
            if isinstance(aux, dict):
                result = aux
                continue
            line = _status_line(message)
            if line:
                on_line(line)
    if not result.get("Digest"):
        raise errors.Internal("the husk daemon reported no pushed digest")
    return result
