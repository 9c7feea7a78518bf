"""The process-level settings of a container (Docker's HostConfig), validated as Docker does.

Each parser takes what a user or an API client gave and returns the normalised
value husk stores in :class:`husk.spec.ContainerSpec`, or raises InvalidArgument
with Docker's own wording, so scripts that match on Docker's errors still work.
The guest agent applies the values (:mod:`husk.guest.agent.limits`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from husk.errors import InvalidArgument
from husk.guest.kernelnames import (
    CAPABILITIES,
    NAMESPACED_SYSCTL_PREFIXES,
    NAMESPACED_SYSCTLS,
    OOM_SCORE_ADJ_RANGE,
)
from husk.guest.netconfig import GUEST_GATEWAY

HOST_GATEWAY = "host-gateway"
"""Docker's name, in ``--add-host NAME:host-gateway``, for the host's address."""
HOST_GATEWAY_ADDRESS = GUEST_GATEWAY
"""What husk documents as the host's address for containers: the gateway of every VM's
user-mode network (QEMU's slirp, 10.0.2.0/24)."""

DEFAULT_SHM_SIZE = 64 * 1024 * 1024
"""Docker's size of a container's /dev/shm."""

# setrlimit(2) resources by Docker's --ulimit names.
ULIMITS = (
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
)


# --security-opt values and what husk makes of them. The guest has no seccomp filter,
# no AppArmor and no SELinux: "unconfined"/"disable" is what it does already.
SYSTEM_PATHS_UNCONFINED = "systempaths=unconfined"
SECURITY_OPTS_HONOURED = (
    "seccomp=unconfined",
    "apparmor=unconfined",
    "label=disable",
    SYSTEM_PATHS_UNCONFINED,
)


@dataclass
class Ulimit:
    name: str
    soft: int
    hard: int


def capability_names(values: list[str], field: str) -> list[str]:
    """``CapAdd``/``CapDrop`` normalised to Docker's ``CAP_X`` form ("ALL" kept as is)."""
    out: list[str] = []
    for value in values:
        key = value.strip().upper()
        if key in ("ALL", "CAP_ALL"):
            out.append("ALL")
            continue
        bare = key[4:] if key.startswith("CAP_") else key
        if bare not in CAPABILITIES:
            raise InvalidArgument(f'invalid {field}: unknown capability: "CAP_{bare}"')
        out.append(f"CAP_{bare}")
    return out


def parse_ulimit(text: str) -> Ulimit:
    """``name=soft[:hard]``, as ``docker run --ulimit`` takes it."""
    name, sep, limits = text.partition("=")
    if not sep:
        raise InvalidArgument(f"invalid ulimit argument: {text}")
    if name not in ULIMITS:
        raise InvalidArgument(f"invalid ulimit type: {name}")
    soft_text, _, hard_text = limits.partition(":")
    soft = _limit_number(soft_text)
    hard = _limit_number(hard_text) if hard_text else soft
    return check_ulimit(Ulimit(name, soft, hard))


def _limit_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f'invalid ulimit value: parsing "{text}": invalid syntax') from None


def check_ulimit(limit: Ulimit) -> Ulimit:
    if limit.name not in ULIMITS:
        raise InvalidArgument(f"invalid ulimit type: {limit.name}")
    if limit.soft > limit.hard and limit.hard != -1:
        raise InvalidArgument(
            "ulimit soft limit must be less than or equal to hard limit: "
            f"{limit.soft} > {limit.hard}"
        )
    return limit


def check_sysctl(key: str, value: str) -> None:
    """Refuses a sysctl the kernel does not keep per namespace, in Docker's words."""
    if key in NAMESPACED_SYSCTLS or key.startswith(NAMESPACED_SYSCTL_PREFIXES):
        if not re.fullmatch(r"[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+", key):
            raise InvalidArgument(f"sysctl '{key}={value}' is not allowed")
        if "\n" in value or "\0" in value:
            raise InvalidArgument(f"invalid value for sysctl '{key}': {value!r}")
        return
    raise InvalidArgument(f"sysctl '{key}={value}' is not allowed")


def parse_add_host(text: str) -> str:
    """``name:ip`` (or ``name=ip``), as given; the IP may be ``host-gateway``."""
    if "=" in text:
        name, _, address = text.partition("=")
    else:
        name, sep, address = text.partition(":")
        if not sep:
            raise InvalidArgument(f'bad format for add-host: "{text}"')
    if not name or not address:
        raise InvalidArgument(f'bad format for add-host: "{text}"')
    address = address.strip("[]")
    if address != HOST_GATEWAY:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise InvalidArgument(f'invalid IP address in add-host: "{address}"') from None
    return f"{name}:{address}"


def hosts_entries(extra_hosts: list[str]) -> list[str]:
    """``/etc/hosts`` lines (``ip\\tname``) for ``ExtraHosts``, host-gateway resolved."""
    lines = []
    for entry in extra_hosts:
        name, _, address = entry.partition(":") if "=" not in entry else entry.partition("=")
        address = address.strip("[]")
        if address == HOST_GATEWAY:
            address = HOST_GATEWAY_ADDRESS
        lines.append(f"{address}\t{name}")
    return lines


def check_dns_server(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise InvalidArgument(f"IP address is not correctly formatted: {text}") from None


def check_dns_search(text: str) -> str:
    if text == ".":
        return text
    domain = text.rstrip(".")
    if not domain or len(domain) > 255 or not re.fullmatch(r"[A-Za-z0-9_.-]+", domain):
        raise InvalidArgument(f"{text} is not a valid domain")
    return text


def check_dns_option(text: str) -> str:
    if not text or any(ch.isspace() for ch in text):
        raise InvalidArgument(f"invalid DNS option {text!r}")
    return text


def no_new_privileges(options: list[str]) -> bool:
    """Reads ``SecurityOpt``: whether no-new-privileges is on; refuses what husk cannot do.

    The guest has no seccomp filter, AppArmor or SELinux, so asking to turn those off
    (``seccomp=unconfined`` …) is honoured as is. A profile or label husk would have to
    load is refused rather than ignored.
    """
    enabled = False
    for option in options:
        key, sep, value = option.replace(":", "=", 1).partition("=")
        if key == "no-new-privileges":
            if not sep or value == "true":
                enabled = True
            elif value == "false":
                enabled = False
            else:
                raise InvalidArgument(f"invalid --security-opt {option!r}: expected true or false")
            continue
        if f"{key}={value}" in SECURITY_OPTS_HONOURED:
            continue
        if key in ("seccomp", "apparmor", "label", "systempaths") and sep:
            shown = option if len(option) <= 60 else option[:57] + "..."  # a whole profile
            raise InvalidArgument(
                f"--security-opt {shown!r} is not supported by husk: its guest has no "
                "seccomp, AppArmor or SELinux profiles (seccomp=unconfined, "
                "apparmor=unconfined, label=disable, systempaths=unconfined and "
                "no-new-privileges are accepted)"
            )
        raise InvalidArgument(f'Invalid --security-opt: "{option}"')
    return enabled


def unconfined_system_paths(options: list[str]) -> bool:
    """``systempaths=unconfined``: /proc's kernel files neither masked nor read-only."""
    return any(o.replace(":", "=", 1) == SYSTEM_PATHS_UNCONFINED for o in options)


def host_cpu_count() -> int:
    return os.cpu_count() or 1


def check_cpus(cpus: float) -> None:
    """``--cpus`` within what the host has, in Docker's words."""
    count = host_cpu_count()
    if cpus < 0.01 or cpus > count:
        raise InvalidArgument(
            f"range of CPUs is from 0.01 to {count}.00, as there are only {count} CPUs available"
        )


def parse_cpuset(text: str) -> list[int]:
    """``--cpuset-cpus`` (``0-1``, ``0,1``) as CPU numbers, checked against the host."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, sep, last = part.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise InvalidArgument(f"invalid value {text} for cpuset cpus")
        start, end = int(first), int(last) if sep else int(first)
        if end < start:
            raise InvalidArgument(f"invalid value {text} for cpuset cpus")
        cpus.update(range(start, end + 1))
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not available:
        available = list(range(host_cpu_count()))
    if not cpus <= set(available):
        raise InvalidArgument(
            f"Requested CPUs are not available - requested {text}, available: {_ranges(available)}"
        )
    return sorted(cpus)


def _ranges(numbers: list[int]) -> str:
    parts: list[str] = []
    start = prev = numbers[0]
    for number in [*numbers[1:], -2]:
        if number == prev + 1:
            prev = number
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = number
    return ",".join(parts)


def check_oom_score_adj(value: int) -> int:
    """``--oom-score-adj`` within the kernel's range, in Docker's words."""
    low, high = OOM_SCORE_ADJ_RANGE
    if not low <= value <= high:
        raise InvalidArgument(f"Invalid value {value}, range for oom score adj is [{low}, {high}]")
    return value


def check_memory_swap(memory: int | None, swap: int) -> None:
    """Docker's rules for ``--memory-swap`` (the VM has no swap, so any valid value holds)."""
    if swap in (0, -1):
        return
    if swap < -1:
        raise InvalidArgument(f"invalid memory swap limit {swap}: use -1 for unlimited")
    if not memory:
        raise InvalidArgument(
            "You should always set the Memory limit when using Memoryswap limit, see usage"
        )
    if swap < memory:
        raise InvalidArgument(
            "Minimum memoryswap limit should be larger than memory limit, see usage"
        )
