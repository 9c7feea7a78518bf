"""Reading Docker API query parameters and bodies, with Docker's 400 for bad ones."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from husk import timestamps
from husk.daemon.docker.limits import MAX_JSON_BODY, body_too_large
from husk.errors import InvalidArgument

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def query_bool(request: web.Request, name: str, default: bool = False) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidArgument(f"invalid value for {name!r}: {value!r} is not a boolean")


def query_int(request: web.Request, name: str, default: int | None = None) -> int | None:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"invalid value for {name!r}: {value!r} is not an integer") from None


def query_str(request: web.Request, name: str, default: str = "") -> str:
    return request.query.get(name, default)


def parse_filters(text: str | None) -> dict[str, list[str]]:
    """Docker's ``filters`` JSON: ``{"key": ["v"]}`` or the older ``{"key": {"v": true}}``."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # a deep nest of brackets: RecursionError
        raise InvalidArgument(f"invalid filters: {text!r} is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"invalid filters: {text!r} is not a JSON object")
    filters: dict[str, list[str]] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            filters[str(key)] = [str(v) for v, enabled in value.items() if enabled]
        elif isinstance(value, list):
            filters[str(key)] = [str(v) for v in value]
        elif isinstance(value, str):
            filters[str(key)] = [value]
        else:
            raise InvalidArgument(f"invalid filters: bad value for {key!r}")
    return filters


def check_filters(filters: dict[str, list[str]], accepted: set[str]) -> None:
    for key in filters:
        if key not in accepted:
            raise InvalidArgument(f"invalid filter '{key}'")


def filters_of(request: web.Request, accepted: set[str]) -> dict[str, list[str]]:
    filters = parse_filters(request.query.get("filters"))
    check_filters(filters, accepted)
    return filters


def label_matches(labels: dict[str, str], wanted: list[str]) -> bool:
    """Every ``key`` or ``key=value`` in ``wanted`` holds for ``labels``."""
    for item in wanted:
        key, sep, value = item.partition("=")
        if key not in labels or (sep and labels[key] != value):
            return False
    return True


def parse_timestamp(value: str, name: str) -> float:
    """A Docker time parameter: unix seconds (``1700000000.5``) or RFC 3339."""
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return timestamps.parse(text)
    except ValueError:
        raise InvalidArgument(f"invalid value for {name!r}: {value!r} is not a timestamp") from None


def query_time(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value is None or value.strip() in ("", "0"):
        return None
    return parse_timestamp(value, name)


async def json_body(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object (``{}`` for an empty optional body).

    At most ``MAX_JSON_BODY`` bytes are read: a larger body is a 413 (refused from its
    Content-Length before any of it is read when it announces one).
    """
    announced = request.content_length
    if announced is not None and announced > MAX_JSON_BODY:
        raise body_too_large(size=announced)
    try:
        raw = await request.read()  # bounded by the application's client_max_size
    except web.HTTPRequestEntityTooLarge:
        raise body_too_large() from None
    if not raw.strip():
        if required:
            raise InvalidArgument("a JSON body is required")
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # a deep nest of brackets: RecursionError
        raise InvalidArgument(f"invalid JSON body: {err}") from None
    if data is None and not required:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument("invalid JSON body: expected an object")
    return data


def iso_to_unix(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp (0 for the zero time or empty)."""
    return timestamps.to_unix_or_zero(text)


def unix_to_iso(seconds: float) -> str:
    """RFC 3339 with nanoseconds in UTC, Docker's timestamp shape."""
    return timestamps.format_unix(seconds)


def nanos_to_iso(nanos: int) -> str:
    return timestamps.format_nanos(nanos)
