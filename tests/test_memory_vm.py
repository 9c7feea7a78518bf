"""A cold VM's memory (issue 16), real VM: what the guest frees goes back to the host, and
QEMU keeps no copy of the guest kernel or initramfs once the guest runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from husk.agent.client import ProcessSpec
from husk.guest.agent.system import PAGE_REPORTING_ORDER, REPORTED_ORDER
from husk.sandbox.sandbox import Sandbox, SandboxConfig
from husk.vm.machine import random_mac
from husk.vm.qemu_argv import GUEST_MEMORY_CMDLINE

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
HELD_MIB = 100
HOLD_SECONDS = 10
DEADLINE = 120.0
RECLAIM_WAIT = 30.0
"""The guest reports free pages about two seconds after they are freed."""


def qemu_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Rss in /proc/{pid}/smaps_rollup")


def boot_image_maps(pid: int, bundle_files: tuple[Path, ...]) -> dict[str, int]:
    """Resident kB of each QEMU mapping of the kernel or the initramfs, by mapping name."""
    names = {str(path) for path in bundle_files}
    resident: dict[str, int] = {}
    current = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            current = " ".join(fields[5:])
        elif fields[0] == "Rss:" and (current in names or "memfd:husk-" in current):
            resident[current] = resident.get(current, 0) + int(fields[1])
    return resident


async def wait_for_rss(pid: int, accept: object, what: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        rss = qemu_rss(pid)
        if accept(rss):  # type: ignore[operator]
            return rss
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: QEMU's RSS is {rss // MIB} MiB after {timeout:.0f} s")
        await asyncio.sleep(0.2)


def test_memory_freed_by_the_guest_leaves_the_qemu_process(
    busybox_disk: Path, tmp_path: Path, guest_bundle: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cold boot: its RAM is anonymous memory, which QEMU can give back page by page
    # (a template's clones map the template's RAM file and have no balloon).
    monkeypatch.setenv("HUSK_NO_TEMPLATE", "1")

    async def scenario() -> None:
        box = await Sandbox.boot(
            SandboxConfig(
                state_dir=tmp_path / "vm",
                image_disk=busybox_disk,
                upper_disk=None,
                hostname="memory-test",
                mac=random_mac(),
                memory_bytes=256 * MIB,
            )
        )
        try:
            pid = box.machine.pid
            assert pid is not None
            # QEMU booted from private copies of the kernel and initramfs, emptied once
            # the agent answered: none of their pages is left in its memory.
            bundle = guest_bundle
            maps = boot_image_maps(pid, (bundle.kernel, bundle.initrd))  # type: ignore[attr-defined]
            assert any("husk-kernel" in name for name in maps), maps
            assert any("husk-initrd" in name for name in maps), maps
            assert sum(maps.values()) == 0, maps
            await asyncio.sleep(3)  # boot-time frees reported
            idle = qemu_rss(pid)
            # dd's 100 MiB buffer, filled from /dev/zero, stays allocated while dd waits
            # to write it into a pipe nobody reads; when sleep ends, dd dies of SIGPIPE.
            # First, the granularity: free blocks below 2 MiB are reported too.
            # The guest kernel booted with its memory options (qemu_argv.GUEST_MEMORY_CMDLINE).
            script = (
                f"cat {PAGE_REPORTING_ORDER}; "
                "tr ' ' '\\n' </proc/cmdline | grep -e ^init_on_alloc= -e ^cgroup.memory=; "
                f"dd if=/dev/zero bs={HELD_MIB}M count=1 | sleep {HOLD_SECONDS}"
            )
            holder = await box.client.run(ProcessSpec(argv=["sh", "-c", script]))
            held = await wait_for_rss(
                pid, lambda rss: rss >= idle + 80 * MIB, "the guest's 100 MiB buffer", 60
            )
            _status, out, _err = await holder.collect()
            lines = out.decode().splitlines()
            assert int(lines[0]) == REPORTED_ORDER
            assert lines[1:3] == list(GUEST_MEMORY_CMDLINE), lines
            freed = await wait_for_rss(
                pid,
                lambda rss: rss <= idle + 30 * MIB,
                f"freed 100 MiB (idle {idle // MIB} MiB, holding {held // MIB} MiB)",
                RECLAIM_WAIT,
            )
            assert held - freed >= 70 * MIB
        finally:
            await box.client.close()
            await box.machine.kill()

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE))
