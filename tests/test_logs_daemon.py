"""Many ``logs`` clients of a large log through a real ``husk daemon``: its memory stays bounded.

The reproduction: each logs request (and each attach with logs=1) read the whole
log (three files of up to 10 MB) into a list before sending anything, so a few
slow clients of a chatty container cost the daemon hundreds of MB. The log here is
written straight into a created (never started) container's directory: no VM boots.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_fixtures import RunningDaemon, short_root, start_daemon
from test_logs import write_big_log
from testimages import BUSYBOX_NAME, install_busybox_image

MiB = 1024 * 1024
LOG_SIZE = 28 * MiB
READERS = 6
GROWTH_BOUND = 32 * MiB  # measured: under 1 MiB now; +320 MiB before


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def request(daemon: RunningDaemon, method: str, path: str, body: object = None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(120)
        sock.connect(str(daemon.socket))
        sock.sendall(
            f"{method} /v1.45{path} HTTP/1.1\r\nHost: husk\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 2"), reply[:300]
    return reply.partition(b"\r\n\r\n")[2]


def open_logs(daemon: RunningDaemon, container_id: str, query: str) -> socket.socket:
    """A logs request whose client reads the status line and then stops reading."""
    sock = socket.socket(socket.AF_UNIX)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(120)
    sock.connect(str(daemon.socket))
    sock.sendall(
        f"GET /v1.45/containers/{container_id}/logs?{query} HTTP/1.1\r\nHost: husk\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def read_body(sock: socket.socket) -> bytes:
    data = bytearray()
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(1 << 20):
            data.extend(chunk)
    return bytes(data)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    position = 0
    while position < len(data):
        line_end = data.index(b"\r\n", position)
        size = int(data[position:line_end].split(b";")[0], 16)
        if size == 0:
            break
        out += data[line_end + 2 : line_end + 2 + size]
        position = line_end + 2 + size + 2
    return bytes(out)


def frames(data: bytes) -> Iterator[bytes]:
    position = 0
    while position + 8 <= len(data):
        _stream, size = struct.unpack(">BxxxL", data[position : position + 8])
        yield data[position + 8 : position + 8 + size]
        position += 8 + size


@pytest.fixture
def daemon_with_big_log() -> Iterator[tuple[RunningDaemon, str, int]]:
    root = short_root()
    daemon: RunningDaemon | None = None
    try:
        from husk.oci.store import ImageStore

        install_busybox_image(ImageStore(root / "data" / "images"), workdir=root)
        daemon = start_daemon(root)
        created = json.loads(
            request(daemon, "POST", "/containers/create", {"Image": BUSYBOX_NAME, "Cmd": ["true"]})
        )
        container_id = created["Id"]
        log = write_big_log(root / "data" / "containers" / container_id / "container.log", LOG_SIZE)
        with open(log.path, "rb") as fh:
            line_size = len(fh.readline())
        lines = sum(f.stat().st_size for f in log.files()) // line_size
        yield daemon, container_id, lines
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_slow_logs_clients_of_a_30_mb_log_keep_the_daemon_small(
    daemon_with_big_log: tuple[RunningDaemon, str, int],
) -> None:
    daemon, container_id, lines = daemon_with_big_log
    pid = daemon.process.pid
    before = rss(pid)
    queries = ["stdout=1&stderr=1", "stdout=1&tail=all", "stdout=1&tail=100000&follow=0"]
    clients = [open_logs(daemon, container_id, queries[i % len(queries)]) for i in range(READERS)]
    try:
        peak = before
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:
            peak = max(peak, rss(pid))
            time.sleep(0.2)
        assert peak - before < GROWTH_BOUND, f"daemon grew by {(peak - before) / MiB:.0f} MiB"
        # And every client, once it reads, still gets the whole log, in order.
        for sock in clients[:2]:
            entries = list(frames(dechunk(read_body(sock))))
            assert len(entries) == lines
            assert all(e == b"z" * 200 + b"\n" for e in entries)
            peak = max(peak, rss(pid))
        assert peak - before < GROWTH_BOUND, f"daemon grew by {(peak - before) / MiB:.0f} MiB"
        assert daemon.alive()
    finally:
        for sock in clients:
            sock.close()
