"""The provisioning layer's context: one machine backend and one accelerator choice.

Everything in :mod:`husk.sandbox` makes, finds and ends VMs through a
:class:`Provisioner`, never through a backend's machine class, so a test can
inject a fake backend. The accelerator is chosen here, once per guest bundle
(probing KVM only when the host's checks cannot decide), and written into every
machine's configuration: no machine chooses for itself.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from husk.sandbox.accel import choose_accel
from husk.vm.accel import AccelChoice
from husk.vm.machine import MachineBackend, MachineConfig, RestorableMachine, VirtualMachine
from husk.vm.qemu import QemuBackend


class Provisioner:
    def __init__(self, backend: MachineBackend) -> None:
        self.backend = backend
        self._choices: dict[tuple[Path, Path], AccelChoice] = {}

    async def accel(self, kernel: Path, initrd: Path) -> AccelChoice:
        """The accelerator for VMs booting ``kernel``/``initrd``, decided on the first call."""
        choice = self._choices.get((kernel, initrd))
        if choice is None:
            choice = await choose_accel(self.backend, kernel, initrd)
            self._choices[(kernel, initrd)] = choice
        return choice

    async def resolve(self, config: MachineConfig) -> MachineConfig:
        """``config`` with the accelerator chosen (unchanged if it already names one)."""
        if config.accel != "auto":
            return config
        choice = await self.accel(config.kernel, config.initrd)
        return replace(config, accel="kvm" if choice.name == "kvm" else "tcg")

    def create(self, config: MachineConfig) -> RestorableMachine:
        return self.backend.create(config)

    async def attach(self, state_dir: Path) -> VirtualMachine:
        return await self.backend.attach(state_dir)

    def kill_recorded(self, state_dir: Path) -> bool:
        return self.backend.kill_recorded(state_dir)


_default: Provisioner | None = None


def default_provisioner() -> Provisioner:
    """The process's provisioner on the QEMU backend (made on first use).

    The one place in :mod:`husk.sandbox` that picks a backend; callers that want
    another (tests: :class:`tests.fake_machine.FakeBackend`) pass their own.
    """
    global _default
    if _default is None:
        _default = Provisioner(QemuBackend())
    return _default
