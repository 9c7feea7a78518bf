"""A volume as husk keeps it (Docker's ``local`` driver): its name, options and labels.

Three kinds of local volume exist in husk: a plain one (a directory under husk's data
directory), a sized one (``size=``: the same directory with a file system of that size
mounted on it, :mod:`husk.volumes.sized`) and a named bind
(``type=none,o=bind,device=/host/dir``). A tmpfs-backed volume (``type=tmpfs``) is
refused: each husk container is its own VM, so a tmpfs lives in one guest's kernel and
could not be the shared, persistent directory a volume is.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

from husk import sizes, timestamps
from husk.errors import InvalidArgument, NotSupported

LOCAL_DRIVER = "local"
LOCAL_SCOPE = "local"
NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
MAX_NAME = 255
ANONYMOUS_LABEL = "com.docker.volume.anonymous"
"""Docker marks anonymous volumes with this (empty) label; ``prune`` without ``all``
removes only those."""
SIZE_OPTION = "size"
BIND_FLAGS = {"bind", "rbind"}
"""The ``o=`` flags of a named bind husk honours (what mount(8) would be given)."""
NOT_SUPPORTED_TMPFS = (
    "volume option type=tmpfs is not supported: a husk volume is a host directory shared "
    "with every container's VM, which a tmpfs (memory of one VM) cannot be; "
    "use --tmpfs or --mount type=tmpfs for a container's own tmpfs"
)


def check_name(name: str) -> str:
    """A volume name Docker's local driver accepts (never ``/`` or ``..``), or InvalidArgument."""
    if not name:
        raise InvalidArgument("a volume name must not be empty")
    if len(name) > MAX_NAME:
        raise InvalidArgument(f"volume name is too long ({len(name)} > {MAX_NAME} characters)")
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f'"{name}" includes invalid characters for a local volume name, only '
            '"[a-zA-Z0-9][a-zA-Z0-9_.-]" are allowed. If you intended to pass a host '
            "directory, use absolute path"
        )
    return name


def anonymous_name() -> str:
    return secrets.token_hex(32)


def check_driver(driver: str) -> str:
    driver = driver or LOCAL_DRIVER
    if driver != LOCAL_DRIVER:
        raise NotSupported(f'volume driver "{driver}" is not supported by husk (only local)')
    return driver


def check_options(options: dict[str, str]) -> dict[str, str]:
    """The local driver's options husk honours: none, a size limit (``size=``, see
    :mod:`husk.volumes.sized`), or a named bind of a host directory."""
    unknown = sorted(set(options) - {"type", "o", "device", SIZE_OPTION})
    if unknown:
        raise InvalidArgument(
            f"invalid volume option {unknown[0]!r}: the local driver takes size, type, o and device"
        )
    kind = options.get("type", "")
    if not options:
        return {}
    if SIZE_OPTION in options:
        if len(options) > 1:
            raise NotSupported(
                "volume option size is not supported with type, o or device: it limits "
                "husk's own volumes, a named bind's size is its host directory's"
            )
        volume_size(options)
        return dict(options)
    if kind == "tmpfs":
        raise NotSupported(NOT_SUPPORTED_TMPFS)
    if kind != "none":
        if not kind:
            raise InvalidArgument("volume options o and device need type (type=none,o=bind)")
        raise NotSupported(
            f"volume option type={kind} is not supported by husk (only type=none,o=bind,device=…)"
        )
    flags = {f for f in options.get("o", "").split(",") if f}
    if not flags & BIND_FLAGS or flags - BIND_FLAGS:
        raise NotSupported(
            f"volume option o={options.get('o', '')} is not supported with type=none (use o=bind)"
        )
    device = options.get("device", "")
    if not device.startswith("/"):
        raise InvalidArgument(f"volume option device={device!r} must be an absolute host path")
    if not os.path.isdir(device):
        raise InvalidArgument(f"volume option device={device}: no such host directory")
    return dict(options)


def volume_size(options: dict[str, str]) -> int | None:
    """The size limit in bytes of a volume with these options (None: no limit)."""
    if SIZE_OPTION not in options:
        return None
    return sizes.parse_disk_size(options[SIZE_OPTION], "volume size", "a volume")


@dataclass
class Volume:
    name: str
    mountpoint: str
    """The volume's ``_data`` directory on the host (what Docker shows as Mountpoint)."""
    driver: str = LOCAL_DRIVER
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=lambda: timestamps.now(digits=0))

    @property
    def anonymous(self) -> bool:
        return ANONYMOUS_LABEL in self.labels

    @property
    def device(self) -> str:
        """The host directory of a named bind, "" for a plain volume."""
        return self.options.get("device", "") if self.options.get("type") == "none" else ""

    @property
    def size_bytes(self) -> int | None:
        """The volume's size limit (None: as much as the host's disk holds)."""
        return volume_size(self.options)

    @property
    def data_path(self) -> str:
        """What containers mount: the named bind's device, else the ``_data`` directory."""
        return self.device or self.mountpoint

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Volume:
        """Raises ValueError or TypeError for a document that is not a volume."""
        if not isinstance(data, dict):
            raise ValueError("the volume record is not a JSON object")
        known = set(cls.__dataclass_fields__)
        volume = cls(**{k: v for k, v in data.items() if k in known})
        for name in ("name", "mountpoint", "driver", "created"):
            if not isinstance(getattr(volume, name), str):
                raise ValueError(f"the volume record's {name} is not a string")
        volume.labels = {str(k): str(v) for k, v in dict(volume.labels).items()}
        volume.options = {str(k): str(v) for k, v in dict(volume.options).items()}
        return volume
