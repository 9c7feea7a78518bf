"""``husk exec``: run a command in a running container."""

from __future__ import annotations

import click

from husk.cli import execflow


@click.command(
    name="exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("-d", "--detach", is_flag=True, help="Detached mode: run in the background.")
@click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open and attach it.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY.")
@click.option("-e", "--env", multiple=True, help="Set environment variables (KEY=VALUE).")
@click.option("--env-file", multiple=True, help="Read environment variables from a file.")
@click.option("-u", "--user", help="Username or UID (format: <name|uid>[:<group|gid>]).")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.option("--privileged", is_flag=True, help="Give extended privileges to the command.")
@click.argument("container")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def exec_(
    detach: bool,
    interactive: bool,
    tty: bool,
    env: tuple[str, ...],
    env_file: tuple[str, ...],
    user: str | None,
    workdir: str | None,
    privileged: bool,
    container: str,
    command: tuple[str, ...],
) -> None:
    """Execute a command in a running container."""
    if container.startswith("-"):
        raise click.UsageError(f"unknown flag: {container}")
    execflow.execute(
        detach=detach,
        interactive=interactive,
        tty=tty,
        env=env,
        env_file=env_file,
        user=user,
        workdir=workdir,
        privileged=privileged,
        container=container,
        command=command,
    )
