"""An OCI bundle's ``config.json``, read and checked into what husk-runtime uses.

Everything is validated before any state exists: a bad bundle fails ``create`` with
a message naming the field, and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from husk.guest.kernelnames import OOM_SCORE_ADJ_RANGE
from husk.ociruntime.errors import RuntimeFailure
from husk.ociruntime.hooks import Hook
from husk.ociruntime.hooks import parse as parse_hooks

CONFIG = "config.json"
MAX_CONFIG_BYTES = 4 << 20
# Mounts the guest makes itself (proc, sysfs, /dev with runc's devices, devpts, shm).
GUEST_MADE_TYPES = frozenset({"proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"})
GUEST_MADE_TARGETS = frozenset(
    {"/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys/fs/cgroup"}
)
TMPFS_DATA = ("mode=", "size=", "uid=", "gid=", "nr_inodes=")
TMPFS_FLAGS = frozenset({"nosuid", "nodev", "noexec", "ro"})
ANNOTATION_MEMORY = "io.husk.memory"
ANNOTATION_CPUS = "io.husk.cpus"
MAX_CPUS = 256
"""vCPUs a bundle may ask for (one host thread each under TCG)."""
ANNOTATION_COLD = "io.husk.cold-boot"


@dataclass
class Mount:
    destination: str
    kind: str
    """"bind" (source is a host path) or "tmpfs"."""
    source: str = ""
    readonly: bool = False
    options: str = ""
    """tmpfs: the mount's options for the guest."""


@dataclass
class Process:
    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    terminal: bool = False
    rlimits: list[tuple[str, int, int]] = field(default_factory=list)
    no_new_privileges: bool = False
    capabilities: list[str] | None = None
    """The bounding set's names (None: the spec gives none, husk's default set)."""
    oom_score_adj: int = 0

    @property
    def user(self) -> str:
        return f"{self.uid}:{self.gid}"


@dataclass
class Bundle:
    path: Path
    rootfs: Path
    readonly: bool
    process: Process
    hostname: str = ""
    mounts: list[Mount] = field(default_factory=list)
    memory_bytes: int | None = None
    cpus: float | None = None
    cold_boot: bool = False
    annotations: dict[str, str] = field(default_factory=dict)
    netns: str | None = None
    """None: no network namespace entry (the host's network: husk's egress);
    "": a new, empty namespace (loopback only); else the engine's namespace path."""
    hooks: dict[str, list[Hook]] = field(default_factory=dict)
    """The OCI hooks by kind (:mod:`husk.ociruntime.hooks`)."""
    resources: dict[str, Any] = field(default_factory=dict)
    """``linux.resources`` as given: the container's cgroup in the VM
    (:mod:`husk.ociruntime.resources`)."""


def _fail(problem: str) -> RuntimeFailure:
    return RuntimeFailure(f"invalid bundle configuration: {problem}")


def _object(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"{name} must be an object")
    return value


def _strings(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _fail(f"{name} must be a list of strings")
    return list(value)


def _integer(value: Any, name: str, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(f"{name} must be a non-negative integer")
    return value


def read_config(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / CONFIG
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise RuntimeFailure(
            f"JSON specification file {CONFIG} not found in {bundle_dir}"
        ) from None
    except OSError as exc:
        raise RuntimeFailure(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise _fail(f"{CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # also nested too deep
        raise _fail(f"{CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _fail(f"{CONFIG} is not a JSON object")
    return data


def parse_process(data: Any, *, name: str = "process") -> Process:
    """A ``process`` object (config.json's, or exec's --process file)."""
    body = _object(data, name)
    if not body:
        raise _fail(f"{name} is missing")
    args = _strings(body.get("args"), f"{name}.args")
    if not args or not args[0]:
        raise _fail(f"{name}.args must name the program to run")
    cwd = body.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise _fail(f"{name}.cwd must be an absolute path")
    user = _object(body.get("user"), f"{name}.user")
    if user.get("username"):
        raise _fail(f"{name}.user.username is not supported (give uid and gid)")
    gids = user.get("additionalGids") or []
    if not isinstance(gids, list):
        raise _fail(f"{name}.user.additionalGids must be a list")
    rlimits = []
    for index, item in enumerate(body.get("rlimits") or []):
        entry = _object(item, f"{name}.rlimits[{index}]")
        kind = entry.get("type")
        if not isinstance(kind, str) or not kind.upper().startswith("RLIMIT_"):
            raise _fail(f"{name}.rlimits[{index}].type must be an RLIMIT_ name")
        rlimits.append(
            (
                kind.upper().removeprefix("RLIMIT_").lower(),
                _integer(entry.get("soft"), f"{name}.rlimits[{index}].soft"),
                _integer(entry.get("hard"), f"{name}.rlimits[{index}].hard"),
            )
        )
    caps = body.get("capabilities")
    capabilities = None
    if caps is not None:
        capabilities = _strings(_object(caps, f"{name}.capabilities").get("bounding"), "bounding")
    terminal = body.get("terminal", False)
    if not isinstance(terminal, bool):
        raise _fail(f"{name}.terminal must be true or false")
    oom_score_adj = body.get("oomScoreAdj", 0)
    low, high = OOM_SCORE_ADJ_RANGE
    if isinstance(oom_score_adj, bool) or not isinstance(oom_score_adj, int):
        raise _fail(f"{name}.oomScoreAdj must be an integer")
    if not low <= oom_score_adj <= high:
        raise _fail(f"{name}.oomScoreAdj must be from {low} to {high}")
    return Process(
        args=args,
        env=_strings(body.get("env"), f"{name}.env"),
        cwd=cwd,
        uid=_integer(user.get("uid"), f"{name}.user.uid"),
        gid=_integer(user.get("gid"), f"{name}.user.gid"),
        additional_gids=[_integer(g, f"{name}.user.additionalGids") for g in gids],
        terminal=terminal,
        rlimits=rlimits,
        no_new_privileges=body.get("noNewPrivileges") is True,
        capabilities=capabilities,
        oom_score_adj=oom_score_adj,
    )


def _mounts(data: Any) -> list[Mount]:
    if data is None:
        return []
    if not isinstance(data, list):
        raise _fail("mounts must be a list")
    mounts = []
    for index, item in enumerate(data):
        entry = _object(item, f"mounts[{index}]")
        destination = entry.get("destination")
        if not isinstance(destination, str) or not destination.startswith("/"):
            raise _fail(f"mounts[{index}].destination must be an absolute path")
        if ".." in destination.split("/"):
            raise _fail(f"mounts[{index}].destination must not contain '..'")
        destination = os.path.normpath(destination)
        kind = str(entry.get("type") or "")
        options = _strings(entry.get("options"), f"mounts[{index}].options")
        source = str(entry.get("source") or "")
        if destination in GUEST_MADE_TARGETS or kind in GUEST_MADE_TYPES:
            continue  # the guest makes these itself
        readonly = "ro" in options
        if kind == "bind" or "bind" in options or "rbind" in options:
            if not source.startswith("/"):
                raise _fail(f"mounts[{index}].source must be an absolute host path")
            mounts.append(Mount(destination, "bind", source, readonly))
        elif kind == "tmpfs":
            kept = [o for o in options if o.startswith(TMPFS_DATA) or o in TMPFS_FLAGS]
            mounts.append(Mount(destination, "tmpfs", "tmpfs", readonly, ",".join(kept)))
        else:
            raise RuntimeFailure(
                f"mount type {kind!r} on {destination} is not supported by husk-runtime "
                "(bind, tmpfs, proc, sysfs, devpts, mqueue)"
            )
    return mounts


def _resources(linux: dict[str, Any]) -> tuple[int | None, float | None]:
    resources = _object(linux.get("resources"), "linux.resources")
    memory = _object(resources.get("memory"), "linux.resources.memory").get("limit")
    memory_bytes = memory if isinstance(memory, int) and memory > 0 else None
    cpu = _object(resources.get("cpu"), "linux.resources.cpu")
    quota, period = cpu.get("quota"), cpu.get("period")
    cpus = None
    if isinstance(quota, int) and isinstance(period, int) and quota > 0 and period > 0:
        cpus = quota / period
    highest = _highest_cpu(cpu.get("cpus"))
    if highest is not None and (cpus or 1) < highest + 1:
        cpus = float(highest + 1)  # a cpuset naming CPU N: the VM has N+1 vCPUs
    return memory_bytes, cpus


def _highest_cpu(cpuset: Any) -> int | None:
    """The highest CPU a cpuset list (``0-2,4``) names; None for none or a malformed one
    (husk.ociruntime.resources refuses that with the reason)."""
    if not isinstance(cpuset, str) or not cpuset:
        return None
    numbers = [part.strip().rpartition("-")[2] for part in cpuset.split(",")]
    if not all(number.isdigit() for number in numbers):
        return None
    return min(max(int(number) for number in numbers), 4095)


def _network(linux: dict[str, Any]) -> str | None:
    namespaces = linux.get("namespaces")
    if namespaces is None:
        return None
    if not isinstance(namespaces, list):
        raise _fail("linux.namespaces must be a list")
    for item in namespaces:
        entry = _object(item, "linux.namespaces[]")
        if entry.get("type") == "network":
            return str(entry.get("path") or "")
    return None


def _annotations(data: Any) -> dict[str, str]:
    body = _object(data, "annotations")
    return {str(k): str(v) for k, v in body.items()}


def _size(text: str, name: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    factor = units.get(value[-1:], 1)
    digits = value[:-1] if value[-1:] in units else value
    if not digits.isdigit():
        raise _fail(f"annotation {name} must be a size such as 512m, not {text!r}")
    return int(digits) * factor


def load(bundle_dir: Path) -> Bundle:
    """The bundle at ``bundle_dir``, checked (RuntimeFailure names what is wrong)."""
    bundle_dir = bundle_dir.absolute()
    if not bundle_dir.is_dir():
        raise RuntimeFailure(f"bundle {bundle_dir} is not a directory")
    data = read_config(bundle_dir)
    root = _object(data.get("root"), "root")
    root_path = root.get("path")
    if not isinstance(root_path, str) or not root_path:
        raise _fail("root.path is missing")
    rootfs = Path(root_path)
    if not rootfs.is_absolute():
        rootfs = bundle_dir / rootfs
    if not rootfs.is_dir():
        raise RuntimeFailure(f"rootfs {rootfs} is not a directory")
    if "," in str(rootfs):
        raise RuntimeFailure(f"rootfs path {rootfs} must not contain a comma")
    linux = _object(data.get("linux"), "linux")
    memory_bytes, cpus = _resources(linux)
    annotations = _annotations(data.get("annotations"))
    if ANNOTATION_MEMORY in annotations:
        memory_bytes = _size(annotations[ANNOTATION_MEMORY], ANNOTATION_MEMORY)
    if ANNOTATION_CPUS in annotations:
        try:
            cpus = float(annotations[ANNOTATION_CPUS])
        except ValueError:
            raise _fail(f"annotation {ANNOTATION_CPUS} must be a number") from None
    # NaN and infinity fail this too (they crashed the keeper's VM sizing).
    if cpus is not None and not 0 < cpus <= MAX_CPUS:
        raise _fail(f"the CPU limit must be between 0.01 and {MAX_CPUS}, not {cpus}")
    hostname = data.get("hostname") or ""
    if not isinstance(hostname, str):
        raise _fail("hostname must be a string")
    return Bundle(
        path=bundle_dir,
        rootfs=rootfs,
        readonly=root.get("readonly") is True,
        process=parse_process(data.get("process")),
        hostname=hostname,
        mounts=_mounts(data.get("mounts")),
        memory_bytes=memory_bytes,
        cpus=cpus,
        cold_boot=annotations.get(ANNOTATION_COLD, "").lower() in ("1", "true", "yes"),
        annotations=annotations,
        netns=_network(linux),
        hooks=parse_hooks(data.get("hooks")),
        resources=_object(linux.get("resources"), "linux.resources"),
    )
