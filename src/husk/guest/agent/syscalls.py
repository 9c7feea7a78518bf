"""Linux system calls CPython 3.11 lacks, through ctypes: mount, namespaces, capabilities.

Every wrapper raises :class:`OSError` with the kernel's errno, as ``os`` functions do.
"""

from __future__ import annotations

import ctypes
import os

from husk.guest import kernelnames

_libc = ctypes.CDLL(None, use_errno=True)

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000

# <linux/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

# <linux/prctl.h>
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


_mount = _libc.mount
_mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
_mount.restype = ctypes.c_int


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _mount(_bytes(source), target.encode(), _bytes(fstype), flags, _bytes(data or None))
    _check(result, f"mount {target}")


_umount2 = _libc.umount2
_umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_umount2.restype = ctypes.c_int


def umount(target: str, flags: int = 0) -> None:
    _check(_umount2(target.encode(), flags), f"umount {target}")


_unshare = _libc.unshare
_unshare.argtypes = (ctypes.c_int,)
_unshare.restype = ctypes.c_int


def unshare(flags: int) -> None:
    _check(_unshare(flags), "unshare")


_setns = _libc.setns
_setns.argtypes = (ctypes.c_int, ctypes.c_int)
_setns.restype = ctypes.c_int


def setns(fd: int, nstype: int) -> None:
    _check(_setns(fd, nstype), "setns")


_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    result = int(_prctl(option, arg2, arg3, 0, 0))
    if result < 0:
        _check(result, f"prctl {option}")
    return result


def drop_from_bounding_set(caps: list[int]) -> None:
    """PR_CAPBSET_DROP for each of ``caps``, in a tight loop (about 30 calls per start)."""
    call = _prctl
    for cap in caps:
        if call(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            _check(-1, f"dropping capability {cap}")


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


_capset = _libc.capset
_capset.argtypes = (ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData))
_capset.restype = ctypes.c_int


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Sets the calling thread's three capability sets (64-bit masks)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for index in (0, 1):
        shift = 32 * index
        data[index].effective = (effective >> shift) & 0xFFFFFFFF
        data[index].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[index].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_capset(ctypes.byref(header), data), "capset")


# <linux/openat2.h>; the syscall number is the same on every architecture (5.6 on).
_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2) (mode 0): a new descriptor, or OSError with the kernel's errno."""
    how = _OpenHow(flags, 0, resolve)
    result = _syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(path.encode()),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), path)
    return int(result)


# <sys/resource.h> (the guest's CPython has no resource module): RLIMIT_* numbers.
RLIMITS = kernelnames.RLIMITS
RLIM_INFINITY = (1 << 64) - 1


class _Rlimit(ctypes.Structure):
    _fields_ = (("soft", ctypes.c_uint64), ("hard", ctypes.c_uint64))


_setrlimit = _libc.setrlimit
_setrlimit.argtypes = (ctypes.c_int, ctypes.POINTER(_Rlimit))
_setrlimit.restype = ctypes.c_int


def setrlimit(resource: int, soft: int, hard: int) -> None:
    """Sets a resource limit of the calling process; a negative value means unlimited."""
    limit = _Rlimit(RLIM_INFINITY if soft < 0 else soft, RLIM_INFINITY if hard < 0 else hard)
    _check(_setrlimit(resource, ctypes.byref(limit)), f"setrlimit {resource}")
