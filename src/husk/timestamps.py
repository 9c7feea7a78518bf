"""RFC 3339 timestamps in Docker's shapes: made and read in one place.

Docker writes UTC times with nanoseconds (``2024-05-01T12:00:00.123456789Z``) for
containers and with microseconds for images; it reads any RFC 3339 time, with or
without a fraction and with ``Z`` or an offset. The zero time stands for "never".
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

ZERO_TIME = "0001-01-01T00:00:00Z"
"""Go's zero time: what Docker reports for a container that never started or finished."""

_NANOS = 1_000_000_000
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})?", re.IGNORECASE
)


def format_nanos(nanos: int, *, digits: int = 9) -> str:
    """Unix nanoseconds as RFC 3339 in UTC with ``digits`` of fraction (9 or 6)."""
    whole, rest = divmod(nanos, _NANOS)
    stamp = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{rest:09d}"[:digits]
    return f"{stamp}.{fraction}Z" if digits else f"{stamp}Z"


def format_unix(seconds: float, *, digits: int = 9) -> str:
    """Unix seconds as RFC 3339 in UTC (rounded to the nanosecond)."""
    whole = int(seconds)
    nanos = round((seconds - whole) * 1e9)
    return format_nanos(whole * _NANOS + nanos, digits=digits)


def now(*, digits: int = 9) -> str:
    """The current time, RFC 3339 in UTC."""
    return format_nanos(time.time_ns(), digits=digits)


def parse(text: str) -> float:
    """Unix seconds of an RFC 3339 time (any fraction; no zone means UTC).

    Raises ValueError for anything else. The fraction is kept beyond Python's
    microseconds, as far as a float holds it.
    """
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 time")
    date, clock, fraction, zone = match.groups()
    zone = "+00:00" if zone in (None, "Z", "z") else zone
    when = datetime.fromisoformat(f"{date}T{clock}{zone}")
    return when.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


def to_unix_or_zero(text: str) -> float:
    """Unix seconds of an RFC 3339 time; 0 for the zero time, empty or unreadable text."""
    if not text or text.startswith("0001-01-01"):
        return 0.0
    try:
        return parse(text)
    except ValueError:
        return 0.0
