"""Health checks: a command exec'd in the guest on an interval, Docker's state machine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Protocol

from husk.errors import HuskError
from husk.runtime.container import Container
from husk.runtime.model import ContainerStatus, now_iso

MAX_LOG_ENTRIES = 5
MAX_OUTPUT = 4096

NO_HEALTH = ""
STARTING = "starting"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"


def next_health(
    health: str, failing_streak: int, *, passed: bool, in_start_period: bool, retries: int
) -> tuple[str, int]:
    """Docker's health state machine: (health, failing streak) after one check.

    A check that passes makes the container healthy and ends the streak; one that
    fails counts (outside the start period) and ``retries`` failures in a row make
    it unhealthy. A failure in the start period changes nothing.
    """
    if passed:
        return HEALTHY, 0
    if in_start_period:
        return health, failing_streak
    failing_streak += 1
    if failing_streak >= max(1, retries):
        return UNHEALTHY, failing_streak
    return health, failing_streak


def health_at_start() -> tuple[str, int]:
    """A container with a health check starts as ``starting``, with no failures."""
    return STARTING, 0


def health_at_exit(health: str) -> str:
    """An unhealthy container shows unhealthy once exited; any other shows nothing."""
    return UNHEALTHY if health == UNHEALTHY else NO_HEALTH


def health_argv(test: list[str]) -> list[str]:
    if test[:1] == ["CMD-SHELL"]:
        return ["/bin/sh", "-c", " ".join(test[1:])]
    if test[:1] == ["CMD"]:
        return test[1:]
    return test


class CheckRunner(Protocol):
    """Runs a command in a container to its end: (exit code, stdout, stderr)."""

    def __call__(
        self, ref: str, argv: list[str], timeout: float = ..., *, limit: int, truncate: bool
    ) -> Awaitable[tuple[int, bytes, bytes]]: ...


async def run_health_checks(container: Container, run_check: CheckRunner) -> None:
    """Runs the container's health check on its interval and records what it says."""
    record = container.record
    check = record.spec.healthcheck
    assert check is not None
    argv = health_argv(check.test)
    started = time.monotonic()
    state = record.state
    while True:
        await asyncio.sleep(check.interval or 30.0)
        if state.status is ContainerStatus.PAUSED:
            continue  # a paused guest cannot run the check (a disk-full pause is shown already)
        begun = now_iso()
        try:
            # Docker keeps the start of a check's output: the rest is read and dropped.
            code, out, err = await run_check(
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
        state.health, state.failing_streak = next_health(
            state.health,
            state.failing_streak,
            passed=code == 0,
            in_start_period=time.monotonic() - started < check.start_period,
            retries=check.retries,
        )
        container.persist()
        if state.health != previous:
            container.event(f"health_status: {state.health}")
