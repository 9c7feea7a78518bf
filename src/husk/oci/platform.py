"""Platforms (os/arch/variant): the host's, parsing ``--platform``, matching index entries."""

from __future__ import annotations

import platform as _platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from husk.errors import InvalidArgument

_MACHINE_TO_ARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm"}

# Variants an architecture assumes when an index entry does not name one.
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    def to_json(self) -> dict[str, str]:
        data = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            data["variant"] = self.variant
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Platform:
        return cls(
            str(data.get("os", "")),
            str(data.get("architecture", "")),
            str(data.get("variant", "") or ""),
        )

    def matches(self, candidate: Platform) -> bool:
        """Whether an index entry for ``candidate`` can run as ``self``."""
        if self.os != candidate.os or self.architecture != candidate.architecture:
            return False
        if not self.variant:
            return True
        default = _DEFAULT_VARIANT.get(self.architecture, "")
        wanted = self.variant or default
        offered = candidate.variant or default
        return wanted == offered


def host_platform() -> Platform:
    arch, variant = _MACHINE_TO_ARCH.get(_platform.machine().lower(), (_platform.machine(), ""))
    return Platform("linux", arch, variant)


def parse_platform(text: str) -> Platform:
    """Parse ``os/arch[/variant]`` (``linux/arm64/v8``, ``linux/amd64``)."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidArgument(f"invalid platform {text!r}: expected os/arch[/variant]")
    os_name = parts[0].lower()
    arch = _ARCH_ALIASES.get(parts[1].lower(), parts[1].lower())
    variant = parts[2].lower() if len(parts) == 3 else ""
    return Platform(os_name, arch, variant)


def select_platform(
    entries: Iterable[tuple[Platform, str]], wanted: Platform
) -> tuple[Platform, str] | None:
    """Pick the best entry for ``wanted``: an exact variant first, then any compatible one."""
    compatible = [(p, d) for p, d in entries if wanted.matches(p)]
    if not compatible:
        return None
    for entry in compatible:
        if entry[0].variant == wanted.variant:
            return entry
    return compatible[0]
