"""``husk run --rm`` against a scripted daemon (no VM): the removal and the exit code.

The CLI waits for the container's removal (``wait?condition=removed``), which the daemon
does itself for an AutoRemove container; it sends no DELETE of its own. When the daemon
answers that wait with a failed removal, the CLI says why, removes the container itself
and still exits with the workload's code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

CONTAINER = "c0ffee" * 10 + "c0ff"


class ScriptedDaemon:
    """Answers the requests of one ``husk run --rm``; ``removal_error`` scripts the wait."""

    def __init__(self, path: Path, removal_error: str) -> None:
        self.requests: list[str] = []
        self.removal_error = removal_error
        self.deleted = False
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = next(
                (
                    int(v)
                    for k, _, v in (x.partition(": ") for x in lines[1:])
                    if k.lower() == "content-length"
                ),
                0,
            )
            while len(body) < length:
                body += conn.recv(65536)
            path = target.split("?")[0]
            self.requests.append(f"{method} {target}")
            conn.sendall(self._reply(method, path, target))

    def _reply(self, method: str, path: str, target: str) -> bytes:
        if path.endswith("/containers/create"):
            return response(201, {"Id": CONTAINER, "Warnings": []})
        if path.endswith("/attach"):
            # The workload's output ends at once (the connection closes).
            return b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
        if path.endswith("/wait"):
            if "condition=removed" not in target:
                return response(400, {"message": f"unexpected wait: {target}"})
            result: dict[str, object] = {"StatusCode": 3, "Error": None}
            if self.removal_error:
                result = {"StatusCode": -1, "Error": {"Message": self.removal_error}}
            return response(200, result)
        if path.endswith("/start"):
            return response(204, None)
        if method == "DELETE":
            self.deleted = True
            return response(204, None)
        if path.endswith("/json"):
            if self.deleted:
                return response(404, {"message": f"No such container: {CONTAINER}"})
            return response(200, {"Id": CONTAINER, "State": {"Status": "exited", "ExitCode": 3}})
        return response(404, {"message": f"unexpected request {method} {target}"})


def response(status: int, doc: object) -> bytes:
    body = b"" if doc is None else json.dumps(doc).encode()
    reason = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request"}.get(status, "X")
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    yield directory


def husk_run_rm(run_dir: Path) -> subprocess.CompletedProcess[str]:
    src = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "HUSK_RUN_DIR": str(run_dir), "PYTHONPATH": str(src)}
    env.pop("HUSK_SOCKET", None)
    return subprocess.run(
        [sys.executable, "-m", "husk.cli.main", "run", "--rm", "busybox", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_run_rm_waits_for_the_daemons_removal_and_sends_no_delete(run_dir: Path) -> None:
    daemon = ScriptedDaemon(run_dir / "husk.sock", removal_error="")
    try:
        result = husk_run_rm(run_dir)
    finally:
        daemon.close()
    assert result.returncode == 3, result.stderr
    assert any("/wait?condition=removed" in r for r in daemon.requests), daemon.requests
    assert not any(r.startswith("DELETE") for r in daemon.requests), daemon.requests


def test_a_removal_the_daemon_could_not_do_is_reported_and_done_by_the_cli(
    run_dir: Path,
) -> None:
    reason = f"could not remove container {CONTAINER}: disk full"
    daemon = ScriptedDaemon(run_dir / "husk.sock", removal_error=reason)
    try:
        result = husk_run_rm(run_dir)
    finally:
        daemon.close()
    assert reason in result.stderr
    assert "Traceback" not in result.stderr
    # The workload's own code, read from the container's record before removing it.
    assert result.returncode == 3, result.stderr
    assert daemon.deleted, daemon.requests
