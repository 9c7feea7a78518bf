"""QEMU's stream framing for ``-netdev socket`` / ``-netdev stream``: a u32 big-endian length,
then that many bytes of Ethernet frame (no FCS).

The switch forwards frames in the same framing it reads them in, so a run of whole frames
goes out unchanged, header included.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!I")
HEADER_SIZE = HEADER.size

ETHERNET_HEADER = 14
"""Destination MAC, source MAC, EtherType: the least a frame must carry."""

MIN_FRAME = ETHERNET_HEADER
MAX_FRAME = 65535 + ETHERNET_HEADER
"""A 64 KiB payload (QEMU's largest packet) plus the Ethernet header. Anything outside
[MIN_FRAME, MAX_FRAME] means the peer is broken or hostile: the switch drops the port."""

MAC_PAIR = struct.Struct("!6s6s")
"""Destination and source MAC at the start of a frame."""


class FramingError(ValueError):
    """A length header outside [MIN_FRAME, MAX_FRAME]."""


def frame(payload: bytes) -> bytes:
    """``payload`` (an Ethernet frame) with its length header."""
    if not MIN_FRAME <= len(payload) <= MAX_FRAME:
        raise FramingError(f"frame length {len(payload)} outside {MIN_FRAME}..{MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


def split_frames(data: bytes | bytearray) -> tuple[list[bytes], int]:
    """The whole frames at the start of ``data`` and how many bytes they used.

    Raises :class:`FramingError` on a bad length. For tests and tools; the switch's hot
    path parses its buffers in place.
    """
    frames: list[bytes] = []
    offset = 0
    while len(data) - offset >= HEADER_SIZE:
        (length,) = HEADER.unpack_from(data, offset)
        if not MIN_FRAME <= length <= MAX_FRAME:
            raise FramingError(f"frame length {length} outside {MIN_FRAME}..{MAX_FRAME}")
        end = offset + HEADER_SIZE + length
        if end > len(data):
            break
        frames.append(bytes(data[offset + HEADER_SIZE : end]))
        offset = end
    return frames, offset
