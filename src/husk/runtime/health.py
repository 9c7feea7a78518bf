"""Health checks: a command exec'd in the guest on an interval, Docker's state machine."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from husk.errors import HuskError
from husk.runtime.model import ContainerRecord, now_iso

if TYPE_CHECKING:
    from husk.runtime.runtime import Live, Runtime

MAX_LOG_ENTRIES = 5
MAX_OUTPUT = 4096


def health_argv(test: list[str]) -> list[str]:
    if test[:1] == ["CMD-SHELL"]:
        return ["/bin/sh", "-c", " ".join(test[1:])]
    if test[:1] == ["CMD"]:
        return test[1:]
    return test


async def run_health_checks(runtime: Runtime, record: ContainerRecord, live: Live) -> None:
    check = record.spec.healthcheck
    assert check is not None
    argv = health_argv(check.test)
    started = time.monotonic()
    state = record.state
    while True:
        await asyncio.sleep(check.interval or 30.0)
        if state.status == "paused":
            continue  # a paused guest cannot run the check (a disk-full pause is shown already)
        begun = now_iso()
        try:
            # Docker keeps the start of a check's output: the rest is read and dropped.
            code, out, err = await runtime.exec_simple(
                record.id, argv, timeout=check.timeout or 30.0, limit=MAX_OUTPUT, truncate=True
            )
            output = (out + err).decode(errors="replace")[:MAX_OUTPUT]
        except TimeoutError:
            code, output = -1, f"Health check exceeded timeout ({check.timeout}s)"
        except HuskError as exc:
            code, output = -1, str(exc)
        except Exception as exc:  # never let one bad check end the checks
            code, output = -1, f"{type(exc).__name__}: {exc}"
        state.health_log = [
            *state.health_log,
            {"Start": begun, "End": now_iso(), "ExitCode": code, "Output": output},
        ][-MAX_LOG_ENTRIES:]
        previous = state.health
        in_start_period = time.monotonic() - started < check.start_period
        if code == 0:
            state.failing_streak = 0
            state.health = "healthy"
        elif not in_start_period:
            state.failing_streak += 1
            if state.failing_streak >= max(1, check.retries):
                state.health = "unhealthy"
        runtime._persist(record)
        if state.health != previous:
            runtime.emit(
                "container",
                f"health_status: {state.health}",
                record.id,
                name=record.name,
                image=record.image_ref,
            )
