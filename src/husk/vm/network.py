"""A VM's way out: QEMU's user-mode network inside a network namespace, slirp4netns beyond it.

QEMU 7.2's user-mode network (libslirp) forwards what the guest sends to
10.0.2.2 (in fact to every address of 10.0.2.0/24 but the DNS alias 10.0.2.3) to
127.0.0.1 *of the namespace QEMU runs in*, and offers no option to stop it
(libslirp's ``disable_host_loopback`` is not exposed). In the host's namespace
that is the host's loopback: the daemon's TCP API, registries, anything. So QEMU
runs in a network namespace of its own (:mod:`husk.vm.jail`), whose loopback is
empty, and the namespace's only way out is a ``tap0`` served by ``slirp4netns
--disable-host-loopback`` (libslirp again, this time with the mapping off)::

    guest 10.0.2.15 --virtio-net--> QEMU slirp (10.0.2.0/24, DNS alias 10.0.2.3)
        --sockets in the VM's netns--> tap0 10.0.3.100/24, default via 10.0.3.2
        --> slirp4netns (host namespace) --> sockets on the host

* the guest reaching 10.0.2.x (but .3) gets the VM namespace's loopback: nothing
  listens there, QEMU's sockets are all unix sockets it was handed;
* 10.0.3.2 and every other 10.0.3.x but the DNS alias are refused by slirp4netns;
* DNS: QEMU's slirp answers 10.0.2.3 by forwarding to the resolver named in the
  jail's /etc/resolv.conf, 10.0.3.3, which slirp4netns forwards to the host's
  resolver (its /etc/resolv.conf). A host resolver on a loopback address (e.g.
  systemd-resolved's 127.0.0.53) is reached that way and only that way: services
  bound to that one address are then reachable from guests, nothing on 127.0.0.1;
* every other destination leaves through slirp4netns's sockets, like before.

Published ports do not use any of this: they go through the agent's FORWARD
channels over virtio-serial. The guest's addresses (10.0.2.15/24, gateway
10.0.2.2, DNS 10.0.2.3) are unchanged, so templates stay valid: slirp has no
state in a template saved with no connection open.

slirp4netns runs in its own session with its own sandbox (``--enable-sandbox``:
a mount namespace, capabilities dropped; ``--enable-seccomp``), started in a mount
namespace whose mounts are all private (:func:`private_mounts_prefix`), joins the VM's
cgroup, and ends with its VM: it watches a pipe whose only write end QEMU holds
(``--exit-fd``), so QEMU's death ends it even when no daemon is there to see it.
Its pid and start time are recorded in machine.json as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from husk.errors import GuestError
from husk.guest.netconfig import EGRESS_CIDR, EGRESS_DNS
from husk.tools import find_tool
from husk.vm.processes import kill_if_same, process_start_ticks

SLIRP4NETNS = "slirp4netns"
TAP_DEVICE = "tap0"
MTU = 65520
READY_TIMEOUT = 10.0
KILL_TIMEOUT = 2.0
NETWORK_LOG = "network.log"

RESOLV_CONF = f"nameserver {EGRESS_DNS}\n".encode()
"""The jail's /etc/resolv.conf: where QEMU's slirp sends the guest's DNS queries."""


def slirp4netns_binary() -> str:
    found = find_tool(SLIRP4NETNS)
    if found is None:
        raise GuestError(
            f"{SLIRP4NETNS} not found on PATH: install the slirp4netns package "
            "(containers reach the network through it)"
        )
    return found


@dataclass
class Egress:
    """A running slirp4netns serving one VM's network namespace."""

    pid: int
    start_ticks: int | None
    popen: subprocess.Popen[bytes] | None = None
    ready_fd: int = -1

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_ticks": self.start_ticks}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Egress:
        return cls(int(data["pid"]), data.get("start_ticks"))

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Returns once tap0 is configured in the VM's namespace; GuestError otherwise."""
        fd, self.ready_fd = self.ready_fd, -1
        if fd < 0:
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            loop.remove_reader(fd)
            try:
                data = os.read(fd, 1)
            except OSError:
                data = b""
            if not ready.done():
                ready.set_result(data)

        loop.add_reader(fd, readable)
        try:
            data = await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            raise GuestError(
                f"{SLIRP4NETNS} did not configure the VM's network in {timeout:.0f}s"
            ) from None
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        if data != b"1":
            code = self.popen.poll() if self.popen is not None else None
            raise GuestError(f"{SLIRP4NETNS} failed to attach to the VM's network (status {code})")

    def stop(self) -> None:
        """Ends slirp4netns now (it also ends by itself when its QEMU does) and reaps it."""
        if self.ready_fd >= 0:
            os.close(self.ready_fd)
            self.ready_fd = -1
        if self.popen is not None:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(KILL_TIMEOUT)
            return
        kill_recorded(self.pid, self.start_ticks)

    def reap(self) -> bool:
        """True once slirp4netns has exited (and, if ours, been reaped)."""
        if self.popen is not None:
            return self.popen.poll() is not None
        return process_start_ticks(self.pid) != self.start_ticks


def private_mounts_prefix() -> list[str]:
    """What runs slirp4netns in a mount namespace of its own whose mounts are all private.

    slirp4netns's sandbox (1.2.0, as root) copies the mount namespace it starts in,
    makes only ``/`` private, pivots into a tmpfs and lazily unmounts the old root. A
    mount of the host that is *shared* (the docker engine makes its --data-root one)
    then propagates that unmount back: every overlay root file system dockerd has
    mounted under it vanishes from the host's namespace, including the one of a
    container ``husk-runtime create`` is about to read (issue 14's "executable file
    not found" race). Copies that are already private propagate nothing."""
    return [find_tool("unshare") or "unshare", "--mount", "--propagation", "private"]


def start(qemu_pid: int, exit_fd: int, log_path: Path, *, userns: bool) -> Egress:
    """Attaches slirp4netns to the network namespace of ``qemu_pid``.

    ``exit_fd`` is the read end of a pipe whose write end QEMU holds. Returns at
    once; :meth:`Egress.wait_ready` waits for tap0.
    """
    binary = slirp4netns_binary()
    ready_read, ready_write = os.pipe()
    command = [
        binary,
        "--configure",
        f"--mtu={MTU}",
        "--disable-host-loopback",
        f"--cidr={EGRESS_CIDR}",
        "--enable-seccomp",
        f"--ready-fd={ready_write}",
        f"--exit-fd={exit_fd}",
    ]
    if userns:
        # Without root, slirp4netns runs as the user; its sandbox needs root in the
        # namespace it runs in, which is the host's here. Seccomp still applies.
        command.append(f"--userns-path=/proc/{qemu_pid}/ns/user")
    else:
        command.append("--enable-sandbox")
        command[:0] = private_mounts_prefix()
    command += ["--netns-type=path", f"/proc/{qemu_pid}/ns/net", TAP_DEVICE]
    try:
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(ready_write, exit_fd),
                start_new_session=True,
            )
    except OSError as err:
        os.close(ready_read)
        raise GuestError(f"cannot start {binary}: {err}") from err
    finally:
        os.close(ready_write)
    return Egress(popen.pid, process_start_ticks(popen.pid), popen, ready_read)


def kill_recorded(pid: int, start_ticks: int | None) -> bool:
    """SIGKILLs a slirp4netns a previous daemon started, if it still runs (same start time)."""
    return kill_if_same(pid, start_ticks)


def wait_gone(egress: Egress, timeout: float = KILL_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not egress.reap():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
