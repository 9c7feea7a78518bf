"""Throughput through the CLI and daemon (issue 16, item 4): logs, attached output, cp, exec.

One isolated husk installation (data + run directories under /tmp, the installed guest
bundle, the busybox test image, a daemon its CLI starts on demand), templates on.
With ``--baseline REV`` (or HUSK_BENCH_BASELINE) a second installation runs the sources
of REV (a temporary ``git worktree``) beside this checkout, and every figure alternates
between the two run by run (before, after, after, before, ...), so load on this shared
host falls on both alike. The baseline gets a guest bundle built from its own sources.

Figures (wall time of real ``husk`` processes):

- ``husk logs -f`` of a log already on disk (LOG_MB of 1 KiB lines): MB/s from the
  first byte to the last, the follower killed once it has every byte;
- ``husk run --rm busybox sh -c 'dd if=lines bs=64k'`` attached: stdout MB/s, first to
  last byte (the lines are made in the guest's tmpfs first and written in 64 KiB blocks:
  busybox ``cat`` writes 4 KiB at a time, a system call each, which under TCG is the
  guest's limit, not husk's);
- ``husk cp`` of a CP_MB directory (CP_FILES files of random bytes) into a running
  container, and back out of it: MB/s over the whole ``husk cp`` process;
- ``husk exec ID true``: the round trip through the CLI (the ``husk`` script pip made
  for this interpreter), with this interpreter's ``-c pass`` beside it as the floor of any
  Python command; and the same script run by Debian's ``/usr/bin/python3`` (husk's quick
  exec imports nothing outside the standard library), beside that interpreter's floor.
  Both installations' sources are compiled first (``compileall``), as an installed package
  is: with PYTHONDONTWRITEBYTECODE set (this host's environment) a source tree would
  otherwise be compiled again by every command.

    python3 bench/bench_throughput.py [--runs 5] [--quick] [--json] [--baseline REV]
                                      [--exec-only | --cp-only]

``--exec-only`` measures the exec figures alone (no log, attached output or cp figures).
``--cp-only`` (or HUSK_BENCH_CP_ONLY=1) measures only the two ``husk cp`` figures (no log
container, no attached runs, no exec).
"""

from __future__ import annotations

import compileall
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
from bench_cli import husk_argv
from benchlib import MB, Figure, PartOptions, Target, progress

SECTION = "throughput (issue 16)"
BASELINE_ENV = "HUSK_BENCH_BASELINE"
CP_ONLY_ENV = "HUSK_BENCH_CP_ONLY"
DEB_CACHE = Path("/var/lib/husk/cache/debs")
TIMEOUT = 600.0
IMAGE = "husk.local/busybox"
LINE = 1024
LOG_LINES = 20_000  # 20.5 MB: under the three 10 MB log files a container keeps
RUN_LINES = 20_000
CP_FILES = 40
CP_MB = 200
EXEC_PER_RUN = 10
EXEC_ONLY_ENV = "HUSK_BENCH_EXEC_ONLY"
DEBIAN_PYTHON = "/usr/bin/python3"
END_MARKER = "END-OF-LOG"


def lines_script(count: int) -> str:
    """Makes ``count`` lines of LINE bytes in the guest's tmpfs (``yes | head``: ~10 MB/s
    under TCG, so before anything is timed)."""
    return f"yes $(head -c {LINE - 1} /dev/zero | tr '\\0' a) | head -n {count} >/tmp/lines"


class CommandFailed(RuntimeError):
    pass


@dataclass
class Installation:
    name: str
    source: Path
    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def prepare(self) -> None:
        self.env = benchlib.husk_env(self.root)
        self.env["PYTHONPATH"] = str(self.source / "src")
        # The pycs an installed package has (PYTHONDONTWRITEBYTECODE: none get written).
        compileall.compile_dir(self.source / "src", quiet=1)
        if self.source == benchlib.REPO_ROOT:
            benchlib.link_bundle(self.root)
        else:  # another revision's guest agent: its own bundle, built from its sources
            progress(f"throughput: building the guest bundle of {self.name}")
            deb_cache = DEB_CACHE if DEB_CACHE.is_dir() else self.root / "debs"
            build = (
                "import sys; from pathlib import Path; from husk.bundle.builder import "
                "ensure_built; ensure_built(Path(sys.argv[1]), deb_cache=Path(sys.argv[2]))"
            )
            bundle = str(self.root / "data" / "bundle")
            argv = [sys.executable, "-c", build, bundle, str(deb_cache)]
            subprocess.run(argv, env=self.env, check=True, capture_output=True, timeout=TIMEOUT)
        subprocess.run(
            [sys.executable, str(self.source / "tests" / "testimages.py"), "busybox"],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )

    def argv(self, *args: str) -> list[str]:
        return [*husk_argv(), *args]

    def run(
        self, *args: str, timeout: float = TIMEOUT, python: str | None = None
    ) -> tuple[float, bytes]:
        """Wall time and stdout of ``husk ARGS``; ``python``: the interpreter that runs the
        ``husk`` script (else its own #! line's)."""
        argv = self.argv(*args)
        if python is not None:
            argv = [python, *argv]
        started = time.perf_counter()
        result = subprocess.run(
            argv, env=self.env, capture_output=True, timeout=timeout, check=False
        )
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise CommandFailed(
                f"{self.name}: husk {' '.join(args)[:100]} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()[-1500:]}"
            )
        return elapsed, result.stdout

    def daemon_cpu(self) -> float:
        """CPU seconds the daemon has used so far."""
        return process_cpu(int((self.root / "run" / "husk.pid").read_text()))

    def stream(self, *args: str, expected: int) -> tuple[float, float]:
        """MB/s of ``husk ARGS``'s stdout from its first byte to byte ``expected``, and the
        host CPU seconds per 100 MB that the daemon and the CLI process spent on it (less
        sensitive to a loaded host than the rate)."""
        daemon_before = self.daemon_cpu()
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        process = subprocess.Popen(
            self.argv(*args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert process.stdout is not None
        first: float | None = None
        last = 0.0
        received = 0
        deadline = time.monotonic() + TIMEOUT
        try:
            while received < expected and time.monotonic() < deadline:
                chunk = os.read(process.stdout.fileno(), 1 << 20)
                if not chunk:
                    break
                now = time.perf_counter()
                first = now if first is None else first
                last = now
                received += len(chunk)
        finally:
            process.kill()
            _, err = process.communicate(timeout=30)
        if received < expected or first is None:
            raise CommandFailed(
                f"{self.name}: husk {' '.join(args)[:80]} gave {received} of {expected} bytes: "
                f"{err.decode(errors='replace')[-500:]}"
            )
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli = (children.ru_utime + children.ru_stime) - (
            children_before.ru_utime + children_before.ru_stime
        )
        cpu = cli + self.daemon_cpu() - daemon_before
        return received / (last - first) / MB, cpu / (received / (100 * MB))

    def remove_all(self) -> None:
        with contextlib.suppress(CommandFailed, subprocess.SubprocessError, OSError):
            _, out = self.run("ps", "-aq")
            if out.split():
                self.run("rm", "-f", *out.decode().split())

    def stop_daemon(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.root / "run" / "husk.pid").read_text())
            os.kill(pid, 15)
            benchlib.wait_until(lambda: not Path(f"/proc/{pid}").exists(), 20, "daemon exit")


@contextlib.contextmanager
def baseline_checkout(revision: str | None, scratch: Path) -> Iterator[Path | None]:
    if not revision:
        yield None
        return
    target = scratch / "baseline-src"
    git = ["git", "-C", str(benchlib.REPO_ROOT), "worktree"]
    subprocess.run(
        [*git, "add", "--detach", "-q", str(target), revision],
        check=True,
        capture_output=True,
    )
    try:
        yield target
    finally:
        subprocess.run(
            ["git", "-C", str(benchlib.REPO_ROOT), "worktree", "remove", "--force", str(target)],
            check=False,
            capture_output=True,
        )


def make_tree(directory: Path) -> None:
    """CP_FILES files of random bytes, CP_MB in all, in two sub-directories."""
    size = CP_MB * MB // CP_FILES
    for index in range(CP_FILES):
        sub = directory / f"d{index % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{index:03d}.bin").write_bytes(os.urandom(size))


def tree_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@dataclass
class Samples:
    logs: list[float] = field(default_factory=list)
    logs_cpu: list[float] = field(default_factory=list)
    attached: list[float] = field(default_factory=list)
    attached_cpu: list[float] = field(default_factory=list)
    cp_in: list[float] = field(default_factory=list)
    cp_out: list[float] = field(default_factory=list)
    cp_in_guest_cpu: list[float] = field(default_factory=list)
    cp_out_guest_cpu: list[float] = field(default_factory=list)
    exec_ms: list[float] = field(default_factory=list)
    floor_ms: list[float] = field(default_factory=list)
    debian_exec_ms: list[float] = field(default_factory=list)
    exec_cpu_ms: list[float] = field(default_factory=list)
    debian_exec_cpu_ms: list[float] = field(default_factory=list)
    debian_floor_ms: list[float] = field(default_factory=list)


class Session:
    """The containers one installation needs for the whole run."""

    def __init__(self, inst: Installation, scratch: Path) -> None:
        self.inst = inst
        self.scratch = scratch
        self.idle = ""
        self.logger = ""

    def start(self, *, exec_only: bool = False) -> None:
        inst = self.inst
        progress(f"throughput: first run builds the template ({inst.name})")
        inst.run("run", "--rm", IMAGE, "true")
        _, out = inst.run("run", "-d", "-m", "768m", IMAGE, "sleep", "36000")
        self.idle = out.decode().strip()
        if exec_only or os.environ.get(CP_ONLY_ENV):
            return
        script = f"{lines_script(LOG_LINES)}; cat /tmp/lines; echo {END_MARKER}; sleep 36000"
        _, out = inst.run("run", "-d", IMAGE, "sh", "-c", script)
        self.logger = out.decode().strip()
        deadline = time.monotonic() + TIMEOUT
        while True:
            _, tail = inst.run("logs", "--tail", "1", self.logger)
            if END_MARKER.encode() in tail:
                break
            if time.monotonic() > deadline:
                raise CommandFailed(f"{inst.name}: the log container never finished writing")
            time.sleep(1)

    def logs(self) -> tuple[float, float]:
        return self.inst.stream(
            "logs", "-f", self.logger, expected=LOG_LINES * LINE + len(END_MARKER) + 1
        )

    def attached(self) -> tuple[float, float]:
        script = f"{lines_script(RUN_LINES)}; dd if=/tmp/lines bs=64k 2>/dev/null"
        return self.inst.stream("run", "--rm", IMAGE, "sh", "-c", script, expected=RUN_LINES * LINE)

    def cp(self, tree: Path, index: int) -> tuple[float, float, float, float]:
        """MB/s in and out, and the QEMU CPU seconds per 100 MB of each (the guest's
        work under TCG: what a loaded host stretches the wall time of, not this)."""
        inst = self.inst
        target = f"/tmp/in{index}"
        qemu = benchlib.qemu_pid(self.idle)
        cpu_before = process_cpu(qemu)
        elapsed_in, _ = inst.run("cp", str(tree), f"{self.idle}:{target}")
        cpu_in = process_cpu(qemu) - cpu_before
        out = self.scratch / f"out-{inst.name}-{index}"
        cpu_before = process_cpu(qemu)
        elapsed_out, _ = inst.run("cp", f"{self.idle}:{target}", str(out))
        cpu_out = process_cpu(qemu) - cpu_before
        copied = tree_bytes(out)
        if copied != tree_bytes(tree):
            raise CommandFailed(f"{inst.name}: cp out gave {copied} bytes, not {tree_bytes(tree)}")
        shutil.rmtree(out)
        inst.run("exec", self.idle, "rm", "-rf", target)
        size = CP_MB * MB
        per_100 = 100 * MB / size
        return size / elapsed_in / MB, size / elapsed_out / MB, cpu_in * per_100, cpu_out * per_100

    def exec_ms(self, count: int, python: str | None = None) -> list[float]:
        return [
            self.inst.run("exec", self.idle, "true", python=python)[0] * 1000 for _ in range(count)
        ]

    def exec_with_cpu(self, python: str | None = None) -> tuple[float, float]:
        """Wall ms of one ``husk exec ID true`` and the CPU ms its process used (a load
        stretches the wall time of every part, the CLI's own CPU far less)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = self.inst.run("exec", self.idle, "true", python=python)[0] * 1000
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return wall, cpu * 1000


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def python_floor_ms(python: str = sys.executable) -> float:
    started = time.perf_counter()
    subprocess.run([python, "-c", "pass"], check=True)
    return (time.perf_counter() - started) * 1000


def debian_python() -> str | None:
    """Debian's interpreter, when it is a 3.11 (the pycs' version) and not this one."""
    if not os.access(DEBIAN_PYTHON, os.X_OK) or os.path.realpath(DEBIAN_PYTHON) == os.path.realpath(
        sys.executable
    ):
        return None
    probe = subprocess.run(
        [DEBIAN_PYTHON, "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return DEBIAN_PYTHON if probe.stdout.strip() == "True" else None


def measure(options: PartOptions) -> list[Figure]:
    revision = os.environ.get(BASELINE_ENV) or ""
    exec_only = bool(os.environ.get(EXEC_ONLY_ENV))
    runs = 2 if options.quick else options.runs
    debian = debian_python()
    cp_only = bool(os.environ.get(CP_ONLY_ENV))
    samples: dict[str, Samples] = {}
    status = ""
    with benchlib.scratch_root("hbt-") as scratch, baseline_checkout(revision, scratch) as old:
        installs = [Installation("after", benchlib.REPO_ROOT, scratch / "a")]
        if old is not None:
            installs.insert(0, Installation("before", old, scratch / "b"))
        sessions = [Session(inst, scratch) for inst in installs]
        samples = {inst.name: Samples() for inst in installs}
        tree = scratch / "tree"
        try:
            if not exec_only:
                make_tree(tree)
            for session in sessions:
                session.inst.prepare()
                session.start(exec_only=exec_only)
            for index in range(runs):
                order = sessions if index % 2 == 0 else list(reversed(sessions))
                for session in order:
                    name = session.inst.name
                    got = samples[name]
                    progress(f"throughput: run {index + 1}/{runs} ({name})")
                    if not exec_only and not cp_only:
                        rate, cpu = session.logs()
                        got.logs.append(rate)
                        got.logs_cpu.append(cpu)
                        rate, cpu = session.attached()
                        got.attached.append(rate)
                        got.attached_cpu.append(cpu)
                    if not exec_only:
                        cp_in, cp_out, cpu_in, cpu_out = session.cp(tree, index)
                        got.cp_in.append(cp_in)
                        got.cp_out.append(cp_out)
                        got.cp_in_guest_cpu.append(cpu_in)
                        got.cp_out_guest_cpu.append(cpu_out)
                    if cp_only:
                        continue
                    execs = EXEC_PER_RUN // (2 if options.quick else 1)
                    # Each exec beside a floor of the same interpreter, alternating.
                    for _ in range(execs):
                        wall, cpu = session.exec_with_cpu()
                        got.exec_ms.append(wall)
                        got.exec_cpu_ms.append(cpu)
                        got.floor_ms.append(python_floor_ms())
                        if debian is not None:
                            wall, cpu = session.exec_with_cpu(python=debian)
                            got.debian_exec_ms.append(wall)
                            got.debian_exec_cpu_ms.append(cpu)
                            got.debian_floor_ms.append(python_floor_ms(debian))
        except (CommandFailed, subprocess.SubprocessError, OSError, TimeoutError) as err:
            status = f"failed: {err}"
            progress(status)
        finally:
            for session in sessions:
                session.inst.remove_all()
                session.inst.stop_daemon()
    return figures(samples, revision, status, exec_only)


def figures(
    samples: dict[str, Samples], revision: str, status: str, exec_only: bool = False
) -> list[Figure]:
    out: list[Figure] = []
    for name, got in samples.items():
        label = (
            ""
            if len(samples) == 1
            else (f", before ({revision})" if name == "before" else ", after")
        )
        rows = [
            (
                "`husk logs -f`, log on disk",
                "MB/s",
                got.logs,
                Target(">=", 100, "issue 16"),
                f"husk logs -f ID  ({LOG_LINES} lines of {LINE} B)",
            ),
            (
                "host CPU per 100 MB of `husk logs -f` (daemon + CLI)",
                "s",
                got.logs_cpu,
                None,
                "utime + stime of the daemon and the `husk logs -f` process",
            ),
            (
                "host CPU per 100 MB of attached `husk run` output (daemon + CLI)",
                "s",
                got.attached_cpu,
                None,
                "utime + stime of the daemon (whole run: start and removal too) and the CLI",
            ),
            (
                "stdout of attached `husk run`",
                "MB/s",
                got.attached,
                Target(">=", 100, "issue 16"),
                f"husk run --rm {IMAGE} sh -c 'dd if=/tmp/lines bs=64k'  ({RUN_LINES} x {LINE} B)",
            ),
            (
                f"`husk cp` {CP_MB} MB directory into a container",
                "MB/s",
                got.cp_in,
                Target(">=", 100, "issue 16"),
                f"husk cp DIR ID:/tmp/in  ({CP_FILES} files)",
            ),
            (
                f"`husk cp` {CP_MB} MB directory out of a container",
                "MB/s",
                got.cp_out,
                Target(">=", 100, "issue 16"),
                "husk cp ID:/tmp/in DIR",
            ),
            (
                "QEMU CPU per 100 MB of `husk cp` into a container",
                "s",
                got.cp_in_guest_cpu,
                None,
                "utime + stime of the container's QEMU process over the copy",
            ),
            (
                "QEMU CPU per 100 MB of `husk cp` out of a container",
                "s",
                got.cp_out_guest_cpu,
                None,
                "utime + stime of the container's QEMU process over the copy",
            ),
            (
                "exec round trip through the CLI (this interpreter's `husk` script)",
                "ms",
                got.exec_ms,
                Target("<=", 60, "issue 16"),
                "husk exec ID true",
            ),
            (
                "floor: this interpreter's `-c pass`",
                "ms",
                got.floor_ms,
                None,
                f"{sys.executable} -c pass",
            ),
            (
                f"exec round trip, the same script run by {DEBIAN_PYTHON}",
                "ms",
                got.debian_exec_ms,
                Target("<=", 60, "issue 16"),
                f"{DEBIAN_PYTHON} husk exec ID true",
            ),
            (
                f"floor: `{DEBIAN_PYTHON} -c pass`",
                "ms",
                got.debian_floor_ms,
                None,
                f"{DEBIAN_PYTHON} -c pass",
            ),
        ]
        rows += [
            (
                "CPU of the `husk exec ID true` process (this interpreter)",
                "ms",
                got.exec_cpu_ms,
                None,
                "utime + stime of the CLI process",
            ),
            (
                f"CPU of the `husk exec ID true` process ({DEBIAN_PYTHON})",
                "ms",
                got.debian_exec_cpu_ms,
                None,
                "utime + stime of the CLI process",
            ),
        ]
        if exec_only:
            rows = rows[-6:]
        for title, unit, values, target, command in rows:
            if os.environ.get(CP_ONLY_ENV) and "husk cp" not in title:
                continue
            out.append(
                Figure(
                    SECTION,
                    title + label,
                    unit,
                    values,
                    command,
                    target=target,
                    status=status if not values else "",
                )
            )
        for exec_values, floor_values, which in (
            (got.exec_ms, got.floor_ms, "this interpreter"),
            (got.debian_exec_ms, got.debian_floor_ms, DEBIAN_PYTHON),
        ):
            if exec_values and floor_values:
                part = statistics.median(exec_values) - statistics.median(floor_values)
                out.append(
                    Figure(
                        SECTION,
                        f"husk's part of the exec over the floor ({which}){label}",
                        "ms",
                        command="median of the exec - median of the floor",
                        derived=True,
                        summary=(part, None, None),
                    )
                )
    return out


if __name__ == "__main__":
    if "--baseline" in sys.argv:
        at = sys.argv.index("--baseline")
        os.environ[BASELINE_ENV] = sys.argv[at + 1]
        del sys.argv[at : at + 2]
    if "--exec-only" in sys.argv:
        sys.argv.remove("--exec-only")
        os.environ[EXEC_ONLY_ENV] = "1"
    if "--cp-only" in sys.argv:
        os.environ[CP_ONLY_ENV] = "1"
        sys.argv.remove("--cp-only")
    benchlib.part_main("throughput", __doc__ or "", measure)
