"""Times as Docker's CLI takes them: Go durations (``1m30s``) and ``--since``/``--until``."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from husk.errors import InvalidArgument

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds in a Go duration such as ``30s``, ``1m30s``, ``500ms`` (``0`` is allowed)."""
    value = text.strip()
    if value == "0":
        return 0.0
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(value) or not value:
        raise InvalidArgument(f"invalid {what} {text!r}: use a duration such as 30s, 1m30s, 500ms")
    return total


def parse_timestamp(text: str, what: str = "time", now: float | None = None) -> float:
    """Unix seconds from a Unix timestamp, an RFC 3339 date or a duration before now."""
    value = text.strip()
    if not value:
        raise InvalidArgument(f"empty {what}")
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    if re.fullmatch(r"[\d.]+(ns|us|µs|ms|s|m|h)[\d.nsuµmh]*", value):
        return (now if now is not None else time.time()) - parse_duration(value, what)
    iso = value.replace("Z", "+00:00")
    # Python before 3.12 takes at most microseconds: drop extra digits of nanoseconds.
    iso = re.sub(r"(\.\d{6})\d+", r"\1", iso)
    for candidate in (iso, iso + "T00:00:00"):
        try:
            parsed = datetime.fromisoformat(candidate)
        except ValueError:
            continue
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.now().astimezone().tzinfo)
        return parsed.astimezone(UTC).timestamp()
    raise InvalidArgument(
        f"invalid {what} {text!r}: use a Unix timestamp, an RFC 3339 date or a duration (10m)"
    )


def api_timestamp(seconds: float) -> str:
    """The ``seconds.nanoseconds`` form the Docker API takes for since/until."""
    whole, nanos = divmod(round(seconds * 1e9), 1_000_000_000)
    return f"{whole}.{nanos:09d}"
