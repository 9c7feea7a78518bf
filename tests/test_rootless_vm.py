"""husk as an unprivileged user (issue 17), with real VMs, a real daemon and the docker CLI.

As root, the module creates a throwaway user (its home, data and runtime directory under a
temporary directory; the user is removed afterwards) and runs husk as that user the way
an ordinary account would: Debian's /usr/bin/python3 in a venv of its own, an ordinary
PATH (no /sbin), no HUSK_DATA_DIR or HUSK_RUN_DIR (so the XDG locations are used), the
guest bundle from a root-owned system location (HUSK_SYSTEM_BUNDLE: a copy of the
session's), and no KVM. Nothing is installed globally. One daemon serves every test;
a second throwaway user tries to reach and squat the first one's socket and directories.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from husk.tools import find_tool
from userenv import make_user_venv

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
DOCKER_CLI = shutil.which("docker") or "/usr/local/bin/docker"
TIMEOUT = 240.0
USER_PATH = "/usr/local/bin:/usr/bin:/bin"  # Debian's PATH for an ordinary user: no /sbin
BUSYBOX = "husk.local/busybox:latest"
RUNUSER = find_tool("runuser") or "/usr/sbin/runuser"


@dataclass
class User:
    name: str
    uid: int
    home: Path
    runtime_dir: Path
    env: dict[str, str]
    python: Path

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "husk" / "husk.sock"

    def run(
        self, *argv: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RUNUSER, "-u", self.name, "--", *argv],
            env={**self.env, **(env or {})},
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def husk(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.python), "-m", "husk.cli.main", *args, **kwargs)  # type: ignore[arg-type]

    def ok(self, *args: str) -> str:
        done = self.husk(*args)
        assert done.returncode == 0, f"husk {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout


def _add_user(base: Path, python: Path | None) -> User:
    name = f"hrl{secrets.token_hex(4)}"
    home = base / name
    useradd = find_tool("useradd") or "useradd"
    subprocess.run(
        [useradd, "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh",
         "--user-group", name],
        check=True,
    )  # fmt: skip
    entry = pwd.getpwnam(name)
    home.mkdir(mode=0o700)
    runtime_dir = base / f"run-{name}"
    runtime_dir.mkdir(mode=0o700)  # what pam_systemd makes as /run/user/UID
    if python is None:
        python = make_user_venv(home / "venv")
    for path in (home, runtime_dir):
        subprocess.run(["chown", "-R", f"{entry.pw_uid}:{entry.pw_gid}", str(path)], check=True)
    env = {
        "HOME": str(home),
        "USER": name,
        "LOGNAME": name,
        "PATH": USER_PATH,
        "LANG": "C.UTF-8",
        "XDG_RUNTIME_DIR": str(runtime_dir),
        "PYTHONPATH": str(base / "src"),
        "HUSK_SYSTEM_BUNDLE": str(base / "system" / "bundle"),
        "HUSK_ACCEL": "tcg",
    }
    return User(name, entry.pw_uid, home, runtime_dir, env, python)


def _kill_processes_of(uid: int) -> None:
    """SIGKILLs every process of ``uid`` (a user this module made: all of them are ours)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    os.kill(int(entry.name), 9)
            except OSError:
                pass


def _remove_user(user: User) -> None:
    try:
        user.husk("rm", "-f", *user.husk("ps", "-aq").stdout.split())
    finally:
        _kill_processes_of(user.uid)
        time.sleep(0.2)
        userdel = find_tool("userdel") or "/usr/sbin/userdel"
        subprocess.run([userdel, user.name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def rootless_base(guest_bundle: object) -> Iterator[Path]:
    assert os.geteuid() == 0, "this module creates users: it must run as root (as in CI)"
    assert find_tool("useradd") and find_tool("runuser"), "useradd and runuser are needed"
    base = Path(tempfile.mkdtemp(prefix="husk-rl-", dir="/tmp"))
    base.chmod(0o755)
    # husk's code and the system bundle, root-owned and readable by everyone, as a
    # package and install.sh would leave them.
    shutil.copytree(REPO / "src" / "husk", base / "src" / "husk",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy2(REPO / "scripts" / "import-busybox.sh", base / "import-busybox.sh")
    bundle = base / "system" / "bundle"
    bundle.mkdir(parents=True)
    kernel = Path(guest_bundle.kernel)  # type: ignore[attr-defined]
    for name in ("vmlinux", "initramfs.cpio", "manifest.json"):
        shutil.copy2(kernel.parent / name, bundle / name)
    for root, dirs, files in os.walk(base):
        for entry in dirs:
            os.chmod(os.path.join(root, entry), 0o755)
        for entry in files:
            os.chmod(os.path.join(root, entry), 0o755 if entry.endswith(".sh") else 0o644)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def user(rootless_base: Path) -> Iterator[User]:
    """The first user, with husk.local/busybox imported into its own store."""
    account = _add_user(rootless_base, None)
    try:
        done = account.run(
            "bash", str(rootless_base / "import-busybox.sh"), BUSYBOX,
            env={"HUSK": f"{account.python} -m husk.cli.main"},
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        yield account
    finally:
        account.husk("rm", "-f", "web")
        _remove_user(account)


@pytest.fixture(scope="module")
def other_user(rootless_base: Path, user: User) -> Iterator[User]:
    account = _add_user(rootless_base, user.python)
    try:
        yield account
    finally:
        _remove_user(account)


def _daemon_log(user: User) -> str:
    try:
        return (user.runtime_dir / "husk" / "daemon.log").read_text(errors="replace")
    except OSError:
        return ""


def test_quick_start_from_the_system_bundle_on_the_template_path(user: User) -> None:
    done = user.husk("run", "--rm", BUSYBOX, "echo", "hello")
    assert (done.returncode, done.stdout) == (0, "hello\n"), done.stderr + _daemon_log(user)
    # The daemon listens where a user's runtime directory says, privately.
    assert user.socket.is_socket()
    assert (user.socket.parent.stat().st_mode & 0o777) == 0o700
    assert user.socket.parent.stat().st_uid == user.uid
    # Its bundle is the system's: nothing was built in the user's data directory.
    assert not (user.home / ".local" / "share" / "husk" / "bundle").exists()
    info = user.ok("bundle", "info")
    assert str(Path(user.env["HUSK_SYSTEM_BUNDLE"]) / "vmlinux") in info

    done = user.husk("run", "--rm", "--name", "second", BUSYBOX, "true")
    assert done.returncode == 0, done.stderr
    log = _daemon_log(user)
    assert re.search(r"container second \(\w+\): VM from template", log), log[-3000:]
    assert "cannot be restored" not in log and "discarding template" not in log
    check = user.ok("system", "check", "--no-boot")
    assert "mode:          rootless" in check
    assert "templates:     off" not in check


def test_ports_exec_logs_volume_and_names_on_a_user_network(user: User) -> None:
    user.ok("volume", "create", "data")
    user.ok("network", "create", "mine")
    port = _free_port()
    user.ok(
        "run", "-d", "--name", "web", "--network", "mine", "-p", f"127.0.0.1:{port}:80",
        "-v", "data:/data", BUSYBOX,
        "sh", "-c", "mkdir -p /www && echo served > /www/index.html && echo started && "
        "exec httpd -f -p 80 -h /www",
    )  # fmt: skip
    assert _http_get(port).endswith("served\n")
    assert user.ok("exec", "web", "sh", "-c", "echo kept > /data/f && cat /data/f") == "kept\n"
    assert "started" in user.ok("logs", "web")
    reply = user.ok(
        "run", "--rm", "--network", "mine", "-v", "data:/data", BUSYBOX, "sh", "-c",
        "cat /data/f; printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc web 80 | tail -n 1",
    )  # fmt: skip
    assert reply == "kept\nserved\n"
    user.ok("rm", "-f", "web")
    user.ok("network", "rm", "mine")
    user.ok("volume", "rm", "data")


def test_the_docker_cli_on_the_users_socket(user: User) -> None:
    done = user.run(
        DOCKER_CLI, "-H", f"unix://{user.socket}", "run", "--rm", BUSYBOX, "echo", "from docker"
    )
    assert (done.returncode, done.stdout) == (0, "from docker\n"), done.stderr


def test_low_ports_and_husk_local_names_have_clear_messages(user: User) -> None:
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start > 80:
        done = user.husk("run", "--rm", "-p", "80:80", BUSYBOX, "true")
        assert done.returncode == 125
        assert "ports below" in done.stderr and "need root" in done.stderr
    done = user.husk("run", "--rm", "husk.local/nothing-here", "true")
    assert done.returncode == 125
    assert "not in this user's image store" in done.stderr
    assert "Traceback" not in done.stderr


def test_another_user_can_neither_reach_nor_squat(user: User, other_user: User) -> None:
    assert user.socket.is_socket()
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print(type(e).__name__)\n"
        "else:\n print('connected')\n"
    )
    done = other_user.run("/usr/bin/python3", "-c", probe, str(user.socket))
    assert done.stdout.strip() == "PermissionError", done.stdout + done.stderr
    done = other_user.run("mkdir", str(user.runtime_dir / "husk" / "squat"))
    assert done.returncode != 0
    data = user.home / ".local" / "share" / "husk"
    assert other_user.run("ls", str(data)).returncode != 0

    # Without XDG_RUNTIME_DIR the first user's husk falls back to /tmp/husk-UID: the
    # other user makes it first, and the first user's husk refuses it.
    squat = Path(f"/tmp/husk-{user.uid}")
    assert not squat.exists()
    try:
        assert other_user.run("mkdir", "-m", "0777", str(squat)).returncode == 0
        done = user.husk("ps", env={"XDG_RUNTIME_DIR": ""})
        assert done.returncode == 125, done.stdout + done.stderr
        assert "refusing to use" in done.stderr and other_user.name in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        shutil.rmtree(squat, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _http_get(port: int, deadline: float = 60.0) -> str:
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                chunks = []
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
            reply = b"".join(chunks).decode(errors="replace")
            if reply:
                return reply
        except OSError:
            pass
        if time.monotonic() > end:
            raise AssertionError(f"nothing served on 127.0.0.1:{port}")
        time.sleep(0.5)
