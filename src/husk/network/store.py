"""Networks on disk: one JSON file each, ``data_dir()/networks/<id>.json``, written whole.

The pre-defined networks (``bridge``, ``host``, ``none``) are made on first use and kept
like the others, so that their ids stay the same across daemon restarts.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from husk import fileio
from husk.errors import HuskError
from husk.network.model import (
    DEFAULT_GATEWAY,
    DEFAULT_NETWORK,
    DEFAULT_SUBNET,
    DRIVERS,
    PREDEFINED,
    Network,
    new_id,
)
from husk.paths import data_dir

log = logging.getLogger(__name__)


class NetworkStorageError(HuskError):
    """The data directory refused a network's file (disk full, read-only, …)."""

    kind = "storage"


class NetworkStore:
    """The networks in memory, each change written to disk before it counts."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else data_dir() / "networks"
        self._by_id: dict[str, Network] = {}
        fileio.ensure_private_dir(self.root)
        self._load()
        self._ensure_predefined()

    def _load(self) -> None:
        for path in sorted(self.root.glob("*.json")):
            if path.name.startswith("."):
                continue
            try:
                network = Network.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as err:
                # One bad file costs its network only; it stays on disk for whoever looks.
                log.warning("ignoring the unreadable network record %s: %s", path, err)
                continue
            if network.id != path.stem or network.name in self.names():
                log.warning("ignoring the network record %s: id or name clash", path)
                continue
            self._by_id[network.id] = network

    def _ensure_predefined(self) -> None:
        for name in PREDEFINED:
            if self.find_by_name(name) is not None:
                continue
            network = Network(id=new_id(), name=name, driver=DRIVERS[name])
            if name == DEFAULT_NETWORK:
                network.subnet, network.gateway = DEFAULT_SUBNET, DEFAULT_GATEWAY
            self.save(network)

    def path(self, network_id: str) -> Path:
        return self.root / f"{network_id}.json"

    def save(self, network: Network) -> None:
        try:
            fileio.write_json_atomic(self.path(network.id), network.to_json())
        except OSError as err:
            raise NetworkStorageError(
                f"cannot save network {network.name}: {err.strerror or err}"
            ) from None
        self._by_id[network.id] = network

    def delete(self, network_id: str) -> None:
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path(network_id).unlink()
            fileio.fsync_directory(self.root)
        except OSError as err:
            raise NetworkStorageError(
                f"cannot remove network {network_id[:12]}: {err.strerror or err}"
            ) from None
        self._by_id.pop(network_id, None)

    def all(self) -> list[Network]:
        """Every network, oldest first (the pre-defined ones first of all)."""
        return sorted(self._by_id.values(), key=lambda n: (not n.predefined, n.created, n.name))

    def names(self) -> set[str]:
        return {n.name for n in self._by_id.values()}

    def find(self, network_id: str) -> Network | None:
        return self._by_id.get(network_id)

    def find_by_name(self, name: str) -> Network | None:
        for network in self._by_id.values():
            if network.name == name:
                return network
        return None
