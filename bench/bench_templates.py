"""Boot templates against cold boots, at the VM and sandbox level (TCG, real QEMU).

    python bench/bench_templates.py [--runs 7] [--memory 512] [--json]

Figures (medians over ``--runs``):

* cold boot -> agent ready (QEMU spawned, HELLO/READY answered);
* template restore -> agent ready (QEMU started on the saved state, sha256 of
  the snapshot checked, READY answered), and the later stages of a restored start;
* restore + identity + prepare -> ``true`` run and exited, at the Sandbox level,
  against the same with a cold boot (``use_template=False``);
* QEMU RSS of an idle container (workload ``sleep``, 3 s after start) on both paths.

Everything runs in a private scratch directory that is deleted afterwards; no
network traffic leaves the VMs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import benchlib

REPO = Path(__file__).resolve().parent.parent
BUNDLE = Path("/var/lib/husk/bundle")
UPPER_BYTES = 8 * 1024**3
IDLE_SETTLE = 3.0


def setup_environment(scratch: Path) -> None:
    os.environ["HUSK_DATA_DIR"] = str(scratch / "data")
    os.environ["HUSK_RUN_DIR"] = str(scratch / "run")
    os.environ.setdefault("HUSK_ACCEL", "tcg")
    os.environ.pop("HUSK_NO_TEMPLATE", None)
    bundle = Path(os.environ.get("HUSK_BUNDLE_DIR", BUNDLE))
    os.environ.setdefault("HUSK_KERNEL", str(bundle / "vmlinux"))
    os.environ.setdefault("HUSK_INITRD", str(bundle / "initramfs.cpio"))


def kill_leftovers(scratch: Path) -> None:
    """Kills the processes this run started. QEMU gets its files as descriptors, so its
    command line may not name ``scratch``: its environment (HUSK_RUN_DIR) does."""
    benchlib.kill_processes_of(scratch)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    from guestfs import busybox_erofs
    from husk.agent.client import ProcessSpec
    from husk.oci.rootfs import make_ext4_disk
    from husk.sandbox import template_boot
    from husk.sandbox.config import IMAGE_SERIAL, UPPER_SERIAL, SandboxConfig, machine_config
    from husk.sandbox.lan import LanPorts
    from husk.sandbox.sandbox import Sandbox
    from husk.vm.machine import random_mac

    image = busybox_erofs(scratch)
    counter = iter(range(1_000_000))
    # Every VM has LAN_SLOTS LAN interfaces, each on a socketpair (their switch ends
    # stay unplugged here); the pairs are closed when the run ends.
    lans: list[LanPorts] = []

    def sandbox_machine(box: SandboxConfig) -> Any:
        lan = LanPorts()
        lans.append(lan)
        return machine_config(box, lan.qemu_fds())

    def config(*, use_template: bool = True) -> SandboxConfig:
        number = next(counter)
        upper = scratch / f"upper{number}.ext4"
        make_ext4_disk(upper, UPPER_BYTES)
        return SandboxConfig(
            state_dir=scratch / "run" / "vms" / f"b{number}",
            image_disk=image,
            upper_disk=upper,
            hostname=f"bench{number}",
            mac=random_mac(),
            memory_bytes=args.memory * 1024 * 1024,
            use_template=use_template,
        )

    def prepare_for(box: SandboxConfig) -> Callable[[Any], Awaitable[None]]:
        async def prepare(client: Any) -> None:
            await client.prepare(image=IMAGE_SERIAL, upper=UPPER_SERIAL, hostname=box.hostname)

        return prepare

    results: dict[str, Any] = {"runs": args.runs, "memory_mib": args.memory}

    # The first templated start builds the template (a VM of its own, booted cold
    # and saved), then restores it.
    first_config = config()
    first = await template_boot.launch(
        sandbox_machine(first_config), prepare_for(first_config), pad=[image]
    )
    assert first.built_template, first.reason
    results["first_start_with_build"] = {
        "seconds": round(first.seconds, 3),
        "stages": {k: round(v, 3) for k, v in first.stages.items()},
    }
    await first.machine.kill()

    cold_ready: list[float] = []
    for _ in range(args.runs):
        box_config = config(use_template=False)
        plan, _ = await template_boot.make_plan(sandbox_machine(box_config), pad=[image])
        assert plan is not None
        launched = await template_boot.cold_boot(plan.config, prepare_for(box_config))
        cold_ready.append(launched.stages["ready"])
        await launched.client.close()
        await launched.machine.kill()

    stages: dict[str, list[float]] = {}
    for _ in range(args.runs):
        box_config = config()
        launched = await template_boot.launch(
            sandbox_machine(box_config), prepare_for(box_config), pad=[image]
        )
        assert launched.path == "template", launched.reason
        for name, value in launched.stages.items():
            stages.setdefault(name, []).append(value)
        await launched.client.close()
        await launched.machine.kill()

    async def start_and_true(use_template: bool) -> tuple[float, str]:
        box_config = config(use_template=use_template)
        began = time.monotonic()
        box = await Sandbox.boot(box_config)
        process = await box.client.run(ProcessSpec(argv=["true"]))
        code = await process.wait()
        elapsed = time.monotonic() - began
        assert code == 0
        await box.client.close()
        await box.machine.kill()
        return elapsed, box.boot_path

    end_to_end: dict[str, list[float]] = {"template": [], "cold": []}
    for _ in range(args.runs):
        for use_template in (True, False):
            elapsed, path = await start_and_true(use_template)
            end_to_end[path].append(elapsed)

    async def idle_rss(use_template: bool) -> int:
        box = await Sandbox.boot(config(use_template=use_template))
        await box.client.run(ProcessSpec(argv=["sleep", "600"]))
        await asyncio.sleep(IDLE_SETTLE)
        rss = box.machine.rss_bytes()
        await box.client.close()
        await box.machine.kill()
        return rss

    rss: dict[str, list[float]] = {"template": [], "cold": []}
    for _ in range(max(3, args.runs // 2)):
        rss["template"].append(await idle_rss(True) / 1e6)
        rss["cold"].append(await idle_rss(False) / 1e6)

    for lan in lans:
        lan.close()
    snapshot = next((scratch / "data" / "templates").glob("*/vm.state"))
    memory = snapshot.with_name("memory.ram")
    results.update(
        {
            "cold_boot_to_agent_ready_s": round(median(cold_ready), 3),
            "restore_stages_s": {k: round(median(v), 3) for k, v in stages.items()},
            "restore_to_agent_ready_s": round(median(stages["ready"]), 3),
            "sandbox_start_and_true_s": {
                path: round(median(values), 3) for path, values in end_to_end.items()
            },
            "template_vs_cold_ratio": round(
                median(end_to_end["template"]) / median(end_to_end["cold"]), 3
            ),
            "idle_qemu_rss_mb": {path: round(median(values), 1) for path, values in rss.items()},
            "snapshot_mb": round(snapshot.stat().st_size / 1e6, 3),
            "memory_file_mb_on_disk": round(memory.stat().st_blocks * 512 / 1e6, 1),
            "load_average": os.getloadavg(),
        }
    )
    return results


def print_table(results: dict[str, Any]) -> None:
    rows = [
        ("cold boot -> agent ready", f"{results['cold_boot_to_agent_ready_s']:.3f} s"),
        ("template restore -> agent ready", f"{results['restore_to_agent_ready_s']:.3f} s"),
        *(
            (f"  restore stage: {name}", f"{value:.3f} s")
            for name, value in results["restore_stages_s"].items()
        ),
        (
            "Sandbox start + `true`, template",
            f"{results['sandbox_start_and_true_s']['template']:.3f} s",
        ),
        ("Sandbox start + `true`, cold", f"{results['sandbox_start_and_true_s']['cold']:.3f} s"),
        ("template / cold", f"{results['template_vs_cold_ratio']:.2f}"),
        ("idle QEMU RSS, template", f"{results['idle_qemu_rss_mb']['template']:.0f} MB"),
        ("idle QEMU RSS, cold", f"{results['idle_qemu_rss_mb']['cold']:.0f} MB"),
        ("template device state", f"{results['snapshot_mb'] * 1000:.0f} kB"),
        ("template memory file on disk", f"{results['memory_file_mb_on_disk']:.0f} MB"),
        ("first start (build + restore)", f"{results['first_start_with_build']['seconds']:.3f} s"),
    ]
    print(f"| figure (median of {results['runs']}, {results['memory_mib']} MiB guest) | value |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    load = ", ".join(f"{x:.1f}" for x in results["load_average"])
    print(f"\nhost load average during the run: {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--memory", type=int, default=512, help="guest memory in MiB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="husk-bt-", dir="/tmp"))
    try:
        setup_environment(scratch)
        results = asyncio.run(measure(args, scratch))
    finally:
        kill_leftovers(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
