"""Human-readable sizes and durations, in Docker's exact wording (go-units), and text
made safe to show.

Shared by the CLI and the Docker API (``Status: "Up 3 minutes"``); standard
library only and quick to import, since ``husk ps`` pays for every import.
"""

from __future__ import annotations

from collections.abc import Sequence

_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")


def _scaled(size: float, base: float, units: Sequence[str], precision: int) -> str:
    index = 0
    while size >= base and index < len(units) - 1:
        size /= base
        index += 1
    return f"{size:.{precision}g}{units[index]}"


def human_size(size: float, precision: int = 3) -> str:
    """Decimal units, as Docker prints image sizes and I/O: ``1.23MB``."""
    return _scaled(float(size), 1000.0, _DECIMAL_UNITS, precision)


def binary_size(size: float) -> str:
    """Binary units, as Docker prints memory: ``1.5MiB``."""
    return _scaled(float(size), 1024.0, _BINARY_UNITS, 4)


def human_duration(seconds: float) -> str:
    """Docker's rounded durations: ``Less than a second``, ``About a minute``, ``3 days``."""
    if seconds < 1:
        return "Less than a second"
    if seconds < 2:
        return "1 second"
    if seconds < 60:
        return f"{int(seconds)} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // (24 * 30)} months"
    return f"{hours // (24 * 365)} years"


_ESCAPES: dict[int, str] = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))},
    0x09: "\\t",
    0x0A: "\\n",
    0x0D: "\\r",
}


def escape_controls(text: str, *, keep: str = "") -> str:
    r"""``text`` with every control character (C0, DEL, C1) but those in ``keep`` shown as
    an escape: ESC ``[31m`` becomes the seven characters ``\x1b[31m``; tab, newline and
    carriage return become ``\t``, ``\n``, ``\r``.

    For text a guest or an image chose, before a terminal or a log shows it: raw, an
    escape sequence rewrites the screen and a newline forges a line of its own."""
    table = _ESCAPES if not keep else {k: v for k, v in _ESCAPES.items() if chr(k) not in keep}
    return text.translate(table)
