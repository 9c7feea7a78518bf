"""Which accelerator VMs run on: KVM only where a guest really boots on it, else TCG.

The checks that need no guest live in :mod:`husk.vm.accel`. Where they cannot
decide (a usable-looking /dev/kvm that is no PVM host), KVM is chosen only after
a probe boot reaches the guest agent within a short deadline. The verdict is
cached in ``data_dir()/accel.json`` per host kernel, hypervisor version and guest
bundle, so the probe runs once; :class:`husk.sandbox.provisioner.Provisioner`
asks once per bundle and passes the answer down in every machine's configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from husk import paths
from husk.agent.client import AgentClient
from husk.bundle import locate
from husk.bundle.locate import file_sha256
from husk.errors import GuestError, InvalidArgument
from husk.fileio import write_json_atomic
from husk.vm.accel import AccelChoice, static_choice
from husk.vm.machine import MachineBackend, MachineConfig, RestorableMachine

CACHE_FILE = "accel.json"
PROBE_TIMEOUT = 10.0
PROBE_MEMORY_MIB = 256

_decisions: dict[str, AccelChoice] = {}


def cache_key(kernel: Path, initrd: Path, backend: MachineBackend) -> str:
    return " ".join(
        [
            f"host={os.uname().release}",
            f"qemu={backend.version()}",
            f"kernel={file_sha256(kernel)}",
            f"initrd={file_sha256(initrd)}",
        ]
    )


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads((paths.data_dir() / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, choice: AccelChoice) -> None:
    data = _read_cache()
    data[key] = {**choice.to_json(), "decided_at": int(time.time())}
    directory = paths.data_dir()
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / CACHE_FILE, data)


def probe_machine(
    backend: MachineBackend,
    kernel: Path,
    initrd: Path,
    accel: str,
    prefix: str,
    *,
    cpu_model: str | None = None,
) -> RestorableMachine:
    """A small VM in a fresh private state directory, for a timed probe boot."""
    vms = paths.ensure_private_dir(paths.vms_dir())
    state_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=vms))
    return backend.create(
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
    backend: MachineBackend,
    kernel: Path,
    initrd: Path,
    *,
    timeout: float = PROBE_TIMEOUT,
    cpu_model: str | None = None,
) -> float:
    """Boots the guest under KVM; seconds until its agent answered, or GuestError."""
    machine = probe_machine(backend, kernel, initrd, "kvm", "kvm-probe-", cpu_model=cpu_model)
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
    backend: MachineBackend,
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
    decided = static_choice(probe_pvm=probe_pvm)
    if decided is not None:
        return decided
    if kernel is None or initrd is None:
        bundle = locate()
        kernel, initrd = bundle.kernel, bundle.initrd
    key = cache_key(kernel, initrd, backend)
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
        seconds = await probe_kvm(backend, kernel, initrd, timeout=probe_timeout)
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
