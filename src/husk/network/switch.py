"""The user-space Ethernet switch between the VMs' LAN NICs (docs/NETWORKS.md).

One process per run directory, ``python3 -m husk.network.switch --socket PATH``. It holds
the switch's end of every LAN slot's socketpair (QEMU holds the other as ``-netdev
socket,fd=N``); each such *port* is attached to at most one network segment. Frames go
only between ports of the same segment: unicast to the port a destination MAC was learned
on, broadcast, multicast and unknown unicast flooded to the segment's other ports.

It outlives the daemon that started it, so running containers keep their LAN across a
daemon restart; it exits on SIGTERM, or by itself after ``--idle-exit`` seconds without
ports or control connections. Control: JSON lines on a unix socket (see
:mod:`husk.network.switchcontrol`), descriptors by SCM_RIGHTS.

Forwarding is :mod:`husk.network.fabric`, the control protocol :mod:`husk.network.switchcontrol`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

from husk.network import switchcontrol, switchstate
from husk.network.fabric import MAC_AGE, QUEUE_LIMIT, Switch

log = logging.getLogger("husk.switch")

IDLE_EXIT = 60.0

EXIT_ALREADY_RUNNING = 3
EXIT_BAD_SOCKET = 2


class Server:
    """The switch process: the switch, its control socket, idle exit, state file."""

    def __init__(
        self,
        socket_path: Path,
        state_path: Path,
        *,
        idle_exit: float = IDLE_EXIT,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        self.socket_path = socket_path
        self.state_path = state_path
        self.idle_exit = idle_exit
        self.queue_limit = queue_limit
        self.record = switchstate.own_record(socket_path)

    async def run(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        switch = Switch(loop, queue_limit=self.queue_limit)
        stopping = loop.create_future()

        def stop(reason: str) -> None:
            if not stopping.done():
                log.info("stopping: %s", reason)
                stopping.set_result(None)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop, signal.Signals(signum).name)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # outlives the terminal / daemon session
        control = switchcontrol.ControlServer(loop, switch, listener, self.record)
        aging = loop.create_task(self._age(switch))
        idle = loop.create_task(self._idle(switch, control, stop))
        try:
            await stopping
        finally:
            aging.cancel()
            idle.cancel()
            control.close()
            switch.close()

    async def _age(self, switch: Switch) -> None:
        while True:
            await asyncio.sleep(MAC_AGE)
            switch.age()

    async def _idle(
        self, switch: Switch, control: switchcontrol.ControlServer, stop: Callable[[str], None]
    ) -> None:
        interval = max(0.05, min(1.0, self.idle_exit / 4))
        idle_since = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            if switch.ports or control.connections:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.idle_exit:
                stop(f"idle for {self.idle_exit:g} s (no ports, no control connection)")
                return


# -- process set-up ---------------------------------------------------------------------


def _lock(path: Path) -> int | None:
    """Hold the switch's lock for the process's lifetime: one switch per run directory."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class SocketInUse(Exception):
    pass


def listen(path: Path) -> socket.socket:
    """Bind the control socket (mode 0600), replacing only a stale socket of a dead switch."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket")
        if _answers(path):
            raise SocketInUse(f"something already answers on {path}")
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(64)
    listener.setblocking(False)
    return listener


def _unlink_if_ours(path: Path, identity: tuple[int, int]) -> None:
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)


def _setup_logging(log_file: Path | None) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s switch[%(process)d] %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m husk.network.switch", description="husk's user-space Ethernet switch"
    )
    parser.add_argument("--socket", type=Path, required=True, help="control socket to create")
    parser.add_argument(
        "--state", type=Path, help="state file (pid, start time); default: switch.json beside it"
    )
    parser.add_argument("--log", type=Path, help="log file (default: standard error)")
    parser.add_argument(
        "--idle-exit",
        type=_positive,
        default=IDLE_EXIT,
        help="exit after this many seconds without ports or control connections",
    )
    parser.add_argument(
        "--queue-limit",
        type=_positive_int,
        default=QUEUE_LIMIT,
        help="bytes queued for a slow peer before its frames are dropped",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.log)
    socket_path: Path = args.socket.absolute()
    state_path: Path = args.state or socket_path.parent / switchstate.STATE_NAME
    try:
        lock = _lock(socket_path.parent / switchstate.LOCK_NAME)
    except OSError as err:
        log.error("cannot lock %s: %s", socket_path.parent, err.strerror or err)
        return EXIT_BAD_SOCKET
    if lock is None:
        log.info("another switch holds %s: not starting", socket_path.parent)
        return EXIT_ALREADY_RUNNING
    try:
        try:
            listener = listen(socket_path)
        except SocketInUse as err:
            log.error("cannot listen: %s", err)
            return EXIT_BAD_SOCKET
        except OSError as err:
            log.error("cannot listen on %s: %s", socket_path, err.strerror or err)
            return EXIT_BAD_SOCKET
        info = os.lstat(socket_path)
        identity = (info.st_dev, info.st_ino)
        server = Server(
            socket_path, state_path, idle_exit=args.idle_exit, queue_limit=args.queue_limit
        )
        switchstate.write_record(state_path, server.record)
        log.info("listening on %s (idle exit after %g s)", socket_path, args.idle_exit)
        try:
            asyncio.run(server.run(listener))
        finally:
            listener.close()
            _unlink_if_ours(socket_path, identity)
            switchstate.forget_record(state_path, server.record)
        log.info("stopped")
        return 0
    finally:
        os.close(lock)


if __name__ == "__main__":
    sys.exit(main())
