"""Image operations through the daemon: pull, existence, removal and prune.

Removal goes through the daemon because only it knows which containers use an
image (Docker's rule: an image a container uses, running or stopped, is kept).
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from husk import errors
from husk.client.http import ApiClient, quote

PULL_TIMEOUT = 3600.0


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
    image, tag = split_reference(reference)
    query = {"fromImage": image, "tag": tag, "platform": platform}
    with api.open("POST", "/images/create", query=query, timeout=PULL_TIMEOUT) as response:
        for line in response.iter_lines():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if message.get("error"):
                raise errors.PullFailed(str(message["error"]))
            _show(message, out)


def _show(message: dict[str, object], out: TextIO) -> None:
    detail = message.get("progressDetail")
    if isinstance(detail, dict) and detail.get("current"):
        return  # byte counts: a terminal UI's business, not a log's
    status = str(message.get("status") or "").strip()
    if not status:
        return
    ident = message.get("id")
    out.write(f"{ident}: {status}\n" if ident else f"{status}\n")
    out.flush()
