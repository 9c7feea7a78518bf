"""``husk run``'s and ``husk create``'s work, without click.

The click commands (:mod:`husk.cli.run`) and the quick parse of ``husk run``
(:mod:`husk.cli.quick`) both end here, so a plain ``husk run --rm IMAGE CMD`` never
imports click (about a third of a short command's start).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, NoReturn

from husk import errors
from husk.cli.createopts import CreateRequest, build_create_request
from husk.cli.exitcodes import start_failure_exit_code
from husk.client import images, session
from husk.client.daemon import connect
from husk.client.http import ApiClient
from husk.client.session import container_path
from husk.client.streams import terminal_size
from husk.detachkeys import parse_detach_keys

REMOVAL_DEADLINE = 30.0


def say(text: str) -> None:
    """One line on stderr, at once (as ``click.echo(..., err=True)`` wrote it)."""
    print(text, file=sys.stderr, flush=True)


def escaped(err: errors.HuskError) -> str:
    # lazy: CLI start-up (husk.cli.format: json, re and the template engine; errors only)
    from husk.cli.format import escape_text

    return escape_text(str(err))


def create_container(api: ApiClient, request: CreateRequest) -> str:
    """Create the container, pulling its image as ``--pull`` says (Docker's CLI flow)."""
    policy = request.pull_policy
    if policy in ("always", "newer"):
        try:
            images.pull(api, request.image, platform=request.platform)
        except errors.HuskError:
            if policy == "always" or not images.image_exists(api, request.image):
                raise
            say(f"husk: could not check {request.image} for a newer version; using the local one")
    elif policy == "never" and not images.image_exists(api, request.image):
        raise errors.NotFound(f"No such image: {request.image} (and --pull=never)")
    try:
        result = api.post("/containers/create", request.query(), request.body)
    except errors.NotFound:
        if policy != "missing" or images.image_exists(api, request.image):
            raise
        say(f"Unable to find image '{request.image}' locally")
        images.pull(api, request.image, platform=request.platform)
        result = api.post("/containers/create", request.query(), request.body)
    if not isinstance(result, dict) or not result.get("Id"):
        raise errors.Internal("the husk daemon created a container but sent no id")
    for warning in result.get("Warnings") or []:
        say(f"WARNING: {warning}")
    return str(result["Id"])


def remove_container(api: ApiClient, container_id: str, *, wait_gone: bool = False) -> None:
    """Force-remove with its anonymous volumes (as AutoRemove does), tolerating a daemon
    that is removing it already."""
    with contextlib.suppress(errors.NotFound, errors.Conflict):
        api.delete(
            container_path(container_id), {"force": True, "v": True}, timeout=REMOVAL_DEADLINE
        )
    if not wait_gone:
        return
    deadline = time.monotonic() + REMOVAL_DEADLINE
    while time.monotonic() < deadline:
        try:
            api.get(container_path(container_id, "json"), timeout=10)
        except errors.NotFound:
            return
        time.sleep(0.05)
    raise errors.Internal(f"container {container_id[:12]} was not removed within 30 s")


def fail(err: errors.HuskError, code: int) -> NoReturn:
    say(f"husk: {escaped(err)}")
    sys.exit(code)


def run_parsed(
    *,
    image: str,
    command: tuple[str, ...],
    detach: bool,
    sig_proxy: bool,
    detach_keys: str,
    options: dict[str, Any],
) -> None:
    """``husk run`` from parsed arguments (the quick parse's): build the request, run it."""
    parse_detach_keys(detach_keys)  # a bad sequence is refused before anything is created
    request = build_create_request(image, command, options, attach=not detach)
    run_request(request, detach=detach, sig_proxy=sig_proxy, detach_keys=detach_keys)


def run_request(request: CreateRequest, *, detach: bool, sig_proxy: bool, detach_keys: str) -> None:
    """Creates and runs the container; exits with the workload's code unless detached."""
    if request.tty and request.interactive and not detach and not os.isatty(0):
        raise errors.InvalidArgument("the input device is not a TTY")
    if request.tty:
        size = terminal_size(0) or terminal_size(1)
        if size is not None:
            request.body["HostConfig"]["ConsoleSize"] = list(size)
    api = connect()
    created: list[str] = []
    try:
        with session.interruptible():
            code = _run_created(
                api,
                request,
                created,
                detach=detach,
                sig_proxy=sig_proxy,
                detach_keys=detach_keys,
            )
    except session.Interrupted as stop:
        # Interrupted before the workload was attached: leave nothing half-made behind.
        for container_id in created:
            remove_container(api, container_id)
        sys.exit(128 + stop.signum)
    if code is not None:
        sys.stdout.flush()
        sys.exit(code)


def _run_created(
    api: ApiClient,
    request: CreateRequest,
    created: list[str],
    *,
    detach: bool,
    sig_proxy: bool,
    detach_keys: str = "",
) -> int | None:
    """Create, start and (unless detached) attach; the exit code, None when detached."""
    container_id = create_container(api, request)
    created.append(container_id)
    start_path = session.container_path(container_id, "start")
    if detach:
        try:
            api.post(start_path)
        except errors.HuskError as err:
            code = start_failure_exit_code(err)
            remove_container(api, container_id)
            fail(err, code)
        print(container_id, flush=True)
        return None

    try:
        stream = session.attach_container(
            api, container_id, stdin=request.interactive, detach_keys=detach_keys
        )
        # With --rm the daemon removes the container itself; its answer to a wait for
        # the removal carries the exit code (no DELETE and no polling, as Docker's CLI).
        condition = "removed" if request.auto_remove else "next-exit"
        waiter = session.ExitWaiter(api, container_id, condition)
    except errors.HuskError:
        remove_container(api, container_id)
        raise
    try:
        api.post(start_path)
    except errors.HuskError as err:
        waiter.cancel()
        stream.close()
        code = start_failure_exit_code(err)
        remove_container(api, container_id)
        fail(err, code)
    # From here on the workload owns the signals (forwarded) and its exit decides.
    created.clear()
    detached = session.run_stream(
        api,
        stream,
        tty=request.tty,
        forward_stdin=request.interactive,
        resize_path=session.container_path(container_id, "resize") if request.tty else None,
        kill_path=session.container_path(container_id, "kill") if sig_proxy else None,
        detach_keys=detach_keys,
    )
    if detached:  # the user typed the detach keys: the container runs on, as with -d
        waiter.cancel()
        return 0
    if not request.auto_remove:
        return waiter.result()
    try:
        return waiter.result()
    except errors.HuskError as err:
        # The daemon could not remove it: try once more here, and say so if that fails.
        say(f"husk: {escaped(err)}")
        code = exit_code_of(api, container_id)
        remove_container(api, container_id, wait_gone=True)
        return code


def exit_code_of(api: ApiClient, container_id: str) -> int:
    """The recorded exit code of a container that has exited (125 if it has none)."""
    try:
        state = session.inspect(api, container_id).get("State") or {}
        return int(state.get("ExitCode", 125))
    except (errors.HuskError, TypeError, ValueError):
        return 125
