"""Boot templates' RAM kept loaded between husk-runtime's keepers, by a *RAM holder*.

A VM restored from a boot template maps the template's RAM from a sealed memfd that was
checked against the template's recorded digest (husk.sandbox.templates.sealed_memory).
husk's daemon loads that memfd once and keeps it; every keeper is a new process and used
to load and hash the guest's RAM again (about 115 MB, 0.15 CPU-seconds per container,
the largest part of what an engine's ``run`` cost more than ``husk run``).

The holder is a small process of the same user, started on demand by a keeper that finds
none (:func:`ensure_running`, before the keeper makes its own namespaces), which keeps
the sealed memfds keepers hand it (:class:`Holder.put`) and gives a keeper a descriptor of
one (:class:`Holder.get`): the memfd cannot be written, resized or unsealed by anyone, so
sharing it shares only read-only pages (the clones map it privately). The keeper checks
what it receives (a memfd with every seal, of the recorded size, from a peer of its own
uid); the holder serves only peers of its own uid (SO_PEERCRED) on a 0600 socket in
husk's run directory. It exits after IDLE_EXIT seconds without a request. Whatever goes
wrong with it (none running, no answer, a refusal) the keeper loads the RAM itself, as
before. ``HUSK_NO_RAM_HOLDER=1`` turns it off.

This module is the keepers' side; :mod:`husk.ociruntime.ramholderd` is the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import sys
from pathlib import Path

from husk import settings
from husk.ociruntime import control
from husk.ociruntime.errors import RuntimeFailure

SOCKET_NAME = "husk-runtime-ram.sock"
LOCK_NAME = "husk-runtime-ram.lock"
REQUEST_TIMEOUT = 2.0
"""Seconds a keeper waits for the holder's answer (a lookup: it answers at once)."""
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
HOLDER_MODULE = "husk.ociruntime.ramholderd"

Identity = tuple[int, int, int, int, int]


def enabled() -> bool:
    return not settings.ram_holder_disabled()


def socket_path(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return int(uid)


def _connect(path: Path) -> control.Connection:
    """A connection to the holder at ``path``; OSError if none answers there, RuntimeFailure
    if what answers is not a process of this user."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(REQUEST_TIMEOUT)
    try:
        sock.connect(str(path))
        if peer_uid(sock) != os.geteuid():
            raise RuntimeFailure(f"{path} is not served by this user's RAM holder")
    except BaseException:
        sock.close()
        raise
    return control.Connection(sock)


def sealed_memfd(fd: int, size: int) -> bool:
    """Whether ``fd`` is a memfd of ``size`` bytes that nobody can change any more."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        return seals & SEALS == SEALS and os.fstat(fd).st_size == size
    except OSError:  # not a memfd (no seals on other files)
        return False


class Holder:
    """The keepers' end (husk.sandbox.templates.SharedMemory): never raises, never waits
    longer than REQUEST_TIMEOUT."""

    def __init__(self, run_dir: Path) -> None:
        self.path = socket_path(run_dir)

    def get(self, identity: Identity, digest: str, size: int) -> int | None:
        fds: list[int] = []
        try:
            connection = _connect(self.path)
            try:
                connection.send({"op": "get", "identity": list(identity), "sha256": digest})
                reply, fds = connection.receive(with_fds=True)
            finally:
                connection.close()
        except (OSError, RuntimeFailure):
            reply = None
        if reply is not None and reply.get("ok") and len(fds) == 1 and sealed_memfd(fds[0], size):
            return fds[0]
        for fd in fds:
            os.close(fd)
        return None

    def put(self, identity: Identity, digest: str, memfd: int) -> None:
        # Fire and forget: once sent, the descriptor is the holder's whatever we do next.
        with contextlib.suppress(OSError, RuntimeFailure):
            connection = _connect(self.path)
            try:
                connection.send(
                    {"op": "put", "identity": list(identity), "sha256": digest}, [memfd]
                )
            finally:
                connection.close()


def ensure_running(run_dir: Path) -> None:
    """Starts a holder if none answers at ``run_dir``; never fails (the keeper then loads
    the RAM itself). Called by the keeper first thing, still single-threaded and in the
    engine's namespaces: the holder outlives the container and must hold none of its
    mounts, namespaces or descriptors."""
    if not enabled():
        return
    from husk import paths  # lazy: the hot commands import this module's users

    try:
        # Checked as the daemon's run directory is: another user must not be able to
        # plant a socket (or a holder) where keepers look for theirs.
        path = socket_path(paths.secure_run_dir(run_dir))
    except (OSError, paths.UnsafePath):
        return
    try:
        _connect(path).close()
        return
    except (FileNotFoundError, ConnectionRefusedError):
        pass  # none there: start one
    except (OSError, RuntimeFailure):
        return  # something else is wrong: not ours to fix here
    with contextlib.suppress(OSError):
        _spawn(path, run_dir / LOCK_NAME)


def _spawn(path: Path, lock: Path) -> None:
    """Starts the holder detached (its own session, /dev/null for stdio, no other
    descriptor) and returns at once: an engine's pipes held by it would never close."""
    argv = [
        sys.executable,
        "-c",
        f"from {HOLDER_MODULE} import main; main()",
        str(path),
        str(lock),
    ]
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                os.chdir("/")
                os.execv(sys.executable, argv)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
