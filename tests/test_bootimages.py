"""A cold boot's private copies of the kernel and initramfs (husk.vm.bootimages), no VM."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from husk.vm.bootimages import BootImages, proc_fd_path


def _bundle(tmp_path: Path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initramfs.cpio"
    kernel.write_bytes(b"\x7fELF" + os.urandom(3 * 1024 * 1024 + 17))
    initrd.write_bytes(b"070701" + os.urandom(70_000))
    return kernel, initrd


def test_the_copies_hold_the_files_and_cannot_be_written_or_grown(tmp_path: Path) -> None:
    kernel, initrd = _bundle(tmp_path)
    images = BootImages.copy(kernel, initrd)
    try:
        for fd, source in ((images.kernel_fd, kernel), (images.initrd_fd, initrd)):
            # Read the way QEMU does: a new descriptor through /proc, mapped privately.
            reopened = os.open(proc_fd_path(fd), os.O_RDONLY)
            try:
                with mmap.mmap(reopened, 0, mmap.MAP_PRIVATE, mmap.PROT_READ) as mapped:
                    assert mapped[:] == source.read_bytes()
            finally:
                os.close(reopened)
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"x", 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, source.stat().st_size + 1)
    finally:
        images.release()


def test_release_empties_the_copies_under_a_live_map_and_is_idempotent(tmp_path: Path) -> None:
    kernel, initrd = _bundle(tmp_path)
    images = BootImages.copy(kernel, initrd)
    kernel_fd = images.kernel_fd
    # What QEMU holds: its own descriptor and a private map of the kernel.
    held = os.open(proc_fd_path(kernel_fd), os.O_RDONLY)
    try:
        mapped = mmap.mmap(held, 0, mmap.MAP_PRIVATE, mmap.PROT_READ)
        assert mapped[:4] == b"\x7fELF"
        images.release()
        assert os.fstat(held).st_size == 0  # the pages are gone, not only our descriptor
        assert images.fds == ()
        with pytest.raises(OSError) as closed:
            os.fstat(kernel_fd)
        assert closed.value.errno == errno.EBADF
        images.release()
        mapped.close()
    finally:
        os.close(held)
    # The bundle files themselves are untouched.
    assert kernel.read_bytes()[:4] == b"\x7fELF" and initrd.stat().st_size == 70_006


def test_a_missing_file_leaves_no_descriptor_behind(tmp_path: Path) -> None:
    kernel, _initrd = _bundle(tmp_path)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        BootImages.copy(kernel, tmp_path / "missing")
    assert set(os.listdir("/proc/self/fd")) == before
