"""Templates that cannot be restored on this host, remembered so they are not rebuilt.

Building a template costs a cold boot and a save; when its restore then fails for a
reason of the host (QEMU refusing the RAM descriptor inside an unprivileged jail, for
instance), building it again at the next start would fail the same way, making every
start slower than a plain cold boot. So the failure is written next to the templates::

    data_dir()/templates/<key>.failed     {"key", "reason", "stage", "time", "inputs", "host"}

and starts of that shape boot cold at once, with the reason. Nothing is retried while
the template key (bundle, QEMU, accelerator, sizes, layout) and the host fingerprint
(the host kernel, husk's version and restore code, root or not) stay the same: a change of any of
them means the failure may be gone, so the record is ignored and replaced by the
outcome of the next try. ``husk system check`` lists the records; removing one (or
``husk system check --retry-templates``) retries at the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from husk.fileio import write_json_atomic
from husk.sandbox.templates import TemplateInputs, templates_dir

SUFFIX = ".failed"
MAX_REASON = 2000
BUILD_ATTEMPTS = 2
"""Builds in a row that must fail before a shape boots cold without trying (one failed
build may be a loaded host's timeout; one refused restore of a fresh template is not)."""


_RESTORE_CODE = ("vm/jail.py", "vm/qemu.py", "vm/qemu_argv.py", "sandbox/template_boot.py")
"""husk's modules that decide how a template is restored: a changed one is worth a retry."""


def _code_identity() -> str:
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent.parent
    for name in _RESTORE_CODE:
        with contextlib.suppress(OSError):
            info = (package / name).stat()
            digest.update(f"{name}:{info.st_size}:{info.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def host_fingerprint() -> dict[str, Any]:
    """What, besides the template key, decides whether a restore can work here: the host
    kernel, husk's version and restore code, and whether the daemon is root."""
    from importlib import metadata  # only where a failure was recorded: costly to import

    try:
        version = metadata.version("husk")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "kernel": platform.release(),
        "husk": version,
        "code": _code_identity(),
        "root": os.geteuid() == 0,
    }


def record_path(key: str) -> Path:
    return templates_dir() / f"{key}{SUFFIX}"


def remember(inputs: TemplateInputs, stage: str, reason: str) -> None:
    """Records that ``inputs``' template failed at ``stage`` ("restore" or "build")."""
    previous = _read(record_path(inputs.key))
    count = 1
    if previous and previous.get("stage") == stage and previous.get("host") == host_fingerprint():
        with contextlib.suppress(TypeError, ValueError):
            count = int(previous.get("count", 1)) + 1
    record = {
        "count": count,
        "key": inputs.key,
        "stage": stage,
        "reason": reason[:MAX_REASON],
        "time": time.time(),
        "inputs": inputs.describe(),
        "host": host_fingerprint(),
    }
    with contextlib.suppress(OSError):
        templates_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomic(record_path(inputs.key), record)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recall(inputs: TemplateInputs) -> dict[str, Any] | None:
    """The remembered failure of ``inputs``' template, if it still applies here."""
    record = _read(record_path(inputs.key))
    return record if record is not None and _applies(record, host_fingerprint()) else None


def _applies(record: dict[str, Any], host: dict[str, Any]) -> bool:
    if record.get("host") != host:
        return False
    if record.get("stage") == "build":
        try:
            return int(record.get("count", 1)) >= BUILD_ATTEMPTS
        except (TypeError, ValueError):
            return False
    return True


def forget(key: str) -> None:
    with contextlib.suppress(OSError):
        record_path(key).unlink()


def forget_all() -> int:
    """Removes every record (templates are tried again); returns how many there were."""
    removed = 0
    for path in _record_paths():
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed


def _record_paths() -> list[Path]:
    base = templates_dir()
    try:
        return sorted(p for p in base.iterdir() if p.name.endswith(SUFFIX))
    except OSError:
        return []


def list_failures() -> list[dict[str, Any]]:
    """Every record that still applies on this host (for ``husk system check``)."""
    current = host_fingerprint()
    found = []
    for path in _record_paths():
        record = _read(path)
        if record is not None and _applies(record, current):
            found.append(record)
    return found


def describe(record: dict[str, Any]) -> str:
    """One line: which template, since when, why."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("time", 0))))
    return (
        f"template {str(record.get('key'))[:12]} ({record.get('inputs')}) cannot be "
        f"{'restored' if record.get('stage') == 'restore' else 'built'} here since {since}: "
        f"{record.get('reason')}"
    )
