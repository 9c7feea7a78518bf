"""What ``husk network …`` and ``husk volume …`` share: Docker's ways with named objects.

A request the daemon refuses prints one line and exits 1, as ``docker network`` and
``docker volume`` do (a bad command line exits 125, through click).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from husk.cli.format import Formatter, escape_text, safe_json
from husk.client.daemon import connect
from husk.client.http import quote
from husk.errors import HuskError, InvalidArgument

EXIT_DAEMON_ERROR = 1
"""What ``docker network``/``docker volume`` exit with when the daemon refuses a request."""


def fail(err: HuskError) -> None:
    click.echo(f"husk: {escape_text(str(err))}", err=True)


def each(items: Iterable[str], action: Callable[[str], None]) -> None:
    """Runs ``action`` for every item; a failure is reported and the rest still run."""
    failed = False
    for item in items:
        try:
            action(item)
        except HuskError as err:
            fail(err)
            failed = True
    if failed:
        sys.exit(EXIT_DAEMON_ERROR)


def once(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except HuskError as err:
        fail(err)
        sys.exit(EXIT_DAEMON_ERROR)


def key_values(values: Iterable[str], flag: str) -> dict[str, str]:
    """``k=v`` options (a bare ``k`` is ``k=``), as Docker's --label and --opt take them."""
    parsed: dict[str, str] = {}
    for value in values:
        key, _, text = value.partition("=")
        if not key:
            raise InvalidArgument(f"invalid {flag} {value!r}: the key is empty")
        parsed[key] = text
    return parsed


def parse_filters(values: Iterable[str]) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for value in values:
        key, sep, wanted = value.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"bad format of filter {value!r} (expected name=value)")
        filters.setdefault(key.strip().lower(), []).append(wanted)
    return filters


def filter_query(filters: Iterable[str]) -> dict[str, Any]:
    parsed = parse_filters(filters)
    return {"filters": parsed} if parsed else {}


def print_rows(formatter: Formatter, rows: Sequence[Any]) -> None:
    """The rows sorted by name, rendered (nothing printed for an empty format's output)."""
    output = formatter.render(sorted(rows, key=lambda row: str(row.Name)))
    if output:
        click.echo(output)


def print_inspected(collection: str, refs: Iterable[str], format_spec: str) -> None:
    """``inspect``: each object of ``/collection/{ref}``, as JSON or through a template."""
    api = connect()
    found: list[dict[str, Any]] = []
    each(refs, lambda ref: found.append(api.get(f"/{collection}/{quote(ref)}")))
    if format_spec:
        click.echo(Formatter(format_spec, "", {}).render(found))
    else:
        click.echo(safe_json(found, indent=4))


def confirmed(question: str, force: bool) -> bool:
    """``prune``'s question, unless ``--force``."""
    return force or click.confirm(
        f"WARNING! This will remove {question}.\nAre you sure you want to continue?",
        default=False,
    )
