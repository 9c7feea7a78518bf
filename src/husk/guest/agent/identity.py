"""A restored clone's own identity, carried by the host's HELLO.

Clones of one template wake up with the template's RNG state, clock and MAC. The host
used to send three requests after the handshake (ENTROPY, SET_TIME, OVERLAY_CONFIG);
under TCG every request a clone serves is guest code translated again (the agent's
request path and the kernel's around it), so the HELLO that every restore sends anyway
carries two of them: ``{"entropy": hex, "mac": "02:…"}`` ("mac" only for a VM with a
network), applied before READY goes out: randomness first (the CRNG reseeded before
anything draws from it), then the MAC.

The clock stays a SET_TIME request after READY: the HELLO is read only once the
restored guest has woken up (a few hundred milliseconds of first-time translation on
a loaded host), so a time it carried would put the clock that far behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from husk.guest.agent import system

MIN_ENTROPY = 16
MAX_ENTROPY = 512
"""Bytes of host randomness a HELLO may carry (the host sends 64)."""


class IdentityError(ValueError):
    """The HELLO's identity is malformed; the handshake is refused."""


class Identity:
    """A checked identity: what :func:`apply` sets. (No dataclasses in the guest.)"""

    __slots__ = ("entropy", "mac")

    def __init__(self, entropy: bytes, mac: str) -> None:
        self.entropy = entropy
        self.mac = mac


def parse(body: Any) -> Identity:
    """Checks the HELLO's "identity" object; raises :class:`IdentityError`."""
    if not isinstance(body, dict):
        raise IdentityError("identity must be an object")
    entropy = body.get("entropy")
    if not isinstance(entropy, str) or len(entropy) > 2 * MAX_ENTROPY:
        raise IdentityError(f"identity entropy must be a hex string of at most {MAX_ENTROPY} bytes")
    try:
        data = bytes.fromhex(entropy)
    except ValueError:
        raise IdentityError("identity entropy is not hex") from None
    if len(data) < MIN_ENTROPY:
        raise IdentityError(f"identity entropy must hold at least {MIN_ENTROPY} bytes")
    mac = body.get("mac", "")
    if not isinstance(mac, str):
        raise IdentityError("identity mac must be a string")
    return Identity(data, mac)


def apply(identity: Identity, before_mac: Callable[[], None]) -> dict[str, Any]:
    """Seeds the RNG and sets eth0's MAC; returns what READY reports.

    ``before_mac`` waits for anything that may still be changing eth0 (the boot-time
    address setup runs in the background).
    """
    system.add_entropy(identity.entropy)
    applied: dict[str, Any] = {"entropy_bytes": len(identity.entropy)}
    if identity.mac:
        before_mac()
        system.set_mac(identity.mac)
        applied["mac"] = identity.mac
    return applied
