"""Run every husk benchmark and write one table: medians, spread, runs, targets, peers.

    python3 bench/run_all.py [--runs N] [--quick] [--only NAME ...] [--accel both|tcg|kvm]

Accelerators (issue 16): with ``--accel both`` (the default) every part runs under TCG,
then, where KVM really works here (husk's own probe boot reaches the guest agent), once
more under KVM with the same scripts; the report says why KVM was not measured when it
was not (on this development host: a PVM nested /dev/kvm, where a stock kernel hangs).

Each part is its own script (also runnable alone) and runs in its own process with
``--json``; this script collects the figures, prints a markdown report and writes
it to bench/results/latest.md (and the raw figures to latest.json, each part's
stderr to <part>.log). Parts run one after another, never side by side, so they
do not load the machine for each other.

Every part runs with TMPDIR pointing into a private directory. After the part
ends, any process still naming that directory (on its command line or in its
environment) is killed and the directory removed, so a crashed or timed-out part
leaves no VM, daemon or registry behind.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib
from benchlib import Figure, Target, progress

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
PART_TIMEOUT = 2.5 * 3600
QUICK_RUNS = 2
DEFAULT_RUNS = 5

# name -> script; the order is the order they run in.
PARTS: dict[str, str] = {
    "guest": "bench_guest.py",
    "runtime": "bench_runtime.py",
    "cli": "bench_cli.py",
    "templates": "bench_templates.py",
    "pull": "bench_pull.py",
    "docker_api": "bench_docker_api.py",
    "hardening": "bench_hardening.py",
    "networks": "bench_networks.py",
    "volumes": "bench_volumes.py",
    "ociruntime": "bench_ociruntime.py",
    "rootless": "bench_rootless.py",
    "readiness": "bench_readiness.py",
    "build": "bench_build.py",
    "throughput": "bench_throughput.py",
    "scaling": "bench_scaling.py",
}


# -- reading the parts' reports ----------------------------------------------------------


def pull_figures(report: dict[str, Any]) -> list[Figure]:
    """bench_pull.py's own JSON: husk pull+unpack against skopeo copy + umoci unpack."""
    section = "images (issue 3)"
    layers = report.get("image_layers", "?")
    return [
        Figure(
            section,
            f"pull + unpack, {layers}-layer image from a local registry (husk)",
            "s",
            [float(t) for t in report["husk_runs_s"]],
            "python3 bench/bench_pull.py (husk.oci.pull + unpack, one process per run)",
        ),
        Figure(
            section,
            "skopeo copy + umoci unpack of the same image",
            "s",
            [float(t) for t in report["skopeo_umoci_runs_s"]],
            "skopeo copy docker://127.0.0.1:PORT/bench/multilayer oci:DIR && umoci unpack",
            peer=True,
        ),
        Figure(
            section,
            "husk / (skopeo + umoci), medians",
            "x",
            [float(report["ratio"])],
            "median(husk) / median(skopeo + umoci), alternated runs",
            Target("<=", 1.0, "issue 3"),
            runs_label=f"{report.get('runs', '?')} + {report.get('runs', '?')}",
            derived=True,
        ),
    ]


def docker_api_figures(report: dict[str, Any]) -> list[Figure]:
    """bench_docker_api.py's own JSON: run --rm true through docker CLI, husk CLI, Runtime."""
    section = "Docker API (issue 5)"
    runs = str(report.get("runs", "?"))
    seconds = report["seconds"]
    labels = {
        "docker": (
            "`docker run --rm busybox true` against husk's socket",
            "docker run --rm IMAGE true",
        ),
        "husk": (
            "`husk run --rm busybox true` (same daemon)",
            "husk run --rm IMAGE true",
        ),
        "runtime": (
            "in-process Runtime create/start/wait (no HTTP)",
            "Runtime.create+start+wait",
        ),
    }
    result = []
    for key, (name, command) in labels.items():
        if key in seconds:
            figures = seconds[key]
            result.append(
                Figure(
                    section,
                    name,
                    "s",
                    summary=(figures["median"], figures["min"], figures["max"]),
                    command=command,
                    runs_label=runs,
                )
            )
    added = report.get("api_added_seconds", {})
    for key, name in (("docker_cli", "docker CLI"), ("husk_cli", "husk CLI")):
        if key in added:
            value = float(added[key]) * 1000
            result.append(
                Figure(
                    section,
                    f"API layer's added latency, {name} (median - in-process median)",
                    "ms",
                    [value],
                    "python3 bench/bench_docker_api.py",
                    runs_label=runs,
                    derived=True,
                )
            )
    return result


def templates_figures(report: dict[str, Any]) -> list[Figure]:
    """bench_templates.py's own JSON: medians only, at the VM and Sandbox level."""
    section = "templates, VM level (issue 6)"
    runs = str(report["runs"])
    memory = report.get("memory_mib", "?")
    command = f"python3 bench/bench_templates.py --runs {runs}  ({memory} MiB guest)"

    def median_only(name: str, unit: str, value: float, **extra: Any) -> Figure:
        extra.setdefault("runs_label", runs)
        return Figure(
            section,
            name,
            unit,
            summary=(float(value), None, None),
            command=command,
            **extra,
        )

    result = [
        median_only("cold boot → agent READY", "s", report["cold_boot_to_agent_ready_s"]),
        median_only("template restore → agent READY", "s", report["restore_to_agent_ready_s"]),
    ]
    for stage, value in report.get("restore_stages_s", {}).items():
        result.append(median_only(f"restore stage: {stage} (since QEMU spawn)", "s", value))
    start = report["sandbox_start_and_true_s"]
    result += [
        median_only("Sandbox.boot + run `true`, template", "s", start["template"]),
        median_only("Sandbox.boot + run `true`, cold", "s", start["cold"]),
        median_only(
            "Sandbox start + `true`, template / cold",
            "x",
            report["template_vs_cold_ratio"],
            target=Target("<=", 0.25, "issue 6, here at Sandbox level"),
        ),
    ]
    rss = report.get("idle_qemu_rss_mb", {})
    for path in ("template", "cold"):
        if path in rss:
            result.append(median_only(f"idle QEMU RSS, {path}", "MB", rss[path], runs_label="≥3"))
    if "snapshot_mb" in report:
        result.append(median_only("template device state file", "MB", report["snapshot_mb"]))
    if "memory_file_mb_on_disk" in report:
        result.append(
            median_only("template memory file, on disk", "MB", report["memory_file_mb_on_disk"])
        )
    first = report.get("first_start_with_build", {})
    if "seconds" in first:
        result.append(
            median_only(
                "first start: build template (cold boot + save) + restore",
                "s",
                first["seconds"],
                runs_label="1",
            )
        )
    return result


def generic_figures(part: str, report: dict[str, Any]) -> list[Figure]:
    """Any other JSON: every number becomes a row, its unit guessed from its key."""
    result = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            result.append(Figure(part, prefix, _unit_of(prefix), [float(v) for v in value]))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            result.append(Figure(part, prefix, _unit_of(prefix), [float(value)], runs_label="1"))

    walk("", report)
    return result


def _unit_of(key: str) -> str:
    lowered = key.lower()
    for suffix, unit in (("_ms", "ms"), ("_s", "s"), ("_mb", "MB"), ("ratio", "x")):
        if suffix in lowered:
            return unit
    return ""


ADAPTERS: dict[str, Callable[[dict[str, Any]], list[Figure]]] = {
    "pull": pull_figures,
    "docker_api": docker_api_figures,
    "templates": templates_figures,
}


def figures_of(part: str, report: dict[str, Any]) -> list[Figure]:
    """Figures in benchlib's shape as they are; other shapes through their adapter, and
    anything an adapter does not recognise (the part changed its output) row by row."""
    if isinstance(report.get("figures"), list):
        return [Figure.from_json(item) for item in report["figures"]]
    adapter = ADAPTERS.get(part)
    if adapter is not None:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return adapter(report)
        progress(f"{part}: unexpected report shape; listing its numbers as they are")
    return generic_figures(part, report)


# -- running a part ----------------------------------------------------------------------


def _supported_flags(script: Path) -> set[str]:
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return {word.strip(",[]") for word in result.stdout.split() if word.startswith("--")}


def kvm_verdict() -> tuple[bool, str]:
    """Whether VMs boot under KVM on this host (husk's own decision, probe included)."""
    env = {k: v for k, v in os.environ.items() if k != "HUSK_ACCEL"}
    code = (
        "import asyncio, json\n"
        "from husk.sandbox.accel import choose_accel\n"
        "from husk.vm.qemu import QemuBackend\n"
        "print(json.dumps(asyncio.run(choose_accel(QemuBackend())).to_json()))\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        choice = json.loads(result.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as err:
        return False, f"the accelerator check failed: {err}"
    return choice.get("name") == "kvm", str(choice.get("reason") or "")


def run_part(
    name: str, script: Path, runs: int, quick: bool, log: Path, accel: str = "tcg"
) -> dict[str, Any]:
    flags = _supported_flags(script)
    if "--json" not in flags:
        raise RuntimeError(f"{script.name} has no --json option")
    command = [sys.executable, str(script), "--json"]
    if "--runs" in flags:
        command += ["--runs", str(runs)]
    if quick and "--quick" in flags:
        command.append("--quick")
    scratch = Path(tempfile.mkdtemp(prefix=f"hb-{name[:6]}-", dir="/tmp"))
    env = dict(os.environ)
    env["TMPDIR"] = str(scratch)
    env["HUSK_ACCEL"] = accel
    process: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=str(benchlib.REPO_ROOT),
                start_new_session=True,
            )
            try:
                out, _ = process.communicate(timeout=PART_TIMEOUT)
            except subprocess.TimeoutExpired:
                _stop(process)
                raise RuntimeError(f"timed out after {PART_TIMEOUT:.0f}s") from None
        if process.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"exited {process.returncode}: {tail[0][-300:]}")
        return parse_report(out.decode(errors="replace"))
    finally:
        if process is not None and process.poll() is None:
            _stop(process)
        leftovers = benchlib.kill_processes_of(scratch)
        if leftovers:
            progress(f"{name}: killed {len(leftovers)} leftover process(es)")
        shutil.rmtree(scratch, ignore_errors=True)


def parse_report(text: str) -> dict[str, Any]:
    """The part's JSON object: all of stdout, or from the last line opening an object."""
    with contextlib.suppress(ValueError):
        whole = json.loads(text)
        if isinstance(whole, dict):
            return whole
    lines = text.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith("{"):
            with contextlib.suppress(ValueError):
                tail = json.loads("\n".join(lines[index:]))
                if isinstance(tail, dict):
                    return tail
    raise RuntimeError(f"printed no JSON object (stdout ends: {text.strip()[-200:]!r})")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the parts clean up on it), then SIGKILL for the whole process group."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


# -- the report --------------------------------------------------------------------------


def cross_part_figures(figures: list[Figure]) -> list[Figure]:
    """Ratios between figures of different parts: husk against its floor and its peer."""

    def find(section_word: str, name_word: str) -> Figure | None:
        return next(
            (f for f in figures if section_word in f.section and name_word in f.name and f.median),
            None,
        )

    pairs = [
        (
            "husk boot → READY (cold) / plain QEMU boot → READY",
            find("guest", "cold boot to agent READY"),
            find("guest", "plain QEMU microvm"),
        ),
        (
            "`husk run --rm true` (cold) / plain QEMU boot → READY",
            find("CLI end to end", "cold boot path"),
            find("guest", "plain QEMU microvm"),
        ),
        (
            "`husk run --rm true` (template) / `podman run --rm true`",
            find("fast starts", "template path"),
            find("peers", "podman run"),
        ),
        (
            "`husk run --rm true` (cold) / `podman run --rm true`",
            find("CLI end to end", "cold boot path"),
            find("peers", "podman run"),
        ),
    ]
    result = []
    for name, numerator, denominator in pairs:
        if numerator is None or denominator is None:
            continue
        assert numerator.median is not None and denominator.median is not None
        result.append(
            Figure(
                "summary",
                name,
                "x",
                [numerator.median / denominator.median],
                "ratio of the two medians above, same run",
                runs_label="-",
                derived=True,
            )
        )
    return result


def render(
    figures: list[Figure],
    failures: dict[str, str],
    started: datetime.datetime,
    facts: dict[str, Any],
    loads: dict[str, Any],
    args: argparse.Namespace,
) -> str:
    options = f"--runs {args.runs}" + (" --quick" if args.quick else "")
    if args.only:
        options += " --only " + " ".join(args.only)
    lines = [
        f"# husk benchmarks, {started.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"`python3 bench/run_all.py {options}` on {facts.get('cpus')} CPUs, "
        f"accelerator {facts.get('accel') or 'auto'} (KVM: {facts.get('kvm', 'not asked')}), "
        f"QEMU {facts.get('qemu', '?')}, "
        f"commit {facts.get('commit', '?')}, bundle {str(facts.get('bundle', '?'))[:19]}.",
        f"Load average at the start {facts.get('load_average')}, with "
        f"{facts.get('qemu_processes')} QEMU process(es) of others running: the host is "
        "shared, so figures are medians of several runs and the spread is shown.",
        "",
        benchlib.markdown_table(figures),
        "",
    ]
    if failures:
        lines += ["## Parts that did not complete", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in failures.items()]
        lines.append("")
    lines += ["## How each figure was taken", "", benchlib.commands_list(figures), ""]
    lines += ["## Load during each part", ""]
    lines += [f"- {name}: {load}" for name, load in loads.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help=f"runs per figure ({DEFAULT_RUNS})")
    parser.add_argument(
        "--quick", action="store_true", help=f"fewer runs ({QUICK_RUNS}), less work"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=list(PARTS), help="parts")
    parser.add_argument(
        "--accel",
        choices=("both", "tcg", "kvm"),
        default="both",
        help="accelerators to measure (both: TCG, and KVM where a probe boot succeeds)",
    )
    args = parser.parse_args()
    if args.runs is None:
        args.runs = QUICK_RUNS if args.quick else DEFAULT_RUNS
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    benchlib.use_tcg()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    facts = benchlib.host_facts()
    figures: list[Figure] = []
    failures: dict[str, str] = {}
    loads: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    accels = ["tcg"] if args.accel != "kvm" else []
    if args.accel in ("both", "kvm"):
        usable, why = kvm_verdict()
        facts["kvm"] = "measured" if usable else f"not measured: {why}"
        if usable:
            accels.append("kvm")
        progress(f"KVM: {facts['kvm']}")
    for accel in accels:
        for name in args.only or list(PARTS):
            key = name if accel == "tcg" else f"{name}-{accel}"
            script = BENCH_DIR / PARTS[name]
            if not script.exists():
                failures[key] = f"{script.name} does not exist yet"
                continue
            progress(f"== {key}: {script.name}")
            began = time.monotonic()
            before = benchlib.load_average()
            try:
                report = run_part(
                    name, script, args.runs, args.quick, RESULTS_DIR / f"{key}.log", accel
                )
            except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as err:
                failures[key] = f"{err} (see bench/results/{key}.log)"
                progress(f"{key}: FAILED: {err}")
                continue
            raw[key] = report
            (RESULTS_DIR / f"{key}.json").write_text(json.dumps(report, indent=1))
            measured = figures_of(name, report)
            if accel != "tcg":
                for figure in measured:
                    figure.section = f"[{accel}] {figure.section}"
            figures += measured
            loads[key] = (
                f"load {before} → {benchlib.load_average()}, {time.monotonic() - began:.0f} s"
            )
    figures += cross_part_figures(figures)
    text = render(figures, failures, started, facts, loads, args)
    (RESULTS_DIR / "latest.md").write_text(text)
    (RESULTS_DIR / "latest.json").write_text(
        json.dumps(
            {
                "started": started.isoformat(timespec="seconds"),
                "host": facts,
                "figures": [f.to_json() for f in figures],
                "failures": failures,
                "raw": raw,
            },
            indent=1,
        )
    )
    print(text)


if __name__ == "__main__":
    main()
