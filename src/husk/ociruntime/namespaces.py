"""The keeper's own namespaces, made as runc makes the container's, before any thread.

``unshare`` acts on the calling thread alone (and a new mount namespace needs an
unshared file-system context), so the keeper calls these first thing, single-threaded.
"""

from __future__ import annotations

import ctypes
import os

from husk.ociruntime.errors import RuntimeFailure

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_PRIVATE = 0x40000


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def hold_mounts() -> None:
    """Gives the keeper a private copy of the mount table.

    The engine's root file system (an overlayfs it mounted) then stays mounted here, for
    the VM's 9p server, whatever the engine does with its own mounts meanwhile, as it
    stays in runc's container mount namespace. (The docker engine unmounts it from its
    namespace when ``create`` takes as long as a first boot-template build.)"""
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None):
        err = ctypes.get_errno()
        raise RuntimeFailure(f"cannot hold the container's mounts: {os.strerror(err)}")


def unshare_network() -> None:
    """Moves the keeper into a new network namespace: the one runc would have made for
    the container, which the engine's hooks then configure (its pid is the keeper's)."""
    if _libc().unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise RuntimeFailure(f"cannot make the container's network namespace: {os.strerror(err)}")
