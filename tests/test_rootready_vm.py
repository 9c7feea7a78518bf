"""Root-ready snapshots against real VMs: a container restored with its root already
assembled sees exactly its own image, writable layer, identity and mounts.

Decisions (keys, matching, pruning, fallback) are unit-tested on fake machines in
tests/test_rootready.py; this module boots the real guest bundle once per path.
"""

from __future__ import annotations

import time

import pytest

from husk import settings
from husk.runtime.runtime import Runtime
from husk.sandbox import rootready, rootready_boot
from husk.spec import ContainerSpec
from test_pool import IDENTITY
from test_runtime import busybox_image, logs_text, with_runtime  # noqa: F401 - fixture

pytestmark = pytest.mark.vm


def test_first_starts_from_a_root_ready_snapshot_are_each_their_own_container(
    busybox_image: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HUSK_NO_ROOT_READY", raising=False)
    monkeypatch.setattr(settings, "ROOT_READY_DEFAULT", True)  # config.json's root_ready

    async def start(runtime: Runtime, name: str) -> tuple[bool, list[str], float, float]:
        record = runtime.get(name)
        before = time.time()
        await runtime.start(record.id)
        root_ready = runtime.live[record.id].sandbox.root_ready
        assert await runtime.wait(record.id) == 0
        # (The log holds every run's output: this run's is its last nine lines.)
        lines = (await logs_text(runtime, record.id)).rstrip("\n").split("\n")[-9:]
        return root_ready, lines, before, time.time()

    async def body(runtime: Runtime) -> None:
        for name in ("shape", "first", "second"):
            await runtime.create(
                ContainerSpec(image=busybox_image, name=name, cmd=["sh", "-c", IDENTITY])
            )
        # The image's first start restores the shape template and has its snapshot built.
        root_ready, reference, _, _ = await start(runtime, "shape")
        assert not root_ready
        await rootready_boot.wait_for_builds()
        assert [p for p in rootready.snapshots_dir().iterdir() if not p.name.startswith(".")]

        seen = {reference[2]}
        for name in ("first", "second"):
            root_ready, lines, before, after = await start(runtime, name)
            assert root_ready, f"{name} did not start from the root-ready snapshot"
            record = runtime.get(name)
            hostname, mac, boot_id, clock, kept, true_size, hostname_file = lines[:7]
            # Its own identity: hostname (and file), MAC, entropy (boot_id), clock.
            assert hostname == hostname_file == record.id[:12]
            assert mac == record.mac_address
            assert boot_id not in seen
            seen.add(boot_id)
            assert before - 2 <= int(clock) <= after + 1
            # Its own writable layer: nothing the other container wrote shows.
            assert kept == "none"
            # Its image and the same mounts and interfaces as an ordinary start.
            assert true_size == reference[5]
            assert lines[7:9] == reference[7:9]
        # Its writes are on its own disk: a second start (the ordinary way) sees them.
        root_ready, lines, _, _ = await start(runtime, "first")
        assert not root_ready
        assert lines[4] == "kept"

    with_runtime(body)
