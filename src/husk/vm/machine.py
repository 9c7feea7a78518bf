"""The hypervisor-neutral face of a VM: its configuration and the operations on it.

Backends (only QEMU today, see :mod:`husk.vm.qemu`) implement
:class:`MachineBackend`, whose machines are each a :class:`RestorableMachine`: a
:class:`VirtualMachine` (life, disks, state directory) that can also be saved and
restored (:class:`Snapshotting`). This module knows nothing about images or containers:
a disk is a file and a serial string, a share is a directory and a tag.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from husk import sizes
from husk.errors import InvalidArgument

DEFAULT_CPUS = 1
DEFAULT_MEMORY_MIB = 512
MIN_MEMORY_MIB = sizes.MIN_VM_MEMORY_MIB
# virtio-blk reports at most 20 bytes of serial (VIRTIO_BLK_ID_BYTES).
MAX_DISK_SERIAL = 20
# 9p mount tags are limited by the virtio-9p config space.
MAX_SHARE_TAG = 31
VIRTIO_TRANSPORTS = 24
"""virtio-mmio transports of QEMU's microvm machine: every virtio device takes one."""
FIXED_VIRTIO_DEVICES = 2
"""virtio-serial (the agent's port) and virtio-rng, in every VM."""
MAX_LAN_SLOTS = 8

AccelRequest = Literal["auto", "kvm", "tcg"]
EventHandler = Callable[[str, dict[str, Any]], None]
"""Called with a hypervisor event's name and data (QMP's: BLOCK_IO_ERROR, STOP, …)."""
ACCEL_REQUESTS: tuple[AccelRequest, ...] = ("auto", "kvm", "tcg")
DISK_CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")

_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class DiskConfig:
    """A raw disk image; the guest finds it by ``serial`` (e.g. "husk-image")."""

    path: Path
    serial: str
    readonly: bool = False
    cache: str = "writeback"
    create_size: int | None = None
    """A scratch disk: the machine creates ``path`` as a sparse file of this many bytes
    when it boots or restores (the transfer ring, see :mod:`husk.agent.transfer`), so
    the file need not exist before. None: ``path`` is an existing image."""

    def virtual_size(self) -> int:
        """The size the guest sees: the scratch size, else the file's size now."""
        return self.create_size if self.create_size is not None else self.path.stat().st_size

    def __post_init__(self) -> None:
        if self.create_size is not None and (self.create_size <= 0 or self.create_size % 4096):
            raise InvalidArgument(f"disk {self.serial}: bad scratch size {self.create_size}")
        if len(self.serial) > MAX_DISK_SERIAL or not _SERIAL.fullmatch(self.serial):
            raise InvalidArgument(
                f"disk serial {self.serial!r} must be 1-{MAX_DISK_SERIAL} characters of "
                "letters, digits, '.', '_' or '-'"
            )
        if self.cache not in DISK_CACHE_MODES:
            raise InvalidArgument(
                f"disk cache mode {self.cache!r} is not one of {', '.join(DISK_CACHE_MODES)}"
            )


@dataclass(frozen=True)
class ShareConfig:
    """A host directory the guest mounts over 9p by ``tag``."""

    tag: str
    path: Path
    readonly: bool = False
    security_model: str = ""
    """QEMU's 9p security model ("": husk's mapped-xattr; "none": the host's files as they
    are, symlinks included, for husk-runtime's engine-made root file systems)."""

    def __post_init__(self) -> None:
        if len(self.tag) > MAX_SHARE_TAG or not _TAG.fullmatch(self.tag):
            raise InvalidArgument(
                f"share tag {self.tag!r} must be 1-{MAX_SHARE_TAG} characters of "
                "letters, digits, '.', '_' or '-'"
            )
        if "," in str(self.path):
            # QEMU's option parser would split the path at the comma.
            raise InvalidArgument(f"share path {self.path} must not contain a comma")


@dataclass(frozen=True)
class NetConfig:
    """User-mode NAT networking; host ports reach the guest through the agent, not QEMU."""

    mac: str

    def __post_init__(self) -> None:
        if not _MAC.fullmatch(self.mac):
            raise InvalidArgument(f"MAC address {self.mac!r} is not of the form 02:xx:xx:xx:xx:xx")
        if int(self.mac[:2], 16) & 0x01:
            raise InvalidArgument(f"MAC address {self.mac} is a multicast address")


@dataclass(frozen=True)
class MemoryFile:
    """Guest RAM backed by a file instead of anonymous memory (boot templates).

    ``shared``: the guest writes into the file (the VM a template is saved from);
    otherwise the file is mapped copy-on-write and never changes, so any number of
    VMs restored from one template share its pages. ``fd``, when set, is an open
    descriptor of the file that the hypervisor inherits and opens instead of
    ``path``: a file replaced on disk after it was checked can then not be swapped in.
    """

    path: Path
    shared: bool
    fd: int | None = None

    def __post_init__(self) -> None:
        if "," in str(self.path):
            raise InvalidArgument(f"memory file path {self.path} must not contain a comma")


def virtio_devices(config: MachineConfig) -> int:
    """The virtio-mmio transports ``config`` uses: fixed devices, disks, shares, NICs."""
    nics = (1 if config.net is not None else 0) + config.lan_slots
    return FIXED_VIRTIO_DEVICES + len(config.disks) + len(config.shares) + nics


def check_transports(config: MachineConfig) -> None:
    """InvalidArgument when ``config`` needs more virtio devices than the machine has."""
    used = virtio_devices(config)
    if used <= VIRTIO_TRANSPORTS:
        return
    others = used - len(config.shares)
    raise InvalidArgument(
        f"too many shared directories (bind mounts): {len(config.shares)} requested, at most "
        f"{max(0, VIRTIO_TRANSPORTS - others)} fit beside the VM's disks and network devices"
    )


def random_mac() -> str:
    """A fresh locally administered unicast MAC (first octet has bit 1 set, bit 0 clear)."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{octet:02x}" for octet in octets)


@dataclass(frozen=True)
class MachineConfig:
    """Everything a backend needs to boot one VM.

    ``cpus`` and ``memory_mib`` are what the caller asked for; :meth:`resources`
    gives what the VM really gets once clamped to the host.
    """

    kernel: Path
    initrd: Path
    state_dir: Path
    cpus: int = DEFAULT_CPUS
    memory_mib: int = DEFAULT_MEMORY_MIB
    cmdline_extra: list[str] = field(default_factory=list)
    disks: list[DiskConfig] = field(default_factory=list)
    shares: list[ShareConfig] = field(default_factory=list)
    net: NetConfig | None = None
    accel: AccelRequest = "auto"
    cpu_model: str | None = None
    """QEMU ``-cpu`` model; None picks the backend's default for the accelerator."""
    memory_file: MemoryFile | None = None
    """Back guest RAM with a file (templates); None: anonymous memory."""
    lan_slots: int = 0
    """LAN interfaces (virtio-net devices after ``net``, MAC ``lan_boot_mac(slot)``): part
    of the device shape, so of a template's inputs."""
    lan_fds: tuple[int, ...] = ()
    """One descriptor per LAN slot (slot 1 first): the VM's end of a SOCK_STREAM socketpair,
    inherited by the hypervisor. Needed to start the VM (not to describe it), and only
    meaningful in the process that spawns it; the caller closes its copies once it runs."""
    egress: bool = True
    """Whether the VM's network namespace gets a way out (slirp4netns) when it starts."""
    lan_taps: tuple[int, ...] = ()
    """LAN slots whose descriptor in ``lan_fds`` is a tap device's (an engine's network
    namespace, husk.ociruntime.netns) rather than a socketpair's end: same virtio-net
    device, another QEMU backend. Like ``lan_fds``, meaningful only to the spawner."""
    tcg_cache_mib: int = 0
    """The TCG translated-code cache's bound in MiB (0: the backend's default). Not part
    of a template's inputs: a restore may choose another (the warm pool does)."""

    def __post_init__(self) -> None:
        if self.cpus < 1:
            raise InvalidArgument(f"a VM needs at least 1 CPU, not {self.cpus}")
        if self.memory_mib < 1:
            raise InvalidArgument(f"VM memory must be positive, not {self.memory_mib} MiB")
        if self.accel not in ACCEL_REQUESTS:
            raise InvalidArgument(
                f"accelerator {self.accel!r} is not one of {', '.join(ACCEL_REQUESTS)}"
            )
        serials = [disk.serial for disk in self.disks]
        if len(set(serials)) != len(serials):
            raise InvalidArgument(f"disk serials must be unique, got {serials}")
        tags = [share.tag for share in self.shares]
        if len(set(tags)) != len(tags):
            raise InvalidArgument(f"share tags must be unique, got {tags}")
        for disk in self.disks:
            if "," in str(disk.path):
                raise InvalidArgument(f"disk path {disk.path} must not contain a comma")
        if self.cpu_model is not None and (
            not self.cpu_model or any(char.isspace() for char in self.cpu_model)
        ):
            raise InvalidArgument(f"CPU model {self.cpu_model!r} must be one non-empty word")
        for word in self.cmdline_extra:
            if not word or any(char.isspace() for char in word):
                raise InvalidArgument(f"kernel argument {word!r} must be one non-empty word")
        if not 0 <= self.lan_slots <= MAX_LAN_SLOTS:
            raise InvalidArgument(
                f"a VM has 0 to {MAX_LAN_SLOTS} LAN interfaces, not {self.lan_slots}"
            )
        if self.lan_fds and len(self.lan_fds) != self.lan_slots:
            raise InvalidArgument(
                f"{self.lan_slots} LAN interfaces need as many descriptors, not {len(self.lan_fds)}"
            )
        if len(set(self.lan_taps)) != len(self.lan_taps) or not all(
            1 <= slot <= self.lan_slots for slot in self.lan_taps
        ):
            raise InvalidArgument(
                f"tap LAN slots {list(self.lan_taps)} must be distinct slots from 1 to "
                f"{self.lan_slots}"
            )
        check_transports(self)

    def resources(self) -> tuple[int, int]:
        """(cpus, memory_mib) clamped to what this host has."""
        return clamp_resources(self.cpus, self.memory_mib)


def host_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def host_memory_mib() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo has no MemTotal line")


def host_tsc_khz() -> int | None:
    """The host TSC frequency, when the host knows it exactly.

    Under TCG the guest's TSC ticks at the host's rate. Telling the guest kernel
    (``tsc_early_khz``) spares it the PIT calibration, which fails on a loaded
    host; the kernel then marks the TSC unstable and hangs with no clocksource.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    mhz: float | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz" and mhz is None:
            with contextlib.suppress(ValueError):
                mhz = float(value)
        if flags and mhz is not None:
            break
    if mhz is None or not {"constant_tsc", "nonstop_tsc"} <= flags:
        return None
    return round(mhz * 1000)


def clamp_resources(cpus: int, memory_mib: int) -> tuple[int, int]:
    """Never more vCPUs than host CPUs, never more memory than the host has, at least 128 MiB."""
    cpus = max(1, min(cpus, host_cpu_count()))
    memory_mib = max(MIN_MEMORY_MIB, min(memory_mib, host_memory_mib()))
    return cpus, memory_mib


_UNUSABLE_STATES = {
    "internal-error": "the hypervisor stopped the VM on an internal error",
    "guest-panicked": "the guest kernel panicked",
    "shutdown": "the VM shut down",
}


def state_problem(status: str) -> str | None:
    """Why a VM whose hypervisor reports run state ``status`` cannot go on, or None."""
    return _UNUSABLE_STATES.get(status)


@runtime_checkable
class VirtualMachine(Protocol):
    """One VM. Every wait has a deadline; failures raise :class:`husk.errors.GuestError`."""

    @property
    def config(self) -> MachineConfig:
        """The configuration it runs with (disks and state directory as they are now)."""
        ...

    @property
    def pid(self) -> int: ...

    @property
    def state_dir(self) -> Path: ...

    @property
    def agent_socket(self) -> Path:
        """Unix socket of the guest agent's port (the hypervisor listens on it)."""
        ...

    @property
    def console_log(self) -> Path: ...

    @property
    def accel(self) -> str:
        """The accelerator the VM runs on ("kvm" or "tcg")."""
        ...

    @property
    def returncode(self) -> int | None:
        """The hypervisor's exit status once it ended (negative: killed by that signal)."""
        ...

    async def boot(self, *, timeout: float = ...) -> None:
        """Starts the VM. Returns once the hypervisor is up; the agent comes later."""
        ...

    def check_alive(self) -> None:
        """Raises GuestError if the VM has exited or the guest kernel panicked."""
        ...

    def on_event(self, handler: EventHandler | None) -> None:
        """Hands every hypervisor event to ``handler``, first those already seen; None: stop.

        The handler runs on the event loop and must not block; its exceptions are logged.
        """
        ...

    async def status(self) -> str:
        """ "running", "paused", "shutdown", "guest-panicked", … or "exited"."""
        ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def stop(self, timeout: float = 10.0) -> int | None:
        """Ends the VM: asks the hypervisor to quit, kills it after ``timeout`` seconds."""
        ...

    async def kill(self) -> None: ...

    async def wait(self, timeout: float | None = None) -> int | None:
        """The hypervisor's exit status, or None if it still runs after ``timeout`` seconds."""
        ...

    async def detach(self) -> None:
        """Lets go of the VM without stopping it (the daemon is going away)."""
        ...

    def rss_bytes(self) -> int: ...

    def cpu_seconds(self) -> float: ...

    def release_boot_images(self) -> None:
        """The guest runs (its agent answered): drop what only its boot needed
        (husk.vm.bootimages); idempotent."""
        ...

    async def replace_disk(self, index: int, path: Path) -> None:
        """Points the running VM's ``index``-th disk at another file of the same size.

        The guest must not have the disk open; serial, mode and cache stay.
        """
        ...

    def move_state_dir(self, destination: Path) -> None:
        """Renames the state directory while the VM runs (sockets and logs move along)."""
        ...

    async def set_egress(self, enabled: bool) -> None:
        """Gives the running VM its way out to the host's network, or takes it away."""
        ...


@runtime_checkable
class Snapshotting(Protocol):
    """Saving a running VM's state and starting another VM from it (boot templates)."""

    async def snapshot(self, destination: Path, *, resume: bool = True) -> None:
        """Saves the VM's full state to a new file; the VM runs on afterwards if ``resume``."""
        ...

    async def restore(
        self,
        source: Path | int,
        *,
        start: bool = True,
        console_prefix: bytes = b"",
        timeout: float = ...,
    ) -> None:
        """Starts the hypervisor from a saved state instead of booting (same devices required).

        ``source``: a path or an open descriptor at the state's start; ``start`` false
        leaves the VM paused; ``console_prefix`` seeds its console log.
        """
        ...


@runtime_checkable
class RestorableMachine(VirtualMachine, Snapshotting, Protocol):
    """A VM that can also be saved and restored: what a backend's factory makes."""


class MachineBackend(Protocol):
    """A hypervisor: makes machines, finds them again after a daemon restart, names itself.

    The provisioning layer (:mod:`husk.sandbox`) gets one injected and never names
    a backend's machine class.
    """

    def create(self, config: MachineConfig) -> RestorableMachine:
        """The machine factory: a new machine for ``config`` (not running until boot or restore)."""
        ...

    async def attach(self, state_dir: Path) -> VirtualMachine:
        """Reconnects to the VM recorded in ``state_dir`` (GuestError if it is gone)."""
        ...

    def kill_recorded(self, state_dir: Path) -> bool:
        """Ends the VM recorded in ``state_dir`` if it still runs, without its monitor."""
        ...

    def version(self) -> str:
        """The hypervisor's version (a saved VM only restores into the same one)."""
        ...

    def default_cpu_model(self, accel: str) -> str:
        """The CPU model a VM on ``accel`` gets when its configuration names none."""
        ...
