"""Volumes with a size limit (``--opt size=``): a loop-mounted ext4 image on the host.

These run as root without a VM: the host kernel's ENOSPC is what a guest gets through
9p (tests/test_volume_vm.py shows it from inside a container)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from husk.errors import HuskError, InvalidArgument, NotSupported, StartFailed
from husk.runtime.mounts import plan_mounts
from husk.spec import BindMount, ContainerSpec
from husk.volumes import sized
from husk.volumes.manager import VolumeManager
from husk.volumes.store import VolumeStore

MIB = 1024 * 1024


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[VolumeManager]:
    assert os.geteuid() == 0, "sized volumes are mounted by root (CI runs as root)"
    store = VolumeStore(tmp_path / "volumes")
    yield VolumeManager(store, lambda: [])
    for volume in store.all():  # never leave a loop mount behind
        sized.unmount(Path(volume.mountpoint))


def _fill(directory: str, megabytes: int) -> int:
    """Writes up to ``megabytes`` MiB; the errno that stopped it (0: all written)."""
    try:
        with open(os.path.join(directory, "big"), "wb") as out:
            for _ in range(megabytes):
                out.write(b"\0" * MIB)
            out.flush()
            os.fsync(out.fileno())
    except OSError as err:
        return err.errno or -1
    return 0


def test_a_sized_volume_is_full_at_its_size_and_never_more(manager: VolumeManager) -> None:
    volume = manager.create("small", options={"size": "16M"})
    data = Path(volume.mountpoint)
    assert os.path.ismount(data)
    assert os.listdir(data) == []  # empty (no lost+found): copy-up fills it
    assert (data.stat().st_mode & 0o7777) == 0o755
    assert volume.size_bytes == 16 * MIB
    assert _fill(str(data), 64) == errno.ENOSPC
    disk = data.parent / sized.DISK
    assert disk.stat().st_blocks * 512 <= 16 * MIB
    # The rest of the host is untouched: nothing was written under the mount point.
    sized.unmount(data)
    assert os.listdir(data) == []


def test_a_reloaded_store_mounts_its_sized_volumes_again(
    manager: VolumeManager, tmp_path: Path
) -> None:
    volume = manager.create("kept", options={"size": "20M"})
    (Path(volume.mountpoint) / "f").write_text("still here\n")
    sized.unmount(Path(volume.mountpoint))  # as after a reboot of the host
    assert not os.path.ismount(volume.mountpoint)
    reloaded = VolumeManager(VolumeStore(tmp_path / "volumes"), lambda: [])
    assert os.path.ismount(volume.mountpoint)
    assert (Path(volume.mountpoint) / "f").read_text() == "still here\n"
    reloaded.remove("kept")
    assert not (tmp_path / "volumes" / "kept").exists()
    assert volume.mountpoint not in Path("/proc/self/mounts").read_text()


def test_a_start_mounts_an_unmounted_sized_volume_first(
    manager: VolumeManager, tmp_path: Path
) -> None:
    volume = manager.create("late", options={"size": "16M"})
    sized.unmount(Path(volume.mountpoint))
    bind = BindMount(source=volume.mountpoint, target="/data", volume="late")
    plan = plan_mounts(ContainerSpec(image="x", binds=[bind]), tmp_path / "container")
    assert os.path.ismount(volume.mountpoint) and len(plan.shares) == 1
    # A sized volume whose file system is gone cannot be mounted: the start fails rather
    # than let the container write, unlimited, into the directory underneath.
    sized.unmount(Path(volume.mountpoint))
    (Path(volume.mountpoint).parent / sized.DISK).write_bytes(b"not ext4")
    with pytest.raises(StartFailed, match="volume late: mount failed to mount"):
        plan_mounts(ContainerSpec(image="x", binds=[bind]), tmp_path / "container")


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"size": "lots"}, InvalidArgument, "invalid volume size 'lots'"),
        ({"size": "1M"}, InvalidArgument, "between 16M and 16T"),
        ({"size": "17T"}, InvalidArgument, "between 16M and 16T"),
        ({"size": "1G", "type": "none"}, NotSupported, "not supported with type"),
    ],
)
def test_bad_sizes_are_refused_and_leave_nothing(
    manager: VolumeManager, tmp_path: Path, options: dict[str, str], error: type, words: str
) -> None:
    with pytest.raises(error, match=words):
        manager.create("bad", options=options)
    assert not (tmp_path / "volumes" / "bad").exists()


def test_without_root_a_size_is_not_supported_and_nothing_is_left(
    manager: VolumeManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NotSupported, match="without root"):
        manager.create("mine", options={"size": "1G"})
    assert not (tmp_path / "volumes" / "mine").exists()


def test_config_json_volume_size_limits_every_new_plain_volume(
    manager: VolumeManager, tmp_path: Path
) -> None:
    config = Path(os.environ["HUSK_DATA_DIR"]) / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"volume_size": "24M"}))
    try:
        plain = manager.create("limited")
        assert plain.options == {"size": "24M"} and os.path.ismount(plain.mountpoint)
        own = manager.create("own", options={"size": "16M"})
        assert own.options == {"size": "16M"}
        anonymous = manager.create(anonymous=True)
        assert anonymous.size_bytes == 24 * MIB
        bind = manager.create(
            "bound", options={"type": "none", "o": "bind", "device": str(tmp_path)}
        )
        assert not os.path.ismount(bind.mountpoint)
        config.write_text(json.dumps({"volume_size": "a lot"}))
        with pytest.raises(InvalidArgument, match="volume_size"):
            manager.create("other")
        assert not (tmp_path / "volumes" / "other").exists()
    finally:
        config.unlink()


def test_tool_failures_are_one_line_errors(tmp_path: Path) -> None:
    data = tmp_path / "_data"
    data.mkdir()
    (tmp_path / sized.DISK).write_bytes(b"\0" * MIB)
    with pytest.raises(HuskError) as caught:
        sized.ensure_mounted(data)
    assert "\n" not in str(caught.value) and "failed to mount" in str(caught.value)
    assert subprocess.run(["mountpoint", "-q", str(data)], check=False).returncode != 0
