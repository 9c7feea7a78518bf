"""The persisted record of a container and its state."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from husk import timestamps
from husk.network.model import Endpoint, endpoints_from_json
from husk.spec import ContainerSpec

ZERO_TIME = timestamps.ZERO_TIME


def now_iso() -> str:
    """Docker's timestamp shape: RFC 3339 with nanoseconds, UTC."""
    return timestamps.now()


def new_container_id() -> str:
    return secrets.token_hex(32)


class ContainerStatus(StrEnum):
    """Docker's container statuses; the values are what records store and the API shows.

    Changed only through ``Container.transition`` (husk.runtime.container), which
    holds the table of the allowed changes.
    """

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    RESTARTING = "restarting"
    REMOVING = "removing"
    EXITED = "exited"
    DEAD = "dead"

    @property
    def running(self) -> bool:
        """Docker's State.Running: true while paused or waiting to restart too."""
        return self in (ContainerStatus.RUNNING, ContainerStatus.PAUSED, ContainerStatus.RESTARTING)


STATUSES = tuple(status.value for status in ContainerStatus)


@dataclass
class ContainerState:
    status: ContainerStatus = ContainerStatus.CREATED
    exit_code: int = 0
    error: str = ""
    oom_killed: bool = False
    pid: int = 0  # the QEMU process
    started_at: str = ZERO_TIME
    finished_at: str = ZERO_TIME
    restart_count: int = 0
    health: str = ""  # "", starting, healthy, unhealthy
    failing_streak: int = 0
    health_log: list[dict[str, Any]] = field(default_factory=list)
    stopped_by_user: bool = False

    def __post_init__(self) -> None:
        # A stored (or hand-built) status is a string: it maps to the enum, or is refused.
        self.status = ContainerStatus(self.status)

    @property
    def running(self) -> bool:
        return self.status.running


@dataclass
class ContainerRecord:
    id: str
    name: str
    spec: ContainerSpec
    image_id: str
    image_ref: str
    created: str
    argv: list[str]
    env: list[str]
    workdir: str
    user: str
    stop_signal: str
    stop_timeout: int
    ports: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    state: ContainerState = field(default_factory=ContainerState)
    ip_address: str = ""
    mac_address: str = ""
    overlay: dict[str, Any] = field(default_factory=dict)
    """The WireGuard overlay of the current run (husk.runtime.overlay); {} without one."""
    networks: dict[str, Endpoint] = field(default_factory=dict)
    """Network name → the container's endpoint there (allocated at create and connect,
    kept across stop/start, released on disconnect and removal)."""
    networks_assigned: bool = True
    """False for a record written before husk had networks: it gets its endpoints once
    (husk.runtime.endpoints.assign_missing), as a new container would."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContainerRecord:
        """Raises ValueError, TypeError or KeyError for a record that is not one."""
        if not isinstance(data, dict):
            raise ValueError("the record is not a JSON object")
        data = dict(data)
        if not isinstance(data.get("spec"), dict):
            raise ValueError("the record has no spec")
        data["spec"] = ContainerSpec.from_json(data["spec"])
        state = data.get("state") or {}
        if not isinstance(state, dict):
            raise ValueError("the record's state is not a JSON object")
        state = dict(state)
        status = state.get("status", ContainerStatus.CREATED.value)
        if status not in STATUSES:
            raise ValueError(f"the record's status {status!r} is unknown")
        state["status"] = ContainerStatus(status)
        data["state"] = ContainerState(**state)
        data["networks_assigned"] = "networks" in data and data.get("networks_assigned", True)
        data["networks"] = endpoints_from_json(data.get("networks"))
        known = set(cls.__dataclass_fields__)
        record = cls(**{k: v for k, v in data.items() if k in known})
        for name in ("id", "name", "image_id", "image_ref", "created"):
            if not isinstance(getattr(record, name), str):
                raise ValueError(f"the record's {name} is not a string")
        return record

    @classmethod
    def unreadable(cls, container_id: str, reason: str) -> ContainerRecord:
        """Stands in for a record that cannot be read: listed as dead, with the reason.

        Such a container can only be removed (its record on disk is kept as it is
        until then, for whoever wants to look at it).
        """
        return cls(
            id=container_id,
            name=f"unreadable-{container_id[:12]}",
            spec=ContainerSpec(image=""),
            image_id="",
            image_ref="",
            created=ZERO_TIME,
            argv=[],
            env=[],
            workdir="/",
            user="",
            stop_signal="SIGTERM",
            stop_timeout=0,
            state=ContainerState(status=ContainerStatus.DEAD, error=reason),
        )
