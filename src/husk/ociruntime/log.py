"""runc-style log lines on ``--log``: ``{"level": "error", "msg": ..., "time": ...}``.

conmon and containerd's shim read the last error line of that file to tell their user
why the runtime failed, so every failure goes there (and to stderr).
"""

from __future__ import annotations

import json
import os
import sys
import time

_settings: dict[str, str] = {"path": "", "format": "text"}


def configure(path: str | None, log_format: str) -> None:
    _settings["path"] = path or ""
    _settings["format"] = log_format


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e9):09d}Z"


def line(level: str, message: str) -> str:
    """One log line in the configured format (no newline)."""
    if _settings["format"] == "json":
        return json.dumps({"level": level, "msg": message, "time": _timestamp()})
    return f'time="{_timestamp()}" level={level} msg="{message}"'


def write(level: str, message: str) -> None:
    """Appends to the --log file (if any); never raises."""
    path = _settings["path"]
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.write(fd, (line(level, message) + "\n").encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def error(message: str, *, stderr: bool = True) -> None:
    write("error", message)
    if stderr:
        try:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def debug(message: str) -> None:
    if _settings.get("debug"):
        write("debug", message)


def enable_debug() -> None:
    _settings["debug"] = "1"
