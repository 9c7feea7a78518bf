"""Guest system operations: mounts, clock, entropy, network, statistics, power.

CPython has no mount(2) or reboot(2) wrappers: the container root's mounts use
ctypes (:mod:`husk.guest.agent.mounts`), the boot-time ones and power-off go
through busybox; everything else uses the standard library directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import time
from typing import Any

BUSYBOX = "/bin/busybox"

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1


class SystemError_(Exception):
    """A guest system operation failed; the message is shown to the host."""


def quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def run_busybox(argv: list[str], *, check: bool = True) -> str:
    """Runs ``busybox argv…`` to completion; returns its stderr output."""
    return run_script([argv], check=check)


def run_script(commands: list[list[str]], *, check: bool = True) -> str:
    """Runs several busybox commands in one shell (one fork instead of many)."""
    script = "set -e\n" + "\n".join(" ".join(quote(a) for a in cmd) for cmd in commands)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.dup2(err_w, 2)
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.execv(BUSYBOX, [BUSYBOX, "sh", "-c", script])
        finally:
            os._exit(127)
    os.close(err_w)
    chunks = []
    while True:
        chunk = os.read(err_r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(err_r)
    _, status = os.waitpid(pid, 0)
    stderr = b"".join(chunks).decode(errors="replace").strip()
    if check and os.waitstatus_to_exitcode(status) != 0:
        last = stderr.splitlines()[-1] if stderr else f"exit status {status}"
        raise SystemError_(last)
    return stderr


def spawn_script(commands: list[list[str]]) -> int:
    """Like :func:`run_script` but in the background; the reaper collects it."""
    script = "\n".join(" ".join(quote(a) for a in cmd) for cmd in commands)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1):
                os.dup2(null, fd)
            os.execv(BUSYBOX, [BUSYBOX, "sh", "-c", script])
        finally:
            os._exit(127)
    return pid


def kernel_cmdline() -> dict[str, str]:
    try:
        with open("/proc/cmdline") as fh:
            words = fh.read().split()
    except OSError:
        return {}
    return {w.partition("=")[0]: w.partition("=")[2] for w in words}


PAGE_REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"
REPORTED_ORDER = 3
"""Free blocks of 2**REPORTED_ORDER pages (32 KiB) and more are reported to the host.
Measured on an idle 256 MiB VM after a 60 MiB allocation was freed: QEMU's RSS 195 MiB
with order 0 or 3, 202 MiB with the default 9; 3 leaves single pages alone (fewer reports)."""


def report_small_free_blocks(order: int = REPORTED_ORDER, path: str = PAGE_REPORTING_ORDER) -> bool:
    """Lets free-page reporting (virtio_balloon) give back free blocks smaller than 2 MiB.

    The balloon driver registers with the kernel's default, pageblock_order (2 MiB
    blocks); Linux 6.1 overrides page_reporting.page_reporting_order= from the command
    line at that moment, but the parameter stays writable. Memory the guest frees in
    pieces (module files deleted from the in-RAM root, slabs, a workload's churn) then
    leaves QEMU too; the reporting wakes up on the next free of such a block. False where
    the kernel has no page reporting.
    """
    try:
        with open(path, "w") as fh:
            fh.write(f"{order}\n")
    except OSError:
        return False
    return True


BOOT_MODULES_LIST = "/etc/husk/modules"
MODULES_DIR = "/lib/modules"


def drop_loaded_module_files(
    listing: str = BOOT_MODULES_LIST,
    modules_dir: str = MODULES_DIR,
    proc_modules: str = "/proc/modules",
) -> list[str]:
    """Deletes the files of the boot modules the kernel has loaded; returns their names.

    The root file system is in RAM and the kernel keeps its own copy of a loaded module
    (4.7 MB of files). Modules loaded on demand (WireGuard) are not in ``listing`` and
    stay; a boot module that failed to load keeps its file. Called after
    :func:`report_small_free_blocks`, so the freed pages go back to the host.
    """
    try:
        with open(proc_modules) as fh:
            loaded = {line.split()[0] for line in fh if line.strip()}
        with open(listing) as fh:
            wanted = [line.strip() for line in fh if line.strip()]
    except OSError:
        return []
    dropped = []
    for name in wanted:
        if name in loaded and "/" not in name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{modules_dir}/{name}.ko")
                dropped.append(name)
    return dropped


def set_clock(unix_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)


def add_entropy(data: bytes) -> None:
    """Credits host randomness to the kernel pool and forces a CRNG reseed.

    Restored clones of one snapshot start with identical RNG state; this is what
    makes them diverge.
    """
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def block_device_for_serial(serial: str) -> str:
    """The /dev node of the virtio-blk disk the host tagged with ``serial``."""
    if serial not in _disks_by_serial:
        scan_disks()
    try:
        return _disks_by_serial[serial]
    except KeyError:
        raise SystemError_(f"no disk with serial {serial!r} is attached") from None


_disks_by_serial: dict[str, str] = {}


def scan_disks() -> None:
    """Maps the serials of the attached disks to their /dev nodes.

    Done once at boot, so that VMs restored from a template (same devices, in the
    same order) find their disks without reading sysfs again.
    """
    _disks_by_serial.clear()
    for name in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{name}/serial") as fh:
                _disks_by_serial.setdefault(fh.read().strip(), f"/dev/{name}")
        except OSError:
            continue


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def collect_stats(pid_ns: str = "") -> dict[str, int]:
    """Real figures from the guest kernel; ``pids`` counts the container's processes."""
    clock_ticks = os.sysconf("SC_CLK_TCK")
    ns_per_tick = 1_000_000_000 // clock_ticks
    fields = [int(v) for v in _read("/proc/stat").splitlines()[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    meminfo = {}
    for line in _read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        meminfo[key] = int(rest.split()[0]) * 1024
    rx = tx = rx_packets = tx_packets = 0
    for line in _read("/proc/net/dev").splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            continue
        values = rest.split()
        rx += int(values[0])
        rx_packets += int(values[1])
        tx += int(values[8])
        tx_packets += int(values[9])
    read_bytes = write_bytes = read_ops = write_ops = 0
    for name in os.listdir("/sys/block"):
        if not name.startswith("vd"):
            continue
        values = _read(f"/sys/block/{name}/stat").split()
        read_ops += int(values[0])
        read_bytes += int(values[2]) * 512
        write_ops += int(values[4])
        write_bytes += int(values[6]) * 512
    pids = len(container_pids(pid_ns)) if pid_ns else 0
    return {
        "cpu_ns": busy * ns_per_tick,
        "cpu_user_ns": (user + nice) * ns_per_tick,
        "cpu_system_ns": (system + irq + softirq) * ns_per_tick,
        "system_cpu_ns": (busy + idle + iowait) * ns_per_tick,
        "online_cpus": os.cpu_count() or 1,
        "memory_used": meminfo["MemTotal"] - meminfo.get("MemAvailable", meminfo["MemFree"]),
        "memory_total": meminfo["MemTotal"],
        "memory_cache": meminfo.get("Cached", 0),
        "net_rx_bytes": rx,
        "net_tx_bytes": tx,
        "net_rx_packets": rx_packets,
        "net_tx_packets": tx_packets,
        "block_read_bytes": read_bytes,
        "block_write_bytes": write_bytes,
        "block_read_ops": read_ops,
        "block_write_ops": write_ops,
        "pids": pids,
        "uptime_ns": int(float(_read("/proc/uptime").split()[0]) * 1e9),
    }


def set_mac(mac: str, interface: str = "eth0") -> None:
    """Gives ``interface`` a new MAC address (virtio-net takes it while the link is up).

    An ioctl rather than ``ip link``: no fork and exec, which a restored clone
    would otherwise pay on its critical path.
    """
    octets = mac.split(":")
    try:
        values = bytes(int(octet, 16) for octet in octets if len(octet) == 2)
    except ValueError:
        values = b""
    if len(values) != 6 or len(octets) != 6:
        raise SystemError_(f"invalid MAC address {mac!r}")
    if values[0] & 0x01:
        raise SystemError_(f"MAC address {mac} is a multicast address")
    request = struct.pack("16sH14s", interface.encode()[:15], ARPHRD_ETHER, values)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock.fileno(), SIOCSIFHWADDR, request)
        except OSError as exc:
            raise SystemError_(f"cannot set the MAC address of {interface}: {exc}") from None


def network_commands(address: str, gateway: str, interface: str = "eth0") -> list[list[str]]:
    return [
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "set", interface, "up"],
        ["ip", "addr", "add", address, "dev", interface],
        ["ip", "route", "add", "default", "via", gateway],
    ]


def power_off() -> None:
    """Syncs disks and powers the VM off (QEMU exits)."""
    os.sync()
    run_script([["umount", "-a", "-r"]], check=False)
    os.sync()
    for action in ("poweroff", "reboot"):
        try:
            os.execv(BUSYBOX, [BUSYBOX, action, "-f"])
        except OSError:
            continue


def container_pids(pid_ns: str) -> dict[int, int]:
    """The processes in the PID namespace ``pid_ns`` ("pid:[inode]"): the agent's pid of
    each → its pid in the container. Kernel threads and the agent live outside it."""
    pids: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != pid_ns:
                continue
            status = _read(f"/proc/{entry}/status")
        except OSError:
            continue  # gone meanwhile
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                pids[int(entry)] = int(line.split()[-1])
                break
    return pids


def list_processes(pid_ns: str) -> list[dict[str, Any]]:
    """The container's processes, with the pids they have inside it, for ``top``."""
    if not pid_ns:
        return []
    ticks = os.sysconf("SC_CLK_TCK")
    inside = container_pids(pid_ns)
    rows = []
    for pid, own_pid in sorted(inside.items(), key=lambda item: item[1]):
        try:
            cmdline = _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()
            stat_line = _read(f"/proc/{pid}/stat")
            fields = stat_line.rsplit(")", 1)[1].split()
            uid = int(_read(f"/proc/{pid}/status").split("Uid:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
        if not cmdline:  # a zombie: its name only, as ps shows it
            cmdline = "[" + stat_line.split("(", 1)[-1].rsplit(")", 1)[0] + "]"
        cpu_seconds = (int(fields[11]) + int(fields[12])) // ticks
        rows.append(
            {
                "comm": stat_line.split("(", 1)[-1].rsplit(")", 1)[0],
                "pid": own_pid,
                "ppid": inside.get(int(fields[1]), 0),  # a parent outside: 0, as inside
                "uid": uid,
                "time": f"{cpu_seconds // 60}:{cpu_seconds % 60:02d}",
                "cmd": cmdline,
            }
        )
    return rows
