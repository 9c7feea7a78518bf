"""The QEMU command line for a :class:`~husk.vm.machine.MachineConfig`: a pure function.

Nothing here starts a process, opens a file or reads the host: the caller
(:mod:`husk.vm.qemu`) hands in the binary, the accelerator, the descriptors QEMU
inherits and the host's TSC rate, and gets the argv back, so every option can be
checked in a unit test.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from husk.errors import InvalidArgument
from husk.guest.netconfig import lan_boot_mac
from husk.vm.bootimages import proc_fd_path
from husk.vm.machine import DiskConfig, MachineConfig, MemoryFile, NetConfig, ShareConfig

CONSOLE_LOG = "console.log"
AGENT_PORT_NAME = "org.husk.agent"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
SHARE_SECURITY_MODEL = "mapped-xattr"
MAPPED_OWNER_XATTR = "user.virtfs.uid"
"""Where mapped-xattr keeps the owner a guest gave a shared file (absent: the host's)."""
SHARE_FILE_MODE = 0o600
SHARE_DIR_MODE = 0o700
CONSOLE_FDSET = 1
DISK_FDSET_BASE = 10
RAM_BACKEND_ID = "husk-ram"

# x86-64-v2 on top of QEMU's default model: images built for v2 (e.g. RHEL 9) need
# SSE4.2/POPCNT, and under TCG this boots as fast as qemu64 (``-cpu max`` is ~0.1 s slower).
# +arat (an always-running APIC timer): without it Linux marks the local APIC timer as
# stopping in deep idle and, with no broadcast timer on microvm, never leaves periodic
# mode, so an idle guest takes 250 timer interrupts a second, each translated and run by
# TCG: 3 % of a host CPU per idle VM. With it the guest runs tickless (0.5 %).
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,+arat"
KVM_CPU = "host"
TCG_TB_MIB = 32

# Free-page reporting: the guest's balloon driver tells QEMU which free 2 MiB+ blocks it
# has, and QEMU drops them (MADV_DONTNEED: the host gets the memory back; the guest finds
# zeroes there when it uses them again). Never inflated. Only VMs with anonymous RAM have
# it (cold boots): for RAM in a file QEMU 7.2 punches a hole in the file instead, which the
# template's sealed memfd refuses (EPERM, one error line in qemu.log per report, nothing
# reclaimed). Templates and their clones therefore both go without, so a restore finds
# the device model its template was saved with.
BALLOON_ARGS = ("-device", "virtio-balloon-device,free-page-reporting=on")

# Guest memory (issue 16 item 2). init_on_alloc=0: the kernel does not zero every page it
# allocates (Debian's default does), so a buffer a driver hands to a device (a NIC's receive
# ring, which QEMU may never fill) stays untouched, i.e. never becomes host memory.
# cgroup.memory=nokmem: kernel memory is not charged to memory cgroups, which spares the
# per-CPU chunk and the accounting objects that charging needs (4 MB of vmalloc at idle).
# An idle cold 256 MiB VM: QEMU's RSS 205.7 -> 197.8 MB. The VM's size is the container's
# real memory limit; a memory.max set inside it (husk-runtime update) counts user memory.
GUEST_MEMORY_CMDLINE = ("init_on_alloc=0", "cgroup.memory=nokmem")

# Serial console only, no legacy probing the guest would wait on, reboot = exit
# (-no-reboot) so that a panic ends QEMU at once.
BASE_CMDLINE = (
    "console=ttyS0",
    "reboot=t",
    "panic=-1",
    "8250.nr_uarts=1",
    "i8042.noaux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "tsc=reliable",
    "no_timer_check",
    "pci=off",
    "quiet",
    *GUEST_MEMORY_CMDLINE,
)


def default_cpu_model(accel: str) -> str:
    """The ``-cpu`` model a VM on ``accel`` gets when its configuration names none."""
    return KVM_CPU if accel == "kvm" else TCG_CPU


def kernel_cmdline(
    config: MachineConfig, *, accel: str, boot_time_ns: int, tsc_khz: int | None = None
) -> str:
    """The guest kernel's command line. ``tsc_khz``: the host TSC rate, told to TCG guests.

    Under TCG the guest's TSC ticks at the host's rate; telling the guest kernel
    (``tsc_early_khz``) spares it the PIT calibration, which fails on a loaded host.
    """
    words = [*BASE_CMDLINE, f"husk.boottime={boot_time_ns}"]
    if accel == "tcg" and tsc_khz:
        words.append(f"tsc_early_khz={tsc_khz}")
    words.extend(config.cmdline_extra)
    return " ".join(words)


def _disk_args(index: int, disk: DiskConfig, fds: Sequence[int] = ()) -> list[str]:
    drive = f"disk{index}"
    readonly = "on" if disk.readonly else "off"
    source = str(disk.path)
    handover: list[str] = []
    if fds:
        # QEMU gets the open file, never the path: its jail holds no data directory.
        fdset = DISK_FDSET_BASE + index
        for fd in fds:
            handover += ["-add-fd", f"fd={fd},set={fdset}"]
        source = f"/dev/fdset/{fdset}"
    return [
        *handover,
        "-drive",
        f"if=none,id={drive},file={source},format=raw,readonly={readonly},cache={disk.cache},"
        # Named nodes: a running VM's disk can be pointed at another file (blockdev-reopen).
        f"node-name={drive}-format,file.node-name={drive}-file,"
        # A host out of space (ENOSPC) pauses the VM with the write pending: resuming after
        # space is freed retries it, and the guest's filesystem never sees a failed write
        # (ext4 would abort its journal). Any other error will not go away by waiting, so
        # the guest gets it as a real disk's I/O error. Both raise BLOCK_IO_ERROR.
        "werror=enospc,rerror=report",
        "-device",
        f"virtio-blk-device,drive={drive},serial={disk.serial}",
    ]


def _share_args(index: int, share: ShareConfig) -> list[str]:
    fsdev = f"fs{index}"
    readonly = ",readonly=on" if share.readonly else ""
    if share.security_model and share.security_model != SHARE_SECURITY_MODEL:
        return [
            "-fsdev",
            f"local,id={fsdev},path={share.path},security_model={share.security_model}{readonly}",
            "-device",
            f"virtio-9p-device,fsdev={fsdev},mount_tag={share.tag}",
        ]
    return [
        "-fsdev",
        # mapped-xattr: every file QEMU creates is a plain file (or directory) with mode
        # SHARE_FILE_MODE / SHARE_DIR_MODE, owned by the share directory's owner (the
        # jail's idmapped bind); the guest's owner, mode and file type live in
        # user.virtfs.* xattrs. Guest root makes neither setuid files nor device nodes.
        f"local,id={fsdev},path={share.path},security_model={SHARE_SECURITY_MODEL},"
        f"fmode={SHARE_FILE_MODE:04o},dmode={SHARE_DIR_MODE:04o}{readonly}",
        "-device",
        f"virtio-9p-device,fsdev={fsdev},mount_tag={share.tag}",
    ]


def _memory_args(memory: MemoryFile, memory_mib: int) -> list[str]:
    path = f"/proc/self/fd/{memory.fd}" if memory.fd is not None else str(memory.path)
    share = "on" if memory.shared else "off"
    return [
        "-object",
        f"memory-backend-file,id={RAM_BACKEND_ID},size={memory_mib}M,mem-path={path},share={share}",
    ]


def _net_args(net: NetConfig) -> list[str]:
    # No hostfwd: host ports reach the guest through the agent's FORWARD channels.
    return ["-netdev", "user,id=net0", "-device", f"virtio-net-device,netdev=net0,mac={net.mac}"]


def _lan_args(fds: Sequence[int], taps: Sequence[int] = ()) -> list[str]:
    """One virtio-net device per LAN slot, on a stream socket QEMU inherits.

    QEMU's ``socket`` netdev on a SOCK_STREAM descriptor frames each Ethernet frame
    with a big-endian u32 length; the other end is the switch's port. A slot in
    ``taps`` is on a tap device's descriptor instead (an engine's network namespace):
    the device is the same, so a VM restored from a template booted on sockets still
    finds it; no vhost (QEMU, jailed, could not open /dev/vhost-net anyway).
    """
    args: list[str] = []
    for slot, fd in enumerate(fds, start=1):
        backend = (
            f"tap,id=lan{slot},fd={fd},vhost=off"
            if slot in taps
            else (f"socket,id=lan{slot},fd={fd}")
        )
        args += [
            "-netdev",
            backend,
            "-device",
            f"virtio-net-device,netdev=lan{slot},mac={lan_boot_mac(slot)}",
        ]
    return args


def build_command(
    config: MachineConfig,
    *,
    binary: str,
    accel: str,
    qmp_fd: int,
    agent_fd: int,
    boot_time_ns: int,
    tsc_khz: int | None = None,
    incoming: bool = False,
    disk_fds: Sequence[Sequence[int]] = (),
    console_fd: int | None = None,
    boot_image_fds: tuple[int, int] | None = None,
) -> list[str]:
    """The full QEMU argv for ``config``; QEMU inherits the two listening sockets.

    ``incoming`` starts QEMU paused, waiting for a saved state (``migrate-incoming``)
    instead of booting the kernel. ``disk_fds`` (per disk, see :func:`husk.vm.qemu.open_disk`)
    and ``console_fd`` are descriptors QEMU inherits and uses instead of the paths;
    ``boot_image_fds`` (kernel, initramfs: :class:`husk.vm.bootimages.BootImages`) too.
    """
    if disk_fds and len(disk_fds) != len(config.disks):
        raise InvalidArgument(f"{len(config.disks)} disks but {len(disk_fds)} descriptors")
    console = str(config.state_dir / CONSOLE_LOG)
    console_handover: list[str] = []
    if console_fd is not None:
        console_handover = ["-add-fd", f"fd={console_fd},set={CONSOLE_FDSET}"]
        console = f"/dev/fdset/{CONSOLE_FDSET}"
    cpus, memory_mib = config.resources()
    state = config.state_dir
    kernel, initrd = os.path.abspath(config.kernel), os.path.abspath(config.initrd)
    if boot_image_fds is not None:
        kernel, initrd = (proc_fd_path(fd) for fd in boot_image_fds)
    command = [
        binary,
        "-name",
        f"husk,process=husk-vm:{state.name}",
        "-M",
        "microvm,x-option-roms=off"
        + (f",memory-backend={RAM_BACKEND_ID}" if config.memory_file is not None else ""),
        "-accel",
        # A bounded translation cache: the default grows to 64 MiB of RSS per VM.
        "kvm" if accel == "kvm" else f"tcg,tb-size={config.tcg_cache_mib or TCG_TB_MIB}",
        "-cpu",
        config.cpu_model or default_cpu_model(accel),
        "-smp",
        str(cpus),
        "-m",
        f"{memory_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-sandbox",
        SANDBOX,
        "-kernel",
        kernel,
        "-initrd",
        initrd,
        "-append",
        kernel_cmdline(config, accel=accel, boot_time_ns=boot_time_ns, tsc_khz=tsc_khz),
        *console_handover,
        "-chardev",
        # append: a restored VM's log starts with its template's boot log (written first),
        # and the daemon may truncate it to rotate it (see rotate_console).
        f"file,id=console,path={console},append=on",
        "-serial",
        "chardev:console",
        "-chardev",
        f"socket,id=qmp,fd={qmp_fd},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        # A guest panic reported through pvpanic ends QEMU with status 1.
        "-device",
        "pvpanic",
        "-action",
        "panic=exit-failure",
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id=agent,fd={agent_fd},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-object",
        "rng-random,filename=/dev/urandom,id=rng0",
        "-device",
        "virtio-rng-device,rng=rng0",
        *(BALLOON_ARGS if config.memory_file is None else ()),
    ]
    for index, disk in enumerate(config.disks):
        command += _disk_args(index, disk, disk_fds[index] if disk_fds else ())
    for index, share in enumerate(config.shares):
        command += _share_args(index, share)
    if config.net is not None:
        command += _net_args(config.net)
    if len(config.lan_fds) != config.lan_slots:
        raise InvalidArgument(
            f"{config.lan_slots} LAN interfaces but {len(config.lan_fds)} descriptors"
        )
    # After eth0: the guest names the LAN NICs eth1.. in this order (it finds them by MAC).
    command += _lan_args(config.lan_fds, config.lan_taps)
    if config.memory_file is not None:
        command += _memory_args(config.memory_file, memory_mib)
    if incoming:
        command += ["-incoming", "defer", "-S"]
    return command
