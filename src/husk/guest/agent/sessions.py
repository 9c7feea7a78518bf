"""Workload and exec processes: spawned inside the container root, stdio streamed."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import signal
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from husk.guest import protocol
from husk.guest.agent import reaper, users
from husk.guest.agent.isolation import Entry
from husk.guest.agent.loop import Loop, Timer
from husk.guest.protocol import MsgType

TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TTY_GID = 5
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_READ_SIZE = protocol.MAX_PAYLOAD
"""One read of a process's output becomes one frame, its bytes never copied by the agent:
under TCG every copy of a MiB is emulated code (issue 16, item 4)."""
F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1024 * 1024  # fewer, larger reads: every syscall is expensive under TCG
_STDIN_PIPE_SIZE = 4 * 1024 * 1024
"""A process's stdin pipe holds a whole transfer ring slot (root may pass pipe-max-size):
``husk cp`` into the container then wakes the agent and the archive child once per slot
(QEMU CPU per 100 MB copied: ~0.95 → ~0.8 s). Pages are taken only as the pipe fills."""
# After the process exits, how long a grandchild may keep its stdout open before
# EXITED is sent anyway (Docker reports the exit without waiting for daemons).
_PIPE_GRACE = 0.2
RETAINED_OUTPUT = 4 * 1024 * 1024  # per stream of a session, for replay after a reconnect


class SpawnError(Exception):
    """A process that could not be started: its error kind and exit code go to the host."""

    def __init__(self, message: str, exit_code: int, kind: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.kind = kind or _kind_of(exit_code)


def _kind_of(exit_code: int) -> str:
    if exit_code == protocol.EXIT_COMMAND_NOT_FOUND:
        return protocol.ERROR_COMMAND_NOT_FOUND
    return protocol.ERROR_SPAWN_FAILED


def build_env(spec_env: list[str], identity: users.Identity, tty: bool) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in spec_env:
        key, sep, value = item.partition("=")
        if key and sep:
            env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", identity.home or "/")
    if tty:
        env.setdefault("TERM", "xterm")
    return env


def _child(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    identity: users.Identity,
    entry: Entry,
    stdio: tuple[int, int, int],
    tty: bool,
    report_fd: int,
    child_main: Callable[[], None] | None,
    init: bool,
) -> None:  # pragma: no cover - runs in the forked child
    stage = "setup"

    def drop_privileges() -> None:
        nonlocal stage
        stage = "capabilities"
        entry.before_identity()
        stage = "user"
        os.setgroups(identity.groups)
        os.setgid(identity.gid)
        os.setuid(identity.uid)
        stage = "capabilities"
        entry.after_identity()

    def confine_init() -> None:
        # The init drops to the workload's identity and capabilities as well.
        drop_privileges()
        entry.confine_init()

    try:
        os.setsid()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        if tty:
            fcntl.ioctl(0, TIOCSCTTY, 0)
        for signum in (
            signal.SIGPIPE,
            signal.SIGXFSZ,
            signal.SIGCHLD,
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGHUP,
        ):
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        # Order matters: enter the container and the workdir while still root, limit
        # the capabilities (that needs CAP_SETPCAP), then drop ids.
        stage = "entering the container"
        entry.enter()
        stage = f"workdir {cwd}"
        try:
            os.chdir(cwd)
        except FileNotFoundError:
            # Made only when missing: os.makedirs of a directory that exists (``/``, most
            # often) is a failed mkdir and a stat, ~0.6 ms of an exec under TCG.
            os.makedirs(cwd, exist_ok=True)
            os.chdir(cwd)
        if init:
            stage = "init"
            reaper.become_init(confine_init)  # returns in the workload
        drop_privileges()
        stage = "exec"
        if child_main is not None:
            # No exec follows, so close-on-exec does nothing here: close every inherited
            # fd (the agent's ends of our pipes among them) so our stdin can reach EOF.
            # Closing the report pipe also tells the agent the start succeeded.
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            try:
                child_main()
            except BaseException as exc:
                os.write(2, f"{type(exc).__name__}: {exc}".encode(errors="replace"))
                os._exit(1)
            os._exit(0)
        exec_command(argv, env)
    except BaseException as exc:
        code, kind = protocol.EXIT_NOT_EXECUTABLE, protocol.ERROR_SPAWN_FAILED
        if isinstance(exc, FileNotFoundError) and stage == "exec":
            message = f'exec: "{argv[0]}": executable file not found in $PATH'
            code, kind = protocol.EXIT_COMMAND_NOT_FOUND, protocol.ERROR_COMMAND_NOT_FOUND
        elif isinstance(exc, PermissionError) and stage == "exec":
            message = f'exec: "{argv[0]}": permission denied'
            kind = protocol.ERROR_NOT_EXECUTABLE
        else:
            message = f"{stage}: {exc}"
            if isinstance(exc, OSError) and stage == "exec":
                kind = protocol.ERROR_NOT_EXECUTABLE  # e.g. an exec format error
        try:
            os.write(report_fd, f"{code}:{kind}:{message}".encode())
        finally:
            os._exit(code)


def exec_command(argv: list[str], env: dict[str, str]) -> None:
    """``os.execvpe(argv[0], argv, env)``, without a failed execve per PATH entry first.

    execvpe tries every PATH directory in turn; each miss is a whole execve that fails
    late, after the kernel has made a new address space and copied the arguments and
    environment into it (5 of them for busybox's ``true`` in /bin, under TCG about as
    costly as the exec that works). A stat answers the same question: directories where
    it finds nothing (ENOENT, ENOTDIR, which execve would answer there too) are skipped;
    everything else goes through execve, with execvpe's errors: the first error other
    than "not found", else the last one.
    """
    command = argv[0]
    if os.path.dirname(command):
        os.execve(command, argv, env)
    first_error: OSError | None = None
    last_error: OSError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command)
    for directory in os.get_exec_path(env):
        path = os.path.join(directory, command)
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            last_error = exc
            continue
        except OSError:
            pass  # execve reports what is wrong with it
        try:
            os.execve(path, argv, env)
        except (FileNotFoundError, NotADirectoryError) as exc:
            last_error = exc  # e.g. a script whose interpreter is missing
        except OSError as exc:
            last_error = exc
            first_error = first_error or exc
    raise first_error or last_error


def open_pty(root: str, uid: int) -> tuple[int, int]:
    """A pty pair from the container's own devpts, so ttyname() works inside it."""
    master = os.open(f"{root}/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        (number,) = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))
        slave = os.open(f"{root}/dev/pts/{number}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except BaseException:
        os.close(master)
        raise
    os.fchown(slave, uid, TTY_GID)
    return master, slave


def spawn(
    body: dict[str, Any],
    root: str,
    tty: bool,
    want_stdin: bool,
    entry: Entry,
    child_main: Callable[[], None] | None = None,
    *,
    init: bool = False,
) -> tuple[int, dict[str, int]]:
    """Forks the process into the container; returns its pid and the agent's ends of its stdio.

    ``entry`` owns the namespace descriptors it was given and closes them. ``init``
    puts a reaping init (:mod:`reaper`) between the process and PID 1.
    """
    try:
        return _spawn(body, root, tty, want_stdin, entry, child_main, init)
    finally:
        entry.close()


def _spawn(
    body: dict[str, Any],
    root: str,
    tty: bool,
    want_stdin: bool,
    entry: Entry,
    child_main: Callable[[], None] | None,
    init: bool,
) -> tuple[int, dict[str, int]]:
    argv = [str(a) for a in body["argv"]]
    try:
        identity = users.resolve(str(body.get("user") or ""), root, body.get("group_add"))
    except users.UserError as exc:
        raise SpawnError(str(exc), 126) from None
    env = build_env([str(e) for e in body.get("env") or []], identity, tty)
    cwd = str(body.get("cwd") or "/")
    if not cwd.startswith("/"):
        raise SpawnError(f"working directory must be absolute: {cwd!r}", 126)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    ours: dict[str, int] = {}
    theirs: list[int] = []
    if tty:
        master, slave = open_pty(root, identity.uid)
        ours["pty"] = master
        stdio = (slave, slave, slave)
        theirs.append(slave)
    else:
        if want_stdin:
            stdin_r, stdin_w = os.pipe()
            ours["stdin"] = stdin_w
        else:
            stdin_r = os.open("/dev/null", os.O_RDONLY)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ours["stdout"], ours["stderr"] = out_r, err_r
        stdio = (stdin_r, out_w, err_w)
        theirs += [stdin_r, out_w, err_w]
    for fd in theirs:
        os.set_inheritable(fd, False)  # dup2 in the child makes 0-2 inheritable anyway
    try:
        pid = entry.fork()
    except BaseException:
        for fd in (report_r, report_w, *theirs, *ours.values()):
            os.close(fd)
        raise
    if pid == 0:  # pragma: no cover - child
        os.close(report_r)
        _child(argv, env, cwd, identity, entry, stdio, tty, report_w, child_main, init)
    os.close(report_w)
    for fd in theirs:
        os.close(fd)
    report = b""
    while True:
        chunk = os.read(report_r, 4096)
        if not chunk:
            break
        report += chunk
    os.close(report_r)
    if report:
        for fd in ours.values():
            os.close(fd)
        os.waitpid(pid, 0)
        code, _, rest = report.decode(errors="replace").partition(":")
        kind, _, message = rest.partition(":")
        raise SpawnError(message, int(code), kind)
    for name, fd in ours.items():
        os.set_blocking(fd, False)
        if name in ("stdout", "stderr"):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, _PIPE_SIZE)
        elif name == "stdin":
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, _STDIN_PIPE_SIZE)
    return pid, ours


class ProcessSession:
    """One process (workload or exec) bound to one channel."""

    def __init__(
        self,
        loop: Loop,
        send: Callable[[bytes], None],
        kind: str,
        channel: int,
        pid: int,
        fds: dict[str, int],
        on_finished: Callable[[ProcessSession], None],
    ) -> None:
        self.loop = loop
        self._send = send
        self.kind = kind
        self.channel = channel
        self.pid = pid
        self.fds = dict(fds)
        self.exit_code: int | None = None
        self.finished = False
        self.acknowledged = False
        self.paused = False
        self._on_finished = on_finished
        self._stdin_queue: deque[bytearray | DiskRange] = deque()
        self._stdin_eof = False
        self.emitted = {"stdout": 0, "stderr": 0}
        self._history = {"stdout": _History(), "stderr": _History()}
        self._grace: Timer | None = None
        for stream in ("stdout", "stderr", "pty"):
            if stream in self.fds:
                self._watch(stream)

    def describe(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "kind": self.kind,
            "pid": self.pid,
            "emitted": dict(self.emitted),
            "exit_code": self.exit_code,
        }

    # -- output -----------------------------------------------------------
    def _watch(self, stream: str) -> None:
        fd = self.fds[stream]
        self.loop.add_reader(fd, lambda: self._read(stream))

    def _read(self, stream: str) -> None:
        fd = self.fds.get(stream)
        if fd is None:
            return
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO is how a pty master reports that the last slave fd closed.
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self._close_fd(stream)
            self._maybe_finish()
            return
        name = "stderr" if stream == "stderr" else "stdout"
        self._remember(name, data)
        self._emit(name, data)

    def _emit(self, name: str, data: bytes) -> None:
        """Sends ``data`` as frames of at most MAX_PAYLOAD bytes: each frame's header, then
        its payload as it is (the port writes both in order, nothing comes between)."""
        frame_type = MsgType.STDERR if name == "stderr" else MsgType.STDOUT
        for start in range(0, len(data), protocol.MAX_PAYLOAD):
            payload = (
                data
                if len(data) <= protocol.MAX_PAYLOAD
                else data[start : start + protocol.MAX_PAYLOAD]
            )
            self._send(protocol.HEADER.pack(len(payload), int(frame_type), self.channel))
            self._send(payload)

    def _remember(self, name: str, data: bytes) -> None:
        """Keeps the recent output, so a host that lost some (daemon restart) can get it again."""
        self.emitted[name] += len(data)
        self._history[name].add(data)

    def replay(self, offsets: dict[str, Any]) -> None:
        """Sends the output after the host's ``offsets`` again (and EXITED, if it came)."""
        for name in ("stdout", "stderr"):
            offset = offsets.get(name)
            if not isinstance(offset, int) or offset >= self.emitted[name]:
                continue
            self._emit(name, self._history[name].since(offset))
        if self.finished and self.exit_code is not None:
            self._send(protocol.encode_json(MsgType.EXITED, self.channel, {"code": self.exit_code}))

    def set_paused(self, paused: bool) -> None:
        """Stops reading output while the host link is congested (backpressure)."""
        if paused == self.paused:
            return
        self.paused = paused
        for stream in ("stdout", "stderr", "pty"):
            fd = self.fds.get(stream)
            if fd is None:
                continue
            if paused:
                self.loop.remove_reader(fd)
            else:
                self._watch(stream)

    def _close_fd(self, stream: str) -> None:
        fd = self.fds.pop(stream, None)
        if fd is not None:
            self.loop.forget(fd)
            os.close(fd)

    # -- input ------------------------------------------------------------
    # Stdin is a queue of pieces in the order the host sent them: bytes (STDIN frames)
    # and ranges of the transfer ring (STDIN_DISK), each range answered with STDIN_DONE
    # once it is in the pipe (or dropped with the pipe), so the host can reuse the space.
    def write_stdin(self, data: bytes) -> None:
        target = "pty" if "pty" in self.fds else "stdin"
        if target not in self.fds or self._stdin_eof:
            return
        if not self._stdin_queue:  # the usual case: straight into the pipe, no copy
            try:
                written = os.write(self.fds[target], data)
            except BlockingIOError:
                written = 0
            except OSError:  # the process closed its stdin: it will never read this
                return
            data = data[written:]
            if not data:
                return
        last = self._stdin_queue[-1] if self._stdin_queue else None
        if isinstance(last, bytearray):
            last += data
        else:
            self._stdin_queue.append(bytearray(data))
        self._flush_stdin()

    def stdin_from_disk(self, source: int, offset: int, length: int) -> None:
        """Queues ``length`` bytes of the transfer ring (``source``, O_DIRECT) at ``offset``."""
        piece = DiskRange(source, offset, length)
        if "stdin" not in self.fds or self._stdin_eof:
            self._done(piece)  # nobody will read it: the host may reuse the space now
            return
        self._stdin_queue.append(piece)
        self._flush_stdin()

    def _done(self, piece: DiskRange) -> None:
        body = {"offset": piece.offset, "length": piece.length}
        self._send(protocol.encode_json(MsgType.STDIN_DONE, self.channel, body))

    def _drop_stdin(self) -> None:
        """The process will never read what is queued: drop it, freeing every range."""
        queue, self._stdin_queue = self._stdin_queue, deque()
        for piece in queue:
            if isinstance(piece, DiskRange):
                self._done(piece)

    def close_stdin(self) -> None:
        self._stdin_eof = True
        if "pty" in self.fds:
            self.write_stdin_eot()
        self._flush_stdin()

    def write_stdin_eot(self) -> None:
        last = self._stdin_queue[-1] if self._stdin_queue else None
        if isinstance(last, bytearray):
            last += b"\x04"  # EOT: the terminal's end of input
        else:
            self._stdin_queue.append(bytearray(b"\x04"))

    def _flush_stdin(self) -> None:
        target = "pty" if "pty" in self.fds else "stdin"
        fd = self.fds.get(target)
        if fd is None:
            self._drop_stdin()
            return
        while self._stdin_queue:
            piece = self._stdin_queue[0]
            try:
                if isinstance(piece, bytearray):
                    del piece[: os.write(fd, piece)]
                    finished = not piece
                else:
                    finished = piece.pour(fd)
            except BlockingIOError:
                break
            except OSError:  # the process closed its stdin: drop what it will never read
                self._drop_stdin()
                break
            if not finished:
                continue
            self._stdin_queue.popleft()
            if isinstance(piece, DiskRange):
                self._done(piece)
        if target == "pty":
            if self._stdin_queue:
                self.loop.add_writer(fd, self._flush_stdin)
            else:
                self.loop.remove_writer(fd)
            return
        if self._stdin_queue:
            self.loop.add_writer(fd, self._flush_stdin)
        else:
            self.loop.remove_writer(fd)
            if self._stdin_eof:
                self._close_fd("stdin")

    # -- control ----------------------------------------------------------
    def signal(self, signum: int) -> None:
        """The workload's main process only, as Docker's kill; an exec's whole process group.

        The workload is PID 1 of its namespace: like any init, it gets a signal only
        if it handles it (SIGKILL always), so an unhandled SIGTERM is ignored and
        ``stop`` ends with SIGKILL after its timeout, as under Docker.
        """
        if self.kind != "run":
            try:
                os.killpg(self.pid, signum)
                return
            except ProcessLookupError:
                pass  # not a group leader (yet): the process alone
        if self.exit_code is not None:
            return  # reaped: its pid may be another process's by now
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def resize(self, rows: int, cols: int) -> None:
        fd = self.fds.get("pty")
        if fd is not None:
            fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    # -- ending -----------------------------------------------------------
    def exited(self, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        self.exit_code = 128 - code if code < 0 else code
        if "stdin" in self.fds:
            self._close_fd("stdin")
        self._drop_stdin()
        self._grace = self.loop.call_later(_PIPE_GRACE, self._give_up_on_pipes)
        self._maybe_finish()

    def _give_up_on_pipes(self) -> None:
        for stream in ("stdout", "stderr", "pty"):
            if stream in self.fds:
                self._read(stream)  # whatever is already buffered still goes out
                self._close_fd(stream)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.finished or self.exit_code is None:
            return
        if any(s in self.fds for s in ("stdout", "stderr", "pty")):
            return
        self.finished = True
        if self._grace is not None:
            self._grace.cancel()
        for stream in list(self.fds):
            self._close_fd(stream)
        self._send(protocol.encode_json(MsgType.EXITED, self.channel, {"code": self.exit_code}))
        self._on_finished(self)


_SPLICE_REFUSED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV})
_BOUNCE = 1024 * 1024
"""The bounce buffer's size when the kernel cannot splice the ring (read, then write)."""


class DiskRange:
    """``length`` bytes of the transfer ring at ``offset``, on their way into a pipe.

    Moved by splice(2) from the O_DIRECT device: the disk's data lands in the pipe's
    pages, the agent never touches it and the guest's page cache never holds the ring
    (a later use of the same place must not read an old copy). A kernel that refuses
    that splice gets a read into an aligned buffer and a write instead.
    """

    __slots__ = ("_bounce", "_pending", "done", "length", "offset", "source")

    def __init__(self, source: int, offset: int, length: int) -> None:
        self.source = source
        self.offset = offset
        self.length = length
        self.done = 0
        self._bounce: mmap.mmap | None = None
        self._pending: memoryview | None = None

    def pour(self, pipe: int) -> bool:
        """Moves what the pipe takes now (BlockingIOError: nothing); True once all moved."""
        if self._bounce is None and self._pending is None:
            try:
                while self.done < self.length:
                    moved = os.splice(
                        self.source,
                        pipe,
                        self.length - self.done,
                        offset_src=self.offset + self.done,
                        flags=os.SPLICE_F_NONBLOCK,
                    )
                    if not moved:
                        raise OSError(errno.EIO, "the transfer disk ended early")
                    self.done += moved
                return True
            except OSError as exc:
                if exc.errno not in _SPLICE_REFUSED:
                    raise
                self._bounce = mmap.mmap(-1, _BOUNCE)  # page-aligned, as O_DIRECT needs
        return self._copy(pipe)

    def _copy(self, pipe: int) -> bool:
        while True:
            if self._pending is None:
                if self.done >= self.length:
                    return True
                assert self._bounce is not None
                size = min(_BOUNCE, self.length - self.done)
                with memoryview(self._bounce) as whole:
                    got = os.preadv(self.source, [whole[:size]], self.offset + self.done)
                if got <= 0:
                    raise OSError(errno.EIO, "the transfer disk ended early")
                got = min(got, size)
                self._pending = memoryview(self._bounce)[:got]
                self.done += got
            written = os.write(pipe, self._pending)
            self._pending = self._pending[written:] if written < len(self._pending) else None


class _History:
    """The last RETAINED_OUTPUT bytes (or up to one read more) of a stream, kept as the
    chunks that were read: remembering output costs no copy."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self.start = 0
        """Stream offset of the first byte kept."""

    def add(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= RETAINED_OUTPUT:
            dropped = self._chunks.popleft()
            self._size -= len(dropped)
            self.start += len(dropped)

    def since(self, offset: int) -> bytes:
        """The bytes kept from stream offset ``offset`` on (from the oldest kept, if earlier)."""
        return b"".join(self._chunks)[max(0, offset - self.start) :]
