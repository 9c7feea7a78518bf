"""Scaling curves (issue 16, items 2 and 5): start latency and memory with 1 to 50 idle
containers, log throughput with 10 containers writing at once; husk beside podman.

One isolated husk installation (data + run directories under /tmp, the installed guest
bundle, the busybox test image, templates on, a daemon its CLI starts on demand) and one
podman with its own containers.conf, --root and --runroot in the same scratch directory,
running the same busybox image (``husk save`` | ``podman load``), runc, no network.

First, on an installation of its own with HUSK_NO_TEMPLATE=1: the QEMU RSS of an idle
cold-booted 256 MiB VM (and where it goes: guest RAM, TCG code buffer, kernel and
initramfs maps, the rest), of the same VM while its guest holds 100 MiB, and 8 s after it
freed them (free-page reporting); after each, the RSS of one idle container of the same
size restored from that installation's boot template (daemon restarted with templates
on), split into the template's RAM pages it only read (shared by every clone), those it
wrote, the TCG buffer and the rest. With ``--baseline REV`` that part also runs REV's
sources (a git worktree with its own guest bundle, as bench_throughput does), alternating
run by run; ``--cold-only`` stops after it. Then, for each level N (1, 10, 20, 25, 50 idle
containers, ``sleep`` in each; husk's with ``-m MEMORY``): both engines are filled up to
N, left to settle, then

- memory per container: smem-style PSS (``/proc/PID/smaps_rollup``) of every process of
  the engine but its daemon, divided by N: for husk the QEMUs and their helpers
  (slirp4netns, ...), for podman conmon and the container's processes; husk's daemon is
  reported on its own (podman has none);
- start latency: ``run --rm IMAGE true``, ``--runs`` times (at most 3), husk and podman alternating.

Then, with no idle container left, LOG_WRITERS containers of each engine write
LOG_MB_EACH of 1 KiB lines at the same moment (made in the container's tmpfs first, so
the rate is the engine's logging, not ``yes``), each followed by ``logs -f``: aggregate
MB/s from the first byte any follower got to the last.

Plots (SVG written here, no dependency) go to docs/perf/ (``--svg-dir`` to change), the
figures to the usual report. Everything started is removed at the end; the scratch
directory's clean-up kills any process that names it.

    python3 bench/bench_scaling.py [--runs 3] [--quick] [--json] [--svg-dir DIR]
                                   [--baseline REV] [--cold-only]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import bench_throughput
import benchlib
from bench_cli import husk_argv
from benchlib import MB, Figure, PartOptions, Target, progress

SECTION = "scaling (issue 16)"
TIMEOUT = 600.0
IMAGE = "husk.local/busybox:latest"
MEMORY = "192m"
LEVELS = (1, 10, 20, 25, 50)
QUICK_LEVELS = (1, 5, 10)
MEMORY_REPORT_LEVEL = 20
START_BATCH = 5
SETTLE_SECONDS = 5.0
LOG_WRITERS = 10
LOG_LINES_EACH = 4000  # 4.1 MB of 1 KiB lines per container
LINE = 1024
END_MARKER = "END-OF-LOG"
SVG_DIR = benchlib.REPO_ROOT / "docs" / "perf"
COLD_MEMORY = "256m"
BASELINE_ENV = bench_throughput.BASELINE_ENV
COLD_ONLY_ENV = "HUSK_BENCH_COLD_ONLY"
HOLD_MIB = 100
HOLD_SECONDS = 10
IDLE_SECONDS = 10.0
FREED_SECONDS = 8.0


class CommandFailed(RuntimeError):
    pass


def _run(argv: list[str], env: dict[str, str], timeout: float = TIMEOUT) -> str:
    result = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise CommandFailed(
            f"{' '.join(argv[:6])}... exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()[-800:]}"
        )
    return result.stdout.decode(errors="replace")


def pss_kb(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (0 when it is gone)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def children_tree(root_pids: list[int]) -> list[int]:
    """``root_pids`` and all their descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                parents.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = list(root_pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


class Engine:
    name = ""

    def run_detached(self) -> str:
        raise NotImplementedError

    def run_rm_true(self) -> float:
        raise NotImplementedError

    def per_container_kb(self, count: int) -> float:
        raise NotImplementedError

    def log_writer(self, go_at: int) -> str:
        raise NotImplementedError

    def follow(self, container: str) -> list[str]:
        raise NotImplementedError

    def remove_all(self) -> None:
        raise NotImplementedError


@dataclass
class Husk(Engine):
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    name: str = "husk"

    def prepare(self) -> None:
        benchlib.link_bundle(self.root)
        benchlib.import_busybox(self.root)
        self.env = benchlib.husk_env(self.root)
        self.env["PYTHONPATH"] = str(benchlib.REPO_ROOT / "src")
        progress("scaling: husk's first run builds the template")
        self.husk("run", "--rm", "-m", MEMORY, IMAGE, "true")

    def husk(self, *args: str) -> str:
        return _run([*husk_argv(), *args], self.env)

    def run_detached(self) -> str:
        return self.husk("run", "-d", "-m", MEMORY, IMAGE, "sleep", "36000").strip()

    def run_rm_true(self) -> float:
        started = time.perf_counter()
        self.husk("run", "--rm", "-m", MEMORY, IMAGE, "true")
        return time.perf_counter() - started

    def daemon_pid(self) -> int:
        return int((self.root / "run" / "husk.pid").read_text())

    def per_container_kb(self, count: int) -> float:
        daemon = self.daemon_pid()
        pids = [p for p in benchlib._processes_of(self.root) if p != daemon]
        return sum(pss_kb(pid) for pid in pids) / count

    def daemon_kb(self) -> float:
        return float(pss_kb(self.daemon_pid()))

    def log_writer(self, go_at: int) -> str:
        return self.husk("run", "-d", "-m", MEMORY, IMAGE, "sh", "-c", writer_script(go_at)).strip()

    def follow(self, container: str) -> list[str]:
        return [*husk_argv(), "logs", "-f", container]

    def remove_all(self) -> None:
        with contextlib.suppress(CommandFailed, subprocess.SubprocessError, OSError):
            ids = self.husk("ps", "-aq").split()
            for start in range(0, len(ids), 10):
                self.husk("rm", "-f", *ids[start : start + 10])

    def stop_daemon(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = self.daemon_pid()
            os.kill(pid, 15)
            benchlib.wait_until(lambda: not Path(f"/proc/{pid}").exists(), 20, "daemon exit")


@dataclass
class Podman(Engine):
    work: Path
    env: dict[str, str] = field(default_factory=dict)
    base: list[str] = field(default_factory=list)
    name: str = "podman"

    def prepare(self, husk: Husk) -> None:
        self.base, self.env = benchlib.private_podman(self.work)
        archive = self.work / "busybox.tar"
        husk.husk("save", "-o", str(archive), IMAGE)
        _run([*self.base, "load", "-i", str(archive)], self.env)

    def podman(self, *args: str) -> str:
        return _run([*self.base, *args], self.env)

    def run_detached(self) -> str:
        return self.podman("run", "-d", "--network", "none", IMAGE, "sleep", "36000").strip()

    def run_rm_true(self) -> float:
        started = time.perf_counter()
        self.podman("run", "--rm", "--network", "none", IMAGE, "true")
        return time.perf_counter() - started

    def conmons(self) -> list[int]:
        marker = str(self.work).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    cmdline = (entry / "cmdline").read_bytes()
                    if cmdline.split(b"\0")[0].endswith(b"conmon") and marker in cmdline:
                        found.append(int(entry.name))
        return found

    def per_container_kb(self, count: int) -> float:
        return sum(pss_kb(pid) for pid in children_tree(self.conmons())) / count

    def log_writer(self, go_at: int) -> str:
        return self.podman(
            "run", "-d", "--network", "none", IMAGE, "sh", "-c", writer_script(go_at)
        ).strip()

    def follow(self, container: str) -> list[str]:
        return [*self.base, "logs", "-f", container]

    def remove_all(self) -> None:
        with contextlib.suppress(CommandFailed, subprocess.SubprocessError, OSError):
            self.podman("rm", "-af", "-t", "0")

    def reset(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                [*self.base, "system", "reset", "-f"],
                env=self.env,
                capture_output=True,
                timeout=120,
            )


def podman_status() -> str:
    if shutil.which("podman") is None:
        return "not available: podman is not installed"
    return ""


def writer_script(go_at: int) -> str:
    """Makes the lines in tmpfs, waits for the common start (unix time), writes them."""
    return (
        f"yes $(head -c {LINE - 1} /dev/zero | tr '\\0' a) | head -n {LOG_LINES_EACH} >/tmp/l; "
        f'while [ "$(date +%s)" -lt {go_at} ]; do sleep 0.1; done; '
        f"dd if=/tmp/l bs=64k 2>/dev/null; echo {END_MARKER}; sleep 36000"
    )


# -- measurements ----------------------------------------------------------------------


@dataclass
class ColdMemory:
    """QEMU RSS (MB) of cold-booted VMs: idle, holding HOLD_MIB, after freeing them; and
    where the idle RSS goes (MB per part of QEMU's address space, see :func:`rss_parts`)."""

    idle: list[float] = field(default_factory=list)
    holding: list[float] = field(default_factory=list)
    freed: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    clone: list[float] = field(default_factory=list)
    """RSS of one idle container restored from the boot template (same size)."""
    clone_parts: dict[str, list[float]] = field(default_factory=dict)
    status: str = ""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1]) * 1024 / MB
    return 0.0


RSS_PARTS = ("guest RAM", "TCG translation buffer", "kernel + initramfs maps", "the rest")
BOOT_IMAGE_NAMES = ("vmlinux", "initramfs.cpio", "memfd:husk-kernel", "memfd:husk-initrd")


def rss_parts(pid: int, guest_mib: int) -> dict[str, float]:
    """QEMU's RSS (MB) split by mapping: the guest's RAM (the anonymous map of its size),
    the TCG code buffer (the anonymous map of tb-size, 32 MiB), the guest kernel's and
    initramfs's maps (bundle files or a cold boot's memfd copies), everything else."""
    parts = dict.fromkeys(RSS_PARTS, 0.0)
    part = RSS_PARTS[-1]
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            mib = (high - low) / (1 << 20)
            name = " ".join(fields[5:])
            if any(image in name for image in BOOT_IMAGE_NAMES):
                part = RSS_PARTS[2]
            elif name == "" and mib == guest_mib:
                part = RSS_PARTS[0]
            elif name == "" and 30 <= mib <= 32:
                part = RSS_PARTS[1]
            else:
                part = RSS_PARTS[-1]
        elif fields[0] == "Rss:":
            parts[part] += int(fields[1]) * 1024 / MB
    return parts


CLONE_PARTS = (
    "template RAM read (shared by every clone)",
    "template RAM written since the restore",
    "TCG translation buffer",
    "the rest",
)
TEMPLATE_RAM_NAMES = ("memfd:husk-template", "memfd:husk-build", "memory.ram")


def clone_parts(pid: int) -> dict[str, float]:
    """A template clone's RSS (MB) split: its map of the template's RAM file into pages it
    only read (page cache every clone of the template shares: 1/N of each in PSS) and
    pages it wrote (private copies), the TCG code buffer, everything else."""
    parts = dict.fromkeys(CLONE_PARTS, 0.0)
    current = CLONE_PARTS[-1]
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            name = " ".join(fields[5:])
            if any(ram in name for ram in TEMPLATE_RAM_NAMES):
                current = "template"
            elif name == "" and 30 <= (high - low) / (1 << 20) <= 32:
                current = CLONE_PARTS[2]
            else:
                current = CLONE_PARTS[-1]
        elif fields[0] in ("Rss:", "Anonymous:") and current == "template":
            mb = int(fields[1]) * 1024 / MB
            if fields[0] == "Rss:":
                parts[CLONE_PARTS[0]] += mb
            else:  # a written page is an anonymous copy, counted in Rss too
                parts[CLONE_PARTS[0]] -= mb
                parts[CLONE_PARTS[1]] += mb
        elif fields[0] == "Rss:":
            parts[current] += int(fields[1]) * 1024 / MB
    return parts


def cold_husk(root: Path, source: Path) -> Husk:
    """An installation of ``source`` (this checkout, or a baseline's worktree with a guest
    bundle built from its own sources) whose VMs all boot cold."""
    installation = bench_throughput.Installation(root.name, source, root)
    installation.prepare()
    husk = Husk(root)
    husk.env = installation.env
    husk.env["HUSK_NO_TEMPLATE"] = "1"
    return husk


def only_qemu_of(husk: Husk) -> int:
    qemu = [
        pid
        for pid in benchlib._processes_of(husk.root)
        if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    ]
    if len(qemu) != 1:
        raise CommandFailed(f"expected one QEMU under {husk.root}, found {len(qemu)}")
    return qemu[0]


def cold_sample(husk: Husk, result: ColdMemory) -> None:
    """One cold-booted VM: idle for IDLE_SECONDS, then ``dd`` holds HOLD_MIB in the guest
    for HOLD_SECONDS (its buffer, while it waits on a pipe nobody reads), and the RSS is
    read again FREED_SECONDS after."""
    container = husk.husk("run", "-d", "-m", COLD_MEMORY, IMAGE, "sleep", "36000").strip()
    try:
        qemu = only_qemu_of(husk)
        time.sleep(IDLE_SECONDS)
        result.idle.append(rss_mb(qemu))
        for part, mb in rss_parts(qemu, int(COLD_MEMORY.rstrip("m"))).items():
            result.parts.setdefault(part, []).append(mb)
        script = f"dd if=/dev/zero bs={HOLD_MIB}M count=1 2>/dev/null | sleep {HOLD_SECONDS}"
        holder = subprocess.Popen(
            [*husk_argv(), "exec", container, "sh", "-c", script], env=husk.env
        )
        peak = 0.0
        while holder.poll() is None:
            peak = max(peak, rss_mb(qemu))
            time.sleep(0.5)
        result.holding.append(peak)
        time.sleep(FREED_SECONDS)
        result.freed.append(rss_mb(qemu))
    finally:
        husk.husk("rm", "-f", container)


@contextlib.contextmanager
def templates_on(husk: Husk) -> Iterator[None]:
    """The installation's daemon restarted with templates on, then off again."""
    husk.stop_daemon()
    husk.env.pop("HUSK_NO_TEMPLATE", None)
    try:
        yield
    finally:
        husk.stop_daemon()
        husk.env["HUSK_NO_TEMPLATE"] = "1"


def clone_sample(husk: Husk, result: ColdMemory) -> None:
    """One container restored from the boot template (built beforehand), idle for
    IDLE_SECONDS: its QEMU's RSS and where it goes (:func:`clone_parts`)."""
    with templates_on(husk):
        container = husk.husk("run", "-d", "-m", COLD_MEMORY, IMAGE, "sleep", "36000").strip()
        try:
            qemu = only_qemu_of(husk)
            time.sleep(IDLE_SECONDS)
            result.clone.append(rss_mb(qemu))
            for part, mb in clone_parts(qemu).items():
                result.clone_parts.setdefault(part, []).append(mb)
        finally:
            husk.husk("rm", "-f", container)


def measure_cold_memory(scratch: Path, runs: int, revision: str) -> dict[str, ColdMemory]:
    """A cold-booted idle VM's RSS, and whether memory its guest frees leaves QEMU.

    Its own installation with HUSK_NO_TEMPLATE=1, one container at a time. With a
    ``revision`` (--baseline), a second installation runs that revision's sources
    (bench_throughput's worktree and bundle) and the runs alternate between the two.
    """
    results: dict[str, ColdMemory] = {}
    husks: dict[str, Husk] = {}
    with bench_throughput.baseline_checkout(revision or None, scratch) as old:
        sources = {"before": old, "after": benchlib.REPO_ROOT} if old else {}
        try:
            for name, source in (sources or {"husk": benchlib.REPO_ROOT}).items():
                results[name] = ColdMemory()
                progress(f"scaling: cold-booted VM memory: preparing {name}")
                husks[name] = cold_husk(scratch / f"c-{name}", source)
                with templates_on(husks[name]):  # the boot template, built once
                    husks[name].husk("run", "--rm", "-m", COLD_MEMORY, IMAGE, "true")
            for index in range(runs):
                order = list(husks) if index % 2 == 0 else list(reversed(husks))
                for name in order:
                    progress(f"scaling: cold-booted VM memory {index + 1}/{runs} ({name})")
                    cold_sample(husks[name], results[name])
                    clone_sample(husks[name], results[name])
        except (CommandFailed, subprocess.SubprocessError, OSError, TimeoutError) as err:
            for result in results.values():
                result.status = result.status or f"failed: {err}"
            progress(f"scaling: cold-booted VM memory failed: {err}")
        finally:
            for husk in husks.values():
                husk.remove_all()
                husk.stop_daemon()
    return results


@dataclass
class Curve:
    start_s: dict[int, list[float]] = field(default_factory=dict)
    memory_mb: dict[int, float] = field(default_factory=dict)
    daemon_mb: dict[int, float] = field(default_factory=dict)
    log_rate: list[float] = field(default_factory=list)
    status: str = ""


def fill(engine: Engine, have: int, want: int) -> None:
    """Starts idle containers until ``want`` run, START_BATCH at a time."""
    while have < want:
        batch = min(START_BATCH, want - have)
        with ThreadPoolExecutor(batch) as pool:
            list(pool.map(lambda _: engine.run_detached(), range(batch)))
        have += batch


def measure_levels(
    engines: list[Engine], curves: dict[str, Curve], levels: tuple[int, ...], runs: int
) -> None:
    have = 0
    for level in levels:
        for engine in engines:
            progress(f"scaling: {engine.name}: {level} idle containers")
            fill(engine, have, level)
        have = level
        time.sleep(SETTLE_SECONDS)
        for engine in engines:
            curve = curves[engine.name]
            curve.memory_mb[level] = engine.per_container_kb(level) * 1024 / MB
            if isinstance(engine, Husk):
                curve.daemon_mb[level] = engine.daemon_kb() * 1024 / MB
        for index in range(runs):
            order = engines if index % 2 == 0 else list(reversed(engines))
            for engine in order:
                curves[engine.name].start_s.setdefault(level, []).append(engine.run_rm_true())
    for engine in engines:
        engine.remove_all()


def measure_logs(engine: Engine, curve: Curve) -> None:
    """LOG_WRITERS containers write at once; aggregate MB/s over their followers."""
    lead = 30 + 3 * LOG_WRITERS  # seconds for all writers to start and make their lines
    go_at = int(time.time()) + lead
    with ThreadPoolExecutor(LOG_WRITERS) as pool:
        ids = list(pool.map(lambda _: engine.log_writer(go_at), range(LOG_WRITERS)))
    expected = LOG_LINES_EACH * LINE + len(END_MARKER) + 1
    env = engine.env  # type: ignore[attr-defined]
    followers = [
        subprocess.Popen(engine.follow(cid), env=env, stdout=subprocess.PIPE) for cid in ids
    ]
    firsts: list[float] = []
    lasts: list[float] = []

    def drain(process: subprocess.Popen[bytes]) -> int:
        assert process.stdout is not None
        got = 0
        first = last = 0.0
        deadline = time.monotonic() + TIMEOUT
        while got < expected and time.monotonic() < deadline:
            chunk = os.read(process.stdout.fileno(), 1 << 20)
            if not chunk:
                break
            last = time.perf_counter()
            first = first or last
            got += len(chunk)
        process.kill()
        process.wait(30)
        firsts.append(first)
        lasts.append(last)
        return got

    try:
        with ThreadPoolExecutor(LOG_WRITERS) as pool:
            received = list(pool.map(drain, followers))
    finally:
        for process in followers:
            with contextlib.suppress(OSError):
                process.kill()
    if min(received) < expected:
        raise CommandFailed(f"{engine.name}: a follower got {min(received)} of {expected} bytes")
    curve.log_rate.append(sum(received) / (max(lasts) - min(firsts)) / MB)
    engine.remove_all()


def attempt(curve: Curve, what: str, action: Callable[[], None]) -> None:
    try:
        action()
    except (CommandFailed, subprocess.SubprocessError, OSError, TimeoutError, ValueError) as err:
        curve.status = curve.status or f"failed ({what}): {err}"
        progress(curve.status)


def measure(options: PartOptions) -> list[Figure]:
    levels = QUICK_LEVELS if options.quick else LEVELS
    runs = 2 if options.quick else min(options.runs, 3)
    curves = {"husk": Curve(), "podman": Curve()}
    revision = os.environ.get(BASELINE_ENV) or ""
    with benchlib.scratch_root("hbs-") as scratch:
        cold = measure_cold_memory(scratch, 1 if options.quick else runs, revision)
        if os.environ.get(COLD_ONLY_ENV):
            return [f for name, c in cold.items() for f in cold_figures(c, name, revision)]
        husk = Husk(scratch / "h")
        podman = Podman(scratch / "p")
        engines: list[Engine] = [husk]
        curves["podman"].status = podman_status()
        try:
            husk.prepare()
            if not curves["podman"].status:
                attempt(curves["podman"], "setup", lambda: podman.prepare(husk))
            if not curves["podman"].status:
                engines.append(podman)
            measure_levels(engines, curves, levels, runs)
            for engine in engines:
                progress(f"scaling: {engine.name}: {LOG_WRITERS} containers writing logs")
                attempt(
                    curves[engine.name], "logs", lambda e=engine: measure_logs(e, curves[e.name])
                )  # type: ignore[misc]
        except (CommandFailed, subprocess.SubprocessError, OSError, TimeoutError) as err:
            curves["husk"].status = f"failed: {err}"
            progress(curves["husk"].status)
        finally:
            husk.remove_all()
            husk.stop_daemon()
            podman.remove_all()
            podman.reset()
    figures = [f for name, c in cold.items() for f in cold_figures(c, name, revision)]
    figures += build_figures(curves, levels)
    with contextlib.suppress(OSError):
        write_svgs(curves, levels, Path(os.environ.get("HUSK_BENCH_SVG_DIR") or SVG_DIR))
    return figures


def cold_figures(cold: ColdMemory, installation: str, revision: str) -> list[Figure]:
    label = {"before": f" (before: {revision})", "after": " (after: this checkout)"}.get(
        installation, ""
    )
    rows = [
        (
            f"QEMU RSS of an idle cold-booted 256 MiB VM{label}",
            cold.idle,
            Target("<=", 150, "issue 16"),
        ),
        *((f"  of which {part}{label}", cold.parts.get(part, []), None) for part in RSS_PARTS),
        (f"same VM while its guest holds {HOLD_MIB} MiB{label}", cold.holding, None),
        (f"same VM {FREED_SECONDS:.0f} s after its guest freed them{label}", cold.freed, None),
        (f"QEMU RSS of one idle container restored from the template{label}", cold.clone, None),
        *(
            (f"  of which {part}{label}", cold.clone_parts.get(part, []), None)
            for part in CLONE_PARTS
        ),
    ]
    return [
        Figure(
            SECTION,
            name,
            "MB",
            values,
            f"HUSK_NO_TEMPLATE=1 husk run -d -m {COLD_MEMORY} IMAGE sleep; "
            f"husk exec ID sh -c 'dd if=/dev/zero bs={HOLD_MIB}M count=1 | sleep "
            f"{HOLD_SECONDS}'; Rss of /proc/QEMU/smaps_rollup",
            target=target,
            status=cold.status if not values else "",
        )
        for name, values, target in rows
    ]


def build_figures(curves: dict[str, Curve], levels: tuple[int, ...]) -> list[Figure]:
    out: list[Figure] = []
    for name, curve in curves.items():
        peer = name != "husk"
        for level in levels:
            out.append(
                Figure(
                    SECTION,
                    f"`run --rm true` with {level} idle containers, {name}",
                    "s",
                    curve.start_s.get(level, []),
                    f"{name} run --rm IMAGE true",
                    peer=peer,
                    status=curve.status if not curve.start_s.get(level) else "",
                )
            )
        for level in levels:
            value = curve.memory_mb.get(level)
            out.append(
                Figure(
                    SECTION,
                    f"PSS per idle container at {level}, {name}"
                    + (" (QEMU + helpers)" if not peer else " (conmon + container)"),
                    "MB",
                    summary=(value, None, None) if value is not None else None,
                    status="" if value is not None else curve.status or "not measured",
                    peer=peer,
                    runs_label=f"{level} containers",
                    target=Target("<=", 40, "issue 16, templated")
                    if not peer and level == MEMORY_REPORT_LEVEL
                    else None,
                )
            )
        for level, value in curve.daemon_mb.items():
            out.append(
                Figure(
                    SECTION,
                    f"husk daemon PSS at {level} idle containers",
                    "MB",
                    summary=(value, None, None),
                    runs_label="1",
                )
            )
        out.append(
            Figure(
                SECTION,
                f"log throughput, {LOG_WRITERS} containers writing at once, {name}",
                "MB/s",
                curve.log_rate,
                f"{name} logs -f on each of {LOG_WRITERS} containers "
                f"({LOG_LINES_EACH} lines of {LINE} B each)",
                peer=peer,
                status=curve.status if not curve.log_rate else "",
            )
        )
    return out


# -- plots -----------------------------------------------------------------------------

COLOURS = {"husk": "#1f77b4", "podman": "#d62728"}


def svg_line_chart(
    title: str, y_label: str, series: dict[str, dict[int, float]], x_values: tuple[int, ...]
) -> str:
    """A small line chart: x = number of idle containers, one line per engine."""
    width, height = 560, 340
    left, right, top, bottom = 70, 20, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    y_max = max((v for s in series.values() for v in s.values()), default=1.0) * 1.15 or 1.0
    x_max = max(x_values)

    def x_at(x: float) -> float:
        return left + plot_w * x / x_max

    def y_at(y: float) -> float:
        return top + plot_h * (1 - y / y_max)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
    ]
    for tick in range(5):
        y = y_max * tick / 4
        parts.append(
            f'<text x="{left - 6}" y="{y_at(y) + 4:.1f}" text-anchor="end">{_tick(y)}</text>'
            f'<line x1="{left}" y1="{y_at(y):.1f}" x2="{left + plot_w}" y2="{y_at(y):.1f}" '
            'stroke="#ddd"/>'
        )
    for x in x_values:
        parts.append(
            f'<text x="{x_at(x):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{x}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle">'
        "idle containers running</text>"
        f'<text x="16" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {top + plot_h / 2})">{y_label}</text>'
    )
    for index, (name, points) in enumerate(series.items()):
        if not points:
            continue
        colour = COLOURS.get(name, "#555")
        coords = " ".join(f"{x_at(x):.1f},{y_at(y):.1f}" for x, y in sorted(points.items()))
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>'
        )
        for x, y in points.items():
            parts.append(f'<circle cx="{x_at(x):.1f}" cy="{y_at(y):.1f}" r="3" fill="{colour}"/>')
        legend_y = top + 14 + 16 * index
        parts.append(
            f'<rect x="{left + 12}" y="{legend_y - 9}" width="12" height="3" fill="{colour}"/>'
            f'<text x="{left + 30}" y="{legend_y - 4}">{name}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def svg_bar_chart(title: str, y_label: str, bars: dict[str, float]) -> str:
    width, height = 360, 300
    left, top, bottom = 70, 40, 40
    plot_h = height - top - bottom
    y_max = max(bars.values(), default=1.0) * 1.15 or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 20}" y2="{top + plot_h}" '
        'stroke="black"/>',
        f'<text x="16" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {top + plot_h / 2})">{y_label}</text>',
    ]
    for index, (name, value) in enumerate(bars.items()):
        x = left + 30 + index * 110
        bar_h = plot_h * value / y_max
        parts.append(
            f'<rect x="{x}" y="{top + plot_h - bar_h:.1f}" width="70" height="{bar_h:.1f}" '
            f'fill="{COLOURS.get(name, "#555")}"/>'
            f'<text x="{x + 35}" y="{top + plot_h - bar_h - 6:.1f}" text-anchor="middle">'
            f"{_tick(value)}</text>"
            f'<text x="{x + 35}" y="{top + plot_h + 18}" text-anchor="middle">{name}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _tick(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def write_svgs(curves: dict[str, Curve], levels: tuple[int, ...], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    start = {
        name: {level: statistics.median(v) for level, v in curve.start_s.items() if v}
        for name, curve in curves.items()
    }
    memory = {name: dict(curve.memory_mb) for name, curve in curves.items()}
    (directory / "scaling-start.svg").write_text(
        svg_line_chart("run --rm true: median start latency", "seconds", start, levels)
    )
    (directory / "scaling-memory.svg").write_text(
        svg_line_chart("PSS per idle container", "MB", memory, levels)
    )
    rates = {
        name: statistics.median(curve.log_rate) for name, curve in curves.items() if curve.log_rate
    }
    (directory / "scaling-logs.svg").write_text(
        svg_bar_chart(f"logs -f, {LOG_WRITERS} containers writing at once", "MB/s", rates)
    )
    progress(f"scaling: plots written to {directory}")


if __name__ == "__main__":
    if "--svg-dir" in sys.argv:
        at = sys.argv.index("--svg-dir")
        os.environ["HUSK_BENCH_SVG_DIR"] = sys.argv[at + 1]
        del sys.argv[at : at + 2]
    if "--baseline" in sys.argv:
        at = sys.argv.index("--baseline")
        os.environ[BASELINE_ENV] = sys.argv[at + 1]
        del sys.argv[at : at + 2]
    if "--cold-only" in sys.argv:
        sys.argv.remove("--cold-only")
        os.environ[COLD_ONLY_ENV] = "1"
    benchlib.part_main("scaling", __doc__ or "", measure, default_runs=3)
