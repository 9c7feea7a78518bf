"""A local user cannot plant a fake daemon where the husk client looks for the real one.

Without ``XDG_RUNTIME_DIR`` a user's run directory is ``/tmp/husk-UID/husk``: any
other user could create it first, with a socket of their own, and the client used to
send them its requests (and believe their answers). The attack here is real: the
fake daemon runs as ``nobody`` (Debian's python3, stdlib only), the victim's
``husk ps`` as another unprivileged uid. Then the path checks and the kernel's peer
credentials (SO_PEERCRED) are tested one by one, and the daemon's own creation of
its run directory. No VM.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from husk import paths
from husk.client.http import ApiClient, UntrustedDaemon

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
SRC = Path(__file__).resolve().parent.parent / "src"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")

# The attacker's daemon: answers every request with a made-up container list.
FAKE_DAEMON = r"""
import os, socket, sys
path, log = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
server.listen(8)
print("ready", flush=True)
body = (b'[{"Id": "' + b"e" * 64 + b'", "Names": ["/planted-by-nobody"], "Image": "evil",'
        b' "Command": "x", "Created": 0, "Ports": [], "Labels": {}, "State": "running",'
        b' "Status": "Up"}]')
while True:
    client, _ = server.accept()
    request = client.recv(65536)
    if not request:  # a client that checked who listens and hung up sent nothing
        client.close()
        continue
    with open(log, "ab") as handle:
        handle.write(request.split(b"\r\n")[0] + b"\n")
    client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    client.close()
"""


def as_user(uid: int) -> dict[str, object]:
    """subprocess arguments that run the child as ``uid`` (group too, no supplementary)."""

    def drop() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    return {"preexec_fn": drop}


@dataclass
class FakeDaemon:
    process: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def requests(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def start_fake_daemon(socket_path: Path, workdir: Path) -> FakeDaemon:
    """The fake daemon, listening as ``nobody`` on ``socket_path``."""
    workdir.mkdir(parents=True, exist_ok=True)
    os.chown(workdir, NOBODY, NOBODY)
    log = workdir / "requests.log"
    process = subprocess.Popen(
        [SYSTEM_PYTHON, "-S", "-c", FAKE_DAEMON, str(socket_path), str(log)],
        stdout=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
        **as_user(NOBODY),  # type: ignore[arg-type]
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == b"ready"
    return FakeDaemon(process, socket_path, log)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory other users can traverse (pytest's own live under a 0700 one)."""
    directory = Path(tempfile.mkdtemp(prefix="husk-squat-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def cleanup() -> Iterator[list[object]]:
    items: list[object] = []
    yield items
    for item in reversed(items):
        if isinstance(item, FakeDaemon):
            item.process.kill()
            item.process.wait(10)
        elif isinstance(item, Path):
            shutil.rmtree(item, ignore_errors=True)


def unused_uid() -> int:
    while True:
        uid = random.randint(40000, 60000)
        if not os.path.lexists(f"/tmp/husk-{uid}"):
            return uid


def readable_click(root: Path) -> Path:
    """A copy of click the unprivileged victim can import (pyenv lives under /root)."""
    import click

    target = root / "site"
    shutil.copytree(Path(click.__file__).parent, target / "click")
    for directory in [root, *root.rglob("*")]:
        directory.chmod(directory.stat().st_mode | 0o755 if directory.is_dir() else 0o644)
    return target


def test_a_run_directory_squatted_in_tmp_is_refused(open_tmp: Path, cleanup: list[object]) -> None:
    """The reproduction: ``nobody`` creates /tmp/husk-UID first; the victim's ps is refused."""
    victim = unused_uid()
    squatted = Path(f"/tmp/husk-{victim}")
    cleanup.append(squatted)
    squatted.mkdir(mode=0o755)
    (squatted / "husk").mkdir(mode=0o777)
    os.chown(squatted, NOBODY, NOBODY)
    os.chown(squatted / "husk", NOBODY, NOBODY)
    fake = start_fake_daemon(squatted / "husk" / "husk.sock", squatted / "attacker")
    cleanup.append(fake)

    shared = open_tmp / "victim"
    shared.mkdir(mode=0o755)
    site = readable_click(shared)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(shared),
        "PYTHONPATH": f"{SRC}:{site}",
        "HUSK_DAEMON_START_TIMEOUT": "5",
    }  # no XDG_RUNTIME_DIR, no HUSK_RUN_DIR: the /tmp/husk-UID fallback
    result = subprocess.run(
        [SYSTEM_PYTHON, "-m", "husk.cli.main", "ps"],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
        **as_user(victim),  # type: ignore[arg-type]
    )
    err = result.stderr.decode()
    assert "planted-by-nobody" not in result.stdout.decode()
    assert result.returncode == 125, (result.stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"husk: refusing to use {squatted}"), lines[0]
    assert "uid 65534" in lines[0]
    assert fake.requests() == []  # not even a ping reached it


def test_a_run_directory_of_another_user_is_refused(
    open_tmp: Path, cleanup: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = open_tmp / "run"
    run.mkdir()
    os.chown(run, NOBODY, NOBODY)
    fake = start_fake_daemon(run / "husk.sock", open_tmp / "attacker")
    cleanup.append(fake)
    monkeypatch.setenv("HUSK_RUN_DIR", str(run))
    monkeypatch.delenv("HUSK_SOCKET", raising=False)
    result = subprocess.run(
        [sys.executable, "-m", "husk.cli.main", "ps"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 125
    assert result.stderr.decode().startswith(f"husk: refusing to use {run}: it belongs to uid")
    assert b"planted-by-nobody" not in result.stdout
    assert fake.requests() == []


def test_a_socket_served_by_another_user_is_refused_even_at_a_trusted_path(
    open_tmp: Path, cleanup: list[object]
) -> None:
    """Path checks pass (the file is root's), the kernel says who listens: refused."""
    directory = open_tmp / "open"
    directory.mkdir()
    directory.chmod(0o777)  # so nobody can bind there
    fake = start_fake_daemon(directory / "husk.sock", open_tmp / "attacker")
    cleanup.append(fake)
    os.chown(fake.socket, 0, 0)
    directory.chmod(0o700)  # and from now on the path is beyond reproach
    with pytest.raises(UntrustedDaemon, match="runs as uid 65534"):
        ApiClient(str(fake.socket)).get("/containers/json")
    with pytest.raises(UntrustedDaemon):
        ApiClient(str(fake.socket)).ping()
    assert fake.requests() == []


def test_husk_socket_pointing_at_a_socket_of_another_user_is_refused(
    open_tmp: Path, cleanup: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = start_fake_daemon(Path(f"/tmp/husk-fake-{os.getpid()}.sock"), open_tmp / "attacker")
    cleanup.append(fake)
    try:
        monkeypatch.setenv("HUSK_SOCKET", str(fake.socket))
        result = subprocess.run(
            [sys.executable, "-m", "husk.cli.main", "ps"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 125
        assert result.stderr.decode().startswith(f"husk: refusing to use {fake.socket}")
        assert fake.requests() == []
    finally:
        fake.socket.unlink(missing_ok=True)


def test_the_daemon_refuses_a_squatted_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o777)
    os.chown(run, NOBODY, NOBODY)
    env = {**os.environ, "HUSK_RUN_DIR": str(run), "HUSK_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, "-m", "husk.cli.main", "daemon"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 125
    assert result.stderr.decode().startswith(f"husk: refusing to use {run}: it belongs to uid")
    assert list(run.iterdir()) == []  # no lock, log or socket left in it


# ------------------------------------------------------------ path rules


def test_secure_run_dir_creates_private_directories(tmp_path: Path) -> None:
    made = paths.secure_run_dir(tmp_path / "a" / "b" / "run")
    for directory in (tmp_path / "a", tmp_path / "a" / "b", made):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert paths.check_run_dir(made) is True
    assert paths.check_run_dir(tmp_path / "missing") is False


def test_secure_run_dir_tightens_a_directory_of_ours_open_to_others(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    paths.secure_run_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


def test_a_planted_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "run").symlink_to(target)
    with pytest.raises(paths.UnsafePath, match="symbolic link"):
        paths.secure_run_dir(tmp_path / "run")
    os.lchown(tmp_path / "run", NOBODY, NOBODY)
    with pytest.raises(paths.UnsafePath, match="belongs to uid 65534"):
        paths.check_run_dir(tmp_path / "run" / "husk")  # a link of another user's on the way


def test_a_root_owned_link_on_the_way_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    made = paths.secure_run_dir(tmp_path / "via" / "run")
    assert (real / "run").is_dir() and made == tmp_path / "via" / "run"


def test_writable_ancestors_are_refused_unless_sticky_and_roots(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(paths.UnsafePath, match="others can write to it"):
        paths.secure_run_dir(shared / "run")
    shared.chmod(0o1777)  # like /tmp: others cannot replace our entries
    assert paths.secure_run_dir(shared / "run").is_dir()
    os.chown(shared, NOBODY, NOBODY)
    with pytest.raises(paths.UnsafePath, match="belongs to uid 65534"):
        paths.check_run_dir(shared / "run")


def test_a_socket_that_is_not_ours_or_not_a_socket_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "husk.sock"
    plain.write_text("")
    with pytest.raises(paths.UnsafePath, match="not a socket"):
        paths.check_socket(plain)
    plain.unlink()
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(plain))
        assert paths.check_socket(plain) is True
        os.chown(plain, NOBODY, NOBODY)
        with pytest.raises(paths.UnsafePath, match="belongs to uid 65534"):
            paths.check_socket(plain)
    finally:
        server.close()
    assert paths.check_socket(tmp_path / "none.sock") is False


def test_checks_cost_little() -> None:
    """The client runs them on every command (``husk ps`` has a 100 ms budget)."""
    started = time.perf_counter()
    for _ in range(100):
        paths.check_ancestors(Path("/tmp/some/where/deep/husk.sock"))
    assert (time.perf_counter() - started) / 100 < 0.002
