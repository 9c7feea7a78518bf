"""Container lifecycle commands: start, stop, restart, kill, rm, pause, unpause, wait,
rename, port, top, inspect, attach."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from husk import errors
from husk.cli.format import (
    Template,
    align_table,
    escape_text,
    escaped_row,
    expand_escapes,
    safe_json,
)
from husk.client import session
from husk.client.daemon import connect
from husk.client.http import ApiClient, NotModified, quote
from husk.client.session import container_path
from husk.detachkeys import parse_detach_keys

if TYPE_CHECKING:
    from husk.client.session import ExitWaiter

EXIT_HUSK_ERROR = 125
# Beyond the stop timeout itself, how long the daemon may take to answer.
DAEMON_GRACE = 120.0


def _client() -> ApiClient:
    return connect()


def _path(ref: str, action: str = "") -> str:
    return container_path(ref, action)


def for_each(refs: tuple[str, ...], action: Callable[[str], None]) -> None:
    """Apply ``action`` to every container; report each failure on its own line.

    Like Docker, one bad name does not stop the others; the command still fails.
    """
    failed = False
    for ref in refs:
        try:
            action(ref)
        except errors.HuskError as err:
            if len(refs) == 1:
                raise
            click.echo(f"husk: {escape_text(str(err))}", err=True)
            failed = True
    if failed:
        sys.exit(EXIT_HUSK_ERROR)


def _echo_after(call: Callable[[str], None]) -> Callable[[str], None]:
    def action(ref: str) -> None:
        call(ref)
        click.echo(ref)

    return action


# -- start / attach ------------------------------------------------------------


@click.command(name="start")
@click.option("-a", "--attach", is_flag=True, help="Attach STDOUT/STDERR and forward signals.")
@click.option("-i", "--interactive", is_flag=True, help="Attach the container's STDIN.")
@click.option(
    "--detach-keys",
    default="",
    help="Key sequence that detaches from the container (default ctrl-p,ctrl-q).",
)
@click.argument("containers", nargs=-1, required=True)
def start(attach: bool, interactive: bool, detach_keys: str, containers: tuple[str, ...]) -> None:
    """Start one or more stopped containers."""
    parse_detach_keys(detach_keys)
    api = _client()
    if attach or interactive:
        if len(containers) > 1:
            raise errors.InvalidArgument("you cannot start and attach multiple containers at once")
        _start_attached(api, containers[0], interactive, detach_keys)
        return

    def start_one(ref: str) -> None:
        with contextlib.suppress(NotModified):
            api.post(_path(ref, "start"))

    for_each(containers, _echo_after(start_one))


def _start_attached(api: ApiClient, ref: str, interactive: bool, detach_keys: str = "") -> None:
    config = session.inspect(api, ref)
    container_id = str(config.get("Id") or ref)
    tty = bool((config.get("Config") or {}).get("Tty"))
    with_stdin = interactive and bool((config.get("Config") or {}).get("OpenStdin"))
    stream = session.attach_container(api, container_id, stdin=with_stdin, detach_keys=detach_keys)
    waiter = session.ExitWaiter(api, container_id, "next-exit")
    try:
        api.post(_path(container_id, "start"))
    except NotModified:
        pass
    except errors.HuskError:
        waiter.cancel()
        stream.close()
        raise
    detached = session.run_stream(
        api,
        stream,
        tty=tty,
        forward_stdin=with_stdin,
        resize_path=_path(container_id, "resize") if tty else None,
        kill_path=_path(container_id, "kill"),
        detach_keys=detach_keys,
    )
    _exit_with(waiter, detached)


@click.command(name="attach")
@click.option("--no-stdin", is_flag=True, help="Do not attach STDIN.")
@click.option(
    "--sig-proxy/--no-sig-proxy", default=True, help="Forward received signals to the process."
)
@click.option(
    "--detach-keys",
    default="",
    help="Key sequence that detaches from the container (default ctrl-p,ctrl-q).",
)
@click.argument("container")
def attach(no_stdin: bool, sig_proxy: bool, detach_keys: str, container: str) -> None:
    """Attach to a running container's input and output."""
    parse_detach_keys(detach_keys)
    api = _client()
    config = session.inspect(api, container)
    container_id = str(config.get("Id") or container)
    state = config.get("State") or {}
    if not state.get("Running"):
        raise errors.Conflict(f"you cannot attach to a stopped container {container}")
    if state.get("Paused"):
        raise errors.Conflict(f"you cannot attach to a paused container {container}")
    tty = bool((config.get("Config") or {}).get("Tty"))
    with_stdin = not no_stdin and bool((config.get("Config") or {}).get("OpenStdin"))
    stream = session.attach_container(api, container_id, stdin=with_stdin, detach_keys=detach_keys)
    waiter = session.ExitWaiter(api, container_id, "not-running")
    detached = session.run_stream(
        api,
        stream,
        tty=tty,
        forward_stdin=with_stdin,
        resize_path=_path(container_id, "resize") if tty else None,
        kill_path=_path(container_id, "kill") if sig_proxy else None,
        detach_keys=detach_keys,
    )
    _exit_with(waiter, detached)


def _exit_with(waiter: ExitWaiter, detached: bool) -> NoReturn:
    """The container's exit code; 0 at once when the user detached (it runs on)."""
    sys.stdout.flush()
    if detached:
        waiter.cancel()
        sys.exit(0)
    sys.exit(waiter.result())


# -- stop / restart / kill / rm / pause / unpause --------------------------------------


@click.command(name="stop")
@click.option("-t", "--time", "timeout", type=int, help="Seconds to wait before killing it.")
@click.option("-s", "--signal", "stop_signal", help="Signal to send to the container.")
@click.argument("containers", nargs=-1, required=True)
def stop(timeout: int | None, stop_signal: str | None, containers: tuple[str, ...]) -> None:
    """Stop one or more running containers."""
    api = _client()
    query = {"t": timeout, "signal": stop_signal}
    # The daemon kills after the timeout; the container's own may be longer than 10 s.
    deadline = None if timeout is None or timeout < 0 else timeout + DAEMON_GRACE

    def stop_one(ref: str) -> None:
        with contextlib.suppress(NotModified):
            api.post(_path(ref, "stop"), query, timeout=deadline)

    for_each(containers, _echo_after(stop_one))


@click.command(name="restart")
@click.option("-t", "--time", "timeout", type=int, help="Seconds to wait before killing it.")
@click.option("-s", "--signal", "stop_signal", help="Signal to send to the container.")
@click.argument("containers", nargs=-1, required=True)
def restart(timeout: int | None, stop_signal: str | None, containers: tuple[str, ...]) -> None:
    """Restart one or more containers."""
    api = _client()
    query = {"t": timeout, "signal": stop_signal}
    deadline = None if timeout is None or timeout < 0 else timeout + DAEMON_GRACE
    for_each(
        containers,
        _echo_after(lambda ref: api.post(_path(ref, "restart"), query, timeout=deadline)),
    )


@click.command(name="kill")
@click.option("-s", "--signal", "kill_signal", default="KILL", show_default=True)
@click.argument("containers", nargs=-1, required=True)
def kill(kill_signal: str, containers: tuple[str, ...]) -> None:
    """Kill one or more running containers."""
    from husk.spec import parse_signal  # lazy: CLI start-up (husk.spec, ~5 ms, for kill alone)

    parse_signal(kill_signal)
    api = _client()
    for_each(
        containers,
        _echo_after(lambda ref: api.post(_path(ref, "kill"), {"signal": kill_signal})),
    )


@click.command(name="rm")
@click.option("-f", "--force", is_flag=True, help="Force the removal of a running container.")
@click.option("-v", "--volumes", is_flag=True, help="Remove anonymous volumes too.")
@click.option("-l", "--link", is_flag=True, help="Remove the specified link.")
@click.argument("containers", nargs=-1, required=True)
def rm(force: bool, volumes: bool, link: bool, containers: tuple[str, ...]) -> None:
    """Remove one or more containers."""
    if link:
        raise errors.NotSupported("husk has no container links, so rm --link has nothing to do")
    api = _client()
    query = {"force": force, "v": volumes}
    for_each(
        containers,
        _echo_after(lambda ref: api.delete(_path(ref), query, timeout=DAEMON_GRACE)),
    )


@click.command(name="pause")
@click.argument("containers", nargs=-1, required=True)
def pause(containers: tuple[str, ...]) -> None:
    """Pause all processes within one or more containers."""
    api = _client()
    for_each(containers, _echo_after(lambda ref: api.post(_path(ref, "pause"))))


@click.command(name="unpause")
@click.argument("containers", nargs=-1, required=True)
def unpause(containers: tuple[str, ...]) -> None:
    """Unpause all processes within one or more containers."""
    api = _client()
    for_each(containers, _echo_after(lambda ref: api.post(_path(ref, "unpause"))))


# -- wait / rename / port / top / inspect ----------------------------------------


@click.command(name="wait")
@click.option(
    "--condition",
    type=click.Choice(["not-running", "next-exit", "removed"]),
    default="not-running",
    show_default=True,
)
@click.argument("containers", nargs=-1, required=True)
def wait(condition: str, containers: tuple[str, ...]) -> None:
    """Block until one or more containers stop, then print their exit codes."""
    api = _client()

    def wait_one(ref: str) -> None:
        result = api.post(_path(ref, "wait"), {"condition": condition}, timeout=None) or {}
        message = (result.get("Error") or {}).get("Message")
        if message:
            raise errors.Internal(str(message))
        click.echo(int(result.get("StatusCode", 0)))

    for_each(containers, wait_one)


@click.command(name="rename")
@click.argument("container")
@click.argument("new_name")
def rename(container: str, new_name: str) -> None:
    """Rename a container."""
    if not new_name.strip():
        raise errors.InvalidArgument("the new name cannot be empty")
    _client().post(_path(container, "rename"), {"name": new_name})


def format_port_lines(ports: dict[str, Any], wanted: str | None) -> list[str]:
    """``80/tcp -> 0.0.0.0:8080`` lines, or host addresses only for one wanted port."""
    if wanted is not None and "/" not in wanted:
        wanted += "/tcp"
    lines = []
    for key in sorted(ports, key=_port_sort_key):
        if wanted is not None and key != wanted:
            continue
        for binding in ports[key] or []:
            host_ip = binding.get("HostIp") or "0.0.0.0"
            if ":" in host_ip:
                host_ip = f"[{host_ip}]"
            address = f"{host_ip}:{binding.get('HostPort', '')}"
            lines.append(address if wanted is not None else f"{key} -> {address}")
    return lines


def _port_sort_key(key: str) -> tuple[int, str]:
    number, _, proto = key.partition("/")
    return (int(number) if number.isdigit() else 0, proto)


@click.command(name="port")
@click.argument("container")
@click.argument("private_port", required=False)
def port(container: str, private_port: str | None) -> None:
    """List port mappings, or look up the public address of one private port."""
    config = session.inspect(_client(), container)
    ports = (config.get("NetworkSettings") or {}).get("Ports") or {}
    lines = format_port_lines(ports, private_port)
    if private_port is not None and not lines:
        key = private_port if "/" in private_port else private_port + "/tcp"
        raise errors.NotFound(f"no public port '{key}' published for {container}")
    for line in lines:
        click.echo(line)


@click.command(name="top", context_settings={"ignore_unknown_options": True})
@click.argument("container")
@click.argument("ps_args", nargs=-1, type=click.UNPROCESSED)
def top(container: str, ps_args: tuple[str, ...]) -> None:
    """Display the running processes of a container."""
    result = _client().get(_path(container, "top"), {"ps_args": " ".join(ps_args) or None}) or {}
    # Every cell is the guest's to choose (a process can name itself anything).
    titles = escaped_row(result.get("Titles") or [])
    rows = [escaped_row(row) for row in result.get("Processes") or []]
    click.echo(align_table([titles, *rows]))


@click.command(name="inspect")
@click.option("-f", "--format", "format_spec", help="Format the output using a Go template.")
@click.option("-s", "--size", is_flag=True, help="Display total file sizes (containers).")
@click.option(
    "--type", "object_type", type=click.Choice(["container", "image"]), help="Only this kind."
)
@click.argument("names", nargs=-1, required=True)
def inspect(
    format_spec: str | None, size: bool, object_type: str | None, names: tuple[str, ...]
) -> None:
    """Return low-level information on containers or images, as a JSON array."""
    api = _client()
    found: list[Any] = []
    missing: list[str] = []
    for name in names:
        doc: Any = None
        if object_type in (None, "container"):
            try:
                doc = api.get(_path(name, "json"), {"size": size or None})
            except errors.NotFound:
                doc = None
        if doc is None and object_type in (None, "image"):
            try:
                doc = api.get(f"/images/{quote(name)}/json")
            except errors.NotFound:
                doc = None
        if doc is None:
            missing.append(name)
        else:
            found.append(doc)
    if format_spec:
        template = Template(expand_escapes(format_spec))
        for doc in found:
            click.echo(template.render(doc))
    else:
        click.echo(safe_json(found, indent=4))
    if missing:
        kind = object_type or "object"
        for name in missing[:-1]:
            click.echo(f"husk: No such {kind}: {name}", err=True)
        raise errors.NotFound(f"No such {kind}: {missing[-1]}")
