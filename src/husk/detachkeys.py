"""Detach keys: the key sequence that leaves an interactive session, the container running.

Docker's format: comma-separated keys, each one character or ``ctrl-<c>`` with ``<c>``
one of ``a``-``z``, ``@``, ``[``, ``\\``, ``]``, ``^``, ``_``; the default is
``ctrl-p,ctrl-q``. Both ends look for it on a terminal's input (as Docker's do): the
client, so that typing it detaches even from a daemon that does not look, and the
daemon, for clients that send the keys on (an API user writing to the stream).
"""

from __future__ import annotations

from husk.errors import InvalidArgument

DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"

_CONTROL_KEYS = {f"ctrl-{chr(ord('a') + n)}": n + 1 for n in range(26)}
_CONTROL_KEYS.update({"ctrl-@": 0, "ctrl-[": 27, "ctrl-\\": 28, "ctrl-]": 29})
_CONTROL_KEYS.update({"ctrl-^": 30, "ctrl-_": 31})


def parse_detach_keys(text: str) -> bytes:
    """The bytes of a detach-keys setting; the default for an empty one."""
    if not text:
        text = DEFAULT_DETACH_KEYS
    codes = bytearray()
    for key in text.split(","):
        if len(key) == 1:
            codes += key.encode("latin-1", "replace")
        elif key in _CONTROL_KEYS:
            codes.append(_CONTROL_KEYS[key])
        else:
            raise InvalidArgument(
                f"invalid detach keys ({text!r}): unknown key {key!r}; use single characters "
                "or ctrl-<value> (a-z, @, [, \\, ], ^, _), separated by commas"
            )
    return bytes(codes)


class DetachScanner:
    """Finds the detach sequence in a stream of input chunks, however they are split.

    Bytes that could still begin the sequence are held back until the next chunk
    decides; everything else passes through unchanged, in order.
    """

    def __init__(self, keys: bytes) -> None:
        if not keys:
            raise ValueError("empty detach sequence")
        self.keys = keys
        self._held = b""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """(the input to pass on, whether the sequence ended in this chunk)."""
        buffer = self._held + data
        found = buffer.find(self.keys)
        if found >= 0:
            self._held = b""
            return buffer[:found], True
        keep = 0
        for length in range(min(len(self.keys) - 1, len(buffer)), 0, -1):
            if buffer.endswith(self.keys[:length]):
                keep = length
                break
        self._held = buffer[len(buffer) - keep :] if keep else b""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> bytes:
        """What is held back, once the input has ended."""
        held, self._held = self._held, b""
        return held
