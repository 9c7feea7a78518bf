"""``husk logs``: a container's output, from the daemon's log files."""

from __future__ import annotations

import sys

import click

from husk import errors
from husk.cli.timeparse import api_timestamp, parse_timestamp
from husk.client import streams
from husk.client.daemon import connect
from husk.client.http import MULTIPLEXED_STREAM, RAW_STREAM
from husk.client.session import container_path, inspect


def _tail_value(tail: str) -> str:
    if tail == "all":
        return tail
    try:
        count = int(tail)
    except ValueError:
        raise errors.InvalidArgument(f"invalid --tail {tail!r}: use a number or all") from None
    return "all" if count < 0 else str(count)


@click.command(name="logs")
@click.option("-f", "--follow", is_flag=True, help="Follow log output.")
@click.option("-n", "--tail", default="all", help="Lines to show from the end of the logs.")
@click.option("-t", "--timestamps", is_flag=True, help="Show timestamps.")
@click.option("--since", help="Logs since a timestamp (2013-01-02T13:23:37Z) or relative (42m).")
@click.option("--until", help="Logs before a timestamp or relative time (42m).")
@click.option("--details", is_flag=True, help="Show extra details provided to logs.")
@click.argument("container")
def logs(
    follow: bool,
    tail: str,
    timestamps: bool,
    since: str | None,
    until: str | None,
    details: bool,
    container: str,
) -> None:
    """Fetch the logs of a container."""
    query = {
        "stdout": True,
        "stderr": True,
        "follow": follow,
        "tail": _tail_value(tail),
        "timestamps": timestamps,
        "details": details or None,
        "since": api_timestamp(parse_timestamp(since, "--since")) if since else None,
        "until": api_timestamp(parse_timestamp(until, "--until")) if until else None,
    }
    api = connect()
    with api.open("GET", container_path(container, "logs"), query=query, timeout=None) as response:
        if response.content_type == MULTIPLEXED_STREAM:
            multiplexed = True
        elif response.content_type == RAW_STREAM:
            multiplexed = False
        else:
            config = inspect(api, container).get("Config") or {}
            multiplexed = not config.get("Tty")
        sink = streams.OutputSink(multiplexed=multiplexed)
        try:
            for data in response.iter_body():
                sink.feed(data)
            sink.finish()
        except BrokenPipeError:
            # The reader went away (``husk logs … | head``): nothing left to do.
            sys.exit(0)
        except KeyboardInterrupt:
            sys.exit(0)
