"""Benchmark husk end to end through its CLI and daemon (issues 4 and 6), beside its peers.

Two isolated husk installations (data + run directories under /tmp) share the
installed guest bundle and hold the busybox test image:

- ``cold``: its daemon runs with HUSK_NO_TEMPLATE=1, so every container boots cold;
- ``template``: templates on (the default), warmed by one run before measuring.

Each daemon is started on demand by the first ``husk`` command, as for a user.
Every figure is the wall time of real ``husk`` processes. Peers run in the same
pass: ``podman run --rm --network none`` and ``docker run --rm`` where an engine
answers on this host, and a bare ``python3 -c pass`` under ``husk ps``.

    python3 bench/bench_cli.py [--runs 5] [--quick] [--json]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
from benchlib import MB, Figure, PartOptions, Target, progress

SECTION_E2E = "CLI end to end (issue 4)"
SECTION_FAST = "fast starts (issue 6)"
SECTION_PEERS = "peers (issue 6)"
TIMEOUT = 600.0
IDLE_SETTLE_SECONDS = 3.0
EXEC_PER_RUN = 10
PS_RUNS = 30
CONCURRENT = 10
POOL_SIZE = 3
MANY = 50
MANY_MEMORY = "192m"
MANY_RSS_BUDGET_MB = 330  # per VM, from the idle RSS measured here, with margin
IMAGE = benchlib.BUSYBOX_IMAGE
GUEST_MEMORY_BYTES = 512 * 1024 * 1024  # the runtime's default
SHORT_IMAGE = "husk.local/busybox"


def husk_argv() -> list[str]:
    """The ``husk`` script pip installed for this interpreter.

    Looked up beside ``sys.executable`` before PATH: on a pyenv machine the PATH
    entry is a bash shim that re-resolves the interpreter on every call (45 ms
    here), which is the developer's setup, not husk.
    """
    beside = Path(sys.executable).with_name("husk")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("husk")
    return [found] if found else [sys.executable, "-c", "from husk.cli.main import main; main()"]


class CommandFailed(RuntimeError):
    pass


@dataclass
class Husk:
    """One isolated husk installation and the daemon its CLI starts on demand."""

    name: str
    root: Path
    env: dict[str, str]

    @classmethod
    def create(cls, name: str, root: Path, extra_env: dict[str, str]) -> Husk:
        benchlib.link_bundle(root)
        benchlib.import_busybox(root)
        env = benchlib.husk_env(root)
        env.update(extra_env)
        return cls(name, root, env)

    def argv(self, *args: str) -> list[str]:
        return [*husk_argv(), *args]

    def run(self, *args: str, timeout: float = TIMEOUT) -> tuple[float, str]:
        started = time.perf_counter()
        result = subprocess.run(
            self.argv(*args),
            env=self.env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise CommandFailed(
                f"husk {' '.join(args)} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()[-2000:]}"
            )
        return elapsed, result.stdout.decode(errors="replace")

    def concurrently(self, count: int, *args: str) -> tuple[float, list[str]]:
        """``count`` copies of ``husk ARGS`` at once; wall time until the last one exits."""
        started = time.perf_counter()
        processes = [
            subprocess.Popen(
                self.argv(*args),
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(count)
        ]
        outputs: list[str] = []
        failures: list[str] = []
        for process in processes:
            out, err = process.communicate(timeout=TIMEOUT)
            outputs.append(out.decode(errors="replace").strip())
            if process.returncode != 0:
                failures.append(f"exit {process.returncode}: {err.decode(errors='replace')[-300:]}")
        elapsed = time.perf_counter() - started
        if failures:
            raise CommandFailed(
                f"{len(failures)} of {count} concurrent `husk {' '.join(args)}` failed "
                f"after {elapsed:.0f} s; first: {failures[0].strip()}"
            )
        return elapsed, outputs

    def daemon_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.root / "run" / "husk.pid").read_text().strip())
            if Path(f"/proc/{pid}").exists():
                return pid
        return None

    def remove_all(self) -> None:
        with contextlib.suppress(CommandFailed, subprocess.SubprocessError):
            _, out = self.run("ps", "-aq")
            ids = out.split()
            if ids:
                self.run("rm", "-f", *ids)

    def stop_daemon(self) -> None:
        pid = self.daemon_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            benchlib.wait_until(lambda: not Path(f"/proc/{pid}").exists(), 20, "daemon exit")

    def template_built(self) -> bool:
        return any((self.root / "data" / "templates").glob("*/template.json"))


@dataclass
class Samples:
    first_run: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    run_rm: dict[str, list[float]] = field(default_factory=dict)
    exec_ms: list[float] = field(default_factory=list)
    run_to_first_log: list[float] = field(default_factory=list)
    logs_first_byte: list[float] = field(default_factory=list)
    log_rate: list[float] = field(default_factory=list)
    start_detached: dict[str, list[float]] = field(default_factory=dict)
    qemu_rss: dict[str, list[float]] = field(default_factory=dict)
    qemu_pss: dict[str, list[float]] = field(default_factory=dict)
    rss_parts: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    daemon_share: dict[str, list[float]] = field(default_factory=dict)
    ps_ms: list[float] = field(default_factory=list)
    python_floor_ms: list[float] = field(default_factory=list)
    ps_tool: str = ""
    exec_path: str = ""
    concurrent_rm: dict[str, list[float]] = field(default_factory=dict)
    concurrent_cpu: dict[str, list[float]] = field(default_factory=dict)
    many: dict[str, list[float]] = field(default_factory=dict)
    many_status: str = ""
    podman: list[float] = field(default_factory=list)
    podman_status: str = ""
    docker: list[float] = field(default_factory=list)
    docker_status: str = ""
    pool_rm: list[float] = field(default_factory=list)
    pool_rss: list[float] = field(default_factory=list)
    pool_cpu: list[float] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    """Step -> why it failed; the figures of a failed step show this instead of a value."""


STEP_ERRORS = (
    CommandFailed,
    subprocess.SubprocessError,
    OSError,
    TimeoutError,
    ValueError,
)


def attempt(samples: Samples, step: str, action: Callable[[], None]) -> None:
    """Runs one step; a failure is recorded for its figures and the other steps go on."""
    try:
        action()
    except STEP_ERRORS as err:
        samples.failures[step] = f"failed: {err}"[:400]
        progress(f"cli: {step} failed: {err}")


# -- peers -------------------------------------------------------------------------------


def docker_engine_status() -> str:
    """ "" when a local Docker engine answers; otherwise why it cannot be a peer."""
    docker = shutil.which("docker")
    if docker is None:
        return "not available: docker is not installed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env["DOCKER_HOST"] = "unix:///var/run/docker.sock"  # the local engine, nothing remote
    result = subprocess.run(
        [docker, "version", "--format", "{{.Server.Version}}"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        return "not available: docker CLI only, no engine at /var/run/docker.sock"
    return ""


def podman_status() -> str:
    if shutil.which("podman") is None:
        return "not available: podman is not installed"
    result = subprocess.run(["podman", "info"], capture_output=True, timeout=60, check=False)
    if result.returncode != 0:
        return f"not available: podman info failed: {result.stderr.decode()[-200:].strip()}"
    return ""


class OciPeer:
    """docker or podman running the same busybox image, loaded from ``husk save``."""

    def __init__(self, tool: list[str], env: dict[str, str], archive: Path) -> None:
        self.tool = tool
        self.env = env
        subprocess.run(
            [*tool, "load", "-i", str(archive)],
            env=env,
            check=True,
            capture_output=True,
        )

    def run_rm_true(self) -> float:
        started = time.perf_counter()
        subprocess.run(
            [*self.tool, "run", "--rm", "--network", "none", IMAGE, "true"],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )
        return time.perf_counter() - started

    def close(self) -> None:
        subprocess.run(
            [*self.tool, "rmi", "-f", IMAGE],
            env=self.env,
            capture_output=True,
            check=False,
        )


# -- measurements ------------------------------------------------------------------------


def measure_exec_and_logs(husk: Husk, samples: Samples, runs: int, quick: bool) -> None:
    _, out = husk.run("run", "-d", SHORT_IMAGE, "sleep", "3600")
    idle = out.strip()
    try:
        for _ in range(runs * (EXEC_PER_RUN // (2 if quick else 1))):
            elapsed, _ = husk.run("exec", idle, "true")
            samples.exec_ms.append(elapsed * 1000)
    finally:
        husk.run("rm", "-f", idle)
    for index in range(runs):
        progress(f"cli: logs, run {index + 1}/{runs}")
        started = time.perf_counter()
        _, out = husk.run("run", "-d", SHORT_IMAGE, "sh", "-c", "echo ready; sleep 3600")
        container = out.strip()
        try:
            follow_started = time.perf_counter()
            first, _, _ = follow_logs(husk, container, stop_after_first=True)
            samples.run_to_first_log.append(first - started)
            samples.logs_first_byte.append(first - follow_started)
        finally:
            husk.run("rm", "-f", container)
        _, out = husk.run("run", "-d", SHORT_IMAGE, "sh", "-c", benchlib.LOG_SCRIPT)
        container = out.strip()
        try:
            first, last, received = follow_logs(husk, container, stop_after_first=False)
            expected = benchlib.LOG_LINE * benchlib.LOG_LINES
            if received != expected:
                raise CommandFailed(f"husk logs -f gave {received} bytes, expected {expected}")
            samples.log_rate.append(received / (last - first) / MB)
        finally:
            husk.run("rm", "-f", container)


def follow_logs(husk: Husk, container: str, *, stop_after_first: bool) -> tuple[float, float, int]:
    """Runs ``husk logs -f``; returns (first byte time, last byte time, bytes)."""
    process = subprocess.Popen(
        husk.argv("logs", "-f", container),
        env=husk.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    first: float | None = None
    last = 0.0
    received = 0
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            chunk = os.read(process.stdout.fileno(), 1 << 20)
            if not chunk:
                break
            now = time.perf_counter()
            first = now if first is None else first
            last = now
            received += len(chunk)
            if stop_after_first:
                break
    finally:
        process.kill()
        process.wait(30)
        process.stdout.close()
    if first is None:
        raise CommandFailed(f"husk logs -f {container} produced nothing")
    return first, last, received


def measure_idle_set(husk: Husk, samples: Samples, *, measure_ps: bool) -> None:
    """10 `run -d` at once: the wall time, then QEMU RSS and the daemon's share per container."""
    pid = husk.daemon_pid()
    daemon_before = benchlib.process_rss_bytes(pid) if pid else 0
    elapsed, ids = husk.concurrently(CONCURRENT, "run", "-d", SHORT_IMAGE, "sleep", "3600")
    samples.start_detached.setdefault(husk.name, []).append(elapsed)
    try:
        time.sleep(IDLE_SETTLE_SECONDS)
        if len(ids) != CONCURRENT:
            raise CommandFailed(f"expected {CONCURRENT} containers, got {len(ids)}")
        pids = [benchlib.qemu_pid(container) for container in ids]
        samples.qemu_rss.setdefault(husk.name, []).extend(
            benchlib.process_rss_bytes(p) / MB for p in pids
        )
        for p in pids:
            memory = benchlib.qemu_memory(p, GUEST_MEMORY_BYTES)
            samples.qemu_pss.setdefault(husk.name, []).append(memory.pss)
            parts = samples.rss_parts.setdefault(husk.name, {})
            for part, _ in benchlib.RSS_PARTS:
                parts.setdefault(part, []).append(getattr(memory, part))
        if pid:
            daemon_after = benchlib.process_rss_bytes(pid)
            samples.daemon_share.setdefault(husk.name, []).append(
                (daemon_after - daemon_before) / CONCURRENT / MB
            )
        if measure_ps:
            measure_ps_wall(husk, samples)
    finally:
        husk.run("rm", "-f", *ids)


def measure_ps_wall(husk: Husk, samples: Samples) -> None:
    """`husk ps` against the running daemon (10 containers listed), and a bare Python floor."""
    hyperfine = shutil.which("hyperfine")
    ps = " ".join(husk.argv("ps"))
    floor = f"{sys.executable} -c pass"
    if hyperfine:
        samples.ps_tool = "hyperfine"
        export = husk.root / "hyperfine.json"
        subprocess.run(
            [
                hyperfine,
                "-N",
                "--warmup",
                "3",
                "--runs",
                str(PS_RUNS),
                "--export-json",
                str(export),
                ps,
                floor,
            ],
            env=husk.env,
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )
        results = json.loads(export.read_text())["results"]
        samples.ps_ms.extend(t * 1000 for t in results[0]["times"])
        samples.python_floor_ms.extend(t * 1000 for t in results[1]["times"])
        return
    samples.ps_tool = "python loop"
    for _ in range(3):
        husk.run("ps")
    for _ in range(PS_RUNS):
        elapsed, _ = husk.run("ps")
        samples.ps_ms.append(elapsed * 1000)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        samples.python_floor_ms.append((time.perf_counter() - started) * 1000)


def measure_many(husk: Husk, samples: Samples) -> None:
    needed = MANY * MANY_RSS_BUDGET_MB + 2000
    available = benchlib.available_memory_mb()
    if available < needed:
        samples.many_status = (
            f"skipped: {available} MB available, {needed} MB needed for {MANY} VMs"
        )
        return
    progress(f"cli: {MANY} concurrent run --rm true ({husk.name})")
    elapsed, _ = husk.concurrently(MANY, "run", "--rm", "-m", MANY_MEMORY, SHORT_IMAGE, "true")
    samples.many.setdefault(husk.name, []).append(elapsed)


def measure_peers(husk: Husk, samples: Samples, runs: int) -> None:
    samples.docker_status = docker_engine_status()
    samples.podman_status = podman_status()
    wanted: list[tuple[str, list[str], dict[str, str]]] = []
    if not samples.podman_status:
        wanted.append(("podman", *benchlib.private_podman(husk.root / "podman")))
    if not samples.docker_status:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = "unix:///var/run/docker.sock"
        wanted.append(("docker", ["docker"], env))
    if not wanted:
        return
    archive = husk.root / "busybox.tar"
    husk.run("save", "-o", str(archive), IMAGE)
    for name, tool, env in wanted:
        progress(f"cli: peer {name}")
        peer = OciPeer(tool, env, archive)
        try:
            peer.run_rm_true()  # warm-up
            target = samples.podman if name == "podman" else samples.docker
            target.extend(peer.run_rm_true() for _ in range(runs))
        finally:
            peer.close()


def measure_all(cold: Husk, template: Husk | None, options: PartOptions) -> Samples:
    samples = Samples()
    runs = options.runs
    paths = [cold] + ([template] if template is not None else [])

    def first_run() -> None:
        progress("cli: first `husk run --rm true`, daemon started on demand (cold root)")
        samples.first_run.append(cold.run("run", "--rm", SHORT_IMAGE, "true")[0])
        if template is not None:
            progress("cli: template warm-up (first run builds the template)")
            samples.warm.append(template.run("run", "--rm", SHORT_IMAGE, "true")[0])
            template.run("run", "--rm", SHORT_IMAGE, "true")

    def run_rm() -> None:
        for index in range(runs):
            for husk in paths:
                progress(f"cli: run --rm true ({husk.name}), run {index + 1}/{runs}")
                elapsed, _ = husk.run("run", "--rm", SHORT_IMAGE, "true")
                samples.run_rm.setdefault(husk.name, []).append(elapsed)

    default = template or cold  # what a user gets: templates when this husk has them
    samples.exec_path = default.name

    def exec_and_logs() -> None:
        progress(f"cli: exec latency and logs ({default.name})")
        measure_exec_and_logs(default, samples, runs, options.quick)

    def idle(husk: Husk) -> Callable[[], None]:
        def step() -> None:
            progress(f"cli: {CONCURRENT} idle containers ({husk.name})")
            measure_idle_set(husk, samples, measure_ps=husk is cold)

        return step

    def concurrent(husk: Husk) -> Callable[[], None]:
        def step() -> None:
            for index in range(1 if options.quick else min(runs, 3)):
                progress(f"cli: {CONCURRENT} concurrent run --rm true ({husk.name}), {index + 1}")
                busy = benchlib.host_cpu_busy_seconds()
                elapsed, _ = husk.concurrently(CONCURRENT, "run", "--rm", SHORT_IMAGE, "true")
                busy = benchlib.host_cpu_busy_seconds() - busy
                samples.concurrent_rm.setdefault(husk.name, []).append(elapsed)
                samples.concurrent_cpu.setdefault(husk.name, []).append(busy / CONCURRENT)

        return step

    def many(husk: Husk) -> Callable[[], None]:
        return lambda: measure_many(husk, samples)

    def warm_pool() -> None:
        assert template is not None
        measure_pool(template, samples, runs)

    attempt(samples, "first_run", first_run)
    attempt(samples, "run_rm", run_rm)
    attempt(samples, "exec_logs", exec_and_logs)
    for husk in paths:
        attempt(samples, f"idle:{husk.name}", idle(husk))
    for husk in paths:
        attempt(samples, f"concurrent:{husk.name}", concurrent(husk))
    if options.quick:
        samples.many_status = "skipped (--quick)"
    else:
        for husk in reversed(paths):  # the template path first: it is the one meant to scale
            attempt(samples, f"many:{husk.name}", many(husk))
    if template is not None:
        attempt(samples, "pool", warm_pool)
    attempt(samples, "peers", lambda: measure_peers(cold, samples, runs))
    return samples


def measure_pool(husk: Husk, samples: Samples, runs: int) -> None:
    """`husk system warm --pool N`: starts that take a pooled VM, and what idle ones cost."""
    warm = ("system", "warm", "--pool", str(POOL_SIZE), "--json")
    try:
        progress(f"cli: warm pool of {POOL_SIZE}")
        husk.run(*warm)
        for index in range(runs):
            progress(f"cli: run --rm true from the warm pool, run {index + 1}/{runs}")
            husk.run(*warm)  # the same pool: returns once it is full again
            samples.pool_rm.append(husk.run("run", "--rm", SHORT_IMAGE, "true")[0])
        husk.run(*warm)
        time.sleep(IDLE_SETTLE_SECONDS * 3)
        report = json.loads(husk.run(*warm)[1])["pool"]
        samples.pool_rss.append(report["rss_bytes"] / MB / report["idle"])
        samples.pool_cpu.append(report["cpu_percent"] / report["idle"])
    finally:
        husk.run("system", "warm", "--pool", "0")


def measure(options: PartOptions) -> list[Figure]:
    template_status = benchlib.templates_status()
    with benchlib.scratch_root("hbc-") as root:
        cold = Husk.create("cold", root / "c", {"HUSK_NO_TEMPLATE": "1"})
        template = (
            None
            if template_status
            else Husk.create("template", root / "t", {"HUSK_NO_TEMPLATE": ""})
        )
        try:
            samples = measure_all(cold, template, options)
            if template is not None and not template.template_built():
                template_status = "template path not taken: no template was saved"
        finally:
            for husk in (cold, template):
                if husk is not None:
                    husk.remove_all()
                    husk.stop_daemon()
    return figures(samples, options, template_status)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def figures(samples: Samples, options: PartOptions, template_status: str) -> list[Figure]:
    run_cmd = f"husk run --rm {SHORT_IMAGE} true"

    def tagged(steps: tuple[str, ...], *args: Any, **kwargs: Any) -> Figure:
        """A figure whose empty value is explained by the failure of one of its steps."""
        figure = Figure(*args, **kwargs)
        failed = next((samples.failures[s] for s in steps if s in samples.failures), "")
        if failed and not figure.samples and not figure.status:
            figure.status = failed
        return figure

    cold_rm = samples.run_rm.get("cold", [])
    tmpl_rm = samples.run_rm.get("template", [])
    result = [
        tagged(
            ("first_run",),
            SECTION_E2E,
            "first `husk run --rm true`, daemon started on demand",
            "s",
            samples.first_run,
            run_cmd + "  (no daemon running yet; HUSK_NO_TEMPLATE=1)",
        ),
        tagged(
            ("run_rm",),
            SECTION_E2E,
            "`husk run --rm busybox true`, cold boot path",
            "s",
            cold_rm,
            run_cmd + "  (daemon with HUSK_NO_TEMPLATE=1)",
        ),
        tagged(
            ("exec_logs",),
            SECTION_E2E,
            f"exec latency into a running container ({samples.exec_path})",
            "ms",
            samples.exec_ms,
            "husk exec ID true  (container: `husk run -d busybox sleep 3600`)",
            runs_label=f"1 container x {len(samples.exec_ms)}",
        ),
        tagged(
            ("exec_logs",),
            SECTION_E2E,
            f"first byte of logs: `run -d` spawn → first byte of `logs -f` ({samples.exec_path})",
            "s",
            samples.run_to_first_log,
            "husk run -d busybox sh -c 'echo ready; sleep 3600'; husk logs -f ID",
            note="includes the VM's start",
        ),
        tagged(
            ("exec_logs",),
            SECTION_E2E,
            f"`husk logs -f` spawn → first byte, running container ({samples.exec_path})",
            "ms",
            [s * 1000 for s in samples.logs_first_byte],
            "husk logs -f ID, the container having printed `ready`",
        ),
        tagged(
            ("exec_logs",),
            SECTION_E2E,
            f"`husk logs -f` throughput ({samples.exec_path})",
            "MB/s",
            samples.log_rate,
            f"husk logs -f ID of `{benchlib.LOG_SCRIPT}`, first to last byte on the CLI's stdout",
        ),
    ]
    for name in ("cold", "template"):
        section = SECTION_E2E if name == "cold" else SECTION_FAST
        status = template_status if name == "template" else ""
        rss = samples.qemu_rss.get(name, [])
        share = samples.daemon_share.get(name, [])
        total = [r + (_median(share) or 0.0) for r in rss] if rss else []
        result += [
            tagged(
                (f"idle:{name}",),
                section,
                f"{CONCURRENT} x `husk run -d busybox sleep 3600` at once ({name})",
                "s",
                samples.start_detached.get(name, []),
                f"{CONCURRENT} concurrent `husk run -d {SHORT_IMAGE} sleep 3600`, until all return",
                status=status,
            ),
            tagged(
                (f"idle:{name}",),
                section,
                f"QEMU RSS per idle container ({name}, 512 MiB guest)",
                "MB",
                rss,
                f"/proc/PID/statm of each QEMU, {IDLE_SETTLE_SECONDS:.0f} s after the "
                f"{CONCURRENT} containers started",
                runs_label=f"{len(rss)} VMs",
                status=status,
            ),
            tagged(
                (f"idle:{name}",),
                section,
                f"QEMU PSS per idle container ({name}; shared pages split among the VMs)",
                "MB",
                samples.qemu_pss.get(name, []),
                "Pss of /proc/PID/smaps of each QEMU, at the same moment as the RSS",
                runs_label=f"{len(samples.qemu_pss.get(name, []))} VMs",
                status=status,
            ),
            *(
                Figure(
                    section,
                    f"  of which: {label} ({name})",
                    "MB",
                    samples.rss_parts.get(name, {}).get(part, []),
                    "/proc/PID/smaps of each QEMU, at the same moment as the RSS",
                    runs_label=f"{len(rss)} VMs",
                )
                for part, label in benchlib.RSS_PARTS
                if samples.rss_parts.get(name, {}).get(part)
            ),
            tagged(
                (f"idle:{name}",),
                section,
                f"daemon RSS share per idle container ({name})",
                "MB",
                share,
                f"(daemon RSS with {CONCURRENT} idle containers - before) / {CONCURRENT}",
                status=status,
            ),
            tagged(
                (f"idle:{name}",),
                section,
                f"memory per idle container: QEMU RSS + daemon share ({name})",
                "MB",
                total,
                "each VM's RSS + the median daemon share",
                runs_label=f"{len(total)} VMs",
                status=status,
            ),
        ]
    cold_rss = _median(samples.qemu_rss.get("cold", []))
    result.append(
        tagged(
            ("run_rm",),
            SECTION_FAST,
            "`husk run --rm busybox true`, template path",
            "s",
            tmpl_rm,
            run_cmd + "  (templates on, after one warm-up run)",
            Target("<=", 0.5, "issue 6"),
            status=template_status,
        )
    )
    cold_median, tmpl_median = _median(cold_rm), _median(tmpl_rm)
    result.append(
        tagged(
            ("run_rm",),
            SECTION_FAST,
            "template / cold ratio of `husk run --rm true` (medians, same run)",
            "x",
            [tmpl_median / cold_median] if cold_median and tmpl_median else [],
            "median(template path) / median(cold path)",
            Target("<=", 0.25, "issue 6"),
            runs_label=f"{len(tmpl_rm)} + {len(cold_rm)}",
            derived=True,
            status=template_status,
        )
    )
    result.append(
        tagged(
            ("first_run",),
            SECTION_FAST,
            "first templated run (builds the template)",
            "s",
            samples.warm,
            run_cmd + "  (fresh data dir, templates on)",
            status=template_status,
        )
    )
    for name in ("template", "cold"):
        result.append(
            tagged(
                (f"concurrent:{name}",),
                SECTION_FAST,
                f"{CONCURRENT} concurrent `husk run --rm true` ({name})",
                "s",
                samples.concurrent_rm.get(name, []),
                f"{CONCURRENT} x `{run_cmd}` at once, until the last exits",
                Target("<=", 3.0, "issue 6") if name == "template" else None,
                status=template_status if name == "template" else "",
            )
        )
        result.append(
            tagged(
                (f"concurrent:{name}",),
                SECTION_FAST,
                f"  host CPU time per container in those runs ({name})",
                "s",
                samples.concurrent_cpu.get(name, []),
                f"busy time of all CPUs in /proc/stat across the run / {CONCURRENT} "
                f"(QEMU, daemon and CLIs; other users' work included); {os.cpu_count()} CPUs",
                status=template_status if name == "template" else "",
            )
        )
    for name in ("template", "cold"):
        result.append(
            tagged(
                (f"many:{name}",),
                SECTION_FAST,
                f"{MANY} concurrent `husk run --rm -m {MANY_MEMORY} true` ({name})",
                "s",
                samples.many.get(name, []),
                f"{MANY} x `husk run --rm -m {MANY_MEMORY} {SHORT_IMAGE} true` at once",
                status=samples.many_status or (template_status if name == "template" else ""),
            )
        )
    pool_cmd = f"husk system warm --pool {POOL_SIZE}"
    result += [
        tagged(
            ("pool",),
            SECTION_FAST,
            f"`husk run --rm busybox true`, warm pool of {POOL_SIZE}",
            "s",
            samples.pool_rm,
            f"{pool_cmd}; then {run_cmd}, the pool full again before each run",
            status=template_status,
        ),
        tagged(
            ("pool",),
            SECTION_FAST,
            "  QEMU RSS per idle pooled VM (template pages counted in each)",
            "MB",
            samples.pool_rss,
            f"`{pool_cmd} --json` report: rss_bytes / idle, {IDLE_SETTLE_SECONDS * 3:.0f} s "
            "after the pool filled",
            runs_label=f"{POOL_SIZE} VMs",
            status=template_status,
        ),
        tagged(
            ("pool",),
            SECTION_FAST,
            "  host CPU per idle pooled VM",
            "%",
            samples.pool_cpu,
            f"`{pool_cmd} --json` report: CPU seconds since each VM was ready / elapsed",
            runs_label=f"{POOL_SIZE} VMs",
            status=template_status,
        ),
    ]
    tmpl_rss = _median(samples.qemu_rss.get("template", []))
    result.append(
        tagged(
            ("idle:cold", "idle:template"),
            SECTION_FAST,
            "idle QEMU RSS, template / cold (medians)",
            "x",
            [tmpl_rss / cold_rss] if tmpl_rss and cold_rss else [],
            "median QEMU RSS per idle container, template path / cold path",
            Target("<=", 1.0, "issue 6"),
            runs_label=(
                f"{len(samples.qemu_rss.get('template', []))} + "
                f"{len(samples.qemu_rss.get('cold', []))} VMs"
            ),
            derived=True,
            status=template_status,
        )
    )
    result += [
        tagged(
            ("idle:cold",),
            SECTION_FAST,
            f"`husk ps` wall time ({CONCURRENT} containers running)",
            "ms",
            samples.ps_ms,
            f"hyperfine -N --warmup 3 --runs {PS_RUNS} 'husk ps'"
            if samples.ps_tool == "hyperfine"
            else "a Python loop of `husk ps` subprocesses",
            Target("<=", 100.0, "issue 6"),
        ),
        tagged(
            ("idle:cold",),
            SECTION_PEERS,
            "`python3 -c pass` (floor of any Python CLI)",
            "ms",
            samples.python_floor_ms,
            f"{samples.ps_tool or 'hyperfine'}: {sys.executable} -c pass",
            peer=True,
        ),
        tagged(
            ("peers",),
            SECTION_PEERS,
            "`podman run --rm --network none busybox true`",
            "s",
            samples.podman,
            "podman run --rm --network none husk.local/busybox:latest true "
            "(image loaded from `husk save`)",
            peer=True,
            status=samples.podman_status,
        ),
        tagged(
            ("peers",),
            SECTION_PEERS,
            "`docker run --rm --network none busybox true`",
            "s",
            samples.docker,
            "docker run --rm --network none husk.local/busybox:latest true",
            peer=True,
            status=samples.docker_status,
        ),
    ]
    return result


if __name__ == "__main__":
    benchlib.part_main("cli", __doc__.split("\n\n")[0], measure)
