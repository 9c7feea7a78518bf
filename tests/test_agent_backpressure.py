"""Back-pressure from the host's agent channel to a real guest (QEMU + the real agent).

A workload floods its stdout while the host's consumer stops reading: the host
holds at most one inbox's worth, the guest blocks, and once the consumer reads
again every byte arrives, in order. A consumer that stops for good is dropped
after the stall timeout, and the host's own requests keep being answered.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from fake_agent import rss_bytes
from husk.agent import channel as channel_module
from husk.agent.channel import ConsumerStalled
from husk.agent.client import ProcessSpec
from husk.sandbox.sandbox import Sandbox, SandboxConfig
from husk.vm.machine import random_mac

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
LINES = 200_000
COPIES = 24  # ~32 MB: more than the host inbox, the agent's buffer and the pipes together
FLOOD = f"seq 1 {LINES} > /tmp/f; for i in $(seq {COPIES}); do cat /tmp/f; done"


@asynccontextmanager
async def sandbox(disk: Path, state: Path) -> AsyncIterator[Sandbox]:
    box = await Sandbox.boot(
        SandboxConfig(
            state_dir=state,
            image_disk=disk,
            upper_disk=None,
            hostname="flood",
            mac=random_mac(),
            memory_bytes=256 * MIB,
        )
    )
    try:
        yield box
    finally:
        await box.client.close()
        await box.machine.kill()


def run(disk: Path, state: Path, body: Callable[[Sandbox], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with sandbox(disk, state) as box:
            return await asyncio.wait_for(body(box), 240)

    return asyncio.run(main())


def expected_output() -> bytes:
    return b"".join(b"%d\n" % i for i in range(1, LINES + 1)) * COPIES


def test_flooding_workload_with_a_stalled_consumer_stays_bounded_and_loses_nothing(
    busybox_disk: Path, tmp_path: Path, guest_bundle: object
) -> None:
    async def body(box: Sandbox) -> dict[str, float]:
        connection = box.client.connection
        process = await box.client.run(ProcessSpec(argv=["sh", "-c", FLOOD]))
        out = bytearray()
        output = process.output()
        _stream, first = await output.__anext__()
        out += first
        # The consumer stops reading while the guest floods: first the inbox fills and
        # the host stops reading the guest, then it stays stopped 3 s (under the 5 s rule).
        rss_before = rss_bytes()
        peak_buffered = peak_rss = 0
        deadline = time.monotonic() + 60
        stalled_until = None
        while stalled_until is None or time.monotonic() < stalled_until:
            assert time.monotonic() < deadline, "the inbox never filled"
            if stalled_until is None and connection.paused:
                stalled_until = time.monotonic() + 3.0
            peak_buffered = max(peak_buffered, connection.buffered_bytes)
            peak_rss = max(peak_rss, rss_bytes() - rss_before)
            await asyncio.sleep(0.02)
        assert connection.paused  # still: the guest is held back, not buffered here
        async for _stream, data in output:
            out += data
        assert process.exit_code == 0
        assert bytes(out) == expected_output()  # nothing lost, nothing reordered
        assert box.client.counters.stalled_channels == 0
        return {"buffered": peak_buffered, "rss": peak_rss}

    peaks = run(busybox_disk, tmp_path / "vm", body)
    assert peaks["buffered"] <= channel_module.INBOX_LIMIT + 2 * MIB
    assert peaks["rss"] < 32 * MIB


def test_a_consumer_that_stops_for_good_is_dropped_and_the_guest_keeps_serving(
    busybox_disk: Path, tmp_path: Path, guest_bundle: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_module, "STALL_TIMEOUT", 1.5)

    async def body(box: Sandbox) -> None:
        client = box.client
        workload = await client.run(ProcessSpec(argv=["sleep", "300"]))
        flood = await client.exec(ProcessSpec(argv=["cat", "/dev/zero"]))
        deadline = time.monotonic() + 30
        while not client.connection.paused:  # nobody reads the flood: its inbox fills
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        began = time.monotonic()
        figures = await client.stats()  # waits behind the stalled channel, then is answered
        assert figures["memory_total"] > 0
        assert time.monotonic() - began < 8
        assert client.counters.stalled_channels == 1
        with pytest.raises(ConsumerStalled):
            async for _ in flood.output():
                pass
        await flood.signal(signal.SIGKILL)
        hello = await client.exec(ProcessSpec(argv=["echo", "still serving"]))
        assert (await hello.collect())[1] == b"still serving\n"
        assert client.connection.buffered_bytes < channel_module.INBOX_LIMIT
        await workload.signal(signal.SIGKILL)

    run(busybox_disk, tmp_path / "vm", body)
