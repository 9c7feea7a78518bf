"""``husk daemon``: one long-lived process that owns the runtime and serves the API.

It claims its run directory with a lock (one daemon per directory), refuses to
start when another daemon answers on the socket, removes a stale socket, serves
the Docker Engine API on a unix socket (and optionally on a loopback TCP port),
and on SIGTERM/SIGINT detaches from the VMs (they keep running) and exits.

Whoever can talk to the API controls the host (a container can bind-mount ``/``),
so a TCP listener is only served with TLS client certificates, as dockerd's
``--tlsverify``: a client must present a certificate signed by ``--tlscacert``.
Without them ``--tcp`` is refused at startup. The listener is loopback-only too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import logging.handlers
import os
import resource
import signal
import socket
import ssl
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from husk import settings
from husk.daemon.docker import build_app
from husk.daemon.location import daemon_answers, lock_path, log_path, pid_path, socket_path
from husk.errors import Conflict, InvalidArgument
from husk.humanize import escape_controls
from husk.paths import check_socket, run_dir, secure_run_dir
from husk.runtime.runtime import Runtime

log = logging.getLogger("husk.daemon")

SOCKET_MODE = 0o660
SHUTDOWN_TIMEOUT = 3.0
LOG_BYTES = 10 * 1024 * 1024
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class TlsFiles:
    """dockerd's ``--tlscacert``, ``--tlscert`` and ``--tlskey``."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class DaemonOptions:
    socket: Path
    tcp: tuple[str, int] | None = None
    debug: bool = False
    tls: ssl.SSLContext | None = None


def default_cert_dir() -> Path:
    """Where dockerd looks for its TLS files: ``DOCKER_CERT_PATH``, else ``~/.docker``."""
    configured = settings.docker_cert_path()
    if configured:
        return configured
    try:
        return Path.home() / ".docker"
    except RuntimeError:  # no HOME and no passwd entry
        raise InvalidArgument(
            "give --tlscacert, --tlscert and --tlskey (or DOCKER_CERT_PATH): "
            "there is no home directory to look in"
        ) from None


def tls_files(ca: Path | None, cert: Path | None, key: Path | None) -> TlsFiles:
    """The three files, each defaulting to dockerd's name in :func:`default_cert_dir`."""
    if ca and cert and key:
        return TlsFiles(ca, cert, key)
    base = default_cert_dir()
    return TlsFiles(ca or base / "ca.pem", cert or base / "cert.pem", key or base / "key.pem")


def server_tls_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS server context that requires a client certificate signed by ``files.ca``."""
    for option, path in (("--tlscacert", files.ca), ("--tlscert", files.cert)):
        if not path.is_file():
            raise InvalidArgument(f"cannot read {option} {path}: no such file")
    if not files.key.is_file():
        raise InvalidArgument(f"cannot read --tlskey {files.key}: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as err:
        raise InvalidArgument(
            f"cannot use --tlscert {files.cert} with --tlskey {files.key}: {err}"
        ) from None
    try:
        context.load_verify_locations(cafile=str(files.ca))
    except (ssl.SSLError, OSError) as err:
        raise InvalidArgument(f"cannot use --tlscacert {files.ca}: {err}") from None
    # Only clients holding a certificate from this CA get in (OpenSSL also checks that
    # its extended key usage, if any, allows client authentication).
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def tcp_listener(
    tcp: str | None, *, tlsverify: bool, files: TlsFiles
) -> tuple[tuple[str, int] | None, ssl.SSLContext | None]:
    """The TCP address and TLS context to serve, or a refusal naming what is missing."""
    if tcp is None:
        if tlsverify:
            raise InvalidArgument("--tlsverify only applies to a --tcp listener")
        return None, None
    address = parse_tcp_address(tcp)
    if not tlsverify:
        raise InvalidArgument(
            f"refusing to serve the API on tcp://{tcp} without TLS client certificates: "
            "anything that reaches the port would control the host; add --tlsverify "
            "--tlscacert CA --tlscert CERT --tlskey KEY (as dockerd), or use the unix socket"
        )
    return address, server_tls_context(files)


def parse_tcp_address(text: str) -> tuple[str, int]:
    """``127.0.0.1:PORT`` or ``[::1]:PORT``; loopback only, never the host's other addresses."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.rpartition(":")
    try:
        port = int(port_text)
        address = ipaddress.ip_address(host or "127.0.0.1")
    except ValueError:
        raise InvalidArgument(f"invalid --tcp address {text!r}: use 127.0.0.1:PORT") from None
    if not address.is_loopback:
        raise InvalidArgument(
            f"refusing to serve the API on {host}: only loopback addresses are allowed "
            "(containers and other hosts must never reach the API)"
        )
    if not 0 < port <= 65535:
        raise InvalidArgument(f"invalid --tcp port {port}")
    return str(address), port


class _EscapingFormatter(logging.Formatter):
    """Each record's message with its control characters escaped: guest-chosen text (an
    agent's refusal, an error message) forged whole log lines with a newline and rewrote
    the reader's terminal with ESC sequences. Tracebacks, the daemon's own, stay as
    they are."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def setup_logging(debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    formatter = _EscapingFormatter(LOG_FORMAT)
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    root.addHandler(console)
    path = log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_BYTES, backupCount=2)
    to_file.setFormatter(formatter)
    root.addHandler(to_file)
    if not debug:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class DaemonLock:
    """An exclusive lock on the run directory for the daemon's lifetime."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def acquire(self, socket: Path) -> None:
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise Conflict(
                f"another husk daemon is running (pid {_read_pid()}, socket {socket})"
            ) from None
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _read_pid() -> str:
    try:
        return pid_path().read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _prepare_socket(path: Path) -> None:
    check_socket(path)  # never take over (or unlink) a socket another user made
    if daemon_answers(path):
        raise Conflict(f"another husk daemon already answers on {path} (pid {_read_pid()})")
    if path.exists() or path.is_symlink():
        log.info("removing stale socket %s", path)
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)


def _ready_directories() -> None:
    # Made with mkdir (never through a link someone planted) and checked: in /tmp another
    # user could have created it first, with a socket of their own.
    directory = secure_run_dir(run_dir())
    if os.geteuid() == 0:
        # Let members of the socket's group reach it; the directory stays unlistable.
        os.chmod(directory, 0o711)


async def serve(options: DaemonOptions) -> None:
    runtime = Runtime()
    await runtime.startup()
    app = build_app(runtime, debug=options.debug)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        access_log=logging.getLogger("aiohttp.access") if options.debug else None,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.SockSite(runner, bind_private_socket(options.socket)).start()
        os.chmod(options.socket, SOCKET_MODE)
        if options.tcp is not None:
            host, port = options.tcp
            await web.TCPSite(runner, host, port, ssl_context=options.tls).start()
            log.info(
                "serving the Docker Engine API on tcp://%s:%d (TLS, client certificates required)",
                host,
                port,
            )
        pid_path().write_text(f"{os.getpid()}\n")
        log.info("husk daemon %d serving on unix://%s", os.getpid(), options.socket)
        await stop.wait()
        log.info("shutting down; running containers keep running")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await runtime.shutdown()
        with contextlib.suppress(FileNotFoundError):
            options.socket.unlink()
        with contextlib.suppress(FileNotFoundError):
            if pid_path().read_text().strip() == str(os.getpid()):
                pid_path().unlink()


DESCRIPTOR_LIMIT = 65536
"""The soft limit on open descriptors the daemon raises itself to (within the hard one)."""


def raise_descriptor_limit() -> int:
    """Raises the soft limit on open descriptors towards the hard one, as dockerd does;
    returns it.

    systemd and most shells start services at 1024: a few guests holding the connections
    they may (gateway relays, socket binds, published ports: each costs descriptors) would
    leave the daemon none to open a disk or accept a client with. At most
    DESCRIPTOR_LIMIT: the programs the daemon runs inherit it, and some walk every
    possible descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = DESCRIPTOR_LIMIT if hard == resource.RLIM_INFINITY else min(hard, DESCRIPTOR_LIMIT)
    if wanted > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run_daemon(
    *,
    socket: Path | None = None,
    tcp: str | None = None,
    debug: bool = False,
    tlsverify: bool = False,
    tlscacert: Path | None = None,
    tlscert: Path | None = None,
    tlskey: Path | None = None,
) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    address, context = None, None
    if tcp is not None or tlsverify:
        files = tls_files(tlscacert, tlscert, tlskey)
        address, context = tcp_listener(tcp, tlsverify=tlsverify, files=files)
    options = DaemonOptions(
        socket=socket or socket_path(),
        tcp=address,
        debug=debug,
        tls=context,
    )
    _ready_directories()
    setup_logging(debug)
    raise_descriptor_limit()
    lock = DaemonLock(lock_path())
    lock.acquire(options.socket)
    try:
        _prepare_socket(options.socket)
        asyncio.run(serve(options))
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> Any:
    """For ``python -m husk.daemon.server``: same as ``husk daemon``."""
    # An upward import (daemon -> cli, ignored in pyproject.toml's contracts): only this
    # `python -m` entry point re-enters the CLI; at the top it would close a cycle.
    from husk.cli.main import main as cli_main

    return cli_main(["daemon", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    main()


def bind_private_socket(path: Path) -> socket.socket:
    """A unix socket listening at ``path``, made owner-only (0600) from its first moment.

    The umask is process-wide: it is narrowed only around the bind, with no ``await``
    in between, so that no other coroutine (the warm pool filling at start-up, say)
    creates a directory without its search bit meanwhile, which an unprivileged daemon
    could then not use (root ignores such modes). A stale socket there is replaced.
    """
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        previous_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(previous_umask)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
