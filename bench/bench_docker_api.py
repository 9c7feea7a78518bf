"""Benchmark: what the Docker API layer adds to ``run --rm IMAGE true``.

Three ways to run the same short-lived container (a real VM each time, TCG
unless HUSK_ACCEL says otherwise), interleaved so that load drifts hit all alike:

- ``docker``:  ``docker run --rm IMAGE true`` (Docker 28 CLI) through husk's socket;
- ``husk``:    ``husk run --rm IMAGE true`` (husk's CLI, a client of the same socket);
- ``runtime``: the same create / start / wait-removed in-process on husk's Runtime,
  with no HTTP at all (its own data directory, so it never shares the daemon's state).

Prints the median, min and max of each, and the API layer's added latency:
median(docker) - median(runtime) and median(husk) - median(runtime).

    python bench/bench_docker_api.py [--runs 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

RUN_TIMEOUT = 300.0


def _bundle_env() -> dict[str, str]:
    """HUSK_KERNEL / HUSK_INITRD of the installed bundle, so isolated data dirs can boot."""
    if os.environ.get("HUSK_KERNEL") and os.environ.get("HUSK_INITRD"):
        return {}
    from husk.bundle.locate import locate

    bundle = locate(Path(os.environ.get("HUSK_BUNDLE_DIR", "/var/lib/husk/bundle")))
    return {"HUSK_KERNEL": str(bundle.kernel), "HUSK_INITRD": str(bundle.initrd)}


def _prepare_root(root: Path) -> str:
    """A data directory holding the busybox test image; returns the image's name."""
    from husk.oci.store import ImageStore
    from testimages import BUSYBOX_NAME, install_busybox_image

    install_busybox_image(ImageStore(root / "data" / "images"), workdir=root)
    return BUSYBOX_NAME


def _timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, timeout=RUN_TIMEOUT, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed ({result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return elapsed


class InProcess:
    """husk's Runtime in this process, in its own directories, on its own event loop."""

    def __init__(self, root: Path, image: str, base_env: dict[str, str]) -> None:
        for key, value in base_env.items():
            os.environ[key] = value
        os.environ["HUSK_DATA_DIR"] = str(root / "data")
        os.environ["HUSK_RUN_DIR"] = str(root / "run")
        self.image = image
        self.loop = asyncio.new_event_loop()
        from husk.runtime.runtime import Runtime

        self.runtime = Runtime()
        self.loop.run_until_complete(self.runtime.startup())

    async def _once(self) -> None:
        from husk.spec import ContainerSpec

        record = await self.runtime.create(
            ContainerSpec(image=self.image, cmd=["true"], auto_remove=True), pull_policy="never"
        )
        removed = asyncio.ensure_future(self.runtime.wait(record.id, "removed"))
        await asyncio.sleep(0)
        await self.runtime.start(record.id)
        code = await asyncio.wait_for(removed, RUN_TIMEOUT)
        if code != 0:
            raise SystemExit(f"in-process run exited {code}")

    def run_once(self) -> float:
        started = time.perf_counter()
        self.loop.run_until_complete(self._once())
        return time.perf_counter() - started

    def close(self) -> None:
        self.loop.run_until_complete(self.runtime.shutdown())
        self.loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    from daemon_fixtures import kill_leftover_vms, start_daemon

    daemon_root = Path(tempfile.mkdtemp(prefix="husk-bench-d-"))
    runtime_root = Path(tempfile.mkdtemp(prefix="husk-bench-r-"))
    bundle_env = _bundle_env()
    os.environ.update(bundle_env)
    os.environ.setdefault("HUSK_ACCEL", "tcg")
    image = _prepare_root(daemon_root)
    _prepare_root(runtime_root)
    daemon = start_daemon(daemon_root)
    in_process: InProcess | None = None
    try:
        env = daemon.env
        docker = shutil.which("docker") or "/usr/local/bin/docker"
        husk = [sys.executable, "-c", "from husk.cli.main import main; main()"]
        in_process = InProcess(runtime_root, image, bundle_env)
        runners: dict[str, Callable[[], float]] = {
            "docker": lambda: _timed([docker, "run", "--rm", image, "true"], env),
            "husk": lambda: _timed([*husk, "run", "--rm", image, "true"], env),
            "runtime": in_process.run_once,
        }
        for run in runners.values():  # warm-up: builds the erofs root, loads caches
            run()
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.runs):
            for name, run in runners.items():
                samples[name].append(run())
    finally:
        if in_process is not None:
            in_process.close()
        daemon.remove_all_containers()
        daemon.stop()
        kill_leftover_vms(runtime_root)
        shutil.rmtree(daemon_root, ignore_errors=True)
        shutil.rmtree(runtime_root, ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in samples.items()}
    report: dict[str, Any] = {
        "runs": args.runs,
        "accel": os.environ.get("HUSK_ACCEL", ""),
        "seconds": {
            name: {"median": medians[name], "min": min(values), "max": max(values)}
            for name, values in samples.items()
        },
        "api_added_seconds": {
            "docker_cli": medians["docker"] - medians["runtime"],
            "husk_cli": medians["husk"] - medians["runtime"],
        },
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"run --rm {image} true, {args.runs} runs each, interleaved")
    for name, figures in report["seconds"].items():
        print(
            f"  {name:<8} median {figures['median']:.3f}s  "
            f"min {figures['min']:.3f}s  max {figures['max']:.3f}s"
        )
    added = report["api_added_seconds"]
    print(
        f"  API layer adds (median): docker CLI {added['docker_cli'] * 1000:+.0f} ms, "
        f"husk CLI {added['husk_cli'] * 1000:+.0f} ms"
    )


if __name__ == "__main__":
    main()
