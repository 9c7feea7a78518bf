"""``husk cp CONTAINER:SRC DEST`` end to end: a real container's tree lands below DEST only.

Links, setuid bits, owners, FIFOs and device nodes come from a real guest
through the real daemon; the crafted-stream attacks are in test_extract.py.
The copies also run under Debian's Python 3.11.2 (/usr/bin/python3), whose
tarfile has no extraction filters, when its interpreter can import the CLI.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_fixtures import RunningDaemon, husk_daemon  # noqa: F401 - fixture
from testimages import BUSYBOX_NAME, install_busybox_image

pytestmark = pytest.mark.vm

SYSTEM_PYTHON = "/usr/bin/python3"
CLI_TIMEOUT = 240.0
SETUP = (
    "mkdir -p /d/sub /d2 && echo hi > /d/f && ln /d/f /d/hard && ln -s /etc/passwd /d/link"
    " && echo s > /d/su && chmod 4755 /d/su && chown 1234:5678 /d/f && echo x > /d/sub/x"
    " && mkfifo /d2/pipe && touch /ready"
)


def interpreters() -> list[str]:
    """This interpreter, and Debian's 3.11.2 when it differs and can import the CLI."""
    found = [sys.executable]
    if not os.path.exists(SYSTEM_PYTHON):
        return found
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys, click, husk.cli.main; print(sys.version_info[:3])"],
        env=system_python_env(dict(os.environ)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode == 0 and probe.stdout.strip() != str(tuple(sys.version_info[:3])):
        found.append(SYSTEM_PYTHON)
    return found


def system_python_env(env: dict[str, str]) -> dict[str, str]:
    """Debian's python3 with husk's source and this (same 3.11 ABI) interpreter's packages."""
    source = str(Path(__file__).resolve().parent.parent / "src")
    packages = sysconfig.get_paths()["purelib"]
    return {**env, "PYTHONPATH": os.pathsep.join([source, packages])}


class Husk:
    def __init__(self, daemon: RunningDaemon, python: str = sys.executable) -> None:
        self.daemon = daemon
        self.python = python

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(self.daemon.env)
        if self.python != sys.executable:
            env = system_python_env(env)
        return subprocess.run(
            [self.python, "-m", "husk.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.returncode == 0, (
            f"{self.python} husk {' '.join(args)}: {result.returncode}\n"
            f"{result.stdout}\n{result.stderr}\ndaemon log: {self.daemon.log()[-2000:]}"
        )
        return result.stdout

    def refused(self, *args: str, message: str) -> None:
        result = self(*args)
        assert result.returncode == 125, (result.returncode, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("husk: "), result.stderr
        assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def source(husk_daemon: RunningDaemon) -> Iterator[str]:  # noqa: F811
    """A running container holding a tree with links, a setuid file, owners and a FIFO."""
    from husk.oci.store import ImageStore

    install_busybox_image(ImageStore(husk_daemon.data_dir / "images"))
    husk = Husk(husk_daemon)
    husk.ok("run", "-d", "--name", "cpsrc", BUSYBOX_NAME, "sh", "-c", f"{SETUP}; sleep 3600")
    deadline = time.monotonic() + 120
    while husk("exec", "cpsrc", "test", "-e", "/ready").returncode != 0:
        assert time.monotonic() < deadline, "the container never finished its setup"
        time.sleep(0.5)
    try:
        yield "cpsrc"
    finally:
        husk("rm", "-f", "cpsrc")


@pytest.mark.parametrize("python", interpreters())
def test_cp_out_keeps_links_and_drops_setuid_and_owners(
    husk_daemon: RunningDaemon,  # noqa: F811
    source: str,
    tmp_path: Path,
    python: str,
) -> None:
    husk = Husk(husk_daemon, python)
    out = tmp_path / "out"
    husk.ok("cp", f"{source}:/d", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["f", "hard", "link", "su", "sub"]
    assert (out / "f").read_text() == "hi\n"
    assert (out / "hard").stat().st_ino == (out / "f").stat().st_ino
    assert os.readlink(out / "link") == "/etc/passwd"  # verbatim, not followed
    assert (out / "sub" / "x").read_text() == "x\n"
    su = (out / "su").stat()
    assert stat.S_IMODE(su.st_mode) == 0o755  # setuid dropped without -a
    assert (out / "f").stat().st_uid == os.getuid()  # the copier's, not the guest's 1234
    # Into an existing directory, under the source's name; SRC/. copies the contents.
    husk.ok("cp", f"{source}:/d/sub", str(out))
    assert (out / "sub" / "x").read_text() == "x\n"
    husk.ok("cp", f"{source}:/d/.", str(tmp_path / "contents"))
    assert (tmp_path / "contents" / "f").read_text() == "hi\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="keeping owners needs root")
def test_cp_out_with_archive_mode_keeps_owners_and_setuid(
    husk_daemon: RunningDaemon,  # noqa: F811
    source: str,
    tmp_path: Path,
) -> None:
    husk = Husk(husk_daemon)
    husk.ok("cp", "-a", f"{source}:/d", str(tmp_path / "out"))
    owner = (tmp_path / "out" / "f").stat()
    assert (owner.st_uid, owner.st_gid) == (1234, 5678)
    assert stat.S_IMODE((tmp_path / "out" / "su").stat().st_mode) == 0o4755


@pytest.mark.parametrize("python", interpreters())
def test_cp_out_refuses_fifos_and_device_nodes(
    husk_daemon: RunningDaemon,  # noqa: F811
    source: str,
    tmp_path: Path,
    python: str,
) -> None:
    husk = Husk(husk_daemon, python)
    husk.refused(
        "cp",
        f"{source}:/d2",
        str(tmp_path / "fifo"),
        message=f"archive of {source}:/d2: entry 'd2/pipe' is a FIFO; refusing it",
    )
    husk.refused("cp", f"{source}:/dev/null", str(tmp_path / "null"), message="is a device node")
    assert list(tmp_path.iterdir()) == []


def _tree(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Every entry below ``root``: kind, permission bits, and bytes or link target."""
    found: dict[str, tuple[str, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            found[name] = ("link", 0, os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            found[name] = ("dir", stat.S_IMODE(info.st_mode), b"")
        else:
            found[name] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return found


def test_cp_round_trip_and_big_output_keep_every_byte_in_order(
    husk_daemon: RunningDaemon,  # noqa: F811
    source: str,
    tmp_path: Path,
) -> None:
    """Many files and a large one go into the container and back unchanged (bytes, modes,
    symlinks), and the large one comes out of an exec's stdout whole and in order and
    goes back in through its stdin: each crosses several 1 MiB frames, the guest's
    4 MiB replay history and batched port reads and writes."""
    import hashlib

    husk = Husk(husk_daemon)
    tree = tmp_path / "tree"
    (tree / "deep" / "er").mkdir(parents=True)
    for index in range(300):
        small = tree / ("deep" if index % 3 else ".") / f"f{index}"
        small.write_bytes(os.urandom(index * 37))
        small.chmod(0o600 if index % 2 else 0o755)
    big = os.urandom(9 * 1024 * 1024 + 4321)
    (tree / "deep" / "er" / "big").write_bytes(big)
    (tree / "link").symlink_to("deep/er/big")
    (tree / "dangling").symlink_to("/nowhere")
    husk.ok("exec", source, "mkdir", "-p", "/rt")
    husk.ok("cp", str(tree), f"{source}:/rt/")
    digest = husk.ok("exec", source, "sha256sum", "/rt/tree/deep/er/big").split()[0]
    assert digest == hashlib.sha256(big).hexdigest()
    back = tmp_path / "back"
    husk.ok("cp", f"{source}:/rt/tree", str(back))
    assert _tree(back) == _tree(tree)

    shown = subprocess.run(
        [sys.executable, "-m", "husk.cli.main", "exec", source, "cat", "/rt/tree/deep/er/big"],
        env=husk_daemon.env,
        capture_output=True,
        timeout=CLI_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout) == len(big) and shown.stdout == big
    fed = subprocess.run(
        [sys.executable, "-m", "husk.cli.main", "exec", "-i", source, "sha256sum"],
        env=husk_daemon.env,
        input=big,
        capture_output=True,
        timeout=CLI_TIMEOUT,
    )
    assert fed.returncode == 0, fed.stderr
    assert fed.stdout.split()[0].decode() == hashlib.sha256(big).hexdigest()
    husk.ok("exec", source, "rm", "-rf", "/rt")
