"""Where a templated start goes, stage by stage, in seconds and in guest code translated.

    python bench/bench_start.py [--runs 7] [--bundle DIR ...] [--json]
    python bench/bench_start.py --baseline REV [--runs 10] [--json]

Each run restores a VM from its boot template at the Sandbox level (real QEMU, TCG) and
walks the steps the runtime takes for ``husk run --rm busybox true`` on the default
bridge network: wake-up and identity (entropy, clock, MAC), PREPARE (the container
root), NETWORK (a default-bridge body: one LAN with its address, egress, /etc/hosts),
RUN ``true`` until its exit. Per stage it reports the wall time and how many
translation blocks QEMU's TCG translated (``info jit``): a restored VM has no translated
code, so every guest path it runs for the first time is translated again, and that
count does not depend on how busy the host is, where every time here does.

With several ``--bundle`` directories (guest bundles built from different sources, e.g.
one from a baseline commit) the runs alternate between them, run by run, so host load
falls on each alike. Everything runs in a scratch directory that is deleted afterwards;
no traffic leaves the VMs (their LANs are unplugged socketpairs).

``--root-ready`` pairs each start with one restored from the image's root-ready snapshot
(its root assembled before the save: no PREPARE, only the identity written, counted in
"woken"). ``--root-ready-cli`` pairs end to end this checkout with root-ready snapshots
(config.json's ``root_ready``) against the same checkout without; with ``--baseline REV
--root-ready`` this checkout has them on. An installation that has them on waits for its
snapshot's background build after its first start.

``--baseline REV`` measures end to end instead, paired: two installations (REV's sources
in a git worktree and this checkout, each with its own bundle, image and daemon, as
bench_hardening.py makes them) alternate ``husk run --rm busybox true``; per run the
wall time and the host CPU it cost: the CLI process (its rusage) plus the daemon and
every child it reaped meanwhile (QEMU, mkfs.ext4, slirp4netns: /proc/PID/stat's
utime, stime, cutime, cstime), which other work on the host does not inflate the way
it inflates wall times. ``--podman`` adds ``podman run --rm --network none`` of the same
image (loaded from ``husk save``, podman with a containers.conf, root and runroot of its
own in the scratch directory, runtime runc) to the alternation: the issue's peer.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_templates

REPO = Path(__file__).resolve().parent.parent
UPPER_BYTES = 8 * 1024**3
STAGES = ("woken", "prepared", "networked", "exited")
BRIDGE_MAC = "02:42:ac:11:00:02"


def network_body(hostname: str) -> dict[str, Any]:
    """What the runtime sends a container on Docker's default bridge (its first one)."""
    return {
        "egress": True,
        "lans": [
            {
                "slot": 1,
                "mac": BRIDGE_MAC,
                "address": "172.17.0.2/16",
                "mtu": 65520,
                "gateway": "172.17.0.1",
                "routes": [],
            }
        ],
        "unreachable": [],
        "names": None,
        "dns": {"servers": [], "search": [], "options": []},
        "hosts": {"hostname": hostname, "address": "172.17.0.2", "extra": []},
    }


def use_bundle(directory: Path, data_dir: Path) -> None:
    """Boots ``directory``'s bundle from now on, with its templates in ``data_dir`` (one
    per bundle: a template of another bundle counts as stale and would be pruned)."""
    os.environ["HUSK_KERNEL"] = str(directory / "vmlinux")
    os.environ["HUSK_INITRD"] = str(directory / "initramfs.cpio")
    os.environ["HUSK_DATA_DIR"] = str(data_dir)


async def translated_blocks(machine: Any) -> int:
    """QEMU's count of translation blocks since the restore (its one flush is the load)."""
    report = await machine._execute(  # a benchmark looks inside: the monitor is QEMU's
        "human-monitor-command", {"command-line": "info jit"}, timeout=10
    )
    for line in str(report).splitlines():
        if line.startswith("TB count"):
            return int(line.split()[-1])
    raise RuntimeError(f"no TB count in QEMU's report: {report!r}")


async def flushes(machine: Any) -> int:
    """How many times QEMU flushed its whole translation cache (a full cache does)."""
    report = await machine._execute(
        "human-monitor-command", {"command-line": "info jit"}, timeout=10
    )
    for line in str(report).splitlines():
        if line.startswith("TB flush count"):
            return int(line.split()[-1])
    raise RuntimeError(f"no TB flush count in QEMU's report: {report!r}")


async def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    from guestfs import busybox_erofs
    from husk import settings
    from husk.agent.client import ProcessSpec
    from husk.oci.rootfs import make_ext4_disk
    from husk.sandbox import rootready_boot, template_boot
    from husk.sandbox.config import SandboxConfig, machine_config, prepare_root
    from husk.sandbox.lan import LanPorts
    from husk.vm.machine import random_mac

    image = busybox_erofs(scratch)
    bundles = [Path(b) for b in args.bundle]
    counter = iter(range(1_000_000))
    # --root-ready: each bundle's start the ordinary way (shape template, then PREPARE)
    # paired with one restored from the image's root-ready snapshot.
    modes = [(b, False) for b in bundles]
    if args.root_ready:
        modes += [(b, True) for b in bundles]
        settings.ROOT_READY_DEFAULT = True  # as config.json's "root_ready" (off by default)

    def label(bundle: Path, root_ready: bool) -> str:
        return f"{bundle} (root-ready)" if root_ready else str(bundle)

    async def one_start(bundle: Path, root_ready: bool = False) -> dict[str, float]:
        use_bundle(bundle, scratch / f"data{bundles.index(bundle)}")
        number = next(counter)
        upper = scratch / f"upper{number}.ext4"
        make_ext4_disk(upper, UPPER_BYTES)
        config = SandboxConfig(
            state_dir=scratch / "run" / "vms" / f"s{number}",
            image_disk=image,
            upper_disk=upper,
            hostname=f"start{number}",
            mac=random_mac(),
            memory_bytes=args.memory * 1024 * 1024,
            hosts_later=True,
            root_ready=root_ready,
        )
        lan = LanPorts()

        async def no_prepare(_client: Any) -> None:
            return None

        began = time.monotonic()
        restored = None
        if root_ready:
            # Restored with its root assembled and its identity written ("woken").
            restored = await rootready_boot.try_launch(
                config, machine_config(config, lan.qemu_fds()), timeout=60, provisioner=None
            )
            if restored is None:
                raise RuntimeError("no root-ready snapshot to start from")
        launched = restored or await template_boot.launch(
            machine_config(config, lan.qemu_fds()), no_prepare, pad=[image]
        )
        figures: dict[str, float] = {}
        try:
            if launched.path != "template":
                raise RuntimeError(f"booted cold: {launched.reason}")
            lan.release_vm_ends()
            client, machine = launched.client, launched.machine
            figures["woken_s"] = time.monotonic() - began
            figures["woken_tb"] = await translated_blocks(machine)
            mark = time.monotonic()
            if not root_ready:
                await prepare_root(client, config)
            figures["prepared_s"] = time.monotonic() - mark
            figures["prepared_tb"] = await translated_blocks(machine)
            mark = time.monotonic()
            await client.configure_network(network_body(config.hostname))
            figures["networked_s"] = time.monotonic() - mark
            figures["networked_tb"] = await translated_blocks(machine)
            mark = time.monotonic()
            process = await client.run(ProcessSpec(argv=["true"]))
            code = await process.wait()
            figures["exited_s"] = time.monotonic() - mark
            figures["exited_tb"] = await translated_blocks(machine)
            if code != 0:
                raise RuntimeError(f"`true` exited {code}")
            figures["total_s"] = time.monotonic() - began
        finally:
            await launched.client.close()
            await launched.machine.kill()
            lan.close()
            upper.unlink(missing_ok=True)
        # Per stage: the blocks it translated (the counter only grows within one VM).
        previous = 0.0
        for stage in STAGES:
            total = figures[f"{stage}_tb"]
            figures[f"{stage}_tb"] = total - previous
            previous = total
        figures["total_tb"] = previous
        return figures

    # The first start of each bundle builds its template (not measured); with
    # --root-ready, a first try also has the image's snapshot built (waited for).
    for bundle in bundles:
        await one_start(bundle)
        if args.root_ready:
            with contextlib.suppress(RuntimeError):
                await one_start(bundle, True)
            await rootready_boot.wait_for_builds()
    samples: dict[str, list[dict[str, float]]] = {label(*mode): [] for mode in modes}
    for _ in range(args.runs):
        for mode in modes:
            samples[label(*mode)].append(await one_start(*mode))
    results: dict[str, Any] = {"runs": args.runs, "memory_mib": args.memory, "bundles": {}}
    keys = [f"{stage}_{unit}" for stage in (*STAGES, "total") for unit in ("s", "tb")]
    for bundle, runs in samples.items():
        results["bundles"][bundle] = summarised({k: [run[k] for run in runs] for k in keys})
    results["load_average"] = os.getloadavg()
    return results


POOL_STAGES = ("taken", "networked", "exited")
POOL_MODES = ("rehearsed", "not rehearsed")


async def measure_pool(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """A start from a warm pool of one VM, with and without the VM's rehearsal, paired.

    Per run and mode: a pool fills one VM (restored; rehearsed or not), then a start
    takes it (its disks, identity and PREPARE: "taken"), sends a default-bridge NETWORK
    and runs ``true`` to its exit; per stage the wall time and the blocks QEMU
    translated. Also per mode: the QEMU CPU seconds the rehearsal cost, and the idle
    VM's RSS just before the start takes it.
    """
    sys.path.insert(0, str(REPO / "tests"))
    from guestfs import busybox_erofs
    from husk.agent.client import ProcessSpec
    from husk.oci.rootfs import make_ext4_disk
    from husk.sandbox.config import SandboxConfig
    from husk.sandbox.pool import PoolShape, WarmPool
    from husk.vm.machine import random_mac

    image = busybox_erofs(scratch)
    memory = args.memory * 1024 * 1024
    counter = iter(range(1_000_000))
    slots = asyncio.Semaphore(2)

    async def one_start(rehearse: bool) -> dict[str, float]:
        pool = WarmPool(1, PoolShape(memory_bytes=memory), slots, upper_disk_bytes=UPPER_BYTES)
        pool.rehearse = rehearse
        figures: dict[str, float] = {}
        box = None
        number = next(counter)
        upper = scratch / f"upper{number}.ext4"
        try:
            pool.refill()
            deadline = time.monotonic() + 120
            while not pool._idle:  # a benchmark looks inside
                if pool._filler is not None and pool._filler.done() and not pool._idle:
                    raise RuntimeError(f"the pool did not fill: {pool.last_error}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the pool did not fill in 120 s")
                await asyncio.sleep(0.05)
            vm = pool._idle[0]
            figures["rehearsal_cpu_s"] = pool.rehearsal_cpu_seconds
            figures["idle_rss_mb"] = vm.machine.rss_bytes() / 1e6
            pool.size = 0  # no refill behind the start being measured
            make_ext4_disk(upper, UPPER_BYTES)
            config = SandboxConfig(
                state_dir=scratch / "run" / "vms" / f"p{number}",
                image_disk=image,
                upper_disk=upper,
                hostname=f"start{number}",
                mac=random_mac(),
                memory_bytes=memory,
                hosts_later=True,
            )
            cpu0 = vm.machine.cpu_seconds()
            flushed = await flushes(vm.machine)
            before = await translated_blocks(vm.machine)
            began = time.monotonic()
            box = await pool.take(config)
            if box is None:
                raise RuntimeError("the start did not take the pooled VM")
            figures["taken_s"] = time.monotonic() - began
            figures["taken_tb"] = await translated_blocks(box.machine)
            mark = time.monotonic()
            await box.client.configure_network(network_body(config.hostname))
            figures["networked_s"] = time.monotonic() - mark
            figures["networked_tb"] = await translated_blocks(box.machine)
            mark = time.monotonic()
            process = await box.client.run(ProcessSpec(argv=["true"]))
            code = await process.wait()
            figures["exited_s"] = time.monotonic() - mark
            figures["exited_tb"] = await translated_blocks(box.machine)
            figures["total_s"] = time.monotonic() - began
            figures["start_cpu_s"] = box.machine.cpu_seconds() - cpu0
            figures["flushes"] = await flushes(box.machine) - flushed
            figures["cached_tb"] = float(before)
            if code != 0:
                raise RuntimeError(f"`true` exited {code}")
        finally:
            if box is not None:
                await box.client.close()
                await box.machine.kill()
                box.lan.close()
            await pool.close()
            upper.unlink(missing_ok=True)
        previous = float(before)
        for stage in POOL_STAGES:
            total = figures[f"{stage}_tb"]
            figures[f"{stage}_tb"] = total - previous
            previous = total
        figures["total_tb"] = previous - before
        return figures

    await one_start(True)  # builds the template (not measured)
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in POOL_MODES}
    for index in range(args.runs):
        order = POOL_MODES if index % 2 == 0 else tuple(reversed(POOL_MODES))
        for mode in order:
            samples[mode].append(await one_start(mode == "rehearsed"))
    keys = [f"{stage}_{unit}" for stage in (*POOL_STAGES, "total") for unit in ("s", "tb")]
    keys += ["start_cpu_s", "rehearsal_cpu_s", "idle_rss_mb", "flushes", "cached_tb"]
    results: dict[str, Any] = {"runs": args.runs, "memory_mib": args.memory, "modes": {}}
    for mode, runs in samples.items():
        results["modes"][mode] = summarised({k: [run[k] for run in runs] for k in keys})
    results["load_average"] = os.getloadavg()
    return results


def print_stage_table(
    columns: dict[str, dict[str, Any]], headers: list[str], stages: tuple[str, ...]
) -> None:
    """One markdown row per stage (and the total): seconds and translated blocks of each
    column, median (min-max)."""
    print("| stage | " + " | ".join(headers) + " |")
    print("| --- |" + " --- | --- |" * len(columns))
    for stage in (*stages, "total"):
        cells = []
        for figures in columns.values():
            s, tb = figures[f"{stage}_s"], figures[f"{stage}_tb"]
            cells.append(
                f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) | "
                f"{tb['median']:.0f} ({tb['min']:.0f}-{tb['max']:.0f})"
            )
        print(f"| {stage} | " + " | ".join(cells) + " |")


def print_pool_table(results: dict[str, Any]) -> None:
    print(
        f"a start from a warm pool, median (min-max) of {results['runs']} paired runs, "
        f"{results['memory_mib']} MiB guest"
    )
    print()
    modes = list(results["modes"])
    print_stage_table(results["modes"], [f"{m}: s | TBs" for m in modes], POOL_STAGES)
    print()
    for key, label in (
        ("start_cpu_s", "QEMU CPU s of the start"),
        ("rehearsal_cpu_s", "QEMU CPU s of the rehearsal"),
        ("idle_rss_mb", "idle pooled VM RSS MB"),
        ("cached_tb", "blocks in the cache when the start takes the VM"),
        ("flushes", "full-cache flushes during the start"),
    ):
        cells = []
        for mode in modes:
            f = results["modes"][mode][key]
            cells.append(f"{mode}: {f['median']:.3f} ({f['min']:.3f}-{f['max']:.3f})")
        print(f"{label}: " + "; ".join(cells))
    load = ", ".join(f"{x:.1f}" for x in results["load_average"])
    print(f"host load average at the end: {load}")


def print_table(results: dict[str, Any]) -> None:
    bundles = list(results["bundles"])
    print(f"median (min-max) of {results['runs']} paired runs, {results['memory_mib']} MiB guest")
    print()
    headers = [f"bundle {i + 1}: s | TBs" for i in range(len(bundles))]
    print_stage_table(results["bundles"], headers, STAGES)
    print()
    for index, bundle in enumerate(bundles):
        print(f"bundle {index + 1}: {bundle}")
    load = ", ".join(f"{x:.1f}" for x in results["load_average"])
    print(f"host load average at the end: {load}")


def daemon_cpu_seconds(run_dir: Path) -> tuple[float, float]:
    """CPU seconds of the installation's daemon itself, and of the children it reaped."""
    pid = int((run_dir / "husk.pid").read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    # utime stime | cutime cstime (fields 14-17 of proc(5), after the name)
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


class Podman:
    """podman with its configuration and storage in ``work``, the husk image loaded."""

    def __init__(self, work: Path, archive: Path, image: str) -> None:
        import benchlib

        self.base, self.env = benchlib.private_podman(work)
        self.image = image
        self._podman("load", "-i", str(archive))

    def _podman(self, *args: str) -> None:
        subprocess.run([*self.base, *args], env=self.env, check=True, capture_output=True)

    def run_rm_true(self) -> float:
        started = time.perf_counter()
        self._podman("run", "--rm", "--network", "none", self.image, "true")
        return time.perf_counter() - started

    def close(self) -> None:
        subprocess.run(
            [*self.base, "system", "reset", "-f"], env=self.env, capture_output=True, check=False
        )


ROOT_READY_WAIT = 180.0


def wait_for_root_ready(inst: Any) -> None:
    """After an installation's first start: until its image's root-ready snapshot is built
    in the background (sources that have them, unless switched off), so that the runs
    measure starts from it."""
    if not (inst.source / "src" / "husk" / "sandbox" / "rootready.py").exists():
        return
    config = inst.root / "data" / "config.json"
    if "root_ready" not in (config.read_text() if config.exists() else ""):
        return
    store = inst.root / "data" / "rootready"
    deadline = time.monotonic() + ROOT_READY_WAIT
    while time.monotonic() < deadline:
        if store.is_dir() and any(not p.name.startswith(".") for p in store.iterdir()):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{inst.name}: no root-ready snapshot after {ROOT_READY_WAIT:.0f} s")


def measure_cli(args: argparse.Namespace) -> dict[str, Any]:
    import benchlib
    from bench_hardening import IMAGE, Installation, baseline_checkout

    samples: dict[str, dict[str, list[float]]] = {}
    podman: Podman | None = None
    baseline = args.baseline or "HEAD"
    with benchlib.scratch_root("hbs") as scratch, baseline_checkout(baseline, scratch) as old:
        pair = [
            Installation(f"before ({args.baseline})", old, scratch / "b"),
            Installation("after (this checkout)", benchlib.REPO_ROOT, scratch / "a"),
        ]
        if args.root_ready_cli:
            pair = [
                Installation("root-ready off", benchlib.REPO_ROOT, scratch / "b"),
                Installation("root-ready on", benchlib.REPO_ROOT, scratch / "a"),
            ]
        for inst in pair:
            inst.prepare()
            # The pycs an installed package has: with PYTHONDONTWRITEBYTECODE set (this
            # host's environment) a source tree is compiled again by every CLI command,
            # which the CLI's CPU per start would count (a git worktree has none).
            compileall.compile_dir(inst.source / "src", quiet=1)
            if inst is pair[-1] and (args.root_ready_cli or args.root_ready):
                # this checkout, with root-ready snapshots (off by default: config.json)
                (inst.root / "data" / "config.json").write_text('{"root_ready": true}')
            inst.husk("run", "--rm", IMAGE, "true")  # starts the daemon, builds the template
            wait_for_root_ready(inst)
            samples[inst.name] = {
                key: [] for key in ("wall_s", "cpu_s", "cli_cpu_s", "daemon_cpu_s", "vm_cpu_s")
            }
        if args.podman:
            archive = scratch / "busybox.tar"
            pair[1].husk("save", "-o", str(archive), IMAGE)
            podman = Podman(scratch / "podman", archive, IMAGE)
            podman.run_rm_true()  # warm-up
            samples["podman --network none"] = {"wall_s": []}
        try:
            run_pairs(args, pair, podman, samples)
        finally:
            if podman is not None:
                podman.close()
    installations = {name: summarised(figures) for name, figures in samples.items()}
    results: dict[str, Any] = {"runs": args.runs, "installations": installations}
    results["load_average"] = os.getloadavg()
    return results


def summarised(figures: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, min and max of each figure's samples."""
    return {
        key: {"median": statistics.median(values), "min": min(values), "max": max(values)}
        for key, values in figures.items()
    }


def run_pairs(
    args: argparse.Namespace,
    pair: list[Any],
    podman: Podman | None,
    samples: dict[str, dict[str, list[float]]],
    before: Callable[[Any], None] | None = None,
) -> None:
    """``before(installation)`` runs ahead of each of its starts, outside the measure."""
    import benchlib
    from bench_hardening import IMAGE

    for index in range(args.runs):
        if podman is not None:
            samples["podman --network none"]["wall_s"].append(podman.run_rm_true())
        if getattr(args, "interpreter", False):
            # What the host itself does to a Python start (the CLI pays it on every command).
            for python in (sys.executable, "/usr/bin/python3"):
                started = time.perf_counter()
                subprocess.run([python, "-c", "pass"], check=True)
                samples.setdefault(f"{python} -c pass", {"wall_s": []})["wall_s"].append(
                    time.perf_counter() - started
                )
        for inst in pair if index % 2 == 0 or before is None else list(reversed(pair)):
            if before is not None:
                before(inst)
            benchlib.progress(f"start: run --rm true ({inst.name}) {index + 1}/{args.runs}")
            run_dir = inst.root / "run"
            daemon_before = daemon_cpu_seconds(run_dir)
            cli_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall = inst.husk("run", "--rm", IMAGE, "true")
            cli_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            # The daemon reaps QEMU once it has exited: give it a moment to.
            time.sleep(0.3)
            daemon_after = daemon_cpu_seconds(run_dir)
            daemon = daemon_after[0] - daemon_before[0]
            children = daemon_after[1] - daemon_before[1]  # QEMU, mkfs.ext4, slirp4netns
            cli = (cli_after.ru_utime - cli_before.ru_utime) + (
                cli_after.ru_stime - cli_before.ru_stime
            )
            figures = samples[inst.name]
            figures["wall_s"].append(wall)
            figures["cpu_s"].append(cli + daemon + children)
            figures["cli_cpu_s"].append(cli)
            figures["daemon_cpu_s"].append(daemon)
            figures["vm_cpu_s"].append(children)


POOL_SIZE = 1


def measure_pool_cli(args: argparse.Namespace) -> dict[str, Any]:
    """End to end from a warm pool, paired: two daemons of this checkout, each keeping a
    pool of one VM, one rehearsing each pooled VM's start and one not
    (HUSK_NO_REHEARSAL=1), alternating ``husk run --rm busybox true`` (the pool full
    again before each run, outside the measure), with podman in the alternation when
    asked. Host CPU per start counts the QEMU reaped during the run: the pooled VM the
    start took, over its whole life (restore, rehearsal, idle ticks, the start)."""
    import benchlib
    from bench_hardening import IMAGE, Installation

    class Configured(Installation):
        extra: dict[str, str] = {}

        @property
        def env(self) -> dict[str, str]:
            return {**super().env, **self.extra}

    samples: dict[str, dict[str, list[float]]] = {}
    podman: Podman | None = None
    warm = ("system", "warm", "--pool", str(POOL_SIZE))
    with benchlib.scratch_root("hbp") as scratch:
        rehearsed = Configured("pool, rehearsed", benchlib.REPO_ROOT, scratch / "a")
        plain = Configured("pool, not rehearsed", benchlib.REPO_ROOT, scratch / "b")
        plain.extra = {"HUSK_NO_REHEARSAL": "1"}
        pair = [rehearsed, plain]
        for inst in pair:
            inst.prepare()
            # The pycs an installed package has: with PYTHONDONTWRITEBYTECODE set (this
            # host's environment) a source tree is compiled again by every CLI command,
            # which the CLI's CPU per start would count (a git worktree has none).
            compileall.compile_dir(inst.source / "src", quiet=1)
            inst.husk("run", "--rm", IMAGE, "true")  # starts the daemon, builds the template
            inst.husk(*warm)
            samples[inst.name] = {
                key: [] for key in ("wall_s", "cpu_s", "cli_cpu_s", "daemon_cpu_s", "vm_cpu_s")
            }
        if args.podman:
            archive = scratch / "busybox.tar"
            pair[0].husk("save", "-o", str(archive), IMAGE)
            podman = Podman(scratch / "podman", archive, IMAGE)
            podman.run_rm_true()  # warm-up
            samples["podman --network none"] = {"wall_s": []}
        try:
            run_pairs(args, pair, podman, samples, before=lambda inst: inst.husk(*warm))
            reports = {}
            for inst in pair:
                inst.husk(*warm)
                time.sleep(5)
                report = inst.python(
                    "-c", "from husk.cli.main import main; main()", *warm, "--json"
                )
                reports[inst.name] = json.loads(report)["pool"]
        finally:
            if podman is not None:
                podman.close()
    results: dict[str, Any] = {
        "runs": args.runs,
        "installations": {n: summarised(f) for n, f in samples.items()},
        "pools": reports,
    }
    results["load_average"] = os.getloadavg()
    return results


def print_cli_table(results: dict[str, Any]) -> None:
    print(f"`husk run --rm busybox true`, median (min-max) of {results['runs']} paired runs")
    print()
    columns = ("wall_s", "cpu_s", "cli_cpu_s", "daemon_cpu_s", "vm_cpu_s")
    print(
        "| installation | wall time s | host CPU s per start | of it: CLI | daemon "
        "| daemon's children (QEMU, mkfs, slirp4netns) |"
    )
    print("| --- |" + " --- |" * len(columns))
    for name, figures in results["installations"].items():
        cells = [
            f"{figures[key]['median']:.3f} ({figures[key]['min']:.3f}-{figures[key]['max']:.3f})"
            if key in figures
            else ""
            for key in columns
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    figures = results["installations"]
    peer = figures.get("podman --network none")
    if peer is not None:
        for name in figures:
            if name != "podman --network none" and not name.endswith("-c pass"):
                ratio = figures[name]["wall_s"]["median"] / peer["wall_s"]["median"]
                print(f"\n{name} / podman (medians, same run): {ratio:.2f} x", end="")
        print()
    load = ", ".join(f"{x:.1f}" for x in results["load_average"])
    print(f"\nhost load average at the end: {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--memory", type=int, default=512, help="guest memory in MiB")
    parser.add_argument(
        "--bundle",
        action="append",
        default=[],
        help="a guest bundle directory (repeat to compare; default: the installed one)",
    )
    parser.add_argument(
        "--baseline", help="a git revision: pair `husk run --rm` against its sources instead"
    )
    parser.add_argument(
        "--podman", action="store_true", help="with --baseline: podman runs in the pairing too"
    )
    parser.add_argument(
        "--interpreter",
        action="store_true",
        help="with --baseline: `python3 -c pass` (this one and /usr/bin's) in the pairing too",
    )
    parser.add_argument(
        "--pool",
        action="store_true",
        help="a start from a warm pool, its VM rehearsed or not (paired), at the VM level",
    )
    parser.add_argument(
        "--pool-cli",
        action="store_true",
        help="end to end from a warm pool: rehearsed against not rehearsed (with --podman)",
    )
    parser.add_argument(
        "--root-ready",
        action="store_true",
        help="at the VM level: a start from the image's root-ready snapshot paired with one "
        "from the shape template",
    )
    parser.add_argument(
        "--root-ready-cli",
        action="store_true",
        help="end to end: this checkout with root-ready snapshots against it with "
        "HUSK_NO_ROOT_READY=1 (with --podman, --interpreter)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.pool_cli:
        os.environ.setdefault("HUSK_ACCEL", "tcg")
        pool_results = measure_pool_cli(args)
        if args.json:
            print(json.dumps(pool_results, indent=2))
        else:
            print_cli_table(pool_results)
            for name, report in pool_results["pools"].items():
                print(
                    f"{name}: idle pooled VM RSS {report['rss_bytes'] / 1e6:.1f} MB, "
                    f"idle CPU {report['cpu_percent']} %, rehearsal "
                    f"{report.get('rehearsal_cpu_seconds', 0)} QEMU CPU-s"
                )
        return
    if args.baseline or args.root_ready_cli:
        os.environ.setdefault("HUSK_ACCEL", "tcg")
        cli_results = measure_cli(args)
        if args.json:
            print(json.dumps(cli_results, indent=2))
        else:
            print_cli_table(cli_results)
        return
    if not args.bundle:
        args.bundle = [os.environ.get("HUSK_BUNDLE_DIR", str(bench_templates.BUNDLE))]
    scratch = Path(tempfile.mkdtemp(prefix="husk-bs-", dir="/tmp"))
    try:
        bench_templates.setup_environment(scratch)
        results = asyncio.run((measure_pool if args.pool else measure)(args, scratch))
    finally:
        bench_templates.kill_leftovers(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    elif args.pool:
        print_pool_table(results)
    else:
        print_table(results)


if __name__ == "__main__":
    main()
