"""bench/bench_networks.py's parsing of the guests' output (no VM, no engine)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_networks as bench

BUSYBOX_PING_TAIL = """
--- 172.18.0.2 ping statistics ---
20 packets transmitted, 20 packets received, 0% packet loss
round-trip min/avg/max = 1.685/3.204/7.557 ms
"""


def test_ping_average_is_the_middle_figure() -> None:
    assert bench.parse_ping(BUSYBOX_PING_TAIL) == pytest.approx(3.204)


def test_ping_without_a_round_trip_line_fails_clearly() -> None:
    with pytest.raises(bench.StepFailed, match="no round-trip line"):
        bench.parse_ping("ping: bad address 'srv'\n")


def test_transfer_rate_from_the_guest_uptimes() -> None:
    # 400 x 64 KiB in 38.85 - 33.39 = 5.46 s
    assert bench.parse_transfer("33.39 38.85 0\n", 400) == pytest.approx(400 * 65536 / 5.46 / 1e6)


@pytest.mark.parametrize("output", ["33.39 38.85 1\n", "", "12.00 12.00 0\n"])
def test_a_failed_or_instant_transfer_is_no_sample(output: str) -> None:
    with pytest.raises(bench.StepFailed):
        bench.parse_transfer(output, 400)


def test_sample_size_aims_at_the_wanted_duration_within_bounds() -> None:
    assert bench.blocks_for(5.0, 3.0) == int(5e6 * 3 / 65536)
    assert bench.blocks_for(0.01, 3.0) == bench.MIN_BLOCKS
    assert bench.blocks_for(1e6, 3.0) == bench.MAX_BLOCKS


def test_client_script_reports_uptimes_around_the_pipe_and_its_status() -> None:
    script = bench.client_script("172.18.0.2", 7)
    assert "dd if=/dev/zero bs=65536 count=7" in script
    assert f"nc 172.18.0.2 {bench.PORT}" in script
    assert script.endswith("echo $a $b $rc")
