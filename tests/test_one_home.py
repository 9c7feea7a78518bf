"""Things written once and shared: each layer sees the same object, not a copy of it."""

from __future__ import annotations

from husk import errors, humanize


def test_not_modified_is_one_class() -> None:
    from husk.client import http
    from husk.runtime import runtime

    assert runtime.NotModified is http.NotModified is errors.NotModified
    assert errors.NotModified.http_status == 304
    assert http.error_for(304, b"").__class__ is errors.NotModified


def test_human_size_is_one_function() -> None:
    from husk.cli import format
    from husk.oci import inspect

    assert inspect.human_size is format.human_size is humanize.human_size
    assert humanize.human_size(999) == "999B"
    assert humanize.human_size(1_040_000) == "1.04MB"
    assert humanize.human_size(2_000_000_000_000_000) == "2PB"
