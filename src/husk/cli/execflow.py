"""``husk exec``'s work, without click: the command's parser (:mod:`husk.cli.execute`) and
the quick path that skips click (:mod:`husk.cli.quick`) both end here."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from husk import errors
from husk.cli.exitcodes import start_failure_exit_code
from husk.client import session
from husk.client.daemon import connect
from husk.client.http import ApiClient, quote
from husk.client.streams import OutputSink, terminal_size

EXIT_STATUS_HEADER = "X-Husk-Exit-Status"
"""Asks husk's daemon for the exit status frame (:data:`husk.client.streams.EXIT_STATUS`)."""

EXIT_CODE_DEADLINE = 10.0


def execute(
    *,
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
    """Runs ``command`` in ``container`` as ``husk exec`` does; exits with its exit code."""
    if not command:
        raise errors.InvalidArgument("exec needs a command to run in the container")
    if privileged:
        raise errors.NotSupported(
            "exec --privileged is not supported: every husk container is its own VM"
        )
    if workdir is not None and not workdir.startswith("/"):
        raise errors.InvalidArgument(f"the working directory {workdir!r} is not an absolute path")
    if tty and interactive and not detach and not os.isatty(0):
        raise errors.InvalidArgument("the input device is not a TTY")
    attach = not detach
    environment: list[str] = []
    if env or env_file:
        # lazy: CLI start-up (createopts: the run options' checks, re; only with -e)
        from husk.cli.createopts import env_values, read_env_files

        environment = [*read_env_files(env_file), *env_values(env)]
    body = {
        "Cmd": list(command),
        "Env": environment,
        "User": user or "",
        "WorkingDir": workdir or "",
        "Tty": tty,
        "AttachStdin": interactive and attach,
        "AttachStdout": attach,
        "AttachStderr": attach,
        "Detach": detach,
    }
    api = connect()
    created = api.post(session.container_path(container, "exec"), json_body=body) or {}
    exec_id = str(created.get("Id") or "")
    if not exec_id:
        raise errors.Internal("the husk daemon created an exec session but sent no id")
    start_path = f"/exec/{quote(exec_id)}/start"
    if detach:
        api.post(start_path, json_body={"Detach": True, "Tty": tty})
        return
    start_body: dict[str, Any] = {"Detach": False, "Tty": tty}
    if tty:
        size = terminal_size(0) or terminal_size(1)
        if size is not None:
            start_body["ConsoleSize"] = list(size)
    # A session without a terminal has framed output: its exit code can come as a last
    # frame (husk's daemon sends it when asked), one request fewer than Docker's CLI.
    headers = {} if tty else {EXIT_STATUS_HEADER: "frame"}
    try:
        stream = api.hijack(start_path, json_body=start_body, headers=headers)
    except errors.HuskError as err:
        # lazy: CLI start-up (husk.cli.format: json, re and the template engine; errors only)
        from husk.cli.format import escape_text

        print(f"husk: {escape_text(str(err))}", file=sys.stderr, flush=True)
        sys.exit(start_failure_exit_code(err))
    sink = OutputSink(multiplexed=stream.multiplexed(tty), exit_status=not tty)
    detached = session.run_stream(
        api,
        stream,
        tty=tty,
        forward_stdin=interactive,
        resize_path=f"/exec/{quote(exec_id)}/resize" if tty else None,
        kill_path=None,
        sink=sink,
    )
    sys.stdout.flush()
    if detached:  # the process runs on
        sys.exit(0)
    # Without the frame (a tty session, a daemon that does not send it): asked, as Docker does.
    sys.exit(sink.exit_code if sink.exit_code is not None else exit_code(api, exec_id))


def exit_code(api: ApiClient, exec_id: str) -> int:
    """The session's exit code, which may land a moment after its output ends."""
    deadline = time.monotonic() + EXIT_CODE_DEADLINE
    while True:
        result = api.get(f"/exec/{quote(exec_id)}/json") or {}
        code = result.get("ExitCode")
        if code is not None and not result.get("Running"):
            return int(code)
        if time.monotonic() > deadline:
            raise errors.Internal(
                f"the exec session {exec_id[:12]} ended without an exit code "
                f"within {EXIT_CODE_DEADLINE:g} s"
            )
        time.sleep(0.02)
