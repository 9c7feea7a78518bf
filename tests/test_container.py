"""The Container object's state machine and its record on disk (no VM)."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest

from husk.runtime.container import TRANSITIONS, Container, IllegalTransition
from husk.runtime.model import ContainerRecord, ContainerState, ContainerStatus
from husk.runtime.store import RECORD, ContainerStore
from husk.spec import ContainerSpec

S = ContainerStatus
ALL_PAIRS = list(itertools.product(ContainerStatus, ContainerStatus))
LEGAL = [(a, b) for a, b in ALL_PAIRS if b in TRANSITIONS[a]]
ILLEGAL = [(a, b) for a, b in ALL_PAIRS if b not in TRANSITIONS[a]]


def _record(status: ContainerStatus = S.CREATED, container_id: str = "a" * 64) -> ContainerRecord:
    return ContainerRecord(
        id=container_id,
        name="c1",
        spec=ContainerSpec(image="busybox"),
        image_id="sha256:" + "b" * 64,
        image_ref="busybox",
        created="2026-01-01T00:00:00.000000000Z",
        argv=["sh"],
        env=[],
        workdir="/",
        user="",
        stop_signal="SIGTERM",
        stop_timeout=10,
        state=ContainerState(status=status),
    )


def _stored(tmp_path: Path, status: ContainerStatus) -> tuple[ContainerStore, Container]:
    store = ContainerStore(tmp_path / "containers")
    record = _record(status)
    store.add(record)
    return store, Container(record, store)


def _on_disk(store: ContainerStore, container_id: str) -> str:
    data = json.loads((store.directory(container_id) / RECORD).read_text())
    return str(data["state"]["status"])


def test_the_table_names_every_status_and_dockers_statuses() -> None:
    assert set(TRANSITIONS) == set(ContainerStatus)
    assert {s.value for s in ContainerStatus} == {
        "created",
        "running",
        "paused",
        "restarting",
        "removing",
        "exited",
        "dead",
    }


@pytest.mark.parametrize(("current", "wanted"), ILLEGAL, ids=lambda s: s.value)
def test_every_illegal_transition_is_refused(
    tmp_path: Path, current: ContainerStatus, wanted: ContainerStatus
) -> None:
    store, container = _stored(tmp_path, current)
    with pytest.raises(IllegalTransition, match=f"from {current.value} to {wanted.value}"):
        container.transition(wanted)
    assert container.status is current
    assert _on_disk(store, container.id) == current.value  # nothing was written


@pytest.mark.parametrize(("current", "wanted"), LEGAL, ids=lambda s: s.value)
def test_every_legal_transition_is_saved(
    tmp_path: Path, current: ContainerStatus, wanted: ContainerStatus
) -> None:
    store, container = _stored(tmp_path, current)
    assert container.transition(wanted) is True
    assert container.status is wanted
    assert _on_disk(store, container.id) == wanted.value
    # A restarted daemon reads it back as the enum.
    reloaded = ContainerStore(store.root).get(container.id)
    assert reloaded.state.status is wanted


def test_some_transitions_docker_never_makes_are_illegal() -> None:
    assert S.RUNNING not in TRANSITIONS[S.DEAD]
    assert S.CREATED not in TRANSITIONS[S.EXITED]
    assert S.PAUSED not in TRANSITIONS[S.EXITED]
    assert S.REMOVING not in TRANSITIONS[S.RUNNING]  # a running container is ended first


def test_a_failed_save_leaves_the_change_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from husk.runtime.store import StorageError

    store, container = _stored(tmp_path, S.CREATED)

    def full(_record: ContainerRecord) -> None:
        raise StorageError("disk full")

    monkeypatch.setattr(store, "save", full)
    assert container.transition(S.RUNNING) is False
    assert container.status is S.RUNNING
    with pytest.raises(StorageError):
        container.transition(S.PAUSED, must_persist=True)


def test_a_removed_container_is_not_written_back(tmp_path: Path) -> None:
    store, container = _stored(tmp_path, S.EXITED)
    store.delete(container.id)
    assert container.persist() is False
    assert not store.directory(container.id).exists()


def test_stored_status_strings_map_to_the_enum_and_unknown_ones_are_refused(
    tmp_path: Path,
) -> None:
    data = _record().to_json()
    assert json.loads(json.dumps(data))["state"]["status"] == "created"
    data["state"]["status"] = "paused"
    assert ContainerRecord.from_json(data).state.status is S.PAUSED
    data["state"]["status"] = "sleeping"
    with pytest.raises(ValueError, match="sleeping"):
        ContainerRecord.from_json(data)
    # A record with such a status stands as dead, with the reason (never a crash).
    store = ContainerStore(tmp_path / "containers")
    directory = store.directory("c" * 64)
    directory.mkdir()
    data["id"] = "c" * 64
    (directory / RECORD).write_text(json.dumps(data))
    stand_in = ContainerStore(store.root).get("c" * 64)
    assert stand_in.state.status is S.DEAD and "sleeping" in stand_in.state.error


def test_waiters_are_answered_and_given_up_ones_dropped(tmp_path: Path) -> None:
    async def body() -> None:
        _store, container = _stored(tmp_path, S.RUNNING)
        kept = container.add_waiter(removal=False)
        gone = container.add_waiter(removal=False)
        container.drop_waiter(gone)
        removal = container.add_waiter(removal=True)
        container.exited(3)
        assert await kept == 3 and not gone.done()
        assert container.exit_waiters == []
        container.record.state.exit_code = 3
        container.removed()
        assert await removal == 3 and container.removal_waiters == []

    asyncio.run(body())


def test_the_runtime_forgets_everything_of_a_removed_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """remove() used to leave the container's stop event (and more) behind, keyed by id."""
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    from husk.runtime.runtime import Runtime
    from testimages import BUSYBOX_NAME, install_busybox_image

    async def body() -> None:
        runtime = Runtime()
        install_busybox_image(runtime.images, workdir=tmp_path)
        record = await runtime.create(ContainerSpec(image=BUSYBOX_NAME, cmd=["true"]))
        container = runtime.container(record.name)
        assert runtime.container(record.id[:8]) is container
        assert container.status is S.CREATED
        # Everything a client can make it hold: logs, a follower's stop event, a waiter.
        entries = [entry async for entry in runtime.logs(record.id, follow=True)]
        assert entries == []
        removal = asyncio.ensure_future(runtime.wait(record.id, "removed"))
        await asyncio.sleep(0)
        await runtime.remove(record.id)
        assert await removal == 0
        assert runtime.registry.held_ids() == set()
        assert record.id not in runtime.live
        with pytest.raises(Exception, match="No such container"):
            runtime.container(record.id)

    asyncio.run(asyncio.wait_for(body(), 120))


class _FakeMachine:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def pause(self) -> None:
        self.calls.append("pause")

    async def resume(self) -> None:
        self.calls.append("resume")

    async def kill(self) -> None:
        self.calls.append("kill")

    def disk_roles(self) -> dict[str, tuple[str, str]]:
        return {"upper": ("container's disk", "/x/upper.ext4")}


def _live_container(tmp_path: Path) -> tuple[Container, _FakeMachine, list[str]]:
    from types import SimpleNamespace

    from husk.runtime.container import Host, Live

    store = ContainerStore(tmp_path / "containers")
    record = _record(S.RUNNING)
    store.add(record)
    events: list[str] = []

    def event(_record: ContainerRecord, action: str, **_attributes: str) -> None:
        events.append(action)

    def spawn(coro: object) -> asyncio.Task[object]:
        return asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]

    container = Container(record, store, Host(event=event, spawn=spawn))
    machine = _FakeMachine()
    client = SimpleNamespace(set_time=machine.pause)
    sandbox = SimpleNamespace(machine=machine, client=client, disk_roles=machine.disk_roles)
    container.live = Live(sandbox=sandbox, process=None, publisher=None)  # type: ignore[arg-type]
    return container, machine, events


def test_pause_and_unpause_go_through_the_state_machine(tmp_path: Path) -> None:
    from husk.errors import Conflict

    async def body() -> None:
        container, machine, events = _live_container(tmp_path)
        await container.pause()
        assert container.status is S.PAUSED and events == ["pause"]
        with pytest.raises(Conflict, match="already paused"):
            await container.pause()
        with pytest.raises(Conflict, match="Unpause the container before killing"):
            await container.kill("TERM")
        await container.unpause()
        assert container.status is S.RUNNING and events == ["pause", "unpause"]
        assert machine.calls[:2] == ["pause", "resume"]
        container.live = None
        with pytest.raises(Conflict, match="is not running"):
            await container.pause()

    asyncio.run(body())


def test_a_disk_full_pause_shows_in_the_container(tmp_path: Path) -> None:
    async def body() -> None:
        container, _machine, events = _live_container(tmp_path)
        assert container.live is not None
        data = {"device": "upper", "action": "stop", "nospace": True, "operation": "write"}
        container.on_vm_event(container.live, "BLOCK_IO_ERROR", data)
        assert container.status is S.PAUSED
        assert "disk full" in container.record.state.error
        assert events == ["pause", "io_error"]
        # Saved: a restarted daemon shows it too.
        assert ContainerStore(tmp_path / "containers").get(container.id).state.status is S.PAUSED

    asyncio.run(body())
