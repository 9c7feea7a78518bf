"""husk-runtime's RAM holder without VMs: boot templates' RAM kept sealed between keepers.

The holder is the real process (started as a keeper starts it, or by hand as another
user); the keepers' side is husk.ociruntime.ramholder.Holder and the hook in
husk.sandbox.templates.sealed_memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from husk.ociruntime import control, ramholder
from husk.ociruntime.errors import RuntimeFailure
from husk.sandbox import templates

SRC = Path(__file__).resolve().parent.parent / "src"
IDENTITY = (1, 2, 4096, 3, 4)
DIGEST = "ab" * 32
NOBODY = 65534


def sealed(data: bytes) -> int:
    fd = templates.new_memory_fd("test")
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ramholder.SEALS)
    return fd


def wait_for(path: Path, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def holder_pids(run_dir: Path) -> list[int]:
    marker = str(run_dir / ramholder.SOCKET_NAME).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def end(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            continue


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short: a unix socket's path has at most 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="hrh-", dir="/tmp"))
    try:
        yield directory
    finally:
        end(holder_pids(directory))
        subprocess.run(["rm", "-rf", str(directory)], check=False)


@pytest.fixture
def holder(run_dir: Path) -> ramholder.Holder:
    """A holder started as a keeper starts it."""
    ramholder.ensure_running(run_dir)
    wait_for(run_dir / ramholder.SOCKET_NAME)
    return ramholder.Holder(run_dir)


def test_what_one_keeper_loaded_the_next_gets_sealed(holder: ramholder.Holder) -> None:
    data = os.urandom(4096)
    memfd = sealed(data)
    assert holder.get(IDENTITY, DIGEST, 4096) is None
    holder.put(IDENTITY, DIGEST, memfd)
    os.close(memfd)  # the holder has its own by now
    deadline = time.monotonic() + 10
    got = None
    while got is None and time.monotonic() < deadline:
        got = holder.get(IDENTITY, DIGEST, 4096)
    assert got is not None
    try:
        assert os.pread(got, 4096, 0) == data
        assert fcntl.fcntl(got, fcntl.F_GET_SEALS) & ramholder.SEALS == ramholder.SEALS
        with pytest.raises(PermissionError):
            os.pwrite(got, b"x", 0)
    finally:
        os.close(got)
    # Only for the same file identity and the digest it was checked against, at its size.
    assert holder.get(IDENTITY, "cd" * 32, 4096) is None
    assert holder.get((1, 2, 4096, 3, 5), DIGEST, 4096) is None
    assert holder.get(IDENTITY, DIGEST, 8192) is None


def test_the_holder_keeps_only_sealed_memfds(holder: ramholder.Holder, run_dir: Path) -> None:
    unsealed = templates.new_memory_fd("test")
    os.ftruncate(unsealed, 4096)
    regular = run_dir / "regular"
    regular.write_bytes(bytes(4096))
    with open(regular, "rb") as file:
        holder.put(IDENTITY, DIGEST, unsealed)
        holder.put((1, 2, 4096, 3, 6), DIGEST, file.fileno())
    os.close(unsealed)
    holder.get(IDENTITY, DIGEST, 4096)  # served in order: the puts are done by now
    assert holder.get(IDENTITY, DIGEST, 4096) is None
    assert holder.get((1, 2, 4096, 3, 6), DIGEST, 4096) is None


def test_a_hostile_request_does_not_end_the_holder_or_what_it_holds(
    holder: ramholder.Holder, run_dir: Path
) -> None:
    """JSON nested 100,000 deep raised RecursionError out of the request parser, which
    the holder did not catch: one request ended it and every memfd it held. Nor may a
    flood of descriptors or a request of the wrong shape."""
    import socket

    memfd = sealed(b"k" * 4096)
    holder.put(IDENTITY, DIGEST, memfd)
    os.close(memfd)
    for request, fds in (
        (b"[" * 100_000 + b"\n", []),
        (b'{"op": "get", "identity": [[[[1]]]], "sha256": 5}\n', []),
        (b'{"op": "put", "identity": [1, 2, 4096, 3, 4], "sha256": "x"}\n', [0, 1, 2] * 30),
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(run_dir / ramholder.SOCKET_NAME))
            if fds:
                socket.send_fds(sock, [request], fds)
            else:
                sock.sendall(request)
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                sock.recv(100)
    got = holder.get(IDENTITY, DIGEST, 4096)
    assert got is not None, "the holder is gone"
    os.close(got)


def test_a_control_message_nested_too_deep_is_refused() -> None:
    import socket

    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"[" * 100_000 + b"\n")
        with pytest.raises(RuntimeFailure, match="malformed"):
            control.Connection(right).receive()


def test_keepers_and_the_holder_deal_only_with_their_own_user(run_dir: Path, as_root: None) -> None:
    """A holder of another user is not asked (its peer credentials), and a holder
    answers nobody but its own user, whatever the socket's permissions let through."""
    os.chown(run_dir, NOBODY, NOBODY)
    socket_path = run_dir / ramholder.SOCKET_NAME
    foreign = subprocess.Popen(
        [
            "/usr/bin/python3",  # pyenv's interpreter is under /root, closed to nobody
            "-c",
            f"from {ramholder.HOLDER_MODULE} import main; main()",
            str(socket_path),
            str(run_dir / ramholder.LOCK_NAME),
        ],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        user=NOBODY,
        group=NOBODY,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(socket_path)
        assert ramholder.Holder(run_dir).get(IDENTITY, DIGEST, 4096) is None
        # Root gets through the socket's mode; the holder still does not answer it.
        import socket

        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(5)
        raw.connect(str(socket_path))
        assert ramholder.peer_uid(raw) == NOBODY
        connection = control.Connection(raw)
        try:
            connection.send({"op": "get", "identity": list(IDENTITY), "sha256": DIGEST})
            answer = connection.receive()
        except (BrokenPipeError, ConnectionResetError):  # closed, the request unread
            answer = (None, [])
        assert answer == (None, [])
        connection.close()
        assert foreign.poll() is None  # and it keeps serving
    finally:
        foreign.kill()
        foreign.wait()


def test_the_holder_is_detached_from_the_keeper_that_starts_it(run_dir: Path) -> None:
    """Started by a keeper that still has the engine's pipes: the holder keeps none of
    them (containerd's shim reads create's output until every writer is gone), has its
    own session, and only /dev/null, its socket and its lock open."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from husk.ociruntime import ramholder\n"
        "ramholder.ensure_running(Path(sys.argv[1]))\n"
        "print('started', flush=True)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(run_dir)],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, _ = child.communicate(timeout=60)  # EOF: nothing else holds the pipes
    assert out == b"started\n"
    wait_for(run_dir / ramholder.SOCKET_NAME)
    (pid,) = holder_pids(run_dir)
    assert os.getsid(pid) not in (os.getsid(0), child.pid)  # a session of its own
    targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    others = {t for t in targets if not t.startswith("socket:")}
    assert others == {"/dev/null", str(run_dir / ramholder.LOCK_NAME)}
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    # A second start while it runs finds it and starts nothing.
    ramholder.ensure_running(run_dir)
    time.sleep(0.5)
    assert holder_pids(run_dir) == [pid]


def test_an_idle_holder_exits_and_a_second_one_gives_way(run_dir: Path) -> None:
    socket_path = run_dir / ramholder.SOCKET_NAME
    lock_path = run_dir / ramholder.LOCK_NAME
    script = (
        "import sys\n"
        "from husk.ociruntime import ramholderd\n"
        "ramholderd.run(sys.argv[1], sys.argv[2], idle_exit=float(sys.argv[3]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}

    def holder(idle: float) -> subprocess.Popen[Any]:
        argv = [sys.executable, "-c", script, str(socket_path), str(lock_path), str(idle)]
        return subprocess.Popen(argv, env=env)

    first = holder(3.0)
    try:
        wait_for(socket_path)
        second = holder(60.0)
        deadline = time.monotonic() + 60
        while second.poll() is None:  # the lock is taken: it leaves at once
            assert time.monotonic() < deadline, "a second holder stayed"
            # Requests keep the first one from leaving meanwhile (however slowly the
            # second starts on a loaded host).
            ramholder.Holder(run_dir).get(IDENTITY, DIGEST, 4096)
            time.sleep(0.2)
        assert second.returncode == 0
        assert first.poll() is None
        assert first.wait(timeout=30) == 0  # idle: gone, with its socket
        assert not socket_path.exists()
    finally:
        first.kill()
        first.wait()
    # A socket left by a holder that was killed is taken over by the next one.
    (socket_path).write_bytes(b"")
    ramholder.ensure_running(run_dir)
    deadline = time.monotonic() + 15
    while ramholder.Holder(run_dir).get(IDENTITY, DIGEST, 4096) is None:
        assert time.monotonic() < deadline
        if holder_pids(run_dir):
            break
        time.sleep(0.05)
    assert holder_pids(run_dir)


def test_turned_off_no_holder_is_started(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_NO_RAM_HOLDER", "1")
    ramholder.ensure_running(run_dir)
    time.sleep(0.5)
    assert not holder_pids(run_dir)


# -- the hook in husk.sandbox.templates ---------------------------------------------------


class FakeHolder:
    def __init__(self, held: int | None = None) -> None:
        self.held = held
        self.asked: list[tuple[Any, ...]] = []
        self.given: list[tuple[Any, ...]] = []

    def get(self, identity: Any, digest: str, size: int) -> int | None:
        self.asked.append((identity, digest, size))
        return self.held

    def put(self, identity: Any, digest: str, memfd: int) -> None:
        self.given.append((identity, digest, fcntl.fcntl(memfd, fcntl.F_GET_SEALS)))


def open_template(tmp_path: Path, data: bytes) -> templates.OpenTemplate:
    memory = tmp_path / "memory.ram"
    memory.write_bytes(data)
    fd = os.open(memory, os.O_RDONLY)
    size, digest = templates.memory_digest(fd)
    return templates.OpenTemplate(
        key="k" * 32,
        directory=tmp_path,
        metadata={"memory_sha256": digest, "memory_size": size},
        snapshot_fd=-1,
        memory_fd=fd,
        console=b"",
        identity=(0, 0),
    )


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's caches as a new process (a keeper) has them."""
    monkeypatch.setattr(templates, "_sealed", type(templates._sealed)())
    monkeypatch.setattr(templates, "_verified", {})


@pytest.mark.usefixtures("fresh_process")
def test_ram_a_process_loads_is_offered_to_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1 << 20) + bytes(1 << 20)
    template = open_template(tmp_path, data)
    fake = FakeHolder()
    monkeypatch.setattr(templates, "shared_memory", fake)
    memfd = templates.sealed_memory(template)
    try:
        assert os.pread(memfd, len(data), 0) == data
    finally:
        os.close(memfd)
        template.close()
    identity = templates._file_identity(os.open(tmp_path / "memory.ram", os.O_RDONLY))
    digest = template.metadata["memory_sha256"]
    assert fake.asked == [(identity, digest, len(data))]
    assert len(fake.given) == 1
    assert fake.given[0][:2] == (identity, digest)
    assert fake.given[0][2] & ramholder.SEALS == ramholder.SEALS


@pytest.mark.usefixtures("fresh_process")
def test_ram_the_holder_has_is_neither_read_nor_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1 << 20)
    template = open_template(tmp_path, data)
    held = sealed(data)
    monkeypatch.setattr(templates, "shared_memory", FakeHolder(held))

    def no_reading(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the template's RAM was read again")

    monkeypatch.setattr(templates, "memory_digest", no_reading)
    try:
        assert templates.sealed_memory(template) == held
        # The restore's check of both files (beside QEMU's load) skips the RAM too.
        monkeypatch.setattr(templates, "sha256_of_fd", lambda fd: (0, ""))
        template.metadata.update({"snapshot_sha256": "", "snapshot_size": 0})
        (tmp_path / "vm.state").write_bytes(b"")
        template.snapshot_fd = os.open(tmp_path / "vm.state", os.O_RDONLY)
        template.verify()
    finally:
        os.close(held)
        template.close()
