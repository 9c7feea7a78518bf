"""The guest's free-page reporting granularity (husk.guest.agent.system), no VM."""

from __future__ import annotations

from pathlib import Path

from husk.guest.agent import system


def test_free_blocks_below_2_mib_are_reported(tmp_path: Path) -> None:
    parameter = tmp_path / "page_reporting_order"
    parameter.write_text("9\n")  # what virtio_balloon leaves there: 2 MiB blocks
    assert system.report_small_free_blocks(path=str(parameter))
    assert int(parameter.read_text()) == system.REPORTED_ORDER < 9


def test_a_kernel_without_page_reporting_is_left_alone(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-module" / "page_reporting_order"
    assert not system.report_small_free_blocks(path=str(missing))
    assert not missing.parent.exists()
