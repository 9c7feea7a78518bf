"""Endpoints in container records: persisted, rolled back, given to records from before."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from husk.network.manager import NetworkManager
from husk.network.model import Endpoint
from husk.network.store import NetworkStore
from husk.runtime.endpoints import RecordMembers, assign_missing, guest_network_body, member_of
from husk.runtime.model import ContainerRecord
from husk.runtime.store import RECORD, ContainerStore
from husk.spec import ContainerSpec


def _record(cid: str, name: str, **spec: object) -> ContainerRecord:
    return ContainerRecord(
        id=cid * 64,
        name=name,
        spec=ContainerSpec(image="busybox", **spec),  # type: ignore[arg-type]
        image_id="sha256:" + "0" * 64,
        image_ref="busybox",
        created="2026-01-01T00:00:00.000000000Z",
        argv=["sh"],
        env=[],
        workdir="/",
        user="",
        stop_signal="SIGTERM",
        stop_timeout=10,
    )


def test_endpoints_persist_in_the_record_and_connect_saves_them(tmp_path: Path) -> None:
    store = ContainerStore(tmp_path / "containers")
    manager = NetworkManager(NetworkStore(tmp_path / "networks"), RecordMembers(store))

    async def body() -> None:
        await manager.create("web")
        record = _record("a", "app", hostname="apphost", extra_hosts=["gw:host-gateway"])
        record.networks = await manager.allocate(member_of(record), [])
        store.add(record)
        manager.settle(record.id)
        await manager.connect("web", "app", aliases=["api"])

    asyncio.run(body())
    saved = ContainerStore(tmp_path / "containers").get("app")
    assert sorted(saved.networks) == ["bridge", "web"]
    assert saved.networks["web"].aliases == ["api"] and saved.networks["web"].slot == 2
    assert isinstance(saved.networks["bridge"], Endpoint)
    body = guest_network_body(saved, [saved], manager.list())
    assert [lan["slot"] for lan in body["lans"]] == [1, 2]  # type: ignore[index]
    assert body["hosts"] == {  # host-gateway resolved to the address the guest reaches
        "hostname": "apphost",
        "address": "172.17.0.2",
        "extra": ["gw:10.0.2.2"],
    }
    assert body["names"]["apphost"] == ["172.18.0.2"]  # type: ignore[index]


def test_records_from_before_networks_get_their_modes_endpoints_once(tmp_path: Path) -> None:
    store = ContainerStore(tmp_path / "containers")
    old, isolated = _record("a", "old"), _record("b", "isolated", network_mode="none")
    for record in (old, isolated):
        store.add(record)
        path = store.directory(record.id) / RECORD
        data = json.loads(path.read_text())
        del data["networks"], data["networks_assigned"]  # as husk wrote records before
        path.write_text(json.dumps(data))
    store = ContainerStore(tmp_path / "containers")
    assert not store.get("old").networks_assigned
    manager = NetworkManager(NetworkStore(tmp_path / "networks"), RecordMembers(store))
    asyncio.run(assign_missing(manager, store))
    again = ContainerStore(tmp_path / "containers")
    assert again.get("old").networks["bridge"].address == "172.17.0.2"
    assert again.get("old").networks_assigned
    assert again.get("isolated").networks == {} and again.get("isolated").networks_assigned
    # Once only: a container disconnected from everything stays so.
    asyncio.run(manager.disconnect("bridge", "old"))
    asyncio.run(assign_missing(manager, store))
    assert ContainerStore(tmp_path / "containers").get("old").networks == {}
