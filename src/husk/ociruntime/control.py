"""The keeper's control socket: one JSON request per connection, JSON lines back.

A request is one line (a JSON object) sent with the descriptors it needs (SCM_RIGHTS:
exec's stdio). Replies are JSON lines; ``{"error": message}`` is a refusal. Only the
standard library is used here: every short-lived command imports this module.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any

from husk.ociruntime.errors import RuntimeFailure

MAX_LINE = 1 << 20
MAX_FDS = 4


class Connection:
    """One side of a control connection (client or keeper)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    def send(self, body: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = (json.dumps(body) + "\n").encode()
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def receive(self, with_fds: bool = False) -> tuple[dict[str, Any] | None, list[int]]:
        """The next message (None at end of stream) and the descriptors that came with it."""
        fds: list[int] = []
        while b"\n" not in self._buffer:
            if with_fds and not fds:
                chunk, received, _, _ = socket.recv_fds(self.sock, 65536, MAX_FDS)
                fds.extend(received)
            else:
                chunk = self.sock.recv(65536)
            if not chunk:
                return None, fds
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise RuntimeFailure("control message too long")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            body = json.loads(line)
        except (ValueError, RecursionError):  # nested too deep for the parser
            raise RuntimeFailure("malformed control message") from None
        if not isinstance(body, dict):
            raise RuntimeFailure("malformed control message")
        return body, fds

    def close(self) -> None:
        self.sock.close()


def connect(path: str, timeout: float | None = 30.0) -> Connection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise RuntimeFailure(
            f"cannot reach the container's keeper: {exc.strerror or exc}"
        ) from None
    return Connection(sock)


def request(
    path: str, body: dict[str, Any], fds: Sequence[int] = (), timeout: float = 60.0
) -> dict[str, Any]:
    """One request and its one reply; a refusal raises RuntimeFailure."""
    connection = connect(path, timeout)
    try:
        connection.send(body, fds)
        try:
            reply, _ = connection.receive()
        except TimeoutError:
            raise RuntimeFailure(f"the keeper did not answer {body.get('op')} in time") from None
        except OSError as exc:
            raise RuntimeFailure(f"the keeper's connection failed: {exc}") from None
    finally:
        connection.close()
    if reply is None:
        raise RuntimeFailure(f"the keeper closed the connection during {body.get('op')}")
    if "error" in reply:
        raise RuntimeFailure(str(reply["error"]))
    return reply
