"""Terminals as runc hands them over: a pty whose master goes over ``--console-socket``."""

from __future__ import annotations

import fcntl
import os
import socket
import termios
import tty

from husk.ociruntime.errors import RuntimeFailure


def send_console(socket_path: str, master: int) -> None:
    """Hands the pty's master to the engine over ``--console-socket`` (as runc does)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        socket.send_fds(sock, [b"/dev/ptmx"], [master])
    except OSError as exc:
        raise RuntimeFailure(f"cannot send the terminal to {socket_path}: {exc}") from None
    finally:
        sock.close()


def open_terminal(console_socket: str | None) -> int:
    """A new pty: its master goes to the engine, its slave (returned, raw) stays here."""
    if not console_socket:
        raise RuntimeFailure("process.terminal needs --console-socket")
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        send_console(console_socket, master)
    except BaseException:
        os.close(slave)
        raise
    finally:
        os.close(master)
    return slave


def window_size(fd: int) -> tuple[int, int]:
    packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    rows, cols = int.from_bytes(packed[0:2], "little"), int.from_bytes(packed[2:4], "little")
    return rows, cols
