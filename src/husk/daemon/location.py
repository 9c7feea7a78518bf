"""Where the daemon listens and keeps its files, and whether one already answers there.

The CLI uses :func:`socket_path` and :func:`daemon_answers` to find (or start) the
daemon; the daemon uses the rest to claim its run directory.
"""

from __future__ import annotations

import socket
from pathlib import Path

from husk.paths import run_dir, socket_path

__all__ = ["daemon_answers", "docker_host", "lock_path", "log_path", "pid_path", "socket_path"]

PING_REQUEST = b"GET /_ping HTTP/1.1\r\nHost: husk\r\nConnection: close\r\n\r\n"


def pid_path() -> Path:
    return run_dir() / "husk.pid"


def lock_path() -> Path:
    """Held for the daemon's lifetime: one daemon per run directory."""
    return run_dir() / "daemon.lock"


def log_path() -> Path:
    return run_dir() / "daemon.log"


def docker_host(path: Path | None = None) -> str:
    """The ``DOCKER_HOST`` value that points Docker clients at this daemon."""
    return f"unix://{path or socket_path()}"


def daemon_answers(path: Path | None = None, timeout: float = 2.0) -> bool:
    """True if something answers ``GET /_ping`` with ``OK`` on the unix socket ``path``."""
    target = path or socket_path()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(target))
            sock.sendall(PING_REQUEST)
            reply = b""
            while len(reply) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200") and body.rstrip().endswith(b"OK")
