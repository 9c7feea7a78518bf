"""The daemon's side of the switch: find it (or start it), and drive its ports.

The switch (:mod:`husk.network.switch`) is one process per run directory that outlives
the daemon; :class:`SwitchClient` connects to the one that answers on
``run_dir/switch.sock`` or starts one detached (its own session, stdin from /dev/null,
output to ``run_dir/switch.log``) and waits for it with a deadline. Every call has a
deadline; a connection lost between calls (the switch restarted or died) is made again,
once, starting a new switch if none answers. A restarted switch has lost every port (the
descriptors died with the old one): :attr:`SwitchClient.restarted` says so.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from husk import paths
from husk.errors import HuskError
from husk.network import switchstate

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
START_TIMEOUT = 15.0
_MAX_REPLY = 4 * 1024 * 1024
_POLL_INTERVAL = 0.05


class SwitchError(HuskError):
    """The switch refused a request (the message says which and why)."""

    kind = "switch"


class SwitchUnavailable(SwitchError):
    """The switch could not be reached, started, or did not answer in time."""


@dataclass(frozen=True)
class SwitchIdentity:
    """One switch process: pid and start time (clock ticks since boot)."""

    pid: int
    started: int


class SwitchClient:
    """Async client of the run directory's switch; one request at a time per client."""

    def __init__(
        self,
        run_dir: Path | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT,
        start_timeout: float = START_TIMEOUT,
        idle_exit: float | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.idle_exit = idle_exit
        """Passed to a switch this client starts (None: the switch's default)."""
        self.identity: SwitchIdentity | None = None
        """The switch last connected to."""
        self.restarted = False
        """Set when a reconnection found a different switch process than before: the
        ports added through the old one are gone."""
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._lock = asyncio.Lock()
        self._spawned: subprocess.Popen[bytes] | None = None

    # -- locations -----------------------------------------------------------------------

    def _run_dir(self) -> Path:
        return self.run_dir or paths.run_dir()

    @property
    def socket_path(self) -> Path:
        return switchstate.socket_path(self._run_dir())

    @property
    def log_path(self) -> Path:
        return switchstate.log_path(self._run_dir())

    # -- the API -------------------------------------------------------------------------

    async def ensure(self) -> SwitchIdentity:
        """Connect to the running switch, or start one and connect; its identity."""
        async with self._lock:
            return await self._ensure()

    async def add(
        self,
        owner: str,
        fds_by_slot: Mapping[int, int],
        attach: Mapping[int, str | None] | None = None,
    ) -> list[str]:
        """Hand the switch its ends of ``owner``'s slot socketpairs; the new port ids.

        The switch receives duplicates: the caller still owns (and should close) its
        descriptors. ``attach`` maps slots to the network each port joins (None or
        missing: unattached).
        """
        if not fds_by_slot:
            raise SwitchError("add needs at least one slot")
        slots = sorted(fds_by_slot)
        request: dict[str, Any] = {"op": "add", "owner": owner, "slots": slots}
        if attach:
            request["attach"] = {str(slot): network for slot, network in attach.items()}
        reply = await self._call(request, [fds_by_slot[slot] for slot in slots])
        return [str(port) for port in reply["ports"]]

    async def attach(self, port: str, network: str | None) -> None:
        """Put ``port`` on ``network`` (None: take it off any)."""
        await self._call({"op": "attach", "port": port, "network": network})

    async def detach(self, port: str) -> None:
        await self._call({"op": "detach", "port": port})

    async def remove(self, owner: str) -> list[str]:
        """Close every port of ``owner``; the ids removed (none is not an error)."""
        reply = await self._call({"op": "remove", "owner": owner})
        return [str(port) for port in reply["ports"]]

    async def ports(self) -> dict[str, str | None]:
        """Every port and the network it is on (None: unattached)."""
        reply = await self._call({"op": "list"})
        return {str(k): (None if v is None else str(v)) for k, v in reply["ports"].items()}

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Per port: network, frames received (rx), sent (tx), dropped, bytes queued."""
        reply = await self._call({"op": "stats"})
        return dict(reply["ports"])

    async def ping(self) -> SwitchIdentity:
        reply = await self._call({"op": "ping"})
        return SwitchIdentity(int(reply["pid"]), int(reply["started"]))

    async def close(self) -> None:
        """Disconnect (the switch keeps running)."""
        async with self._lock:
            self._disconnect()
            self._reap()

    # -- connection ----------------------------------------------------------------------

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()

    def _reap(self) -> None:
        if self._spawned is not None and self._spawned.poll() is not None:
            self._spawned = None

    async def _ensure(self) -> SwitchIdentity:
        self._reap()
        if self._sock is not None and self.identity is not None:
            return self.identity
        run_dir = paths.secure_run_dir(self._run_dir())
        sock_path = switchstate.socket_path(run_dir)
        sock = await self._connect(sock_path)
        if sock is None:
            sock = await self._spawn_and_connect(run_dir, sock_path)
        self._sock = sock
        self._buffer.clear()
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._exchange({"op": "ping"}, [])
        except (TimeoutError, OSError, SwitchUnavailable) as err:
            self._disconnect()
            raise SwitchUnavailable(
                f"the husk switch on {sock_path} does not answer ({_why(err)}); "
                f"see {switchstate.log_path(run_dir)}"
            ) from None
        identity = SwitchIdentity(int(reply["pid"]), int(reply["started"]))
        if self.identity is not None and identity != self.identity:
            self.restarted = True
            log.warning(
                "the husk switch restarted (pid %d, now %d): the ports it held are gone",
                self.identity.pid,
                identity.pid,
            )
        self.identity = identity
        return identity

    async def _connect(self, sock_path: Path) -> socket.socket | None:
        """A connection to whatever answers on ``sock_path``; None if nothing does."""
        try:
            if not paths.check_socket(sock_path):
                return None
        except FileNotFoundError:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.get_running_loop().sock_connect(sock, str(sock_path))
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            return None
        except (TimeoutError, OSError) as err:
            sock.close()
            raise SwitchUnavailable(
                f"cannot connect to the husk switch on {sock_path}: {_why(err)}"
            ) from None
        return sock

    def _command(self, run_dir: Path, sock_path: Path) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "husk.network.switch",
            "--socket",
            str(sock_path),
            "--state",
            str(switchstate.state_path(run_dir)),
            "--log",
            str(switchstate.log_path(run_dir)),
        ]
        if self.idle_exit is not None:
            command += ["--idle-exit", f"{self.idle_exit:g}"]
        return command

    async def _spawn_and_connect(self, run_dir: Path, sock_path: Path) -> socket.socket:
        log_file = switchstate.log_path(run_dir)
        with open(log_file, "ab") as output:
            output.write(f"--- husk switch started at {time.ctime()}\n".encode())
            output.flush()
            process = subprocess.Popen(
                self._command(run_dir, sock_path),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,  # not in the daemon's process group: outlives it
                close_fds=True,
            )
        self._spawned = process
        deadline = time.monotonic() + self.start_timeout
        while True:
            sock = await self._connect(sock_path)
            if sock is not None:
                return sock
            code = process.poll()
            # 3: another switch (started at the same moment) holds the run directory;
            # it will answer soon. Anything else: ours failed.
            if code is not None and code != 3:
                raise SwitchUnavailable(
                    f"the husk switch exited with code {code} while starting"
                    f"{_last_line(log_file)}; see {log_file}"
                )
            if time.monotonic() >= deadline:
                raise SwitchUnavailable(
                    f"the husk switch did not answer on {sock_path} within "
                    f"{self.start_timeout:g} s; see {log_file}"
                )
            await asyncio.sleep(_POLL_INTERVAL)

    # -- requests ------------------------------------------------------------------------

    async def _call(self, request: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        op = request["op"]
        async with self._lock:
            for attempt in (1, 2):
                await self._ensure()
                try:
                    async with asyncio.timeout(self.timeout):
                        reply = await self._exchange(request, fds or [])
                    break
                except TimeoutError:
                    # The reply may still come: this connection is out of step now.
                    self._disconnect()
                    raise SwitchUnavailable(
                        f"the husk switch did not answer {op} within {self.timeout:g} s; "
                        f"see {self.log_path}"
                    ) from None
                except (OSError, SwitchUnavailable) as err:
                    self._disconnect()
                    if attempt == 2:
                        raise SwitchUnavailable(
                            f"lost the husk switch during {op} ({_why(err)}); see {self.log_path}"
                        ) from None
        if not reply.get("ok"):
            raise SwitchError(f"the husk switch refused {op}: {reply.get('error', 'no reason')}")
        return reply

    async def _exchange(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        sock = self._sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        data = json.dumps(request, separators=(",", ":")).encode() + b"\n"
        if fds:
            sent = await _sendmsg_fds(loop, sock, data, fds)
            data = data[sent:]
        if data:
            await loop.sock_sendall(sock, data)
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                break
            if len(self._buffer) > _MAX_REPLY:
                raise SwitchUnavailable("the switch's reply is too long")
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise SwitchUnavailable("the switch closed the connection")
            self._buffer += chunk
        try:
            reply = json.loads(line)
        except ValueError:
            raise SwitchUnavailable("the switch's reply is not JSON") from None
        if not isinstance(reply, dict):
            raise SwitchUnavailable("the switch's reply is not a JSON object")
        return reply


async def _sendmsg_fds(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes, fds: list[int]
) -> int:
    """Send (at least the start of) ``data`` with ``fds`` attached; bytes sent."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    while True:
        try:
            return sock.sendmsg([data], ancillary)
        except (BlockingIOError, InterruptedError):
            writable = loop.create_future()
            loop.add_writer(sock.fileno(), writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())


def _why(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def _last_line(log_file: Path) -> str:
    with contextlib.suppress(OSError), open(log_file, "rb") as output:
        output.seek(max(0, output.seek(0, 2) - 4096))
        lines = [line for line in output.read().decode("utf-8", "replace").splitlines() if line]
        if lines:
            return f" ({lines[-1].strip()})"
    return ""


def stop_switch(run_dir: Path | None = None, *, timeout: float = 5.0) -> bool:
    """Stop the run directory's switch (SIGTERM, SIGKILL after ``timeout``) if it still is
    the process its state file records. Synchronous; True if one was signalled."""
    return switchstate.stop_switch(run_dir or paths.run_dir(), timeout=timeout)
