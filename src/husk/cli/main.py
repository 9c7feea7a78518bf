"""The ``husk`` command.

Subcommands live in their own modules and are imported only when invoked, so
that a command such as ``husk ps`` pays for nothing it does not use. ``husk --help``
imports every command module (for the one-line summaries), so a command module
imports at its top only what is cheap; what one of its commands alone needs and
costs more (asyncio, aiohttp, the image store, the daemon) is imported inside that
command, marked ``# lazy: CLI start-up`` with the measured cost.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, NoReturn

from husk.cli import quick
from husk.errors import HuskError

EXIT_HUSK_ERROR = 125
_GROUP_NAMES = frozenset({"cli", "LazyGroup", "LAZY_COMMANDS"})


def __getattr__(name: str) -> Any:
    """The click group and its parts, imported on first use: a quick command
    (:mod:`husk.cli.quick`) never loads click."""
    if name in _GROUP_NAMES:
        from husk.cli import commands  # lazy: CLI start-up (click, see main)

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _quick(argv: list[str]) -> bool:
    try:
        return quick.run(argv)
    except HuskError as err:
        # lazy: CLI start-up (husk.cli.format: json, re and the template engine; errors only)
        from husk.cli.format import escape_text

        print(f"husk: {escape_text(str(err))}", file=sys.stderr, flush=True)
        sys.exit(EXIT_HUSK_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)


def _end_now(code: object) -> NoReturn:
    """Ends the process with ``code`` (a ``SystemExit``'s) without the interpreter's teardown.

    A quick command's work is done when it exits: destroying a hundred modules and
    collecting their garbage would cost 5-9 ms of CPU (perf, this host) for nothing.
    What Python's exit would still have done that matters is done here: the standard
    streams flushed, and a code that is not an int printed and turned into 1."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status & 0xFF)


def main(argv: list[str] | None = None) -> Any:
    if argv is None:  # the process's own entry (the husk script): a quick command ends it
        try:
            ran = _quick(sys.argv[1:])
        except SystemExit as done:
            _end_now(done.code)
        if ran:
            _end_now(0)
    elif _quick(argv):
        return None
    # lazy: CLI start-up (click and the group: ~70 M instructions, a third of a command's start)
    import click

    from husk.cli.commands import cli
    from husk.cli.format import escape_text

    try:
        return cli.main(args=argv, prog_name="husk", standalone_mode=False)
    except HuskError as err:
        # Messages can quote a guest or an image (an exec's error, a config string).
        click.echo(f"husk: {escape_text(str(err))}", err=True)
        sys.exit(EXIT_HUSK_ERROR)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        # Docker exits 125 for its own errors, usage errors included.
        sys.exit(EXIT_HUSK_ERROR if err.exit_code in (1, 2) else err.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
