"""The CLI's Docker API client without a VM: HTTP framing, streams, errors, daemon start-up.

The HTTP tests talk to a small scripted server on a real unix socket (a fake
of the daemon, for framing cases the real one rarely produces); the start-up
tests run the real ``husk daemon``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from husk import errors
from husk.client import streams
from husk.client.daemon import socket_path
from husk.client.http import (
    MULTIPLEXED_STREAM,
    ApiClient,
    DaemonUnavailable,
    NotModified,
    encode_query,
    error_for,
    is_multiplexed,
    quote,
)
from husk.client.images import split_reference

# ----------------------------------------------------------------- scripted server


class ScriptedServer:
    """Accepts connections on a unix socket and lets a test script each exchange."""

    def __init__(self, path: Path, handler: Callable[[socket.socket, bytes], None]) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[bytes] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(65536)
                    if not data:
                        break
                    head += data
                self.requests.append(head)
                self.handler(conn, head)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def serve(
    tmp_path: Path,
) -> Iterator[Callable[[Callable[[socket.socket, bytes], None]], ApiClient]]:
    servers: list[ScriptedServer] = []

    def start(handler: Callable[[socket.socket, bytes], None]) -> ApiClient:
        path = tmp_path / f"api-{len(servers)}.sock"
        servers.append(ScriptedServer(path, handler))
        return ApiClient(str(path))

    yield start
    for server in servers:
        server.close()


def reply(body: bytes, status: str = "200 OK", headers: str = "") -> Callable[..., None]:
    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body
        )

    return handler


def test_json_body_with_content_length(serve: Callable[..., ApiClient]) -> None:
    api = serve(reply(b'[{"Id": "abc"}]', headers="Content-Type: application/json\r\n"))
    assert api.get("/containers/json", {"all": True}) == [{"Id": "abc"}]


def test_request_line_is_versioned_and_query_encoded(tmp_path: Path) -> None:
    server = ScriptedServer(tmp_path / "s.sock", reply(b"null"))
    try:
        ApiClient(str(tmp_path / "s.sock")).get(
            "/containers/json", {"all": True, "filters": {"name": ["a b"]}, "skip": None}
        )
    finally:
        server.close()
    request_line = server.requests[0].split(b"\r\n")[0].decode()
    assert request_line == (
        "GET /v1.50/containers/json?all=1&filters=%7B%22name%22%3A%5B%22a%20b%22%5D%7D HTTP/1.1"
    )


def test_chunked_body_split_at_awkward_places(serve: Callable[..., ApiClient]) -> None:
    lines = [b'{"status": "one"}\n', b'{"status": "two"}\n{"sta', b'tus": "three"}\n']

    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in lines:
            conn.sendall(b"%x\r\n" % len(piece))
            time.sleep(0.01)
            conn.sendall(piece + b"\r\n")
        conn.sendall(b"0\r\n\r\n")

    api = serve(handler)
    with api.open("POST", "/images/create") as response:
        statuses = [json.loads(line)["status"] for line in response.iter_lines()]
    assert statuses == ["one", "two", "three"]


def test_body_delimited_by_connection_close(serve: Callable[..., ApiClient]) -> None:
    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        conn.sendall(b"part one, ")
        conn.sendall(b"part two")

    api = serve(handler)
    with api.open("GET", "/x") as response:
        assert response.read() == b"part one, part two"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        ("404 Not Found", b'{"message": "No such container: web"}', errors.NotFound),
        ("409 Conflict", b'{"message": "name in use"}', errors.Conflict),
        ("400 Bad Request", b'{"message": "bad"}', errors.InvalidArgument),
        ("501 Not Implemented", b'{"message": "no"}', errors.NotSupported),
        ("500 Internal Server Error", b'{"message": "boom"}', errors.Internal),
        (
            "500 Internal Server Error",
            b'{"message": "x", "kind": "guest_error"}',
            errors.GuestError,
        ),
        ("304 Not Modified", b"", NotModified),
    ],
)
def test_error_statuses_raise_husk_errors(
    serve: Callable[..., ApiClient], status: str, body: bytes, expected: type[Exception]
) -> None:
    api = serve(reply(body, status))
    with pytest.raises(expected) as caught:
        api.post("/containers/web/start")
    if body:
        assert str(caught.value) == json.loads(body)["message"]


def test_error_message_is_one_line_even_from_a_multiline_body() -> None:
    err = error_for(500, b"first line\nsecond line\n")
    assert isinstance(err, errors.Internal)
    assert str(err) == "first line second line"


def test_malformed_status_line_is_a_clear_error(serve: Callable[..., ApiClient]) -> None:
    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

    api = serve(handler)
    with pytest.raises(errors.Internal, match="malformed status line"):
        api.get("/info")


def test_truncated_body_is_a_clear_error(serve: Callable[..., ApiClient]) -> None:
    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")

    api = serve(handler)
    with pytest.raises(errors.Internal, match="closed the connection"):
        api.get("/info")


def test_silent_daemon_hits_the_deadline(serve: Callable[..., ApiClient]) -> None:
    release = threading.Event()

    def handler(conn: socket.socket, head: bytes) -> None:
        release.wait(10)

    api = serve(handler)
    started = time.monotonic()
    with pytest.raises(errors.Internal, match=r"did not answer within 0\.3 s"):
        api.get("/info", timeout=0.3)
    assert time.monotonic() - started < 5
    release.set()


def test_hijack_keeps_bytes_that_arrived_with_the_headers(serve: Callable[..., ApiClient]) -> None:
    frames = streams.encode_frame(1, b"early\n") + streams.encode_frame(2, b"oops\n")

    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(
            b"HTTP/1.1 101 UPGRADED\r\nContent-Type: " + MULTIPLEXED_STREAM.encode() + b"\r\n"
            b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n" + frames
        )
        # Echo stdin back as stdout until the client half-closes, then finish.
        received = b""
        while True:
            data = conn.recv(65536)
            if not data:
                break
            received += data
        conn.sendall(streams.encode_frame(1, b"stdin was " + received + b"\n"))

    api = serve(handler)
    stream = api.hijack("/containers/web/attach", query={"stream": True, "stdin": True})
    assert stream.multiplexed(tty=False)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe()
    os.write(in_w, b"typed")
    os.close(in_w)
    sink = streams.OutputSink(multiplexed=True, stdout_fd=out_w, stderr_fd=err_w)
    streams.pump(stream, sink, stdin_fd=in_r)
    for fd in (out_w, err_w, in_r):
        os.close(fd)
    with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
        assert out.read() == b"early\nstdin was typed\n"
        assert err.read() == b"oops\n"


def test_hijack_sends_upgrade_headers(tmp_path: Path) -> None:
    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(
            b"HTTP/1.1 101 UPGRADED\r\nContent-Type: "
            + b"application/vnd.docker.raw-stream\r\n\r\n"
        )

    server = ScriptedServer(tmp_path / "h.sock", handler)
    try:
        stream = ApiClient(str(tmp_path / "h.sock")).hijack(
            "/exec/abc/start", json_body={"Detach": False, "Tty": True}
        )
        assert not stream.multiplexed(tty=True)
        stream.close()
    finally:
        server.close()
    head = server.requests[0].decode()
    assert head.startswith("POST /v1.50/exec/abc/start HTTP/1.1\r\n")
    assert "Connection: Upgrade\r\n" in head
    assert "Upgrade: tcp\r\n" in head


def test_streamed_request_body_is_chunked(tmp_path: Path) -> None:
    received: list[bytes] = []

    def handler(conn: socket.socket, head: bytes) -> None:
        data = head
        while not data.endswith(b"0\r\n\r\n"):
            more = conn.recv(65536)
            if not more:
                break
            data += more
        received.append(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    server = ScriptedServer(tmp_path / "p.sock", handler)
    try:
        ApiClient(str(tmp_path / "p.sock")).call(
            "PUT", "/containers/x/archive", query={"path": "/"}, body=io.BytesIO(b"tar bytes")
        )
    finally:
        server.close()
    head, _, body = received[0].partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"9\r\ntar bytes\r\n0\r\n\r\n"


def test_nothing_listening_is_daemon_unavailable(tmp_path: Path) -> None:
    api = ApiClient(str(tmp_path / "missing.sock"))
    assert not api.ping()
    with pytest.raises(DaemonUnavailable, match="cannot reach the husk daemon"):
        api.get("/info")


def test_unavailable_daemon_is_started_once_then_retried(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    servers: list[ScriptedServer] = []

    def start() -> None:
        servers.append(ScriptedServer(path, reply(b'{"ok": true}')))

    api = ApiClient(str(path), on_unavailable=start)
    try:
        assert api.get("/info") == {"ok": True}
        assert api.get("/info") == {"ok": True}
    finally:
        for server in servers:
            server.close()
    assert len(servers) == 1


# ----------------------------------------------------------------------- streams


def test_frame_decoder_reassembles_frames_across_reads() -> None:
    data = (
        streams.encode_frame(1, b"hello ")
        + streams.encode_frame(2, b"")
        + streams.encode_frame(2, b"err")
        + streams.encode_frame(1, b"x" * 70000)
    )
    decoder = streams.FrameDecoder()
    frames: list[tuple[int, bytes]] = []
    for start in range(0, len(data), 7):
        frames.extend(decoder.feed(data[start : start + 7]))
    assert frames == [(1, b"hello "), (2, b""), (2, b"err"), (1, b"x" * 70000)]
    assert decoder.pending == 0


def test_frame_decoder_rejects_garbage() -> None:
    with pytest.raises(errors.Internal, match="malformed stream header"):
        streams.FrameDecoder().feed(b"hello world, not frames")


def test_sink_reports_daemon_error_frames_and_truncation() -> None:
    out_r, out_w = os.pipe()
    sink = streams.OutputSink(multiplexed=True, stdout_fd=out_w, stderr_fd=out_w)
    sink.feed(streams.encode_frame(1, b"ok\n") + streams.encode_frame(3, b"log file vanished\n"))
    with pytest.raises(errors.Internal, match="log file vanished"):
        sink.finish()
    truncated = streams.OutputSink(multiplexed=True, stdout_fd=out_w, stderr_fd=out_w)
    truncated.feed(streams.encode_frame(1, b"abcdef")[:-2])
    with pytest.raises(errors.Internal, match="mid-frame"):
        truncated.finish()
    os.close(out_w)
    with os.fdopen(out_r, "rb") as out:
        assert out.read() == b"ok\n"


def test_content_type_decides_framing_else_tty() -> None:
    assert is_multiplexed("application/vnd.docker.multiplexed-stream", tty=True)
    assert not is_multiplexed("application/vnd.docker.raw-stream", tty=False)
    assert is_multiplexed("", tty=False)
    assert not is_multiplexed("", tty=True)


def test_signal_pipe_delivers_signals_to_the_loop() -> None:
    with streams.SignalPipe([signal.SIGUSR1]) as pipe:
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        received: list[int] = []
        while not received and time.monotonic() < deadline:
            received = pipe.received()
            time.sleep(0.01)
    assert received == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


# ---------------------------------------------------------------------- encoding


def test_quote_and_query() -> None:
    assert quote("web/../x y") == "web%2F..%2Fx%20y"
    assert encode_query({"a": False, "b": None, "c": 3}) == "?a=0&c=3"
    assert encode_query({}) == ""


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("busybox", ("busybox", "latest")),
        ("husk.local/busybox:1.36", ("husk.local/busybox", "1.36")),
        ("127.0.0.1:5000/app", ("127.0.0.1:5000/app", "latest")),
        ("127.0.0.1:5000/app:v2", ("127.0.0.1:5000/app", "v2")),
        ("alpine@sha256:" + "a" * 64, ("alpine", "sha256:" + "a" * 64)),
    ],
)
def test_split_reference(reference: str, expected: tuple[str, str]) -> None:
    assert split_reference(reference) == expected


# ------------------------------------------------------------ starting the daemon


def _husk(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "husk.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _daemon_pid(run_dir: Path) -> int:
    return int((run_dir / "husk.pid").read_text().split()[0])


def test_cli_starts_the_daemon_on_demand_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "HUSK_RUN_DIR": str(run_dir),
        "HUSK_DATA_DIR": str(tmp_path / "data"),
    }
    env.pop("HUSK_SOCKET", None)
    # Two commands at once: the start-up lock lets only one of them spawn a daemon.
    first = subprocess.Popen(
        [sys.executable, "-m", "husk.cli.main", "ps", "-a"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = _husk("ps", "-a", "-q", env=env)
    out, err = first.communicate(timeout=120)
    try:
        assert first.returncode == 0, err
        assert second.returncode == 0, second.stderr
        assert out.splitlines()[0].split() == [
            "CONTAINER",
            "ID",
            "IMAGE",
            "COMMAND",
            "CREATED",
            "STATUS",
            "PORTS",
            "NAMES",
        ]
        assert second.stdout == ""
        assert (run_dir / "husk.sock").is_socket()
        pid = _daemon_pid(run_dir)
        os.kill(pid, 0)  # alive
        # Started detached: in its own session, so a terminal's hang-up spares it.
        assert os.getsid(pid) == pid
        again = _husk("ps", env=env)
        assert again.returncode == 0, again.stderr
        assert _daemon_pid(run_dir) == pid
    finally:
        if (run_dir / "husk.pid").exists():
            pid = _daemon_pid(run_dir)
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)


def test_daemon_that_cannot_start_is_one_clear_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # A data directory that is a file: the daemon fails at start-up, quickly.
    data = tmp_path / "data-is-a-file"
    data.write_text("not a directory")
    env = {**os.environ, "HUSK_RUN_DIR": str(run_dir), "HUSK_DATA_DIR": str(data)}
    env["HUSK_DAEMON_START_TIMEOUT"] = "60"
    result = _husk("ps", env=env)
    assert result.returncode == 125
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("husk: the husk daemon")
    assert "Traceback" not in result.stderr


def test_socket_path_follows_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HUSK_SOCKET", raising=False)
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path))
    assert socket_path() == tmp_path / "husk.sock"
    monkeypatch.setenv("HUSK_SOCKET", str(tmp_path / "other.sock"))
    assert socket_path() == tmp_path / "other.sock"


# --------------------------------------------------------------- cost of `husk ps`

# What `husk ps` must never load: the event loop, the daemon's HTTP stack, the
# terminal UI, the stdlib's heavy HTTP client, or any layer below the client.
HEAVY_MODULES = {
    "asyncio",
    "aiohttp",
    "rich",
    "http.client",
    "email.parser",
    "ssl",
    "tarfile",
    "zstandard",
    "qemu",
    "husk.runtime",
    "husk.daemon",
    "husk.oci",
    "husk.vm",
    "husk.spec",
}

_RECORD_IMPORTS = """
import json, sys
before = set(sys.modules)
from husk.cli.main import main
try:
    main(["ps", "-a"])
finally:
    with open(sys.argv[1], "w") as out:
        json.dump(sorted(set(sys.modules) - before), out)
"""


def test_ps_imports_only_what_it_needs(serve: Callable[..., ApiClient], tmp_path: Path) -> None:
    summary = {
        "Id": "f" * 64,
        "Names": ["/quiet"],
        "Image": "husk.local/busybox",
        "Command": "sleep 1000",
        "Created": int(time.time()) - 30,
        "Ports": [],
        "State": "running",
        "Status": "Up 30 seconds",
    }
    api = serve(reply(json.dumps([summary]).encode()))
    record = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", _RECORD_IMPORTS, str(record)],
        env={**os.environ, "HUSK_SOCKET": api.socket_path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("ffffffffffff   husk.local/busybox")
    loaded = set(json.loads(record.read_text()))
    heavy = {m for m in loaded for h in HEAVY_MODULES if m == h or m.startswith(h + ".")}
    assert heavy == set()
    assert "husk.client.http" in loaded and "husk.cli.ps" in loaded


_RECORD_RUN_IMPORTS = _RECORD_IMPORTS.replace('main(["ps", "-a"])', "main(sys.argv[2:])")


@pytest.mark.parametrize(
    ("flags", "needed"),
    [
        ([], set()),
        (["-v", "/x:/y", "--cap-add", "NET_ADMIN", "-p", "80", "--restart", "always"], None),
    ],
)
def test_run_imports_the_option_checks_only_for_options_given(
    serve: Callable[..., ApiClient], tmp_path: Path, flags: list[str], needed: set[str] | None
) -> None:
    """`husk run IMAGE CMD` without options loads none of the modules that check them
    (husk.spec, husk.confinement, husk.volumes: a start pays for no flag it did not use)."""
    error = json.dumps({"message": "stop here"}).encode()
    api = serve(reply(error, status="500 Internal Server Error"))
    record = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", _RECORD_RUN_IMPORTS, str(record), "run", *flags, "img", "true"],
        env={**os.environ, "HUSK_SOCKET": api.socket_path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 125 and "stop here" in result.stderr, result.stderr
    loaded = set(json.loads(record.read_text()))
    checks = {"husk.spec", "husk.confinement", "husk.volumes.mountspec", "husk.cli.timeparse"}
    if needed is None:  # the flags given need them all
        assert checks - {"husk.cli.timeparse"} <= loaded
    else:
        assert loaded & checks == needed
        # A plain run is parsed without click (husk.cli.quick), as a plain exec is.
        assert "click" not in loaded and "husk.cli.runflow" in loaded


def test_exec_skips_click_and_reports_errors_as_before(
    serve: Callable[..., ApiClient], tmp_path: Path
) -> None:
    """`husk exec ID CMD` is parsed without click (its import is a third of the CLI's
    start), and a daemon's error still ends it with `husk: …` and 125."""
    error = json.dumps({"message": "no such container: c1"}).encode()
    api = serve(reply(error, status="404 Not Found"))
    record = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", _RECORD_RUN_IMPORTS, str(record), "exec", "-it", "c1", "true"],
        env={**os.environ, "HUSK_SOCKET": api.socket_path},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 125, result.stderr
    assert result.stderr == "husk: the input device is not a TTY\n"
    result = subprocess.run(
        [sys.executable, "-c", _RECORD_RUN_IMPORTS, str(record), "exec", "-u", "0", "c1", "id"],
        env={**os.environ, "HUSK_SOCKET": api.socket_path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 125 and "no such container: c1" in result.stderr, result.stderr
    loaded = set(json.loads(record.read_text()))
    assert "click" not in loaded and "husk.cli.execflow" in loaded


@pytest.mark.parametrize(
    "args",
    [
        ["c1", "true"],
        ["-it", "c1", "sh"],
        ["-d", "-i", "-t", "c1", "sh", "-c", "exit 3"],
        ["--detach", "--interactive", "--tty", "--privileged", "c1", "x"],
        ["-e", "A=1", "--env", "B=2", "--env=C=3", "--env-file", "f", "c1", "env"],
        ["-u", "1000:1000", "--user=root", "-w", "/tmp", "--workdir=/x", "c1", "pwd"],
        ["-e", "-x", "c1", "env"],  # a value that looks like an option is still the value
        ["c1", "ls", "-l", "--", "-e", "x"],  # after the container: all the command's
        ["-dit", "c1", "top"],
        # Left to click:
        ["--help"],
        ["-h", "c1", "x"],
        ["--", "c1", "x"],
        ["-eA=1", "c1", "env"],
        ["-e=A", "c1", "env"],
        ["-itx", "c1", "sh"],
        ["--detach=1", "c1", "sh"],
        ["-x", "c1", "sh"],
        ["-", "sh"],
        ["c1"],
        [],
        ["-e"],
        ["-e", "A=1"],
    ],
)
def test_exec_quick_parse_agrees_with_click(args: list[str]) -> None:
    from husk.cli import quick
    from husk.cli.execute import exec_

    parsed = quick.parse_exec(args)
    if parsed is None:  # click's to parse: only forms quick does not take
        assert (
            args[:1] in ([], ["--help"], ["-h"], ["--"])
            or len(args) < 3
            or any(arg in ("-eA=1", "-e=A", "-itx", "--detach=1", "-x") for arg in args)
        )
        return
    with exec_.make_context("exec", list(args)) as ctx:
        assert parsed == ctx.params


_RUN_FORMS_FOR_CLICK = {"--help", "--", "-eA=1", "-m=1g", "-itx", "--rm=1", "-p", "-v", "-"}


@pytest.mark.parametrize(
    "args",
    [
        ["busybox"],
        ["busybox", "true"],
        ["--rm", "busybox", "true"],
        ["--rm", "-d", "busybox", "sleep", "100"],
        ["--rm", "-it", "busybox", "sh"],
        ["-dit", "--rm", "busybox", "sh"],
        ["-i", "-t", "-d", "husk.local/busybox:latest", "sh", "-c", "exit 3"],
        ["--detach", "--interactive", "--tty", "--rm", "busybox"],
        ["--name", "web", "--name=web2", "busybox"],
        ["--name=", "busybox"],  # an empty name: refused the same way
        ["--name", "bad name!", "busybox"],
        ["-e", "A=1", "--env", "B=2", "--env=C=3", "-e", "HOME", "busybox", "env"],
        ["-e", "-x", "busybox", "env"],  # a value that looks like an option is the value
        ["-e", "=x", "busybox", "env"],
        ["--env-file", "/no/such/file", "busybox"],
        ["-m", "512m", "--memory=1g", "busybox", "true"],
        ["-m", "lots", "busybox"],
        ["-m", "-5", "busybox"],
        ["-u", "1000:1000", "--user=root", "-w", "/tmp", "--workdir=/x", "busybox", "pwd"],
        ["-w", "relative", "busybox"],
        ["--entrypoint", "", "busybox"],
        ["--entrypoint=/bin/sh", "busybox", "-c", "echo hi"],
        ["--network", "none", "--network=lan", "busybox"],
        ["--network", "none", "--network", "none", "busybox"],
        ["-l", "a=b", "--label", "c", "--label=d=e=f", "busybox"],
        ["-h", "box", "--hostname=other", "busybox"],
        ["-h", "-bad-", "busybox"],
        ["--init", "--privileged", "--read-only", "--rm", "busybox"],
        ["busybox", "ls", "-l", "--", "-e", "x", "--rm"],  # after the image: the command's
        # Left to click:
        ["--help"],
        ["--", "busybox"],
        ["-eA=1", "busybox"],
        ["-m=1g", "busybox"],
        ["-itx", "busybox"],
        ["--rm=1", "busybox"],
        ["-p", "80", "busybox"],
        ["-v", "/x:/y", "busybox"],
        ["-", "busybox"],
        [],
        ["-e"],
        ["--rm"],
        ["--name", "x"],
    ],
)
def test_run_quick_parse_agrees_with_click(
    args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`husk run` in its plain forms is parsed without click: the same parameters as
    click's parse, and the same create request (or the same refusal) built from them."""
    from husk.cli import quick
    from husk.cli.createopts import build_create_request
    from husk.cli.run import run

    monkeypatch.setenv("HOME", "/home/someone")
    parsed = quick.parse_run(args)
    if parsed is None:  # click's to parse: only forms quick does not take
        no_image = args in ([], ["-e"], ["--rm"], ["--name", "x"])
        assert no_image or any(arg in _RUN_FORMS_FOR_CLICK for arg in args), args
        return
    with run.make_context("run", list(args)) as ctx:
        params = dict(ctx.params)
    for key in ("image", "command", "detach", "sig_proxy", "detach_keys"):
        assert parsed[key] == params.pop(key), key
    given = parsed["options"]
    for key, value in params.items():
        if key in given:
            assert given[key] == value, key
        else:  # unset in the quick parse: click's default, which means "not given"
            assert value in (None, False, (), "no", "missing"), key

    def built(options: dict[str, Any]) -> object:
        try:
            return build_create_request(
                parsed["image"], parsed["command"], options, attach=not parsed["detach"]
            )
        except errors.HuskError as err:
            return f"{type(err).__name__}: {err}"

    assert built(given) == built(params)


_ENTRY = "from husk.cli.main import main; main()"
"""The process's entry as the husk script calls it (no argv: the quick path ends the process)."""


def _exec_daemon(*, sends_status: bool) -> Callable[[socket.socket, bytes], None]:
    """A scripted daemon for one `husk exec c1 …`: create, a start whose stream holds a line
    on each stream (and, when asked and ``sends_status``, the exit status frame: 3), and an
    inspect that says 7."""

    def handler(conn: socket.socket, head: bytes) -> None:
        line = head.split(b"\r\n", 1)[0]
        if line.startswith(b"POST /v1.50/containers/c1/exec "):
            body = b'{"Id": "e1"}'
            conn.sendall(
                b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        elif line.startswith(b"POST /v1.50/exec/e1/start "):
            conn.sendall(
                b"HTTP/1.1 101 UPGRADED\r\nContent-Type: " + MULTIPLEXED_STREAM.encode() + b"\r\n"
                b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
                + streams.encode_frame(1, b"out\n")
                + streams.encode_frame(2, b"err\n")
            )
            if sends_status and b"\r\nX-Husk-Exit-Status: frame\r\n" in head:
                conn.sendall(streams.encode_frame(streams.EXIT_STATUS, b'{"ExitCode": 3}'))
        elif line.startswith(b"GET /v1.50/exec/e1/json "):
            body = b'{"ExitCode": 7, "Running": false}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    return handler


@pytest.mark.parametrize(
    ("flags", "sends_status", "code", "inspected"),
    [
        ([], True, 3, False),  # the exit status frame: no inspect
        (["-i"], True, 3, False),
        ([], False, 7, True),  # a daemon that does not send it: asked, as Docker's CLI does
        (["-t"], True, 7, True),  # a terminal's stream has no frames: asked
    ],
)
def test_exec_exit_code_from_the_streams_last_frame(
    tmp_path: Path, flags: list[str], sends_status: bool, code: int, inspected: bool
) -> None:
    """A non-tty `husk exec` asks husk's daemon for the exit code as the stream's last frame
    (one request fewer); it falls back to `GET /exec/ID/json` when none comes. Run through
    the process's real entry (the quick path's exit without the interpreter's teardown)."""
    server = ScriptedServer(tmp_path / "d.sock", _exec_daemon(sends_status=sends_status))
    try:
        result = subprocess.run(
            [sys.executable, "-c", _ENTRY, "exec", *flags, "c1", "x"],
            env={**os.environ, "HUSK_SOCKET": str(tmp_path / "d.sock")},
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        server.close()
    assert (result.returncode, result.stdout, result.stderr) == (code, b"out\n", b"err\n")
    targets = [request.split(b" ", 2)[1] for request in server.requests]
    assert (b"/v1.50/exec/e1/json" in targets) == inspected, targets
    start = next(request for request in server.requests if b"/exec/e1/start" in request)
    assert (b"X-Husk-Exit-Status: frame" in start) == ("-t" not in flags)


def test_exit_status_frame_matches_between_daemon_and_client() -> None:
    """The daemon's frame (only for a non-tty session whose code is known) is what the
    client's sink reads."""
    from husk.cli import execflow
    from husk.daemon.docker import exec as exec_api

    class Process:
        def __init__(self, tty: bool, exit_code: int | None) -> None:
            self.tty = tty
            self.exit_code = exit_code

    assert exec_api.EXIT_STATUS_HEADER == execflow.EXIT_STATUS_HEADER
    assert exec_api.EXIT_STATUS_STREAM == streams.EXIT_STATUS
    framed = exec_api.exit_status_frame(Process(False, 42))  # type: ignore[arg-type]
    assert exec_api.exit_status_frame(Process(True, 42)) == b""  # type: ignore[arg-type]
    assert exec_api.exit_status_frame(Process(False, None)) == b""  # type: ignore[arg-type]
    out_r, out_w = os.pipe()
    sink = streams.OutputSink(multiplexed=True, stdout_fd=out_w, exit_status=True)
    sink.feed(streams.encode_frame(1, b"x") + framed[:5])
    sink.feed(framed[5:])
    sink.finish()
    os.close(out_w)
    with os.fdopen(out_r, "rb") as out:
        assert out.read() == b"x"
    assert sink.exit_code == 42
    # A sink that did not ask still refuses the frame, as any stream number beyond 3.
    with pytest.raises(errors.Internal, match="malformed stream header"):
        streams.OutputSink(multiplexed=True).feed(framed)
    with pytest.raises(errors.Internal, match="malformed exit status"):
        streams.OutputSink(multiplexed=True, exit_status=True).feed(
            streams.encode_frame(streams.EXIT_STATUS, b'{"ExitCode": "3"}')
        )
