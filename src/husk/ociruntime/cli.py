"""``husk-runtime``: the OCI runtime command line, as runc's, for podman, containerd, docker.

Every command but ``create`` is a short-lived client of the container's keeper (its
control socket) or of ``state.json``, and an engine runs several per container: this
module and what it imports at the top are small standard library modules only, and the
commands engines call most (``state``, ``start``, ``kill``, ``delete``) are parsed by
hand (:func:`fast_arguments`) without ``argparse``; everything else is imported by the
command that needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NoReturn, cast

from husk.ociruntime import control, log, signals, state
from husk.ociruntime.errors import RuntimeFailure
from husk.ociruntime.signals import parse as parse_signal

VERSION = "0.1.0"
SHUTDOWN_WAIT = 10.0


class ArgumentError(RuntimeFailure):
    pass


if TYPE_CHECKING:
    import argparse


def _now() -> str:
    import datetime  # create only

    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _write_pid_file(path: str | None, pid: int) -> None:
    if not path:
        return
    import tempfile  # create and exec only

    target = Path(path)
    # A fresh, unpredictable name (O_EXCL): in a shared directory another user may have
    # planted a symlink at any name we could guess, and we run as root.
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(str(pid))
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)


# -- commands -------------------------------------------------------------------------


def _refuse_preserved_fds(count: int) -> None:
    """runc's --preserve-fds N passes descriptors 3..N+2 to the container process; a
    process in a VM cannot be given a host descriptor."""
    if count:
        raise RuntimeFailure(
            f"--preserve-fds {count} is not supported by husk-runtime: the container's "
            "process runs in a VM and cannot receive the host's file descriptors"
        )


def cmd_create(args: argparse.Namespace) -> int:
    from husk.ociruntime import bundle as bundles  # create only

    container_id = state.check_id(args.id)
    _refuse_preserved_fds(args.preserve_fds)
    spec = bundles.load(Path(args.bundle or "."))
    from husk.ociruntime.lookup import check_program  # create only

    process = spec.process
    check_program(spec.rootfs, process.args[0], process.env, process.cwd)
    if spec.process.terminal and not args.console_socket:
        raise RuntimeFailure("process.terminal is set but no --console-socket was given")
    root: Path = args.root
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory = state.container_dir(root, container_id)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        raise RuntimeFailure(f"container with id exists: {container_id}") from None
    record = state.StateRecord(
        id=container_id,
        bundle=str(spec.path),
        rootfs=str(spec.rootfs),
        created=_now(),
        annotations=spec.annotations,
    )
    try:
        state.save(directory, record)
        pid = _fork_keeper(args, container_id, spec)
        _write_pid_file(args.pid_file, pid)
    except BaseException:
        _remove_leftovers(root, container_id)
        raise
    return 0


def _fork_keeper(args: argparse.Namespace, container_id: str, spec: Any) -> int:
    """Forks the keeper and waits for it to report *created* (its pid) or its error."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the keeper
        os.close(read_end)
        os.setsid()
        # create only; before the keeper's imports, namespaces and threads: a holder
        # started now holds none of them, and is up by the time the VM's RAM is wanted.
        from husk.ociruntime import ramholder

        ramholder.ensure_running(state.run_dir())
        from husk.ociruntime import keeper  # the keeper's imports: the VM's whole stack

        keeper.run(
            keeper.KeeperOptions(
                root=args.root,
                container_id=container_id,
                bundle=spec,
                console_socket=args.console_socket,
                log_path=args.log,
                log_format=args.log_format,
            ),
            write_end,
        )
        os._exit(255)
    os.close(write_end)
    report = b""
    while True:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        report += chunk
        if report.startswith(b"\0"):
            break
    os.close(read_end)
    if report.startswith(b"\0"):
        return pid
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    message = (
        report.decode("utf-8", "replace").strip()
        or "the keeper exited before the container was created"
    )
    raise RuntimeFailure(f"cannot create container {container_id}: {message}")


def _active(args: argparse.Namespace) -> state.StateRecord:
    return state.load(args.root, args.id)


def cmd_start(args: argparse.Namespace) -> int:
    record = _active(args)
    status = state.current_status(record)
    if status != "created":
        raise RuntimeFailure(
            f"cannot start a container that has {status}"
            if status == "stopped"
            else f"cannot start a container in the {status} state"
        )
    control.request(record.control, {"op": "start"})
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    record = _active(args)
    print(json.dumps(state.oci_state(record), indent=2))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    number = parse_signal(args.signal)
    record = _active(args)
    status = state.current_status(record)
    if status not in ("created", "running", "paused"):
        raise RuntimeFailure("container not running")
    control.request(record.control, {"op": "kill", "signal": number, "all": args.all})
    return 0


def _wait_gone(record: state.StateRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not state.keeper_alive(record):
            return True
        time.sleep(0.02)
    return not state.keeper_alive(record)


def cmd_delete(args: argparse.Namespace) -> int:
    try:
        record = _active(args)
    except RuntimeFailure:
        if args.force and not (args.root / args.id).exists():
            return 0
        if (args.root / args.id).is_dir() and not (args.root / args.id / state.STATE_FILE).exists():
            _remove_leftovers(args.root, args.id)  # a create that died half-way
            return 0
        raise
    status = state.current_status(record)
    if status in ("running", "paused") and not args.force:
        raise RuntimeFailure(f"cannot delete container {args.id} that is not stopped: {status}")
    if state.keeper_alive(record):
        with contextlib.suppress(RuntimeFailure):
            control.request(record.control, {"op": "shutdown"}, timeout=5.0)
        if not _wait_gone(record, SHUTDOWN_WAIT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
            _wait_gone(record, 2.0)
    _remove_leftovers(args.root, args.id, record)
    return 0


def _remove_leftovers(
    root: Path, container_id: str, record: state.StateRecord | None = None
) -> None:
    if record and record.vm_dir and record.control:
        # The keeper recorded its paths: no need for husk's settings (start-up time).
        vm_dir, sockets = Path(record.vm_dir), [Path(record.control)]
    else:  # a create that died before its keeper recorded them
        name = state.short_name(root, container_id)
        vm_dir = Path(record.vm_dir) if record and record.vm_dir else state.run_dir() / "vms" / name
        sockets = [state.run_dir() / "oci" / f"{name}.sock"]
        if record and record.control:
            sockets.append(Path(record.control))
    if vm_dir.exists():  # the keeper removes it: only after a keeper that died
        # only when a VM may be left over (start-up time of every delete otherwise)
        import shutil

        from husk.sandbox.sandbox import Sandbox

        with contextlib.suppress(Exception):
            Sandbox.kill_recorded(vm_dir)
        shutil.rmtree(vm_dir, ignore_errors=True)
    for path in sockets:
        with contextlib.suppress(OSError):
            path.unlink()
    _remove_tree(state.container_dir(root, container_id))


def _remove_tree(directory: Path) -> None:
    """Removes a container's state directory (files only, as a rule; shutil otherwise)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            import shutil  # not the usual case: its import costs every delete otherwise

            shutil.rmtree(directory, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(directory)


def cmd_list(args: argparse.Namespace) -> int:
    states = []
    for container_id in state.list_ids(args.root):
        with contextlib.suppress(RuntimeFailure):
            states.append(state.oci_state(state.load(args.root, container_id)))
    if args.format == "json":
        print(json.dumps(states))
        return 0
    print(f"{'ID':<20}{'PID':<10}{'STATUS':<10}{'BUNDLE':<40}{'CREATED':<32}OWNER")
    for item in states:
        print(
            f"{item['id']:<20}{item['pid']:<10}{item['status']:<10}"
            f"{item['bundle']:<40}{item['created']:<32}{item['owner']}"
        )
    return 0


def _descendants(pid: int) -> list[int]:
    """``pid``'s descendants (QEMU and its helpers for a keeper), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                text = fh.read()
        except OSError:
            continue
        parent = int(text[text.rfind(b")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    pending = sorted(children.get(pid, []))
    while pending:
        child = pending.pop(0)
        found.append(child)
        pending.extend(sorted(children.get(child, [])))
    return found


def cmd_ps(args: argparse.Namespace) -> int:
    """The container's host processes: its keeper (the container's pid) and what the
    keeper started (QEMU). The workload's own processes live in the VM: the engine's
    ``exec`` of ps(1) shows them."""
    record = _active(args)
    active = state.current_status(record) in ("created", "running", "paused")
    pids = [record.pid, *_descendants(record.pid)] if active else []
    if args.format == "json":
        print(json.dumps(pids))
        return 0
    print("PID     CMD")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                command = fh.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        print(f"{pid:<8}{command[:200]}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    record = _active(args)
    control.request(record.control, {"op": "pause"})
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    record = _active(args)
    control.request(record.control, {"op": "resume"})
    return 0


UPDATE_FLAGS = (
    "blkio-weight",
    "cpu-period",
    "cpu-quota",
    "cpu-share",
    "cpu-rt-period",
    "cpu-rt-runtime",
    "cpu-idle",
    "cpuset-cpus",
    "cpuset-mems",
    "kernel-memory",
    "kernel-memory-tcp",
    "memory",
    "memory-reservation",
    "memory-swap",
    "pids-limit",
    "l3-cache-schema",
    "mem-bw-schema",
)


def cmd_update(args: argparse.Namespace) -> int:
    """runc's update: LinuxResources JSON (--resources FILE|-) and/or flags, the flags
    over the file; applied to the container's cgroup in its VM (husk.ociruntime.resources)."""
    from husk.ociruntime import resources  # update only

    record = _active(args)
    status = state.current_status(record)
    if status not in ("created", "running"):
        raise RuntimeFailure(f"cannot update a container that is {status}")
    data: dict[str, Any] = {}
    try:
        if args.resources:
            stdin_text = sys.stdin.read() if args.resources == "-" else None
            data = resources.read(args.resources, stdin_text)
        flags = {name: getattr(args, name.replace("-", "_")) for name in UPDATE_FLAGS}
        data = resources.merge(data, resources.from_flags(flags))
    except RuntimeFailure as exc:
        raise RuntimeFailure(f"cannot update container resources: {exc}") from None
    control.request(record.control, {"op": "update", "resources": data})
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    record = _active(args)
    if not args.stats:
        raise RuntimeFailure("events without --stats is not supported by husk-runtime")
    figures: dict[str, Any] = {}
    if state.current_status(record) == "running":
        figures = control.request(record.control, {"op": "stats"}).get("stats") or {}
    data: dict[str, Any] = {
        "cpu": {
            "usage": {
                "total": int(figures.get("cpu_ns", 0)),
                "user": int(figures.get("cpu_user_ns", 0)),
                "kernel": int(figures.get("cpu_system_ns", 0)),
            }
        },
        "memory": {
            "usage": {
                "usage": int(figures.get("memory_used", 0)),
                "limit": int(figures.get("memory_total", 0)),
            },
            "cache": int(figures.get("memory_cache", 0)),
        },
    }
    print(json.dumps({"type": "stats", "id": record.id, "data": data}))
    return 0


def _exec_process(args: argparse.Namespace, record: state.StateRecord) -> dict[str, Any]:
    """The exec's process object: --process's file, or argv over the container's process."""
    from husk.ociruntime import bundle as bundles  # exec only

    if args.process:
        try:
            data = json.loads(Path(args.process).read_text())
        except (OSError, ValueError, RecursionError) as exc:  # also nested too deep
            raise RuntimeFailure(f"cannot read the process file {args.process}: {exc}") from None
        process = bundles.parse_process(data)
        return data if isinstance(data, dict) else {}
    if not args.command:
        raise RuntimeFailure("exec needs a command (arguments or --process)")
    base = bundles.read_config(Path(record.bundle)).get("process") or {}
    data = {
        "args": list(args.command),
        "env": list(base.get("env") or []) + list(args.env or []),
        "cwd": args.cwd or base.get("cwd") or "/",
        "user": base.get("user") or {},
        "terminal": bool(args.tty),
    }
    if args.user:
        uid, _, gid = args.user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise RuntimeFailure(f"exec --user must be UID[:GID], not {args.user!r}")
        data["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    process = bundles.parse_process(data)
    del process
    return data


def cmd_exec(args: argparse.Namespace) -> int:
    _refuse_preserved_fds(args.preserve_fds)
    record = _active(args)
    if state.current_status(record) != "running":
        raise RuntimeFailure(f"cannot exec in a container that is {state.current_status(record)}")
    process = _exec_process(args, record)
    if args.cwd:
        process["cwd"] = args.cwd
    if args.env and args.process:
        process["env"] = list(process.get("env") or []) + list(args.env)
    terminal = bool(process.get("terminal")) or bool(args.tty)
    if terminal and not args.console_socket:
        raise RuntimeFailure("exec with a terminal needs --console-socket")
    if not args.detach:
        return _exec_stand_in(record, process, terminal, args.console_socket, None)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 255
        try:
            code = _exec_stand_in(record, process, terminal, args.console_socket, write_end)
        except RuntimeFailure as exc:
            with contextlib.suppress(OSError):
                os.write(write_end, str(exc).encode()[:4000])
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(write_end, repr(exc).encode()[:4000])
        signals.exit_like(code)
    os.close(write_end)
    report = b""
    while chunk := os.read(read_end, 4096):
        report += chunk
        if report.startswith(b"\0"):
            break
    os.close(read_end)
    if not report.startswith(b"\0"):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise RuntimeFailure(report.decode("utf-8", "replace") or "exec failed")
    _write_pid_file(args.pid_file, pid)
    return 0


def _exec_stand_in(
    record: state.StateRecord,
    process: dict[str, Any],
    terminal: bool,
    console_socket: str | None,
    ready_fd: int | None,
) -> int:
    """Stands for the exec'd process on the host: its stdio go to the keeper, its signals
    are forwarded, and it exits with the process's status."""
    fds = [0, 1, 2]
    if terminal:
        from husk.ociruntime.console import open_terminal  # terminals only

        if ready_fd is not None:
            os.setsid()  # the terminal's session: its resizes reach this process
        # terminals only (start-up time of every other exec)
        import fcntl
        import termios

        slave = open_terminal(console_socket)
        with contextlib.suppress(OSError):
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        fds = [slave]
    connection = control.connect(record.control, timeout=None)
    connection.send({"op": "exec", "process": process, "tty": terminal}, fds)
    reply, _ = connection.receive()
    if reply is None or "error" in reply:
        raise RuntimeFailure(str((reply or {}).get("error") or "the keeper refused the exec"))
    if ready_fd is not None:
        os.write(ready_fd, b"\0")
        os.close(ready_fd)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

    def forward(number: int, _frame: Any) -> None:
        with contextlib.suppress(OSError):
            connection.send({"signal": number})

    def resize(_number: int, _frame: Any) -> None:
        from husk.ociruntime.console import window_size  # terminals only

        with contextlib.suppress(OSError):
            rows, cols = window_size(fds[0])
            if rows and cols:
                connection.send({"resize": [rows, cols]})

    if terminal:
        signal.signal(signal.SIGWINCH, resize)
        resize(signal.SIGWINCH, None)

    for number in (
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
    ):
        signal.signal(number, forward)
    while True:
        try:
            reply, _ = connection.receive()
        except OSError:
            reply = None
        if reply is None:
            return 255
        if "exit" in reply:
            return int(reply["exit"])


def cmd_features(args: argparse.Namespace) -> int:
    print(
        json.dumps(
            {
                "ociVersionMin": "1.0.0",
                "ociVersionMax": state.OCI_VERSION,
                "hooks": [],
                "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec"],
                "linux": {
                    "namespaces": ["pid", "network", "ipc", "uts", "mount"],
                    "capabilities": [],
                },
                "annotations": {"io.husk.runtime": "vm"},
            },
            indent=2,
        )
    )
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    target = Path(args.bundle or ".") / "config.json"
    if os.path.lexists(target):  # a dangling link too: it is never written through
        raise RuntimeFailure(f"File {target} exists. Remove it first")
    spec = {
        "ociVersion": state.OCI_VERSION,
        "process": {
            "terminal": True,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=xterm",
            ],
            "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "husk",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]},
    }
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    except FileExistsError:  # made meanwhile
        raise RuntimeFailure(f"File {target} exists. Remove it first") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(spec, indent=2) + "\n")
    return 0


# -- the parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    import argparse  # the commands fast_arguments() does not take

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise ArgumentError(message)

    parser = Parser(prog="husk-runtime", description="husk as an OCI runtime (runc-compatible)")
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--log", default=None)
    parser.add_argument("--log-format", choices=("json", "text"), default="text")
    parser.add_argument("--systemd-cgroup", action="store_true")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--rootless", default=None)
    parser.add_argument("--criu", default=None)
    parser.add_argument("-v", "--version", action="store_true")
    commands = parser.add_subparsers(dest="command_name", parser_class=Parser)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], with_id: bool = True
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(name)
        sub.set_defaults(handler=handler)
        if with_id:
            sub.add_argument("id")
        return sub

    create = command("create", cmd_create)
    create.add_argument("--bundle", "-b", default=".")
    create.add_argument("--pid-file", default=None)
    create.add_argument("--console-socket", default=None)
    create.add_argument("--no-pivot", action="store_true")
    create.add_argument("--no-new-keyring", action="store_true")
    create.add_argument("--preserve-fds", type=int, default=0)
    command("start", cmd_start)
    command("state", cmd_state)
    kill = command("kill", cmd_kill)
    kill.add_argument("signal", nargs="?", default="SIGTERM")
    kill.add_argument("--all", "-a", action="store_true")
    delete = command("delete", cmd_delete)
    delete.add_argument("--force", "-f", action="store_true")
    listing = command("list", cmd_list, with_id=False)
    listing.add_argument("--format", "-f", choices=("table", "json"), default="table")
    listing.add_argument("--quiet", "-q", action="store_true")
    ps = command("ps", cmd_ps)
    ps.add_argument("--format", "-f", choices=("table", "json"), default="table")
    ps.add_argument("ps_args", nargs="*")
    execute = command("exec", cmd_exec)
    execute.add_argument("--process", "-p", default=None)
    execute.add_argument("--detach", "-d", action="store_true")
    execute.add_argument("--pid-file", default=None)
    execute.add_argument("--console-socket", default=None)
    execute.add_argument("--tty", "-t", action="store_true")
    execute.add_argument("--cwd", default=None)
    execute.add_argument("--env", "-e", action="append")
    execute.add_argument("--user", "-u", default=None)
    execute.add_argument("--additional-gids", "-g", action="append")
    execute.add_argument("--cap", "-c", action="append")
    execute.add_argument("--no-new-privs", action="store_true")
    execute.add_argument("--preserve-fds", type=int, default=0)
    execute.add_argument("--process-label", default=None)
    execute.add_argument("--apparmor", default=None)
    execute.add_argument("command", nargs=argparse.REMAINDER)
    command("pause", cmd_pause)
    command("resume", cmd_resume)
    update = command("update", cmd_update)
    update.add_argument("--resources", "-r", default=None)
    for name in UPDATE_FLAGS:
        aliases = [f"--{name}", "--cpu-shares"] if name == "cpu-share" else [f"--{name}"]
        update.add_argument(*aliases, dest=name.replace("-", "_"), default=None)
    events = command("events", cmd_events)
    events.add_argument("--stats", action="store_true")
    events.add_argument("--interval", default="5s")
    command("features", cmd_features, with_id=False)
    spec = command("spec", cmd_spec, with_id=False)
    spec.add_argument("--bundle", "-b", default=None)
    spec.add_argument("--rootless", action="store_true")
    return parser


def _early_log(argv: Sequence[str]) -> None:
    """--log and --log-format found before parsing: a usage error is logged too."""
    values: dict[str, str] = {}
    for index, arg in enumerate(argv):
        for name in ("--log", "--log-format"):
            if arg == name and index + 1 < len(argv):
                values[name] = argv[index + 1]
            elif arg.startswith(name + "="):
                values[name] = arg.split("=", 1)[1]
    log_format = values.get("--log-format", "text")
    log.configure(values.get("--log"), log_format if log_format in ("json", "text") else "text")


FAST_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], dict[str, str]]] = {
    "state": (cmd_state, {}),
    "start": (cmd_start, {}),
    "kill": (cmd_kill, {"--all": "all", "-a": "all"}),
    "delete": (cmd_delete, {"--force": "force", "-f": "force"}),
}
"""The commands engines call for every container, with their boolean flags."""
GLOBAL_VALUES = {"--root": "root", "--log": "log", "--log-format": "log_format"}


def fast_arguments(argv: Sequence[str]) -> argparse.Namespace | None:
    """``argv`` of a state/start/kill/delete call as parse_args would give it, or None
    (anything else, or anything unusual: the full parser decides)."""
    values: dict[str, Any] = {
        "root": None,
        "log": None,
        "log_format": "text",
        "systemd_cgroup": False,
        "debug": False,
        "version": False,
        "all": False,
        "force": False,
    }
    words = list(argv)
    while words and words[0].startswith("-"):
        name, equals, value = words.pop(0).partition("=")
        if name == "--systemd-cgroup" and not equals:
            values["systemd_cgroup"] = True
            continue
        if name not in GLOBAL_VALUES:
            return None
        if not equals:
            if not words:
                return None
            value = words.pop(0)
        values[GLOBAL_VALUES[name]] = value
    if not words or words[0] not in FAST_COMMANDS:
        return None
    handler, flags = FAST_COMMANDS[words.pop(0)]
    positional = []
    for word in words:
        if word in flags:
            values[flags[word]] = True
        elif word.startswith("-") and not word[1:].isdigit():
            return None
        else:
            positional.append(word)
    if handler is cmd_kill and len(positional) in (1, 2):
        values["signal"] = positional[1] if len(positional) == 2 else "SIGTERM"
    elif len(positional) != 1:
        return None
    if values["log_format"] not in ("json", "text"):
        return None
    values["id"] = positional[0]
    values["handler"] = handler
    if values["root"] is not None:
        values["root"] = Path(values["root"])
    return cast("argparse.Namespace", SimpleNamespace(**values))


def run(argv: Sequence[str]) -> int:
    _early_log(argv)
    args = fast_arguments(argv)
    if args is None:
        args = build_parser().parse_args(list(argv))
    log.configure(args.log, args.log_format)
    if args.debug:
        log.enable_debug()
    if args.version:
        print(f"husk-runtime version {VERSION}\nspec: {state.OCI_VERSION}")
        return 0
    if not getattr(args, "handler", None):
        raise ArgumentError("a command is needed (create, start, state, kill, delete, ...)")
    if args.root is None:
        args.root = _default_root()
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _default_root() -> Path:
    """The default --root, checked as the daemon's run directory is: without
    XDG_RUNTIME_DIR it is ``/tmp/husk-runtime-UID``, which another local user could make
    first (or plant as a symlink) to read and forge our containers' state."""
    from husk import paths  # lazy: engines pass --root, and every command's start-up counts

    try:
        return paths.secure_run_dir(state.default_root())
    except paths.UnsafePath as exc:
        raise RuntimeFailure(f"husk-runtime's state root: {exc}; or pass --root") from None


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except RuntimeFailure as exc:
        log.error(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # never a traceback for the engine to show
        log.error(f"husk-runtime failed: {exc!r}")
        code = 1
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
