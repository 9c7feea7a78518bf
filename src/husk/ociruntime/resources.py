"""``linux.resources`` (runc's LinuxResources) as the files of the container's cgroup in
its VM: what ``create`` starts with and what ``update`` changes.

The VM's memory and vCPUs are fixed when it boots (they are sized from the bundle's
resources), so a limit is applied where runc applies it, to the container's cgroup,
but inside the guest (husk.guest.agent.cgroup2): memory.max, memory.low, cpu.max,
cpu.weight, cpuset.cpus, pids.max. A limit the VM cannot give (more memory than it has,
more CPU time or other CPUs than its vCPUs) and a control it has no counterpart for
(block I/O weights and throttles, real-time CPU time, kernel memory, disabling the OOM
killer, network classes, RDMA) fail with a message naming them, as runc fails on a
controller it lacks. ``devices`` (the guest's device rules are fixed: runc's default
list), ``memory.swappiness`` and ``memory.swap`` (the guest has no swap, so swap limits
hold by themselves) and huge page limits (the guest has no huge pages) are accepted.

Standard library only: ``husk-runtime update`` imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from husk.ociruntime.errors import RuntimeFailure

DEFAULT_PERIOD = 100_000
"""cpu.max's period when only a quota is given (µs), as runc's."""
MIN_PERIOD, MAX_PERIOD = 1_000, 1_000_000
MAX_SHARES = 262_144
UNIFIED_FILES = frozenset(
    {"memory.max", "memory.high", "memory.low", "cpu.max", "cpu.weight", "pids.max"}
)


@dataclass(frozen=True)
class VmShape:
    """What the container's VM has: the bounds of every limit."""

    cpus: int
    memory_bytes: int


def _fail(problem: str) -> RuntimeFailure:
    return RuntimeFailure(problem)  # the caller says what (create, update) failed


def _object(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"{name} must be an object")
    return value


def _int(body: dict[str, Any], key: str, name: str) -> int:
    """``body[key]`` as an integer (0 when absent or null: runc's "unchanged")."""
    value = body.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{name} must be an integer, not {value!r}")
    if value < -1:
        raise _fail(f"{name} must be -1 (unlimited), 0 (unchanged) or positive, not {value}")
    return value


def _cpu_list(text: str, name: str) -> list[int]:
    """The CPUs (or memory nodes) of a cpuset list such as ``0-2,4``."""
    numbers: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise _fail(f"{name} must be a list such as 0-1,3, not {text!r}")
        first, last = int(low), int(high) if dash else int(low)
        if last < first or last > 4095:
            raise _fail(f"{name} has an invalid range {part!r}")
        numbers.extend(range(first, last + 1))
    return numbers


def read(source: str, stdin_text: str | None = None) -> dict[str, Any]:
    """The LinuxResources JSON of ``--resources FILE`` (``-``: ``stdin_text``)."""
    try:
        if source == "-":
            text = stdin_text if stdin_text is not None else ""
        else:
            with open(source, encoding="utf-8") as fh:
                text = fh.read(1 << 20)
        data = json.loads(text)
    except OSError as exc:
        raise _fail(f"cannot read {source}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # also nested too deep
        raise _fail(f"the resources are not valid JSON ({exc})") from None
    return _object(data, "the resources")


def _size(text: str, name: str) -> int:
    """runc's sizes for --memory & co: bytes, or with a k/m/g/t suffix (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    if value == "-1":
        return -1
    factor = units.get(value[-1:], 1)
    digits = value[:-1] if value[-1:] in units else value
    if not digits.isdigit():
        raise _fail(f"--{name} must be a size such as 512m, not {text!r}")
    return int(digits) * factor


def from_flags(flags: dict[str, str | None]) -> dict[str, Any]:
    """runc update's flags (``--memory 64m``, ``--cpu-quota``…) as LinuxResources JSON.

    ``flags`` maps runc's flag names (without dashes) to their text; None: not given."""
    resources: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        resources.setdefault(section, {})[key] = value

    def number(name: str) -> int:
        text = flags[name] or ""
        try:
            return int(text)
        except ValueError:
            raise _fail(f"--{name} must be an integer, not {text!r}") from None

    sizes = {
        "memory": "limit",
        "memory-reservation": "reservation",
        "memory-swap": "swap",
        "kernel-memory": "kernel",
        "kernel-memory-tcp": "kernelTCP",
    }
    for name, key in sizes.items():
        if flags.get(name) is not None:
            put("memory", key, _size(flags[name] or "", name))
    numbers = {
        "cpu-period": "period",
        "cpu-quota": "quota",
        "cpu-share": "shares",
        "cpu-rt-period": "realtimePeriod",
        "cpu-rt-runtime": "realtimeRuntime",
        "cpu-idle": "idle",
    }
    for name, key in numbers.items():
        if flags.get(name) is not None:
            put("cpu", key, number(name))
    for name, key in (("cpuset-cpus", "cpus"), ("cpuset-mems", "mems")):
        if flags.get(name) is not None:
            put("cpu", key, flags[name])
    if flags.get("pids-limit") is not None:
        put("pids", "limit", number("pids-limit"))
    if flags.get("blkio-weight") is not None:
        put("blockIO", "weight", number("blkio-weight"))
    for name in ("l3-cache-schema", "mem-bw-schema"):
        if flags.get(name):
            raise _fail(f"--{name} is not supported by husk-runtime (no Intel RDT in a VM)")
    return resources


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the sections' keys of ``override`` over it (the flags over the file)."""
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for section, values in override.items():
        target = merged.setdefault(section, {})
        if isinstance(target, dict):
            target.update(values)
        else:
            merged[section] = values
    return merged


def cgroup_files(resources: Any, vm: VmShape, *, at_create: bool = False) -> dict[str, str]:
    """The cgroup files (husk.guest.agent.cgroup2) for ``resources`` in a VM of ``vm``.

    Values runc treats as "unchanged" (0, absent, empty) give no file. At ``create`` a
    memory limit the VM already enforces by its size (io.husk.memory made it larger) is
    left out; at ``update`` a limit the VM cannot give fails."""
    body = _object(resources, "linux.resources")
    files: dict[str, str] = {}
    _memory(_object(body.get("memory"), "memory"), vm, files, at_create)
    _cpu(_object(body.get("cpu"), "cpu"), vm, files)
    pids = _int(_object(body.get("pids"), "pids"), "limit", "pids.limit")
    if pids:
        files["pids.max"] = "max" if pids == -1 else str(pids)
    _unsupported(body)
    _unified(_object(body.get("unified"), "unified"), vm, files)
    return files


def _memory(memory: dict[str, Any], vm: VmShape, files: dict[str, str], at_create: bool) -> None:
    limit = _int(memory, "limit", "memory.limit")
    if limit > 0 and limit >= vm.memory_bytes and at_create:
        limit = 0  # the VM's size is the limit already
    if limit > vm.memory_bytes:
        raise _fail(
            f"memory limit {limit} bytes exceeds the VM's memory ({vm.memory_bytes} bytes); "
            "a VM's size is fixed when it is created (linux.resources, io.husk.memory)"
        )
    if limit:
        files["memory.max"] = "max" if limit == -1 else str(limit)
    reservation = _int(memory, "reservation", "memory.reservation")
    if reservation:
        files["memory.low"] = "max" if reservation == -1 else str(reservation)
    swap = _int(memory, "swap", "memory.swap")
    if limit > 0 and 0 < swap < limit:
        raise _fail("memory+swap limit should be larger than the memory limit")
    for key in ("kernel", "kernelTCP"):
        if _int(memory, key, f"memory.{key}") > 0:
            raise _fail(f"memory.{key} limits are not supported by husk-runtime")
    if memory.get("disableOOMKiller") is True:
        raise _fail("disabling the OOM killer is not supported by husk-runtime")


def _cpu(cpu: dict[str, Any], vm: VmShape, files: dict[str, str]) -> None:
    shares = _int(cpu, "shares", "cpu.shares")
    if shares > 0:
        shares = min(max(shares, 2), MAX_SHARES)
        files["cpu.weight"] = str(1 + ((shares - 2) * 9999) // (MAX_SHARES - 2))
    quota = _int(cpu, "quota", "cpu.quota")
    period = _int(cpu, "period", "cpu.period")
    if quota or period:
        period = period if period > 0 else DEFAULT_PERIOD
        if not MIN_PERIOD <= period <= MAX_PERIOD:
            raise _fail(f"cpu.period must be between {MIN_PERIOD} and {MAX_PERIOD} µs")
        if quota > 0 and quota > vm.cpus * period:
            raise _fail(
                f"a CPU quota of {quota / period:g} CPUs exceeds the VM's {vm.cpus} vCPU(s); "
                "a VM's vCPUs are fixed when it is created (linux.resources, io.husk.cpus)"
            )
        files["cpu.max"] = f"{quota if quota > 0 else 'max'} {period}"
    cpus = cpu.get("cpus")
    if cpus not in (None, ""):
        if not isinstance(cpus, str):
            raise _fail("cpu.cpus must be a string")
        beyond = [n for n in _cpu_list(cpus, "cpu.cpus") if n >= vm.cpus]
        if beyond:
            raise _fail(
                f"cpuset {cpus} names CPU {beyond[0]}, the VM has {vm.cpus} vCPU(s) "
                f"(0-{vm.cpus - 1})"
            )
        files["cpuset.cpus"] = cpus
    mems = cpu.get("mems")
    if mems not in (None, ""):
        if not isinstance(mems, str):
            raise _fail("cpu.mems must be a string")
        if any(n != 0 for n in _cpu_list(mems, "cpu.mems")):
            raise _fail(f"cpuset memory nodes {mems}: the VM has one memory node (0)")
        files["cpuset.mems"] = mems
    for key in ("realtimeRuntime", "realtimePeriod", "idle"):
        if _int(cpu, key, f"cpu.{key}") > 0:
            raise _fail(f"cpu.{key} is not supported by husk-runtime")


def _unsupported(body: dict[str, Any]) -> None:
    block = _object(body.get("blockIO"), "blockIO")
    if any(block.get(key) for key in block):
        raise _fail(
            "block I/O weights and throttles are not supported by husk-runtime "
            "(the container's files are shared with its VM, not a block device)"
        )
    if _object(body.get("network"), "network"):
        raise _fail("network class and priority settings are not supported by husk-runtime")
    if _object(body.get("rdma"), "rdma"):
        raise _fail("RDMA limits are not supported by husk-runtime")


def _unified(unified: dict[str, Any], vm: VmShape, files: dict[str, str]) -> None:
    for name, value in unified.items():
        if name not in UNIFIED_FILES:
            raise _fail(f"the cgroup file {name} is not supported by husk-runtime")
        if not isinstance(value, str):
            raise _fail(f"unified.{name} must be a string")
        text = value.strip()
        if name == "memory.max" and text.isdigit() and int(text) > vm.memory_bytes:
            raise _fail(f"memory.max {text} exceeds the VM's memory ({vm.memory_bytes} bytes)")
        files[name] = text
