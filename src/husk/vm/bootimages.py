"""Private copies of the guest kernel and initramfs that a booted VM gives back.

QEMU maps the kernel (``-kernel``, an ELF whose segments it keeps as ROM blobs)
and the initramfs (``-initrd``, served to the firmware through fw_cfg) for the
whole life of the VM, only to reload them on a machine reset, which a husk VM
never does (``-no-reboot``: a guest reboot ends QEMU). On an idle cold-booted
VM those maps are about 55 MB of its resident memory (issue 16). QEMU has no
command to drop them, and a bundle file cannot be truncated under every VM
that maps it, so a cold boot hands QEMU a copy of each in a memfd of its own
and truncates it once the guest runs: the kernel then finds the pages gone from
its maps (truncation unmaps them) and frees them.

Only for VMs whose RAM is anonymous memory (cold boots). A template's VM and
its clones keep the bundle files: a clone never copies the ROMs into its RAM
(its RAM comes from the snapshot), so its maps of them stay almost untouched
(measured: 2 MB of the kernel's, page cache shared by every clone).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

# A private copy is never written or grown once made; shrinking it is the point.
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def proc_fd_path(fd: int) -> str:
    """How QEMU, which inherits ``fd``, opens it by name (its jail has /proc)."""
    return f"/proc/self/fd/{fd}"


def private_copy(source: Path, name: str) -> int:
    """A sealed memfd holding the bytes of ``source`` (close-on-exec; the spawner passes it)."""
    memfd = os.memfd_create(f"husk-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with source.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            os.ftruncate(memfd, size)
            copied = 0
            while copied < size:
                sent = os.sendfile(memfd, stream.fileno(), copied, size - copied)
                if sent == 0:
                    raise OSError(f"{source} shrank while it was copied")
                copied += sent
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(memfd)
        raise
    return memfd


@dataclass
class BootImages:
    """The kernel's and the initramfs's memfds for one VM; :meth:`release` frees them."""

    kernel_fd: int
    initrd_fd: int

    @classmethod
    def copy(cls, kernel: Path, initrd: Path) -> BootImages:
        kernel_fd = private_copy(kernel, "kernel")
        try:
            initrd_fd = private_copy(initrd, "initrd")
        except BaseException:
            os.close(kernel_fd)
            raise
        return cls(kernel_fd, initrd_fd)

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.kernel_fd, self.initrd_fd) if fd >= 0)

    def release(self) -> None:
        """Empties and closes both copies (idempotent).

        Only once the guest runs: the firmware reads the initramfs through fw_cfg after
        QEMU has started. Truncation takes the pages out of QEMU's maps too.
        """
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)
        self.kernel_fd = self.initrd_fd = -1
