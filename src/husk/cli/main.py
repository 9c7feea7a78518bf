"""The ``husk`` command.

Subcommands live in their own modules and are imported only when invoked, so
that a command such as ``husk ps`` pays for nothing it does not use. ``husk --help``
imports every command module (for the one-line summaries), so a command module
imports at its top only what is cheap; what one of its commands alone needs and
costs more (asyncio, aiohttp, the image store, the daemon) is imported inside that
command, marked ``# lazy: CLI start-up`` with the measured cost.
"""

from __future__ import annotations

import sys
from typing import Any

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


def main(argv: list[str] | None = None) -> Any:
    if _quick(sys.argv[1:] if argv is None else argv):
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
