"""mount(2) from the agent itself, through ctypes.

Assembling a container root takes seven mounts. Through busybox each is a fork
and an exec, and on a guest restored from a template under TCG, forking the
agent costs more than the mount: the kernel and interpreter code it runs has
to be translated again in every new VM.
"""

from __future__ import annotations

import os

from husk.guest.agent import syscalls
from husk.guest.agent.system import SystemError_

# <linux/mount.h>
_FLAGS = {
    "ro": syscalls.MS_RDONLY,
    "nosuid": syscalls.MS_NOSUID,
    "nodev": syscalls.MS_NODEV,
    "noexec": syscalls.MS_NOEXEC,
    "sync": 0x10,
    "noatime": 0x400,
    "nodiratime": 0x800,
    "relatime": 0x200000,
}
_NEUTRAL = frozenset({"rw", "suid", "dev", "exec", "async", "defaults"})


def split_options(options: str) -> tuple[int, str]:
    """Mount flags and the filesystem's own data string of a ``-o`` style list."""
    flags = 0
    data = []
    for option in options.split(","):
        if not option or option in _NEUTRAL:
            continue
        if option in _FLAGS:
            flags |= _FLAGS[option]
        else:
            data.append(option)
    return flags, ",".join(data)


def mount(fstype: str, source: str, target: str, options: str = "") -> None:
    """Mounts ``source`` on ``target`` (created if missing); SystemError_ naming both."""
    os.makedirs(target, exist_ok=True)
    flags, data = split_options(options)
    try:
        syscalls.mount(source, target, fstype, flags, data)
    except OSError as exc:
        raise SystemError_(
            f"mounting {source} on {target} failed: {os.strerror(exc.errno or 0)}"
        ) from None
