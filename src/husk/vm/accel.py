"""Which accelerator a VM runs on: KVM only where a guest really boots on it, else TCG.

A usable-looking /dev/kvm is not enough: on a PVM nested host (``kvm_pvm``)
QEMU opens it and a stock guest kernel then hangs silently. So KVM is chosen
only after a probe boot reaches the guest agent within a short deadline. The
verdict is cached in ``data_dir()/accel.json`` per host kernel, QEMU version and
guest bundle, so the probe runs once.

``HUSK_ACCEL=kvm|tcg`` forces a choice without probing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from husk import paths, settings
from husk.bundle.locate import file_sha256
from husk.errors import GuestError, InvalidArgument

if TYPE_CHECKING:
    from husk.vm.qemu import QemuMachine

ACCEL_ENV = settings.HUSK_ACCEL
CACHE_FILE = "accel.json"
KVM_DEVICE = Path("/dev/kvm")
PVM_MODULE = Path("/sys/module/kvm_pvm")
PROBE_TIMEOUT = 10.0
PROBE_MEMORY_MIB = 256

_decisions: dict[str, AccelChoice] = {}


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


def cache_key(kernel: Path, initrd: Path) -> str:
    from husk.vm.qemu import qemu_version

    return " ".join(
        [
            f"host={os.uname().release}",
            f"qemu={qemu_version()}",
            f"kernel={file_sha256(kernel)}",
            f"initrd={file_sha256(initrd)}",
        ]
    )


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


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads((paths.data_dir() / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, choice: AccelChoice) -> None:
    from husk.fileio import write_json_atomic

    data = _read_cache()
    data[key] = {**choice.to_json(), "decided_at": int(time.time())}
    directory = paths.data_dir()
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / CACHE_FILE, data)


def probe_machine(
    kernel: Path, initrd: Path, accel: str, prefix: str, *, cpu_model: str | None = None
) -> QemuMachine:
    """A small VM in a fresh private state directory, for a timed probe boot."""
    from husk.vm.machine import MachineConfig
    from husk.vm.qemu import QemuMachine

    vms = paths.ensure_private_dir(paths.vms_dir())
    state_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=vms))
    return QemuMachine(
        MachineConfig(
            kernel=kernel,
            initrd=initrd,
            state_dir=state_dir,
            memory_mib=PROBE_MEMORY_MIB,
            accel="kvm" if accel == "kvm" else "tcg",
            cpu_model=cpu_model,
        )
    )


async def probe_kvm(
    kernel: Path, initrd: Path, *, timeout: float = PROBE_TIMEOUT, cpu_model: str | None = None
) -> float:
    """Boots the guest under KVM; seconds until its agent answered, or GuestError."""
    from husk.agent.client import AgentClient

    machine = probe_machine(kernel, initrd, "kvm", "kvm-probe-", cpu_model=cpu_model)
    state_dir = machine.state_dir
    started = time.monotonic()
    try:
        await machine.boot(timeout=timeout)
        remaining = max(0.1, timeout - (time.monotonic() - started))
        client = await AgentClient.connect(
            machine.agent_socket, timeout=remaining, check_alive=machine.check_alive
        )
        elapsed = time.monotonic() - started
        await client.close()
        return elapsed
    finally:
        with contextlib.suppress(Exception):
            await machine.kill()
        shutil.rmtree(state_dir, ignore_errors=True)


async def choose_accel(
    kernel: Path | None = None,
    initrd: Path | None = None,
    *,
    refresh: bool = False,
    probe_pvm: bool = False,
    probe_timeout: float = PROBE_TIMEOUT,
) -> AccelChoice:
    """The accelerator for VMs booting ``kernel``/``initrd`` (default: the installed bundle).

    ``refresh`` ignores the cached verdict. ``probe_pvm`` probes even on a PVM
    host, where the probe is known to fail (it costs ``probe_timeout``).
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
    if kernel is None or initrd is None:
        from husk.bundle import locate

        bundle = locate()
        kernel, initrd = bundle.kernel, bundle.initrd
    key = cache_key(kernel, initrd)
    if not refresh:
        remembered = _decisions.get(key)
        if remembered is not None:
            return remembered
        entry = _read_cache().get(key)
        if isinstance(entry, dict) and entry.get("name") in ("kvm", "tcg"):
            choice = AccelChoice(
                str(entry["name"]), str(entry.get("reason", "")), entry.get("probe_seconds"), True
            )
            _decisions[key] = choice
            return choice
    started = time.monotonic()
    try:
        seconds = await probe_kvm(kernel, initrd, timeout=probe_timeout)
    except (TimeoutError, GuestError, InvalidArgument, OSError) as err:
        elapsed = round(time.monotonic() - started, 3)
        choice = AccelChoice("tcg", f"a KVM probe boot failed after {elapsed:.1f}s: {err}", elapsed)
    else:
        choice = AccelChoice(
            "kvm", f"a KVM probe boot reached the guest agent in {seconds:.2f}s", round(seconds, 3)
        )
    _decisions[key] = choice
    _write_cache(key, choice)
    return choice
