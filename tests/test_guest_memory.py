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


def test_only_the_loaded_boot_modules_files_are_deleted(tmp_path: Path) -> None:
    modules = tmp_path / "lib" / "modules"
    modules.mkdir(parents=True)
    for name in ("virtio_blk", "ext4", "broken", "wireguard"):
        (modules / f"{name}.ko").write_bytes(b"\x7fELF")
    listing = tmp_path / "modules"
    listing.write_text("virtio_blk\next4\nbroken\n")  # the boot loader's list
    proc_modules = tmp_path / "proc-modules"
    proc_modules.write_text(
        "ext4 983040 1 - Live 0x0\nvirtio_blk 28672 2 - Live 0x0\nwireguard 1 0 - Live 0x0\n"
    )
    dropped = system.drop_loaded_module_files(str(listing), str(modules), str(proc_modules))
    assert sorted(dropped) == ["ext4", "virtio_blk"]
    # A boot module that failed to load keeps its file; on-demand ones are not the boot's.
    assert sorted(p.name for p in modules.iterdir()) == ["broken.ko", "wireguard.ko"]
    assert system.drop_loaded_module_files(str(listing), str(modules), str(proc_modules)) == []


def test_without_the_lists_nothing_is_deleted(tmp_path: Path) -> None:
    module = tmp_path / "ext4.ko"
    module.write_bytes(b"\x7fELF")
    missing = str(tmp_path / "missing")
    assert system.drop_loaded_module_files(missing, str(tmp_path), missing) == []
    assert module.exists()
