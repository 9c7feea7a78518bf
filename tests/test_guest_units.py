"""Unit tests of guest agent parts that run on the host too: no VM needed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from husk.guest.agent import beneath, capabilities, syscalls


def test_capabilities_default_to_dockers_set() -> None:
    assert capabilities.mask(capabilities.from_spec({})) == 0xA80425FB


def test_capabilities_follow_cap_add_cap_drop_and_privileged() -> None:
    numbers = capabilities.NUMBERS
    changed = capabilities.from_spec({"cap_add": ["CAP_SYS_ADMIN"], "cap_drop": ["net_raw"]})
    assert numbers["SYS_ADMIN"] in changed and numbers["NET_RAW"] not in changed
    assert capabilities.from_spec({"cap_drop": ["ALL"]}) == frozenset()
    assert capabilities.from_spec({"cap_drop": ["ALL"], "cap_add": ["KILL"]}) == {numbers["KILL"]}
    assert capabilities.from_spec({"cap_add": ["ALL"]}) == capabilities.ALL
    assert capabilities.from_spec({"privileged": True}) == capabilities.ALL
    with pytest.raises(capabilities.CapabilityError, match="unknown capability 'CAP_NOPE'"):
        capabilities.from_spec({"cap_add": ["CAP_NOPE"]})
    with pytest.raises(capabilities.CapabilityError, match="cap_drop must be a list"):
        capabilities.from_spec({"cap_drop": "ALL"})


@pytest.fixture
def container(tmp_path: Path) -> tuple[Path, Path]:
    """A container root full of links out of it, and a directory outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "etc").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("agent's\n")
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.symlink("/", root / "up")
    os.symlink("../../../../" + str(outside), root / "relative-out")
    os.symlink(str(outside), root / "absolute-out")
    os.symlink("/etc/passwd", root / "passwd-link")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.mkfifo(root / "fifo")
    return root, outside


@pytest.fixture(params=["kernel", "by hand"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Reads resolved by openat2 (RESOLVE_IN_ROOT), or by open_path's walk as on a kernel
    without it: the same answers either way."""
    if request.param == "by hand":
        monkeypatch.setattr(beneath, "_kernel_resolves", False)
    return str(request.param)


def test_links_resolve_inside_the_container_root(
    container: tuple[Path, Path], resolution: str
) -> None:
    root, outside = container
    with pytest.raises(OSError) as looped:
        beneath.read_file(str(root), "/loop-a/x", 100)
    assert looped.value.errno == errno.ELOOP
    assert beneath.read_file(str(root), "/passwd-link", 100).startswith(b"root:")
    assert beneath.read_file(str(root), "/up/up/../etc/passwd", 100).startswith(b"root:")
    # Links aimed outside land inside the root instead: nothing of the outside is read.
    assert beneath.read_file(str(root), "/absolute-out/secret", 100) == b""
    assert beneath.read_file(str(root), "/relative-out/secret", 100) == b""
    fd = beneath.open_path(str(root), "/absolute-out/made", create_dirs=True)
    try:
        assert os.readlink(beneath.proc_path(fd)) == f"{root}{outside}/made"
    finally:
        os.close(fd)
    assert not (outside / "made").exists()
    with pytest.raises(OSError, match="too many symlinks"):
        beneath.open_path(str(root), "/loop-a")


def test_reads_never_block_and_writes_never_follow_links(
    container: tuple[Path, Path], resolution: str
) -> None:
    root, outside = container
    assert beneath.read_file(str(root), "/fifo", 100) == b""  # a FIFO reads as empty, at once
    os.symlink(str(outside / "secret"), root / "etc" / "hosts")
    beneath.write_file(str(root), "/etc/hosts", "127.0.0.1 localhost\n")
    assert (outside / "secret").read_text() == "agent's\n"
    assert not (root / "etc" / "hosts").is_symlink()
    assert (root / "etc" / "hosts").read_text() == "127.0.0.1 localhost\n"
    beneath.write_file(str(root), "/absolute-out/new.txt", "x")  # the parent link stays inside
    assert not (outside / "new.txt").exists()
    assert (root / str(outside).lstrip("/") / "new.txt").read_text() == "x"


def test_reads_take_the_kernels_resolution_and_fall_back_without_it(
    container: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One openat2 per read where the kernel has it (no walk); ENOSYS switches to the walk
    for good, and the walk gives the same answer."""
    root, _ = container
    walks: list[str] = []
    real_walk = beneath.open_path

    def walk(root_: str, path: str, **kwargs: bool) -> int:
        walks.append(path)
        return real_walk(root_, path, **kwargs)

    monkeypatch.setattr(beneath, "open_path", walk)
    assert beneath.read_file(str(root), "/passwd-link", 100).startswith(b"root:")
    assert walks == []

    def no_openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), path)

    monkeypatch.setattr(syscalls, "openat2", no_openat2)
    monkeypatch.setattr(beneath, "_kernel_resolves", True)
    assert beneath.read_file(str(root), "/passwd-link", 100).startswith(b"root:")
    assert beneath.read_file(str(root), "/absolute-out/secret", 100) == b""
    assert walks == ["/passwd-link", "/absolute-out/secret"]
    assert beneath._kernel_resolves is False
