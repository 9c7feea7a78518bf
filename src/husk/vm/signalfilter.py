"""A seccomp filter that lets a jailed QEMU signal only itself and trace nobody.

Rootless QEMU keeps the user's uid (inside a user namespace of its own), and the
kernel lets a process signal any process of its uid whatever namespace it is in:
a guest that took over QEMU could ``kill(-1, SIGKILL)`` the user's daemon, its
other VMs and the user's shell. Tracing across user namespaces is refused by the
kernel's capability rules already (``ptrace``, ``/proc/PID/mem``,
``process_vm_readv``); the filter refuses those calls too, so that holds without
relying on a sysctl or an LSM.

The same uid also lets a process change another's resource limits (``prlimit64``: a
CPU limit of one second is a SIGKILL), priorities and I/O class (``setpriority``,
``ioprio_set``, for every process of the uid at once), scheduling (``sched_set*``), and
a process inherits its parent's session keyring, whose keys its possessor may read
whatever its uid. So:

Allowed: ``kill``, ``tgkill``, ``rt_sigqueueinfo`` and ``rt_tgsigqueueinfo`` aimed at
QEMU's own process (its threads kick each other with ``tgkill``; ``abort`` raises),
``fcntl(F_SETOWN)`` naming it (or nobody), and ``prlimit64``, ``sched_set*``,
``setpriority`` and ``ioprio_set`` of itself (0 or its pid; a priority of one process).
Refused with EPERM: the same aimed at any other pid (0 and -1 included), ``tkill``,
the pidfd calls, ``ptrace``, ``process_vm_readv``/``writev`` and ``kcmp``, the ways to
have the kernel signal a descriptor's owner (``F_SETOWN`` of another pid or group,
``F_SETOWN_EX``, the FIOSETOWN/SIOCSPGRP/TIOCSPGRP ioctls: with ``F_SETSIG``, a
SIGKILL to any process of the user when the descriptor became readable), the same
resource, priority and scheduling calls aimed at any other process, group or uid, the
key calls (``add_key``, ``request_key``, ``keyctl``: the daemon's session keyring), and
every call of another ABI (x32, i386) on the host's.
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
_ARG1_LOW = 24  # of args[1]: fcntl's and ioctl's command (unsigned int), a priority's who
_ARG2_LOW = 32  # of args[2]: F_SETOWN's pid (an int)
_X32_BIT = 0x40000000

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


@dataclass(frozen=True)
class _Abi:
    audit_arch: int
    own_pid_calls: tuple[int, ...]
    """kill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo: the target pid is args[0]."""
    refused: tuple[int, ...]
    """tkill, ptrace, process_vm_readv/writev, kcmp, pidfd_send_signal/open/getfd,
    add_key, request_key, keyctl."""
    self_calls: tuple[int, ...]
    """prlimit64, sched_setattr, sched_setaffinity, sched_setparam, sched_setscheduler:
    args[0] is the target pid, 0 the caller."""
    fcntl: int
    ioctl: int
    setpriority: int
    ioprio_set: int
    x32: bool = False


_ABIS = {
    "x86_64": _Abi(
        0xC000003E,
        own_pid_calls=(62, 234, 129, 297),
        refused=(200, 101, 310, 311, 312, 424, 434, 438, 248, 249, 250),
        self_calls=(302, 314, 203, 142, 144),
        fcntl=72,
        ioctl=16,
        setpriority=141,
        ioprio_set=251,
        x32=True,
    ),
    "aarch64": _Abi(
        0xC00000B7,
        own_pid_calls=(129, 131, 138, 240),
        refused=(130, 117, 270, 271, 272, 424, 434, 438, 217, 218, 219),
        self_calls=(261, 274, 122, 118, 119),
        fcntl=25,
        ioctl=29,
        setpriority=140,
        ioprio_set=30,
    ),
}
PRIO_PROCESS = 0
IOPRIO_WHO_PROCESS = 1
"""setpriority's and ioprio_set's ``which`` for one process (the others name a process
group or every process of a uid): the only one allowed, for QEMU itself."""
F_SETOWN = 8
F_SETOWN_EX = 15
"""fcntl commands that name the process SIGIO/SIGURG (or F_SETSIG's signal, SIGKILL
included) goes to when the descriptor is ready: another process of the user's uid is
signalled as ``kill`` would. F_SETOWN may name QEMU itself (or nobody, 0); F_SETOWN_EX
(its pid behind a pointer the filter cannot read) is refused."""
OWNER_IOCTLS = (0x8901, 0x8902, 0x5410)
"""FIOSETOWN and SIOCSPGRP (a socket's owner, as F_SETOWN) and TIOCSPGRP (a terminal's
foreground group, which the terminal signals), their pid behind a pointer: refused."""


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
    program = _Program()
    program.load(_ARCH)
    program.jump_if(abi.audit_arch, then="native", otherwise="refuse")
    program.label("native")
    program.load(_NR)
    if abi.x32:
        program.jump_if_at_least(_X32_BIT, then="refuse")
    for number in abi.refused:
        program.jump_if(number, then="refuse")
    for number in abi.own_pid_calls:
        program.jump_if(number, then="pid in args[0]")
    for number in abi.self_calls:
        program.jump_if(number, then="itself in args[0]")
    program.jump_if(abi.fcntl, then="fcntl")
    program.jump_if(abi.ioctl, then="ioctl")
    program.jump_if(abi.setpriority, then="setpriority")
    program.jump_if(abi.ioprio_set, then="ioprio_set")
    program.allow()
    # kill and the like: only at QEMU's own pid.
    program.label("pid in args[0]")
    program.load(_ARG0_LOW)
    program.jump_if_pid(then="allow")
    program.refuse()
    # Resource limits, scheduling: of QEMU itself (0 or its pid) only.
    program.only_itself("itself in args[0]", _ARG0_LOW)
    # Priorities: of one process, QEMU itself, only.
    program.label("setpriority")
    program.load(_ARG0_LOW)
    program.jump_if(PRIO_PROCESS, then="itself in args[1]", otherwise="refuse")
    program.label("ioprio_set")
    program.load(_ARG0_LOW)
    program.jump_if(IOPRIO_WHO_PROCESS, then="itself in args[1]", otherwise="refuse")
    program.only_itself("itself in args[1]", _ARG1_LOW)
    # fcntl: F_SETOWN only to QEMU itself or nobody, F_SETOWN_EX never.
    program.label("fcntl")
    program.load(_ARG1_LOW)
    program.jump_if(F_SETOWN_EX, then="refuse")
    program.jump_if(F_SETOWN, then="owner in args[2]")
    program.allow()
    program.only_itself("owner in args[2]", _ARG2_LOW)
    # ioctl: no owner or foreground group set through a pointer.
    program.label("ioctl")
    program.load(_ARG1_LOW)
    for command in OWNER_IOCTLS:
        program.jump_if(command, then="refuse")
    program.allow()
    program.label("allow")
    program.allow()
    program.label("refuse")
    program.refuse()
    return program.assemble()


class _Program:
    """Classic BPF with named jump targets (seccomp jumps only forward, by offset)."""

    def __init__(self) -> None:
        self._code: list[tuple[int, str | int, str | int, int]] = []
        self._labels: dict[str, int] = {}
        self._pid_slots: list[int] = []

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def load(self, offset: int) -> None:
        self._code.append((_LD_W_ABS, 0, 0, offset))

    def jump_if(self, value: int, *, then: str, otherwise: str | int = 0) -> None:
        self._code.append((_JEQ_K, then, otherwise, value))

    def jump_if_at_least(self, value: int, *, then: str) -> None:
        self._code.append((_JGE_K, then, 0, value))

    def jump_if_pid(self, *, then: str) -> None:
        self._pid_slots.append(len(self._code))
        self._code.append((_JEQ_K, then, 0, 0))  # k: the pid, set by aim()

    def only_itself(self, name: str, argument: int) -> None:
        """Block ``name``: allowed when ``argument`` is 0 (the caller) or QEMU's pid."""
        self.label(name)
        self.load(argument)
        self.jump_if(0, then="allow")
        self.jump_if_pid(then="allow")
        self.refuse()

    def allow(self) -> None:
        self._code.append((_RET_K, 0, 0, _RET_ALLOW))

    def refuse(self) -> None:
        self._code.append((_RET_K, 0, 0, _RET_EPERM))

    def _offset(self, index: int, target: str | int) -> int:
        if isinstance(target, int):
            return target  # 0: the next instruction
        offset = self._labels[target] - index - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"seccomp jump to {target!r} out of range: {offset}")
        return offset

    def assemble(self) -> SignalFilter:
        ops = [
            SockFilter(code, self._offset(i, jt), self._offset(i, jf), k)
            for i, (code, jt, jf, k) in enumerate(self._code)
        ]
        instructions = (SockFilter * len(ops))(*ops)
        program = SockFprog(len(ops), ctypes.cast(instructions, ctypes.POINTER(SockFilter)))
        return SignalFilter(instructions, program, tuple(self._pid_slots))
