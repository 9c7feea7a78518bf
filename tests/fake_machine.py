"""A VM without a hypervisor: implements the protocols of husk.vm.machine for fast unit tests.

:class:`FakeBackend` is a :class:`husk.vm.machine.MachineBackend`; the machines it
makes (:class:`FakeMachine`) "boot" by serving a :class:`tests.fake_agent.FakeAgent`
on their agent socket, so the real AgentClient, sandbox, template and pool code
run against them unchanged. A snapshot is a small file naming the machine it was
saved from; a restore of anything else fails as QEMU's would (exit status 1).

Failures are injected per backend: ``fail_boots`` / ``fail_restores`` make the next
so many boots / restores raise GuestError.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from fake_agent import FakeAgent
from husk.errors import GuestError
from husk.vm.machine import (
    EventHandler,
    MachineBackend,
    MachineConfig,
    RestorableMachine,
    VirtualMachine,
)

SNAPSHOT_MAGIC = b"fake-vm-state:"
FAKE_VERSION = "fake-hypervisor 1.0"
FAKE_CPU = "fake-cpu"
_pids = itertools.count(4_000_000)


class FakeMachine:
    def __init__(self, config: MachineConfig, backend: FakeBackend) -> None:
        self._config = config
        self._backend = backend
        self._pid: int | None = None
        self._returncode: int | None = None
        self._paused = False
        self._handler: EventHandler | None = None
        self.agent: FakeAgent | None = None
        # Unix socket paths are short; a test's state directories may not be.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="husk-fake-", dir="/tmp"))
        self.calls: list[str] = []
        """Every operation, in order ("boot", "restore", "replace_disk 0", …)."""
        self.boot_images_released = False
        self.restored_from: bytes | None = None
        self._lan_ends: list[int] = []
        """Copies of the LAN slots' QEMU ends, held while "running" as QEMU holds them."""

    # -- what the protocol reads ----------------------------------------------------------

    @property
    def config(self) -> MachineConfig:
        return self._config

    @property
    def pid(self) -> int:
        if self._pid is None:
            raise GuestError("the VM has not been booted")
        return self._pid

    @property
    def state_dir(self) -> Path:
        return self._config.state_dir

    @property
    def agent_socket(self) -> Path:
        return self._socket_dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def accel(self) -> str:
        return self._config.accel

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def running(self) -> bool:
        return self._pid is not None and self._returncode is None

    # -- life -----------------------------------------------------------------------------

    def _start(self, console: bytes) -> None:
        if self._pid is not None:
            raise GuestError(f"the VM in {self.state_dir} was already booted")
        if self._config.accel == "auto":
            raise GuestError("the fake machine was given no accelerator")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.console_log.write_bytes(console)
        self._pid = next(_pids)
        self._lan_ends = [os.dup(fd) for fd in self._config.lan_fds]
        self.agent = FakeAgent(self.agent_socket)
        self._backend.running[self.state_dir] = self

    def serve_agent_again(self) -> None:
        """A fresh agent on the socket (a fake agent serves one connection; a guest many)."""
        if self.agent is not None:
            self.agent.close()
        self.agent_socket.unlink(missing_ok=True)
        self.agent = FakeAgent(self.agent_socket)

    async def boot(self, *, timeout: float = 10.0) -> None:
        self.calls.append("boot")
        if self._backend.fail_boots > 0:
            self._backend.fail_boots -= 1
            raise GuestError("the fake hypervisor refused to boot")
        self._start(b"fake kernel booting\n")

    async def restore(
        self,
        source: Path | int,
        *,
        start: bool = True,
        console_prefix: bytes = b"",
        timeout: float = 10.0,
    ) -> None:
        self.calls.append("restore")
        state = os.pread(source, 4096, 0) if isinstance(source, int) else source.read_bytes()
        if self._backend.fail_restores > 0:
            self._backend.fail_restores -= 1
            raise GuestError("the fake restore timed out")
        if not state.startswith(SNAPSHOT_MAGIC):
            self._returncode = 1  # as QEMU refusing a state: it quits by itself
            raise GuestError("the fake hypervisor cannot load this state")
        self.restored_from = state
        self._start(console_prefix)
        self._paused = not start

    async def snapshot(self, destination: Path, *, resume: bool = True) -> None:
        self.check_alive()
        self.calls.append("snapshot")
        destination.write_bytes(SNAPSHOT_MAGIC + str(self.state_dir).encode())
        self._paused = not resume

    def check_alive(self) -> None:
        if self._pid is None:
            raise GuestError("the VM has not been booted")
        if self._returncode is not None:
            raise GuestError(f"the fake VM exited with status {self._returncode}")

    def on_event(self, handler: EventHandler | None) -> None:
        self._handler = handler

    async def status(self) -> str:
        if not self.running:
            return "exited"
        return "paused" if self._paused else "running"

    async def pause(self) -> None:
        self.check_alive()
        self._paused = True

    async def resume(self) -> None:
        self.check_alive()
        self.calls.append("resume")
        self._paused = False

    def _end(self, status: int) -> None:
        for fd in self._lan_ends:
            os.close(fd)
        self._lan_ends = []
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self._pid is not None and self._returncode is None:
            self._returncode = status
        self._backend.running.pop(self.state_dir, None)
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    async def stop(self, timeout: float = 10.0) -> int | None:
        self.calls.append("stop")
        self._end(0)
        return self._returncode

    async def kill(self) -> None:
        self.calls.append("kill")
        self._end(-9)

    async def wait(self, timeout: float | None = None) -> int | None:
        return self._returncode

    async def detach(self) -> None:
        self.calls.append("detach")

    def rss_bytes(self) -> int:
        self.check_alive()
        return 1 << 20

    def release_boot_images(self) -> None:
        self.boot_images_released = True

    def cpu_seconds(self) -> float:
        self.check_alive()
        return 0.0

    async def replace_disk(self, index: int, path: Path) -> None:
        self.check_alive()
        self.calls.append(f"replace_disk {index}")
        current = self._config.disks[index]
        if path.stat().st_size != current.path.stat().st_size:
            raise GuestError(f"{path} is not the size of disk {index}")
        disks = list(self._config.disks)
        disks[index] = replace(current, path=path)
        self._config = replace(self._config, disks=disks)

    def move_state_dir(self, destination: Path) -> None:
        self.calls.append("move_state_dir")
        if destination.exists():
            raise GuestError(f"cannot move the VM to {destination}: it exists")
        os.rename(self.state_dir, destination)
        self._backend.running.pop(self.state_dir, None)
        old = self.state_dir
        disks = [  # what lives in the state directory moves with it, as in QemuMachine
            replace(d, path=destination / d.path.relative_to(old))
            if d.path.is_relative_to(old)
            else d
            for d in self._config.disks
        ]
        self._config = replace(self._config, state_dir=destination, disks=disks)
        self._backend.running[destination] = self

    async def set_egress(self, enabled: bool) -> None:
        self.check_alive()
        self.calls.append(f"set_egress {enabled}")
        self._config = replace(self._config, egress=enabled)


class FakeBackend:
    def __init__(self) -> None:
        self.created: list[FakeMachine] = []
        self.running: dict[Path, FakeMachine] = {}
        """Machines by state directory, while they run (what attach and kill_recorded find)."""
        self.fail_boots = 0
        self.fail_restores = 0
        self.killed_recorded: list[Path] = []

    def create(self, config: MachineConfig) -> RestorableMachine:
        machine = FakeMachine(config, self)
        self.created.append(machine)
        return machine

    async def attach(self, state_dir: Path) -> VirtualMachine:
        machine = self.running.get(state_dir)
        if machine is None:
            raise GuestError(f"no VM recorded in {state_dir}")
        machine.calls.append("attach")
        machine.serve_agent_again()
        return machine

    def kill_recorded(self, state_dir: Path) -> bool:
        machine = self.running.get(state_dir)
        if machine is None:
            return False
        self.killed_recorded.append(state_dir)
        machine._end(-9)
        return True

    def version(self) -> str:
        return FAKE_VERSION

    def default_cpu_model(self, accel: str) -> str:
        return FAKE_CPU

    def close(self) -> None:
        """Ends every machine still running (test teardown)."""
        for machine in list(self.running.values()):
            machine._end(-9)
        for machine in self.created:
            shutil.rmtree(machine._socket_dir, ignore_errors=True)


def _implements_the_protocols(backend: FakeBackend, machine: FakeMachine) -> None:
    """Lets mypy check the fakes against the protocols."""
    _backend: MachineBackend = backend
    _machine: RestorableMachine = machine
