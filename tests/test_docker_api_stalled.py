"""Stalled clients against a real daemon and a real VM flooding output: memory stays bounded.

The reproductions: a stopped ``husk exec`` client grew the daemon by 2.7 GB in
30 s; a stalled ``attach`` by 24 MB/s. Here a client opens the stream over the
daemon's unix socket exactly as the docker CLI does (``Upgrade: tcp``), reads the
101 and then nothing for STALL seconds while the daemon's RSS is read from
``/proc/PID/status``. Afterwards the client is found cut off (an attach with
Docker's stream-3 error), the container still runs and its log kept the output.

Both rely on the two halves of the bound: the daemon never buffers between the
guest channel and the client socket (this branch), and the guest channel's inboxes
are bounded with back-pressure to the guest (``husk.agent.channel``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_fixtures import RunningDaemon, husk_daemon  # noqa: F401 - fixture
from husk.runtime.streams import STALL_TIMEOUT
from testimages import BUSYBOX_NAME, install_busybox_image

pytestmark = pytest.mark.vm

STALL = 20.0
ATTACH_STALL = STALL_TIMEOUT + 2.0
"""An attach client is cut off after STALL_TIMEOUT: watching it longer than that (and a
margin) watches a client the daemon has already dropped."""
GROWTH_BOUND = 32 * 1024 * 1024  # measured: 0 MiB now; +127 MiB (attach) before
FLOOD = ["sh", "-c", "while :; do cat /bin/busybox; done"]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def api(daemon: RunningDaemon, method: str, path: str, body: object = None) -> object:
    """One JSON request over the daemon's socket (docker-py would hide the stream parts)."""
    payload = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} /v1.45{path} HTTP/1.1\r\nHost: husk\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(180)
        sock.connect(str(daemon.socket))
        sock.sendall(head + payload)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    body_bytes = reply.partition(b"\r\n\r\n")[2]
    assert status < 300, (status, body_bytes[:500])
    if not body_bytes.strip():
        return None
    if b"transfer-encoding: chunked" in reply.partition(b"\r\n\r\n")[0].lower():
        body_bytes = body_bytes.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    return json.loads(body_bytes)


def open_stalled_stream(daemon: RunningDaemon, path: str, body: object = None) -> socket.socket:
    """A hijacked stream whose client reads the 101 and then stops reading."""
    payload = json.dumps(body).encode() if body is not None else b""
    sock = socket.socket(socket.AF_UNIX)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(60)
    sock.connect(str(daemon.socket))
    sock.sendall(
        (
            f"POST /v1.45{path} HTTP/1.1\r\nHost: husk\r\nConnection: Upgrade\r\n"
            f"Upgrade: tcp\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        + payload
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: read nothing of the stream itself
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def read_to_end(sock: socket.socket, deadline: float = 60.0) -> bytes:
    sock.settimeout(deadline)
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 20):
            data.extend(chunk)
    return bytes(data)


def frames(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while len(data) >= 8:
        stream, size = struct.unpack(">BxxxL", data[:8])
        if len(data) < 8 + size:
            break
        out.append((stream, data[8 : 8 + size]))
        data = data[8 + size :]
    return out


def watch_rss(pid: int, seconds: float) -> tuple[int, int]:
    """(RSS at the start, highest RSS seen) over ``seconds``."""
    start = peak = rss(pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, rss(pid))
        time.sleep(0.25)
    return start, peak


@pytest.fixture(scope="module")
def flooding(husk_daemon: RunningDaemon) -> Iterator[str]:  # noqa: F811
    """A running container whose workload writes as fast as it can."""
    from husk.oci.store import ImageStore

    install_busybox_image(ImageStore(husk_daemon.data_dir / "images"))
    created = api(husk_daemon, "POST", "/containers/create", {"Image": BUSYBOX_NAME, "Cmd": FLOOD})
    assert isinstance(created, dict)
    container_id = str(created["Id"])
    api(husk_daemon, "POST", f"/containers/{container_id}/start")
    try:
        yield container_id
    finally:
        with contextlib.suppress(Exception):
            api(husk_daemon, "DELETE", f"/containers/{container_id}?force=1")


def test_a_stalled_attach_client_costs_the_daemon_a_bounded_amount(
    husk_daemon: RunningDaemon,  # noqa: F811
    flooding: str,
) -> None:
    pid = husk_daemon.process.pid
    sock = open_stalled_stream(
        husk_daemon, f"/containers/{flooding}/attach?stream=1&stdout=1&stderr=1"
    )
    try:
        time.sleep(1.0)  # output is flowing (and piling up, if anything piles up)
        start, peak = watch_rss(pid, ATTACH_STALL)
        print(f"attach stalled {ATTACH_STALL:g} s: daemon RSS {start >> 20} -> {peak >> 20} MiB")
        assert peak - start < GROWTH_BOUND, (
            f"daemon RSS grew {(peak - start) >> 20} MiB behind a stalled attach"
        )
        # The client was cut off meanwhile: what it had buffered, then Docker's error frame.
        tail = frames(read_to_end(sock))
        assert tail and tail[-1][0] == 3, tail[-1:] if tail else "no frames"
        assert b"read no output" in tail[-1][1]
    finally:
        sock.close()
    inspect = api(husk_daemon, "GET", f"/containers/{flooding}/json")
    assert isinstance(inspect, dict) and inspect["State"]["Running"] is True
    assert husk_daemon.alive()


def test_a_stalled_exec_client_costs_the_daemon_a_bounded_amount(
    husk_daemon: RunningDaemon,  # noqa: F811
    flooding: str,
) -> None:
    pid = husk_daemon.process.pid
    created = api(
        husk_daemon,
        "POST",
        f"/containers/{flooding}/exec",
        {"Cmd": FLOOD, "AttachStdout": True, "AttachStderr": True},
    )
    assert isinstance(created, dict)
    sock = open_stalled_stream(husk_daemon, f"/exec/{created['Id']}/start", {"Detach": False})
    try:
        time.sleep(1.0)
        start, peak = watch_rss(pid, STALL)
        print(f"exec stalled {STALL:g} s: daemon RSS {start >> 20} -> {peak >> 20} MiB")
        assert peak - start < GROWTH_BOUND, (
            f"daemon RSS grew {(peak - start) >> 20} MiB behind a stalled exec client"
        )
    finally:
        sock.close()
    # The container and the daemon carry on; a new exec answers.
    again = api(
        husk_daemon,
        "POST",
        f"/containers/{flooding}/exec",
        {"Cmd": ["echo", "still-here"], "AttachStdout": True},
    )
    assert isinstance(again, dict)
    stream = open_stalled_stream(husk_daemon, f"/exec/{again['Id']}/start", {"Detach": False})
    try:
        output = b"".join(data for _, data in frames(read_to_end(stream)))
    finally:
        stream.close()
    assert output == b"still-here\n"
    assert husk_daemon.alive()
