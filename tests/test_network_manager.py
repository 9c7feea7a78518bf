"""NetworkManager's rules without a daemon: members are an in-memory book, VMs a recorder."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from husk.errors import Conflict, InvalidArgument, NotFound, NotSupported
from husk.network.manager import NetworkManager
from husk.network.model import Endpoint, Forbidden, Member, Network
from husk.network.store import NetworkStore
from husk.spec import NetworkRequest

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Book:
    """The Members protocol over a dict; saves can be made to fail."""

    def __init__(self) -> None:
        self.by_id: dict[str, Member] = {}

    def add(self, member: Member) -> Member:
        self.by_id[member.id] = member
        return member

    def members(self) -> list[Member]:
        return [
            Member(**{**m.__dict__, "endpoints": dict(m.endpoints)}) for m in self.by_id.values()
        ]

    def member(self, ref: str) -> Member:
        for m in self.by_id.values():
            if ref in (m.id, m.name) or m.id.startswith(ref):
                return Member(**{**m.__dict__, "endpoints": dict(m.endpoints)})
        raise NotFound(f"No such container: {ref}")

    def save_endpoints(self, container_id: str, endpoints: dict[str, Endpoint]) -> None:
        self.by_id[container_id].endpoints = dict(endpoints)


class Recorder:
    def __init__(self, fail_join: bool = False) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail_join = fail_join

    async def container_joined(
        self, container_id: str, network: Network, endpoint: Endpoint
    ) -> None:
        self.calls.append(("joined", container_id[:1], network.name, endpoint.address))
        if self.fail_join:
            raise RuntimeError("the guest said no")

    async def container_left(self, container_id: str, network: Network, endpoint: Endpoint) -> None:
        self.calls.append(("left", container_id[:1], network.name, endpoint.address))

    async def network_removed(self, network: Network) -> None:
        self.calls.append(("removed", network.name))


def _manager(
    tmp_path: Path, live: Recorder | None = None
) -> tuple[NetworkManager, Book, list[tuple[str, str, dict[str, str]]]]:
    events: list[tuple[str, str, dict[str, str]]] = []
    book = Book()

    def event(action: str, network: Network, **attributes: str) -> None:
        events.append((action, network.name, attributes))

    manager = NetworkManager(NetworkStore(tmp_path), book, live=live, event=event)
    return manager, book, events


async def _create_member(
    manager: NetworkManager,
    book: Book,
    cid: str,
    name: str,
    *requests: NetworkRequest,
    mode: str = "",
    **extra: Any,
) -> Member:
    member = Member(id=cid * 64, name=name, network_mode=mode, **extra)
    member.endpoints = await manager.allocate(member, list(requests))
    book.add(member)
    manager.settle(member.id)
    return member


def test_create_list_get_and_remove_networks(tmp_path: Path) -> None:
    manager, _book, events = _manager(tmp_path)

    async def body() -> None:
        web = await manager.create("web", labels={"a": "b"})
        assert (web.subnet, web.gateway, web.driver) == ("172.18.0.0/16", "172.18.0.1", "bridge")
        own = await manager.create(
            "own", subnet="10.20.0.0/24", gateway="10.20.0.254", internal=True
        )
        assert own.subnet_configured and own.internal and own.gateway == "10.20.0.254"
        assert [n.name for n in manager.list()] == ["bridge", "host", "none", "web", "own"]
        assert manager.get("web") is web and manager.get(web.id[:5]) is web
        with pytest.raises(NotFound, match="network nope not found"):
            manager.get("nope")
        with pytest.raises(Conflict, match="network with name web already exists"):
            await manager.create("web")
        with pytest.raises(Conflict, match=re.escape("overlaps 172.18.0.0/16 of network web")):
            await manager.create("clash", subnet="172.18.4.0/24")
        with pytest.raises(InvalidArgument, match="not in subnet"):
            await manager.create("badgw", subnet="10.30.0.0/24", gateway="10.31.0.1")
        with pytest.raises(NotSupported, match="driver"):
            await manager.create("ov", driver="overlay")
        with pytest.raises(NotSupported, match="IPv6"):
            await manager.create("six", ipv6=True)
        with pytest.raises(NotSupported, match="network option"):
            await manager.create("opt", options={"com.docker.network.bridge.enable_icc": "false"})
        with pytest.raises(InvalidArgument, match="MTU"):
            await manager.create("mtu", options={"com.docker.network.driver.mtu": "70000"})
        with pytest.raises(Forbidden, match="predefined host"):
            await manager.create("host")
        with pytest.raises(InvalidArgument, match="invalid network name"):
            await manager.create("no spaces")
        # Nothing of the refused ones was made.
        assert [n.name for n in manager.list()] == ["bridge", "host", "none", "web", "own"]
        with pytest.raises(Forbidden, match="pre-defined network"):
            await manager.remove("bridge")
        await manager.remove("web")
        assert manager.store.find_by_name("web") is None
        again = await manager.create("again")
        assert again.subnet == "172.18.0.0/16"  # the freed subnet is given out again

    run(body())
    assert [e[:2] for e in events] == [
        ("create", "web"),
        ("create", "own"),
        ("destroy", "web"),
        ("create", "again"),
    ]


def test_create_allocates_addresses_slots_and_macs(tmp_path: Path) -> None:
    manager, book, _events = _manager(tmp_path)

    async def body() -> None:
        await manager.create("web")
        await manager.create("fixed", subnet="10.50.0.0/24")
        a = await _create_member(manager, book, "a", "a")
        assert list(a.endpoints) == ["bridge"]
        assert a.endpoints["bridge"].address == "172.17.0.2"
        b = await _create_member(
            manager,
            book,
            "b",
            "b",
            NetworkRequest("web", ["api"]),
            NetworkRequest("fixed", [], "10.50.0.9"),
            mode="web",
        )
        web, fixed = b.endpoints["web"], b.endpoints["fixed"]
        assert (web.slot, web.address, web.mac, web.aliases) == (
            1,
            "172.18.0.2",
            "02:42:ac:12:00:02",
            ["api"],
        )
        assert (fixed.slot, fixed.address, fixed.ipam_address) == (2, "10.50.0.9", "10.50.0.9")
        c = await _create_member(manager, book, "c", "c", mode="web")
        assert c.endpoints["web"].address == "172.18.0.3"
        with pytest.raises(Conflict, match=re.escape("Address already in use: 10.50.0.9")):
            await _create_member(manager, book, "d", "d", NetworkRequest("fixed", [], "10.50.0.9"))
        with pytest.raises(InvalidArgument, match="user configured subnets"):
            await _create_member(manager, book, "d", "d", NetworkRequest("web", [], "172.18.0.50"))
        with pytest.raises(InvalidArgument, match="user defined networks only"):
            await _create_member(
                manager, book, "d", "d", NetworkRequest("bridge", [], "172.17.0.50")
            )
        with pytest.raises(InvalidArgument, match="network-scoped alias"):
            await _create_member(manager, book, "d", "d", NetworkRequest("bridge", ["x"]))
        with pytest.raises(NotFound, match="network ghost not found"):
            await _create_member(manager, book, "d", "d", mode="ghost")
        with pytest.raises(NotSupported, match="network mode host is not supported"):
            await _create_member(manager, book, "d", "d", mode="host")
        with pytest.raises(NotSupported, match="container:x"):
            await _create_member(manager, book, "d", "d", mode="container:x")
        with pytest.raises(InvalidArgument, match="private \\(none\\) mode"):
            await _create_member(manager, book, "d", "d", NetworkRequest("web"), mode="none")
        with pytest.raises(InvalidArgument, match="at most 4 networks"):
            await _create_member(
                manager, book, "d", "d", *[NetworkRequest(n) for n in ("a", "b", "c", "d", "e")]
            )
        with pytest.raises(InvalidArgument, match="more than once"):
            await _create_member(
                manager,
                book,
                "d",
                "d",
                NetworkRequest("web"),
                NetworkRequest(manager.get("web").id),
            )
        none = await _create_member(manager, book, "e", "e", mode="none")
        assert none.endpoints == {}
        assert "d" * 64 not in book.by_id and not manager._pending

    run(body())


def test_pending_creates_hold_their_addresses_and_concurrent_creates_never_share(
    tmp_path: Path,
) -> None:
    manager, _book, _events = _manager(tmp_path)

    async def body() -> None:
        await manager.create("web")
        first = Member(id="a" * 64, name="a", network_mode="web")
        held = await manager.allocate(first, [])
        # Not in the book yet (its disks are being made): its address is still taken.
        second = Member(id="b" * 64, name="b", network_mode="web")
        other = await manager.allocate(second, [])
        assert held["web"].address != other["web"].address
        with pytest.raises(Forbidden, match="has active endpoints \\(containers: a, b\\)"):
            await manager.remove("web")
        manager.settle(first.id)  # the create failed: nothing was saved
        manager.settle(second.id)
        members = [Member(id=f"{n}" * 64, name=f"m{n}", network_mode="web") for n in range(10)]
        results = await asyncio.gather(*(manager.allocate(m, []) for m in members))
        addresses = [r["web"].address for r in results]
        assert len(set(addresses)) == 10
        for member in members:
            manager.settle(member.id)
        await manager.remove("web")

    run(body())


def test_connect_and_disconnect_keep_records_and_tell_running_vms(tmp_path: Path) -> None:
    live = Recorder()
    manager, book, events = _manager(tmp_path, live)

    async def body() -> None:
        await manager.create("web")
        await manager.create("back")
        stopped = await _create_member(manager, book, "a", "stopped")
        runner = await _create_member(manager, book, "b", "runner", running=True)
        endpoint = await manager.connect("web", "stopped", aliases=["db"])
        assert (endpoint.slot, endpoint.address, endpoint.aliases) == (2, "172.18.0.2", ["db"])
        assert book.by_id[stopped.id].endpoints["web"] == endpoint
        assert live.calls == []  # a stopped container has no VM to tell
        await manager.connect("web", runner.id[:6])
        assert live.calls == [("joined", "b", "web", "172.18.0.3")]
        with pytest.raises(Forbidden, match="already exists in network web"):
            await manager.connect("web", "runner")
        with pytest.raises(Conflict, match="alias db is already in use on network back"):
            await manager.connect("back", "stopped", aliases=["db"])
            await manager.connect("back", "runner", aliases=["db"])
        with pytest.raises(NotFound, match="No such container: ghost"):
            await manager.connect("web", "ghost")
        with pytest.raises(NotFound, match="network ghost not found"):
            await manager.connect("ghost", "runner")

    run(body())
    assert [(e[0], e[1]) for e in events if e[0] == "connect"] == [
        ("connect", "web"),
        ("connect", "web"),
        ("connect", "back"),
    ]


def test_disconnect_frees_the_address_and_slot(tmp_path: Path) -> None:
    live = Recorder()
    manager, book, events = _manager(tmp_path, live)

    async def body() -> None:
        await manager.create("web")
        await _create_member(manager, book, "a", "a", mode="web", running=True)
        b = await _create_member(manager, book, "b", "b", mode="web")
        assert b.endpoints["web"].address == "172.18.0.3"
        await manager.disconnect("web", "a")
        assert book.by_id["a" * 64].endpoints == {}
        assert live.calls == [("left", "a", "web", "172.18.0.2")]
        with pytest.raises(Forbidden, match="is not connected to network web"):
            await manager.disconnect("web", "a")
        again = await manager.connect("web", "a")
        assert (again.slot, again.address) == (1, "172.18.0.2")
        with pytest.raises(Forbidden, match="active endpoints \\(containers: a, b\\)"):
            await manager.remove("web")
        await manager.disconnect("web", "a")
        await manager.disconnect("web", "b")
        await manager.remove("web")
        assert live.calls[-1] == ("removed", "web")

    run(body())
    assert [(e[0], e[2].get("container", "")[:1]) for e in events if e[0] != "create"] == [
        ("disconnect", "a"),
        ("connect", "a"),
        ("disconnect", "a"),
        ("disconnect", "b"),
        ("destroy", ""),
    ]


def test_aliases_name_one_container_unless_replicas_of_one_service(tmp_path: Path) -> None:
    manager, book, _events = _manager(tmp_path)
    compose = {"com.docker.compose.project": "p", "com.docker.compose.service": "web"}

    async def body() -> None:
        await manager.create("net")
        await _create_member(manager, book, "a", "first", NetworkRequest("net", ["db"]))
        with pytest.raises(
            Conflict, match="alias db is already in use on network net by container first"
        ):
            await _create_member(manager, book, "b", "second", NetworkRequest("net", ["db"]))
        with pytest.raises(Conflict, match="alias first is already in use"):
            await _create_member(manager, book, "c", "third", NetworkRequest("net", ["first"]))
        with pytest.raises(InvalidArgument, match="invalid network alias"):
            await _create_member(manager, book, "c", "third", NetworkRequest("net", ["a b"]))
        await _create_member(
            manager, book, "d", "p_web_1", NetworkRequest("net", ["web"]), labels=compose
        )
        await _create_member(
            manager, book, "e", "p_web_2", NetworkRequest("net", ["web"]), labels=compose
        )

    run(body())


def test_a_failed_live_join_undoes_the_connect(tmp_path: Path) -> None:
    live = Recorder(fail_join=True)
    manager, book, events = _manager(tmp_path, live)

    async def body() -> None:
        await manager.create("web")
        await _create_member(manager, book, "a", "a", running=True)
        with pytest.raises(RuntimeError, match="the guest said no"):
            await manager.connect("web", "a")
        assert list(book.by_id["a" * 64].endpoints) == ["bridge"]
        assert not any(e[0] == "connect" for e in events)

    run(body())


def test_connect_refuses_none_host_and_full_containers(tmp_path: Path) -> None:
    manager, book, _events = _manager(tmp_path)

    async def body() -> None:
        for name in ("n1", "n2", "n3", "n4"):
            await manager.create(name)
        await _create_member(manager, book, "a", "isolated", mode="none")
        with pytest.raises(InvalidArgument, match="private \\(none\\) mode"):
            await manager.connect("n1", "isolated")
        await _create_member(manager, book, "b", "busy")
        for name in ("n1", "n2", "n3"):
            await manager.connect(name, "busy")
        with pytest.raises(InvalidArgument, match="already on 4 networks"):
            await manager.connect("n4", "busy")
        with pytest.raises(NotSupported, match="host"):
            await manager.connect("host", "busy")
        with pytest.raises(InvalidArgument, match="none"):
            await manager.connect("none", "busy")

    run(body())


def test_prune_removes_unused_user_networks_only(tmp_path: Path) -> None:
    manager, book, _events = _manager(tmp_path)

    async def body() -> None:
        await manager.create("used")
        await manager.create("idle", labels={"keep": "yes"})
        await manager.create("idle2")
        await _create_member(manager, book, "a", "a", mode="used")
        removed = await manager.prune(lambda n: "keep" not in n.labels)
        assert [n.name for n in removed] == ["idle2"]
        removed = await manager.prune()
        assert [n.name for n in removed] == ["idle"]
        assert [n.name for n in manager.list()] == ["bridge", "host", "none", "used"]

    run(body())
