"""Reaching the husk daemon: its socket, and starting it on demand.

The first request of every command simply connects; only when nothing answers
is a daemon started (detached, in its own session) and waited for, with a
deadline. The daemon keeps its own log in ``run_dir()/daemon.log``; what it
prints before that log exists (an import error, say) goes to
``run_dir()/daemon.out``. A lock file keeps two
commands started at once from spawning two daemons.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from husk import errors, paths, settings
from husk.client.http import ApiClient

LOG_NAME = "daemon.log"
CONSOLE_NAME = "daemon.out"
_POLL_INTERVAL = 0.05


socket_path = paths.socket_path


def log_path() -> Path:
    return paths.run_dir() / LOG_NAME


def check_location(path: Path) -> None:
    """Refuse a socket (or run directory) that another user could have put there.

    The connection itself is checked too (:func:`husk.client.http.check_peer`): this
    check names the path at fault before anything is sent.
    """
    if settings.socket_override() is None:
        paths.check_run_dir()
    paths.check_socket(path)


def connect(*, autostart: bool = True) -> ApiClient:
    """A client of the daemon; it starts one if the socket does not answer."""
    check_location(socket_path())
    path = str(socket_path())
    if not autostart:
        return ApiClient(path)
    return ApiClient(path, on_unavailable=lambda: ensure_daemon(path))


start_timeout = settings.daemon_start_timeout


def ensure_daemon(path: str | None = None) -> None:
    """Start ``husk daemon`` unless one answers, and wait until it does."""
    sock = path or str(socket_path())
    probe = ApiClient(sock)
    if probe.ping():
        return
    run_dir = paths.secure_run_dir()
    with open(run_dir / "daemon-start.lock", "w") as lock:
        # Another command may be starting it right now: wait for its outcome.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if probe.ping():
            return
        _spawn_and_wait(probe, run_dir / CONSOLE_NAME, start_timeout())


def daemon_command() -> list[str]:
    return [sys.executable, "-m", "husk.cli.main", "daemon"]


def _spawn_and_wait(probe: ApiClient, log_file: Path, timeout: float) -> None:
    # lazy: CLI start-up (subprocess ~3 ms, on every `husk ps`; needed only to start a daemon)
    import subprocess

    with open(log_file, "wb") as log:
        log.write(f"--- husk daemon started on demand at {time.ctime()}\n".encode())
        log.flush()
        process = subprocess.Popen(
            daemon_command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe.ping(timeout=1.0):
            return
        code = process.poll()
        if code is not None:
            if _answers_soon(probe):
                return
            raise errors.Internal(
                f"the husk daemon exited with code {code} while starting"
                f"{_last_line(log_file)}; see {log_file} and {log_path()}"
            )
        time.sleep(_POLL_INTERVAL)
    raise errors.Internal(
        f"the husk daemon did not answer on {probe.socket_path} within {timeout:g} s; "
        f"see {log_path()}"
    )


def _answers_soon(probe: ApiClient, grace: float = 2.0) -> bool:
    """After our daemon exited: whether another one (started meanwhile) answers."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if probe.ping(timeout=1.0):
            return True
        time.sleep(_POLL_INTERVAL)
    return False


def _last_line(log_file: Path) -> str:
    try:
        with open(log_file, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
            lines = [line for line in log.read().decode("utf-8", "replace").splitlines() if line]
    except OSError:
        return ""
    return f" ({lines[-1].strip()})" if lines else ""
