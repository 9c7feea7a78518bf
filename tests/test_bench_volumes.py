"""bench/bench_volumes.py's scripts and the parsing of their output (no VM, no engine)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_volumes as bench
from bench_networks import StepFailed


def test_timed_output_gives_seconds_and_the_extra_words() -> None:
    seconds, extra = bench.parse_timed("noise\n33.39 38.85 0 dropped\n")
    assert seconds == pytest.approx(5.46)
    assert extra == ["dropped"]
    assert bench.parse_timed("1.00 1.50 0")[1] == []


@pytest.mark.parametrize(
    "output",
    ["33.39 38.85 1\n", "", "12.00 12.00 0\n", "dd: can't open\n", "a b 0\n"],
)
def test_a_failed_unmeasurable_or_garbled_sample_is_no_sample(output: str) -> None:
    with pytest.raises(StepFailed):
        bench.parse_timed(output)


def test_write_script_syncs_the_data_and_reports_its_status() -> None:
    script = bench.write_script("/vol", 64)
    assert f"of=/vol/seq bs={bench.MIB} count=64 conv=fsync" in script
    assert script.endswith("echo $a $b $rc")


def test_read_script_says_whether_the_guest_cache_was_dropped() -> None:
    guest = bench.read_script("/wl", drop_guest=True)
    assert "echo 3 2>/dev/null >/proc/sys/vm/drop_caches" in guest
    assert "c=cached" in guest and guest.endswith("echo $a $b $rc $c")
    assert "drop_caches" not in bench.read_script("/wl", drop_guest=False)


def test_the_scripts_run_in_a_real_shell(tmp_path: Path) -> None:
    """The same scripts on the host's sh: a write, a read and three extractions."""
    archive = tmp_path / "files.tar"
    bench.make_archive(archive, 20)
    place = tmp_path / "d"
    place.mkdir()

    def sh(script: str) -> str:
        return subprocess.run(
            ["sh", "-c", script], capture_output=True, text=True, check=True, timeout=60
        ).stdout

    sh(bench.write_script(str(place), 1))
    assert (place / "seq").stat().st_size == bench.MIB
    words = sh(bench.read_script(str(place), drop_guest=False)).split()
    assert words[2:] == ["0", "dropped"] and float(words[1]) >= float(words[0])
    words = sh(bench.small_files_script(str(place), str(archive), 3)).split()
    assert words[2] == "0"
    assert len(list((place / "small").glob("*/small/f*"))) == 60
    sh(bench.cleanup_script(str(place)))
    assert list(place.iterdir()) == []


def test_archive_holds_count_files_of_4_kib(tmp_path: Path) -> None:
    archive = tmp_path / "files.tar"
    bench.make_archive(archive, 7)
    with tarfile.open(archive) as tar:
        files = [m for m in tar.getmembers() if m.isfile()]
    assert len(files) == 7 and all(m.size == bench.FILE_SIZE for m in files)


def test_figures_name_every_place_and_say_why_one_has_no_samples() -> None:
    done = bench.Place("husk", "named volume", "/vol", lambda _s: "", "", drop_guest=True)
    done.mib, done.repeat = 64, 2
    done.write, done.read, done.files = [100.0], [200.0], [50.0]
    failed = bench.Place("docker", "tmpfs", "/tmpfs", lambda _s: "", "", status="failed: x")
    figures = bench.figures([done, failed], 2000)
    assert len(figures) == 6
    write = figures[0]
    assert write.name == "sequential write, husk, named volume" and write.median == 100.0
    assert "count=64 conv=fsync" in write.command and write.command.startswith("husk exec vb")
    assert "guest page cache dropped" in figures[1].note
    assert figures[2].unit == "files/s" and "2 x 2000 files" in figures[2].note
    assert all(f.peer and f.status == "failed: x" and f.median is None for f in figures[3:])
