"""A tiny fake guest agent: a unix-socket server in a thread that speaks the husk protocol.

It plays the part of a hostile guest for the host's AgentConnection/AgentClient:
it answers the handshake with whatever READY the test wants, answers requests
from a table the test can override, and can send arbitrary bytes at any time
(``send`` blocks like a real guest's writes do once the host stops reading).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from husk.guest import protocol
from husk.guest.protocol import Decoder, Frame, MsgType

Reply = Callable[[Frame], bytes]

GOOD_STATS = {"cpu_ns": 5, "memory_used": 10, "memory_total": 100, "pids": 2}


def json_frame(frame_type: MsgType, channel: int, body: Any) -> bytes:
    """A frame with any JSON body (also ones the real encoder would refuse)."""
    return protocol.encode(frame_type, channel, json.dumps(body).encode())


def default_reply(frame: Frame) -> bytes:
    if frame.type in (MsgType.RUN, MsgType.EXEC, MsgType.ARCHIVE):
        return json_frame(MsgType.STARTED, frame.channel, {"pid": 42})
    if frame.type is MsgType.STATS:
        return json_frame(MsgType.STATS, frame.channel, GOOD_STATS)
    if frame.type is MsgType.SET_TIME:
        return json_frame(MsgType.OK, frame.channel, {"unix_ns": time.time_ns()})
    if frame.type is MsgType.NETWORK:  # every LAN slot the body lists, as eth<slot>
        lans = json.loads(frame.payload).get("lans") or []
        interfaces = {str(lan["slot"]): f"eth{lan['slot']}" for lan in lans}
        return json_frame(MsgType.OK, frame.channel, {"interfaces": interfaces})
    if frame.type is MsgType.REHEARSE:  # a warm pool's rehearsal of a start went well
        return json_frame(MsgType.OK, frame.channel, {"exit_code": 0, "networked": True})
    if frame.type in (MsgType.STDIN, MsgType.STDIN_EOF, MsgType.SIGNAL, MsgType.CLOSE):
        return b""
    return json_frame(MsgType.OK, frame.channel, {})


class FakeAgent:
    def __init__(self, path: Path, ready: Any = None) -> None:
        self.path = path
        self.ready: Any = {"version": protocol.PROTOCOL_VERSION, "sessions": []}
        if ready is not None:
            self.ready = ready
        self.before_ready = b""
        """Bytes sent just before READY."""
        self.after_ready = b""
        """Bytes sent in the same write as READY, right behind it."""
        self.replies: dict[MsgType, Reply] = {}
        self.received: list[Frame] = []
        self.hello: dict[str, Any] | None = None
        self.sent = 0
        self.reading = True
        """Set False to stop taking the host's bytes (a guest that never reads)."""
        self._conn: socket.socket | None = None
        self._connected = threading.Event()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def __enter__(self) -> FakeAgent:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        for sock in (self._conn, self._server):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._thread.join(5)

    def send(self, data: bytes) -> None:
        """Writes ``data`` to the host, blocking while the host does not read."""
        self._connected.wait(10)
        assert self._conn is not None
        with self._send_lock:
            view = memoryview(data)
            while view and not self._stop.is_set():
                try:
                    n = self._conn.send(view[: 64 * 1024])
                except OSError:
                    return
                self.sent += n
                view = view[n:]

    def send_in_background(self, data: bytes, repeat: int = 1) -> threading.Thread:
        def flood() -> None:
            for _ in range(repeat):
                if self._stop.is_set():
                    return
                self.send(data)

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        return thread

    def frames_of(self, frame_type: MsgType) -> list[Frame]:
        return [f for f in list(self.received) if f.type is frame_type]

    def _serve(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        self._conn = conn
        self._connected.set()
        decoder = Decoder()
        while not self._stop.is_set():
            if not self.reading:
                time.sleep(0.01)
                continue
            try:
                data = conn.recv(64 * 1024)
            except OSError:
                return
            if not data:
                return
            for item in decoder.feed(data):
                if isinstance(item, Frame):
                    self.received.append(item)
                    self._answer(item)

    def _answer(self, frame: Frame) -> None:
        if frame.type is MsgType.HELLO:
            self.hello = json.loads(frame.payload)
            ready = self.ready
            if isinstance(ready, bytes):
                wire = protocol.encode(MsgType.READY, 0, ready)
            else:
                wire = json_frame(MsgType.READY, 0, ready)
            self.send(self.before_ready + wire + self.after_ready)
            return
        reply = self.replies.get(frame.type, default_reply)(frame)
        if reply:
            self.send(reply)


def rss_bytes() -> int:
    """This process's resident set size (the host side of the connection lives here)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")
