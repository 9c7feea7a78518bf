"""Exec sessions: a command started beside a container's workload (``docker exec``).

:mod:`husk.runtime.execs` keeps the records and their bounds; this module starts
the sessions in the guest and follows them to their end.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal as signals
from collections.abc import AsyncIterator
from typing import Any

from husk.agent.client import ProcessSpec
from husk.errors import Conflict, InvalidArgument
from husk.runtime.collect import MAX_COLLECTED_OUTPUT, CappedOutput
from husk.runtime.events import EventHub
from husk.runtime.execs import ExecRecord, ExecSpec, ExecTable
from husk.runtime.faults import exec_exit_code
from husk.runtime.model import ContainerStatus
from husk.runtime.registry import ContainerRegistry
from husk.runtime.streams import Chunk, ProcessStream
from husk.spec import merge_env


async def _close(iterator: AsyncIterator[Any]) -> None:
    closer = getattr(iterator, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


class ExecSessions:
    """Creates, starts, resizes and runs to completion the exec sessions of containers."""

    def __init__(self, registry: ContainerRegistry, table: ExecTable, events: EventHub) -> None:
        self._registry = registry
        self.table = table
        self._events = events

    def create(self, ref: str, spec: ExecSpec, *, internal: bool = False) -> str:
        """Records an exec to start later (``internal``: husk's own, started at once)."""
        container = self._registry.get(ref)
        record = container.record
        if not spec.argv or not any(spec.argv):
            raise InvalidArgument("No exec command specified")
        if record.state.status is ContainerStatus.PAUSED:
            raise Conflict(f"Container {record.id} is paused, unpause the container first")
        container.require_live()
        exec_id = secrets.token_hex(32)
        self.table.add(ExecRecord(exec_id, record.id, spec), internal=internal)
        self._events.container_event(record, "exec_create: " + " ".join(spec.argv), execID=exec_id)
        return exec_id

    def inspect(self, exec_id: str) -> ExecRecord:
        return self.table.get(exec_id)

    def check_startable(self, exec_id: str) -> None:
        """The refusals of :meth:`start`, checked before anything starts."""
        execution = self.inspect(exec_id)
        if execution.started:
            raise Conflict(f"exec {exec_id} has already been started")
        self._registry.get(execution.container_id).require_live()
        self.table.check_can_start(execution)

    async def start(self, exec_id: str) -> ProcessStream:
        self.check_startable(exec_id)
        execution = self.inspect(exec_id)
        owner = self._registry.get(execution.container_id)
        container = owner.record
        live = owner.require_live()
        spec = execution.spec
        execution.started = True
        try:
            process = await owner.guest_call(
                live,
                "exec",
                live.sandbox.client.exec(
                    ProcessSpec(
                        argv=spec.argv,
                        env=merge_env(container.env, spec.env),
                        cwd=spec.workdir or container.workdir,
                        user=spec.user or container.user,
                        tty=spec.tty,
                        stdin=spec.stdin,
                    )
                ),
            )
        except BaseException as err:
            # As Docker records it: 127 for a missing command, 126 when it cannot run.
            execution.exit_code = exec_exit_code(err)
            self.table.finished(execution)
            raise
        execution.running = True
        execution.pid = process.pid
        processes = owner.exec_processes
        processes[execution.id] = process
        self._events.container_event(
            container, "exec_start: " + " ".join(spec.argv), execID=execution.id
        )

        async def output() -> AsyncIterator[Chunk]:
            try:
                async for item in owner.guest_stream(live, "exec", process.output()):
                    yield item
            finally:
                processes.pop(execution.id, None)
                if process.exit_code is not None:
                    execution.exit_code = process.exit_code
                    self._events.container_event(
                        container, "exec_die", execID=execution.id, exitCode=str(process.exit_code)
                    )
                self.table.finished(execution)
                await process.release()

        return ProcessStream(
            tty=spec.tty,
            output=output,
            write_stdin=process.write_stdin,
            close_stdin=process.close_stdin,
            resize=process.resize,
            exit_code=lambda: process.exit_code,
        )

    async def resize(self, exec_id: str, rows: int, cols: int) -> None:
        execution = self.inspect(exec_id)
        owner = self._registry.held(execution.container_id)
        process = owner.exec_processes.get(execution.id) if owner is not None else None
        if process is None or not execution.running:
            raise Conflict(f"exec {exec_id} is not running")
        await process.resize(rows, cols)

    async def run_to_end(
        self,
        ref: str,
        argv: list[str],
        timeout: float = 30.0,
        *,
        limit: int = MAX_COLLECTED_OUTPUT,
        truncate: bool = False,
    ) -> tuple[int, bytes, bytes]:
        """Runs a command to completion (health checks, tests).

        At most ``limit`` bytes of each stream are kept: beyond, the command is killed
        and :class:`OutputTooLarge` raised, or with ``truncate`` the rest is read and
        dropped (a health check's output, of which Docker keeps the start).
        """
        exec_id = self.create(ref, ExecSpec(argv=argv), internal=True)
        collected = CappedOutput(f"the output of {argv[0]!r}", limit, truncate=truncate)
        try:
            stream = await self.start(exec_id)
            process = self._registry.get(ref).exec_processes.get(exec_id)
            output = stream.output()
            try:
                await asyncio.wait_for(collected.read(output), timeout)
            finally:
                # Too much output, or too slow: the command is not left running behind.
                if process is not None and process.exit_code is None:
                    with contextlib.suppress(Exception):
                        await process.signal(int(signals.SIGKILL))
                await _close(output)
            code = stream.exit_code
        finally:
            self.table.discard(exec_id)
        return (code if code is not None else -1), collected.stdout, collected.stderr
