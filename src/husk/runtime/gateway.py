"""The host's published ports, reachable from guests at the gateway (10.0.2.2).

QEMU's user-mode network hands what a guest sends to 10.0.2.2:PORT (the address husk
documents as the host's, ``host-gateway``) to 127.0.0.1:PORT of the network namespace
QEMU runs in, which is the VM's own and whose loopback is empty by design. For each
port a husk container of this daemon publishes over TCP, the daemon listens on
127.0.0.1:PORT inside every running VM's namespace, and relays each connection to
the published port on the host. Before relaying it checks again that the port is
still published (the host may have reused a port freed meanwhile); nothing else on
the host's loopback is ever reachable. Listeners follow the set of published ports
as containers start and stop.

The gateway address of each (non-internal) network a container is on leads to the same
listeners, as a Docker bridge's gateway leads to the host: the guest routes that address
through QEMU's user network, and the VM's namespace has it as a local address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from husk.runtime.lograte import LogLimiter
from husk.tools import find_tool

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
MAX_CONNECTIONS = 1024
"""Relayed connections at once, over all VMs (each holds three of the daemon's
descriptors: the guest's, the host's and the published port's accepted one)."""
MAX_CONNECTIONS_PER_VM = 64
"""Relayed connections of one VM at once: a guest that opens and holds connections takes
its own share only, never every other VM's (the whole budget was shared first come)."""
_CONNECT_TIMEOUT = 10.0
_libc = ctypes.CDLL(None, use_errno=True)


def _netns_socket(
    netns_fd: int, family: int, kind: int, proto: int = 0, userns_fd: int | None = None
) -> socket.socket:
    """A new socket of the network namespace ``netns_fd`` (it stays there wherever used).

    As root: made by a thread that enters the namespace and ends right after (setns
    changes only the calling thread), so the daemon's other threads never leave the
    host's namespace. Without root (``userns_fd``: the VM's user namespace, which owns
    its network namespace) a process may enter it only by joining that user namespace
    first, which a multi-threaded process cannot: a short-lived helper (nsenter, then
    Python) makes the socket there and passes it back. A socket keeps the rights of the
    credentials that made it, so the daemon can then bind it and, for netlink, change
    addresses in that namespace.
    """
    if userns_fd is not None:
        return _socket_from_helper(netns_fd, userns_fd, family, kind, proto)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            if _libc.setns(netns_fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            outcome["sock"] = socket.socket(family, kind, proto)
        except OSError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="husk-gateway-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    sock: socket.socket = outcome["sock"]
    return sock


_HELPER = (
    "import socket, sys\n"
    "channel = socket.socket(fileno=int(sys.argv[1]))\n"
    "made = socket.socket(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))\n"
    "socket.send_fds(channel, [b'1'], [made.fileno()])\n"
)
_HELPER_TIMEOUT = 10.0


def _socket_from_helper(
    netns_fd: int, userns_fd: int, family: int, kind: int, proto: int
) -> socket.socket:
    nsenter = find_tool("nsenter")
    if nsenter is None:
        raise OSError(errno.ENOENT, "nsenter is not installed (util-linux)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        argv = [
            nsenter,
            f"--user=/proc/self/fd/{userns_fd}",
            f"--net=/proc/self/fd/{netns_fd}",
            "--preserve-credentials",
            "--",
            sys.executable, "-I", "-S", "-c", _HELPER,
            str(theirs.fileno()), str(family), str(kind), str(proto),
        ]  # fmt: skip
        done = subprocess.run(
            argv,
            pass_fds=(userns_fd, netns_fd, theirs.fileno()),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
        theirs.close()
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            raise OSError(errno.EPERM, lines[-1] if lines else f"nsenter: exit {done.returncode}")
        ours.settimeout(_HELPER_TIMEOUT)
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
    except subprocess.TimeoutExpired:
        raise OSError(errno.ETIMEDOUT, "the namespace helper did not answer") from None
    finally:
        theirs.close()
        ours.close()
    if not fds:
        raise OSError(errno.EPROTO, "the namespace helper passed no socket")
    return socket.socket(fileno=fds[0])


def _listen_in_netns(
    netns_fd: int, port: int, kind: int = socket.SOCK_STREAM, userns_fd: int | None = None
) -> socket.socket:
    """A TCP socket listening (or a UDP one bound) on 127.0.0.1:``port`` of ``netns_fd``."""
    sock = _netns_socket(netns_fd, socket.AF_INET, kind, 0, userns_fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # TCP: every local address of the namespace, which holds only its
        # loopback and the gateway addresses of the VM's networks (add_local).
        sock.bind(("0.0.0.0" if kind == socket.SOCK_STREAM else "127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


_NLMSG_ERROR = 2
_RTM_NEWADDR = 20
_NLM_F_REQUEST_ACK_CREATE = 0x1 | 0x4 | 0x400
_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def _new_address_message(index: int, address: str, seq: int) -> bytes:
    """rtnetlink RTM_NEWADDR: ``address``/32 on interface ``index``."""
    packed = socket.inet_aton(address)
    body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, index)
    for kind in (_IFA_LOCAL, _IFA_ADDRESS):
        body += struct.pack("=HH", 8, kind) + packed
    return (
        struct.pack("=IHHII", 16 + len(body), _RTM_NEWADDR, _NLM_F_REQUEST_ACK_CREATE, seq, 0)
        + body
    )


LOOPBACK_INDEX = 1
"""The loopback's interface index, the same in every network namespace (the kernel's)."""


def _add_local_addresses(netns_fd: int, addresses: list[str], userns_fd: int | None = None) -> None:
    """Gives the loopback of ``netns_fd`` each of ``addresses`` (/32; present ones kept),
    through a netlink socket of that namespace (:func:`_netns_socket`)."""
    nl = _netns_socket(
        netns_fd, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE, userns_fd
    )
    with nl:
        nl.settimeout(5.0)
        for seq, address in enumerate(addresses, start=1):
            nl.send(_new_address_message(LOOPBACK_INDEX, address, seq))
            reply = nl.recv(4096)
            kind = struct.unpack_from("=H", reply, 4)[0] if len(reply) >= 16 else -1
            code = struct.unpack_from("=i", reply, 16)[0] if len(reply) >= 20 else -1
            if kind != _NLMSG_ERROR or code not in (0, -errno.EEXIST):
                raise OSError(-code, f"cannot add {address}: {os.strerror(-code)}")


def _host_address(host_ip: str) -> str:
    """Where on the host a published port answers (a wildcard answers on loopback)."""
    if host_ip in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host_ip == "::":
        return "::1"
    return host_ip


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        pass


class _Member:
    """One VM's network namespace, opened once by descriptor, and its listeners."""

    def __init__(self, netns_fd: int, userns_fd: int | None = None) -> None:
        self.netns_fd = netns_fd
        self.userns_fd = userns_fd
        """The VM's user namespace when the daemon is not root (see _netns_socket)."""
        self.servers: dict[int, asyncio.AbstractServer] = {}
        self.udp_relays: list[UdpRelay] = []
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS_PER_VM)
        self.unanswered = LogLimiter(log)
        """The guest decides how often its connections find no host listener."""


class Gateway:
    """The published ports of one daemon, offered to its VMs at the gateway address."""

    def __init__(self) -> None:
        self._published: dict[object, dict[int, str]] = {}  # owner -> port -> host ip
        self._members: dict[str, _Member] = {}  # by container id
        self._lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._connections: set[asyncio.Task[None]] = set()

    # -- what is published ----------------------------------------------------
    def published_ports(self) -> dict[int, str]:
        ports: dict[int, str] = {}
        for owned in self._published.values():
            ports.update(owned)
        return ports

    async def publish(self, owner: object, port: int, host_ip: str) -> None:
        self._published.setdefault(owner, {})[port] = host_ip
        await self._sync()

    async def unpublish(self, owner: object) -> None:
        if self._published.pop(owner, None):
            await self._sync()

    # -- which VMs see them ---------------------------------------------------
    async def join(self, container_id: str, vm_pid: int) -> None:
        """The VM whose QEMU is ``vm_pid`` gets listeners for every published port.

        Called before the workload starts, so it finds them from its first instruction.
        """
        userns_fd: int | None = None
        try:
            netns_fd = os.open(f"/proc/{vm_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            if os.geteuid() != 0:  # rootless: its namespaces are reached through its user ns
                try:
                    userns_fd = os.open(f"/proc/{vm_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    os.close(netns_fd)
                    raise
        except OSError as exc:
            log.warning("gateway: cannot open the network namespace of VM %d: %s", vm_pid, exc)
            return
        if os.stat(f"/proc/{vm_pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
            os.close(netns_fd)  # no jail (debugging): the VM already shares the host's loopback
            if userns_fd is not None:
                os.close(userns_fd)
            return
        async with self._lock:
            old = self._members.pop(container_id, None)
            if old is not None:
                self._close_member(old)
            self._members[container_id] = _Member(netns_fd, userns_fd)
        await self._sync()

    async def add_local(self, container_id: str, addresses: list[str]) -> None:
        """The VM's networks' gateway addresses become local in its namespace: what the
        guest sends there (routed through QEMU's user network) reaches these listeners,
        so a network's gateway is the host, as on Docker's bridge."""
        member = self._members.get(container_id)
        if member is None or not addresses:
            return
        try:
            await asyncio.to_thread(
                _add_local_addresses, member.netns_fd, addresses, member.userns_fd
            )
        except OSError as exc:
            log.warning("gateway: the VM of %s has no network gateway: %s", container_id[:12], exc)

    def is_member(self, container_id: str) -> bool:
        return container_id in self._members

    async def leave(self, container_id: str) -> None:
        async with self._lock:  # never while _sync opens listeners with its descriptor
            member = self._members.pop(container_id, None)
            if member is not None:
                self._close_member(member)

    async def close(self) -> None:
        for owner in list(self._members):
            await self.leave(owner)
        for task in list(self._connections):
            task.cancel()

    # -- listeners --------------------------------------------------------------
    async def _sync(self) -> None:
        async with self._lock:
            wanted = set(self.published_ports())
            for member in list(self._members.values()):
                for port in set(member.servers) - wanted:
                    server = member.servers.pop(port)
                    server.close()
                for port in wanted - set(member.servers):
                    await self._listen(member, port)

    async def _listen(self, member: _Member, port: int) -> None:
        try:
            sock = await asyncio.to_thread(
                _listen_in_netns, member.netns_fd, port, socket.SOCK_STREAM, member.userns_fd
            )
        except OSError as exc:
            log.warning("gateway: cannot listen for port %d in a VM's namespace: %s", port, exc)
            return
        member.servers[port] = await asyncio.start_server(
            lambda r, w: self._relay(member, port, r, w), sock=sock
        )

    @staticmethod
    def _close_member(member: _Member) -> None:
        for server in member.servers.values():
            server.close()
        member.servers.clear()
        for relay in member.udp_relays:
            relay.close()
        member.udp_relays.clear()
        os.close(member.netns_fd)
        if member.userns_fd is not None:
            os.close(member.userns_fd)

    # -- UDP relays to host endpoints (the WireGuard overlay's peers) -----------------
    async def relay_udp(
        self, container_id: str, target: tuple[str, int], port: int | None = None
    ) -> int:
        """A port of the gateway whose datagrams from the VM go to ``target`` on the host.

        The guest sends to 10.0.2.2:PORT (the port returned); replies from ``target`` come
        back to it from there. The port is ``port`` if given (a restarted daemon restores a
        relay the guest already uses), else ``target``'s own when free in the namespace.
        A VM without a namespace of its own (no jail) reaches the host's loopback itself:
        the target's port is returned as it is. Relays end when the VM leaves.
        """
        async with self._lock:
            member = self._members.get(container_id)
            if member is None:
                return target[1]
            try:
                sock = await asyncio.to_thread(
                    _listen_in_netns,
                    member.netns_fd,
                    port or target[1],
                    socket.SOCK_DGRAM,
                    member.userns_fd,
                )
            except OSError:
                if port is not None:
                    raise
                sock = await asyncio.to_thread(
                    _listen_in_netns, member.netns_fd, 0, socket.SOCK_DGRAM, member.userns_fd
                )
            relay = UdpRelay(sock, target)
            member.udp_relays.append(relay)
            bound: int = sock.getsockname()[1]
            return bound

    async def drop_udp_relays(self, container_id: str) -> None:
        async with self._lock:
            member = self._members.get(container_id)
            if member is not None:
                for relay in member.udp_relays:
                    relay.close()
                member.udp_relays.clear()

    async def _relay(
        self,
        member: _Member,
        port: int,
        guest_reader: asyncio.StreamReader,
        guest_writer: asyncio.StreamWriter,
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            host_ip = self.published_ports().get(port)  # checked again for each connection
            if host_ip is None or self._slots.locked() or member.slots.locked():
                return
            async with self._slots, member.slots:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(_host_address(host_ip), port), _CONNECT_TIMEOUT
                    )
                except (OSError, TimeoutError) as exc:
                    member.unanswered.info(
                        "gateway: port %d did not answer on the host: %s", port, exc
                    )
                    return
                try:
                    await asyncio.gather(_pump(guest_reader, writer), _pump(reader, guest_writer))
                finally:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
        finally:
            guest_writer.close()
            with contextlib.suppress(Exception):
                await guest_writer.wait_closed()
            if task is not None:
                self._connections.discard(task)


MAX_DATAGRAM = 65535
MAX_UDP_FLOWS = 64
"""Guest sockets one relay serves at once; a new one beyond it is dropped."""
UDP_IDLE_TIMEOUT = 180.0
"""A flow nobody used for this long is closed (WireGuard re-handshakes every 2 minutes)."""
_SWEEP_INTERVAL = 10.0


class _UdpFlow:
    """One guest socket's traffic to the target: a host socket connected to it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        try:
            self.sock.connect(target)
        except OSError:
            self.sock.close()
            raise
        self.last_used = time.monotonic()


class UdpRelay:
    """Datagrams from a VM's namespace (``sock``, bound there) to ``target`` on the host.

    Each guest source address is one flow with its own host socket, so replies find
    their way back. Bounded: datagrams up to MAX_DATAGRAM, MAX_UDP_FLOWS flows, idle
    flows closed after UDP_IDLE_TIMEOUT. Nothing ever blocks: a datagram that cannot be
    sent at once is dropped, as a network would.
    """

    def __init__(self, sock: socket.socket, target: tuple[str, int]) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self.target = target
        self._flows: dict[tuple[str, int], _UdpFlow] = {}
        self._failures = LogLimiter(log)
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._from_guest)
        self._sweeper = self._loop.call_later(_SWEEP_INTERVAL, self._sweep)

    @property
    def flows(self) -> int:
        return len(self._flows)

    def _from_guest(self) -> None:
        for _ in range(64):  # a bounded batch, then the loop's other work
            try:
                data, source = self._sock.recvfrom(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued on the socket: not a datagram
            if len(data) > MAX_DATAGRAM:
                continue
            flow = self._flows.get(source)
            if flow is None:
                if len(self._flows) >= MAX_UDP_FLOWS:
                    continue
                try:
                    flow = _UdpFlow(self.target)
                except OSError as exc:
                    self._failures.info("gateway: cannot relay UDP to %s:%d: %s", *self.target, exc)
                    continue
                self._flows[source] = flow
                self._loop.add_reader(flow.sock.fileno(), self._from_host, source, flow)
            flow.last_used = time.monotonic()
            with contextlib.suppress(OSError):  # refused or full: dropped
                flow.sock.send(data)

    def _from_host(self, source: tuple[str, int], flow: _UdpFlow) -> None:
        for _ in range(64):
            try:
                data = flow.sock.recv(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. ECONNREFUSED: nothing listens at the target (yet)
            if len(data) > MAX_DATAGRAM:
                continue
            flow.last_used = time.monotonic()
            with contextlib.suppress(OSError):
                self._sock.sendto(data, source)

    def _sweep(self) -> None:
        idle_since = time.monotonic() - UDP_IDLE_TIMEOUT
        for source, flow in list(self._flows.items()):
            if flow.last_used < idle_since:
                self._close_flow(source)
        self._sweeper = self._loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def _close_flow(self, source: tuple[str, int]) -> None:
        flow = self._flows.pop(source)
        self._loop.remove_reader(flow.sock.fileno())
        flow.sock.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sweeper.cancel()
        for source in list(self._flows):
            self._close_flow(source)
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
