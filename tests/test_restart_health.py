"""Restart decisions, restart back-off and the health state machine: pure, no VM."""

from __future__ import annotations

import pytest

from husk.runtime import health, restart
from husk.spec import RestartPolicy


def _decide(
    name: str,
    max_retries: int = 0,
    *,
    exit_code: int = 1,
    restart_count: int = 0,
    stopped_by_user: bool = False,
    daemon_closing: bool = False,
) -> bool:
    return restart.should_restart(
        RestartPolicy(name, max_retries),
        exit_code=exit_code,
        restart_count=restart_count,
        stopped_by_user=stopped_by_user,
        daemon_closing=daemon_closing,
    )


@pytest.mark.parametrize("exit_code", [0, 1, 137])
def test_no_never_restarts(exit_code: int) -> None:
    assert not _decide("no", exit_code=exit_code)


@pytest.mark.parametrize("name", ["always", "unless-stopped"])
@pytest.mark.parametrize("exit_code", [0, 3])
def test_always_and_unless_stopped_restart_any_exit(name: str, exit_code: int) -> None:
    assert _decide(name, exit_code=exit_code, restart_count=1000)


def test_on_failure_restarts_failures_only() -> None:
    assert not _decide("on-failure", exit_code=0)
    assert _decide("on-failure", exit_code=1, restart_count=500)  # no limit


def test_on_failure_with_a_limit_counts_restarts() -> None:
    assert _decide("on-failure", 3, exit_code=2, restart_count=0)
    assert _decide("on-failure", 3, exit_code=2, restart_count=2)
    assert not _decide("on-failure", 3, exit_code=2, restart_count=3)
    assert not _decide("on-failure", 3, exit_code=2, restart_count=4)


@pytest.mark.parametrize("name", ["always", "unless-stopped", "on-failure"])
def test_a_manual_stop_is_never_undone(name: str) -> None:
    assert not _decide(name, exit_code=137, stopped_by_user=True)


@pytest.mark.parametrize("name", ["always", "unless-stopped", "on-failure"])
def test_nothing_restarts_while_the_daemon_shuts_down(name: str) -> None:
    assert not _decide(name, exit_code=1, daemon_closing=True)


@pytest.mark.parametrize(
    ("name", "stopped_by_user", "expected"),
    [
        ("always", False, True),
        ("always", True, True),
        ("unless-stopped", False, True),
        ("unless-stopped", True, False),
        ("on-failure", False, False),
        ("no", False, False),
    ],
)
def test_restart_at_daemon_start(name: str, stopped_by_user: bool, expected: bool) -> None:
    policy = RestartPolicy(name, 0)
    assert restart.restart_at_daemon_start(policy, stopped_by_user=stopped_by_user) is expected


def test_backoff_doubles_from_a_tenth_and_is_capped() -> None:
    assert restart.backoff(0) == pytest.approx(0.1)
    assert restart.backoff(1) == pytest.approx(0.2)
    assert restart.backoff(5) == pytest.approx(3.2)
    assert restart.backoff(9) == pytest.approx(51.2)
    assert restart.backoff(10) == restart.RESTART_BACKOFF_MAX
    assert restart.backoff(10_000) == restart.RESTART_BACKOFF_MAX
    delays = [restart.backoff(n) for n in range(40)]
    assert delays == sorted(delays)


def _check(
    state: tuple[str, int], passed: bool, *, retries: int = 3, in_start_period: bool = False
) -> tuple[str, int]:
    return health.next_health(
        *state, passed=passed, in_start_period=in_start_period, retries=retries
    )


def test_health_starts_as_starting() -> None:
    assert health.health_at_start() == ("starting", 0)


def test_a_passing_check_makes_it_healthy() -> None:
    assert _check(("starting", 0), True) == ("healthy", 0)
    assert _check(("unhealthy", 5), True) == ("healthy", 0)


def test_retries_failures_in_a_row_make_it_unhealthy() -> None:
    state = health.health_at_start()
    state = _check(state, False)
    assert state == ("starting", 1)
    state = _check(state, False)
    assert state == ("starting", 2)
    state = _check(state, False)
    assert state == ("unhealthy", 3)
    # A healthy container stays healthy until the streak is complete.
    state = _check(("healthy", 0), False, retries=2)
    assert state == ("healthy", 1)
    assert _check(state, False, retries=2) == ("unhealthy", 2)
    # A pass in between ends the streak.
    assert _check(_check(("healthy", 1), True, retries=2), False, retries=2) == ("healthy", 1)


def test_zero_retries_means_one_failure() -> None:
    assert _check(("starting", 0), False, retries=0) == ("unhealthy", 1)


def test_failures_in_the_start_period_do_not_count() -> None:
    state = health.health_at_start()
    for _ in range(10):
        state = _check(state, False, in_start_period=True)
    assert state == ("starting", 0)
    # A pass in the start period counts.
    assert _check(state, True, in_start_period=True) == ("healthy", 0)


def test_health_at_exit() -> None:
    assert health.health_at_exit("unhealthy") == "unhealthy"
    assert health.health_at_exit("healthy") == ""
    assert health.health_at_exit("starting") == ""
    assert health.health_at_exit("") == ""
