"""Benchmark the container lifecycle (issue 4) in-process, on husk's Runtime, with no daemon.

These are the floors of what the CLI measures end to end (bench_cli.py): the same
work without HTTP, the daemon or the CLI's start-up. Every container is the busybox
test image with the default 512 MiB guest, booted cold under TCG.

- run --rm true: create(auto_remove) → start → wait(removed)
- exec latency: exec_simple(["true"]) into a running ``sleep`` container
- first byte of logs: start() → first entry of logs(follow=True)
- logs -f throughput: a container printing 8 MB of 1 KiB lines, followed live
- QEMU RSS of an idle container: stats()["vm_rss_bytes"]
- 10 containers created then started concurrently, until all are running

    python3 bench/bench_runtime.py [--runs 5] [--quick] [--json]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
from benchlib import MB, Figure, PartOptions, progress

SECTION = "runtime in-process (issue 4)"
TIMEOUT = 300.0
IDLE_SETTLE_SECONDS = 3.0
EXEC_ITERATIONS = 20
CONCURRENT = 10


@dataclass
class Samples:
    run_rm: list[float] = field(default_factory=list)
    exec_ms: list[float] = field(default_factory=list)
    first_log: list[float] = field(default_factory=list)
    log_rate: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    concurrent: list[float] = field(default_factory=list)


class Bench:
    def __init__(self, runtime: Any, image: str) -> None:
        self.runtime = runtime
        self.image = image

    async def create(self, cmd: list[str], *, auto_remove: bool = False) -> str:
        from husk.spec import ContainerSpec

        record = await self.runtime.create(
            ContainerSpec(image=self.image, cmd=cmd, auto_remove=auto_remove),
            pull_policy="never",
        )
        return str(record.id)

    async def run_rm_true(self) -> float:
        started = time.perf_counter()
        container = await self.create(["true"], auto_remove=True)
        removed = asyncio.ensure_future(self.runtime.wait(container, "removed"))
        await asyncio.sleep(0)
        await self.runtime.start(container)
        code = await asyncio.wait_for(removed, TIMEOUT)
        if code != 0:
            raise RuntimeError(f"true exited {code}")
        return time.perf_counter() - started

    async def idle_container(self, samples: Samples, iterations: int) -> None:
        container = await self.create(["sleep", "3600"])
        try:
            await self.runtime.start(container)
            await asyncio.sleep(IDLE_SETTLE_SECONDS)
            stats = await self.runtime.stats(container)
            samples.rss_mb.append(stats["vm_rss_bytes"] / MB)
            for _ in range(iterations):
                started = time.perf_counter()
                code, _, _ = await self.runtime.exec_simple(container, ["true"])
                samples.exec_ms.append((time.perf_counter() - started) * 1000)
                if code != 0:
                    raise RuntimeError(f"exec true exited {code}")
        finally:
            await self.runtime.remove(container, force=True)

    async def first_log(self) -> float:
        container = await self.create(["sh", "-c", "echo ready; sleep 3600"])
        try:
            started = time.perf_counter()
            await self.runtime.start(container)
            async for entry in self.runtime.logs(container, follow=True):
                if entry.data:
                    return time.perf_counter() - started
            raise RuntimeError("the container ended without logging")
        finally:
            await self.runtime.remove(container, force=True)

    async def log_throughput(self) -> float:
        container = await self.create(["sh", "-c", benchlib.LOG_SCRIPT])
        try:
            await self.runtime.start(container)
            received = 0
            first: float | None = None
            last = 0.0
            async for entry in self.runtime.logs(container, follow=True):
                if first is None:
                    first = time.perf_counter()
                received += len(entry.data)
                last = time.perf_counter()
            expected = benchlib.LOG_LINE * benchlib.LOG_LINES
            if received != expected or first is None:
                raise RuntimeError(f"followed {received} bytes of logs, expected {expected}")
            return received / (last - first) / MB
        finally:
            await self.runtime.remove(container, force=True)

    async def concurrent_start(self, count: int) -> float:
        started = time.perf_counter()
        containers = await asyncio.gather(*(self.create(["sleep", "3600"]) for _ in range(count)))
        try:
            await asyncio.gather(*(self.runtime.start(c) for c in containers))
            elapsed = time.perf_counter() - started
            running = [c for c in containers if self.runtime.get(c).state.status == "running"]
            if len(running) != count:
                raise RuntimeError(f"only {len(running)} of {count} containers are running")
            return elapsed
        finally:
            await asyncio.gather(
                *(self.runtime.remove(c, force=True) for c in containers), return_exceptions=True
            )


async def measure_in(root: Path, options: PartOptions) -> Samples:
    from husk.runtime.runtime import Runtime

    runtime = Runtime()
    await runtime.startup()
    bench = Bench(runtime, benchlib.BUSYBOX_IMAGE)
    samples = Samples()
    iterations = EXEC_ITERATIONS // (2 if options.quick else 1)
    try:
        progress("runtime: warm-up (builds the image's erofs disk)")
        await bench.run_rm_true()
        for index in range(options.runs):
            label = f"runtime: run {index + 1}/{options.runs}"
            progress(f"{label}: run --rm true")
            samples.run_rm.append(await bench.run_rm_true())
            progress(f"{label}: idle container, exec latency")
            await bench.idle_container(samples, iterations)
            progress(f"{label}: first byte of logs")
            samples.first_log.append(await bench.first_log())
            progress(f"{label}: logs -f throughput")
            samples.log_rate.append(await bench.log_throughput())
        for index in range(1 if options.quick else min(options.runs, 3)):
            progress(f"runtime: {CONCURRENT} concurrent starts, run {index + 1}")
            samples.concurrent.append(await bench.concurrent_start(CONCURRENT))
    finally:
        for record in runtime.list(all=True):
            with contextlib.suppress(Exception):
                await runtime.remove(record.id, force=True)
        await runtime.shutdown()
    return samples


def measure(options: PartOptions) -> list[Figure]:
    with benchlib.scratch_root("hbr-") as root:
        benchlib.link_bundle(root)
        benchlib.import_busybox(root)
        os.environ.update({"HUSK_DATA_DIR": str(root / "data"), "HUSK_RUN_DIR": str(root / "run")})
        samples = asyncio.run(measure_in(root, options))
    runs = options.runs
    execs = len(samples.exec_ms) // max(runs, 1)
    return [
        Figure(
            SECTION,
            "run --rm busybox true (cold boot path)",
            "s",
            samples.run_rm,
            "Runtime.create(ContainerSpec(cmd=['true'], auto_remove=True)) + start + "
            "wait('removed')",
        ),
        Figure(
            SECTION,
            "exec latency (`true`) into a running container",
            "ms",
            samples.exec_ms,
            "Runtime.exec_simple(id, ['true'])",
            runs_label=f"{runs} containers x {execs}",
        ),
        Figure(
            SECTION,
            "first byte of logs after start()",
            "s",
            samples.first_log,
            "start(id) → first entry of logs(id, follow=True); workload `echo ready; sleep 3600`",
            note="includes the cold boot",
        ),
        Figure(
            SECTION,
            "logs -f throughput",
            "MB/s",
            samples.log_rate,
            f"logs(follow=True) of `{benchlib.LOG_SCRIPT}`, first to last byte",
        ),
        Figure(
            SECTION,
            "QEMU RSS of an idle container (512 MiB guest)",
            "MB",
            samples.rss_mb,
            f"Runtime.stats(id)['vm_rss_bytes'], `sleep 3600`, {IDLE_SETTLE_SECONDS:.0f} s after "
            "start",
        ),
        Figure(
            SECTION,
            f"{CONCURRENT} containers created + started concurrently (all running)",
            "s",
            samples.concurrent,
            f"asyncio.gather of {CONCURRENT} x create(sleep 3600), then of {CONCURRENT} x start",
        ),
    ]


if __name__ == "__main__":
    benchlib.part_main("runtime", __doc__.split("\n\n")[0], measure)
