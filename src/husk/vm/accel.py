"""What the host says about accelerators, without booting anything: KVM's device, PVM, HUSK_ACCEL.

A usable-looking /dev/kvm is not enough: on a PVM nested host (``kvm_pvm``)
QEMU opens it and a stock guest kernel then hangs silently. Where these checks
cannot decide, the provisioning layer probes with a real guest
(:mod:`husk.sandbox.accel`); this module only holds the checks that need none.

``HUSK_ACCEL=kvm|tcg`` forces a choice without probing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from husk import settings

ACCEL_ENV = settings.HUSK_ACCEL
KVM_DEVICE = Path("/dev/kvm")
PVM_MODULE = Path("/sys/module/kvm_pvm")


@dataclass(frozen=True)
class AccelChoice:
    name: str
    """"kvm" or "tcg"."""
    reason: str
    probe_seconds: float | None = None
    """Seconds the KVM probe took to reach the agent (or to fail), when one ran."""
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason, "probe_seconds": self.probe_seconds}


def forced_choice() -> AccelChoice | None:
    value = settings.forced_accel()
    if value is None:
        return None
    return AccelChoice(value, f"forced by {ACCEL_ENV}={value}")


def kvm_unusable_reason() -> str | None:
    if not KVM_DEVICE.exists():
        return f"{KVM_DEVICE} does not exist"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"{KVM_DEVICE} is not readable and writable by this user"
    return None


def static_choice(*, probe_pvm: bool = False) -> AccelChoice | None:
    """The choice when no probe boot is needed (forced, no usable KVM, a PVM host), else None.

    ``probe_pvm``: on a PVM host, answer None (probe anyway) instead of TCG.
    """
    forced = forced_choice()
    if forced is not None:
        return forced
    unusable = kvm_unusable_reason()
    if unusable is not None:
        return AccelChoice("tcg", unusable)
    if PVM_MODULE.exists() and not probe_pvm:
        return AccelChoice(
            "tcg",
            f"{KVM_DEVICE} is a PVM nested host ({PVM_MODULE} is loaded), "
            "where a stock guest kernel hangs after 'Probing EDD'",
        )
    return None
