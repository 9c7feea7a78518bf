"""The installed docker CLI (Docker 28) driving husk through DOCKER_HOST, with real VMs.

Every container here is a real VM booted under TCG from the busybox test image,
pulled by the daemon from a docker-registry on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    DOCKER_CLI,
    RunningDaemon,
    daemon_busybox,
    husk_daemon,
    registry,
    registry_busybox,
)
from registry_fixtures import free_port
from terminal import Terminal

pytestmark = [pytest.mark.vm, pytest.mark.registry]

HTTP_DEADLINE = 60.0
WEB_COMMAND = (
    "mkdir -p /www && echo hello-husk > /www/index.html && echo started && "
    "exec httpd -f -v -p 80 -h /www"
)


def http_get(port: int, deadline: float = HTTP_DEADLINE) -> bytes:
    """GET http://127.0.0.1:PORT/, retrying until the server answers or the deadline passes."""
    end = time.monotonic() + deadline
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                return bytes(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            last = err
            time.sleep(0.2)
    raise AssertionError(f"no HTTP answer on 127.0.0.1:{port} within {deadline}s: {last}")


class LineReader:
    """Reads a process's stdout lines in a thread so the test can wait with deadlines."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def wait_for(self, text: str, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        while not any(text in line for line in self.lines):
            if time.monotonic() > end:
                raise AssertionError(f"{text!r} not in {self.lines[-20:]} within {deadline}s")
            time.sleep(0.05)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@pytest.mark.timeout(900)
def test_docker_run_variants(husk_daemon: RunningDaemon, daemon_busybox: str) -> None:  # noqa: F811
    hi = husk_daemon.docker("run", "--rm", daemon_busybox, "echo", "hi")
    assert hi.stdout == b"hi\n"

    failing = husk_daemon.docker(
        "run", "--rm", daemon_busybox, "sh", "-c", "echo out; echo err >&2; exit 3", check=False
    )
    assert failing.returncode == 3
    assert failing.stdout == b"out\n"
    assert b"err\n" in failing.stderr

    piped = husk_daemon.docker(
        "run",
        "-i",
        "--rm",
        daemon_busybox,
        "sh",
        "-c",
        "cat; echo eof-seen",
        input=b"hello through stdin\n",
    )
    assert piped.stdout == b"hello through stdin\neof-seen\n"  # stdin's end reached cat

    terminal = Terminal([DOCKER_CLI, "run", "-it", "--rm", daemon_busybox, "sh"], husk_daemon.env)
    terminal.expect(b"# ")
    terminal.send(b"echo $((6*7)); tty\r")
    terminal.expect(b"42")
    terminal.expect(b"/dev/pts/")
    terminal.send(b"exit 4\r")
    assert terminal.wait() == 4

    # Capabilities inside the VM: Docker's default set, all of them with --privileged;
    # --init puts a reaping init at PID 1 and the workload under it.
    bounding = "grep CapBnd /proc/self/status; cat /proc/1/cmdline | tr '\\0' ' '"
    plain = husk_daemon.docker("run", "--rm", daemon_busybox, "sh", "-c", bounding)
    assert b"CapBnd:\t00000000a80425fb" in plain.stdout, plain.stdout
    privileged = husk_daemon.docker(
        "run", "--rm", "--privileged", daemon_busybox, "sh", "-c", bounding
    )
    assert b"CapBnd:\t000001ffffffffff" in privileged.stdout, privileged.stdout
    with_init = husk_daemon.docker("run", "--rm", "--init", daemon_busybox, "sh", "-c", bounding)
    assert not with_init.stdout.decode().splitlines()[1].startswith("sh"), with_init.stdout
    # The init drops to the workload's user too (it used to fail with 126 doing so).
    as_user = husk_daemon.docker(
        "run", "--rm", "--init", "-u", "1000:1000", daemon_busybox, "sh", "-c",
        "id -u; grep CapEff /proc/1/status",
    )  # fmt: skip
    assert as_user.stdout == b"1000\nCapEff:\t0000000000000000\n", as_user.stdout

    leftovers = husk_daemon.docker(
        "ps", "-a", "--filter", f"ancestor={daemon_busybox}", "--format", "{{.Command}}"
    )
    assert leftovers.stdout == b"", "--rm containers must be gone"


@pytest.mark.timeout(900)
def test_web_server_container_lifecycle(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    port = free_port()
    started = husk_daemon.docker(
        "run", "-d", "--name", "web", "-p", f"{port}:80", daemon_busybox, "sh", "-c", WEB_COMMAND
    )
    container_id = started.stdout.decode().strip()
    assert len(container_id) == 64 and int(container_id, 16) >= 0
    try:
        assert http_get(port) == b"hello-husk\n"

        rows = husk_daemon.docker("ps", "--format", "{{.Names}}|{{.Ports}}|{{.Status}}")
        row = next(r for r in rows.stdout.decode().splitlines() if r.startswith("web|"))
        assert f":{port}->80/tcp" in row and "|Up " in row
        inspect = json.loads(husk_daemon.docker("inspect", "web").stdout)[0]
        assert inspect["Id"] == container_id and inspect["Name"] == "/web"
        assert inspect["State"]["Running"] is True and inspect["State"]["Pid"] > 0
        assert inspect["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"] == str(port)
        assert inspect["Config"]["Cmd"] == ["sh", "-c", WEB_COMMAND]
        assert inspect["Config"]["Image"] == daemon_busybox  # as the user wrote it

        logs = husk_daemon.docker("logs", "web")
        assert logs.stdout == b"started\n"
        assert b"response:200" in logs.stderr  # httpd -v reports the request on stderr

        assert husk_daemon.docker("exec", "web", "cat", "/www/index.html").stdout == (
            b"hello-husk\n"
        )
        code = husk_daemon.docker("exec", "web", "sh", "-c", "exit 5", check=False)
        assert code.returncode == 5
        identity = husk_daemon.docker(
            "exec",
            "-e",
            "GREETING=hi",
            "-w",
            "/www",
            "-u",
            "1000",
            "web",
            "sh",
            "-c",
            "echo $GREETING $(pwd) $(id -u)",
        )
        assert identity.stdout == b"hi /www 1000\n"

        terminal = Terminal([DOCKER_CLI, "exec", "-it", "web", "sh"], husk_daemon.env)
        terminal.expect(b"# ")
        terminal.send(b"echo $((6*7)); tty\r")
        terminal.expect(b"42")
        terminal.expect(b"/dev/pts/")
        terminal.send(b"exit 3\r")
        assert terminal.wait() == 3

        top = husk_daemon.docker("top", "web").stdout.decode()
        assert "httpd -f -v -p 80" in top
        stats = husk_daemon.docker(
            "stats", "--no-stream", "--format", "{{.Name}}|{{.MemUsage}}|{{.PIDs}}", "web"
        )
        name, memory, pids = stats.stdout.decode().strip().split("|")
        assert name == "web" and not memory.startswith("0B") and int(pids) >= 1

        husk_daemon.docker("pause", "web")
        paused = json.loads(husk_daemon.docker("inspect", "web").stdout)[0]["State"]
        assert paused["Status"] == "paused" and paused["Paused"] is True
        status = husk_daemon.docker("ps", "--filter", "name=web", "--format", "{{.Status}}")
        assert status.stdout.decode().strip().endswith("(Paused)")
        husk_daemon.docker("unpause", "web")
        assert http_get(port) == b"hello-husk\n"
        first_start = json.loads(husk_daemon.docker("inspect", "web").stdout)[0]["State"]
        husk_daemon.docker("restart", "-t", "2", "web")
        restarted = json.loads(husk_daemon.docker("inspect", "web").stdout)[0]["State"]
        assert restarted["Running"] and restarted["StartedAt"] > first_start["StartedAt"]
        assert http_get(port) == b"hello-husk\n"  # same host port after the restart

        husk_daemon.docker("cp", "web:/www", str(tmp_path / "www"), timeout=60)
        assert (tmp_path / "www" / "index.html").read_text() == "hello-husk\n"
        upload = tmp_path / "upload.txt"
        upload.write_text("copied in\n")
        husk_daemon.docker("cp", str(upload), "web:/www/", timeout=60)
        assert husk_daemon.docker("exec", "web", "cat", "/www/upload.txt").stdout == (
            b"copied in\n"
        )

        husk_daemon.docker("stop", "-t", "1", "web")
        state = json.loads(husk_daemon.docker("inspect", "web").stdout)[0]["State"]
        # httpd is PID 1 without a TERM handler: as under Docker, TERM is ignored and the
        # stop ends with KILL after its timeout.
        assert state["Status"] == "exited" and state["ExitCode"] == 137  # 128 + SIGKILL
        assert husk_daemon.docker("stop", "web").returncode == 0  # already stopped: 304
        listed = husk_daemon.docker("ps", "-a", "--format", "{{.Names}} {{.Status}}")
        assert "web Exited (137)" in listed.stdout.decode()
    finally:
        husk_daemon.docker("rm", "-f", "web", check=False)
    gone = husk_daemon.docker("rm", "web", check=False)
    assert gone.returncode != 0 and b"No such container: web" in gone.stderr


@pytest.mark.timeout(600)
def test_signals_wait_logs_follow_and_events(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    since = str(int(time.time()) - 1)
    script = (
        'trap "echo got-usr1; exit 0" USR1; i=0; '
        "while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"
    )
    husk_daemon.docker("run", "-d", "--name", "ticker", daemon_busybox, "sh", "-c", script)
    follower = subprocess.Popen(
        [DOCKER_CLI, "logs", "-f", "ticker"],
        env=husk_daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        lines = LineReader(follower)
        lines.wait_for("tick 3")
        count = len(lines.lines)
        lines.wait_for(f"tick {count + 3}")  # new lines keep arriving while following
        husk_daemon.docker("kill", "-s", "USR1", "ticker")
        assert husk_daemon.docker("wait", "ticker").stdout == b"0\n"
        assert follower.wait(60) == 0  # the follow ends with the container
        lines.join(10)
        assert lines.lines[-1] == "got-usr1"
        ticks = [int(line.split()[1]) for line in lines.lines if line.startswith("tick ")]
        assert ticks == list(range(1, len(ticks) + 1)), "no line lost or repeated"
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)
    everything = husk_daemon.docker("logs", "ticker")
    total = len(everything.stdout.splitlines()) + len(everything.stderr.splitlines())
    assert total >= 5
    tail = husk_daemon.docker("logs", "--tail", "2", "ticker")
    assert len(tail.stdout.splitlines()) + len(tail.stderr.splitlines()) == 2
    assert tail.stdout.decode().splitlines()[-1] == "got-usr1"
    stamped = husk_daemon.docker("logs", "-t", "--tail", "1", "ticker").stdout.decode()
    stamp, _, text = stamped.strip().partition(" ")
    assert text == "got-usr1" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", stamp)
    status = husk_daemon.docker("ps", "-a", "--filter", "name=ticker", "--format", "{{.Status}}")
    assert status.stdout.decode().startswith("Exited (0)")
    events = husk_daemon.docker(
        "events",
        "--since",
        since,
        "--until",
        str(int(time.time()) + 1),
        "--filter",
        "container=ticker",
        "--format",
        "{{.Action}}",
    )
    actions = events.stdout.decode().split()
    for action in ("create", "start", "kill", "die"):
        assert action in actions
    assert actions.index("create") < actions.index("start") < actions.index("die")
    # Creating from an image already in the store pulls nothing: no "pull" event.
    time.sleep(1.1)
    quiet_since = str(int(time.time()))
    husk_daemon.docker("create", "--name", "quiet", daemon_busybox, "true")
    image_events = husk_daemon.docker(
        "events", "--since", quiet_since, "--until", str(int(time.time()) + 1),
        "--filter", "type=image", "--format", "{{.Action}}",
    )  # fmt: skip
    assert image_events.stdout == b"", image_events.stdout
    husk_daemon.docker("rm", "quiet")
    # A SIGKILL returns once the container has stopped, as Docker's does.
    husk_daemon.docker("start", "ticker")
    husk_daemon.docker("kill", "ticker")
    state = husk_daemon.docker("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", "ticker")
    assert state.stdout == b"false 137\n", state.stdout
    husk_daemon.docker("rm", "ticker")
