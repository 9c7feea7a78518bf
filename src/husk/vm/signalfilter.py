"""A seccomp filter that lets a jailed QEMU signal only itself and trace nobody.

Rootless QEMU keeps the user's uid (inside a user namespace of its own), and the
kernel lets a process signal any process of its uid whatever namespace it is in:
a guest that took over QEMU could ``kill(-1, SIGKILL)`` the user's daemon, its
other VMs and the user's shell. Tracing across user namespaces is refused by the
kernel's capability rules already (``ptrace``, ``/proc/PID/mem``,
``process_vm_readv``); the filter refuses those calls too, so that holds without
relying on a sysctl or an LSM.

Allowed: ``kill``, ``tgkill``, ``rt_sigqueueinfo`` and ``rt_tgsigqueueinfo`` aimed at
QEMU's own process (its threads kick each other with ``tgkill``; ``abort`` raises).
Refused with EPERM: the same aimed at any other pid (0 and -1 included), ``tkill``,
the pidfd calls, ``ptrace``, ``process_vm_readv``/``writev`` and ``kcmp``, and every
call of another ABI (x32, i386) on the host's.
QEMU installs its own filter (``-sandbox``) on top; both apply.
"""

from __future__ import annotations

import ctypes
import errno
import platform
from dataclasses import dataclass

# Classic BPF opcodes and seccomp's return values (linux/filter.h, linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | errno.EPERM
_NR = 0  # offsets in struct seccomp_data
_ARCH = 4
_ARG0_LOW = 16  # the low 32 bits of args[0] (little-endian): a pid_t as the kernel reads it
_X32_BIT = 0x40000000

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


@dataclass(frozen=True)
class _Abi:
    audit_arch: int
    own_pid_calls: tuple[int, ...]
    """kill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo: the target pid is args[0]."""
    refused: tuple[int, ...]
    """tkill, ptrace, process_vm_readv/writev, kcmp, pidfd_send_signal/open/getfd."""
    x32: bool = False


_ABIS = {
    "x86_64": _Abi(0xC000003E, (62, 234, 129, 297), (200, 101, 310, 311, 312, 424, 434, 438), True),
    "aarch64": _Abi(0xC00000B7, (129, 131, 138, 240), (130, 117, 270, 271, 272, 424, 434, 438)),
}


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


@dataclass
class SignalFilter:
    """A program built in the parent; :meth:`aim` puts the child's pid in, after fork."""

    instructions: ctypes.Array[SockFilter]
    program: SockFprog
    pid_slots: tuple[int, ...]

    def aim(self, pid: int) -> None:
        for index in self.pid_slots:
            self.instructions[index].k = pid


def build(machine: str | None = None) -> SignalFilter | None:
    """The filter for this host's ABI; None where husk knows no syscall numbers."""
    abi = _ABIS.get(machine or platform.machine())
    if abi is None:
        return None
    code: list[tuple[int, int, int, int]] = []  # (opcode, jt, jf, k); jumps relative
    code.append((_LD_W_ABS, 0, 0, _ARCH))
    code.append((_JEQ_K, 1, 0, abi.audit_arch))
    code.append((_RET_K, 0, 0, _RET_EPERM))
    code.append((_LD_W_ABS, 0, 0, _NR))
    if abi.x32:
        code.append((_JGE_K, 0, 1, _X32_BIT))
        code.append((_RET_K, 0, 0, _RET_EPERM))
    for number in abi.refused:
        code.append((_JEQ_K, 0, 1, number))
        code.append((_RET_K, 0, 0, _RET_EPERM))
    # Each own-pid call jumps to the pid check at the end; anything else is allowed.
    checks_at = len(code) + len(abi.own_pid_calls) + 1
    for number in abi.own_pid_calls:
        code.append((_JEQ_K, checks_at - len(code) - 1, 0, number))
    code.append((_RET_K, 0, 0, _RET_ALLOW))
    code.append((_LD_W_ABS, 0, 0, _ARG0_LOW))
    pid_slot = len(code)
    code.append((_JEQ_K, 0, 1, 0))  # k: the pid, set by aim()
    code.append((_RET_K, 0, 0, _RET_ALLOW))
    code.append((_RET_K, 0, 0, _RET_EPERM))
    instructions = (SockFilter * len(code))(*(SockFilter(*op) for op in code))
    program = SockFprog(len(code), ctypes.cast(instructions, ctypes.POINTER(SockFilter)))
    return SignalFilter(instructions, program, (pid_slot,))
