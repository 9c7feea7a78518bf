"""The keeper: one process per container that owns its VM for the container's whole life.

``create`` forks it; its pid is the container's pid for the engine (written to
``--pid-file``), it is reaped by the engine's shim or conmon, and its exit status is the
workload's (a workload killed by signal N makes the keeper die of N). It holds the
workload's stdio (or the console pty), boots the VM through the sandbox layer (boot
templates), waits for ``start`` on its control socket, and serves kill, exec, pause,
resume and shutdown requests there. docs/OCI_RUNTIME.md has the design.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import sys
import termios
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from husk import paths, settings
from husk.agent.client import GuestProcess, ProcessSpec
from husk.errors import GuestError, HuskError
from husk.guest.agent.capabilities import NUMBERS as CAPABILITY_NUMBERS
from husk.guest.kernelnames import RLIMITS
from husk.guest.protocol import MsgType
from husk.ociruntime import (
    control,
    hooks,
    namespaces,
    netns,
    ramholder,
    resources,
    signals,
    state,
    stdio,
    vmplan,
)
from husk.ociruntime.bundle import Bundle, Process, parse_process
from husk.ociruntime.console import open_terminal, window_size
from husk.ociruntime.errors import RuntimeFailure
from husk.ociruntime.fileshare import bind as bind_file_share
from husk.ociruntime.log import configure as configure_log
from husk.ociruntime.log import write as write_log
from husk.sandbox import templates
from husk.sandbox.sandbox import Sandbox, SandboxConfig
from husk.vm.machine import random_mac

log = logging.getLogger(__name__)

PLACEHOLDER_DISK = "oci-placeholder.img"
FILE_SHARES = "files"
"""Under the container's state directory: a private directory per single-file bind."""
START_FAILURE_GRACE = 0.2
"""Seconds a keeper whose workload could not start waits before it exits (its answer to
``start`` is sent on the control socket meanwhile)."""
STOPPING_SIGNALS = frozenset(
    {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}
)


@dataclass
class KeeperOptions:
    root: Path
    container_id: str
    bundle: Bundle
    console_socket: str | None
    log_path: str | None
    log_format: str


def placeholder_disk() -> Path:
    """An empty, sparse image disk of the template size class: the VM's shape needs one,
    the guest never mounts it (its root is the shared directory)."""
    directory = settings.data_dir() / "cache"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PLACEHOLDER_DISK
    size = templates.image_disk_size(0)
    if not path.exists() or path.stat().st_size != size:
        temporary = directory / f".{PLACEHOLDER_DISK}.{os.getpid()}"
        from husk.oci.rootfs import pad_to  # once per data directory: it loads the image store

        temporary.write_bytes(b"")
        pad_to(temporary, size)
        os.replace(temporary, path)
    return path


def run_options(process: Process, readonly: bool) -> dict[str, Any]:
    """The RUN body's process settings (husk.agent.messages.run_options' fields)."""
    body: dict[str, Any] = {}
    if readonly:
        body["read_only"] = True
    if process.capabilities is not None:
        names = [name.upper().removeprefix("CAP_") for name in process.capabilities]
        body["cap_drop"] = ["ALL"]
        body["cap_add"] = [name for name in names if name in CAPABILITY_NUMBERS]
    ulimits = [
        {"name": name, "soft": soft, "hard": hard}
        for name, soft, hard in process.rlimits
        if name in RLIMITS
    ]
    if ulimits:
        body["ulimits"] = ulimits
    if process.additional_gids:
        body["group_add"] = [str(gid) for gid in process.additional_gids]
    if process.no_new_privileges:
        body["no_new_privileges"] = True
    if process.oom_score_adj:
        body["oom_score_adj"] = process.oom_score_adj
    return body


def process_spec(process: Process, *, tty: bool, stdin: bool) -> ProcessSpec:
    return ProcessSpec(
        argv=list(process.args),
        env=list(process.env),
        cwd=process.cwd,
        user=process.user,
        tty=tty,
        stdin=stdin,
    )


class Keeper:
    def __init__(self, options: KeeperOptions) -> None:
        self.options = options
        self.bundle = options.bundle
        self.directory = state.container_dir(options.root, options.container_id)
        name = state.short_name(options.root, options.container_id)
        base = state.run_dir() / "oci"
        self.control_path = base / f"{name}.sock"
        self.vm_dir = state.run_dir() / "vms" / name
        self.record = state.load(options.root, options.container_id)
        self.sandbox: Sandbox | None = None
        self.process: GuestProcess | None = None
        self.start_requested: asyncio.Event | None = None
        self.stop_signal: int | None = None
        self.start_failure: int | None = None
        """The exit code of a workload that could not be started."""
        self.terminal: int | None = None
        self.stdio: tuple[int, int, int] = (0, 1, 2)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: socket.socket | None = None
        self.attachment: netns.NetnsAttachment | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.cgroup: dict[str, str] = {}
        """The container's cgroup files in the guest (linux.resources, then updates)."""

    # -- state ----------------------------------------------------------------
    def set_status(self, status: str, exit_status: int | None = None) -> None:
        self.record.status = status
        if exit_status is not None:
            self.record.exit_status = exit_status
        state.save(self.directory, self.record)

    # -- boot -----------------------------------------------------------------
    async def boot(self) -> Sandbox:
        bundle = self.bundle
        plan = vmplan.plan(bundle, self.directory / FILE_SHARES)
        for file in plan.files:
            bind_file_share(file)
        config = SandboxConfig(
            state_dir=self.vm_dir,
            image_disk=await asyncio.to_thread(placeholder_disk),
            upper_disk=None,
            hostname=bundle.hostname or self.options.container_id[:12],
            mac=random_mac(),
            cpus=bundle.cpus,
            memory_bytes=bundle.memory_bytes,
            shares=plan.shares,
            use_template=not bundle.cold_boot,
            egress=bundle.netns is None,
            root_share=vmplan.ROOT_TAG,
        )
        if bundle.netns is not None:
            # The engine's interfaces, taken over by the VM (None: only lo, as runc's
            # empty namespace would have). Without a path the namespace is the one this
            # keeper made (main) and the engine's hooks configured.
            path = bundle.netns or f"/proc/{os.getpid()}/ns/net"
            self.attachment = netns.attach(path, made_by_this_process=not bundle.netns)
            if self.attachment is not None:
                config.lan_taps = dict(self.attachment.taps)
        # Checked as the control socket's directory is (listen), and before QEMU's sockets
        # are made there: husk connects to them by path.
        paths.secure_run_dir(self.vm_dir.parent)
        if ramholder.enabled():
            # The template's RAM from the holder, checked by an earlier keeper, instead
            # of loading and hashing it again (husk.ociruntime.ramholder).
            templates.shared_memory = ramholder.Holder(state.run_dir())
        sandbox = await Sandbox.boot(config)
        try:
            if self.attachment is not None:
                await sandbox.client.configure_network(self.attachment.network)
            for body in plan.mounts:
                await sandbox.client.mount(**body)
        except BaseException:
            await sandbox.discard()
            raise
        return sandbox

    # -- the control socket -----------------------------------------------------
    def listen(self) -> None:
        # Checked as the daemon's run directory is: in a directory another user owns or
        # can write to, they could put their own socket here and pose as this keeper.
        paths.secure_run_dir(self.control_path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(str(self.control_path))
        finally:
            os.umask(old)
        server.listen(16)
        self.server = server
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.server is not None
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _call(self, coroutine: Any, timeout: float | None = 60.0) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def _serve(self, sock: socket.socket) -> None:
        connection = control.Connection(sock)
        fds: list[int] = []
        try:
            body, fds = connection.receive(with_fds=True)
            if body is None:
                return
            op = body.get("op")
            if op == "exec":
                self._serve_exec(connection, body, fds)
                fds = []
                return
            handler = {
                "start": self.op_start,
                "kill": self.op_kill,
                "pause": self.op_pause,
                "resume": self.op_resume,
                "shutdown": self.op_shutdown,
                "stats": self.op_stats,
                "update": self.op_update,
            }.get(str(op))
            if handler is None:
                connection.send({"error": f"unknown request {op!r}"})
                return
            connection.send(self._call(handler(body)) or {})
        except (RuntimeFailure, HuskError) as exc:
            with contextlib.suppress(OSError):
                connection.send({"error": str(exc)})
        except Exception as exc:  # one bad request must not end the keeper
            write_log("error", f"control request failed: {exc!r}")
            with contextlib.suppress(OSError):
                connection.send({"error": f"internal error: {exc}"})
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            connection.close()

    # -- requests ---------------------------------------------------------------
    async def op_start(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.record.status != "created" or self.start_requested is None:
            raise RuntimeFailure(f"cannot start a container that is {self.record.status}")
        sandbox = self.sandbox
        assert sandbox is not None
        process = self.bundle.process
        terminal = self.terminal is not None
        stdin = terminal or not stdio.is_null(self.stdio[0])
        spec = process_spec(process, tty=terminal, stdin=stdin)
        spec.options = run_options(process, self.bundle.readonly)
        spec.options["cgroup"] = dict(self.cgroup)
        try:
            self.process = await sandbox.client.run(spec)
        except HuskError as exc:
            # As runc's init, which exits when its exec fails: the container stops with
            # the code the guest gave (127/126), and this keeper (its pid) exits, so the
            # engine reaps it and deletes the container; it would wait forever otherwise.
            code = exc.exit_code if isinstance(exc, GuestError) and exc.exit_code else 128
            self.start_failure = code
            self.start_requested.set()
            raise RuntimeFailure(f"cannot start the container process: {exc}") from None
        self.set_status("running")
        self.start_requested.set()
        if self.bundle.hooks.get("poststart"):
            self._spawn_quietly(asyncio.to_thread(self.run_hooks, "poststart"))
        return {}

    async def op_kill(self, body: dict[str, Any]) -> dict[str, Any]:
        number = int(body.get("signal", signal.SIGTERM))
        if self.process is not None and self.record.status in ("running", "paused"):
            paused = self.record.status == "paused" and self.sandbox is not None
            if paused and number in STOPPING_SIGNALS:
                assert self.sandbox is not None
                await self.sandbox.machine.resume()
                self.set_status("running")
            await self.process.signal(number)
            return {}
        if self.record.status == "created" and number in STOPPING_SIGNALS:
            self.stop_signal = number
            assert self.start_requested is not None
            self.start_requested.set()
            return {}
        if self.record.status == "created":
            return {}  # a created container has no process to receive it yet
        raise RuntimeFailure("container not running")

    async def op_pause(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.record.status != "running" or self.sandbox is None:
            raise RuntimeFailure(f"container not running (it is {self.record.status})")
        await self.sandbox.machine.pause()
        self.set_status("paused")
        return {}

    async def op_resume(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.record.status != "paused" or self.sandbox is None:
            raise RuntimeFailure(f"container not paused (it is {self.record.status})")
        await self.sandbox.machine.resume()
        self.set_status("running")
        return {}

    def vm_shape(self) -> resources.VmShape:
        assert self.sandbox is not None
        cpus, memory_mib = self.sandbox.machine.config.resources()
        return resources.VmShape(cpus=cpus, memory_bytes=memory_mib << 20)

    async def op_update(self, body: dict[str, Any]) -> dict[str, Any]:
        """New limits (runc's LinuxResources) for the container's cgroup in the guest."""
        status = self.record.status
        if status not in ("created", "running") or self.sandbox is None:
            raise RuntimeFailure(f"cannot update a container that is {status}")
        try:
            files = resources.cgroup_files(body.get("resources"), self.vm_shape())
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"cannot update container resources: {exc}") from None
        if status == "created":  # applied when the workload starts
            self.cgroup.update(files)
            return {"cgroup": dict(self.cgroup)}
        reply = await self.sandbox.client.request(MsgType.RESOURCES, {"cgroup": files})
        self.cgroup.update(files)
        now = reply.get("cgroup")
        return {"cgroup": {str(k): str(v) for k, v in now.items()} if isinstance(now, dict) else {}}

    async def op_shutdown(self, body: dict[str, Any]) -> dict[str, Any]:
        self.stop_signal = signal.SIGKILL
        if self.start_requested is not None:
            self.start_requested.set()
        if self.process is not None:
            with contextlib.suppress(Exception):
                await self.process.signal(signal.SIGKILL)
        return {}

    async def op_stats(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.sandbox is None or self.record.status != "running":
            return {"stats": {}}
        try:
            figures = await self.sandbox.client.stats()  # checked: named integers
        except HuskError:
            figures = {}
        return {"stats": figures}

    # -- exec -------------------------------------------------------------------
    def _serve_exec(
        self, connection: control.Connection, body: dict[str, Any], fds: list[int]
    ) -> None:
        try:
            process = parse_process(body.get("process"))
            tty_mode = bool(body.get("tty"))
            if len(fds) != (1 if tty_mode else 3):
                raise RuntimeFailure("exec needs its stdio descriptors")
            pid, finished = self._call(self.start_exec(process, tty_mode, fds))
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        connection.send({"pid": pid})

        def forward_signals() -> None:
            while True:
                try:
                    message, _ = connection.receive()
                except (OSError, RuntimeFailure):
                    message = None
                if message is None:
                    # The exec's stand-in is gone (killed): so is its process.
                    self._signal_exec(finished, signal.SIGKILL)
                    return
                if "signal" in message:
                    self._signal_exec(finished, int(message["signal"]))
                elif "resize" in message:
                    rows, cols = message["resize"]
                    self._resize_exec(finished, int(rows), int(cols))

        threading.Thread(target=forward_signals, daemon=True).start()
        code = finished.result()
        with contextlib.suppress(OSError):
            connection.send({"exit": code})

    def _signal_exec(self, finished: Any, number: int) -> None:
        guest = getattr(finished, "guest_process", None)
        if guest is not None and not finished.done():
            with contextlib.suppress(Exception):
                self._call(guest.signal(number), timeout=10)

    def _resize_exec(self, finished: Any, rows: int, cols: int) -> None:
        guest = getattr(finished, "guest_process", None)
        if guest is not None and not finished.done():
            with contextlib.suppress(Exception):
                self._call(guest.resize(rows, cols), timeout=10)

    async def start_exec(self, process: Process, tty_mode: bool, fds: list[int]) -> tuple[int, Any]:
        if self.record.status != "running" or self.sandbox is None:
            raise RuntimeFailure(f"cannot exec in a container that is {self.record.status}")
        stdin_fd = fds[0]
        stdin = tty_mode or not stdio.is_null(stdin_fd)
        spec = process_spec(process, tty=tty_mode, stdin=stdin)
        try:
            guest = await self.sandbox.client.exec(spec)
        except HuskError as exc:
            raise RuntimeFailure(f"exec failed: {exc}") from None
        finished: Any = concurrent.futures.Future()
        finished.guest_process = guest
        assert self.loop is not None
        self.loop.create_task(self._follow_exec(guest, tty_mode, fds, stdin, finished))
        return guest.pid, finished

    async def _follow_exec(
        self, guest: GuestProcess, tty_mode: bool, fds: list[int], stdin: bool, finished: Any
    ) -> None:
        assert self.loop is not None
        out = stdio.FdWriter(fds[0] if tty_mode else fds[1])
        err = out if tty_mode else stdio.FdWriter(fds[2])
        if stdin:
            stdio.pump_input(fds[0], self.loop, guest.write_stdin, guest.close_stdin)
        code = 255
        try:
            async for stream, data in guest.output():
                (err if stream == "stderr" else out).write(data)
            code = guest.exit_code if guest.exit_code is not None else 255
        except HuskError as exc:
            write_log("error", f"exec session failed: {exc}")
        finally:
            await asyncio.to_thread(out.close)
            if err is not out:
                await asyncio.to_thread(err.close)
            with contextlib.suppress(Exception):
                await guest.release()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            finished.set_result(code)

    # -- the container's life ---------------------------------------------------------
    async def follow_workload(self) -> int:
        assert self.process is not None and self.loop is not None
        process = self.process
        if self.terminal is not None:
            out = err = stdio.FdWriter(self.terminal)
            stdio.pump_input(self.terminal, self.loop, process.write_stdin, process.close_stdin)
            self.loop.add_signal_handler(signal.SIGWINCH, self._resize)
            self._resize()
        else:
            out, err = stdio.FdWriter(self.stdio[1]), stdio.FdWriter(self.stdio[2])
            if not stdio.is_null(self.stdio[0]):
                stdio.pump_input(self.stdio[0], self.loop, process.write_stdin, process.close_stdin)
        try:
            async for stream, data in process.output():
                (err if stream == "stderr" else out).write(data)
            return process.exit_code if process.exit_code is not None else 255
        except HuskError as exc:
            write_log("error", f"the container's VM failed: {exc}")
            return 255
        finally:
            await asyncio.to_thread(out.close)
            if err is not out:
                await asyncio.to_thread(err.close)

    def _resize(self) -> None:
        if self.terminal is None or self.process is None or self.loop is None:
            return
        with contextlib.suppress(OSError):
            rows, cols = window_size(self.terminal)
            if rows and cols:
                self.loop.create_task(self.process.resize(rows, cols))

    async def main(self, ready_fd: int) -> int:
        """Boots, reports *created* on ``ready_fd``, runs the container; its exit status."""
        try:
            # Before any thread exists: unshare acts on the calling thread alone.
            namespaces.hold_mounts()
        except RuntimeFailure as exc:
            os.write(ready_fd, str(exc).encode()[:4000])
            return 1
        if self.bundle.netns == "":
            # As runc would: a network namespace of the container's own, here the
            # keeper's (its pid is the container's for the engine's hooks). Before any
            # thread exists: unshare moves only the calling thread.
            try:
                namespaces.unshare_network()
            except RuntimeFailure as exc:
                os.write(ready_fd, str(exc).encode()[:4000])
                return 1
        self.loop = asyncio.get_running_loop()
        self.start_requested = asyncio.Event()
        try:
            self.record.pid = os.getpid()
            self.record.pid_start = state.process_start(os.getpid()) or 0
            self.record.control = str(self.control_path)
            self.record.vm_dir = str(self.vm_dir)
            state.save(self.directory, self.record)
            await asyncio.to_thread(self.run_hooks, "prestart", "createRuntime")
            if self.bundle.process.terminal:
                self.terminal = open_terminal(self.options.console_socket)
                with contextlib.suppress(OSError):
                    fcntl.ioctl(self.terminal, termios.TIOCSCTTY, 0)
            self.sandbox = await self.boot()
            try:
                self.cgroup = resources.cgroup_files(
                    self.bundle.resources, self.vm_shape(), at_create=True
                )
            except RuntimeFailure as exc:
                raise RuntimeFailure(f"linux.resources: {exc}") from None
            self.listen()
            self.set_status("created")
        except BaseException as exc:
            message = str(exc) if isinstance(exc, (RuntimeFailure, HuskError)) else repr(exc)
            with contextlib.suppress(OSError):
                os.write(ready_fd, message.encode()[:4000] or b"keeper failed")
            await self.teardown()
            return 1
        os.write(ready_fd, b"\0")
        os.close(ready_fd)
        await self.start_requested.wait()
        if self.start_failure is not None:
            await asyncio.sleep(START_FAILURE_GRACE)  # the start's answer goes out first
            await self.teardown()
            self.set_status("stopped", self.start_failure)
            return self.start_failure
        if self.process is None:  # killed or deleted before start
            await self.teardown()
            self.set_status("stopped", 128 + (self.stop_signal or signal.SIGKILL))
            return 128 + (self.stop_signal or signal.SIGKILL)
        code = await self.follow_workload()
        self.set_status("stopped", code)
        await self.teardown()
        return code

    async def teardown(self) -> None:
        if self.server is not None:
            with contextlib.suppress(OSError):
                self.server.close()
        with contextlib.suppress(OSError):
            self.control_path.unlink()
        if self.sandbox is not None:
            with contextlib.suppress(Exception):
                await self.sandbox.discard()
            self.sandbox = None
        if self.attachment is not None:
            with contextlib.suppress(Exception):
                self.attachment.close()
        shutil.rmtree(self.vm_dir, ignore_errors=True)
        if self.bundle.hooks.get("poststop"):
            with contextlib.suppress(RuntimeFailure):
                await asyncio.to_thread(self.run_hooks, "poststop")

    def run_hooks(self, *kinds: str) -> None:
        """The bundle's hooks of ``kinds`` with the state on stdin (husk.ociruntime.hooks).

        A failure of prestart/createRuntime fails the create; of poststart/poststop it is
        logged (runc's rule: the container's fate is decided by then) and raised on."""
        document = hooks.state_document(
            self.options.container_id,
            self.record.status,
            os.getpid(),
            str(self.bundle.path),
            self.bundle.annotations,
        )
        for kind in kinds:
            try:
                hooks.run(kind, self.bundle.hooks.get(kind, []), document)
            except RuntimeFailure as exc:
                if kind in ("poststart", "poststop"):
                    write_log("warning", str(exc))
                raise

    def _spawn_quietly(self, coroutine: Any) -> None:
        """Runs ``coroutine`` in the background; its RuntimeFailure was logged already."""

        async def quietly() -> None:
            with contextlib.suppress(RuntimeFailure):
                await coroutine

        assert self.loop is not None
        task = self.loop.create_task(quietly())
        self._background.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._background.discard)


def _quiet_stdio() -> tuple[int, int, int]:
    """Keeps the container's stdio on private descriptors and points 0-2 at /dev/null,
    so that QEMU and its helpers never hold the engine's pipes open."""
    saved = tuple(os.dup(fd) for fd in (0, 1, 2))
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's life
    return saved[0], saved[1], saved[2]


def run(options: KeeperOptions, ready_fd: int) -> None:
    """The keeper's body, in the process ``create`` forked; never returns."""
    code = 255
    try:
        configure_log(options.log_path, options.log_format)
        logging.basicConfig(level=logging.WARNING, handlers=[_RuntimeLog()], force=True)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        keeper = Keeper(options)
        keeper.stdio = _quiet_stdio()
        if options.bundle.process.terminal:
            # The workload's stdio is the pty: the descriptors create was given are the
            # engine's pipe for create's own output (containerd's shim reads it to EOF).
            for fd in keeper.stdio:
                os.close(fd)
            keeper.stdio = (-1, -1, -1)

        async def main() -> int:
            loop = asyncio.get_running_loop()
            for number in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(number, _forward, keeper, number)
            return await keeper.main(ready_fd)

        code = asyncio.run(main())
    except BaseException as exc:  # the keeper reports, never prints a traceback
        with contextlib.suppress(Exception):
            write_log("error", f"keeper failed: {exc!r}")
    finally:
        signals.exit_like(code)


class _RuntimeLog(logging.Handler):
    """husk's log records as lines of --log, in its format (containerd's shim parses
    every line of a JSON log)."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            write_log(record.levelname.lower(), f"{record.name}: {record.getMessage()}")


def _forward(keeper: Keeper, number: int) -> None:
    """A signal sent to the keeper itself (the container's pid) goes to the workload."""
    if keeper.loop is not None:
        keeper.loop.create_task(_quietly(keeper.op_kill({"signal": number})))


async def _quietly(coroutine: Any) -> None:
    with contextlib.suppress(Exception):
        await coroutine
