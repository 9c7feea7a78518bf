"""A container's memory, CPUs and writable layer size: parsed, validated and converted in one place.

The CLI (``-m 512m --cpus 1.5``), the Docker API (``Memory`` bytes, ``NanoCpus``) and
the runtime (a VM's MiB and whole vCPUs) all go through here, so that a value means
the same on every path. (Human-readable output sizes are husk.humanize's.)
"""

from __future__ import annotations

import math
import re
from typing import Any

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


MIN_STORAGE_SIZE = 16 * 1024**2
"""The smallest writable layer (its ext4 needs room for a journal and the overlay)."""
MAX_STORAGE_SIZE = 16 * 1024**4
STORAGE_ALIGN = 4096


def parse_storage_opt(options: Any) -> int | None:
    """The writable layer's size of Docker's ``StorageOpt`` ({"size": "10G"}; None: default).

    Only ``size`` means something to husk; any other option is refused. The size is
    rounded up to whole 4 KiB blocks.
    """
    if options in (None, {}):
        return None
    if not isinstance(options, dict):
        raise InvalidArgument("invalid StorageOpt: expected an object of option names to values")
    unknown = sorted(str(key) for key in options if key != "size")
    if unknown:
        raise InvalidArgument(
            f"storage option {unknown[0]!r} is not supported by husk (only size is)"
        )
    return parse_disk_size(options["size"], "storage size", "the writable layer")


def parse_disk_size(value: Any, what: str, whose: str) -> int:
    """The size of an ext4 disk husk makes (a writable layer, a sized volume): 16M to 16T,
    rounded up to whole 4 KiB blocks; InvalidArgument naming ``what`` otherwise."""
    if not isinstance(value, str):
        raise InvalidArgument(f"invalid {what} {value!r}: expected a string such as 10G")
    size = parse_size(value, what)
    if not MIN_STORAGE_SIZE <= size <= MAX_STORAGE_SIZE:
        raise InvalidArgument(f"invalid {what} {value!r}: {whose} must be between 16M and 16T")
    return -(-size // STORAGE_ALIGN) * STORAGE_ALIGN
