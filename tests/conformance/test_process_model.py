"""Issue 18, item 2 and exit codes: the workload is PID 1, ``--init``, signals, ``top``, logs.

One long-running container per engine (``trapper``) serves ``top``, ``kill -s`` and
``kill`` (137), in that order; the other scenarios are one short container each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from engines import Engine

pytestmark = [pytest.mark.vm, pytest.mark.registry]

Check = Callable[[str, Callable[[Engine], Any]], Any]

# The shell traps USR1 and keeps waiting for its sleep child: if a signal reached the
# whole process group (not only PID 1), the sleep dies and "child-gone" is printed.
TRAPPER = (
    'trap "echo got-usr1" USR1; sleep 300 & child=$!; echo ready; '
    "while true; do wait $child; echo wait-returned; "
    "if kill -0 $child 2>/dev/null; then echo child-alive; else echo child-gone; exit 0; fi; done"
)


def wait_for_log(engine: Engine, name: str, text: str, deadline: float = 60.0) -> str:
    end = time.monotonic() + deadline
    logs = ""
    while time.monotonic() < end:
        logs = engine.docker("logs", name).stdout.decode(errors="replace")
        if text in logs:
            return logs
        time.sleep(0.3)
    raise AssertionError(f"[{engine.name}] {text!r} not in the logs of {name}: {logs!r}")


@pytest.fixture(scope="session")
def trappers() -> Iterator[dict[str, str]]:
    """Per engine, the name of its running trapper container (made on first use)."""
    made: dict[str, str] = {}
    yield made


def trapper(engine: Engine, made: dict[str, str]) -> str:
    if engine.name not in made:
        name = f"conf-trap-{engine.name}"
        engine.docker("rm", "-f", name)
        engine.docker(
            "run",
            "-d",
            "--name",
            name,
            *engine.run_args,
            engine.image,
            "sh",
            "-c",
            TRAPPER,
            check=True,
        )
        made[engine.name] = name
        wait_for_log(engine, name, "ready")
    return made[engine.name]


def test_top_lists_the_workload_only(
    engine: Engine, same_as_docker: Check, trappers: dict[str, str]
) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        # dockerd's top needs the PID column; PIDs are the host's (or the VM's), so dropped.
        result = e.docker("top", trapper(e, trappers), "-o", "pid,args")
        rows = [line.split(None, 1) for line in result.stdout.decode().splitlines()]
        commands = sorted(row[1].strip() for row in rows[1:] if len(row) == 2)
        return result.returncode, rows[0] if rows else [], commands

    code, title, commands = same_as_docker("top", scenario)
    assert (code, title) == (0, ["PID", "COMMAND"])
    assert commands == ["sh -c " + TRAPPER, "sleep 300"]


def test_kill_signal_reaches_the_main_process_only(
    engine: Engine, same_as_docker: Check, trappers: dict[str, str]
) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        name = trapper(e, trappers)
        code = e.docker("kill", "-s", "USR1", name).returncode
        logs = wait_for_log(e, name, "wait-returned\nchild-")
        time.sleep(0.5)
        status = e.inspect(name)[0]["State"]["Status"]
        return code, logs, status

    assert same_as_docker("kill-usr1", scenario) == (
        0,
        "ready\ngot-usr1\nwait-returned\nchild-alive\n",
        "running",
    )


def test_kill_exits_137(engine: Engine, same_as_docker: Check, trappers: dict[str, str]) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        name = trapper(e, trappers)
        try:
            killed = e.docker("kill", name).returncode
            waited = e.docker("wait", name, timeout=60).stdout.decode().strip()
            state = e.inspect(name)[0]["State"]
            return killed, waited, state["Status"], state["ExitCode"], state["Running"]
        finally:
            e.docker("rm", "-f", name)

    assert same_as_docker("kill-137", scenario) == (0, "137", "exited", 137, False)


def test_exit_code_and_proc1_stdout_reach_the_logs(engine: Engine, same_as_docker: Check) -> None:
    """``run`` exits with the workload's code; /proc/1/fd/1 and /dev/stdout are the logs."""

    def scenario(e: Engine) -> tuple[Any, ...]:
        name = f"conf-logs-{e.name}"
        e.docker("rm", "-f", name)
        try:
            result = e.docker(
                "run",
                "--name",
                name,
                *e.run_args,
                e.image,
                "sh",
                "-c",
                "echo via-proc > /proc/1/fd/1; echo via-dev > /dev/stdout; exit 3",
            )
            logs = e.docker("logs", name).stdout.decode()
            state = e.inspect(name)[0]["State"]
            return result.returncode, result.stdout.decode(), logs, state["ExitCode"]
        finally:
            e.docker("rm", "-f", name)

    assert same_as_docker("exit-3-logs", scenario) == (
        3,
        "via-proc\nvia-dev\n",
        "via-proc\nvia-dev\n",
        3,
    )


@pytest.mark.parametrize("status", [0, 1])
def test_run_exit_codes(engine: Engine, same_as_docker: Check, status: int) -> None:
    def scenario(e: Engine) -> int:
        return e.run(e.image, "sh", "-c", f"exit {status}").returncode

    assert same_as_docker(f"exit-{status}", scenario) == status


def test_stop_of_a_pid1_that_ignores_term_exits_137(engine: Engine, same_as_docker: Check) -> None:
    """``sleep`` as PID 1 has no TERM handler, so the kernel ignores TERM: stop must KILL."""

    def scenario(e: Engine) -> tuple[Any, ...]:
        name = f"conf-stop-{e.name}"
        e.docker("rm", "-f", name)
        try:
            e.docker("run", "-d", "--name", name, *e.run_args, e.image, "sleep", "300", check=True)
            stopped = e.docker("stop", "-t", "2", name, timeout=60).returncode
            state = e.inspect(name)[0]["State"]
            return stopped, state["Status"], state["ExitCode"]
        finally:
            e.docker("rm", "-f", name)

    assert same_as_docker("stop-137", scenario) == (0, "exited", 137)


def test_init_reaps_and_runs_the_workload_as_its_child(
    engine: Engine, same_as_docker: Check
) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        ran = e.run_kept(
            "--init",
            e.image,
            "sh",
            "-c",
            'tr "\\0" " " </proc/1/cmdline; echo; echo ppid=$PPID; (sleep 0.1 &); sleep 1;'
            " ps -o stat | grep -c Z || true",
        )
        lines = ran.out.splitlines()
        pid1 = lines[0] if lines else ""
        # PID 1 is the init, not the shell; the shell is its child; no zombie is left.
        return (
            ran.code,
            pid1.startswith("sh ") or pid1 == "",
            lines[1:],
            ran.host("Init"),
            ran.inspect.get("Path"),
            len(ran.inspect.get("Args") or []),
        )

    assert same_as_docker("init", scenario) == (0, False, ["ppid=1", "0"], True, "sh", 2)
