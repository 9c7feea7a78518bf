"""Unix sockets bound from the host: the guest listens, the host connects to the real socket.

A bind whose source is a host unix socket (``-v /run/docker.sock:/var/run/docker.sock``)
cannot be shared over 9p. The agent listens on a unix socket at the target path inside
the container's root instead (LISTEN); each connection a workload makes waits in the
kernel's backlog until the host asks for it with an ACCEPT on a fresh channel, then
travels over that channel exactly like a forwarded port (:mod:`husk.guest.agent.forward`).
The guest only ever says "a connection arrived": which host socket it reaches is the
host's choice, fixed when the container was created.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections import deque
from collections.abc import Callable

from husk.guest.agent import beneath
from husk.guest.agent.forward import Tunnel
from husk.guest.agent.loop import Loop
from husk.guest.agent.system import SystemError_

MAX_PENDING_ACCEPTS = 64
"""ACCEPT requests one listener holds at once (the host sends one at a time)."""
_BACKLOG = 64


def _split_target(target: str) -> tuple[str, str]:
    if not target.startswith("/") or ".." in target.split("/"):
        raise SystemError_(f"socket target must be an absolute path without '..': {target!r}")
    parent, _, name = target.rstrip("/").rpartition("/")
    if not name or name == ".":
        raise SystemError_(f"socket target {target!r} names no file")
    return parent or "/", name


def bind_inside(root: str, target: str, mode: int) -> socket.socket:
    """A listening unix socket at ``target`` of the container whose root is ``root``.

    The parent directory is resolved inside the root (made if missing, symlinks followed
    as the container would); an existing socket there is replaced, anything else refused.
    """
    parent, name = _split_target(target)
    try:
        directory = beneath.open_path(root, parent, create_dirs=True, follow=True)
    except OSError as exc:
        raise SystemError_(f"{parent} in the container: {exc.strerror}") from None
    try:
        if not stat.S_ISDIR(os.fstat(directory).st_mode):
            raise SystemError_(f"{parent} in the container is not a directory")
        try:
            existing = os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if not stat.S_ISSOCK(existing):
                raise SystemError_(f"{target} exists in the container and is not a socket")
            os.unlink(name, dir_fd=directory)
        path = f"{beneath.proc_path(directory)}/{name}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            os.chmod(path, mode & 0o777, follow_symlinks=False)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            reason = exc.strerror
            raise SystemError_(f"cannot listen on {target} in the container: {reason}") from None
        return sock
    finally:
        os.close(directory)


class Listener:
    """One LISTEN: hands its connections to the ACCEPT channels the host opens."""

    def __init__(
        self,
        loop: Loop,
        send: Callable[[bytes], None],
        channel: int,
        sock: socket.socket,
        on_tunnel: Callable[[Tunnel], None],
        on_tunnel_closed: Callable[[Tunnel], None],
    ) -> None:
        self.loop = loop
        self.channel = channel
        self._send = send
        self._sock = sock
        self._on_tunnel = on_tunnel
        self._on_tunnel_closed = on_tunnel_closed
        self._accepts: deque[int] = deque()
        self._watching = False
        self.closed = False

    def want(self, channel: int) -> None:
        """The host waits for the next connection on ``channel``."""
        if self.closed:
            raise SystemError_(f"listener {self.channel} is closed")
        if len(self._accepts) >= MAX_PENDING_ACCEPTS:
            raise SystemError_(f"listener {self.channel} already has {MAX_PENDING_ACCEPTS} accepts")
        self._accepts.append(channel)
        if not self._watching:
            self._watching = True
            self.loop.add_reader(self._sock.fileno(), self._acceptable)

    def _acceptable(self) -> None:
        while self._accepts:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            channel = self._accepts.popleft()
            conn.setblocking(False)
            tunnel = Tunnel.adopt(self.loop, self._send, channel, conn, self._on_tunnel_closed)
            self._on_tunnel(tunnel)
        self._watching = False
        self.loop.remove_reader(self._sock.fileno())

    def close(self) -> list[int]:
        """Stops listening; returns the ACCEPT channels still waiting (to be refused)."""
        if self.closed:
            return []
        self.closed = True
        with contextlib.suppress(ValueError, KeyError):
            self.loop.forget(self._sock.fileno())
        self._sock.close()
        waiting = list(self._accepts)
        self._accepts.clear()
        return waiting
