"""The ``platform`` (API 1.49) and ``platforms`` (API 1.50) parameters of image endpoints.

A husk image holds one platform, so a request naming platforms is served when they
all are the image's own, and otherwise answered as Docker's single-platform image
store answers: the image was found, but not for that platform (404).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from husk.errors import InvalidArgument, NotFound
from husk.oci.store import ImageRecord


def _platform(text: str, parameter: str) -> dict[str, str]:
    try:
        document: Any = json.loads(text)
    except (ValueError, RecursionError):  # a deep nest of brackets: RecursionError
        document = None
    if not isinstance(document, dict) or not all(isinstance(v, str) for v in document.values()):
        raise InvalidArgument(
            f"invalid {parameter} {text!r}: expected a JSON OCI platform, "
            'such as {"os":"linux","architecture":"amd64"}'
        )
    return {str(k): str(v) for k, v in document.items()}


def _matches(record: ImageRecord, platform: dict[str, str]) -> bool:
    wanted = {
        "os": platform.get("os", ""),
        "architecture": platform.get("architecture", ""),
        "variant": platform.get("variant", ""),
    }
    actual = {"os": record.os, "architecture": record.architecture, "variant": record.variant}
    return all(not value or value == actual[key] for key, value in wanted.items())


def _text(platform: dict[str, str]) -> str:
    parts = [platform.get(k, "") for k in ("os", "architecture", "variant")]
    return "/".join(p for p in parts if p)


def check_platforms(request: web.Request, record: ImageRecord, reference: str) -> None:
    """Refuse (404) when ``platform``/``platforms`` name another platform than the image's."""
    for parameter in ("platform", "platforms"):
        for text in request.query.getall(parameter, []):
            if not text:
                continue
            platform = _platform(text, parameter)
            if not _matches(record, platform):
                raise NotFound(
                    f"image with reference {reference} was found but does not match the "
                    f"specified platform: wanted {_text(platform)}, actual: {record.platform}"
                )
