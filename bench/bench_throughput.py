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
- ``husk exec ID true``: the round trip through the CLI, with ``python3 -c pass`` beside
  it as the floor of any Python command on this host.

    python3 bench/bench_throughput.py [--runs 5] [--quick] [--json] [--baseline REV] [--cp-only]

``--cp-only`` (or HUSK_BENCH_CP_ONLY=1) measures only the two ``husk cp`` figures (no log
container, no attached runs, no exec).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
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

    def run(self, *args: str, timeout: float = TIMEOUT) -> tuple[float, bytes]:
        started = time.perf_counter()
        result = subprocess.run(
            self.argv(*args), env=self.env, capture_output=True, timeout=timeout, check=False
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


class Session:
    """The containers one installation needs for the whole run."""

    def __init__(self, inst: Installation, scratch: Path) -> None:
        self.inst = inst
        self.scratch = scratch
        self.idle = ""
        self.logger = ""

    def start(self) -> None:
        inst = self.inst
        progress(f"throughput: first run builds the template ({inst.name})")
        inst.run("run", "--rm", IMAGE, "true")
        _, out = inst.run("run", "-d", "-m", "768m", IMAGE, "sleep", "36000")
        self.idle = out.decode().strip()
        if os.environ.get(CP_ONLY_ENV):
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
        qemu = qemu_pid(self.idle)
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

    def exec_ms(self, count: int) -> list[float]:
        return [self.inst.run("exec", self.idle, "true")[0] * 1000 for _ in range(count)]


def qemu_pid(container: str) -> int:
    """The QEMU process of ``container`` (its process name carries the id's first 16)."""
    marker = f"husk-vm:{container[:16]}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    return int(entry.name)
    raise CommandFailed(f"no QEMU process for container {container[:12]}")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def python_floor_ms() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return (time.perf_counter() - started) * 1000


def measure(options: PartOptions) -> list[Figure]:
    revision = os.environ.get(BASELINE_ENV) or ""
    runs = 2 if options.quick else options.runs
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
            make_tree(tree)
            for session in sessions:
                session.inst.prepare()
                session.start()
            for index in range(runs):
                order = sessions if index % 2 == 0 else list(reversed(sessions))
                for session in order:
                    name = session.inst.name
                    got = samples[name]
                    progress(f"throughput: run {index + 1}/{runs} ({name})")
                    if not cp_only:
                        rate, cpu = session.logs()
                        got.logs.append(rate)
                        got.logs_cpu.append(cpu)
                        rate, cpu = session.attached()
                        got.attached.append(rate)
                        got.attached_cpu.append(cpu)
                    cp_in, cp_out, cpu_in, cpu_out = session.cp(tree, index)
                    got.cp_in.append(cp_in)
                    got.cp_out.append(cp_out)
                    got.cp_in_guest_cpu.append(cpu_in)
                    got.cp_out_guest_cpu.append(cpu_out)
                    if cp_only:
                        continue
                    got.exec_ms.extend(session.exec_ms(EXEC_PER_RUN // (2 if options.quick else 1)))
                    got.floor_ms.append(python_floor_ms())
        except (CommandFailed, subprocess.SubprocessError, OSError, TimeoutError) as err:
            status = f"failed: {err}"
            progress(status)
        finally:
            for session in sessions:
                session.inst.remove_all()
                session.inst.stop_daemon()
    return figures(samples, revision, status)


def figures(samples: dict[str, Samples], revision: str, status: str) -> list[Figure]:
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
                "exec round trip through the CLI",
                "ms",
                got.exec_ms,
                Target("<=", 60, "issue 16"),
                "husk exec ID true",
            ),
            ("floor: `python3 -c pass`", "ms", got.floor_ms, None, "python3 -c pass"),
        ]
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
    return out


if __name__ == "__main__":
    if "--baseline" in sys.argv:
        at = sys.argv.index("--baseline")
        os.environ[BASELINE_ENV] = sys.argv[at + 1]
        del sys.argv[at : at + 2]
    if "--cp-only" in sys.argv:
        os.environ[CP_ONLY_ENV] = "1"
        sys.argv.remove("--cp-only")
    benchlib.part_main("throughput", __doc__ or "", measure)
