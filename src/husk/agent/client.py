"""The host's client of the guest agent: typed operations over an :class:`AgentConnection`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from husk.agent import channel as transport
from husk.agent import messages
from husk.agent.channel import AgentConnection, ChannelClosed, Inbox, TrafficCounters
from husk.agent.messages import Ready
from husk.errors import GuestError
from husk.guest import protocol
from husk.guest.protocol import Frame, MsgType

REQUEST_TIMEOUT = 30.0
NETWORK_TIMEOUT = 15.0
_POLL = 0.05


@dataclass
class ProcessSpec:
    """What to run in the guest: the body of a RUN or EXEC message."""

    argv: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    user: str = ""
    tty: bool = False
    stdin: bool = False
    privileged: bool = False
    """RUN only: every capability and device inside the guest."""
    init: bool = False
    """RUN only: a reaping init is the container's PID 1 and runs argv."""
    options: dict[str, Any] = field(default_factory=dict)
    """RUN only: the container's process settings (husk.agent.messages.run_options)."""

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "argv": list(self.argv),
            "env": list(self.env),
            "cwd": self.cwd,
            "user": self.user,
            "tty": self.tty,
            "stdin": self.stdin,
        }
        if self.privileged:
            body["privileged"] = True
        if self.init:
            body["init"] = True
        body.update(self.options)
        return body


def _raise_for_error(frame: Frame, what: str) -> None:
    if frame.type is MsgType.ERROR:
        raise messages.error(frame, what)


class GuestProcess:
    """A workload or exec session running in the guest."""

    def __init__(self, client: AgentClient, inbox: Inbox, pid: int) -> None:
        self._client = client
        self._inbox = inbox
        self.channel = inbox.channel
        self.pid = pid
        self.exit_code: int | None = None
        self.on_stdin_done: Callable[[int, int], None] | None = None
        """Called with each STDIN_DONE's (offset, length) while ``output`` is read (the
        transfer ring's sender, :mod:`husk.agent.transfer`); without it they are ignored."""

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yields ("stdout"|"stderr", data) until the process exits; sets ``exit_code``.

        Take chunks promptly: while the caller holds one, the channel's inbox fills and
        the host stops reading this guest. A caller that takes nothing for the stall
        timeout gets :class:`~husk.agent.channel.ConsumerStalled`; a malformed EXITED
        raises :class:`~husk.agent.messages.MalformedMessage` (both GuestErrors).
        """
        while self.exit_code is None:
            frame = await self._inbox.get()
            if frame.type is MsgType.STDOUT:
                yield "stdout", frame.payload
            elif frame.type is MsgType.STDERR:
                yield "stderr", frame.payload
            elif frame.type is MsgType.EXITED:
                self.exit_code = messages.exited(frame)
            elif frame.type is MsgType.ERROR:
                _raise_for_error(frame, "guest process failed")
            elif frame.type is MsgType.STDIN_DONE and self.on_stdin_done is not None:
                self.on_stdin_done(*messages.stdin_done(frame))
            # Anything else has no meaning on a process channel: ignored.

    async def wait(self) -> int:
        """Discards remaining output and returns the exit code."""
        async for _ in self.output():
            pass
        assert self.exit_code is not None
        return self.exit_code

    async def collect(self) -> tuple[int, bytes, bytes]:
        out, err = bytearray(), bytearray()
        async for stream, data in self.output():
            (out if stream == "stdout" else err).extend(data)
        assert self.exit_code is not None
        return self.exit_code, bytes(out), bytes(err)

    async def write_stdin(self, data: bytes) -> None:
        await self._client.connection.send(protocol.encode_data(MsgType.STDIN, self.channel, data))

    async def stdin_from_disk(self, offset: int, length: int) -> None:
        """The process's next stdin bytes are that range of the transfer ring."""
        body: dict[str, object] = {"offset": offset, "length": length}
        await self._client.connection.send_json(MsgType.STDIN_DISK, self.channel, body)

    async def close_stdin(self) -> None:
        await self._client.connection.send_json(MsgType.STDIN_EOF, self.channel)

    async def signal(self, signum: int) -> None:
        await self._client.connection.send_json(MsgType.SIGNAL, self.channel, {"signal": signum})

    async def resize(self, rows: int, cols: int) -> None:
        await self._client.connection.send_json(
            MsgType.RESIZE, self.channel, {"rows": rows, "cols": cols}
        )

    async def release(self) -> None:
        """Tells the agent the host has what it needs (it may power off after the workload)."""
        with contextlib.suppress(ChannelClosed):
            await self._client.connection.send_json(MsgType.CLOSE, self.channel)
        self._client.connection.release(self.channel)


class Tunnel:
    """A forwarded connection to a port inside the guest."""

    def __init__(self, client: AgentClient, inbox: Inbox) -> None:
        self._client = client
        self._inbox = inbox
        self.channel = inbox.channel
        self.remote_closed = False

    async def send(self, data: bytes) -> None:
        await self._client.connection.send(protocol.encode_data(MsgType.DATA, self.channel, data))

    async def send_eof(self) -> None:
        with contextlib.suppress(ChannelClosed):
            await self._client.connection.send_json(MsgType.CLOSE, self.channel)

    async def receive(self) -> bytes:
        """The next chunk from the guest; b"" once the guest side has closed."""
        if self.remote_closed:
            return b""
        while True:
            frame = await self._inbox.get()
            if frame.type is MsgType.DATA:
                return frame.payload
            if frame.type in (MsgType.CLOSE, MsgType.ERROR):
                self.remote_closed = True
                return b""

    def release(self) -> None:
        self._client.connection.release(self.channel)


class AgentClient:
    def __init__(self, connection: AgentConnection, ready: Ready) -> None:
        self.connection = connection
        self.handshake = ready
        self.ready: dict[str, Any] = ready.as_dict()
        """The validated READY body (only checked fields; sessions as plain dicts)."""
        self.identity: dict[str, Any] | None = ready.identity
        """What the agent set of the identity the HELLO carried (see :meth:`connect`)."""

    @property
    def counters(self) -> TrafficCounters:
        """What the connection dropped or waited for (for diagnostics)."""
        return self.connection.counters

    @classmethod
    async def connect(
        cls,
        socket_path: Path,
        *,
        timeout: float,
        check_alive: Callable[[], None] | None = None,
        resume: dict[str, dict[str, int]] | None = None,
        identity: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> AgentClient:
        """Connects and completes the HELLO/READY handshake before ``timeout`` seconds.

        ``resume`` (by session kind, e.g. ``{"run": {"stdout": n, "stderr": m}}``) tells
        the agent how much output this host already holds; it replays the rest, on the
        channels of the sessions READY lists, which are opened for the host to adopt.
        A malformed READY raises :class:`~husk.agent.messages.MalformedMessage`.

        ``identity`` gives, once the connection is open, a restored clone's own identity
        for the HELLO (``{"entropy": hex, "mac": …}``, see
        husk.guest.agent.identity); :attr:`identity` is then what the agent set, or None
        if it does not take one with the HELLO.
        """
        deadline = time.monotonic() + timeout
        connection = await cls._open(socket_path, deadline, check_alive)
        try:
            hello: dict[str, Any] = {"version": protocol.PROTOCOL_VERSION}
            if resume is not None:
                hello["resume"] = resume
            if identity is not None:
                try:
                    hello["identity"] = await asyncio.wait_for(
                        identity(), max(0.0, deadline - time.monotonic())
                    )
                except TimeoutError:
                    raise GuestError(
                        f"the clone's identity was not ready within {timeout:.1f}s"
                    ) from None
            await connection.send_json(MsgType.HELLO, protocol.CONTROL_CHANNEL, hello)
            inbox = connection.open_channel(protocol.CONTROL_CHANNEL)
            while True:
                if check_alive is not None:
                    check_alive()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestError(f"guest agent did not become ready within {timeout:.1f}s")
                try:
                    frame = await inbox.get(min(_POLL * 4, remaining))
                except ChannelClosed:
                    if check_alive is not None:
                        check_alive()
                    raise
                except GuestError:
                    continue
                _raise_for_error(frame, "guest agent refused the handshake")
                if frame.type is not MsgType.READY:
                    continue  # nothing else is expected before READY: ignored
                ready = messages.ready(frame)
                if ready.version != protocol.PROTOCOL_VERSION:
                    raise GuestError(
                        f"guest agent speaks protocol {ready.version}, "
                        f"host speaks {protocol.PROTOCOL_VERSION}: rebuild the bundle"
                    )
                adopted = [s.channel for s in ready.sessions] if resume is not None else []
                # The agent's sessions keep their ids: new ones are numbered above them.
                connection.reserve_ids(max((s.channel for s in ready.sessions), default=0))
                connection.complete_handshake(adopted)
                connection.release(protocol.CONTROL_CHANNEL)
                return cls(connection, ready)
        except BaseException:
            await connection.close()
            raise

    @staticmethod
    async def _open(
        socket_path: Path, deadline: float, check_alive: Callable[[], None] | None
    ) -> AgentConnection:
        while True:
            if check_alive is not None:
                check_alive()
            try:
                return await AgentConnection.open(socket_path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() >= deadline:
                    raise GuestError(
                        f"cannot connect to the guest agent at {socket_path}: {exc}"
                    ) from None
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self.connection.close()

    async def _open_request(
        self,
        frame_type: MsgType,
        body: dict[str, Any] | None = None,
        payload: bytes | None = None,
        stall_timeout: float | None = None,
    ) -> Inbox:
        """Opens a fresh channel and sends one request on it (JSON ``body`` or raw ``payload``)."""

        def build(channel: int) -> bytes:
            if payload is not None:
                return protocol.encode(frame_type, channel, payload)
            return protocol.encode_json(frame_type, channel, body)

        return await self.connection.request(build, stall_timeout=stall_timeout)

    async def _exchange(
        self,
        frame_type: MsgType,
        body: dict[str, Any] | None = None,
        *,
        timeout: float,
        payload: bytes | None = None,
    ) -> Frame:
        """One request on a fresh channel and its first reply (an ERROR reply raises)."""
        inbox = await self._open_request(frame_type, body, payload)
        try:
            reply = await inbox.get(timeout)
        finally:
            self.connection.release(inbox.channel)
        _raise_for_error(reply, f"{frame_type.name.lower()} failed in the guest")
        return reply

    async def request(
        self, frame_type: MsgType, body: dict[str, Any] | None = None, *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """One request on a fresh channel; returns the reply's validated JSON body.

        STATS is answered by STATS (numbers, and processes if asked), the rest by OK.
        """
        reply = await self._exchange(frame_type, body, timeout=timeout)
        if frame_type is MsgType.STATS:
            return messages.stats(reply)
        return messages.ok(reply)

    async def _start(
        self, frame_type: MsgType, body: dict[str, Any], stall_timeout: float | None = None
    ) -> GuestProcess:
        inbox = await self._open_request(frame_type, body, stall_timeout=stall_timeout)
        try:
            reply = await inbox.get(REQUEST_TIMEOUT)
            _raise_for_error(reply, "cannot start the process")
            pid = messages.started(reply)
        except BaseException:
            self.connection.release(inbox.channel)
            raise
        return GuestProcess(self, inbox, pid)

    async def run(self, spec: ProcessSpec, *, poweroff_on_exit: bool = False) -> GuestProcess:
        """Starts the container's workload (one per VM).

        Its output is read by the daemon's log pump, so its channel is dropped only after
        the longer WORKLOAD_STALL_TIMEOUT (dropping it ends the container).
        """
        body = {**spec.body(), "poweroff_on_exit": poweroff_on_exit}
        return await self._start(MsgType.RUN, body, transport.WORKLOAD_STALL_TIMEOUT)

    async def exec(self, spec: ProcessSpec) -> GuestProcess:
        """Starts an extra process beside the workload."""
        return await self._start(MsgType.EXEC, spec.body())

    async def archive(self, path: str, mode: str) -> GuestProcess:
        """Stat ("stat"), read ("get", tar on stdout) or write ("put", tar on stdin) ``path``."""
        return await self._start(MsgType.ARCHIVE, {"path": path, "mode": mode})

    def reattach(self, channel: int, pid: int) -> GuestProcess:
        """A handle on the workload started by an earlier connection (after a daemon restart)."""
        patience = transport.WORKLOAD_STALL_TIMEOUT
        inbox = self.connection.open_channel(channel, stall_timeout=patience)
        return GuestProcess(self, inbox, pid)

    async def forward(self, port: int, transport: str = "tcp") -> Tunnel:
        inbox = await self._open_request(MsgType.FORWARD, {"port": port, "protocol": transport})
        try:
            reply = await inbox.get(REQUEST_TIMEOUT)
            _raise_for_error(reply, f"cannot reach port {port}/{transport} in the guest")
            messages.ok(reply)
        except BaseException:
            self.connection.release(inbox.channel)
            raise
        return Tunnel(self, inbox)

    async def listen(self, path: str, mode: int) -> int:
        """Makes the agent listen on a unix socket at ``path`` in the container.

        Returns the listener's channel (kept open until :meth:`unlisten`); its connections
        are taken one by one with :meth:`accept`.
        """
        inbox = await self._open_request(MsgType.LISTEN, {"path": path, "mode": mode & 0o777})
        try:
            reply = await inbox.get(REQUEST_TIMEOUT)
            _raise_for_error(reply, f"cannot bind a socket at {path} in the container")
            messages.ok(reply)
        except BaseException:
            self.connection.release(inbox.channel)
            raise
        return inbox.channel

    async def accept(self, listener: int) -> Tunnel:
        """The next connection a workload makes to ``listener`` (waits as long as it takes)."""
        inbox = await self._open_request(MsgType.ACCEPT, {"listener": listener})
        try:
            reply = await inbox.get()
            _raise_for_error(reply, "the guest's socket listener failed")
            messages.ok(reply)
        except BaseException:
            self.connection.release(inbox.channel)
            raise
        return Tunnel(self, inbox)

    async def unlisten(self, listener: int) -> None:
        """Closes a listener made by :meth:`listen`."""
        with contextlib.suppress(ChannelClosed):
            await self.connection.send_json(MsgType.CLOSE, listener)
        self.connection.release(listener)

    async def prepare(self, **body: Any) -> dict[str, Any]:
        """Assembles the container root (image disk + writable layer) and its identity files."""
        return await self.request(MsgType.PREPARE, body, timeout=REQUEST_TIMEOUT)

    async def mount(self, *, timeout: float = REQUEST_TIMEOUT, **body: Any) -> dict[str, Any]:
        """Mounts a share or a tmpfs in the container (a copy-up needs a longer ``timeout``)."""
        return await self.request(MsgType.MOUNT, body, timeout=timeout)

    async def set_interface(self, **body: Any) -> dict[str, Any]:
        """Sets eth0's MAC (a restored clone's own) and/or address (OVERLAY_CONFIG)."""
        reply = await self._exchange(MsgType.OVERLAY_CONFIG, body, timeout=10.0)
        return messages.network_reply(reply)

    async def configure_network(
        self, body: dict[str, Any], *, timeout: float = NETWORK_TIMEOUT
    ) -> dict[str, Any]:
        """Applies the container's whole network state (NETWORK; see docs/NETWORKS.md).

        ``body`` is checked here first (InvalidArgument names what is wrong); returns the
        guest's reply, ``{"interfaces": {"1": "eth1", ...}}``.
        """
        checked = messages.network_body(body)
        reply = await self._exchange(MsgType.NETWORK, checked, timeout=timeout)
        return messages.network_config_reply(reply)

    async def set_time(self) -> dict[str, Any]:
        """Sets the guest clock; returns ``{"unix_ns": the guest's clock afterwards}``."""
        reply = await self._exchange(MsgType.SET_TIME, {"unix_ns": time.time_ns()}, timeout=10.0)
        return messages.time_reply(reply)

    async def add_entropy(self, size: int = 64) -> None:
        reply = await self._exchange(MsgType.ENTROPY, timeout=10.0, payload=os.urandom(size))
        messages.ok(reply)

    async def stats(self) -> dict[str, Any]:
        """Named figures from the guest kernel (all integers)."""
        return await self.request(MsgType.STATS)

    async def processes(self) -> list[dict[str, Any]]:
        """The container's processes: pid, ppid, uid (ints), time, cmd (bounded strings)."""
        figures = await self.request(MsgType.STATS, {"processes": True})
        rows: list[dict[str, Any]] = figures.get("processes") or []
        return rows

    async def shutdown(self) -> None:
        """Asks the guest to sync, unmount and power off; the VM exits soon after."""
        with contextlib.suppress(ChannelClosed):
            await self.request(MsgType.SHUTDOWN, timeout=10.0)
