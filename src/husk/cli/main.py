"""The ``husk`` command.

Subcommands live in their own modules and are imported only when invoked, so
that a command such as ``husk ps`` pays for nothing it does not use. ``husk --help``
imports every command module (for the one-line summaries), so a command module
imports at its top only what is cheap; what one of its commands alone needs and
costs more (asyncio, aiohttp, the image store, the daemon) is imported inside that
command, marked ``# lazy: CLI start-up`` with the measured cost.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from husk.cli.format import escape_text
from husk.errors import HuskError

# name -> "module:attribute" of a click command or group.
LAZY_COMMANDS: dict[str, str] = {
    "build": "husk.cli.build:build",
    "builder": "husk.cli.build:builder",
    "bundle": "husk.cli.bundle:bundle",
    "daemon": "husk.cli.daemon:daemon",
    "image": "husk.cli.images:image",
    "images": "husk.cli.images:images",
    "history": "husk.cli.commit:history",
    "import": "husk.cli.archive:import_",
    "load": "husk.cli.archive:load",
    "login": "husk.cli.login:login",
    "network": "husk.cli.network:network",
    "volume": "husk.cli.volume:volume",
    "logout": "husk.cli.login:logout",
    "pull": "husk.cli.pull:pull",
    "push": "husk.cli.push:push",
    "rmi": "husk.cli.images:rmi",
    "save": "husk.cli.archive:save",
    "tag": "husk.cli.images:tag",
    "system": "husk.cli.system:system",
    "attach": "husk.cli.containers:attach",
    "commit": "husk.cli.commit:commit",
    "cp": "husk.cli.cp:cp",
    "create": "husk.cli.run:create",
    "diff": "husk.cli.filesystem:diff",
    "export": "husk.cli.filesystem:export",
    "exec": "husk.cli.execute:exec_",
    "info": "husk.cli.info:info",
    "inspect": "husk.cli.containers:inspect",
    "kill": "husk.cli.containers:kill",
    "logs": "husk.cli.logs:logs",
    "pause": "husk.cli.containers:pause",
    "port": "husk.cli.containers:port",
    "ps": "husk.cli.ps:ps",
    "rename": "husk.cli.containers:rename",
    "restart": "husk.cli.containers:restart",
    "rm": "husk.cli.containers:rm",
    "run": "husk.cli.run:run",
    "start": "husk.cli.containers:start",
    "stats": "husk.cli.stats:stats",
    "stop": "husk.cli.containers:stop",
    "top": "husk.cli.containers:top",
    "unpause": "husk.cli.containers:unpause",
    "version": "husk.cli.info:version",
    "wait": "husk.cli.containers:wait",
}

EXIT_HUSK_ERROR = 125


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module_name), attr)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="husk", prog_name="husk")
def cli() -> None:
    """Run OCI containers, each in its own lightweight Linux VM."""


def main(argv: list[str] | None = None) -> Any:
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
