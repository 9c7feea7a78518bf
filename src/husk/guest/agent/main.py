"""PID 1 of the guest: boots the system, then serves the host over the agent port."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from husk.guest import protocol
from husk.guest.agent import (
    capabilities,
    cgroup2,
    container_root,
    identity,
    limits,
    listen,
    rehearsal,
    system,
)
from husk.guest.agent.forward import Tunnel
from husk.guest.agent.isolation import Isolation, IsolationError, Outside
from husk.guest.agent.loop import Loop, log
from husk.guest.agent.networking import Networking
from husk.guest.agent.port import Port, find_port
from husk.guest.agent.sessions import ProcessSession, SpawnError, spawn
from husk.guest.netconfig import GUEST_ADDRESS_CIDR, GUEST_GATEWAY
from husk.guest.protocol import Frame, FrameError, MsgType, ProtocolError

_MAX_DISK_RANGE = 64 * 1024 * 1024
"""The largest STDIN_DISK range taken (the host's slots are 4 MiB)."""

AGENT_PORT_NAME = "org.husk.agent"
MODULES_PID_FILE = "/etc/husk/modules.pid"
DEFAULT_ADDRESS = GUEST_ADDRESS_CIDR
DEFAULT_GATEWAY = GUEST_GATEWAY
_PORT_WAIT = 20.0
_SHUTDOWN_GRACE = 2.0

EARLY_MOUNTS = [
    ["mount", "-t", "proc", "proc", "/proc"],
    ["mount", "-t", "sysfs", "sysfs", "/sys"],
    ["mount", "-t", "devtmpfs", "devtmpfs", "/dev"],
    ["mkdir", "-p", "/dev/pts", "/dev/shm"],
    ["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620", "devpts", "/dev/pts"],
    ["mount", "-t", "tmpfs", "-o", "mode=1777", "shm", "/dev/shm"],
    ["mount", "-t", "tmpfs", "-o", "mode=0755", "run", "/run"],
    ["mount", "-t", "tmpfs", "-o", "mode=1777", "tmp", "/tmp"],
]


class Agent:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.port: Port | None = None
        self.sessions: dict[int, ProcessSession] = {}  # by channel
        self._transfer_fd = -1
        """The transfer ring's device, opened at the first STDIN_DISK."""
        self.by_pid: dict[int, ProcessSession] = {}
        self.tunnels: dict[int, Tunnel] = {}
        self.listeners: dict[int, listen.Listener] = {}  # by the LISTEN's channel
        self.workload: ProcessSession | None = None
        self.poweroff_on_exit = False
        self.address: str | None = DEFAULT_ADDRESS.split("/")[0]
        self.background: set[int] = set()
        self.boot_network: int | None = None
        """The pid of the boot-time eth0 setup, until it is collected."""
        self.isolation = Isolation(container_root.ROOT)
        self.networking = Networking(loop)
        self._shutting_down = False
        self.maintenance = False
        """This VM serves a stopped container's files (cp, export, diff) and runs nothing."""

    # -- plumbing ---------------------------------------------------------
    def send(self, frame: bytes) -> None:
        if self.port is not None:
            self.port.send(frame)

    def reply(self, channel: int, frame_type: MsgType, body: dict[str, Any]) -> None:
        self.send(protocol.encode_json(frame_type, channel, body))

    def error(self, channel: int, message: str, code: str = "error") -> None:
        self.send(protocol.encode_error(channel, message[:4000], code))

    def on_congestion(self, congested: bool) -> None:
        for session in self.sessions.values():
            session.set_paused(congested)
        for tunnel in self.tunnels.values():
            tunnel.set_paused(congested)

    def on_bad_frame(self, bad: FrameError) -> None:
        log(f"bad frame on channel {bad.channel}: {bad.reason}")
        self.error(bad.channel, bad.reason, "protocol")

    # -- children ---------------------------------------------------------
    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._background_done(pid, status)
            session = self.by_pid.pop(pid, None)
            if session is not None:
                session.exited(status)

    def _background_done(self, pid: int, status: int) -> None:
        self.background.discard(pid)
        if pid == self.boot_network:
            self.boot_network = None
            self.networking.boot_egress(os.waitstatus_to_exitcode(status) == 0)

    def session_finished(self, session: ProcessSession) -> None:
        if session.kind == "exec" or session.acknowledged:
            self.sessions.pop(session.channel, None)
        self._maybe_power_off()

    def _maybe_power_off(self) -> None:
        workload = self.workload
        if not self.poweroff_on_exit or workload is None or not workload.finished:
            return
        if not workload.acknowledged:
            return  # the host has not confirmed it received EXITED yet
        if any(not s.finished for s in self.sessions.values()):
            return
        self.shutdown()

    # -- dispatch ---------------------------------------------------------
    def on_frame(self, frame: Frame) -> None:
        try:
            self.dispatch(frame)
        except ProtocolError as exc:
            self.error(frame.channel, str(exc), "protocol")
        except SpawnError as exc:
            message = (str(exc) or "the process could not be started")[:4000]
            self.send(protocol.encode_error(frame.channel, message, exc.kind, exc.exit_code))
        except (
            system.SystemError_,
            IsolationError,
            OSError,
            ValueError,
            KeyError,
        ) as exc:
            self.error(frame.channel, str(exc) or type(exc).__name__)
        except Exception as exc:  # e.g. a field of the wrong type: answer, never die
            log(f"internal error handling {frame.type.name}: {exc!r}")
            self.error(frame.channel, f"internal error: {exc!r}", "internal")

    def dispatch(self, frame: Frame) -> None:
        kind = frame.type
        channel = frame.channel
        if kind is MsgType.STDIN:
            self._session(channel).write_stdin(frame.payload)
            return
        if kind is MsgType.DATA:
            tunnel = self.tunnels.get(channel)
            if tunnel is None:
                raise ProtocolError(f"no tunnel on channel {channel}")
            tunnel.from_host(frame.payload)
            return
        if kind is MsgType.ENTROPY:
            system.add_entropy(frame.payload)
            self.reply(channel, MsgType.OK, {})
            return
        body = frame.json()
        handler = self.HANDLERS.get(kind)
        if handler is None:
            raise ProtocolError(f"{kind.name} is not a request the agent accepts")
        handler(self, channel, body)

    def _session(self, channel: int) -> ProcessSession:
        session = self.sessions.get(channel)
        if session is None:
            raise ProtocolError(f"no process on channel {channel}")
        return session

    def handle_hello(self, channel: int, body: dict[str, Any]) -> None:
        if body["version"] != protocol.PROTOCOL_VERSION:
            self.error(
                channel,
                f"agent speaks protocol {protocol.PROTOCOL_VERSION}, host {body['version']}",
                "version",
            )
            return
        ready: dict[str, Any] = {
            "version": protocol.PROTOCOL_VERSION,
            "agent": "husk-agent",
        }
        if "identity" in body:
            # A restored clone's entropy, clock and MAC (see identity): READY says they
            # are set, so the host sends no requests of its own for them.
            wanted = identity.parse(body["identity"])
            ready["identity"] = identity.apply(wanted, self._finish_background)
        resume = body.get("resume")
        if isinstance(resume, dict) and self.port is not None:
            # A host taking over (daemon restart) says how much output it already has;
            # what is still queued here is replayed from those offsets instead.
            self.port.discard_pending()
        ready["sessions"] = [s.describe() for s in self.sessions.values()]
        ready["prepared"] = os.path.ismount(container_root.ROOT)
        ready["uptime_ns"] = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self.reply(channel, MsgType.READY, ready)
        if isinstance(resume, dict):
            for session in self.sessions.values():
                offsets = resume.get(session.kind)
                if isinstance(offsets, dict):
                    session.replay(offsets)

    def _start(
        self,
        channel: int,
        body: dict[str, Any],
        kind: str,
        child_main: Callable[[], None] | None = None,
        keep: frozenset[int] | None = None,
        outside: Outside | None = None,
    ) -> None:
        if channel == protocol.CONTROL_CHANNEL or channel in self.sessions:
            raise ProtocolError(f"channel {channel} is already in use")
        running = self.workload is not None and self.workload.exit_code is None
        # A running workload stands in the prepared root: an exec skips the two stats.
        if not running and not os.path.ismount(container_root.ROOT):
            raise system.SystemError_("the container root is not prepared (send PREPARE first)")
        if kind == "run" and self.workload is not None:
            raise system.SystemError_("the workload has already been started in this VM")
        if self.maintenance:
            if kind != "archive":
                raise system.SystemError_("a maintenance VM runs no container processes")
        elif kind != "run" and (self.workload is None or self.workload.exit_code is not None):
            raise system.SystemError_("container is not running: its workload has exited")
        tty = bool(body.get("tty"))
        if kind == "run" and self.networking.resolver.running:
            # resolv.conf points at the embedded resolver, which forwards to these.
            body = {k: v for k, v in body.items() if k not in ("dns", "dns_search", "dns_options")}
        if kind == "run":
            self.isolation.caps = capabilities.from_spec(body)
            self.isolation.privileged = body.get("privileged") is True
            self.isolation.settings = limits.Settings(body)
            self.isolation.settings.prepare(body, self.address)
        if kind != "archive" and self.isolation.settings.group_add:
            # Exec sessions join the container's extra groups too, as Docker's do.
            body = {**body, "group_add": self.isolation.settings.group_add}
        entry = outside or self.isolation.entry(kind, keep, maintenance=self.maintenance)
        pid, fds = spawn(
            body,
            container_root.ROOT,
            tty,
            bool(body.get("stdin")),
            entry,
            child_main,
            init=kind == "run" and body.get("init") is True,
        )
        session = ProcessSession(
            self.loop, self.send, kind, channel, pid, fds, self.session_finished
        )
        self.sessions[channel] = session
        self.by_pid[pid] = session
        if kind == "run":
            self.workload = session
            self.isolation.workload_started(pid)
            self.networking.workload_started()
            self.poweroff_on_exit = bool(body.get("poweroff_on_exit"))
        self.reply(channel, MsgType.STARTED, {"pid": pid})
        if self.port is not None and self.port.congested:
            session.set_paused(True)

    def handle_run(self, channel: int, body: dict[str, Any]) -> None:
        self._start(channel, body, "run")

    def handle_exec(self, channel: int, body: dict[str, Any]) -> None:
        self._start(channel, body, "exec")

    def handle_archive(self, channel: int, body: dict[str, Any]) -> None:
        # Imported here, before the child enters the container (where the stdlib is
        # out of reach), and only by VMs that copy files at all.
        from husk.guest.agent import archive, changes, layer

        mode = str(body["mode"])
        path = str(body["path"])
        if not path.startswith("/"):
            raise ProtocolError(f"archive path must be absolute: {path!r}")
        spec = {"argv": ["archive"], "stdin": mode == "put", "user": "0:0"}
        if mode == "diff":
            # The layers themselves, read from outside the container (see changes).
            walk = changes.Walk(container_root.UPPER_MOUNT + "/upper", container_root.IMAGE_MOUNT)
            self._start(channel, spec, "archive", walk.run, outside=Outside())
            return
        if mode == "layer":
            # The writable layer as a tar (commit), read from outside as diff is.
            writer = layer.LayerWriter(container_root.UPPER_MOUNT + "/upper")
            self._start(channel, spec, "archive", writer.run, outside=Outside())
            return
        action = archive.ACTIONS.get(mode)
        if action is None:
            raise ProtocolError(f"unknown archive mode {mode!r}")
        keep = capabilities.ARCHIVE_WRITE if mode == "put" else capabilities.ARCHIVE_READ
        self._start(channel, spec, "archive", lambda: action(path), keep)

    def handle_signal(self, channel: int, body: dict[str, Any]) -> None:
        signum = int(body["signal"])
        if not 1 <= signum < signal.NSIG:
            raise ProtocolError(f"invalid signal number {signum}")
        self._session(channel).signal(signum)

    def handle_stdin_disk(self, channel: int, body: dict[str, Any]) -> None:
        offset, length = int(body["offset"]), int(body["length"])
        align = protocol.TRANSFER_ALIGN
        if offset < 0 or not 0 < length <= _MAX_DISK_RANGE or (offset | length) % align:
            raise ProtocolError(f"bad transfer ring range ({offset}, {length})")
        session = self._session(channel)
        if self._transfer_fd < 0:
            device = system.block_device_for_serial(protocol.TRANSFER_SERIAL)
            # O_DIRECT: every read goes to the disk, never to a page cached by an earlier use.
            self._transfer_fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        session.stdin_from_disk(self._transfer_fd, offset, length)

    def handle_stdin_eof(self, channel: int, body: dict[str, Any]) -> None:
        self._session(channel).close_stdin()

    def handle_resize(self, channel: int, body: dict[str, Any]) -> None:
        self._session(channel).resize(int(body["rows"]), int(body["cols"]))

    def handle_close(self, channel: int, body: dict[str, Any]) -> None:
        listener = self.listeners.pop(channel, None)
        if listener is not None:
            for waiting in listener.close():
                self.error(waiting, "the listener was closed", "forward_failed")
            return
        tunnel = self.tunnels.get(channel)
        if tunnel is not None:
            tunnel.host_closed()
            return
        session = self.sessions.get(channel)
        if session is None:
            return
        session.acknowledged = True
        if session.finished:
            self.sessions.pop(channel, None)
        self._maybe_power_off()

    def handle_forward(self, channel: int, body: dict[str, Any]) -> None:
        port = int(body["port"])
        transport = str(body.get("protocol") or "tcp")
        if not 0 < port < 65536 or transport not in ("tcp", "udp"):
            raise ProtocolError(f"invalid forward target {port}/{transport}")
        if channel in self.tunnels or channel == protocol.CONTROL_CHANNEL:
            raise ProtocolError(f"channel {channel} is already in use")
        self.tunnels[channel] = Tunnel(
            self.loop,
            self.send,
            channel,
            port,
            transport,
            self._tunnel_closed,
        )

    def handle_listen(self, channel: int, body: dict[str, Any]) -> None:
        """A unix socket at ``path`` in the container whose connections go to the host."""
        if not os.path.ismount(container_root.ROOT):
            raise system.SystemError_("the container root is not prepared yet")
        if self.workload is not None:
            raise system.SystemError_("sockets must be bound before the workload starts")
        if channel in self.listeners or channel in self.tunnels:
            raise ProtocolError(f"channel {channel} is already in use")
        mode = body.get("mode", 0o660)
        if type(mode) is not int or not 0 <= mode <= 0o777:
            raise ProtocolError(f"invalid socket mode {mode!r}")
        sock = listen.bind_inside(container_root.ROOT, str(body["path"]), mode)
        self.listeners[channel] = listen.Listener(
            self.loop, self.send, channel, sock, self._tunnel_opened, self._tunnel_closed
        )
        self.reply(channel, MsgType.OK, {})

    def handle_accept(self, channel: int, body: dict[str, Any]) -> None:
        listener = self.listeners.get(int(body["listener"]))
        if listener is None:
            raise ProtocolError(f"no listener on channel {body['listener']}")
        if channel in self.tunnels or channel in self.listeners:
            raise ProtocolError(f"channel {channel} is already in use")
        listener.want(channel)

    def _tunnel_opened(self, tunnel: Tunnel) -> None:
        self.tunnels[tunnel.channel] = tunnel
        if self.port is not None and self.port.congested:
            tunnel.set_paused(True)

    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        self.tunnels.pop(tunnel.channel, None)

    def handle_prepare(self, channel: int, body: dict[str, Any]) -> None:
        result = container_root.prepare(body, self.address)
        self.maintenance = body.get("maintenance") is True
        self.reply(channel, MsgType.OK, result)

    def handle_mount(self, channel: int, body: dict[str, Any]) -> None:
        if self.workload is not None:
            # The workload's mount namespace is its own from then on (and its files could
            # change under the agent's feet while it resolves the target).
            raise system.SystemError_("mounts must be added before the workload starts")
        self.reply(channel, MsgType.OK, container_root.mount_into_root(body))

    def handle_set_time(self, channel: int, body: dict[str, Any]) -> None:
        system.set_clock(int(body["unix_ns"]))
        self.reply(channel, MsgType.OK, {"unix_ns": time.time_ns()})

    def handle_overlay_config(self, channel: int, body: dict[str, Any]) -> None:
        """Reconfigures the interface: its MAC (a restored clone's own), then its address.

        A body with only "mac" changes the MAC and keeps the address; without "mac"
        the address (default or given) is applied as before.
        """
        interface = str(body.get("interface") or "eth0")
        mac = str(body.get("mac") or "")
        # The boot-time setup runs in the background; it must not race this change.
        self._finish_background()
        if mac:
            system.set_mac(mac, interface)
        if body.get("address") or not mac:
            self.networking.forget(interface)
            address = str(body.get("address") or DEFAULT_ADDRESS)
            gateway = str(body.get("gateway") or DEFAULT_GATEWAY)
            commands = [["ip", "addr", "flush", "dev", interface]]
            commands += system.network_commands(address, gateway, interface)
            system.run_script(commands)
            self.address = address.split("/")[0]
        reply: dict[str, Any] = {"address": self.address}
        if mac:
            reply["mac"] = mac
        self.reply(channel, MsgType.OK, reply)

    def handle_network(self, channel: int, body: dict[str, Any]) -> None:
        """The container's whole network state (docs/NETWORKS.md), applied idempotently."""
        # The boot-time eth0 setup runs in the background; it must not race this change.
        self._finish_background()
        reply = self.networking.apply(body)
        hosts = body.get("hosts")
        if isinstance(hosts, dict) and isinstance(hosts.get("address"), str):
            self.address = hosts["address"]  # what RUN's /etc/hosts names the container
        self.reply(channel, MsgType.OK, reply)

    def _finish_background(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for pid in list(self.background):
            while time.monotonic() < deadline:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # collected by reap() already
                    self.background.discard(pid)
                    break
                if done:
                    self._background_done(pid, status)
                    break
                time.sleep(0.005)

    def handle_stats(self, channel: int, body: dict[str, Any]) -> None:
        running = self.workload is not None and self.workload.exit_code is None
        pid_ns = self.isolation.pid_ns() if running else ""
        figures: dict[str, Any] = dict(system.collect_stats(pid_ns))
        if body.get("processes"):
            figures["processes"] = system.list_processes(pid_ns)
        self.reply(channel, MsgType.STATS, figures)

    def handle_resources(self, channel: int, body: dict[str, Any]) -> None:
        """New limits for the container's cgroup (husk-runtime update); replies with the
        group's files as they are then."""
        if self.isolation.settings.cgroup_procs_fd is None:
            raise system.SystemError_("this container has no cgroup of its own to update")
        limits_body = cgroup2.check(body.get("cgroup") or {})
        self.reply(channel, MsgType.OK, {"cgroup": cgroup2.apply(limits_body)})

    def handle_rehearse(self, channel: int, body: dict[str, Any]) -> None:
        """A start run and undone in an idle pooled VM (see rehearsal)."""
        self.reply(channel, MsgType.OK, rehearsal.rehearse(self, body))

    def handle_shutdown(self, channel: int, body: dict[str, Any]) -> None:
        self.reply(channel, MsgType.OK, {})
        self.shutdown()

    def shutdown(self) -> None:
        if self._shutting_down:
            return
        self._shutting_down = True
        for session in self.sessions.values():
            if session.exit_code is None:
                session.signal(signal.SIGKILL)
        if self.port is not None:
            self.port.flush_blocking(_SHUTDOWN_GRACE)
        log("powering off")
        system.power_off()

    def handle_wireguard(self, channel: int, body: dict[str, Any]) -> None:
        from husk.guest.agent import wireguard  # only VMs that join an overlay load it

        self.reply(channel, MsgType.OK, wireguard.handle(body))

    HANDLERS = {
        MsgType.HELLO: handle_hello,
        MsgType.RUN: handle_run,
        MsgType.EXEC: handle_exec,
        MsgType.SIGNAL: handle_signal,
        MsgType.ARCHIVE: handle_archive,
        MsgType.STDIN_EOF: handle_stdin_eof,
        MsgType.STDIN_DISK: handle_stdin_disk,
        MsgType.RESIZE: handle_resize,
        MsgType.CLOSE: handle_close,
        MsgType.FORWARD: handle_forward,
        MsgType.LISTEN: handle_listen,
        MsgType.ACCEPT: handle_accept,
        MsgType.PREPARE: handle_prepare,
        MsgType.MOUNT: handle_mount,
        MsgType.SET_TIME: handle_set_time,
        MsgType.OVERLAY_CONFIG: handle_overlay_config,
        MsgType.NETWORK: handle_network,
        MsgType.STATS: handle_stats,
        MsgType.SHUTDOWN: handle_shutdown,
        MsgType.WIREGUARD: handle_wireguard,
        MsgType.RESOURCES: handle_resources,
        MsgType.REHEARSE: handle_rehearse,
    }


def _wait_for_modules() -> None:
    try:
        with open(MODULES_PID_FILE) as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _set_clock_from_cmdline(cmdline: dict[str, str]) -> None:
    # The host's wall clock when it started QEMU, plus how long we have been up.
    stamp = cmdline.get("husk.boottime")
    if stamp and stamp.isdigit():
        system.set_clock(int(stamp) + time.clock_gettime_ns(time.CLOCK_BOOTTIME))


def _open_port(agent: Agent, loop: Loop) -> Port:
    deadline = time.monotonic() + _PORT_WAIT
    while True:
        path = find_port(AGENT_PORT_NAME)
        if path is not None and os.path.exists(path):
            return Port(loop, path, agent.on_frame, agent.on_bad_frame, agent.on_congestion)
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-serial port {AGENT_PORT_NAME} never appeared")
        time.sleep(0.01)


def boot() -> None:
    system.run_script(EARLY_MOUNTS, check=False)
    cmdline = system.kernel_cmdline()
    _set_clock_from_cmdline(cmdline)
    loop = Loop()
    agent = Agent(loop)
    loop.on_signal(signal.SIGCHLD, agent.reap)
    _wait_for_modules()
    system.report_small_free_blocks()
    system.drop_loaded_module_files()  # after: its frees wake the reporting up
    agent.networking.scan()  # the LAN NICs still have their boot MACs
    agent.networking.settle_lans()
    agent.networking.settle_egress()
    address = cmdline.get("husk.ip", DEFAULT_ADDRESS)
    gateway = cmdline.get("husk.gw", DEFAULT_GATEWAY)
    agent.address = address.split("/")[0]
    setup = system.spawn_script(system.network_commands(address, gateway))
    agent.background.add(setup)
    if (address, gateway) == (DEFAULT_ADDRESS, DEFAULT_GATEWAY):
        agent.boot_network = setup  # egress as NETWORK means it, once this succeeds
    agent.isolation.setup()
    system.scan_disks()
    agent.port = _open_port(agent, loop)
    log(f"ready after {time.clock_gettime_ns(time.CLOCK_BOOTTIME) / 1e9:.2f}s of uptime")
    agent.reap()
    loop.run_forever()


def main() -> None:
    try:
        boot()
    except BaseException as exc:  # PID 1 must never exit: the kernel would panic
        log(f"fatal: {exc!r}; powering off")
        try:
            system.power_off()
        finally:
            while True:
                time.sleep(3600)
