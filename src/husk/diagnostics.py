"""``husk system check``: what this host runs VMs with, proven by a real boot."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from husk.agent.client import AgentClient
from husk.bundle import locate
from husk.errors import HuskError
from husk.guest.netconfig import GUEST_GATEWAY
from husk.sandbox import template_failures
from husk.sandbox.accel import probe_machine
from husk.sandbox.provisioner import default_provisioner
from husk.vm import jail
from husk.vm.qemu import qemu_binary, qemu_version

PROBE_MEMORY_MIB = 256
PROBE_TIMEOUT = 60.0


@dataclass
class ProbeBoot:
    """One VM booted until its agent answered."""

    accel: str
    ok: bool = False
    first_console_byte_s: float | None = None
    """From spawning QEMU to the first byte on the serial console."""
    agent_ready_s: float | None = None
    """From spawning QEMU to the agent's READY."""
    rss_bytes: int | None = None
    """QEMU's resident memory once the agent is ready."""
    agent: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class CheckReport:
    qemu_binary: str | None = None
    qemu_version: str | None = None
    accel: str | None = None
    accel_reason: str | None = None
    bundle_dir: str | None = None
    bundle_digest: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    probe: ProbeBoot | None = None
    mode: str = "root"
    """"root" or "rootless" (an unprivileged user: what differs is in ``limits``)."""
    limits: list[str] = field(default_factory=list)
    """What this user cannot have, each with how to get it (rootless mode)."""
    template_failures: list[str] = field(default_factory=list)
    """Templates remembered as impossible here: those shapes boot cold."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


async def _first_console_byte(console: Path, started_at: float) -> float:
    while True:
        with contextlib.suppress(OSError):
            if console.stat().st_size > 0:
                return time.monotonic() - started_at
        await asyncio.sleep(0.005)


async def probe_boot(
    kernel: Path, initrd: Path, accel: str, *, timeout: float = PROBE_TIMEOUT
) -> ProbeBoot:
    """Boots a throwaway VM and times it up to the agent's READY.

    A failed boot keeps its state directory (console.log, qemu.log) for inspection.
    """
    result = ProbeBoot(accel=accel)
    machine = probe_machine(default_provisioner().backend, kernel, initrd, accel, "check-")
    state_dir = machine.state_dir
    watcher: asyncio.Task[float] | None = None
    try:
        started_at = time.monotonic()
        deadline = started_at + timeout
        await machine.boot(timeout=timeout)
        watcher = asyncio.create_task(_first_console_byte(machine.console_log, started_at))
        client = await AgentClient.connect(
            machine.agent_socket,
            timeout=max(0.1, deadline - time.monotonic()),
            check_alive=machine.check_alive,
        )
        result.agent_ready_s = round(time.monotonic() - started_at, 3)
        result.agent = dict(client.ready)
        result.rss_bytes = machine.rss_bytes()
        await client.close()
        if watcher.done():
            result.first_console_byte_s = round(watcher.result(), 3)
        result.ok = True
    except HuskError as err:
        result.error = str(err)
    finally:
        if watcher is not None:
            watcher.cancel()
        with contextlib.suppress(Exception):
            await machine.kill()
        if result.ok:
            shutil.rmtree(state_dir, ignore_errors=True)
    return result


UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


def rootless_limits() -> list[str]:
    """What an unprivileged user's containers lack on this host, each with its fix."""
    limits: list[str] = []
    if not jail.jail_disabled():
        works, why = jail.rootless_jail_works()
        if not works:
            limits.append(
                f"QEMU runs without namespaces: unprivileged user namespaces are refused "
                f"({why}); fix: sysctl kernel.unprivileged_userns_clone=1"
            )
    if not os.access(jail.TUN_DEVICE, os.R_OK | os.W_OK):
        limits.append(
            f"containers have no network egress and do not reach published ports at the "
            f"gateway ({GUEST_GATEWAY}): {jail.TUN_DEVICE} is not usable by this user; "
            f"fix (as root): chmod 0666 {jail.TUN_DEVICE} (Debian's default)"
        )
    try:
        start = int(UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        start = 1024
    if start > 0:
        limits.append(
            f"host ports below {start} cannot be published (-p); fix (as root): "
            f"sysctl net.ipv4.ip_unprivileged_port_start=0, or publish a higher port"
        )
    return limits


async def run_check(*, boot: bool = True, probe_timeout: float = PROBE_TIMEOUT) -> CheckReport:
    """Gathers every fact it can; each failure becomes a problem, not an exception."""
    report = CheckReport()
    if os.geteuid() != 0:
        report.mode = "rootless"
        report.limits = rootless_limits()
    report.template_failures = [
        template_failures.describe(record) for record in template_failures.list_failures()
    ]
    try:
        report.qemu_binary = qemu_binary()
        report.qemu_version = qemu_version(report.qemu_binary)
    except HuskError as err:
        report.problems.append(f"QEMU: {err}")
    bundle = None
    try:
        bundle = locate()
        report.bundle_dir = str(bundle.kernel.parent)
        report.bundle_digest = bundle.digest
        report.kernel = str(bundle.kernel)
        report.initrd = str(bundle.initrd)
    except HuskError as err:
        report.problems.append(f"bundle: {err}")
    if report.qemu_binary is None or bundle is None:
        return report
    try:
        choice = await default_provisioner().accel(bundle.kernel, bundle.initrd)
        report.accel, report.accel_reason = choice.name, choice.reason
    except HuskError as err:
        report.problems.append(f"accelerator: {err}")
        return report
    if boot:
        report.probe = await probe_boot(
            bundle.kernel, bundle.initrd, choice.name, timeout=probe_timeout
        )
        if report.probe.error is not None:
            report.problems.append(f"probe boot: {report.probe.error}")
    return report


def format_report(report: CheckReport) -> list[str]:
    def show(value: object) -> str:
        return "-" if value is None else str(value)

    lines = [
        f"mode:          {report.mode}",
        *[f"  limit: {limit}" for limit in report.limits],
        f"QEMU:          {show(report.qemu_version)} ({show(report.qemu_binary)})",
        f"accelerator:   {show(report.accel)} ({show(report.accel_reason)})",
        f"bundle:        {show(report.bundle_digest)} ({show(report.bundle_dir)})",
    ]
    probe = report.probe
    if probe is not None:
        if probe.ok:
            rss = f"{probe.rss_bytes / 2**20:.0f} MiB" if probe.rss_bytes else "-"
            lines += [
                f"probe boot:    ok under {probe.accel}, {PROBE_MEMORY_MIB} MiB guest",
                f"  QEMU start -> first console byte: {show(probe.first_console_byte_s)} s",
                f"  QEMU start -> agent ready:        {show(probe.agent_ready_s)} s",
                f"  QEMU resident memory:             {rss}",
            ]
        else:
            lines.append(f"probe boot:    FAILED under {probe.accel}")
    for failure in report.template_failures:
        lines.append(f"templates:     off for one shape: {failure}")
    if report.template_failures:
        lines.append("  (retried when the bundle, QEMU or host changes, or with --retry-templates)")
    lines.append("status:        " + ("ok" if report.ok else "FAILED"))
    lines += [f"  problem: {problem}" for problem in report.problems]
    return lines
