"""Interactive and attached sessions: attach/exec streams, resizes, signals, exit codes.

Shared by ``husk run``, ``husk start -a`` and ``husk exec``. The order matters:
the output stream and the exit-code wait are opened *before* the container
starts, so neither the first line of output nor a quick exit can be missed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from types import FrameType
from typing import Any

from husk import errors
from husk.client import streams
from husk.client.http import (
    ApiClient,
    BufferedSocket,
    HijackedStream,
    error_for,
    quote,
    read_head,
    send_request,
)
from husk.detachkeys import parse_detach_keys

# Signals a user sends to ``husk run`` that belong to the workload (Docker's --sig-proxy).
PROXIED_SIGNALS = [
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
]


class Interrupted(Exception):
    """The user sent a terminating signal before the workload took over the session."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def interruptible(
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP),
) -> Iterator[None]:
    """Turn terminating signals into :class:`Interrupted`, so the caller can clean up.

    Inside, :func:`run_stream` takes the signals over while it forwards them.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def container_path(ref: str, action: str = "") -> str:
    return f"/containers/{quote(ref)}" + (f"/{action}" if action else "")


class ExitWaiter:
    """``POST /containers/{id}/wait``, registered now, its answer read on a thread.

    The daemon sends the headers as soon as the wait is registered (Docker does
    the same), so once the constructor returns, starting the container cannot
    outrun the wait, however quickly the workload exits.
    """

    REGISTER_TIMEOUT = 30.0

    def __init__(self, api: ApiClient, ref: str, condition: str = "next-exit") -> None:
        import threading  # lazy: CLI start-up (a waiter is run's and start's; exec has none)

        self._done = threading.Event()
        self._status: int | None = None
        self._error: errors.HuskError | None = None
        self._sock = api.connect_socket(self.REGISTER_TIMEOUT)
        try:
            target = api.target(container_path(ref, "wait"), {"condition": condition})
            send_request(self._sock, "POST", target, {}, b"")
            response = read_head(BufferedSocket(self._sock), "POST")
            if response.status >= 300:
                raise error_for(response.status, response.read())
        except BaseException:
            self._sock.close()
            raise
        self._sock.settimeout(None)  # the workload may run for as long as it likes
        self._response = response
        self._thread = threading.Thread(target=self._read, name="husk-wait", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            body = self._response.read()
            doc = json.loads(body) if body.strip() else {}
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            message = (doc.get("Error") or {}).get("Message")
            if message:
                self._error = errors.Internal(str(message))
            self._status = int(doc.get("StatusCode", 0))
        except errors.HuskError as err:
            self._error = err
        except (OSError, ValueError, TypeError) as err:
            self._error = errors.Internal(f"waiting for the container failed: {err}")
        finally:
            self._sock.close()
            self._done.set()

    def result(self, timeout: float | None = None) -> int:
        """The exit code; waits as long as the container runs (or ``timeout``)."""
        if not self._done.wait(timeout):
            raise errors.Internal(f"the container did not exit within {timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self._status is not None
        return self._status

    def cancel(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


def attach_container(
    api: ApiClient, ref: str, *, stdin: bool, logs: bool = False, detach_keys: str = ""
) -> HijackedStream:
    query: dict[str, Any] = {
        "stream": True,
        "stdin": stdin,
        "stdout": True,
        "stderr": True,
        "logs": logs,
    }
    if detach_keys:
        query["detachKeys"] = detach_keys
    return api.hijack(container_path(ref, "attach"), query=query)


def run_stream(
    api: ApiClient,
    stream: HijackedStream,
    *,
    tty: bool,
    forward_stdin: bool,
    resize_path: str | None,
    kill_path: str | None,
    detach_keys: str = "",
    sink: streams.OutputSink | None = None,
) -> bool:
    """Pump a session until its output ends; restores the terminal whatever happens.

    ``sink``: where the output goes (by default stdout and stderr, framed as the stream's
    content type says).

    ``resize_path``: where to POST the terminal size on start and on SIGWINCH.
    ``kill_path``: where to forward the user's signals (None: not forwarded).
    ``detach_keys``: on a terminal session with stdin, typing them leaves the session
    (True is returned then: detached, the workload still running).
    """
    stdin_fd = 0 if forward_stdin else None
    raw = tty and forward_stdin and os.isatty(0)
    watched = [*(PROXIED_SIGNALS if kill_path else []), *([signal.SIGWINCH] if tty else [])]

    def send_size() -> None:
        if resize_path is not None:
            size = streams.terminal_size(0 if os.isatty(0) else 1)
            if size is not None:
                rows, cols = size
                with contextlib.suppress(errors.HuskError, OSError):
                    api.post(resize_path, {"h": rows, "w": cols}, timeout=10)

    def on_signal(signum: int) -> None:
        if signum == signal.SIGWINCH:
            send_size()
        elif kill_path is not None:
            with contextlib.suppress(errors.HuskError, OSError):
                api.post(kill_path, {"signal": signum}, timeout=10)

    if sink is None:
        sink = streams.OutputSink(multiplexed=stream.multiplexed(tty))
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(streams.SignalPipe(watched)) if watched else None
        if raw:
            stack.enter_context(streams.RawTerminal(0))
        if tty:
            send_size()
        detached = streams.pump(
            stream,
            sink,
            stdin_fd=stdin_fd,
            signals=signals,
            on_signal=on_signal,
            detach_keys=parse_detach_keys(detach_keys) if tty and forward_stdin else None,
        )
    stream.close()
    return detached


def inspect(api: ApiClient, ref: str) -> dict[str, Any]:
    doc = api.get(container_path(ref, "json"))
    if not isinstance(doc, dict):
        raise errors.Internal(f"the husk daemon sent no description of container {ref}")
    return doc
