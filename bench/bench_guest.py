"""Benchmark the guest core (issue 2) at the Sandbox level, beside a plain-QEMU floor.

Per run, alternately:

- husk: QemuMachine with the Sandbox's own machine configuration (256 MiB, the
  busybox erofs image disk, virtio-net, rng, QMP, seccomp sandbox), timed from
  QEMU's spawn to the agent's READY; then the container root is assembled
  (PREPARE), the VM idles and its QEMU RSS is read; then ``true`` is exec'd
  repeatedly and ``dd`` streams zeros to the host through stdout.
- peer: a plain ``qemu-system-x86_64 -M microvm`` booting the same kernel and
  initramfs with only a console, the agent's virtio-serial port and virtio-rng
  (no QMP, no disks, no net, no pvpanic, no seccomp), timed from spawn to the same READY.

    python3 bench/bench_guest.py [--runs 5] [--quick] [--json]
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
from benchlib import MB, Figure, PartOptions, Target, progress

SECTION = "guest (issue 2)"
GUEST_MEMORY_MIB = 256
MIB = 1024 * 1024
BOOT_TIMEOUT = 120.0
IDLE_SETTLE_SECONDS = 3.0
EXEC_ITERATIONS = 20
DD_BLOCK = 65536
DD_COUNT = 1600  # 105 MB per transfer
_UPTIME_LINE = re.compile(rb"husk-agent: ready after ([0-9.]+)s of uptime")

RSS_PARTS = [
    *benchlib.RSS_PARTS,
    ("pss", "PSS: the RSS with shared pages divided among the processes sharing them"),
]

READY_CMD = (
    "QemuMachine(machine_config(SandboxConfig(..., memory 256 MiB))).boot() + AgentClient.connect()"
)
PLAIN_CMD = (
    "qemu-system-x86_64 -M microvm,x-option-roms=off -accel tcg,tb-size=32 -m 256M -nodefaults "
    "-kernel vmlinux -initrd initramfs.cpio -serial file -device virtio-serial-device "
    "-chardev socket,server=on -device virtserialport,name=org.husk.agent "
    "-device virtio-rng-device  (then HELLO→READY)"
)


@dataclass
class Samples:
    ready: list[float] = field(default_factory=list)
    uptime: list[float] = field(default_factory=list)
    prepared: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    exec_ms: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    plain_ready: list[float] = field(default_factory=list)
    plain_uptime: list[float] = field(default_factory=list)
    plain_rss_mb: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)


def _uptime_at_ready(console: Path) -> float | None:
    with contextlib.suppress(OSError):
        match = _UPTIME_LINE.search(console.read_bytes())
        if match:
            return float(match.group(1))
    return None


async def husk_once(work: Path, image: Path, index: int, samples: Samples, quick: bool) -> None:
    from husk.agent.client import AgentClient, ProcessSpec
    from husk.sandbox.config import IMAGE_SERIAL, SandboxConfig, machine_config
    from husk.sandbox.lan import LanPorts
    from husk.sandbox.sandbox import Sandbox
    from husk.vm.machine import random_mac
    from husk.vm.qemu import QemuMachine

    config = SandboxConfig(
        state_dir=work / f"vm{index}",
        image_disk=image,
        upper_disk=None,
        hostname=f"bench{index}",
        mac=random_mac(),
        memory_bytes=GUEST_MEMORY_MIB * MIB,
    )
    # Every VM has its LAN interfaces, each on a socketpair (the switch ends stay
    # unplugged here), closed when the VM is done.
    lan = LanPorts()
    machine = QemuMachine(machine_config(config, lan.qemu_fds()))
    await machine.boot()
    try:
        client = await AgentClient.connect(
            machine.agent_socket, timeout=BOOT_TIMEOUT, check_alive=machine.check_alive
        )
        ready_at = time.monotonic()
        assert machine.started_at is not None
        samples.ready.append(ready_at - machine.started_at)
        await client.prepare(image=IMAGE_SERIAL, upper=None, hostname=config.hostname)
        samples.prepared.append(time.monotonic() - machine.started_at)
        uptime = _uptime_at_ready(machine.console_log)
        if uptime is not None:
            samples.uptime.append(uptime)
        sandbox = Sandbox(machine, client)
        # Execs need a running workload, as in a container.
        workload = await client.run(ProcessSpec(argv=["sleep", "3600"]))
        await asyncio.sleep(IDLE_SETTLE_SECONDS)
        samples.rss_mb.append(machine.rss_bytes() / MB)
        breakdown = benchlib.qemu_memory(machine.pid, GUEST_MEMORY_MIB * MIB)
        for part, _ in RSS_PARTS:
            samples.parts.setdefault(part, []).append(getattr(breakdown, part))

        for _ in range(EXEC_ITERATIONS // (2 if quick else 1)):
            started = time.perf_counter()
            process = await client.exec(ProcessSpec(argv=["true"]))
            code = await process.wait()
            samples.exec_ms.append((time.perf_counter() - started) * 1000)
            await process.release()
            if code != 0:
                raise RuntimeError(f"exec true exited {code}")

        for _ in range(1 if quick else 2):
            argv = ["dd", "if=/dev/zero", f"bs={DD_BLOCK}", f"count={DD_COUNT}"]
            started = time.perf_counter()
            process = await client.exec(ProcessSpec(argv=argv))
            received = 0
            async for stream, data in process.output():
                if stream == "stdout":
                    received += len(data)
            elapsed = time.perf_counter() - started
            await process.release()
            if process.exit_code != 0 or received != DD_BLOCK * DD_COUNT:
                raise RuntimeError(f"dd exited {process.exit_code} after {received} bytes")
            samples.throughput.append(received / elapsed / MB)
        await workload.signal(9)
        await sandbox.destroy()
    finally:
        with contextlib.suppress(Exception):
            await machine.kill()
        lan.close()


def plain_qemu_command(state: Path, kernel: Path, initrd: Path, console: Path) -> list[str]:
    from husk.vm.machine import MachineConfig
    from husk.vm.qemu import qemu_binary
    from husk.vm.qemu_argv import AGENT_PORT_NAME, TCG_CPU, TCG_TB_MIB, kernel_cmdline

    # Same kernel command line and CPU model as husk, so only husk's additions differ.
    config = MachineConfig(kernel=kernel, initrd=initrd, state_dir=state)
    append = kernel_cmdline(config, accel="tcg", boot_time_ns=time.time_ns())
    return [
        qemu_binary(),
        "-M",
        "microvm,x-option-roms=off",
        "-accel",
        f"tcg,tb-size={TCG_TB_MIB}",
        "-cpu",
        TCG_CPU,
        "-m",
        f"{GUEST_MEMORY_MIB}M",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        append,
        "-serial",
        f"file:{console}",
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id=agent,path={state / 'agent.sock'},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        # Without an entropy source the guest's CPython blocks in getrandom() for seconds
        # at start-up: a floor without it would measure entropy starvation, not booting.
        "-object",
        "rng-random,filename=/dev/urandom,id=rng0",
        "-device",
        "virtio-rng-device,rng=rng0",
    ]


async def plain_once(work: Path, index: int, samples: Samples) -> None:
    from husk.agent.client import AgentClient
    from husk.bundle import locate

    bundle = locate()
    state = work / f"plain{index}"
    state.mkdir()
    console = state / "console.log"
    command = plain_qemu_command(state, bundle.kernel, bundle.initrd, console)
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def check_alive() -> None:
        if process.poll() is not None:
            raise RuntimeError(f"plain QEMU exited {process.returncode}")

    try:
        client = await AgentClient.connect(
            state / "agent.sock", timeout=BOOT_TIMEOUT, check_alive=check_alive
        )
        samples.plain_ready.append(time.monotonic() - started)
        uptime = _uptime_at_ready(console)
        if uptime is not None:
            samples.plain_uptime.append(uptime)
        await asyncio.sleep(IDLE_SETTLE_SECONDS)
        samples.plain_rss_mb.append(benchlib.process_rss_bytes(process.pid) / MB)
        await client.close()
    finally:
        process.kill()
        process.wait(30)


async def measure_async(options: PartOptions) -> list[Figure]:
    benchlib.import_tests_helpers()
    from guestfs import busybox_erofs

    samples = Samples()
    with benchlib.scratch_root("hbg-") as work:
        image = busybox_erofs(work)
        for index in range(options.runs):
            progress(f"guest: run {index + 1}/{options.runs}: plain QEMU floor")
            await plain_once(work, index, samples)
            progress(f"guest: run {index + 1}/{options.runs}: husk sandbox")
            await husk_once(work, image, index, samples, options.quick)
    runs = options.runs
    execs = len(samples.exec_ms) // max(runs, 1)
    transfers = len(samples.throughput) // max(runs, 1)
    return [
        Figure(
            SECTION,
            "cold boot to agent READY (QEMU spawn → READY)",
            "s",
            samples.ready,
            READY_CMD,
            Target("<=", 3.0, "issue 2"),
        ),
        Figure(
            SECTION,
            "plain QEMU microvm, same kernel + initramfs, spawn → READY",
            "s",
            samples.plain_ready,
            PLAIN_CMD,
            peer=True,
        ),
        Figure(
            SECTION,
            "guest uptime when the agent is ready (husk VM)",
            "s",
            samples.uptime,
            "parsed from console.log: 'husk-agent: ready after Ns of uptime'",
            note="time inside the guest (kernel, modules, CPython, agent); the rest of the boot "
            "is QEMU's own start-up and the host's side of the handshake",
        ),
        Figure(
            SECTION,
            "guest uptime when the agent is ready (plain QEMU)",
            "s",
            samples.plain_uptime,
            "parsed from the plain QEMU's console",
            peer=True,
        ),
        Figure(
            SECTION,
            "QEMU spawn → container root assembled (READY + PREPARE)",
            "s",
            samples.prepared,
            "AgentClient.prepare(image=husk-image, upper=None) after READY",
        ),
        Figure(
            SECTION,
            "exec round trip of `true`",
            "ms",
            samples.exec_ms,
            "client.exec(ProcessSpec(['true'])) + wait(), in a booted sandbox",
            Target("<=", 50.0, "issue 2"),
            runs_label=f"{runs} VMs x {execs}",
        ),
        Figure(
            SECTION,
            "guest→host stdout throughput",
            "MB/s",
            samples.throughput,
            f"exec `dd if=/dev/zero bs={DD_BLOCK} count={DD_COUNT}`, bytes received / wall time",
            Target(">=", 100.0, "issue 2"),
            runs_label=f"{runs} VMs x {transfers}",
        ),
        Figure(
            SECTION,
            f"QEMU RSS of an idle {GUEST_MEMORY_MIB} MiB VM",
            "MB",
            samples.rss_mb,
            f"/proc/PID/statm of QEMU, `sleep` workload running, {IDLE_SETTLE_SECONDS:.0f} s "
            "after the root is assembled",
            Target("<=", 150.0, "issue 2"),
        ),
        *(
            Figure(
                SECTION,
                f"  of which: {label}" if part != "pss" else f"  {label}",
                "MB",
                samples.parts.get(part, []),
                "/proc/PID/smaps of the same QEMU at the same moment",
            )
            for part, label in RSS_PARTS
        ),
        Figure(
            SECTION,
            f"plain QEMU RSS, idle {GUEST_MEMORY_MIB} MiB VM at READY",
            "MB",
            samples.plain_rss_mb,
            f"/proc/PID/statm {IDLE_SETTLE_SECONDS:.0f} s after READY",
            peer=True,
        ),
    ]


def measure(options: PartOptions) -> list[Figure]:
    return asyncio.run(measure_async(options))


if __name__ == "__main__":
    benchlib.part_main("guest", __doc__.split("\n\n")[0], measure)
