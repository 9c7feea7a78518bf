"""The ``husk`` CLI against a real daemon and real VMs: Docker's verbs, shapes and exit codes.

Every command runs as a subprocess (``python -m husk.cli.main``), the way a
user runs it, so exit codes, stdout/stderr separation and one-line errors are
what is checked. One long-lived container serves most read-only checks to keep
the number of VM boots small.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon_fixtures import RunningDaemon, husk_daemon  # noqa: F401 - fixture
from registry_fixtures import RunningRegistry, registry  # noqa: F401 - fixture

pytestmark = pytest.mark.vm

IMAGE = "husk.local/busybox:latest"
CLI_TIMEOUT = 180.0


@dataclass
class Cli:
    daemon: RunningDaemon

    @property
    def env(self) -> dict[str, str]:
        return {**self.daemon.env, "COLUMNS": "200"}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "husk.cli.main", *args]

    def __call__(
        self, *args: str, input: str | None = None, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    def ok(self, *args: str, input: str | None = None) -> str:
        result = self(*args, input=input)
        assert result.returncode == 0, (
            f"husk {' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\n"
            f"daemon log tail:\n{self.daemon.log()[-3000:]}"
        )
        return result.stdout

    def fails(self, *args: str, message: str) -> str:
        """The command fails like husk's own errors: exit 125, one line ``husk: …``."""
        result = self(*args)
        assert result.returncode == 125, (result.returncode, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("husk: "), lines[0]
        assert re.search(message, lines[0], re.IGNORECASE), lines[0]
        assert "Traceback" not in result.stderr
        return lines[0]

    def container_ids(self) -> set[str]:
        return set(self.ok("ps", "-a", "-q", "--no-trunc").split())


@pytest.fixture(scope="module")
def cli(husk_daemon: RunningDaemon) -> Cli:  # noqa: F811 - the imported fixture
    from husk.oci.store import ImageStore
    from testimages import install_busybox_image

    install_busybox_image(ImageStore(husk_daemon.data_dir / "images"))
    return Cli(husk_daemon)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, deadline: float = 60.0) -> str:
    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


# ------------------------------------------------------------------- attached runs


def test_run_echo_hello_then_exit_codes(cli: Cli) -> None:
    before = cli.container_ids()
    result = cli("run", "--rm", "--name", "hello", IMAGE, "echo", "hello")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello\n", "")

    result = cli("run", "--rm", IMAGE, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    # --rm: both are gone by the time the command returns.
    assert cli.container_ids() == before


def test_run_forwards_piped_stdin_and_its_end(cli: Cli) -> None:
    result = cli("run", "-i", "--rm", IMAGE, "sh", "-c", "cat; echo done", input="line 1\nline 2\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "line 1\nline 2\ndone\n"


def test_run_forwards_signals_to_the_workload(cli: Cli) -> None:
    script = 'trap "echo got-term; exit 9" TERM; echo ready; while true; do sleep 0.1; done'
    process = subprocess.Popen(
        cli.argv("run", "--rm", IMAGE, "sh", "-c", script),
        env=cli.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()  # blocks until the workload speaks
        assert ready == b"ready\n"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 9, err
    assert out == b"got-term\n"


def test_run_it_gives_an_interactive_shell_in_a_terminal(cli: Cli) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: husk on the pseudo-terminal
        os.execvpe(sys.executable, cli.argv("run", "-it", "--rm", IMAGE, "sh"), cli.env)
    try:
        import fcntl
        import termios

        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        screen = PtyReader(fd)
        screen.expect(b"# ")
        os.write(fd, b"echo $((6*7))\r")
        screen.expect(b"\r\n42\r\n")
        os.write(fd, b"stty size; tty\r")
        screen.expect(b"33 111\r\n")
        screen.expect(b"/dev/pts/")
        # The window changes size: SIGWINCH reaches husk, which resizes the guest's tty.
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 70, 0, 0))
        time.sleep(0.5)
        os.write(fd, b"stty size\r")
        screen.expect(b"20 70\r\n")
        os.write(fd, b"exit 3\r")
        _, status = waitpid_with_deadline(pid, 60)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 3


class PtyReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = b""

    def expect(self, wanted: bytes, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        while wanted not in self.seen:
            remaining = end - time.monotonic()
            assert remaining > 0, f"never saw {wanted!r}; screen: {self.seen[-500:]!r}"
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    data = b""
                assert data, f"terminal closed before {wanted!r}; screen: {self.seen[-500:]!r}"
                self.seen += data
        self.seen = self.seen[self.seen.index(wanted) + len(wanted) :]


def waitpid_with_deadline(pid: int, deadline: float) -> tuple[int, int]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return done, status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"husk run -it did not exit within {deadline} s")


def test_create_then_start_attached(cli: Cli) -> None:
    container_id = cli.ok("create", "--name", "made", IMAGE, "sh", "-c", "echo from-create; exit 5")
    assert re.fullmatch(r"[0-9a-f]{64}\n", container_id)
    assert cli.ok("ps", "-a", "--filter", "name=made", "--format", "{{.State}}") == "created\n"
    result = cli("start", "-a", "made")
    assert (result.returncode, result.stdout) == (5, "from-create\n")
    assert cli.ok("inspect", "-f", "{{.State.ExitCode}}", "made") == "5\n"
    assert cli.ok("rm", "made") == "made\n"


def test_create_records_the_options_in_docker_shapes(cli: Cli) -> None:
    cli.ok(
        "create", "--name", "shaped", "--restart", "on-failure:2", "--stop-signal", "SIGINT",
        "--stop-timeout", "3", "--entrypoint", "/bin/echo", "-w", "/tmp", "-u", "1000",
        "--expose", "8080", "-l", "a=b", "-e", "K=V", "-P", IMAGE, "one", "two",
    )  # fmt: skip
    try:
        (doc,) = json.loads(cli.ok("inspect", "shaped"))
        assert doc["Config"]["Entrypoint"] == ["/bin/echo"]
        assert doc["Config"]["Cmd"] == ["one", "two"]
        assert doc["Config"]["WorkingDir"] == "/tmp"
        assert doc["Config"]["User"] == "1000"
        assert doc["Config"]["StopSignal"] == "SIGINT"
        assert doc["Config"]["StopTimeout"] == 3
        assert doc["Config"]["Labels"] == {"a": "b"}
        assert "K=V" in doc["Config"]["Env"]
        assert "8080/tcp" in doc["Config"]["ExposedPorts"]
        assert doc["HostConfig"]["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
        assert doc["HostConfig"]["PublishAllPorts"] is True
        assert doc["State"]["Status"] == "created"
    finally:
        cli.ok("rm", "shaped")


# --------------------------------------------------------- a long-running container


SERVICE_SCRIPT = (
    "mkdir -p /www && echo banner-$GREETING > /www/index.html && echo started "
    "&& httpd -p 80 -h /www && i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done"
)


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host directory bind-mounted read-only into the service."""
    path = tmp_path_factory.mktemp("shared")
    (path / "hello.txt").write_text("from a bind mount\n")
    return path


@pytest.fixture(scope="module")
def service(cli: Cli, shared_dir: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    output = cli.ok(
        "run", "-d", "--name", "svc", "-p", f"127.0.0.1:{port}:80",
        "-e", "GREETING=hi", "-l", "tier=web", "--hostname", "svc-host",
        "-m", "200m", "--cpus", "1", "-v", f"{shared_dir}:/shared:ro",
        "--tmpfs", "/scratch:size=8m",
        "--health-cmd", "wget -q -O /dev/null http://127.0.0.1/", "--health-interval", "1s",
        IMAGE, "sh", "-c", SERVICE_SCRIPT,
    )  # fmt: skip
    container_id = output.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", container_id)
    yield container_id, port
    cli("rm", "-f", container_id)


def test_ps_lists_the_service_in_docker_shapes(cli: Cli, service: tuple[str, int]) -> None:
    container_id, port = service
    lines = cli.ok("ps").splitlines()
    assert lines[0].split() == [
        "CONTAINER", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"
    ]  # fmt: skip
    row = next(line for line in lines if line.startswith(container_id[:12]))
    assert row.endswith(f"127.0.0.1:{port}->80/tcp   svc")
    assert " Up " in row
    assert cli.ok("ps", "-q", "--filter", "label=tier=web") == container_id[:12] + "\n"
    assert cli.ok("ps", "-q", "--filter", "name=no-such-name") == ""
    doc = json.loads(cli.ok("ps", "--format", "json", "--filter", "name=svc"))
    assert (doc["Names"], doc["State"]) == ("svc", "running")
    assert cli.ok("ps", "-n", "1", "--format", "{{.Names}}") != ""


def test_run_options_reach_the_container(
    cli: Cli, service: tuple[str, int], shared_dir: Path
) -> None:
    assert cli.ok("exec", "svc", "hostname") == "svc-host\n"
    assert cli.ok("exec", "svc", "cat", "/shared/hello.txt") == "from a bind mount\n"
    denied = cli("exec", "svc", "sh", "-c", "echo x > /shared/new.txt")
    assert denied.returncode != 0 and not (shared_dir / "new.txt").exists()
    assert "/scratch" in cli.ok("exec", "svc", "sh", "-c", "grep ' /scratch ' /proc/mounts")
    assert cli.ok("inspect", "-f", "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}", "svc") == (
        f"{200 * 1024 * 1024} 1000000000\n"
    )
    end = time.monotonic() + 90
    while "(healthy)" not in cli.ok("ps", "--filter", "name=svc", "--format", "{{.Status}}"):
        assert time.monotonic() < end, cli.ok("inspect", "-f", "{{json .State.Health}}", "svc")
        time.sleep(0.5)
    assert cli.ok("inspect", "-f", "{{.State.Health.Status}}", "svc") == "healthy\n"


def test_published_port_serves_http_and_is_reported(cli: Cli, service: tuple[str, int]) -> None:
    _, port = service
    assert http_get(f"http://127.0.0.1:{port}/") == "banner-hi\n"
    assert cli.ok("port", "svc") == f"80/tcp -> 127.0.0.1:{port}\n"
    assert cli.ok("port", "svc", "80") == f"127.0.0.1:{port}\n"
    cli.fails("port", "svc", "81", message="no public port '81/tcp'")


def test_logs_follow_streams_new_lines(cli: Cli, service: tuple[str, int]) -> None:
    assert cli.ok("logs", "svc").startswith("started\ntick 1\n")
    assert len(cli.ok("logs", "--tail", "1", "svc").splitlines()) == 1
    stamped = cli.ok("logs", "-t", "--tail", "1", "svc")
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z tick \d+\n", stamped), stamped
    follower = subprocess.Popen(
        cli.argv("logs", "-f", "--tail", "0", "svc"),
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None
        seen = b""
        end = time.monotonic() + 60
        while seen.count(b"tick") < 2:
            assert time.monotonic() < end, f"logs -f showed only {seen!r}"
            ready, _, _ = select.select([follower.stdout], [], [], 1)
            if ready:
                data = os.read(follower.stdout.fileno(), 4096)
                assert data, "logs -f ended while the container runs"
                seen += data
        ticks = [int(n) for n in re.findall(rb"tick (\d+)", seen)]
        assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))
        assert follower.poll() is None
    finally:
        follower.terminate()
        follower.wait(30)


def test_exec_runs_commands_with_their_exit_codes(cli: Cli, service: tuple[str, int]) -> None:
    result = cli("exec", "svc", "echo", "hi")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n", "")
    assert cli("exec", "svc", "sh", "-c", "exit 42").returncode == 42
    assert cli.ok("exec", "-e", "X=1", "-w", "/www", "svc", "sh", "-c", "echo $X $(pwd)") == (
        "1 /www\n"
    )
    assert cli.ok("exec", "-u", "1000", "svc", "id", "-u") == "1000\n"
    assert cli.ok("exec", "svc", "sh", "-c", "echo $GREETING") == "hi\n"
    assert cli.ok("exec", "-i", "svc", "cat", input="piped in\n") == "piped in\n"
    result = cli("exec", "svc", "sh", "-c", "echo to-err >&2")
    assert (result.stdout, result.stderr) == ("", "to-err\n")
    assert cli.ok("exec", "-d", "svc", "sh", "-c", "echo detached > /tmp/detached") == ""
    end = time.monotonic() + 30
    while cli("exec", "svc", "cat", "/tmp/detached").stdout != "detached\n":
        assert time.monotonic() < end, "the detached exec never wrote its file"
        time.sleep(0.2)
    cli.fails("exec", "svc", "", message="command|argv|empty")
    result = cli("exec", "svc", "/no/such/binary")
    assert result.returncode in (126, 127), (result.returncode, result.stderr)
    # The CLI's exit codes above came from the stream's last frame, which the daemon sends
    # only to a client that asks (Docker's clients never see a stream number beyond 3).
    assert exec_frames(cli, "svc", asked=True)[-1] == (4, b'{"ExitCode": 42}')
    assert [stream for stream, _ in exec_frames(cli, "svc", asked=False)] == [1]


def exec_frames(cli: Cli, container: str, *, asked: bool) -> list[tuple[int, bytes]]:
    """The frames of `sh -c 'echo x; exit 42'` exec'ed over the daemon's API, with or
    without husk's request for the exit status frame."""
    from husk.client import streams
    from husk.client.http import ApiClient

    api = ApiClient(str(cli.daemon.socket))
    body = {"Cmd": ["sh", "-c", "echo x; exit 42"], "AttachStdout": True, "AttachStderr": True}
    exec_id = api.post(f"/containers/{container}/exec", json_body=body)["Id"]
    headers = {"X-Husk-Exit-Status": "frame"} if asked else {}
    stream = api.hijack(f"/exec/{exec_id}/start", json_body={"Detach": False}, headers=headers)
    received = b""
    while data := stream.recv():
        received += data
    stream.close()
    return streams.FrameDecoder(exit_status=True).feed(received)


def test_exec_it_in_a_terminal(cli: Cli, service: tuple[str, int]) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(sys.executable, cli.argv("exec", "-it", "svc", "sh"), cli.env)
    try:
        import fcntl
        import termios

        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 25, 90, 0, 0))
        screen = PtyReader(fd)
        screen.expect(b"# ")
        os.write(fd, b"stty size; cat /www/index.html\r")
        screen.expect(b"25 90\r\n")
        screen.expect(b"banner-hi\r\n")
        os.write(fd, b"exit 4\r")
        _, status = waitpid_with_deadline(pid, 60)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 4


def test_inspect_stats_top(cli: Cli, service: tuple[str, int]) -> None:
    container_id, _ = service
    docs = json.loads(cli.ok("inspect", "svc"))
    assert isinstance(docs, list) and len(docs) == 1
    assert docs[0]["Id"] == container_id
    assert docs[0]["Name"] == "/svc"
    assert docs[0]["State"]["Running"] is True
    assert cli.ok("inspect", "-f", "{{.State.Status}} {{.Config.Labels.tier}}", "svc") == (
        "running web\n"
    )
    image_doc = json.loads(cli.ok("inspect", "--type", "image", IMAGE))
    assert image_doc[0]["Id"].startswith("sha256:")

    header, row = cli.ok("stats", "--no-stream", "svc").splitlines()
    assert header.split()[:3] == ["CONTAINER", "ID", "NAME"]
    assert "MEM USAGE / LIMIT" in header and "PIDS" in header
    assert row.startswith(container_id[:12])
    fields = json.loads(cli.ok("stats", "--no-stream", "--format", "json", "svc"))
    used, _, limit = fields["MemUsage"].partition(" / ")
    assert used != "0B" and limit != "0B"
    assert int(fields["PIDs"]) >= 2

    top = cli.ok("top", "svc")
    assert "PID" in top.splitlines()[0]
    assert "httpd" in top


RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_guest_and_image_escape_sequences_reach_the_terminal_escaped(cli: Cli) -> None:
    """A process command line, a label and a health check's output carrying ESC/CSI/BEL.

    ``husk top`` (the guest's process list), ``husk ps`` (the container's command and
    labels) and ``husk inspect`` (the health check's output) print them escaped.
    """
    evil = "\x1b]0;pwned\x07\x1b[2J\u009b31mred"
    output = cli.ok(
        "run", "-d", "--label", f"evil={evil}",
        "--health-cmd", "printf '\\033[2Jhealth\\302\\233'", "--health-interval", "1s",
        IMAGE, "sh", "-c", "sleep 1000; :", evil,
    )  # fmt: skip
    container_id = output.strip()
    try:
        top = cli.ok("top", container_id)
        assert "sleep 1000" in top
        assert "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31mred" in top, top
        assert not RAW_CONTROL.search(top), repr(top)

        ps = cli.ok("ps", "--no-trunc", "--filter", f"id={container_id}")
        assert "\\x1b]0;pwned" in ps and not RAW_CONTROL.search(ps), repr(ps)
        labels = cli.ok("ps", "--filter", f"id={container_id}", "--format", "{{.Labels}}")
        assert labels.startswith("evil=\\x1b]0;pwned") and not RAW_CONTROL.search(labels)

        deadline = time.monotonic() + 60
        while True:
            inspect = cli.ok("inspect", container_id)
            log = json.loads(inspect)[0]["State"].get("Health", {}).get("Log") or []
            if log or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert log and "health" in log[-1]["Output"]
        assert not RAW_CONTROL.search(inspect), repr(inspect)
    finally:
        cli("rm", "-f", container_id)


def test_cp_both_ways(cli: Cli, service: tuple[str, int], tmp_path: Path) -> None:
    source = tmp_path / "note.txt"
    source.write_text("from the host\n")
    result = cli("cp", str(source), "svc:/tmp/")
    assert result.returncode == 0, result.stderr
    assert cli.ok("exec", "svc", "cat", "/tmp/note.txt") == "from the host\n"
    cli.ok("cp", str(source), "svc:/tmp/renamed.txt")
    assert cli.ok("exec", "svc", "cat", "/tmp/renamed.txt") == "from the host\n"

    cli.ok("cp", "svc:/www/index.html", str(tmp_path))
    assert (tmp_path / "index.html").read_text() == "banner-hi\n"
    cli.ok("cp", "svc:/www", str(tmp_path / "site"))
    assert (tmp_path / "site" / "index.html").read_text() == "banner-hi\n"

    tarred = subprocess.run(
        cli.argv("cp", "svc:/www/index.html", "-"), env=cli.env, capture_output=True, timeout=120
    )
    assert tarred.returncode == 0, tarred.stderr
    with tarfile.open(fileobj=io.BytesIO(tarred.stdout)) as archive:
        member = archive.extractfile("index.html")
        assert member is not None and member.read() == b"banner-hi\n"
    cli.fails("cp", "svc:/no/such/file", str(tmp_path), message="could not find|no such|not found")

    archive_bytes = io.BytesIO()
    with tarfile.open(fileobj=archive_bytes, mode="w") as archive:
        info = tarfile.TarInfo("from-stdin.txt")
        info.size = len(b"streamed\n")
        archive.addfile(info, io.BytesIO(b"streamed\n"))
    piped = subprocess.run(
        cli.argv("cp", "-", "svc:/tmp"),
        env=cli.env,
        input=archive_bytes.getvalue(),
        capture_output=True,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    assert cli.ok("exec", "svc", "cat", "/tmp/from-stdin.txt") == "streamed\n"


def test_pause_unpause_rename_restart(cli: Cli, service: tuple[str, int]) -> None:
    assert cli.ok("pause", "svc") == "svc\n"
    assert cli.ok("inspect", "-f", "{{.State.Status}}", "svc") == "paused\n"
    assert "(Paused)" in cli.ok("ps", "--filter", "name=svc", "--format", "{{.Status}}")
    assert cli.ok("unpause", "svc") == "svc\n"
    assert cli.ok("inspect", "-f", "{{.State.Status}}", "svc") == "running\n"

    cli.ok("rename", "svc", "svc-renamed")
    assert cli.ok("ps", "--filter", "name=svc-renamed", "--format", "{{.Names}}") == (
        "svc-renamed\n"
    )
    cli.ok("rename", "svc-renamed", "svc")

    assert cli.ok("restart", "-t", "1", "svc") == "svc\n"
    assert cli.ok("inspect", "-f", "{{.State.Running}}", "svc") == "true\n"
    end = time.monotonic() + 60
    while cli.ok("logs", "svc").count("started\n") < 2:
        assert time.monotonic() < end, "the restarted workload never wrote its first line"
        time.sleep(0.3)


def test_stop_wait_exec_into_stopped_then_rm(cli: Cli, service: tuple[str, int]) -> None:
    container_id, _ = service
    assert cli.ok("stop", "-t", "2", "svc") == "svc\n"
    assert cli.ok("stop", "svc") == "svc\n"  # already stopped: nothing to do, no error
    code = int(cli.ok("wait", "svc"))
    assert code == int(cli.ok("inspect", "-f", "{{.State.ExitCode}}", "svc"))
    status = cli.ok("ps", "-a", "--filter", "name=svc", "--format", "{{.Status}}")
    assert status.startswith("Exited (")
    cli.fails("exec", "svc", "echo", "hi", message="not running")
    assert cli.ok("rm", "svc") == "svc\n"
    assert container_id not in cli.container_ids()
    cli.fails("inspect", "svc", message="No such object: svc")
    cli.fails("rm", "svc", message="No such container|not found")


# ------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_125_and_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    before = cli.container_ids()
    cli.fails("logs", "nosuch", message="nosuch")
    cli.fails("stop", "nosuch", message="nosuch")
    cli.fails("exec", "nosuch", "true", message="nosuch")
    cli.fails(
        "run", "--rm", "--pull", "never", "husk.local/nosuch:latest", "true",
        message="No such image",
    )  # fmt: skip
    cli.fails("run", "--rm", "-m", "12zz", IMAGE, "true", message="invalid memory '12zz'")
    cli.fails(
        "run", "--rm", "-v", f"{tmp_path}/missing-dir:/data", IMAGE, "true",
        message="missing-dir",
    )  # fmt: skip

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        cli.fails(
            "run", "--rm", "--name", "clash", "-p", f"127.0.0.1:{port}:80", IMAGE, "true",
            message=str(port),
        )  # fmt: skip
    finally:
        busy.close()
    assert cli.container_ids() == before

    first = cli.ok("create", "--name", "dup", IMAGE, "true").strip()
    cli.fails("create", "--name", "dup", IMAGE, "true", message="dup")
    cli.fails("run", "--name", "dup", IMAGE, "true", message="dup")
    assert cli.container_ids() == before | {first}
    cli.ok("rm", "dup")
    assert cli.container_ids() == before


# --------------------------------------------------------------- system commands


def test_version_info_and_system_df_prune(cli: Cli) -> None:
    version = cli.ok("version")
    assert version.startswith("Client:\n Version:")
    assert "\nServer: " in version and " Engine:\n" in version
    assert cli.ok("version", "--format", "{{.Server.ApiVersion}}") == "1.50\n"
    info = cli.ok("info")
    assert " Containers: " in info and " Images: " in info
    assert int(cli.ok("info", "--format", "{{.Images}}")) >= 1

    stopped = cli.ok("create", IMAGE, "true").strip()

    def system(*args: str) -> str:
        code = (
            "import sys; from husk.cli import system_ops; "
            "getattr(system_ops, sys.argv[1])(sys.argv[2:])"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            env=cli.env,
            timeout=CLI_TIMEOUT,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    df_lines = system("df").splitlines()
    assert df_lines[0].split() == ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]
    assert [line.split()[0] for line in df_lines[1:]] == ["Images", "Containers", "Local", "Build"]
    pruned = system("prune", "-f")
    assert f"Deleted Containers:\n{stopped}\n" in pruned
    assert "Total reclaimed space:" in pruned
    assert stopped not in cli.container_ids()


# ------------------------------------------------------------------- quick start


def test_quick_start_image_runs_offline(cli: Cli) -> None:
    """The README's first example, with the image scripts/import-busybox.sh makes."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "import-busybox.sh"
    name = "husk.local/quickstart:latest"
    env = {**cli.env, "HUSK": f"{sys.executable} -m husk.cli.main"}
    for expected in (f"imported {name}\n", f"{name} is up to date\n"):
        result = subprocess.run(
            ["bash", str(script), name], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected
    result = cli("run", "--rm", name, "echo", "hello")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello\n", "")
    assert cli.ok("run", "--rm", name, "sh", "-c", "cat /www/index.html; id -un") == (
        "<h1>husk</h1>\nroot\n"
    )


# ------------------------------------------------------------------------- pulls


@pytest.mark.registry
def test_run_pulls_a_missing_image_as_pull_policy_says(
    cli: Cli,
    registry: RunningRegistry,  # noqa: F811 - the imported fixture
    tmp_path: Path,
) -> None:
    from testimages import busybox_image_layout

    ref = registry.push_oci_layout(busybox_image_layout(tmp_path / "layout"), "cli/busybox")
    cli.fails("run", "--rm", "--pull", "never", ref, "true", message="No such image")

    result = cli("run", "--rm", ref, "echo", "pulled")
    assert (result.returncode, result.stdout) == (0, "pulled\n"), result.stderr
    assert f"Unable to find image '{ref}' locally" in result.stderr
    assert cli.ok("inspect", "--type", "image", "-f", "{{.Id}}", ref).startswith("sha256:")

    # Present now: "missing" does not pull again, "always" does.
    result = cli("run", "--rm", ref, "true")
    assert (result.returncode, result.stderr) == (0, "")
    result = cli("run", "--rm", "--pull", "always", ref, "true")
    assert result.returncode == 0, result.stderr
    assert result.stderr != ""

    # Docker's notice first, then the error: one line, exit 125.
    missing = f"{registry.host}/cli/never-pushed:latest"
    result = cli("run", "--rm", missing, "true")
    assert result.returncode == 125
    notice, error = result.stderr.strip().splitlines()
    assert notice == f"Unable to find image '{missing}' locally"
    assert error.startswith("husk: ") and "never-pushed" in error
