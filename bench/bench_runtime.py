"""Benchmark the container lifecycle (issue 4) in-process, on husk's Runtime, with no daemon.

These are the floors of what the CLI measures end to end (bench_cli.py): the same
work without HTTP, the daemon or the CLI's start-up. Every container is the busybox
test image with the default 512 MiB guest, under TCG, started on both paths when
this husk has boot templates: cold (HUSK_NO_TEMPLATE=1) and restored from a template.

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
from typing import Any

import benchlib
from benchlib import MB, Figure, PartOptions, progress

SECTION = "runtime in-process (issue 4)"
NO_TEMPLATE_ENV = "HUSK_NO_TEMPLATE"
TIMEOUT = 300.0
IDLE_SETTLE_SECONDS = 3.0
EXEC_ITERATIONS = 20
CONCURRENT = 10


@dataclass
class Samples:
    run_rm: dict[str, list[float]] = field(default_factory=dict)
    exec_ms: list[float] = field(default_factory=list)
    first_log: list[float] = field(default_factory=list)
    log_rate: list[float] = field(default_factory=list)
    rss_mb: dict[str, list[float]] = field(default_factory=dict)
    concurrent: dict[str, list[float]] = field(default_factory=dict)


def use_path(path: str) -> None:
    """Templates are read from the environment at every start: switch them per measurement."""
    os.environ[NO_TEMPLATE_ENV] = "1" if path == "cold" else ""


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

    async def idle_container(self, samples: Samples, path: str, iterations: int) -> None:
        container = await self.create(["sleep", "3600"])
        try:
            await self.runtime.start(container)
            await asyncio.sleep(IDLE_SETTLE_SECONDS)
            stats = await self.runtime.stats(container)
            samples.rss_mb.setdefault(path, []).append(stats["vm_rss_bytes"] / MB)
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
                *(self.runtime.remove(c, force=True) for c in containers),
                return_exceptions=True,
            )


async def measure_in(paths: list[str], options: PartOptions) -> Samples:
    from husk.runtime.runtime import Runtime

    runtime = Runtime()
    await runtime.startup()
    bench = Bench(runtime, benchlib.BUSYBOX_IMAGE)
    samples = Samples()
    default_path = paths[-1]
    iterations = EXEC_ITERATIONS // (2 if options.quick else 1)
    try:
        for path in paths:
            progress(f"runtime: warm-up ({path}; builds the erofs disk, the template)")
            use_path(path)
            await bench.run_rm_true()
        for index in range(options.runs):
            label = f"runtime: run {index + 1}/{options.runs}"
            for path in paths:
                progress(f"{label}: run --rm true, idle container ({path})")
                use_path(path)
                samples.run_rm.setdefault(path, []).append(await bench.run_rm_true())
                await bench.idle_container(samples, path, iterations if path == default_path else 0)
            use_path(default_path)
            progress(f"{label}: first byte of logs, logs -f throughput ({default_path})")
            samples.first_log.append(await bench.first_log())
            samples.log_rate.append(await bench.log_throughput())
        for index in range(1 if options.quick else min(options.runs, 3)):
            for path in paths:
                progress(f"runtime: {CONCURRENT} concurrent starts ({path}), run {index + 1}")
                use_path(path)
                samples.concurrent.setdefault(path, []).append(
                    await bench.concurrent_start(CONCURRENT)
                )
    finally:
        for record in runtime.list(all=True):
            with contextlib.suppress(Exception):
                await runtime.remove(record.id, force=True)
        await runtime.shutdown()
    return samples


def measure(options: PartOptions) -> list[Figure]:
    template_status = benchlib.templates_status()
    paths = ["cold"] if template_status else ["cold", "template"]
    with benchlib.scratch_root("hbr-") as root:
        benchlib.link_bundle(root)
        benchlib.import_busybox(root)
        os.environ.update({"HUSK_DATA_DIR": str(root / "data"), "HUSK_RUN_DIR": str(root / "run")})
        samples = asyncio.run(measure_in(paths, options))
    runs = options.runs
    default_path = paths[-1]
    execs = len(samples.exec_ms) // max(runs, 1)
    result: list[Figure] = []
    for path in ("cold", "template"):
        status = template_status if path == "template" else ""
        result += [
            Figure(
                SECTION,
                f"run --rm busybox true ({path})",
                "s",
                samples.run_rm.get(path, []),
                "Runtime.create(ContainerSpec(cmd=['true'], auto_remove=True)) + start + "
                f"wait('removed'); {NO_TEMPLATE_ENV}={'1' if path == 'cold' else ''}",
                status=status,
            ),
            Figure(
                SECTION,
                f"QEMU RSS of an idle container ({path}, 512 MiB guest)",
                "MB",
                samples.rss_mb.get(path, []),
                f"Runtime.stats(id)['vm_rss_bytes'], `sleep 3600`, {IDLE_SETTLE_SECONDS:.0f} s "
                "after start",
                status=status,
            ),
            Figure(
                SECTION,
                f"{CONCURRENT} containers created + started concurrently ({path})",
                "s",
                samples.concurrent.get(path, []),
                f"asyncio.gather of {CONCURRENT} x create(sleep 3600), then of {CONCURRENT} x "
                "start, until all are running",
                status=status,
            ),
        ]
    result += [
        Figure(
            SECTION,
            f"exec latency (`true`) into a running container ({default_path})",
            "ms",
            samples.exec_ms,
            "Runtime.exec_simple(id, ['true'])",
            runs_label=f"{runs} containers x {execs}",
        ),
        Figure(
            SECTION,
            f"first byte of logs after start() ({default_path})",
            "s",
            samples.first_log,
            "start(id) → first entry of logs(id, follow=True); workload `echo ready; sleep 3600`",
            note="includes the VM's start",
        ),
        Figure(
            SECTION,
            f"logs -f throughput ({default_path})",
            "MB/s",
            samples.log_rate,
            f"logs(follow=True) of `{benchlib.LOG_SCRIPT}`, first to last byte",
        ),
    ]
    return result


if __name__ == "__main__":
    benchlib.part_main("runtime", __doc__.split("\n\n")[0], measure)
