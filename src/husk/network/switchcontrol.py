"""The switch's control protocol: JSON lines on a unix socket, descriptors by SCM_RIGHTS.

One request line, one reply line: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
The descriptors of an ``add`` travel with its line (one ``sendmsg``), one per slot, in the
order of ``slots``. Requests:

- ``{"op": "add", "owner": "M", "slots": [1, 2], "attach": {"1": "NET", "2": null}}``
  → ``{"ports": ["M/1", "M/2"]}``: the switch's ends of slot socketpairs (AF_UNIX,
  SOCK_STREAM); all or nothing, an existing port id is refused.
- ``{"op": "attach", "port": "M/1", "network": "NET"}`` (``null`` detaches).
- ``{"op": "detach", "port": "M/1"}``
- ``{"op": "remove", "owner": "M"}`` → ``{"ports": [removed ids]}`` (none is not an error).
- ``{"op": "list"}`` → ``{"ports": {id: network|null}, "pid": P, "started": T}``.
- ``{"op": "stats"}`` → ``{"ports": {id: {"network", "rx", "tx", "dropped", "queued"}}}``.
- ``{"op": "ping"}`` → ``{"pid": P, "started": T}``.

Malformed input gets an error reply and never stops the switch; a line longer than
:data:`MAX_LINE` gets one and is skipped up to its newline. Connections from other users
are refused.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

from husk.guest.netconfig import LAN_SLOTS
from husk.network import switchstate

if TYPE_CHECKING:
    from husk.network.fabric import Port, Switch

log = logging.getLogger("husk.switch")

MAX_LINE = 64 * 1024
MAX_FDS = 16
"""Descriptors accepted with one message (an ``add`` needs at most LAN_SLOTS)."""
MAX_CONNECTIONS = 64
MAX_NAME = 200
_OUT_LIMIT = 4 * 1024 * 1024
"""Replies queued for a client that does not read them before it is disconnected."""


class RequestError(Exception):
    """What was wrong with a request: the reply's ``error``."""


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise RequestError(f"{what} must be a non-empty string")
    if len(value) > MAX_NAME:
        raise RequestError(f"{what} is longer than {MAX_NAME} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise RequestError(f"{what} must be printable, without spaces")
    return value


def _owner(value: Any) -> str:
    owner = _name(value, "owner")
    if "/" in owner:
        raise RequestError("owner must not contain '/'")
    return owner


def _network(value: Any) -> str | None:
    return None if value is None else _name(value, "network")


def _slots(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise RequestError("slots must be a non-empty list of slot numbers")
    slots: list[int] = []
    for slot in value:
        if type(slot) is not int or not 1 <= slot <= LAN_SLOTS:
            raise RequestError(f"slot {slot!r} is not a number from 1 to {LAN_SLOTS}")
        if slot in slots:
            raise RequestError(f"slot {slot} is listed twice")
        slots.append(slot)
    return slots


def _stream_socket(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        raise RequestError(f"descriptor {fd} is not a socket") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise RequestError("a port's descriptor must be a unix stream socket")
    return sock


class Connection:
    __slots__ = ("buffer", "discarding", "fds", "out", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.discarding = False
        """After an overlong line: its rest is skipped, up to its newline."""
        self.buffer = bytearray()
        self.fds: list[int] = []
        self.out = bytearray()
        self.writing = False


class ControlServer:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        switch: Switch,
        listener: socket.socket,
        record: switchstate.SwitchRecord,
    ) -> None:
        self.loop = loop
        self.switch = switch
        self.listener = listener
        self.record = record
        self.connections: set[Connection] = set()
        loop.add_reader(listener.fileno(), self._accept)

    def close(self) -> None:
        self.loop.remove_reader(self.listener.fileno())
        for connection in list(self.connections):
            self._drop(connection)

    # -- connections -------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("accept failed: %s", err)
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid not in (os.geteuid(), 0):
            log.warning("refused a control connection from uid %d", uid)
            sock.close()
            return
        if len(self.connections) >= MAX_CONNECTIONS:
            log.warning("refused a control connection: %d already open", MAX_CONNECTIONS)
            sock.close()
            return
        sock.setblocking(False)
        connection = Connection(sock)
        self.connections.add(connection)
        self.loop.add_reader(sock.fileno(), self._read, connection)

    def _drop(self, connection: Connection) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        self._close_fds(connection)
        fd = connection.sock.fileno()
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        connection.sock.close()

    @staticmethod
    def _close_fds_of(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        fds.clear()

    def _close_fds(self, connection: Connection) -> None:
        self._close_fds_of(connection.fds)

    def _read(self, connection: Connection) -> None:
        try:
            data, ancillary, flags, _ = connection.sock.recvmsg(
                MAX_LINE, socket.CMSG_SPACE(MAX_FDS * 4)
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(connection)
            return
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                connection.fds.extend(received)
        if flags & socket.MSG_CTRUNC:
            self._close_fds(connection)
            self._fail(connection, f"more than {MAX_FDS} descriptors in one message")
            return
        if not data:
            self._drop(connection)
            return
        connection.buffer += data
        while connection in self.connections:
            newline = connection.buffer.find(b"\n")
            if newline < 0:
                break
            line = bytes(connection.buffer[:newline])
            del connection.buffer[: newline + 1]
            fds, connection.fds = connection.fds, []
            if connection.discarding:
                connection.discarding = False
                self._close_fds_of(fds)
                continue
            self._reply(connection, self._handle(line, fds))
        if len(connection.buffer) > MAX_LINE:
            # Bounded: the line is refused and skipped, the connection carries on after it.
            connection.buffer.clear()
            self._close_fds(connection)
            if not connection.discarding:
                connection.discarding = True
                error = f"request line longer than {MAX_LINE} bytes"
                self._reply(connection, {"ok": False, "error": error})

    def _fail(self, connection: Connection, error: str) -> None:
        """An error the connection cannot recover from: reply (best effort), then close."""
        with contextlib.suppress(OSError):
            connection.sock.send(json.dumps({"ok": False, "error": error}).encode() + b"\n")
        self._drop(connection)

    def _reply(self, connection: Connection, reply: dict[str, Any]) -> None:
        data = json.dumps(reply, separators=(",", ":")).encode() + b"\n"
        if len(connection.out) + len(data) > _OUT_LIMIT:
            log.warning("a control client does not read its replies: disconnected")
            self._drop(connection)
            return
        connection.out += data
        self._write(connection)

    def _write(self, connection: Connection) -> None:
        if connection not in self.connections:
            return
        try:
            sent = connection.sock.send(connection.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(connection)
            return
        del connection.out[:sent]
        fd = connection.sock.fileno()
        if connection.out and not connection.writing:
            connection.writing = True
            self.loop.add_writer(fd, self._write, connection)
        elif not connection.out and connection.writing:
            connection.writing = False
            self.loop.remove_writer(fd)

    # -- requests ----------------------------------------------------------------------

    def _handle(self, line: bytes, fds: list[int]) -> dict[str, Any]:
        try:
            try:
                request = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise RequestError("a request must be one JSON object per line") from None
            if not isinstance(request, dict):
                raise RequestError("a request must be a JSON object")
            op = request.get("op")
            if op == "add":
                reply = self._add(request, fds)
            else:
                if fds:
                    raise RequestError(f"descriptors sent with {op!r}, which takes none")
                handler = self._handlers.get(op) if isinstance(op, str) else None
                if handler is None:
                    raise RequestError(f"unknown op {op!r}")
                reply = handler(self, request)
        except RequestError as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:  # a bug must cost one request, not the switch
            log.exception("request failed")
            return {"ok": False, "error": f"internal error: {err}"}
        finally:
            for fd in fds:  # whatever was not adopted as a port
                with contextlib.suppress(OSError):
                    os.close(fd)
        return {"ok": True, **reply}

    def _port(self, request: dict[str, Any]) -> Port:
        port_id = request.get("port")
        if not isinstance(port_id, str):
            raise RequestError("port must be a port id string")
        port = self.switch.ports.get(port_id)
        if port is None:
            raise RequestError(f"no port {port_id!r}")
        return port

    def _add(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        owner = _owner(request.get("owner"))
        slots = _slots(request.get("slots"))
        attach = request.get("attach") or {}
        if not isinstance(attach, dict):
            raise RequestError("attach must be an object mapping slots to networks")
        networks: dict[int, str | None] = {}
        for key, network in attach.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) in slots):
                raise RequestError(f"attach names slot {key!r}, which is not being added")
            networks[int(key)] = _network(network)
        if len(fds) != len(slots):
            raise RequestError(f"{len(slots)} slots but {len(fds)} descriptors")
        ids = [f"{owner}/{slot}" for slot in slots]
        for port_id in ids:
            if port_id in self.switch.ports:
                raise RequestError(f"port {port_id!r} already exists")
        socks: list[socket.socket] = []
        try:
            for fd in fds:
                socks.append(_stream_socket(fd))
        except RequestError:
            for sock in socks:
                sock.detach()  # the finally in _handle closes every descriptor
            raise
        fds.clear()  # adopted: the sockets own them now
        for port_id, slot, sock in zip(ids, slots, socks, strict=True):
            port = self.switch.add_port(port_id, owner, sock)
            self.switch.attach(port, networks.get(slot))
        attached = (f"{i} -> {networks.get(s)}" for i, s in zip(ids, slots, strict=True))
        log.info("added %s", ", ".join(attached))
        return {"ports": ids}

    def _attach(self, request: dict[str, Any]) -> dict[str, Any]:
        port = self._port(request)
        if "network" not in request:
            raise RequestError("attach needs a network (null detaches)")
        network = _network(request["network"])
        self.switch.attach(port, network)
        return {}

    def _detach(self, request: dict[str, Any]) -> dict[str, Any]:
        self.switch.attach(self._port(request), None)
        return {}

    def _remove(self, request: dict[str, Any]) -> dict[str, Any]:
        owner = _owner(request.get("owner"))
        removed = [p for p in list(self.switch.ports.values()) if p.owner == owner]
        for port in removed:
            self.switch.remove_port(port, "removed by its owner")
        return {"ports": [port.id for port in removed]}

    def _list(self, request: dict[str, Any]) -> dict[str, Any]:
        ports = {
            port_id: port.segment.network if port.segment else None
            for port_id, port in self.switch.ports.items()
        }
        return {"ports": ports, **self._identity(request)}

    def _stats(self, request: dict[str, Any]) -> dict[str, Any]:
        ports = {
            port_id: {
                "network": port.segment.network if port.segment else None,
                "rx": port.rx,
                "tx": port.tx,
                "dropped": port.dropped,
                "queued": len(port.out),
            }
            for port_id, port in self.switch.ports.items()
        }
        return {"ports": ports}

    def _identity(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"pid": self.record.pid, "started": self.record.started}

    _handlers = {
        "attach": _attach,
        "detach": _detach,
        "remove": _remove,
        "list": _list,
        "stats": _stats,
        "ping": _identity,
    }
