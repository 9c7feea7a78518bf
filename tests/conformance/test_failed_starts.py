"""Issue 18, item 3: a start that fails returns Docker's exit code at once and leaks nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from engines import Engine

pytestmark = [pytest.mark.vm, pytest.mark.registry]

Check = Callable[[str, Callable[[Engine], Any]], Any]

# A failed start must answer promptly; a hang (the old bug) fails here, not at pytest's timeout.
FAILED_START_DEADLINE = 60.0


@pytest.mark.parametrize(
    ("case", "args", "code", "words"),
    [
        ("missing-command", ("/nonexistent",), 127, "/nonexistent"),
        ("not-executable", ("/etc/passwd",), 126, "permission denied"),
        ("missing-user", ("-u", "nosuchuser", "--", "id"), 125, "nosuchuser"),
    ],
)
def test_run_rm_failed_start(
    engine: Engine,
    same_as_docker: Check,
    case: str,
    args: tuple[str, ...],
    code: int,
    words: str,
) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        before = e.container_ids()
        options, command = (args[:2], args[3:]) if args[0] == "-u" else ((), args)
        result = e.run(*options, e.image, *command, timeout=FAILED_START_DEADLINE)
        message = result.stderr.decode()
        # The message itself when it lacks the words, so that a failure shows it.
        return result.returncode, words in message or message, e.container_ids() == before

    assert same_as_docker(f"rm-{case}", scenario) == (code, True, True)


def test_failed_start_is_recorded(engine: Engine, same_as_docker: Check) -> None:
    """Without --rm the container stays ``created`` with Docker's exit code and State.Error."""

    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept(e.image, "/nonexistent", timeout=FAILED_START_DEADLINE)
        return (
            ran.code,
            ran.state("Status"),
            ran.state("Running"),
            ran.state("ExitCode"),
            "/nonexistent" in (ran.state("Error") or ""),
        )

    assert same_as_docker("failed-start-state", scenario) == (127, "created", False, 127, True)


def test_dockerpy_failed_start(engine: Engine, same_as_docker: Check) -> None:
    """docker-py ``run(remove=True)``: a 400 naming the command, at once.

    docker-py removes a ``remove=True`` container only after it ran, so after a failed
    start dockerd leaves it ``created`` (exit code 127), and so must husk.
    """

    def scenario(e: Engine) -> tuple[Any, ...]:
        import docker

        client = e.client(timeout=int(FAILED_START_DEADLINE))
        before = e.container_ids()
        try:
            client.containers.run(
                e.image,
                "/nonexistent",
                remove=True,
                network_mode="none" if e.name == "docker" else None,
            )
        except docker.errors.APIError as err:
            status, explained = err.status_code, "/nonexistent" in str(err.explanation)
        else:
            status, explained = 0, False
        finally:
            client.close()
        left = e.container_ids() - before
        states = [e.inspect(cid)[0]["State"] for cid in left]
        if left:
            e.docker("rm", "-f", *left)
        return status, explained, [(s["Status"], s["ExitCode"]) for s in states]

    assert same_as_docker("dockerpy-failed-start", scenario) == (400, True, [("created", 127)])
