"""The options ``husk run`` and ``husk create`` share, as click declares them.

What they become (the API's create body) is :mod:`husk.cli.createopts`, which imports no
click: the quick parse of ``husk run`` (:mod:`husk.cli.quick`) uses it without these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

PULL_POLICIES = ("missing", "always", "never", "newer")

_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open and attach it."),
    click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY."),
    click.option("--rm", "auto_remove", is_flag=True, help="Remove the container when it exits."),
    click.option("--name", help="Assign a name to the container."),
    click.option("-e", "--env", multiple=True, help="Set environment variables (KEY=VALUE)."),
    click.option("--env-file", multiple=True, help="Read environment variables from a file."),
    click.option(
        "-v",
        "--volume",
        multiple=True,
        help="Mount a volume or host path: [NAME|/host:]/container[:ro].",
    ),
    click.option("--mount", "mounts", multiple=True, help="Mount: type=bind|volume|tmpfs,…"),
    click.option(
        "--volumes-from", multiple=True, help="Mount another container's volumes (CTR[:ro|rw])."
    ),
    click.option("--tmpfs", multiple=True, help="Mount a tmpfs: /path[:size=64m,mode=1777]."),
    click.option("-p", "--publish", multiple=True, help="Publish [ip:][hostPort:]port[/proto]."),
    click.option("-P", "--publish-all", is_flag=True, help="Publish all exposed ports."),
    click.option("--expose", multiple=True, help="Expose a port or a range of ports."),
    click.option("-w", "--workdir", help="Working directory inside the container."),
    click.option("-u", "--user", help="Username or UID (format: <name|uid>[:<group|gid>])."),
    click.option("--entrypoint", help="Overwrite the default ENTRYPOINT of the image."),
    click.option("--cpus", type=float, help="Number of CPUs."),
    click.option("-m", "--memory", help="Memory limit (e.g. 512m, 1g)."),
    click.option("-h", "--hostname", help="Container host name."),
    click.option("-l", "--label", multiple=True, help="Set metadata (key=value)."),
    click.option("--label-file", multiple=True, help="Read labels from a file."),
    click.option("--restart", default="no", help="no, always, unless-stopped, on-failure[:N]."),
    click.option("--health-cmd", help="Command to run to check health."),
    click.option("--health-interval", help="Time between running the check (e.g. 30s)."),
    click.option("--health-timeout", help="Maximum time to allow one check to run."),
    click.option("--health-retries", type=int, help="Consecutive failures to report unhealthy."),
    click.option("--health-start-period", help="Start period before failures count."),
    click.option("--no-healthcheck", is_flag=True, help="Disable any container HEALTHCHECK."),
    click.option("--stop-signal", help="Signal to stop the container."),
    click.option(
        "--privileged",
        is_flag=True,
        help="Every capability and device inside the container's VM (the VM stays the boundary).",
    ),
    click.option(
        "--init", is_flag=True, help="Run an init inside the container that reaps processes."
    ),
    click.option("--read-only", is_flag=True, help="Mount the root filesystem read-only."),
    click.option("--cap-add", multiple=True, help="Add Linux capabilities (or ALL)."),
    click.option("--cap-drop", multiple=True, help="Drop Linux capabilities (or ALL)."),
    click.option("--ulimit", multiple=True, help="Ulimit options (name=soft[:hard])."),
    click.option("--sysctl", multiple=True, help="Namespaced kernel parameters (key=value)."),
    click.option("--shm-size", help="Size of /dev/shm (default 64m)."),
    click.option(
        "--storage-opt", multiple=True, help="size=N: the writable layer's size (default 8g)."
    ),
    click.option("--group-add", multiple=True, help="Add additional groups to join."),
    click.option(
        "--security-opt",
        multiple=True,
        help="no-new-privileges[:true|false]; seccomp=unconfined, apparmor=unconfined and "
        "label=disable are what husk's guests do anyway.",
    ),
    click.option("--pids-limit", type=int, help="Tune the container's pids limit (-1: unlimited)."),
    click.option("--oom-score-adj", type=int, help="Tune the OOM preference (-1000 to 1000)."),
    click.option("--oom-kill-disable", is_flag=True, help="Disable OOM Killer (refused by husk)."),
    click.option("--memory-swap", help="Memory plus swap limit (-1: unlimited swap)."),
    click.option("--cpuset-cpus", help="Host CPUs in which to allow execution (0-3, 0,1)."),
    click.option(
        "--network",
        "networks",
        multiple=True,
        help="Connect the container to a network (repeatable; none: no network).",
    ),
    click.option(
        "--network-alias", multiple=True, help="Add a network-scoped alias for the container."
    ),
    click.option("--ip", help="IPv4 address on the (first) network (e.g. 172.30.100.104)."),
    click.option("--add-host", multiple=True, help="Add a custom host-to-IP mapping (host:ip)."),
    click.option("--dns", multiple=True, help="Set custom DNS servers."),
    click.option("--dns-search", multiple=True, help="Set custom DNS search domains."),
    click.option("--dns-option", multiple=True, help="Set DNS options."),
    click.option("--stop-timeout", type=int, help="Timeout (in seconds) to stop a container."),
    click.option(
        "--pull",
        "pull_policy",
        type=click.Choice(PULL_POLICIES),
        default="missing",
        show_default=True,
        help="Pull image before running.",
    ),
    click.option("--platform", help="Set platform if server is multi-platform capable."),
    click.option(
        "--no-template",
        is_flag=True,
        help="Boot this container's VM cold instead of restoring the boot template.",
    ),
]


def create_options(func: F) -> F:
    """Decorate a command with every container-creation option."""
    for option in reversed(_OPTIONS):
        func = option(func)
    return func
