"""A VM's LAN slots: one socketpair per slot, QEMU's end and the switch's end.

Every VM gets ``LAN_SLOTS`` virtio-net devices (one device shape for cold boots,
templates and the warm pool). QEMU's ``socket`` netdev gets one end of a
``socketpair(AF_UNIX, SOCK_STREAM)`` per slot; the other end, the *switch end*, goes
to whoever launched the sandbox through a :data:`LanPortsHook` (the runtime hands
them to husk's switch, which lives in a layer above this one). With no hook the
sandbox keeps the switch ends and closes them when the VM stops: the LAN is unplugged.

A slot given a tap descriptor (``taps``: an engine's network namespace, see
husk.ociruntime.netns) has no socketpair and no switch end: QEMU gets the tap. Its
descriptor stays the caller's (never closed here).

The machine id the hook gets is the name of the VM's state directory (the container
id for the runtime's sandboxes): stable for the VM's whole life, daemon restarts
included.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable

from husk.errors import InvalidArgument
from husk.guest.netconfig import LAN_SLOTS

LanPortsHook = Callable[[str, dict[int, socket.socket]], Awaitable[None]]
"""Called once the VM runs with (machine id, {slot: switch end}).

The callee owns the sockets from the call on (it closes them, or passes them on);
if it raises, the sandbox start fails and the sockets it left open are closed."""

_DRAIN_CHUNK = 1 << 16


class LanPorts:
    """The socketpairs of one VM's LAN slots (slot 1 first)."""

    def __init__(self, slots: int = LAN_SLOTS, taps: dict[int, int] | None = None) -> None:
        self._vm_ends: dict[int, socket.socket] = {}
        self.switch_ends: dict[int, socket.socket] = {}
        """The switch ends still held here (none once handed over or closed)."""
        self.taps = dict(taps or {})
        for slot, fd in self.taps.items():
            if type(slot) is not int or not 1 <= slot <= slots:
                raise InvalidArgument(f"tap LAN slot {slot!r} is not a slot from 1 to {slots}")
            if type(fd) is not int or fd < 0:
                raise InvalidArgument(f"LAN slot {slot}: {fd!r} is not a tap descriptor")
        try:
            for slot in range(1, slots + 1):
                if slot in self.taps:
                    continue
                vm_end, switch_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self._vm_ends[slot], self.switch_ends[slot] = vm_end, switch_end
        except BaseException:
            self.close()
            raise

    def qemu_fds(self) -> tuple[int, ...]:
        """The descriptors QEMU inherits, slot 1 first (for ``MachineConfig.lan_fds``)."""
        slots = sorted({*self._vm_ends, *self.taps})
        return tuple(
            self.taps[slot] if slot in self.taps else self._vm_ends[slot].fileno() for slot in slots
        )

    def release_vm_ends(self) -> None:
        """Closes this process's copies of QEMU's ends (once QEMU holds its own).

        Until then a QEMU that failed could be replaced by another one (a cold boot
        after a failed restore) on the same descriptors.
        """
        for vm_end in self._vm_ends.values():
            vm_end.close()
        self._vm_ends.clear()

    def drain(self) -> None:
        """Discards whatever QEMUs wrote before the hand-over (a QEMU killed mid-frame
        would leave the stream out of step). The guest's LAN interfaces are down until
        the NETWORK message, so nothing of value is lost."""
        for switch_end in self.switch_ends.values():
            switch_end.setblocking(False)
            with contextlib.suppress(OSError):
                while switch_end.recv(_DRAIN_CHUNK):
                    pass
            switch_end.setblocking(True)

    async def hand_over(self, machine_id: str, hook: LanPortsHook | None) -> None:
        """Gives the switch ends to ``hook``; without one they stay here (unplugged)."""
        self.release_vm_ends()
        if hook is None:
            return
        self.drain()
        ends, self.switch_ends = self.switch_ends, {}
        try:
            await hook(machine_id, ends)
        except BaseException:
            for switch_end in ends.values():
                switch_end.close()
            raise

    def close(self) -> None:
        """Closes every end still held here (the VM is gone, or never started)."""
        self.release_vm_ends()
        for switch_end in self.switch_ends.values():
            switch_end.close()
        self.switch_ends.clear()
