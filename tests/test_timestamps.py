"""husk.timestamps: Docker's RFC 3339 shapes, written and read in one place."""

from __future__ import annotations

import re
import time

import pytest

from husk import timestamps


def test_formats() -> None:
    assert timestamps.format_unix(1700000000.5) == "2023-11-14T22:13:20.500000000Z"
    assert timestamps.format_unix(1700000000.9999999999) == "2023-11-14T22:13:21.000000000Z"
    assert timestamps.format_nanos(1700000000_123456789) == "2023-11-14T22:13:20.123456789Z"
    assert timestamps.format_nanos(1700000000_123456789, digits=6) == "2023-11-14T22:13:20.123456Z"
    assert timestamps.format_nanos(0) == "1970-01-01T00:00:00.000000000Z"


def test_now() -> None:
    before = time.time()
    stamp = timestamps.now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", stamp)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", timestamps.now(digits=6))
    assert before - 1 <= timestamps.parse(stamp) <= time.time() + 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2023-11-14T22:13:20Z", 1700000000.0),
        ("2023-11-14T22:13:20.25Z", 1700000000.25),
        ("2023-11-14T22:13:20.123456789Z", 1700000000.123456789),
        ("2023-11-14t22:13:20z", 1700000000.0),
        ("2023-11-14T22:13:20", 1700000000.0),  # no zone: UTC
        ("2023-11-14T23:13:20+01:00", 1700000000.0),
        ("2023-11-14T21:13:20.5-01:00", 1700000000.5),
    ],
)
def test_parse(text: str, seconds: float) -> None:
    assert timestamps.parse(text) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2023-11-14", "2023-11-14 22:13:20", "1700000000"]
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        timestamps.parse(text)


def test_round_trip_and_zero() -> None:
    stamp = timestamps.format_unix(1700000000.123456)
    assert timestamps.parse(stamp) == pytest.approx(1700000000.123456, abs=1e-6)
    assert timestamps.to_unix_or_zero(timestamps.ZERO_TIME) == 0.0
    assert timestamps.to_unix_or_zero("") == 0.0
    assert timestamps.to_unix_or_zero("garbage") == 0.0
    assert timestamps.to_unix_or_zero("2023-11-14T22:13:20Z") == 1700000000.0
