"""The build cache: a step's key (its parent, instruction, build args, copied files'
digest) to the image it produced; ``husk builder prune`` empties it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from husk import paths

MAX_CACHE_FILE = 64 * 1024 * 1024


def step_key(parent: str, instruction: str, args: dict[str, str], extra: str = "") -> str:
    """The key of a step: what it starts from and everything that decides its result."""
    document = json.dumps(
        {
            "parent": parent,
            "instruction": instruction,
            "args": sorted(args.items()),
            "extra": extra,
        },
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(document.encode()).hexdigest()


class BuildCache:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else paths.data_dir() / "build-cache.json"

    def _read(self) -> dict[str, str]:
        try:
            if self.path.stat().st_size > MAX_CACHE_FILE:
                return {}
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): str(v) for k, v in data.items() if isinstance(v, str)}

    def _write(self, data: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".build-cache.")
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, self.path)

    def get(self, key: str) -> str | None:
        return self._read().get(key)

    def put(self, key: str, image_id: str) -> None:
        data = self._read()
        data[key] = image_id
        self._write(data)

    def prune(self) -> int:
        """Forgets every entry (the images stay until pruned as images); how many."""
        count = len(self._read())
        self._write({})
        return count
