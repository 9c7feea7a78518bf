"""What the security hardening (issue 10) costs: paired runs of husk before and after it.

Two isolated installations run side by side on this machine, each with its own data
and run directories, its own guest bundle built from its own sources, the busybox test
image, and a daemon its CLI starts on demand:

- ``before``: the sources of ``--baseline`` (default: the last commit before the
  hardening), checked out into a scratch directory with ``git worktree``;
- ``after``: this checkout.

Runs alternate between the two (before, after, before, after ...), so load on the
host falls on both alike. Figures: ``husk run --rm busybox true`` on the template path
and ``husk exec ID true`` into a running container.

    python3 bench/bench_hardening.py [--runs 10] [--quick] [--json] [--baseline REV]
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import benchlib
from benchlib import Figure, PartOptions, progress

SECTION = "hardening cost (issue 10)"
BASELINE_ENV = "HUSK_BENCH_BASELINE"
DEFAULT_BASELINE = "24de92d"  # main before the issue 10 work
DEB_CACHE = Path("/var/lib/husk/cache/debs")
TIMEOUT = 600.0
IMAGE = "husk.local/busybox"


@dataclass
class Installation:
    name: str
    source: Path  # a checkout: its src/ is imported, its tests/testimages.py makes images
    root: Path

    @property
    def env(self) -> dict[str, str]:
        env = benchlib.husk_env(self.root)
        env["PYTHONPATH"] = str(self.source / "src")
        return env

    def python(self, *args: str, timeout: float = TIMEOUT) -> str:
        result = subprocess.run(
            [sys.executable, *args],
            env=self.env,
            capture_output=True,
            timeout=timeout,
            check=False,
            cwd=self.source,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{self.name}: {' '.join(args)[:80]} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace')[-1500:]}"
            )
        return result.stdout.decode(errors="replace")

    def husk(self, *args: str) -> float:
        """Wall time of one ``husk ARGS`` run with this installation's sources."""
        started = time.perf_counter()
        self.python("-c", "from husk.cli.main import main; main()", *args)
        return time.perf_counter() - started

    def prepare(self) -> None:
        progress(f"hardening: building the guest bundle and the busybox image ({self.name})")
        deb_cache = DEB_CACHE if DEB_CACHE.is_dir() else self.root / "debs"
        self.python(
            "-c",
            "import sys; from pathlib import Path; from husk.bundle.builder import ensure_built;"
            " ensure_built(Path(sys.argv[1]), deb_cache=Path(sys.argv[2]))",
            str(self.root / "data" / "bundle"),
            str(deb_cache),
        )
        self.python(str(self.source / "tests" / "testimages.py"), "busybox")


@contextlib.contextmanager
def baseline_checkout(revision: str, scratch: Path) -> Iterator[Path]:
    """The baseline's sources in a temporary git worktree, removed afterwards."""
    target = scratch / "baseline-src"
    subprocess.run(
        [
            "git",
            "-C",
            str(benchlib.REPO_ROOT),
            "worktree",
            "add",
            "--detach",
            "-q",
            str(target),
            revision,
        ],
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


def measure(options: PartOptions) -> list[Figure]:
    revision = os.environ.get(BASELINE_ENV) or DEFAULT_BASELINE
    # Any other baseline measures another change: say so instead of "hardening".
    section = SECTION if revision == DEFAULT_BASELINE else f"paired against {revision}"
    runs = 3 if options.quick else options.runs
    run_rm: dict[str, list[float]] = {"before": [], "after": []}
    exec_ms: dict[str, list[float]] = {"before": [], "after": []}
    status = ""
    with benchlib.scratch_root("hh") as scratch, baseline_checkout(revision, scratch) as old:
        pair = [
            Installation("before", old, scratch / "b"),
            Installation("after", benchlib.REPO_ROOT, scratch / "a"),
        ]
        try:
            for inst in pair:
                inst.prepare()
                progress(f"hardening: first run builds the template ({inst.name})")
                inst.husk("run", "--rm", IMAGE, "true")
            for index in range(runs):
                for inst in pair:
                    progress(f"hardening: run --rm true ({inst.name}) {index + 1}/{runs}")
                    run_rm[inst.name].append(inst.husk("run", "--rm", IMAGE, "true"))
            for inst in pair:
                inst.husk("run", "-d", "--name", "idle", IMAGE, "sleep", "3600")
            for index in range(runs):
                for inst in pair:
                    progress(f"hardening: exec true ({inst.name}) {index + 1}/{runs}")
                    exec_ms[inst.name].append(inst.husk("exec", "idle", "true") * 1000)
            for inst in pair:
                inst.husk("rm", "-f", "idle")
        except (RuntimeError, subprocess.SubprocessError, OSError) as err:
            status = f"failed: {err}"
            progress(status)
    command = f"husk run --rm {IMAGE} true"
    figures = []
    for name in ("before", "after"):
        label = f"{name} ({revision})" if name == "before" else "after (this checkout)"
        figures.append(
            Figure(
                section,
                f"`run --rm true`, template path, {label}",
                "s",
                run_rm[name],
                command,
                status=status if not run_rm[name] else "",
            )
        )
        figures.append(
            Figure(
                section,
                f"exec latency, {label}",
                "ms",
                exec_ms[name],
                "husk exec idle true  (idle: husk run -d busybox sleep 3600)",
                status=status if not exec_ms[name] else "",
            )
        )
    for what, samples, unit in (("`run --rm true`", run_rm, "s"), ("exec", exec_ms, "ms")):
        if samples["before"] and samples["after"]:
            before = Figure(section, "", unit, samples["before"]).median or 0.0
            after = Figure(section, "", unit, samples["after"]).median or 0.0
            figures.append(
                Figure(
                    section,
                    f"after / before, {what} (medians, same run)",
                    "x",
                    summary=(after / before if before else 0.0, None, None),
                    derived=True,
                )
            )
    return figures


if __name__ == "__main__":
    benchlib.part_main("hardening", __doc__ or "", measure, default_runs=10)
