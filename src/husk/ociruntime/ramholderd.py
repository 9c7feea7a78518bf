"""The RAM holder's process (husk.ociruntime.ramholder has the design).

One per user and husk run directory (a lock file decides), single-threaded: every request
is a dictionary lookup or a store, answered at once. It serves only peers of its own uid,
keeps at most MAX_HELD sealed memfds (least recently used go; clones already running keep
their own mappings) and exits after IDLE_EXIT seconds without a request. Standard library
only, with husk.ociruntime.control for the messages: it starts while a keeper starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from husk.ociruntime import control
from husk.ociruntime.errors import RuntimeFailure
from husk.ociruntime.ramholder import Identity, peer_uid, sealed_memfd

IDLE_EXIT = 300.0
"""Seconds without a request after which the holder exits (and its RAM is freed)."""
MAX_HELD = 2
"""Templates' RAM held at once, as husk's daemon keeps (templates.MAX_SEALED)."""
CONNECTION_TIMEOUT = 1.0


class Store:
    """Sealed memfds by (file identity, digest), least recently used first."""

    def __init__(self, limit: int = MAX_HELD) -> None:
        self.limit = limit
        self.held: OrderedDict[tuple[Identity, str], int] = OrderedDict()

    def get(self, key: tuple[Identity, str]) -> int | None:
        fd = self.held.get(key)
        if fd is not None:
            self.held.move_to_end(key)
        return fd

    def put(self, key: tuple[Identity, str], fd: int) -> None:
        old = self.held.pop(key, None)
        if old is not None:
            os.close(old)
        self.held[key] = fd
        while len(self.held) > self.limit:
            _, evicted = self.held.popitem(last=False)
            os.close(evicted)


def parse_key(body: dict[str, Any]) -> tuple[Identity, str]:
    identity, digest = body.get("identity"), body.get("sha256")
    if (
        not isinstance(identity, list)
        or len(identity) != 5
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in identity)
        or not isinstance(digest, str)
        or not digest
    ):
        raise RuntimeFailure("malformed request")
    a, b, c, d, e = identity
    return (a, b, c, d, e), digest


def serve(connection: control.Connection, store: Store) -> None:
    """Answers one request (the connection's peer is of this user: checked by the caller)."""
    body, fds = connection.receive(with_fds=True)
    try:
        if body is None:
            return
        op = body.get("op")
        key = parse_key(body)
        if op == "get":
            fd = store.get(key)
            if fd is None:
                connection.send({"missing": True})
            else:
                connection.send({"ok": True}, [fd])
        elif op == "put":
            # What a keeper loaded and checked itself: kept only if nobody can change it.
            if len(fds) == 1 and sealed_memfd(fds[0], key[0][2]):
                store.put(key, fds.pop())
        else:
            connection.send({"error": f"unknown request {op!r}"})
    finally:
        for fd in fds:
            os.close(fd)


def _take_lock(path: str) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # another holder serves this run directory
    return fd


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a dead holder's (we hold the lock)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        server.bind(path)
    finally:
        os.umask(old)
    server.listen(64)
    return server


def run(path: str, lock_path: str, idle_exit: float = IDLE_EXIT) -> None:
    lock = _take_lock(lock_path)
    if lock is None:
        return
    server = _listen(path)
    bound = os.stat(path).st_ino
    store = Store()
    server.settimeout(idle_exit)
    try:
        while True:
            try:
                sock, _ = server.accept()
            except TimeoutError:
                return
            try:
                sock.settimeout(CONNECTION_TIMEOUT)
                if peer_uid(sock) == os.geteuid():
                    serve(control.Connection(sock), store)
            except (OSError, RuntimeFailure):
                pass  # one bad client must not end the holder
            finally:
                sock.close()
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == bound:
                os.unlink(path)
        server.close()
        os.close(lock)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        sys.exit("usage: ramholderd SOCKET LOCK")
    with contextlib.suppress(KeyboardInterrupt):
        run(args[0], args[1])
