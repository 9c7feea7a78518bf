"""The ``husk`` click group: every subcommand, each imported from its own module only
when it is invoked (see :mod:`husk.cli.main`)."""

from __future__ import annotations

import importlib

import click

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
