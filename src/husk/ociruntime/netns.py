"""A husk VM joins an engine's network namespace, as Kata does.

An engine (CNI, netavark, docker's libnetwork) hands its runtime a network namespace with
interfaces already set up: a veth end with the container's MAC, address and routes, with
the engine's port publishing and networks behind it. :func:`attach` keeps all of that and
puts the VM on it: inside the namespace, for each interface but ``lo`` (at most
``LAN_SLOTS``), it creates a tap device and redirects every frame both ways between the
two with tc (an ``ingress`` qdisc and a match-all ``u32`` filter whose action is
``mirred egress redirect``). The namespace's own stack no longer sees the interface's
traffic; the guest does, through QEMU's ``tap`` netdev on the tap's descriptor, with the
engine interface's MAC, IPv4 address, MTU and routes (the NETWORK body :func:`attach`
returns). The engine's side of the veth (its bridge, its NAT rules) is untouched.

Everything in the namespace happens in a thread made for it, which ``setns`` moves there
and which ends right after: this process's other threads, and the host's own namespace,
are never touched. The ``ip`` and ``tc`` commands (iproute2) it runs are forked from that
thread and so run in the namespace too. Their JSON output is the engine's, so it is read
as hostile input: every field is checked, and the NETWORK body is checked again by
:func:`husk.guest.netstate.check` before it is returned.

Limits (docs/OCI_RUNTIME.md): IPv4 only (an interface's IPv6 addresses are not given to
the guest, which keeps IPv6 off its LAN interfaces); one IPv4 address per interface;
at most ``LAN_SLOTS`` interfaces; routes of the main table through the attached
interfaces (others, such as routes through ``lo``, stay with the namespace). Root only.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from husk.errors import CreateFailed, InvalidArgument, NotSupported
from husk.guest import netstate
from husk.guest.netconfig import LAN_SLOTS

log = logging.getLogger(__name__)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703
TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
"""No IFF_VNET_HDR: QEMU then offers the guest the same virtio-net features as on the LAN
socketpair, so a VM restored from a boot template (booted on a socketpair) keeps working."""
TAP_PREFIX = "husktap"
"""The taps' names: ``husktap0``, ``husktap1``, … (the kernel picks the first free)."""
INGRESS = "ffff:"
COMMAND_TIMEOUT = 10.0
MAX_OUTPUT = 4 * 1024 * 1024
MAX_ROUTES = netstate.MAX_LAN_ROUTES
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,14}")
"""What an engine names interfaces; never an option to ``ip``/``tc`` (no leading dash)."""
_IFNAMSIZ = 16
_libc = ctypes.CDLL(None, use_errno=True)


# -- what the namespace holds (pure: parsed from ``ip -json`` output) ----------------------
@dataclass(frozen=True)
class Interface:
    """An engine interface the VM takes over: its name there and what the guest copies."""

    name: str
    mac: str
    mtu: int
    address: str
    """Its IPv4 address with the prefix length, e.g. ``10.88.0.2/24``."""
    routes: list[dict[str, Any]] = field(default_factory=list)
    """``{"destination": "a.b.c.d/n", "gateway": "a.b.c.d" | None}``, link routes first."""


def _interface_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _IFNAME.fullmatch(value):
        raise CreateFailed(f"{what}: {value!r} is not an interface name")
    return value


def parse_interfaces(links: Any) -> list[Interface]:
    """The interfaces the VM takes over, from ``ip -json address show``.

    Every interface but ``lo`` whose link type is Ethernet (tunnel devices the kernel
    makes in each namespace, such as ``tunl0``, are not the engine's) and that is not
    one of husk's taps. NotSupported when one cannot be carried (no IPv4 address, more
    than one, too many interfaces).
    """
    if not isinstance(links, list):
        raise CreateFailed("ip address show: the output is not a list")
    found: list[Interface] = []
    for entry in links:
        if not isinstance(entry, dict):
            raise CreateFailed("ip address show: an entry is not an object")
        name = _interface_name(entry.get("ifname"), "ip address show")
        if name == "lo" or name.startswith(TAP_PREFIX) or entry.get("link_type") != "ether":
            continue
        try:
            mac = netstate.check_mac(entry.get("address"), f"the MAC of {name}")
        except ValueError as exc:
            raise CreateFailed(str(exc)) from None
        mtu = entry.get("mtu")
        if type(mtu) is not int or not netstate.MIN_MTU <= mtu <= netstate.MAX_MTU:
            raise CreateFailed(f"the MTU of {name} ({mtu!r}) is out of range")
        found.append(Interface(name, mac, mtu, _ipv4_address(name, entry.get("addr_info"))))
    if len(found) > LAN_SLOTS:
        names = ", ".join(interface.name for interface in found)
        raise NotSupported(
            f"the network namespace has {len(found)} interfaces ({names}); "
            f"a husk VM takes at most {LAN_SLOTS}"
        )
    return found


def _ipv4_address(name: str, info: Any) -> str:
    if not isinstance(info, list):
        raise CreateFailed(f"ip address show: the addresses of {name} are not a list")
    ipv4: list[str] = []
    ipv6: list[str] = []
    for item in info:
        if not isinstance(item, dict):
            raise CreateFailed(f"ip address show: an address of {name} is not an object")
        local, prefix = item.get("local"), item.get("prefixlen")
        if item.get("family") == "inet":
            try:
                interface = ipaddress.IPv4Interface(f"{local}/{prefix}")
            except (ValueError, TypeError):
                raise CreateFailed(f"{name} has a bad IPv4 address {local!r}/{prefix!r}") from None
            if type(prefix) is not int or not isinstance(local, str):
                raise CreateFailed(f"{name} has a bad IPv4 address {local!r}/{prefix!r}")
            ipv4.append(str(interface))
        elif item.get("family") == "inet6" and item.get("scope") != "link":
            ipv6.append(f"{local}/{prefix}")
    if ipv6:
        # Not an error: dual-stack networks are common and IPv4 still works.
        log.warning("%s: IPv6 addresses %s are not carried into the VM", name, ", ".join(ipv6))
    if not ipv4:
        raise NotSupported(f"interface {name} has no IPv4 address (IPv6 only is not supported)")
    if len(ipv4) > 1:
        raise NotSupported(
            f"interface {name} has {len(ipv4)} IPv4 addresses ({', '.join(ipv4)}); "
            "a husk VM carries one per interface"
        )
    return ipv4[0]


def parse_routes(routes: Any, interfaces: list[Interface]) -> list[Interface]:
    """``interfaces`` with their routes from ``ip -json -4 route show table main``.

    The kernel's own routes for an address (``proto kernel``) are left out: the guest
    makes them when it takes the address. Routes through other devices stay with the
    namespace. Of two routes to one destination through one interface the first (the
    kernel lists the lowest metric first) is kept.
    """
    if not isinstance(routes, list):
        raise CreateFailed("ip route show: the output is not a list")
    by_name: dict[str, list[dict[str, Any]]] = {interface.name: [] for interface in interfaces}
    for entry in routes:
        if not isinstance(entry, dict):
            raise CreateFailed("ip route show: an entry is not an object")
        if "nexthops" in entry:
            raise NotSupported(f"multipath route {entry.get('dst')!r} is not supported")
        device = entry.get("dev")
        if device not in by_name or entry.get("type", "unicast") != "unicast":
            continue
        if entry.get("protocol") == "kernel" and entry.get("scope") == "link":
            continue
        route = _route(entry)
        listed = by_name[device]
        if all(other["destination"] != route["destination"] for other in listed):
            listed.append(route)
    result = []
    for interface in interfaces:
        listed = by_name[interface.name]
        if len(listed) > MAX_ROUTES:
            raise NotSupported(
                f"{interface.name} has {len(listed)} routes; a husk VM carries {MAX_ROUTES}"
            )
        # Link routes first: a gateway must be reachable when its route is added.
        ordered = sorted(listed, key=lambda route: route["gateway"] is not None)
        result.append(
            Interface(interface.name, interface.mac, interface.mtu, interface.address, ordered)
        )
    return result


def _route(entry: dict[str, Any]) -> dict[str, Any]:
    destination = entry.get("dst")
    text = "0.0.0.0/0" if destination == "default" else destination
    try:
        network = ipaddress.IPv4Network(text, strict=True)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise CreateFailed(f"ip route show: {destination!r} is not an IPv4 destination") from None
    gateway = entry.get("gateway")
    if gateway is not None:
        try:
            gateway = str(ipaddress.IPv4Address(gateway))
        except (ValueError, TypeError):
            raise CreateFailed(f"ip route show: gateway {gateway!r} is not IPv4") from None
    return {"destination": str(network), "gateway": gateway}


def network_body(interfaces: list[Interface]) -> dict[str, Any]:
    """The guest's NETWORK body: slot N+1 is ``interfaces[N]``; no egress, no names.

    Checked by :func:`husk.guest.netstate.check` (the guest checks it again);
    CreateFailed names what the namespace holds that the guest would refuse.
    """
    body = {
        "egress": False,
        "lans": [
            {
                "slot": slot,
                "mac": interface.mac,
                "address": interface.address,
                "mtu": interface.mtu,
                "routes": interface.routes,
            }
            for slot, interface in enumerate(interfaces, start=1)
        ],
        "unreachable": [],
        "names": None,
        "dns": {},
        "hosts": None,
    }
    try:
        return netstate.check(body)
    except ValueError as exc:
        raise CreateFailed(f"the network namespace cannot be carried into the VM: {exc}") from None


# -- doing things inside the namespace --------------------------------------------------
def _same_file(first: os.stat_result, second: os.stat_result) -> bool:
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def _in_namespace(netns_fd: int, work: Callable[[], T]) -> T:
    """``work()`` run by a thread that entered ``netns_fd`` and ends afterwards."""
    outcome: dict[str, Any] = {}
    target = os.fstat(netns_fd)

    def run() -> None:
        try:
            if _libc.setns(netns_fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            # Never go on anywhere else (above all, in the host's namespace).
            if not _same_file(os.stat("/proc/thread-self/ns/net"), target):
                raise OSError("setns did not enter the network namespace")
            outcome["value"] = work()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="husk-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, OSError):
            raise CreateFailed(f"in the network namespace: {error}") from error
        raise error
    value: T = outcome["value"]
    return value


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (path for path in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(path, os.X_OK)),
        None,
    )
    if found is None:
        raise NotSupported(f"joining a network namespace needs iproute2's {name!r} command")
    return found


def _run(argv: list[str]) -> str:
    """Runs an ``ip``/``tc`` command (in the calling thread's namespace); its stdout."""
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CreateFailed(f"{' '.join(argv[1:])}: no answer in {COMMAND_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        raise CreateFailed(f"{' '.join(argv[1:])}: {why[0] if why else done.returncode}")
    if len(done.stdout) > MAX_OUTPUT:
        raise CreateFailed(f"{' '.join(argv[1:])}: more than {MAX_OUTPUT} bytes of output")
    return done.stdout.decode(errors="replace")


def _json(argv: list[str]) -> Any:
    text = _run(argv)
    try:
        return json.loads(text) if text.strip() else []
    except ValueError:
        raise CreateFailed(f"{' '.join(argv[1:])}: the output is not JSON") from None


def _open_tap() -> tuple[int, str]:
    """A new tap device in the calling thread's namespace: (descriptor, name).

    Not persistent: it goes when the last descriptor (this one, QEMU's) closes.
    """
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        request = struct.pack("16sH22x", f"{TAP_PREFIX}%d".encode(), IFF_TAP | IFF_NO_PI)
        reply = fcntl.ioctl(fd, TUNSETIFF, request)
    except BaseException:
        os.close(fd)
        raise
    return fd, reply[:_IFNAMSIZ].split(b"\0", 1)[0].decode()


def _redirect(tc: str, source: str, target: str) -> None:
    """Every frame ``source`` receives leaves through ``target`` instead (its ingress
    qdisc exists: an engine's own one is never replaced, adding ours fails then)."""
    where = ["dev", source, "parent", INGRESS, "protocol", "all", "prio", "1"]
    match_all = ["u32", "match", "u8", "0", "0"]
    action = ["action", "mirred", "egress", "redirect", "dev", target]
    _run([tc, "filter", "add", *where, *match_all, *action])


def _add_ingress(tc: str, interface: str) -> None:
    """An ingress qdisc on the engine's ``interface``, which must have none yet."""
    qdiscs = _json([tc, "-json", "qdisc", "show", "dev", interface])
    if any(isinstance(q, dict) and q.get("kind") in ("ingress", "clsact") for q in qdiscs):
        raise NotSupported(
            f"interface {interface} already has an ingress qdisc (the engine's traffic "
            "control): husk does not replace it"
        )
    _run([tc, "qdisc", "add", "dev", interface, "ingress"])


@dataclass
class _Plumbing:
    interface: str
    tap: str
    ingress: bool = False
    """The engine interface's ingress qdisc is husk's (to remove)."""


def _remove(ip: str, tc: str, plumbing: list[_Plumbing]) -> None:
    """Removes husk's taps and the engine interfaces' ingress qdiscs (best effort).

    A filter whose tap is gone would drop the interface's traffic: the qdisc goes
    with its filters, explicitly.
    """
    for item in plumbing:
        commands = [[ip, "link", "del", "dev", item.tap]]
        if item.ingress:
            commands.insert(0, [tc, "qdisc", "del", "dev", item.interface, "ingress"])
        for argv in commands:
            try:
                _run(argv)
            except CreateFailed as exc:
                log.debug("netns cleanup: %s", exc)


# -- the seam -------------------------------------------------------------------------
class NetnsAttachment:
    """A VM's hold on an engine's network namespace (see :func:`attach`)."""

    def __init__(
        self,
        netns_fd: int,
        taps: dict[int, int],
        network: dict[str, Any],
        plumbing: list[_Plumbing],
    ) -> None:
        self.taps = taps
        """LAN slot → tap descriptor (QEMU's end: ``SandboxConfig.lan_taps``)."""
        self.network = network
        """The guest's NETWORK body (``AgentClient.configure_network``)."""
        self.interfaces = {slot: item.interface for slot, item in enumerate(plumbing, start=1)}
        """LAN slot → the engine's interface name in the namespace."""
        self._netns_fd = netns_fd
        self._plumbing = plumbing
        self._lock = threading.Lock()

    def close(self) -> None:
        """Removes the taps and filters and lets go of the namespace; idempotent.

        The engine's interface gets its traffic back (its address and routes never left).
        """
        with self._lock:
            if self._netns_fd < 0:
                return
            try:
                ip, tc = _tool("ip"), _tool("tc")
                _in_namespace(self._netns_fd, lambda: _remove(ip, tc, self._plumbing))
            except Exception as exc:  # closing must not fail: the descriptors still go
                log.warning("cleaning up the network namespace failed: %s", exc)
            finally:
                for fd in self.taps.values():
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self.taps = {}
                os.close(self._netns_fd)
                self._netns_fd = -1

    def __enter__(self) -> NetnsAttachment:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _open_namespace(path: str, *, made_by_this_process: bool = False) -> int:
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidArgument(f"network namespace path {path!r} is not a path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(f"network namespace {path}: {exc.strerror}") from None
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = -1
        if kind != CLONE_NEWNET:
            raise InvalidArgument(f"{path} is not a network namespace")
        # The keeper's own namespace is the container's when the keeper made it (it left
        # the host's for it); init's is the host's whoever asks.
        own = [] if made_by_this_process else [os.stat("/proc/self/ns/net")]
        with contextlib.suppress(OSError):  # init's may be out of sight (in a container)
            own.append(os.stat("/proc/1/ns/net"))
        if any(_same_file(os.fstat(fd), host) for host in own):
            # Redirecting the host's interfaces into a VM would cut the host off.
            raise InvalidArgument(f"{path} is the host's own network namespace")
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach(path: str, *, made_by_this_process: bool = False) -> NetnsAttachment | None:
    """Puts a VM-to-be on the interfaces of the network namespace at ``path``.

    None when the namespace has no interface but ``lo`` (the VM gets loopback only).
    InvalidArgument for a path that is no network namespace (or the host's own),
    NotSupported for what cannot be carried (see the module's limits, and without
    root), CreateFailed when the plumbing fails; nothing is left behind then.
    ``made_by_this_process``: ``path`` is the namespace this process moved into for the
    container (husk-runtime's keeper, when the bundle asks for a new one).
    """
    if os.geteuid() != 0:
        raise NotSupported("joining an engine's network namespace needs root")
    ip, tc = _tool("ip"), _tool("tc")
    netns_fd = _open_namespace(path, made_by_this_process=made_by_this_process)

    def plumb() -> tuple[dict[int, int], dict[str, Any], list[_Plumbing]] | None:
        interfaces = parse_interfaces(_json([ip, "-json", "address", "show"]))
        if not interfaces:
            return None
        routes = _json([ip, "-json", "-4", "route", "show", "table", "main"])
        body = network_body(parse_routes(routes, interfaces))
        taps: dict[int, int] = {}
        plumbing: list[_Plumbing] = []
        try:
            for slot, interface in enumerate(interfaces, start=1):
                fd, tap = _open_tap()
                taps[slot] = fd
                plumbing.append(_Plumbing(interface.name, tap))
                _run([ip, "link", "set", "dev", tap, "mtu", str(interface.mtu), "up"])
                _run([tc, "qdisc", "add", "dev", tap, "ingress"])
                _redirect(tc, tap, interface.name)
                _add_ingress(tc, interface.name)
                plumbing[-1].ingress = True
                _redirect(tc, interface.name, tap)
        except BaseException:
            _remove(ip, tc, plumbing)
            for fd in taps.values():
                os.close(fd)
            raise
        return taps, body, plumbing

    try:
        result = _in_namespace(netns_fd, plumb)
    except BaseException:
        os.close(netns_fd)
        raise
    if result is None:
        os.close(netns_fd)
        return None
    taps, body, plumbing = result
    return NetnsAttachment(netns_fd, taps, body, plumbing)
