"""Restart policies (Docker's ``--restart``): when to restart a container, and how soon.

Pure decisions on the container's facts, so they are tested without a VM; the
runtime acts on them.
"""

from __future__ import annotations

from husk.spec import RestartPolicy

RESTART_BACKOFF_START = 0.1
"""Seconds before the first restart; each further restart waits twice as long."""
RESTART_BACKOFF_MAX = 60.0


def should_restart(
    policy: RestartPolicy,
    *,
    exit_code: int,
    restart_count: int,
    stopped_by_user: bool,
    daemon_closing: bool = False,
) -> bool:
    """Whether a container that just exited with ``exit_code`` is started again.

    Never after a user's stop or kill, nor while the daemon shuts down (its
    containers are restarted, if their policy says so, when it starts again).
    ``on-failure[:N]`` restarts a non-zero exit at most N times (0: without limit).
    """
    if daemon_closing or stopped_by_user:
        return False
    if policy.name in ("always", "unless-stopped"):
        return True
    if policy.name == "on-failure" and exit_code != 0:
        return not policy.max_retries or restart_count < policy.max_retries
    return False


def restart_at_daemon_start(policy: RestartPolicy, *, stopped_by_user: bool) -> bool:
    """Whether a stopped container is started when the daemon starts.

    ``always`` always; ``unless-stopped`` unless a user stopped it; ``on-failure``
    and ``no`` never (as Docker: the exit that failed happened before).
    """
    if policy.name == "always":
        return True
    return policy.name == "unless-stopped" and not stopped_by_user


def backoff(restart_count: int) -> float:
    """Seconds to wait before restart number ``restart_count + 1``: doubling, capped."""
    if restart_count >= 32:  # 2**32 * 0.1 is far past the cap; no huge powers
        return RESTART_BACKOFF_MAX
    return float(min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_START * (2**restart_count)))
