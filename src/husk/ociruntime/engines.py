"""Which container engines are installed and whether they are configured to use husk-runtime
(for ``husk system check``). Only files are read; no engine is asked."""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNTIME_NAME = "husk-runtime"


@dataclass(frozen=True)
class EngineStatus:
    name: str
    binary: str | None
    """Where the engine's binary is (None: not installed)."""
    configured_in: str | None
    """The configuration file that names husk-runtime (None: none does)."""

    def describe(self) -> str:
        if self.binary is None:
            return f"{self.name}: not installed"
        if self.configured_in is None:
            return f"{self.name}: installed ({self.binary}), not configured for {RUNTIME_NAME}"
        return f"{self.name}: installed, configured for {RUNTIME_NAME} in {self.configured_in}"


def _names_runtime(value: Any) -> bool:
    return isinstance(value, str) and os.path.basename(value) == RUNTIME_NAME


def _strings(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a nested TOML/JSON document."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                yield str(key), child
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def _read_toml(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return None


def podman_configured(path: Path) -> bool:
    """``[engine.runtimes]`` has an entry whose paths include husk-runtime."""
    data = _read_toml(path) or {}
    runtimes = data.get("engine", {}).get("runtimes", {})
    if not isinstance(runtimes, dict):
        return False
    return any(
        isinstance(paths, list) and any(_names_runtime(p) for p in paths)
        for paths in runtimes.values()
    )


def docker_configured(path: Path) -> bool:
    """daemon.json's ``runtimes`` has one whose ``path`` is husk-runtime."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    runtimes = data.get("runtimes") if isinstance(data, dict) else None
    if not isinstance(runtimes, dict):
        return False
    return any(isinstance(r, dict) and _names_runtime(r.get("path")) for r in runtimes.values())


def containerd_configured(path: Path) -> bool:
    """A runtime's ``BinaryName`` is husk-runtime."""
    data = _read_toml(path)
    return data is not None and any(
        key == "BinaryName" and _names_runtime(value) for key, value in _strings(data)
    )


def _podman_files(home: Path) -> list[Path]:
    return [
        Path("/usr/share/containers/containers.conf"),
        Path("/etc/containers/containers.conf"),
        home / ".config/containers/containers.conf",
    ]


def report(
    home: Path | None = None,
    which: Any = shutil.which,
    docker_config: Path = Path("/etc/docker/daemon.json"),
    containerd_config: Path = Path("/etc/containerd/config.toml"),
) -> list[EngineStatus]:
    checks = [
        ("podman", "podman", [(p, podman_configured) for p in _podman_files(home or Path.home())]),
        ("docker engine", "dockerd", [(docker_config, docker_configured)]),
        ("containerd", "containerd", [(containerd_config, containerd_configured)]),
    ]
    statuses = []
    for name, binary, files in checks:
        found = which(binary)
        configured = next((str(path) for path, check in files if check(path)), None)
        statuses.append(EngineStatus(name, found, configured if found else None))
    return statuses
