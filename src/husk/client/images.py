"""Image operations the container commands need from the daemon: pull and existence."""

from __future__ import annotations

import json
import sys
from typing import TextIO

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
