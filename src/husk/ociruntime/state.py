"""Containers' state under ``--root``: one directory per id holding ``state.json``.

The keeper writes the record (atomically) as the container changes; every other command
reads it. A keeper that is gone (killed, host reboot) makes its container ``stopped``
whatever the record says: liveness is the keeper's pid *and* its start time, so a
recycled pid never passes for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from husk.ociruntime.errors import RuntimeFailure

OCI_VERSION = "1.0.2"
STATE_FILE = "state.json"
_ID = re.compile(r"[A-Za-z0-9_+.-]{1,1024}")
ACTIVE = ("creating", "created", "running", "paused")
_SERIAL = iter(range(1 << 62))
"""Temporary names of one process's saves (threads of a keeper save too)."""


def default_root() -> Path:
    if os.geteuid() == 0:
        return Path("/run/husk-runtime")
    # lazy: start-up time of every command (husk.settings is ~20 ms), needed by few
    from husk import settings

    xdg = settings.raw(settings.XDG_RUNTIME_DIR)
    return Path(xdg) / "husk-runtime" if xdg else Path(f"/tmp/husk-runtime-{os.geteuid()}")


def check_id(container_id: str) -> str:
    if not _ID.fullmatch(container_id) or container_id in (".", ".."):
        raise RuntimeFailure(f"invalid container id format: {container_id!r}")
    return container_id


def run_dir() -> Path:
    """husk's run directory (HUSK_RUN_DIR, else husk's default): where the keeper's
    short-pathed sockets and its VM's state live (unix socket paths are short)."""
    # lazy: start-up time, as in default_root
    from husk import settings

    return settings.run_dir()


def short_name(root: Path, container_id: str) -> str:
    """A short, stable name of (root, id) for paths with length limits."""
    import hashlib  # lazy: start-up time (only create, delete and the keeper need it)

    digest = hashlib.sha256(f"{root.resolve()}\0{container_id}".encode()).hexdigest()
    return "oci-" + digest[:12]


class StateRecord:
    """One container's record (a plain class: ``dataclasses`` imports ``inspect``, 10 ms
    of every engine call's start-up)."""

    FIELDS = (
        "id",
        "bundle",
        "rootfs",
        "created",
        "status",
        "pid",
        "pid_start",
        "exit_status",
        "control",
        "vm_dir",
        "annotations",
    )

    def __init__(
        self,
        id: str,
        bundle: str,
        rootfs: str,
        created: str,
        status: str = "creating",
        pid: int = 0,
        pid_start: int = 0,
        exit_status: int | None = None,
        control: str = "",
        vm_dir: str = "",
        annotations: dict[str, str] | None = None,
    ) -> None:
        self.id = id
        self.bundle = bundle
        self.rootfs = rootfs
        self.created = created
        self.status = status
        self.pid = pid
        self.pid_start = pid_start
        self.exit_status = exit_status
        self.control = control
        self.vm_dir = vm_dir
        self.annotations: dict[str, str] = dict(annotations or {})

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StateRecord) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"StateRecord({self.to_dict()!r})"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StateRecord:
        return cls(**{key: value for key, value in data.items() if key in cls.FIELDS})


def container_dir(root: Path, container_id: str) -> Path:
    return root / check_id(container_id)


def save(directory: Path, record: StateRecord) -> None:
    """Writes ``state.json`` atomically (a reader sees the old or the new record)."""
    temporary = directory / f".state-{os.getpid()}-{next(_SERIAL)}"
    try:
        with open(temporary, "w") as fh:
            json.dump(record.to_dict(), fh)
        os.replace(temporary, directory / STATE_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def load(root: Path, container_id: str) -> StateRecord:
    directory = container_dir(root, container_id)
    try:
        data = json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        raise RuntimeFailure(f'container "{container_id}" does not exist') from None
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"cannot read the state of {container_id}: {exc}") from None
    if not isinstance(data, dict):
        raise RuntimeFailure(f"the state of {container_id} is corrupt")
    return StateRecord.from_dict(data)


def process_start(pid: int) -> int | None:
    """The start time (clock ticks after boot) of a live, non-zombie process ``pid``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def keeper_alive(record: StateRecord) -> bool:
    return record.pid > 0 and process_start(record.pid) == record.pid_start


def current_status(record: StateRecord) -> str:
    if record.status in ACTIVE and not keeper_alive(record):
        return "stopped"
    return record.status


def oci_state(record: StateRecord) -> dict[str, Any]:
    """The runtime spec's state object (runc's ``state`` output)."""
    status = current_status(record)
    return {
        "ociVersion": OCI_VERSION,
        "id": record.id,
        "pid": record.pid if status in ("created", "running", "paused") else 0,
        "status": "created" if status == "creating" else status,
        "bundle": record.bundle,
        "rootfs": record.rootfs,
        "created": record.created,
        "owner": "",
        "annotations": dict(record.annotations),
    }


def list_ids(root: Path) -> list[str]:
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [name for name in names if (root / name / STATE_FILE).exists()]
