"""The QEMU backend: ``qemu-system-x86_64 -M microvm``, direct kernel boot, QMP control.

One VM keeps everything in its private state directory (0700)::

    machine.json   what :meth:`QemuMachine.attach` needs after a daemon restart
    qmp.sock       QMP monitor (QEMU listens)
    agent.sock     the guest agent's virtio-serial port (QEMU listens)
    console.log    the guest's serial console (console.log.1: the previous MiB)
    qemu.log       QEMU's own stdout and stderr
    network.log    slirp4netns's output
    root/          empty; QEMU's jail root is mounted on it in QEMU's namespace only

The host binds both sockets itself and hands the listening descriptors to QEMU,
so a client can connect the moment QEMU is spawned, with no polling for a path.
QEMU runs in its own session: it outlives the daemon, and a later daemon finds
it again through ``machine.json`` (pid, process start time, socket paths).

QEMU is confined (:mod:`husk.vm.jail`): its own uid, no capabilities, a minimal
root, its own namespaces and cgroup. It therefore opens no file of the daemon by
name: disks and the console log are inherited descriptors (``-add-fd`` fd sets),
guest RAM backing files are memfds opened through ``/proc/self/fd``. Its user-mode
network lives in its own network namespace, with slirp4netns as the way out
(:mod:`husk.vm.network`). console.log is capped and rotated (:meth:`rotate_console`).

Snapshots (templates, issue 6) are saved and restored through descriptors handed
over QMP (``getfd`` then ``migrate fd:NAME``; ``-incoming defer`` then
``migrate-incoming fd:NAME``), because the seccomp sandbox forbids QEMU to spawn
``exec:`` helpers or to open files it was not given.

The command line itself is built by :mod:`husk.vm.qemu_argv` (a pure function);
this module runs and controls the process. :class:`QemuBackend` is what the
provisioning layer gets injected; it never names :class:`QemuMachine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from husk import paths, settings
from husk.errors import GuestError, InvalidArgument
from husk.fileio import write_json_atomic
from husk.tools import find_tool
from husk.vm import jail, network
from husk.vm.accel import static_choice
from husk.vm.bootimages import BootImages
from husk.vm.machine import (
    DiskConfig,
    EventHandler,
    MachineBackend,
    MachineConfig,
    MemoryFile,
    NetConfig,
    RestorableMachine,
    ShareConfig,
    VirtualMachine,
    host_tsc_khz,
)
from husk.vm.processes import kill_if_same, process_start_ticks
from husk.vm.qemu_argv import CONSOLE_LOG, build_command, default_cpu_model

QEMU_ENV = settings.HUSK_QEMU
QEMU_DEFAULT = "qemu-system-x86_64"
STATE_FILE = "machine.json"
STATE_FORMAT = 1
QMP_SOCKET = "qmp.sock"
AGENT_SOCKET = "agent.sock"
QEMU_LOG = "qemu.log"
JAIL_ROOT = "root"
"""Empty directory in the state dir that QEMU's new root (a tmpfs) is mounted on."""

QMP_CONNECT_TIMEOUT = 10.0
SNAPSHOT_TIMEOUT = 120.0
SNAPSHOT_FD_NAME = "husk-snapshot"
EGRESS_EXIT_FD_NAME = "husk-egress-exit"
"""The write end of the exit pipe of a slirp4netns started on a running VM, held by QEMU."""
# cache mode of -drive -> (cache.direct, cache.no-flush) of its file node
_CACHE_FLAGS = {
    "writeback": (False, False),
    "writethrough": (False, False),
    "none": (True, False),
    "directsync": (True, False),
    "unsafe": (False, True),
}
# QEMU throttles migration to 32 MiB/s by default; a paused VM saved to a file has no
# guest to protect from the copy, so let it run at disk speed.
SNAPSHOT_BANDWIDTH = 1 << 40
_MIGRATION_POLL = 0.005
_MIGRATION_DONE = ("completed", "failed", "cancelled")
QMP_COMMAND_TIMEOUT = 5.0
KILL_TIMEOUT = 5.0
_DYING_GRACE = 1.0

# A guest can make QEMU emit events (BLOCK_IO_ERROR per failed request): keep the latest.
MAX_RECORDED_EVENTS = 256
CONSOLE_MAX_BYTES = 1 << 20
"""console.log is rotated to console.log.1 beyond this (the guest chooses what it writes)."""
CONSOLE_CHECK_INTERVAL = 0.5
QEMU_LOG_KEPT = 64 * 1024
"""Bytes of qemu.log kept when it passes CONSOLE_MAX_BYTES: its last lines, which a
failure report quotes."""
OLD_CONSOLE_LOG = "console.log.1"

_PANIC_MARKER = b"Kernel panic - not syncing"
_CONSOLE_SCAN_LIMIT = 1 << 20
_SOCKET_PATH_MAX = 107
_T = TypeVar("_T")

# qemu.qmp logs every lost connection at error level; a dead VM is reported by husk itself.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
logging.getLogger("qemu.qmp").propagate = False


def qemu_binary() -> str:
    name = settings.qemu_command() or QEMU_DEFAULT
    found = find_tool(name)
    if found is None:
        raise GuestError(f"{name} not found on PATH: install the qemu-system-x86 package")
    return found


_version_cache: dict[str, str] = {}


def qemu_version(binary: str | None = None) -> str:
    """e.g. "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"."""
    binary = binary or qemu_binary()
    cached = _version_cache.get(binary)
    if cached is None:
        try:
            out = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as err:
            raise GuestError(f"cannot run {binary} --version: {err}") from err
        match = re.search(r"version\s+(\S+(?:\s+\([^)]*\))?)", out)
        cached = _version_cache[binary] = match.group(1) if match else out.strip()
    return cached


def config_to_json(config: MachineConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))  # type: ignore[no-any-return]


def config_from_json(data: dict[str, Any]) -> MachineConfig:
    net = data.get("net")
    return MachineConfig(
        kernel=Path(data["kernel"]),
        initrd=Path(data["initrd"]),
        state_dir=Path(data["state_dir"]),
        cpus=int(data["cpus"]),
        memory_mib=int(data["memory_mib"]),
        cmdline_extra=[str(word) for word in data["cmdline_extra"]],
        disks=[
            DiskConfig(
                Path(d["path"]),
                d["serial"],
                bool(d["readonly"]),
                d["cache"],
                int(d["create_size"]) if d.get("create_size") is not None else None,
            )
            for d in data["disks"]
        ],
        shares=[
            ShareConfig(s["tag"], Path(s["path"]), bool(s["readonly"])) for s in data["shares"]
        ],
        net=NetConfig(net["mac"]) if net else None,
        accel=data["accel"],
        cpu_model=data.get("cpu_model"),
        memory_file=_memory_file_from_json(data.get("memory_file")),
        lan_slots=int(data.get("lan_slots", 0)),
        # The LAN descriptors belonged to the process that spawned QEMU.
        egress=bool(data.get("egress", True)),
    )


def _memory_file_from_json(data: dict[str, Any] | None) -> MemoryFile | None:
    if not data:
        return None
    # The descriptor belonged to the process that spawned QEMU.
    return MemoryFile(Path(data["path"]), bool(data["shared"]))


def _tail(path: Path, lines: int, limit: int = 8192) -> list[str]:
    try:
        with path.open("rb") as stream:
            stream.seek(0, os.SEEK_END)
            size = stream.tell()
            stream.seek(max(0, size - limit))
            data = stream.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    cleaned = [re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", line).rstrip() for line in text.splitlines()]
    return [line for line in cleaned if line.strip()][-lines:]


def _create_private_file(path: Path, content: bytes = b"") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(8)
    except BaseException:
        listener.close()
        raise
    return listener


def open_disk(path: Path, readonly: bool) -> list[int]:
    """The descriptors of one fd set QEMU opens a disk from.

    QEMU's file driver opens an image read-only first and reopens it read-write
    once a writer attaches; each open takes a descriptor of the matching access
    mode from the set, so a writable disk needs both.
    """
    fds: list[int] = []
    try:
        if not readonly:
            fds.append(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as err:
        for fd in fds:
            os.close(fd)
        raise GuestError(f"cannot open disk {path}: {err}") from err
    return fds


def _create_scratch_disks(disks: list[DiskConfig]) -> None:
    """Creates each scratch disk (``create_size``) as an empty sparse file, owner-only.

    Empty on every boot and restore: nothing a previous VM left in it is read again, and
    a sparse file costs neither disk space nor memory until something is written.
    """
    for disk in disks:
        if disk.create_size is None:
            continue
        try:
            paths.ensure_private_dir(disk.path.parent)
            fd = os.open(disk.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, disk.create_size)
            finally:
                os.close(fd)
        except OSError as err:
            raise GuestError(f"cannot create disk {disk.serial} at {disk.path}: {err}") from err


def _make_owner_only(path: Path) -> None:
    """Disks are the container's data: nobody but their owner may read them."""
    info = path.stat()
    if info.st_uid == os.geteuid() and info.st_mode & 0o077:
        os.chmod(path, info.st_mode & 0o700)


# Children this process spawned and then detached from: reaped when they exit, or
# handed back to a machine that attaches to them again from this same process.
_detached_children: dict[int, subprocess.Popen[bytes]] = {}

_PR_SET_THP_DISABLE = 41


@functools.cache
def _disable_transparent_hugepages() -> None:
    """Keeps QEMU's guest RAM in 4 KiB pages (the setting is inherited across exec).

    QEMU asks for huge pages on guest RAM; with them every touched byte makes 2 MiB
    resident, which roughly doubles an idle guest's footprint on the host.
    """

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        logging.getLogger(__name__).debug(
            "prctl(PR_SET_THP_DISABLE) failed: errno %d", ctypes.get_errno()
        )


def _reap_detached_children() -> None:
    for pid, child in list(_detached_children.items()):
        if child.poll() is not None:
            del _detached_children[pid]


class QemuMachine:
    """One QEMU process and its state directory. Implements :class:`VirtualMachine`."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self._state_dir = config.state_dir
        self._popen: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._exited = False
        self._returncode: int | None = None
        self._exit_future: asyncio.Future[None] | None = None
        self._qmp: Any = None
        self._event_task: asyncio.Task[None] | None = None
        self.events: deque[tuple[str, dict[str, Any]]] = deque(maxlen=MAX_RECORDED_EVENTS)
        self._event_handler: EventHandler | None = None
        self._console_task: asyncio.Task[None] | None = None
        self.shutdown_reason: str | None = None
        self._panic: str | None = None
        self._console_offset = 0
        self._console_carry = b""
        self._accel: str = config.accel
        self.accel_reason = ""
        self.started_at: float | None = None
        """time.monotonic() when QEMU was spawned (None after attach)."""
        self._confinement: jail.Confinement | None = None
        self._egress: network.Egress | None = None
        self._own_network = False
        """QEMU runs in a network namespace of its own (egress can be switched)."""
        self._egress_possible = False
        """slirp4netns can serve this VM (the jail found a usable tap device)."""
        self._userns = False
        self._boot_images: BootImages | None = None
        """A cold boot's private kernel and initramfs, until the guest runs."""

    # -- paths and identity -------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    @property
    def agent_socket(self) -> Path:
        return self._state_dir / AGENT_SOCKET

    @property
    def qmp_socket(self) -> Path:
        return self._state_dir / QMP_SOCKET

    @property
    def console_log(self) -> Path:
        return self._state_dir / CONSOLE_LOG

    @property
    def qemu_log(self) -> Path:
        return self._state_dir / QEMU_LOG

    @property
    def state_file(self) -> Path:
        return self._state_dir / STATE_FILE

    @property
    def pid(self) -> int:
        if self._pid is None:
            raise GuestError("the VM has not been booted")
        return self._pid

    @property
    def accel(self) -> str:
        return self._accel

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once reaped (negative: killed by that signal)."""
        return self._returncode

    # -- boot ---------------------------------------------------------------------------

    async def boot(self, *, timeout: float = QMP_CONNECT_TIMEOUT) -> None:
        """Spawns QEMU and connects QMP; raises GuestError if QEMU fails within ``timeout``."""
        await self._spawn(timeout=timeout)

    async def _spawn(
        self, *, timeout: float, incoming: bool = False, console_prefix: bytes = b""
    ) -> None:
        if self._pid is not None:
            raise GuestError(f"the VM in {self._state_dir} was already booted")
        _reap_detached_children()
        _create_scratch_disks(self.config.disks)
        self._check_inputs()
        accel, self.accel_reason = await self._resolve_accel()
        self._accel = accel
        binary = qemu_binary()
        paths.ensure_private_dir(self._state_dir)
        for stale in (self.state_file, self.qmp_socket, self.agent_socket, self.old_console_log):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        _create_private_file(self.console_log, console_prefix)
        self._console_offset = len(console_prefix)
        _create_private_file(self.qemu_log)
        for disk in self.config.disks:
            _make_owner_only(disk.path)
        boot_time_ns = time.time_ns()
        memory = self.config.memory_file
        memory_fds = (memory.fd,) if memory is not None and memory.fd is not None else ()
        if memory is None and not incoming:
            try:
                self._boot_images = await asyncio.to_thread(
                    BootImages.copy, self.config.kernel, self.config.initrd
                )
            except OSError as err:
                raise GuestError(f"cannot copy the guest kernel and initramfs: {err}") from err
        boot_images = self._boot_images
        handed: list[int] = []  # this process's copies of what QEMU inherits
        try:
            confinement = self._confine(binary, accel)
        except OSError as err:
            self.release_boot_images()
            raise GuestError(f"cannot confine QEMU for {self._state_dir}: {err}") from err
        self._confinement = confinement
        exit_read = exit_write = -1
        try:
            disk_fds = []
            for disk in self.config.disks:
                disk_fds.append(open_disk(disk.path, disk.readonly))
                handed += disk_fds[-1]
            console_fd = os.open(
                self.console_log, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
            )
            handed.append(console_fd)
            self._own_network = confinement.own_network and self.config.net is not None
            self._egress_possible = self._own_network and confinement.egress
            self._userns = confinement.user_namespace
            if not self._own_network and not self.config.egress and self.config.net is not None:
                logging.getLogger(__name__).warning(
                    "QEMU shares the host's network namespace: egress cannot be withheld"
                )
            if self._egress_possible and self.config.egress:
                # slirp4netns exits when QEMU, the only holder of the write end, is gone.
                exit_read, exit_write = os.pipe()
                handed.append(exit_write)
            qmp_listener = _listen(self.qmp_socket)
            agent_listener = _listen(self.agent_socket)
            try:
                command = build_command(
                    self.config,
                    binary=binary,
                    accel=accel,
                    qmp_fd=qmp_listener.fileno(),
                    agent_fd=agent_listener.fileno(),
                    boot_time_ns=boot_time_ns,
                    tsc_khz=host_tsc_khz() if accel == "tcg" else None,
                    incoming=incoming,
                    disk_fds=disk_fds,
                    console_fd=console_fd,
                    boot_image_fds=(
                        None
                        if boot_images is None
                        else (boot_images.kernel_fd, boot_images.initrd_fd)
                    ),
                )
                _disable_transparent_hugepages()
                inherited = (
                    qmp_listener.fileno(),
                    agent_listener.fileno(),
                    *memory_fds,
                    *(boot_images.fds if boot_images is not None else ()),
                    *self.config.lan_fds,
                    *handed,
                    *confinement.inherited_fds(),
                )
                with self.qemu_log.open("ab") as log:
                    self.started_at = time.monotonic()
                    self._popen = subprocess.Popen(
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        pass_fds=inherited,
                        start_new_session=True,
                        umask=0o077,
                        preexec_fn=confinement.preexec(),
                    )
            finally:
                qmp_listener.close()
                agent_listener.close()
        except (OSError, subprocess.SubprocessError) as err:
            if exit_read >= 0:
                os.close(exit_read)
            self._release_confinement()
            reason = " / ".join(_tail(self.qemu_log, 3)) or str(err)
            raise GuestError(f"cannot start {binary}: {reason}") from err
        finally:
            for fd in handed:
                os.close(fd)
            if self._popen is None:
                self.release_boot_images()
            confinement.spawned()
        self._pid = self._popen.pid
        self._pidfd = os.pidfd_open(self._pid)
        try:
            if exit_read >= 0:
                try:
                    self._egress = network.start(
                        self._pid,
                        exit_read,
                        self._state_dir / network.NETWORK_LOG,
                        userns=confinement.user_namespace,
                    )
                finally:
                    os.close(exit_read)
                confinement.join(self._egress.pid)
            self._save_state(command, boot_time_ns)
            await self._connect_qmp(timeout)
            if self._egress is not None:
                try:
                    await self._until_exit(
                        self._egress.wait_ready(), network.READY_TIMEOUT, "slirp4netns"
                    )
                except GuestError as err:
                    if not confinement.user_namespace:
                        raise
                    # Without root the jail is best effort: no egress, but the VM runs.
                    logging.getLogger(__name__).warning("the VM has no network: %s", err)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.kill()
            raise

    def _confine(self, binary: str, accel: str) -> jail.Confinement:
        config = self.config
        _cpus, memory_mib = config.resources()
        return jail.confine(
            name=self._state_dir.name[:32],
            mount_point=self._state_dir / JAIL_ROOT,
            binary=binary,
            read_only=[config.kernel, config.initrd],
            shares=[(share.path, share.readonly) for share in config.shares],
            kvm=accel == "kvm",
            memory_mib=memory_mib,
            resolv_conf=network.RESOLV_CONF if config.net is not None else None,
            host_owned_shares=any(share.security_model == "none" for share in config.shares),
        )

    def release_boot_images(self) -> None:
        """Frees this VM's copies of the kernel and initramfs (see :mod:`husk.vm.bootimages`).

        Call once the guest runs (its agent answered); QEMU never reads them again.
        Idempotent, and a no-op for VMs without copies (restored, attached, templates).
        """
        images, self._boot_images = self._boot_images, None
        if images is not None:
            images.release()

    def _release_confinement(self) -> None:
        """Once QEMU is gone: ends slirp4netns, removes the cgroup (idempotent)."""
        egress, self._egress = self._egress, None
        if egress is not None:
            egress.stop()
            if egress.popen is not None and egress.popen.poll() is None:
                _detached_children[egress.pid] = egress.popen
        confinement = self._confinement
        if confinement is not None and confinement.release():
            self._confinement = None

    def _check_inputs(self) -> None:
        config = self.config
        for what, path in (("kernel", config.kernel), ("initrd", config.initrd)):
            if not path.is_file():
                raise InvalidArgument(f"guest {what} {path} does not exist or is not a file")
            if not os.access(path, os.R_OK):
                raise InvalidArgument(f"guest {what} {path} is not readable")
        for disk in config.disks:
            if not disk.path.is_file():
                raise InvalidArgument(f"disk {disk.serial}: {disk.path} is not a file")
        for share in config.shares:
            if not share.path.is_dir():
                raise InvalidArgument(f"share {share.tag}: {share.path} is not a directory")
        longest = max(len(str(self._state_dir / name)) for name in (QMP_SOCKET, AGENT_SOCKET))
        if longest > _SOCKET_PATH_MAX:
            raise InvalidArgument(
                f"VM state directory {self._state_dir} is too long for a unix socket path "
                f"({longest} > {_SOCKET_PATH_MAX} bytes)"
            )

    async def _resolve_accel(self) -> tuple[str, str]:
        if self.config.accel != "auto":
            return self.config.accel, "requested by the caller"
        # The provisioning layer (husk.sandbox.accel) resolves "auto", probing KVM if it
        # must; a machine made directly only takes a choice that needs no probe boot.
        choice = static_choice()
        if choice is None:
            raise InvalidArgument(
                'accelerator "auto" needs a KVM probe boot: let husk.sandbox choose it, '
                "or ask for kvm or tcg"
            )
        return choice.name, choice.reason

    def _save_state(self, command: list[str], boot_time_ns: int) -> None:
        assert self._pid is not None
        write_json_atomic(
            self.state_file,
            {
                "format": STATE_FORMAT,
                "pid": self._pid,
                "start_ticks": process_start_ticks(self._pid),
                "accel": self._accel,
                "accel_reason": self.accel_reason,
                "boot_time_ns": boot_time_ns,
                "command": command,
                "config": config_to_json(self.config),
                "jail": self._confinement.to_json() if self._confinement is not None else None,
                "egress": self._egress.to_json() if self._egress is not None else None,
                "network": self._network_json(),
            },
        )

    def _network_json(self) -> dict[str, bool]:
        return {
            "own_network": self._own_network,
            "egress_possible": self._egress_possible,
            "user_namespace": self._userns,
        }

    @classmethod
    async def attach(cls, state_dir: Path, *, timeout: float = QMP_CONNECT_TIMEOUT) -> QemuMachine:
        """Finds the QEMU that ``state_dir`` records and reconnects to its monitor."""
        state_file = state_dir / STATE_FILE
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"format {state.get('format')!r}, expected {STATE_FORMAT}")
            config = config_from_json(state["config"])
            pid = int(state["pid"])
            start_ticks = state["start_ticks"]
        except FileNotFoundError:
            raise GuestError(f"no VM recorded in {state_dir} ({STATE_FILE} is missing)") from None
        except (OSError, ValueError, KeyError, TypeError, InvalidArgument) as err:
            raise GuestError(f"cannot read VM state {state_file}: {err}") from err
        machine = cls(config)
        machine._state_dir = state_dir
        machine._accel = state.get("accel", config.accel)
        machine.accel_reason = state.get("accel_reason", "")
        if process_start_ticks(pid) != start_ticks:
            raise GuestError(f"the VM recorded in {state_dir} (pid {pid}) is no longer running")
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise GuestError(
                f"the VM recorded in {state_dir} (pid {pid}) is no longer running"
            ) from None
        # The pid could have been reused between the check and pidfd_open.
        if process_start_ticks(pid) != start_ticks:
            os.close(pidfd)
            raise GuestError(f"the VM recorded in {state_dir} (pid {pid}) is no longer running")
        machine._pid, machine._pidfd = pid, pidfd
        _reap_detached_children()
        machine._popen = _detached_children.pop(pid, None)
        with contextlib.suppress(KeyError, TypeError, ValueError):
            machine._confinement = jail.Confinement.from_json(state["jail"])
        with contextlib.suppress(KeyError, TypeError, ValueError):
            machine._egress = network.Egress.from_json(state["egress"])
            machine._egress.popen = _detached_children.pop(machine._egress.pid, None)
        recorded = state.get("network")
        if not isinstance(recorded, dict):
            # Recorded before egress could be switched: the jail's record says enough.
            jailed = state.get("jail") if isinstance(state.get("jail"), dict) else {}
            own = jailed.get("own_network") is True and config.net is not None
            recorded = {
                "own_network": own,
                "egress_possible": own,
                "user_namespace": jailed.get("user_namespace") is True,
            }
        machine._own_network = recorded.get("own_network") is True
        machine._egress_possible = recorded.get("egress_possible") is True
        machine._userns = recorded.get("user_namespace") is True
        await machine._connect_qmp(timeout)
        return machine

    @staticmethod
    def kill_recorded(state_dir: Path) -> bool:
        """SIGKILLs the QEMU that ``state_dir`` records, if it still runs; no monitor needed.

        For VMs nobody will use again whose monitor may be unreachable. True if
        a process was signalled.
        """
        try:
            state = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
            pid, start_ticks = int(state["pid"]), state["start_ticks"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return kill_if_same(pid, start_ticks)

    # -- QMP ----------------------------------------------------------------------------

    async def _connect_qmp(self, timeout: float) -> None:
        client = QMPClient(f"husk-{self._state_dir.name}")
        try:
            await self._until_exit(client.connect(str(self.qmp_socket)), timeout, "QEMU's monitor")
        except (QMPError, OSError) as err:
            await self._raise_if_dying()
            raise GuestError(
                f"cannot connect to QEMU's monitor at {self.qmp_socket}: {err}"
            ) from err
        listener = EventListener()
        client.register_listener(listener)
        self._qmp = client
        self._event_task = asyncio.create_task(self._record_events(listener))
        self._console_task = asyncio.create_task(self._cap_console())

    async def _record_events(self, listener: Any) -> None:
        async for event in listener:
            name = str(event["event"])
            data = dict(event.get("data") or {})
            self.events.append((name, data))
            if name == "GUEST_PANICKED":
                self._panic = self._panic or "reported by pvpanic"
            elif name == "SHUTDOWN":
                self.shutdown_reason = str(data.get("reason", ""))
            self._deliver_event(name, data)

    def on_event(self, handler: EventHandler | None) -> None:
        self._event_handler = handler
        for name, data in list(self.events):
            self._deliver_event(name, data)

    def _deliver_event(self, name: str, data: dict[str, Any]) -> None:
        if self._event_handler is None:
            return
        try:
            self._event_handler(name, data)
        except Exception:
            logging.getLogger(__name__).exception("the handler of VM event %s failed", name)

    async def monitor_command(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float = QMP_COMMAND_TIMEOUT,
    ) -> Any:
        """Runs one QMP command and returns its reply (GuestError on failure or timeout)."""
        return await self._execute(command, arguments, timeout=timeout)

    async def _execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float
    ) -> Any:
        self.check_alive()
        if self._qmp is None:
            raise GuestError(f"not connected to QEMU's monitor for {self._state_dir}")
        try:
            return await self._until_exit(
                self._qmp.execute(command, arguments), timeout, f"QEMU's monitor ({command})"
            )
        except ExecuteError as err:
            raise GuestError(f"QEMU refused {command}: {err.error.error.desc}") from err
        except (QMPError, OSError, EOFError) as err:
            await self._raise_if_dying()
            raise GuestError(f"QEMU's monitor failed during {command}: {err!r}") from err

    def _release_pidfd(self) -> None:
        """Once QEMU has exited and been reaped, its pidfd has nothing more to say."""
        if not self._exited or self._pidfd is None:
            return
        self._stop_exit_watch()
        os.close(self._pidfd)
        self._pidfd = None

    async def _raise_if_dying(self) -> None:
        """A monitor that hangs up first is usually a QEMU on its way out: say why it died."""
        await self._wait_exit(_DYING_GRACE)
        self.check_alive()

    async def _close_qmp(self) -> None:
        for task in (self._event_task, self._console_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._event_task = self._console_task = None
        client, self._qmp = self._qmp, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), KILL_TIMEOUT)

    # -- process exit -------------------------------------------------------------------

    def _poll_exit(self) -> bool:
        if self._exited:
            return True
        if self._pidfd is None:
            return False
        if self._popen is not None:
            # Reaps our child: no zombie stays behind.
            code = self._popen.poll()
            if code is None:
                return False
            self._returncode = code
        else:
            # poll, not select: a daemon with many VMs holds descriptors above 1023.
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            if not poller.poll(0):
                return False
            # Attached in the process that spawned it: reap it here, with its status.
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(self._pid or -1, os.WNOHANG)
                if status or self._returncode is None:
                    self._returncode = os.waitstatus_to_exitcode(status)
        self._exited = True
        self.release_boot_images()
        self._release_confinement()
        return True

    def _exit_waiter(self) -> asyncio.Future[None]:
        """A future that completes when QEMU exits, shared by every waiter on this loop."""
        loop = asyncio.get_running_loop()
        future = self._exit_future
        if future is not None and future.get_loop() is loop and not future.cancelled():
            return future
        self._stop_exit_watch()
        future = loop.create_future()
        self._exit_future = future
        if self._poll_exit() or self._pidfd is None:
            future.set_result(None)
            return future
        pidfd = self._pidfd

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            self._poll_exit()
            if not future.done():
                future.set_result(None)

        loop.add_reader(pidfd, on_exit)
        return future

    def _stop_exit_watch(self) -> None:
        future, self._exit_future = self._exit_future, None
        if future is None:
            return
        loop = future.get_loop()
        if self._pidfd is not None and not loop.is_closed():
            loop.remove_reader(self._pidfd)
        if not future.done():
            # Waiters wake normally once QEMU is gone; a detach leaves them cancelled.
            if self._exited:
                future.set_result(None)
            else:
                future.cancel()

    async def _until_exit(self, awaitable: Awaitable[_T], timeout: float, what: str) -> _T:
        """Awaits ``awaitable`` unless QEMU exits or ``timeout`` passes first."""
        task: asyncio.Future[_T] = asyncio.ensure_future(awaitable)
        exited = self._exit_waiter()
        try:
            waiters: set[asyncio.Future[Any]] = {task, exited}
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if exited.done():
            raise GuestError(self._exit_message(f"while waiting for {what}"))
        raise GuestError(f"{what} did not answer within {timeout:.1f}s")

    async def _wait_exit(self, timeout: float) -> bool:
        if self._poll_exit():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exit_waiter()), timeout)
        return self._poll_exit()

    @property
    def old_console_log(self) -> Path:
        return self._state_dir / OLD_CONSOLE_LOG

    async def _cap_console(self) -> None:
        """Keeps console.log under CONSOLE_MAX_BYTES while the daemon watches this VM.

        A guest decides what it writes to its serial console, and console.log
        lives on /run (memory): beyond the cap the log moves to console.log.1
        (replacing the previous one) and console.log starts again empty. QEMU
        writes it with O_APPEND, so its next write lands at the new end.
        """
        while True:
            await asyncio.sleep(CONSOLE_CHECK_INTERVAL)
            with contextlib.suppress(OSError):
                if self.console_log.stat().st_size > CONSOLE_MAX_BYTES:
                    self.rotate_console()
            with contextlib.suppress(OSError):
                if self.qemu_log.stat().st_size > CONSOLE_MAX_BYTES:
                    self.trim_qemu_log()

    def trim_qemu_log(self) -> None:
        """Keeps only the last QEMU_LOG_KEPT bytes of qemu.log (QEMU's stderr, on /run).

        Some of QEMU's messages a guest can repeat at will (one that owns its kernel sends
        virtio-serial control messages naming no port: an error line each). QEMU writes
        with O_APPEND, so its next line lands at the new end."""
        with self.qemu_log.open("rb") as source:
            source.seek(-QEMU_LOG_KEPT, os.SEEK_END)
            tail = source.read()
        tail = tail[tail.find(b"\n") + 1 :]  # from a line's start
        os.truncate(self.qemu_log, 0)
        fd = os.open(self.qemu_log, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, b"[husk: earlier QEMU messages dropped]\n" + tail)
        finally:
            os.close(fd)

    def rotate_console(self) -> None:
        """Moves console.log's content to console.log.1 and empties console.log."""
        # Whatever is unscanned is scanned first: a panic line must not be missed.
        while self._panic is None:
            before = self._console_offset
            self._scan_console_for_panic()
            if self._console_offset == before:
                break
        staging = self._state_dir / f".{OLD_CONSOLE_LOG}.tmp"
        with self.console_log.open("rb") as source:
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb") as target:
                    shutil.copyfileobj(source, target, CONSOLE_MAX_BYTES)
            finally:
                os.replace(staging, self.old_console_log)
        # Lines written during the copy are lost; the cap is what matters here.
        os.truncate(self.console_log, 0)
        self._console_offset = 0

    def _scan_console_for_panic(self) -> str | None:
        if self._panic is not None:
            return self._panic
        try:
            with self.console_log.open("rb") as stream:
                stream.seek(self._console_offset)
                data = stream.read(_CONSOLE_SCAN_LIMIT)
        except OSError:
            return None
        if not data:
            return None
        self._console_offset += len(data)
        window = self._console_carry + data
        at = window.find(_PANIC_MARKER)
        if at < 0:
            self._console_carry = window[-len(_PANIC_MARKER) :]
            return None
        line = window[at:].split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()
        self._panic = line
        return line

    def _exit_message(self, context: str = "") -> str:
        panic = self._scan_console_for_panic()
        if panic is not None:
            summary = f"the guest kernel panicked ({panic})"
        elif self._returncode is None:
            summary = "QEMU exited"
        elif self._returncode < 0:
            summary = f"QEMU was killed by signal {-self._returncode}"
        else:
            summary = f"QEMU exited with status {self._returncode}"
        if self.shutdown_reason:
            summary += f" [{self.shutdown_reason}]"
        if context:
            summary += f" {context}"
        parts = [summary]
        qemu_said = _tail(self.qemu_log, 3)
        if qemu_said:
            parts.append("qemu: " + " / ".join(qemu_said))
        console = _tail(self.console_log, 3) or _tail(self.old_console_log, 3)
        parts.append(("console ends: " + " / ".join(console)) if console else "console is empty")
        parts.append(f"see {self._state_dir}")
        return "; ".join(parts)

    def check_alive(self) -> None:
        if self._pid is None:
            raise GuestError("the VM has not been booted")
        if self._poll_exit():
            raise GuestError(self._exit_message())
        panic = self._scan_console_for_panic()
        if panic is not None:
            raise GuestError(f"the guest kernel panicked ({panic}); see {self.console_log}")

    # -- control ------------------------------------------------------------------------

    async def status(self) -> str:
        if self._pid is None:
            return "created"
        if self._poll_exit():
            return "exited"
        reply = await self._execute("query-status", timeout=QMP_COMMAND_TIMEOUT)
        return str(reply["status"])

    async def pause(self) -> None:
        await self._execute("stop", timeout=QMP_COMMAND_TIMEOUT)

    async def resume(self) -> None:
        await self._execute("cont", timeout=QMP_COMMAND_TIMEOUT)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """Asks QEMU to quit; SIGKILL if it has not exited after ``timeout`` seconds."""
        if self._pid is None:
            return None
        deadline = time.monotonic() + timeout
        if not self._poll_exit() and self._qmp is not None:
            with contextlib.suppress(GuestError):
                await self._execute("quit", timeout=max(0.1, min(timeout, QMP_COMMAND_TIMEOUT)))
        if not await self._wait_exit(max(0.0, deadline - time.monotonic())):
            await self.kill()
        await self._close_qmp()
        self._release_pidfd()
        return self._returncode

    async def kill(self) -> None:
        if self._pidfd is None:
            return
        if not self._poll_exit():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            if not await self._wait_exit(KILL_TIMEOUT):
                raise GuestError(f"QEMU (pid {self._pid}) did not die within {KILL_TIMEOUT:.0f}s")
        await self._close_qmp()
        self._release_pidfd()

    async def wait(self, timeout: float | None = None) -> int | None:
        """QEMU's exit status once it exits; None if it still runs after ``timeout`` seconds.

        A QEMU that is not our child (found by :meth:`attach`) has an exit status
        nobody can read; it is then reported as 1 if the guest panicked, else 0.
        """
        if self._pid is None:
            raise GuestError("the VM has not been booted")
        if timeout is None:
            await asyncio.shield(self._exit_waiter())
        elif not await self._wait_exit(timeout):
            return None
        self._poll_exit()
        await self._close_qmp()
        self._release_pidfd()
        if self._returncode is not None:
            return self._returncode
        return 1 if self._scan_console_for_panic() is not None else 0

    async def detach(self) -> None:
        """Drops the monitor connection and leaves QEMU running."""
        await self._close_qmp()
        self._stop_exit_watch()
        if self._popen is not None and self._popen.poll() is None:
            _detached_children[self._popen.pid] = self._popen
        self._popen = None
        egress = self._egress
        if egress is not None and egress.popen is not None and egress.popen.poll() is None:
            _detached_children[egress.pid] = egress.popen
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    # -- resource use -------------------------------------------------------------------

    def rss_bytes(self) -> int:
        """Resident memory of the QEMU process."""
        try:
            resident_pages = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError) as err:
            raise GuestError(f"cannot read memory use of QEMU (pid {self.pid}): {err}") from err
        return resident_pages * os.sysconf("SC_PAGE_SIZE")

    def cpu_seconds(self) -> float:
        """User plus system CPU time QEMU has used."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks = int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError) as err:
            raise GuestError(f"cannot read CPU use of QEMU (pid {self.pid}): {err}") from err
        return ticks / os.sysconf("SC_CLK_TCK")

    # -- taking a pooled VM over -------------------------------------------------------

    async def replace_disk(self, index: int, path: Path) -> None:
        """Points the ``index``-th disk at another file of the same size, while running.

        The guest must not have the disk open (nothing mounted from it): it sees
        the new content from its next read. The serial, mode and cache stay.
        """
        try:
            current = self.config.disks[index]
        except IndexError:
            raise GuestError(f"the VM has no disk {index}") from None
        try:
            size, expected = path.stat().st_size, current.path.stat().st_size
        except OSError as err:
            raise GuestError(f"cannot attach {path}: {err}") from err
        if size != expected:
            raise GuestError(f"{path} is {size} bytes; disk {index} must stay {expected} bytes")
        _make_owner_only(path)
        drive = f"disk{index}"
        node = f"{drive}-file-{secrets.token_hex(4)}"
        direct, no_flush = _CACHE_FLAGS[current.cache]
        # A jailed QEMU cannot open the path: it gets the file as an fd set (both
        # access modes, as at boot). The set stays with the node that uses it.
        fdset = await self._add_fdset(open_disk(path, current.readonly))
        await self._execute(
            "blockdev-add",
            {
                "driver": "file",
                "node-name": node,
                "filename": f"/dev/fdset/{fdset}",
                "read-only": current.readonly,
                "cache": {"direct": direct, "no-flush": no_flush},
            },
            timeout=QMP_COMMAND_TIMEOUT,
        )
        try:
            # The file node the disk used goes away with its last reference.
            await self._execute(
                "blockdev-reopen",
                {
                    "options": [
                        {
                            "driver": "raw",
                            "node-name": f"{drive}-format",
                            "file": node,
                            "read-only": current.readonly,
                        }
                    ]
                },
                timeout=QMP_COMMAND_TIMEOUT,
            )
        except GuestError:
            with contextlib.suppress(GuestError):
                await self._execute(
                    "blockdev-del", {"node-name": node}, timeout=QMP_COMMAND_TIMEOUT
                )
            raise
        disks = list(self.config.disks)
        disks[index] = replace(current, path=path)
        self.config = replace(self.config, disks=disks)
        self._rewrite_state()

    async def _add_fdset(self, fds: list[int]) -> int:
        """Hands ``fds`` to QEMU as one new fd set (closing this process's copies); its id."""
        fdset: int | None = None
        try:
            for fd in fds:
                self._send_fd(fd)
                arguments = {} if fdset is None else {"fdset-id": fdset}
                reply = await self._execute("add-fd", arguments, timeout=QMP_COMMAND_TIMEOUT)
                fdset = int(reply["fdset-id"])
        finally:
            for fd in fds:
                os.close(fd)
        if fdset is None:
            raise GuestError("no descriptor to hand over")
        return fdset

    def move_state_dir(self, destination: Path) -> None:
        """Renames the state directory while QEMU runs (its sockets and logs move along)."""
        if destination.exists():
            raise GuestError(f"cannot move the VM to {destination}: it exists")
        try:
            os.rename(self._state_dir, destination)
        except OSError as err:
            raise GuestError(f"cannot move the VM to {destination}: {err}") from err
        old, self._state_dir = self._state_dir, destination
        # Disks kept in the state directory (the transfer ring) moved with it.
        disks = [
            replace(disk, path=destination / disk.path.relative_to(old))
            if disk.path.is_relative_to(old)
            else disk
            for disk in self.config.disks
        ]
        self.config = replace(self.config, state_dir=destination, disks=disks)
        self._rewrite_state()

    def _rewrite_state(self) -> None:
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise GuestError(f"cannot read VM state {self.state_file}: {err}") from err
        state["config"] = config_to_json(self.config)
        state["egress"] = self._egress.to_json() if self._egress is not None else None
        write_json_atomic(self.state_file, state)

    # -- egress -------------------------------------------------------------------------

    @property
    def egress(self) -> bool:
        """Whether slirp4netns serves the VM's network namespace right now."""
        return self._egress is not None and not self._egress.reap()

    async def set_egress(self, enabled: bool, *, timeout: float = network.READY_TIMEOUT) -> None:
        """Gives the running VM its way out (starts slirp4netns) or takes it away (ends it).

        Idempotent. Works on a VM found by :meth:`attach` too: the exit pipe's write end
        is handed to QEMU over its monitor (``getfd``), so the new slirp4netns still ends
        with QEMU, and its pid is recorded in machine.json for whoever stops the VM.
        """
        self.check_alive()
        if self.config.net is None:
            raise InvalidArgument(f"the VM in {self._state_dir} has no network device")
        if enabled == self.egress:
            return
        if not enabled:
            egress, self._egress = self._egress, None
            if egress is not None:
                egress.stop()
                deadline = time.monotonic() + network.KILL_TIMEOUT
                while not egress.reap():  # not our child: SIGKILLed, gone in a moment
                    if time.monotonic() > deadline:
                        raise GuestError(f"{network.SLIRP4NETNS} (pid {egress.pid}) did not end")
                    await asyncio.sleep(0.01)
            with contextlib.suppress(GuestError):
                await self._execute(
                    "closefd", {"fdname": EGRESS_EXIT_FD_NAME}, timeout=QMP_COMMAND_TIMEOUT
                )
            self._rewrite_state()
            return
        if not self._own_network:
            raise GuestError(
                "egress cannot be switched for this VM: QEMU shares the host's network "
                "namespace (its jail is disabled)"
            )
        if not self._egress_possible and os.geteuid() != 0 and self._own_network:
            # Rootless without a usable tun device: the container runs without a way
            # out (docs/SECURITY.md, rootless mode) rather than not at all.
            logging.getLogger(__name__).warning(
                "VM %s runs without egress: %s is not usable by this user "
                "(`husk system check` says how to allow it)",
                self._state_dir.name,
                jail.TUN_DEVICE,
            )
            return
        if not self._egress_possible:
            raise GuestError(
                f"this VM cannot get egress: {jail.TUN_DEVICE} was not usable when it started"
            )
        if self._egress is not None:  # exited on its own: forget it
            self._egress.stop()
            self._egress = None
        exit_read, exit_write = os.pipe2(os.O_CLOEXEC)
        try:
            self._send_fd(exit_write)
            await self._execute(
                "getfd", {"fdname": EGRESS_EXIT_FD_NAME}, timeout=QMP_COMMAND_TIMEOUT
            )
        except BaseException:
            os.close(exit_read)
            raise
        finally:
            os.close(exit_write)
        try:
            egress = network.start(
                self.pid,
                exit_read,
                self._state_dir / network.NETWORK_LOG,
                userns=self._userns,
            )
        finally:
            os.close(exit_read)
        self._egress = egress
        try:
            if self._confinement is not None:
                self._confinement.join(egress.pid)
            await self._until_exit(egress.wait_ready(timeout), timeout + 1.0, "slirp4netns")
        except BaseException:
            self._egress = None
            egress.stop()
            raise
        finally:
            self._rewrite_state()

    # -- snapshots ----------------------------------------------------------------------

    async def snapshot(
        self, destination: Path, *, resume: bool = True, timeout: float = SNAPSHOT_TIMEOUT
    ) -> None:
        """Saves the VM to ``destination``, a new 0600 file.

        The file holds the device state and the guest RAM, except when RAM lives
        in a shared :class:`MemoryFile`: that file already is the RAM, so only the
        device state is written (milliseconds) and the caller keeps the memory file
        with it. The VM is paused while it is written. Afterwards it runs again if it was
        running and ``resume`` is true; otherwise it stays paused. A failed save
        leaves no file behind.
        """
        deadline = time.monotonic() + timeout
        was_running = await self.status() == "running"
        try:
            fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise GuestError(f"cannot create snapshot file {destination}: {err}") from err
        saved = False
        try:
            if was_running:
                await self.pause()
            await self._execute(
                "migrate-set-parameters",
                {"max-bandwidth": SNAPSHOT_BANDWIDTH},
                timeout=QMP_COMMAND_TIMEOUT,
            )
            memory = self.config.memory_file
            if memory is not None and memory.shared:
                await self._skip_shared_memory_in_migration()
            await self._hand_over_fd(fd)
            await self._execute(
                "migrate", {"uri": f"fd:{SNAPSHOT_FD_NAME}"}, timeout=QMP_COMMAND_TIMEOUT
            )
            await self._await_migration(deadline, f"saving the VM to {destination}")
            saved = True
        finally:
            os.close(fd)
            if not saved:
                with contextlib.suppress(FileNotFoundError):
                    destination.unlink()
            if was_running and resume and not self._poll_exit():
                await self.resume()

    async def restore(
        self,
        source: Path | int,
        *,
        start: bool = True,
        console_prefix: bytes = b"",
        timeout: float = SNAPSHOT_TIMEOUT,
    ) -> None:
        """Starts QEMU with this machine's devices and loads a saved VM instead of booting.

        The configuration must attach the same devices, in the same order, with
        disks of the same sizes as the VM that was saved; only the files behind
        them may differ. A state saved from a VM with a shared memory file needs
        that file as this configuration's (unshared) ``memory_file``. ``source``
        is a path, or an open descriptor positioned at the start of the state
        (QEMU reads from its offset; the caller keeps it open). With ``start``
        false the VM stays paused until :meth:`resume`.
        ``console_prefix`` seeds console.log, e.g. with the saved guest's boot log.
        Any failure kills QEMU and raises GuestError.
        """
        deadline = time.monotonic() + timeout
        if isinstance(source, int):
            fd = source
        else:
            try:
                fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                raise GuestError(f"cannot open snapshot {source}: {err}") from err
        try:
            await self._spawn(
                timeout=max(0.1, deadline - time.monotonic()),
                incoming=True,
                console_prefix=console_prefix,
            )
            try:
                if self.config.memory_file is not None:
                    # The state was saved without RAM: it is the memory file's content.
                    await self._skip_shared_memory_in_migration()
                await self._hand_over_fd(fd)
                await self._skip_announcements()
                await self._execute(
                    "migrate-incoming",
                    {"uri": f"fd:{SNAPSHOT_FD_NAME}"},
                    timeout=QMP_COMMAND_TIMEOUT,
                )
                await self._await_migration(deadline, "loading the saved VM")
                if start:
                    await self.resume()
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.kill()
                raise
        finally:
            if fd != source:
                os.close(fd)

    async def _skip_shared_memory_in_migration(self) -> None:
        await self._execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
            timeout=QMP_COMMAND_TIMEOUT,
        )

    async def _skip_announcements(self) -> None:
        """No self-announcement after the load: QEMU would otherwise have the guest send
        gratuitous ARPs and IPv6 neighbour advertisements on every NIC, five rounds over
        half a second, which a restored clone does not need (its MACs change right after,
        and nothing on its networks learns addresses from announcements); under TCG
        that is guest code translated and run in every start."""
        await self._execute(
            "migrate-set-parameters", {"announce-rounds": 0}, timeout=QMP_COMMAND_TIMEOUT
        )

    def _send_fd(self, fd: int) -> None:
        """Sends ``fd`` over the monitor socket (SCM_RIGHTS) with the next command."""
        self.check_alive()
        if self._qmp is None:
            raise GuestError(f"not connected to QEMU's monitor for {self._state_dir}")
        try:
            self._qmp.send_fd_scm(fd)
        except OSError as err:
            raise GuestError(f"cannot pass a descriptor to QEMU: {err}") from err

    async def _hand_over_fd(self, fd: int) -> None:
        """Passes ``fd`` to QEMU over the monitor socket (SCM_RIGHTS) as SNAPSHOT_FD_NAME."""
        self._send_fd(fd)
        await self._execute("getfd", {"fdname": SNAPSHOT_FD_NAME}, timeout=QMP_COMMAND_TIMEOUT)

    async def _await_migration(self, deadline: float, what: str) -> None:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                with contextlib.suppress(GuestError):
                    await self._execute("migrate_cancel", timeout=QMP_COMMAND_TIMEOUT)
                raise GuestError(f"{what} did not finish in time")
            info = await self._execute(
                "query-migrate", timeout=max(0.1, min(remaining, QMP_COMMAND_TIMEOUT))
            )
            status = str(info.get("status", ""))
            if status == "completed":
                return
            if status in _MIGRATION_DONE:
                detail = info.get("error-desc") or status
                raise GuestError(f"{what} failed: {detail}")
            await asyncio.sleep(_MIGRATION_POLL)


class QemuBackend:
    """The QEMU :class:`~husk.vm.machine.MachineBackend`."""

    def create(self, config: MachineConfig) -> RestorableMachine:
        return QemuMachine(config)

    async def attach(self, state_dir: Path) -> VirtualMachine:
        return await QemuMachine.attach(state_dir)

    def kill_recorded(self, state_dir: Path) -> bool:
        return QemuMachine.kill_recorded(state_dir)

    def version(self) -> str:
        return qemu_version()

    def default_cpu_model(self, accel: str) -> str:
        return default_cpu_model(accel)


def _implements_the_protocol(machine: QemuMachine) -> RestorableMachine:
    """Lets mypy check that QemuMachine really is a RestorableMachine."""
    return machine


def _backend_implements_the_protocol(backend: QemuBackend) -> MachineBackend:
    """Lets mypy check that QemuBackend really is a MachineBackend."""
    return backend
