"""``husk cp CONTAINER:SRC DEST`` end to end: a real container's tree lands below DEST only.

Links, setuid bits, owners, FIFOs and device nodes come from a real guest
through the real daemon; the crafted-stream attacks are in test_extract.py.
The copies also run under Debian's Python 3.11.2 (/usr/bin/python3), whose
tarfile has no extraction filters, when its interpreter can import the CLI.
"""

from __future__ import annotations

import os
import re
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


# -- the transfer ring (cp into a running container through a read-only disk) ------------------


def _ring_bytes_read(husk: Husk, container: str) -> int:
    """Bytes the guest has read from its transfer ring (the disk whose serial is
    husk-transfer), from its block statistics: what proves which way a copy went."""
    script = "for d in /sys/block/vd*; do echo $(cat $d/serial) $(cat $d/stat); done"
    for line in husk.ok("exec", container, "sh", "-c", script).splitlines():
        fields = line.split()
        if fields and fields[0] == "husk-transfer":
            return int(fields[3]) * 512  # sectors read
    raise AssertionError(f"{container} has no transfer ring disk")


FIND_RING = (
    "for d in /sys/block/vd*; do [ $(cat $d/serial) = husk-transfer ] && cat $d/dev $d/ro; done"
)


def _ring_file(daemon: RunningDaemon, husk: Husk, container: str) -> Path:
    full = husk.ok("inspect", "--format", "{{.Id}}", container).strip()
    return daemon.run_dir / "vms" / full[:16] / "transfer.ring"


def _upload_tree(root: Path, seed: int) -> Path:
    """A big file with an odd tail (slots, an aligned rest, a last partial block), many
    small files with their own modes and owners, a link and an empty directory."""
    tree = root / f"tree{seed}"
    (tree / "sub" / "empty").mkdir(parents=True)
    (tree / "big").write_bytes(os.urandom(9 * 1024 * 1024 + 4096 * seed + 777))
    for index in range(60):
        small = tree / ("sub" if index % 2 else ".") / f"s{index}"
        small.write_bytes(os.urandom(index * 101 + seed))
        small.chmod((0o640, 0o755, 0o600)[index % 3])
        if os.geteuid() == 0:
            os.chown(small, 1000 + index, 2000 + seed)
    (tree / "link").symlink_to("sub/s1")
    return tree


def test_cp_in_goes_through_the_transfer_ring_whole_beside_a_concurrent_copy(
    husk_daemon: RunningDaemon,  # noqa: F811
    source: str,
    tmp_path: Path,
) -> None:
    """Two ``cp -a`` into one container at once (one takes the ring, a copy arriving
    while it is busy takes the port): both trees arrive byte for byte with their modes,
    links and owners, and the guest read at least one of them from the ring."""
    husk = Husk(husk_daemon)
    trees = [_upload_tree(tmp_path, seed) for seed in (1, 2)]
    husk.ok("exec", source, "mkdir", "-p", "/ring")
    before = _ring_bytes_read(husk, source)
    copies = [
        subprocess.Popen(
            [sys.executable, "-m", "husk.cli.main", "cp", "-a", str(tree), f"{source}:/ring/"],
            env=husk_daemon.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        for tree in trees
    ]
    for copy in copies:
        _, err = copy.communicate(timeout=CLI_TIMEOUT)
        assert copy.returncode == 0, err.decode(errors="replace")
    read = _ring_bytes_read(husk, source) - before
    assert read >= 9 * 1024 * 1024, f"the ring was read for {read} bytes only"
    for tree in trees:
        back = tmp_path / f"back-{tree.name}"
        husk.ok("cp", f"{source}:/ring/{tree.name}", str(back))
        assert _tree(back) == _tree(tree)
    if os.geteuid() == 0:
        owners = husk.ok("exec", source, "stat", "-c", "%n %u:%g", "/ring/tree2/sub/s1")
        assert owners.split() == ["/ring/tree2/sub/s1", "1001:2002"]
    assert _ring_file(husk_daemon, husk, source).stat().st_blocks == 0  # emptied after
    husk.ok("exec", source, "rm", "-rf", "/ring")


def test_a_cold_booted_vm_has_the_ring_its_workload_cannot_write_and_the_port_stands_in(
    husk_daemon: RunningDaemon,  # noqa: F811
    source: str,
    tmp_path: Path,
) -> None:
    """A VM booted cold (no template) reads copies from its ring as a template clone does;
    root in the container can neither open the ring's device nor change the host file;
    and with the host's ring file gone a copy still arrives, through the port."""
    husk = Husk(husk_daemon)
    name = "cpcold"
    husk.ok(
        "run", "-d", "--name", name, "--label", "org.husk.no-template=true",
        BUSYBOX_NAME, "sleep", "3600",
    )  # fmt: skip
    try:
        log = husk_daemon.log()
        assert re.search(rf"container {name} \(\w+\): VM from cold", log), log[-2000:]
        assert re.search(r"container cpsrc \(\w+\): VM from (template|pool)", log), log[-2000:]
        tree = _upload_tree(tmp_path, 3)
        before = _ring_bytes_read(husk, name)
        husk.ok("cp", str(tree), f"{name}:/")
        assert _ring_bytes_read(husk, name) - before >= 9 * 1024 * 1024
        husk.ok("cp", f"{name}:/{tree.name}", str(tmp_path / "back"))
        assert _tree(tmp_path / "back") == _tree(tree)

        # The attack: the guest's root in the container makes a node for the ring's
        # device and writes to it (and asks the kernel to make it writable first).
        number = husk.ok("exec", name, "sh", "-c", FIND_RING)
        major_minor, read_only = number.split()
        assert read_only == "1"
        major, minor = major_minor.split(":")
        attack = (
            f"mknod /tmp/ring b {major} {minor}; blockdev --setrw /tmp/ring; "
            "dd if=/dev/urandom of=/tmp/ring bs=4096 count=4 oflag=direct conv=fsync"
        )
        assert husk("exec", name, "sh", "-c", attack).returncode != 0
        ring = _ring_file(husk_daemon, husk, name)
        assert ring.stat().st_blocks == 0 and ring.stat().st_size > 0

        # Without the host's file the ring is unusable: the port carries the copy.
        ring.unlink()
        before = _ring_bytes_read(husk, name)
        husk.ok("cp", str(tree), f"{name}:/again")
        assert _ring_bytes_read(husk, name) == before
        husk.ok("cp", f"{name}:/again", str(tmp_path / "again"))
        assert _tree(tmp_path / "again") == _tree(tree)
    finally:
        husk("rm", "-f", name)
