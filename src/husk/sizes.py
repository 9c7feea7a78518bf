"""A container's memory and CPUs: parsed, validated and converted in one place.

The CLI (``-m 512m --cpus 1.5``), the Docker API (``Memory`` bytes, ``NanoCpus``) and
the runtime (a VM's MiB and whole vCPUs) all go through here, so that a value means
the same on every path. (Human-readable output sizes are husk.humanize's.)
"""

from __future__ import annotations

import math
import re

from husk.errors import InvalidArgument

MIB = 1024 * 1024
MIN_CONTAINER_MEMORY = 6 * MIB
"""Docker refuses a memory limit below 6 MB; so does husk, on every path."""
MIN_VM_MEMORY_MIB = 128
"""A guest needs this much to boot; a smaller limit still gets it."""
NANOS_PER_CPU = 1_000_000_000

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*")


def parse_size(text: str | int, what: str = "size") -> int:
    """Docker's size strings in bytes: 512m, 1g, 1048576, 2.5g (binary units)."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"invalid {what}: {text}")
        return text
    match = _SIZE.fullmatch(text.lower())
    if not match:
        raise InvalidArgument(
            f"invalid {what} {text!r}: use a number with an optional unit b, k, m, g"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_memory(value: str | int) -> int:
    """A container's memory limit in bytes, at least Docker's minimum of 6 MB."""
    memory = parse_size(value, "memory")
    if memory < MIN_CONTAINER_MEMORY:
        raise InvalidArgument(f"memory {value!r} is below the minimum of 6MB a container needs")
    return memory


def parse_cpus(value: str | float, what: str = "--cpus") -> float:
    """A number of CPUs, fractions allowed, more than zero."""
    try:
        cpus = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{what} must be a number, not {value!r}") from None
    if not cpus > 0 or math.isinf(cpus):
        raise InvalidArgument(f"{what} must be positive, not {value}")
    return cpus


def cpus_to_nanos(cpus: float) -> int:
    """Docker's ``NanoCpus``: billionths of a CPU."""
    return int(cpus * NANOS_PER_CPU)


def nanos_to_cpus(nanos: int) -> float:
    return nanos / NANOS_PER_CPU


def vm_memory_mib(memory_bytes: int) -> int:
    """The guest RAM a container with this limit gets: whole MiB, at least a bootable guest."""
    return max(MIN_VM_MEMORY_MIB, math.ceil(memory_bytes / MIB))


def vm_cpus(cpus: float) -> int:
    """The vCPUs a container with this CPU limit gets: the limit rounded up."""
    return max(1, math.ceil(cpus))
