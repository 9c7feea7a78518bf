"""husk as an unprivileged user (issue 17), with real VMs, a real daemon and the docker CLI.

As root, the module creates a throwaway user (its home, data and runtime directory under a
temporary directory; the user is removed afterwards) and runs husk as that user the way
an ordinary account would: Debian's /usr/bin/python3 in a venv of its own, an ordinary
PATH (no /sbin), no HUSK_DATA_DIR or HUSK_RUN_DIR (so the XDG locations are used), the
guest bundle and husk.local/busybox from root-owned system locations (HUSK_SYSTEM_BUNDLE:
a copy of the session's bundle; HUSK_SYSTEM_IMAGES), and no KVM. Nothing is installed
globally. One daemon serves every test; a second throwaway user tries to reach and squat
the first one's socket and directories.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_fixtures import registry, registry_busybox
from husk.tools import find_tool
from userenv import BUSYBOX, User, add_user, prepare_base, remove_user

pytestmark = pytest.mark.vm
__all__ = ["registry", "registry_busybox"]  # fixtures used by name

REPO = Path(__file__).resolve().parent.parent
DOCKER_CLI = shutil.which("docker") or "/usr/local/bin/docker"


@pytest.fixture(scope="module")
def rootless_base(guest_bundle: object) -> Iterator[Path]:
    assert os.geteuid() == 0, "this module creates users: it must run as root (as in CI)"
    assert find_tool("useradd") and find_tool("runuser"), "useradd and runuser are needed"
    base = prepare_base(Path(guest_bundle.kernel).parent)  # type: ignore[attr-defined]
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def user(rootless_base: Path) -> Iterator[User]:
    """The first user: nothing in its image store yet (husk.local/busybox is the system's)."""
    account = add_user(rootless_base, None)
    try:
        yield account
    finally:
        account.husk("rm", "-f", "web")
        remove_user(account)


@pytest.fixture(scope="module")
def other_user(rootless_base: Path, user: User) -> Iterator[User]:
    account = add_user(rootless_base, user.python)
    try:
        yield account
    finally:
        remove_user(account)


def _daemon_log(user: User) -> str:
    try:
        return (user.runtime_dir / "husk" / "daemon.log").read_text(errors="replace")
    except OSError:
        return ""


def test_quick_start_from_the_system_bundle_on_the_template_path(user: User) -> None:
    # The README's quick start, verbatim: the image and the bundle are the system's.
    done = user.husk("run", "--rm", "husk.local/busybox", "echo", "hello")
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
    # A second container on the network: the volume, the first one by name, and the
    # host's published port through the gateway, at 10.0.2.2 and at the network's gateway
    # address (the daemon made those listeners in the VM's namespaces through its user
    # namespace).
    (mine,) = json.loads(user.ok("network", "inspect", "mine"))
    gateway = mine["IPAM"]["Config"][0]["Gateway"]
    get = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10"
    reply = user.ok(
        "run", "--rm", "--network", "mine", "-v", "data:/data", BUSYBOX, "sh", "-c",
        f"cat /data/f; {get} web 80 | tail -n 1; {get} 10.0.2.2 {port} | tail -n 1; "
        f"{get} {gateway} {port} | tail -n 1",
    )  # fmt: skip
    assert reply == "kept\nserved\nserved\nserved\n"
    user.ok("rm", "-f", "web")
    user.ok("network", "rm", "mine")
    user.ok("volume", "rm", "data")


def test_images_pull_save_and_load(user: User, registry_busybox: str) -> None:
    """Images as the user: a pull from a registry on 127.0.0.1, save, rmi and load."""
    user.ok("pull", registry_busybox)
    archive = user.home / "busybox.tar"
    user.ok("save", "-o", str(archive), registry_busybox)
    user.ok("rmi", registry_busybox)
    assert "husk/busybox" not in user.ok("images")
    assert "husk/busybox" in user.ok("load", "-i", str(archive))
    assert user.ok("run", "--rm", registry_busybox, "echo", "pulled") == "pulled\n"
    user.ok("rmi", registry_busybox)


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


def test_the_warm_pool_fills_and_serves_as_the_user(user: User) -> None:
    """A restarted daemon with a warm pool: its first fill runs while the daemon binds
    its socket (once a race that left the pool's directory without its search bit)."""
    _stop_daemon(user)
    config = user.home / ".local" / "share" / "husk" / "config.json"
    pool = json.dumps({"warm_pool": {"size": 1}})
    done = user.run("sh", "-c", f"mkdir -p {config.parent} && echo '{pool}' > {config}")
    assert done.returncode == 0, done.stderr
    try:
        user.ok("ps")  # starts the daemon, which starts filling the pool
        deadline = time.monotonic() + 120
        while True:
            done = user.husk("run", "--rm", "--name", "pooled", BUSYBOX, "true")
            assert done.returncode == 0, done.stderr
            log = _daemon_log(user)
            if re.search(r"container pooled \(\w+\): VM from pool", log):
                break
            assert time.monotonic() < deadline, log[-3000:]
            time.sleep(2)
        assert "could not restore a VM" not in log, log[-3000:]
    finally:
        config.unlink(missing_ok=True)
        _stop_daemon(user)
        user.husk("ps")  # a daemon without a pool again, for the tests after this one


def _stop_daemon(user: User) -> None:
    """SIGTERM to the user's daemon (from its pid file), then wait for it to go."""
    pid_file = user.runtime_dir / "husk" / "husk.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


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
