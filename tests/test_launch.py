"""A container's run through the real Runtime and Launcher on fake machines (no QEMU).

The hypervisor is :class:`fake_machine.FakeBackend`, injected through the runtime's
provisioner; the real sandbox and AgentClient talk to the fake agent, whose answer
to RUN each test scripts: the workload's output and exit, or the guest's refusal.
What is checked is what the launch and finish path decides: exit codes, State.Error,
events, AutoRemove, and restarts scheduled through the Container's transitions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import fake_agent
from fake_machine import FakeBackend
from husk.errors import Conflict, HuskError, StartFailed
from husk.guest import protocol
from husk.guest.protocol import Frame, MsgType
from husk.runtime import launch as launch_module
from husk.runtime import recovery
from husk.runtime.model import ContainerStatus
from husk.runtime.runtime import Runtime
from husk.runtime.store import StorageError
from husk.sandbox.provisioner import Provisioner
from husk.spec import ContainerSpec, RestartPolicy
from testimages import BUSYBOX_NAME, install_busybox_image

T = TypeVar("T")
S = ContainerStatus
Script = Callable[[int], bytes]
"""The fake agent's answer to RUN, given the channel the host opened."""


def run(coro: Coroutine[Any, Any, T], deadline: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, deadline))


def exits(code: int, output: bytes = b"") -> Script:
    def answer(channel: int) -> bytes:
        started = fake_agent.json_frame(MsgType.STARTED, channel, {"pid": 42})
        out = protocol.encode(MsgType.STDOUT, channel, output) if output else b""
        return started + out + fake_agent.json_frame(MsgType.EXITED, channel, {"code": code})

    return answer


def runs_on(channel: int) -> bytes:
    return fake_agent.json_frame(MsgType.STARTED, channel, {"pid": 42})


def refused(kind: str, exit_code: int, message: str) -> Script:
    def answer(channel: int) -> bytes:
        return protocol.encode_error(channel, message, kind, exit_code)

    return answer


class Guests:
    """The scripts the next workloads follow, one per RUN, in order."""

    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.runs = 0
        self.received: list[MsgType] = []

    def reply(self, frame: Frame) -> bytes:
        self.received.append(frame.type)
        if frame.type is MsgType.RUN:
            self.runs += 1
            return self.scripts.pop(0)(frame.channel)
        if frame.type is MsgType.SIGNAL:
            # A workload that runs on ends at the first signal, as by SIGTERM's default.
            return fake_agent.json_frame(MsgType.EXITED, frame.channel, {"code": 143})
        return original_reply(frame)


original_reply = fake_agent.default_reply


@pytest.fixture
def guests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Guests]:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HUSK_ACCEL", "tcg")
    monkeypatch.setenv("HUSK_NO_TEMPLATE", "1")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "vmlinux").write_bytes(b"fake kernel")
    (bundle / "initrd").write_bytes(b"fake initrd")
    monkeypatch.setenv("HUSK_KERNEL", str(bundle / "vmlinux"))
    monkeypatch.setenv("HUSK_INITRD", str(bundle / "initrd"))
    scripted = Guests()
    monkeypatch.setattr(fake_agent, "default_reply", scripted.reply)
    yield scripted


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    fake = FakeBackend()
    yield fake
    fake.close()


async def runtime_with(backend: FakeBackend, workdir: Path) -> tuple[Runtime, list[str]]:
    runtime = Runtime(provisioner=Provisioner(backend))
    install_busybox_image(runtime.images, workdir=workdir)
    actions: list[str] = []

    async def listen() -> None:
        async for event in runtime.subscribe():
            if event.type == "container":
                code = event.attributes.get("exitCode")
                actions.append(event.action + (f" {code}" if code is not None else ""))

    asyncio.get_running_loop().create_task(listen())
    await asyncio.sleep(0)
    return runtime, actions


def spec(**options: Any) -> ContainerSpec:
    return ContainerSpec(image=BUSYBOX_NAME, cmd=["/bin/app"], **options)


def test_the_workloads_exit_code_and_output_are_recorded(
    guests: Guests, backend: FakeBackend, tmp_path: Path
) -> None:
    async def body() -> None:
        runtime, actions = await runtime_with(backend, tmp_path)
        record = await runtime.create(spec())
        guests.scripts.append(exits(3, b"hello\n"))
        exited = asyncio.ensure_future(runtime.wait(record.id, "next-exit"))
        await runtime.start(record.id)
        assert await exited == 3
        state = runtime.get(record.id).state
        assert (state.status, state.exit_code, state.error, state.pid) == (S.EXITED, 3, "", 0)
        assert [e.data async for e in runtime.logs(record.id)] == [b"hello\n"]
        assert record.id not in runtime.live
        # The guest was asked to power off (disks synced): the run was not a --rm one.
        assert MsgType.SHUTDOWN in guests.received
        await asyncio.sleep(0)
        assert actions == ["create", "start", "die 3"]
        await runtime.shutdown()

    run(body())


def test_a_command_the_guest_cannot_find_is_127_and_the_container_stays_created(
    guests: Guests, backend: FakeBackend, tmp_path: Path
) -> None:
    async def body() -> None:
        runtime, actions = await runtime_with(backend, tmp_path)
        record = await runtime.create(spec())
        guests.scripts.append(
            refused(protocol.ERROR_COMMAND_NOT_FOUND, 127, 'exec: "/bin/app": not found')
        )
        with pytest.raises(StartFailed) as caught:
            await runtime.start(record.id)
        assert caught.value.exit_code == 127 and caught.value.http_status == 400
        state = runtime.get(record.id).state
        assert (state.status, state.exit_code) == (S.CREATED, 127)
        assert "not found" in state.error
        # The VM of a start that failed does not run on.
        assert backend.running == {}
        await asyncio.sleep(0)
        assert actions == ["create", "die 127"]
        await runtime.shutdown()

    run(body())


def test_a_failure_to_set_the_process_up_is_128(
    guests: Guests, backend: FakeBackend, tmp_path: Path
) -> None:
    async def body() -> None:
        runtime, _ = await runtime_with(backend, tmp_path)
        record = await runtime.create(spec())
        guests.scripts.append(refused(protocol.ERROR_SPAWN_FAILED, 126, "no such user: nobody2"))
        with pytest.raises(StartFailed) as caught:
            await runtime.start(record.id)
        assert caught.value.exit_code == 128
        assert runtime.get(record.id).state.exit_code == 128
        await runtime.shutdown()

    run(body())


def test_auto_remove_removes_after_the_exit_and_after_a_failed_start(
    guests: Guests, backend: FakeBackend, tmp_path: Path
) -> None:
    async def body() -> None:
        runtime, actions = await runtime_with(backend, tmp_path)
        ran = await runtime.create(spec(auto_remove=True))
        guests.scripts.append(exits(5))
        removal = asyncio.ensure_future(runtime.wait(ran.id, "removed"))
        await runtime.start(ran.id)
        assert await removal == 5
        assert runtime.list(all=True) == []
        # A --rm run ends its VM at once: nothing to flush on a disk that is deleted.
        assert MsgType.SHUTDOWN not in guests.received

        failed = await runtime.create(spec(auto_remove=True))
        guests.scripts.append(refused(protocol.ERROR_NOT_EXECUTABLE, 126, "permission denied"))
        with pytest.raises(StartFailed):
            await runtime.start(failed.id)
        # Removed before the error is answered: a client listing right after finds nothing.
        assert runtime.list(all=True) == []
        await asyncio.sleep(0)
        assert actions.count("destroy") == 2
        await runtime.shutdown()

    run(body())


def test_a_wait_for_a_removal_that_fails_is_answered_with_the_reason(
    guests: Guests, backend: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`husk run --rm` waits for the removal (no DELETE of its own): an AutoRemove the
    daemon cannot finish must answer that wait, not leave the client hanging."""

    async def body() -> None:
        runtime, _ = await runtime_with(backend, tmp_path)
        record = await runtime.create(spec(auto_remove=True))

        def fails(container_id: str) -> None:
            raise StorageError(f"disk full while deleting {container_id[:12]}")

        monkeypatch.setattr(runtime.containers, "delete", fails)
        guests.scripts.append(exits(3))
        removal = asyncio.ensure_future(runtime.wait(record.id, "removed"))
        await runtime.start(record.id)
        with pytest.raises(HuskError, match=r"could not remove container .*disk full"):
            await asyncio.wait_for(removal, 10)
        # Still listed (dead, with the reason), so a later `rm -f` can finish it.
        assert [r.id for r in runtime.list(all=True)] == [record.id]
        assert runtime.get(record.id).state.exit_code == 3
        monkeypatch.undo()
        await runtime.remove(record.id, force=True)
        assert runtime.list(all=True) == []
        await runtime.shutdown()

    run(body())


def test_on_failure_restarts_with_back_off_until_its_limit(
    guests: Guests, backend: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    real_backoff = launch_module.backoff

    def recorded_backoff(count: int) -> float:
        delays.append(real_backoff(count))
        return 0.0

    monkeypatch.setattr(launch_module, "backoff", recorded_backoff)

    async def body() -> None:
        runtime, actions = await runtime_with(backend, tmp_path)
        record = await runtime.create(spec(restart=RestartPolicy("on-failure", 2)))
        guests.scripts += [exits(1), exits(1), exits(1)]
        await runtime.start(record.id)
        container = runtime.container(record.id)
        for _ in range(200):
            if guests.runs == 3 and container.status is S.EXITED:
                break
            await asyncio.sleep(0.02)
        state = container.record.state
        assert (state.status, state.restart_count, state.exit_code) == (S.EXITED, 2, 1)
        assert guests.runs == 3 and len(backend.created) == 3
        # Docker's doubling back-off: 100 ms, then 200 ms.
        assert delays == [0.1, 0.2]
        await asyncio.sleep(0)
        assert actions.count("start") == 3 and actions.count("die 1") == 3
        await runtime.shutdown()

    run(body())


def test_a_zero_exit_is_not_restarted_on_failure_but_always_is(
    guests: Guests, backend: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch_module, "backoff", lambda _count: 0.0)

    async def body() -> None:
        runtime, _ = await runtime_with(backend, tmp_path)
        quiet = await runtime.create(spec(restart=RestartPolicy("on-failure")))
        guests.scripts.append(exits(0))
        exited = asyncio.ensure_future(runtime.wait(quiet.id, "next-exit"))
        await runtime.start(quiet.id)
        assert await exited == 0
        await asyncio.sleep(0.05)
        assert runtime.get(quiet.id).state.status is S.EXITED and guests.runs == 1

        # `always` restarts a zero exit; a user's stop while it waits ends the loop.
        always = await runtime.create(spec(restart=RestartPolicy("always")))
        container = runtime.container(always.id)
        statuses: list[S] = []
        transition = container.transition

        def watch(wanted: S, **options: Any) -> bool:
            statuses.append(wanted)
            return transition(wanted, **options)

        monkeypatch.setattr(container, "transition", watch)
        guests.scripts += [exits(0), runs_on]
        await runtime.start(always.id)
        for _ in range(200):
            if guests.runs == 3 and container.status is S.RUNNING:
                break
            await asyncio.sleep(0.02)
        assert guests.runs == 3
        # Every step went through the container's state machine.
        assert statuses[:4] == [S.RUNNING, S.EXITED, S.RESTARTING, S.RUNNING]
        assert container.record.state.restart_count == 1
        await runtime.stop(always.id)
        state = container.record.state
        assert (container.status, state.exit_code, state.stopped_by_user) == (S.EXITED, 143, True)
        await asyncio.sleep(0.05)
        assert guests.runs == 3  # no restart after a user's stop
        await runtime.shutdown()

    run(body())


def test_a_failed_restart_is_recorded_and_retried_by_the_policy(
    guests: Guests, backend: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch_module, "backoff", lambda _count: 0.0)

    async def body() -> None:
        runtime, _ = await runtime_with(backend, tmp_path)
        record = await runtime.create(spec(restart=RestartPolicy("on-failure", 3)))
        guests.scripts.append(exits(2))
        await runtime.start(record.id)
        backend.fail_boots = 1  # the first restart cannot boot its VM
        guests.scripts.append(exits(0))
        container = runtime.container(record.id)
        for _ in range(200):
            if guests.runs == 2 and container.status is S.EXITED:
                break
            await asyncio.sleep(0.02)
        state = container.record.state
        # The failed boot counted as a restart and was retried; the retry's exit 0 ends it.
        assert (state.status, state.exit_code, state.restart_count) == (S.EXITED, 0, 2)
        assert len(backend.created) == 3
        await runtime.shutdown()

    run(body())


def test_a_removal_that_cannot_delete_leaves_the_container_dead_then_finishes(
    guests: Guests, backend: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        runtime, actions = await runtime_with(backend, tmp_path)
        record = await runtime.create(spec())
        guests.scripts.append(runs_on)
        await runtime.start(record.id)
        with pytest.raises(Conflict, match="Stop the container"):
            await runtime.remove(record.id)
        delete = runtime.containers.delete

        def read_only(container_id: str) -> None:
            raise HuskError("read-only file system")

        monkeypatch.setattr(runtime.containers, "delete", read_only)
        with pytest.raises(StorageError, match="stays listed"):
            await runtime.remove(record.id, force=True)
        state = runtime.get(record.id).state
        assert state.status is S.DEAD and "read-only" in state.error
        assert backend.running == {}  # the VM was ended all the same
        with pytest.raises(Conflict, match="dead"):
            await runtime.start(record.id)
        monkeypatch.setattr(runtime.containers, "delete", delete)
        await runtime.remove(record.id)
        assert runtime.list(all=True) == [] and not runtime.vm_dir(record.id).exists()
        await asyncio.sleep(0)
        assert actions[-3:] == ["die 143", "stop", "destroy"]
        await runtime.shutdown()

    run(body())


def test_the_daemon_start_restarts_by_policy(
    guests: Guests, backend: FakeBackend, tmp_path: Path
) -> None:
    async def body() -> None:
        runtime, _ = await runtime_with(backend, tmp_path)
        always = await runtime.create(spec(restart=RestartPolicy("always")))
        stopped = await runtime.create(spec(restart=RestartPolicy("unless-stopped")))
        await runtime.create(spec(restart=RestartPolicy("on-failure")))
        runtime.get(stopped.id).state.stopped_by_user = True
        assert recovery.restarts_at_start(runtime.containers) == [always.id]

    run(body())
