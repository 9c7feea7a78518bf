"""What every husk benchmark shares: figures with targets, reports, isolation and clean-up.

A benchmark (``bench_*.py``) measures a list of :class:`Figure` and hands it to
:func:`part_main`, which prints a markdown table, or one JSON object with
``--json`` (what ``run_all.py`` reads). Progress goes to stderr.

Isolation: :func:`scratch_root` gives a short private directory under /tmp. On
the way out it kills every QEMU process whose command line names that directory
and every process whose ``HUSK_RUN_DIR`` lies inside it (a daemon the CLI
started on demand), then deletes the directory: a benchmark leaves nothing
running, whatever happened. No benchmark sends traffic anywhere but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
MB = 1_000_000  # figures in MB and MB/s are decimal, as the targets are written

BUSYBOX_IMAGE = "husk.local/busybox:latest"

# Logs throughput workload: 8000 lines of 1 KiB (8.2 MB, below the 10 MB log rotation, so a
# follower sees every byte). The lines are made first into the guest's tmpfs, because
# `yes | head` itself makes only ~10 MB/s under TCG; `cat` then streams them at full speed,
# after a pause that lets the follower attach before the first byte.
LOG_LINE = 1024
LOG_LINES = 8000
LOG_SCRIPT = (
    f"yes $(head -c {LOG_LINE - 1} /dev/zero | tr '\\0' a) | head -n {LOG_LINES} >/tmp/lines; "
    "sleep 2; cat /tmp/lines"
)


# -- figures and targets ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``median <op> value``; ``source`` names where the target comes from (e.g. "issue 2")."""

    op: str
    value: float
    source: str = ""

    def met(self, median: float) -> bool:
        if self.op == "<=":
            return median <= self.value
        if self.op == ">=":
            return median >= self.value
        raise ValueError(f"unknown target operator {self.op!r}")

    def describe(self, unit: str) -> str:
        text = f"{'≤' if self.op == '<=' else '≥'} {_number(self.value)} {unit}".rstrip()
        return f"{text} ({self.source})" if self.source else text


@dataclass
class Figure:
    """One measured quantity: its samples (already in ``unit``), the command, the target.

    A figure without samples carries a ``status`` saying why (e.g. "not available:
    podman is not installed"), so the report shows every figure that was asked for.
    """

    section: str
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    command: str = ""
    target: Target | None = None
    peer: bool = False
    note: str = ""
    runs_label: str = ""
    status: str = ""

    derived: bool = False
    """Computed from other figures' medians (a ratio, a difference): no spread of its own."""
    summary: tuple[float, float | None, float | None] | None = None
    """(median, min, max) from a benchmark that reports no individual samples; min and max
    are None when it reports only the median."""

    @property
    def median(self) -> float | None:
        if self.samples:
            return statistics.median(self.samples)
        return self.summary[0] if self.summary else None

    @property
    def low(self) -> float | None:
        if self.samples:
            return min(self.samples)
        return self.summary[1] if self.summary else None

    @property
    def high(self) -> float | None:
        if self.samples:
            return max(self.samples)
        return self.summary[2] if self.summary else None

    @property
    def runs(self) -> str:
        return self.runs_label or (str(len(self.samples)) if self.samples else "0")

    @property
    def verdict(self) -> str:
        median = self.median
        if median is None:
            return "—" if self.target is None else "not measured"
        if self.target is None:
            return ""
        return "**met**" if self.target.met(median) else "**MISSED**"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["median"] = self.median
        data["min"] = self.low
        data["max"] = self.high
        data["met"] = (
            None if self.target is None or self.median is None else self.target.met(self.median)
        )
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figure:
        target = data.get("target")
        return cls(
            section=str(data["section"]),
            name=str(data["name"]),
            unit=str(data.get("unit", "")),
            samples=[float(s) for s in data.get("samples") or []],
            command=str(data.get("command", "")),
            target=Target(**target) if target else None,
            peer=bool(data.get("peer", False)),
            note=str(data.get("note", "")),
            runs_label=str(data.get("runs_label", "")),
            status=str(data.get("status", "")),
            derived=bool(data.get("derived", False)),
            summary=_summary(data.get("summary")),
        )


def _summary(value: Any) -> tuple[float, float | None, float | None] | None:
    if not value:
        return None
    median, low, high = value
    return (
        float(median),
        None if low is None else float(low),
        None if high is None else float(high),
    )


def _number(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_value(value: float | None, unit: str) -> str:
    return "—" if value is None else f"{_number(value)} {unit}".rstrip()


def markdown_table(figures: list[Figure]) -> str:
    lines = [
        "| section | figure | median | spread (min-max) | runs | target | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for figure in figures:
        name = ("peer: " if figure.peer else "") + figure.name
        if figure.median is None:
            median = figure.status or "not measured"
            spread = "—"
        else:
            median = format_value(figure.median, figure.unit)
            if figure.derived:
                spread = "(from medians)"
            elif figure.low is None or figure.high is None:
                spread = "(median only)"
            else:
                spread = f"{_number(figure.low)}-{_number(figure.high)}"
        target = figure.target.describe(figure.unit) if figure.target else ""
        cells = [
            figure.section,
            name,
            median,
            spread,
            figure.runs,
            target,
            figure.verdict,
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def commands_list(figures: list[Figure]) -> str:
    lines = []
    for figure in figures:
        if figure.command or figure.note:
            text = f"- **{figure.section} / {figure.name}**"
            if figure.command:
                quoted = (
                    f"`` {figure.command} ``" if "`" in figure.command else f"`{figure.command}`"
                )
                text += f": {quoted}"
            if figure.note:
                text += f" — {figure.note}"
            lines.append(text)
    return "\n".join(lines)


# -- the machine the figures were taken on ---------------------------------------------


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def qemu_process_count() -> int:
    """All QEMU processes on the host (other engineers' tests included): the noise."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if b"qemu-system" in (entry / "cmdline").read_bytes().split(b"\0")[0]:
                    count += 1
    return count


def host_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_average": load_average(),
        "qemu_processes": qemu_process_count(),
        "accel": os.environ.get("HUSK_ACCEL", ""),
    }
    with contextlib.suppress(OSError, ValueError):
        meminfo = Path("/proc/meminfo").read_text()
        for line in meminfo.splitlines():
            if line.startswith("MemAvailable:"):
                facts["mem_available_mb"] = int(line.split()[1]) * 1024 // MB
    with contextlib.suppress(Exception):
        from husk.vm.qemu import qemu_version

        facts["qemu"] = qemu_version()
    with contextlib.suppress(Exception):
        from husk.bundle import locate

        facts["bundle"] = locate().digest
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = _git("rev-parse", "--short", "HEAD").strip()
        if _git("status", "--porcelain", "--untracked-files=no", "--", "src").strip():
            commit += " with uncommitted changes in src/"
        facts["commit"] = commit
    return facts


def _git(*args: str) -> str:
    """Read-only git queries (the benchmarks never change the repository's state)."""
    return subprocess.run(
        ["git", "-C", str(REPO_ROOT), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout


def available_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // MB
    return 0


def host_cpu_busy_seconds() -> float:
    """CPU time the whole host has spent busy since boot (all CPUs, every process)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- environment and isolation ---------------------------------------------------------


def use_tcg() -> None:
    """This host's /dev/kvm hangs guests: every benchmark runs under TCG unless told otherwise."""
    os.environ.setdefault("HUSK_ACCEL", "tcg")


def import_tests_helpers() -> None:
    """Makes tests/ importable (guestfs, testimages): the benchmarks build the same images."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))


def husk_env(root: Path) -> dict[str, str]:
    """Environment of a husk CLI / daemon whose data and run directories live under ``root``."""
    env = dict(os.environ)
    env["HUSK_DATA_DIR"] = str(root / "data")
    env["HUSK_RUN_DIR"] = str(root / "run")
    env.pop("HUSK_SOCKET", None)
    env.setdefault("HUSK_ACCEL", "tcg")
    return env


# podman on this machine needs these (DESIGN.md); every peer run writes its own copy.
PODMAN_CONF = """\
[containers]
default_ulimits=["nofile=1024:1024","nproc=1024:1024"]
[engine]
runtime="runc"
"""


def private_podman(
    work: Path, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """podman's argv and environment with its containers.conf, root and runroot under
    ``work`` (nothing of the host's podman state is read or written); ``env``: the base
    environment (default: this process's)."""
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "containers.conf"
    conf.write_text(PODMAN_CONF)
    argv = ["podman", "--root", str(work / "root"), "--runroot", str(work / "runroot")]
    return argv, {**(os.environ if env is None else env), "CONTAINERS_CONF": str(conf)}


def link_bundle(root: Path) -> None:
    """The installed guest bundle, seen from an isolated data directory.

    A symlink rather than HUSK_KERNEL/HUSK_INITRD keeps the bundle's real digest,
    which is what templates are keyed by. An explicit HUSK_KERNEL/HUSK_INITRD in the
    caller's environment wins anyway.
    """
    from husk.bundle import locate

    bundle = locate()
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    link = data / "bundle"
    if not link.exists():
        link.symlink_to(bundle.kernel.parent.resolve())


def import_busybox(root: Path) -> str:
    """Imports the busybox test image (Debian's busybox-static) into ``root``'s data dir."""
    subprocess.run(
        [sys.executable, str(TESTS_DIR / "testimages.py"), "busybox"],
        env=husk_env(root),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return BUSYBOX_IMAGE


def templates_status() -> str:
    """ "" when this husk has boot templates (issue 6); otherwise why not."""
    try:
        from husk.sandbox import templates  # noqa: F401
    except ImportError:
        return "not available: this husk has no boot templates (husk.sandbox.templates)"
    return ""


def _processes_of(root: Path) -> list[int]:
    """Processes that name ``root`` on their command line or in their environment
    (HUSK_RUN_DIR, HUSK_DATA_DIR, TMPDIR ...): only what a benchmark using ``root`` started."""
    marker = str(root).encode()
    ancestors = _ancestors()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ancestors:
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(value.startswith(marker) for _, _, value in (e.partition(b"=") for e in environ)):
            found.append(int(entry.name))
    return found


def _ancestors() -> set[int]:
    """This process and its parents, which may have ``root`` in their environment too."""
    pids = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def kill_processes_of(root: Path, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace``, every process :func:`_processes_of` finds."""
    pids = _processes_of(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def scratch_root(prefix: str) -> Iterator[Path]:
    """A short private directory (unix socket paths are limited to 108 bytes), cleaned up."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield root
    finally:
        leftovers = kill_processes_of(root)
        if leftovers:
            progress(f"cleaned up {len(leftovers)} leftover process(es) under {root}")
        shutil.rmtree(root, ignore_errors=True)


def process_rss_bytes(pid: int) -> int:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass
class QemuMemory:
    """Where a QEMU process's resident memory is, in MB, from /proc/PID/smaps."""

    rss: float = 0.0
    pss: float = 0.0
    """Proportional share: pages shared with other QEMUs (the kernel and initramfs files,
    the binary, libraries) counted once across all of them."""
    guest_ram: float = 0.0
    tcg_code: float = 0.0
    bundle_files: float = 0.0
    """Private file mappings of vmlinux and initramfs.cpio (QEMU's copies for the loader)."""
    other_files: float = 0.0
    other_anonymous: float = 0.0


# The parts of QemuMemory, as the report names them.
RSS_PARTS = [
    ("guest_ram", "guest RAM the guest has touched"),
    ("bundle_files", "QEMU's private maps of vmlinux + initramfs.cpio (loader copies)"),
    ("tcg_code", "TCG translated-code buffer"),
    ("other_files", "QEMU binary and libraries (shared between VMs)"),
    ("other_anonymous", "QEMU heap, device state, the rest"),
]


def qemu_memory(pid: int, guest_ram_bytes: int) -> QemuMemory:
    """Splits QEMU's RSS into guest RAM, TCG's translated code, the bundle's files, the
    rest. Guest RAM is the anonymous mapping of the guest's size; translated code the
    anonymous executable one."""
    memory = QemuMemory()
    size = 0
    perms = path = ""
    kb = 1024 / MB
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):
            start, end = (int(part, 16) for part in head[0].split("-"))
            size = end - start
            perms = head[1]
            path = head[5] if len(head) > 5 else ""
            continue
        if head[0] == "Pss:":
            memory.pss += int(head[1]) * kb
        if head[0] != "Rss:":
            continue
        rss = int(head[1]) * kb
        memory.rss += rss
        if path.endswith(("vmlinux", "initramfs.cpio")):
            memory.bundle_files += rss
        elif path.startswith("/"):
            memory.other_files += rss
        elif not path and "x" in perms:
            memory.tcg_code += rss
        elif not path and guest_ram_bytes <= size <= guest_ram_bytes + (8 << 20):
            memory.guest_ram += rss
        else:
            memory.other_anonymous += rss
    return memory


def qemu_pids_under(root: Path) -> list[int]:
    marker = str(root).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if b"qemu-system" in cmdline.split(b"\0")[0] and marker in cmdline:
                    pids.append(int(entry.name))
    return pids


def qemu_pid(container: str) -> int:
    """The QEMU process of ``container`` (its process name carries the id's first 16),
    whichever way it started (cold boots name no path under the data directory)."""
    marker = f"husk-vm:{container[:16]}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    return int(entry.name)
    raise RuntimeError(f"no QEMU process for container {container[:12]}")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.05)


# -- running a part --------------------------------------------------------------------


@dataclass
class PartOptions:
    runs: int
    quick: bool


def _terminate(signum: int, _frame: Any) -> None:
    # SIGTERM from run_all's deadline: unwind through every ``finally`` so nothing leaks.
    raise SystemExit(128 + signum)


def part_main(
    name: str,
    description: str,
    measure: Callable[[PartOptions], list[Figure]],
    *,
    default_runs: int = 5,
) -> None:
    """Command line of one benchmark: ``[--runs N] [--quick] [--json]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=default_runs, help="repetitions per figure")
    parser.add_argument("--quick", action="store_true", help="fewer, cheaper measurements")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    signal.signal(signal.SIGTERM, _terminate)
    use_tcg()
    started = datetime.datetime.now().astimezone()
    before = host_facts()
    figures = measure(PartOptions(runs=args.runs, quick=args.quick))
    report = {
        "part": name,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_before": before,
        "load_after": load_average(),
        "figures": [figure.to_json() for figure in figures],
    }
    if args.json:
        print(json.dumps(report))
        return
    print(markdown_table(figures))
    print()
    print(commands_list(figures))
    print(
        f"\nload average before {before['load_average']}, after {report['load_after']}; "
        f"{before['qemu_processes']} QEMU process(es) on the host at the start"
    )
