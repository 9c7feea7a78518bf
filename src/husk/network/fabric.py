"""The switch's forwarding: ports, network segments, MAC learning (see husk.network.switch).

The hot path reads with ``recv_into`` into a per-port buffer, parses frames in place, and
sends each run of consecutive frames bound for the same destination with one ``send`` of
a slice of that buffer (the framing is forwarded unchanged). A peer that does not drain
gets a bounded backlog; beyond it, frames for that peer are dropped: the switch never
blocks and never grows without bound.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from husk.network.framing import HEADER, HEADER_SIZE, MAC_PAIR, MAX_FRAME, MIN_FRAME

log = logging.getLogger("husk.switch")

READ_BUFFER = 512 * 1024
"""The receive buffer, shared by every port (one read is forwarded before the next): it
always holds a port's pending partial frame plus at least one more whole frame."""
QUEUE_LIMIT = 1024 * 1024
"""Default per-port backlog (bytes) a slow peer may have before its frames are dropped."""
MAC_LIMIT = 4096
"""Learned MACs per segment per generation (two generations: at most twice this)."""
MAC_AGE = 300.0
"""A learned MAC is forgotten between one and two of these (seconds) after last seen."""


class Segment:
    """One network: its ports and its MAC table (two generations, for cheap aging)."""

    __slots__ = ("current", "network", "ports", "previous")

    def __init__(self, network: str) -> None:
        self.network = network
        self.ports: tuple[Port, ...] = ()
        """Replaced, never mutated: a flood iterating it is safe from removals."""
        self.current: dict[bytes, Port] = {}
        self.previous: dict[bytes, Port] = {}

    def age(self) -> None:
        self.previous = self.current
        self.current = {}

    def forget(self, port: Port) -> None:
        for table in (self.current, self.previous):
            for mac in [mac for mac, owner in table.items() if owner is port]:
                del table[mac]


class Port:
    """The switch's end of one LAN slot's socketpair."""

    __slots__ = (
        "closed",
        "dropped",
        "fd",
        "id",
        "out",
        "owner",
        "pending",
        "rx",
        "segment",
        "sock",
        "tx",
    )

    def __init__(self, port_id: str, owner: str, sock: socket.socket) -> None:
        self.id = port_id
        self.owner = owner
        self.sock = sock
        self.fd = sock.fileno()
        self.segment: Segment | None = None
        self.pending = b""
        """The start of a frame whose rest has not arrived yet."""
        self.out = bytearray()
        self.closed = False
        self.rx = 0
        self.tx = 0
        self.dropped = 0


class Switch:
    """Ports, segments and the forwarding; the control protocol drives it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        queue_limit: int = QUEUE_LIMIT,
        mac_limit: int = MAC_LIMIT,
    ) -> None:
        self.loop = loop
        self.queue_limit = queue_limit
        self.mac_limit = mac_limit
        self.ports: dict[str, Port] = {}
        self.segments: dict[str, Segment] = {}
        # One buffer for all ports, not one each: memory does not grow with the VMs.
        self.inbuf = bytearray(READ_BUFFER)
        self.inview = memoryview(self.inbuf)

    # -- ports -------------------------------------------------------------------------

    def add_port(self, port_id: str, owner: str, sock: socket.socket) -> Port:
        sock.setblocking(False)
        port = Port(port_id, owner, sock)
        self.ports[port_id] = port
        self.loop.add_reader(port.fd, self._read, port)
        return port

    def attach(self, port: Port, network: str | None) -> None:
        if port.segment is not None:
            if port.segment.network == network:
                return
            self._leave(port)
        if network is None:
            return
        segment = self.segments.get(network)
        if segment is None:
            segment = self.segments[network] = Segment(network)
        segment.ports = (*segment.ports, port)
        port.segment = segment

    def _leave(self, port: Port) -> None:
        segment = port.segment
        if segment is None:
            return
        port.segment = None
        segment.ports = tuple(p for p in segment.ports if p is not port)
        segment.forget(port)
        if not segment.ports:
            del self.segments[segment.network]

    def remove_port(self, port: Port, reason: str) -> None:
        if port.closed:
            return
        port.closed = True
        self._leave(port)
        self.loop.remove_reader(port.fd)
        self.loop.remove_writer(port.fd)
        port.sock.close()
        port.out = bytearray()
        if self.ports.get(port.id) is port:
            del self.ports[port.id]
        log.info("port %s removed: %s", port.id, reason)

    def close(self) -> None:
        for port in list(self.ports.values()):
            self.remove_port(port, "switch stopping")

    def age(self) -> None:
        for segment in self.segments.values():
            segment.age()

    # -- the hot path ------------------------------------------------------------------

    def _read(self, port: Port) -> None:
        buf = self.inbuf
        view = self.inview
        fill = len(port.pending)
        if fill:
            buf[:fill] = port.pending
        try:
            count = port.sock.recv_into(view[fill:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self.remove_port(port, f"read failed: {err.strerror}")
            return
        if count == 0:
            self.remove_port(port, "peer closed")
            return
        end = fill + count
        offset = 0
        segment = port.segment
        unpack_header = HEADER.unpack_from
        unpack_macs = MAC_PAIR.unpack_from
        if segment is not None:
            current = segment.current
            previous = segment.previous
        run_start = 0
        run_frames = 0
        run_dest: Port | Segment | None = None
        frames = 0
        while end - offset >= HEADER_SIZE:
            (length,) = unpack_header(buf, offset)
            if length < MIN_FRAME or length > MAX_FRAME:
                self.remove_port(port, f"bad frame length {length}")
                return
            frame_end = offset + HEADER_SIZE + length
            if frame_end > end:
                break
            frames += 1
            dest: Port | Segment | None = None
            if segment is not None:
                dst, src = unpack_macs(buf, offset + HEADER_SIZE)
                if not src[0] & 1 and current.get(src) is not port:
                    self._learn(segment, src, port)
                    current = segment.current
                    previous = segment.previous
                if dst[0] & 1:
                    dest = segment
                else:
                    known = current.get(dst) or previous.get(dst)
                    if known is None or known.segment is not segment:
                        dest = segment
                    elif known is not port:
                        dest = known
            if dest is not run_dest:
                if run_dest is not None:
                    self._deliver(port, run_dest, view[run_start:offset], run_frames)
                run_dest = dest
                run_start = offset
                run_frames = 0
            run_frames += 1
            offset = frame_end
        if run_dest is not None:
            self._deliver(port, run_dest, view[run_start:offset], run_frames)
        port.rx += frames
        port.pending = bytes(view[offset:end]) if offset < end else b""

    def _learn(self, segment: Segment, mac: bytes, port: Port) -> None:
        if len(segment.current) >= self.mac_limit:
            segment.age()  # bounded: a flood of fake sources ages the table early
        segment.current[mac] = port

    def _deliver(self, source: Port, dest: Port | Segment, data: memoryview, frames: int) -> None:
        if type(dest) is Segment:
            for port in dest.ports:
                if port is not source:
                    self._send(port, data, frames)
        else:
            assert isinstance(dest, Port)
            self._send(dest, data, frames)

    def _send(self, port: Port, data: memoryview, frames: int) -> None:
        if port.closed:
            return
        out = port.out
        if out:
            if len(out) + len(data) > self.queue_limit:
                port.dropped += frames
                return
            out += data
            port.tx += frames
            return
        try:
            sent = port.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as err:
            self.remove_port(port, f"write failed: {err.strerror}")
            return
        port.tx += frames
        if sent < len(data):
            # The rest of a frame already begun must follow, or the stream loses its framing.
            out += data[sent:]
            self.loop.add_writer(port.fd, self._flush, port)

    def _flush(self, port: Port) -> None:
        out = port.out
        try:
            sent = port.sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self.remove_port(port, f"write failed: {err.strerror}")
            return
        del out[:sent]
        if not out:
            self.loop.remove_writer(port.fd)
