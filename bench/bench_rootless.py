"""Rootless mode (issue 17): `husk run --rm true` as root and as an unprivileged user, paired.

Run as root. Two installations side by side, each with a daemon its CLI starts on demand
and the busybox test image in its own store:

- ``root``: this checkout's CLI with HUSK_DATA_DIR / HUSK_RUN_DIR under a scratch
  directory and the installed guest bundle linked in;
- ``user``: a throwaway unprivileged user (removed afterwards) running this checkout's
  code with Debian's /usr/bin/python3 from a venv of its own, an ordinary PATH, its XDG
  directories under the scratch directory and a root-owned copy of the same bundle as
  the system bundle (tests/userenv.py, as tests/test_rootless_vm.py does).

Both warm up (the first start builds the template); then runs alternate (root, user,
root, user ...), so load on the host falls on both alike. Both run under TCG.

    python3 bench/bench_rootless.py [--runs 10] [--quick] [--json]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import benchlib
from benchlib import Figure, PartOptions, progress

SECTION = "rootless mode (issue 17)"
COMMAND = "husk run --rm husk.local/busybox true"
TIMEOUT = 300.0


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return seconds


def measure(options: PartOptions) -> list[Figure]:
    if os.geteuid() != 0:
        return [Figure(SECTION, "`run --rm true`", "s", status="not available: run as root")]
    benchlib.import_tests_helpers()
    from husk.bundle import locate
    from userenv import BUSYBOX, add_user, import_busybox, prepare_base, remove_user

    runs = 2 if options.quick else options.runs
    samples: dict[str, list[float]] = {"root": [], "user": []}
    base = prepare_base(locate().kernel.parent)
    try:
        with benchlib.scratch_root("hbrl") as root:
            benchlib.link_bundle(root)
            benchlib.import_busybox(root)
            root_env = benchlib.husk_env(root)
            root_argv = [sys.executable, "-m", "husk.cli.main", "run", "--rm", BUSYBOX, "true"]
            progress("rootless: creating the unprivileged user and its venv")
            user = add_user(base, None)
            try:
                import_busybox(user, base)
                for label, run in (
                    ("root", lambda: _timed(root_argv, root_env)),
                    ("user", lambda: _user_run(user)),
                ):
                    progress(f"rootless: warm-up ({label}: daemon start, template build)")
                    run()
                for index in range(runs):
                    for label, run in (
                        ("root", lambda: _timed(root_argv, root_env)),
                        ("user", lambda: _user_run(user)),
                    ):
                        progress(f"rootless: {COMMAND} as {label}, run {index + 1}/{runs}")
                        samples[label].append(run())
                log = (user.runtime_dir / "husk" / "daemon.log").read_text(errors="replace")
                from_template = log.count(": VM from template")
            finally:
                remove_user(user)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    figures = [
        Figure(SECTION, f"`run --rm true`, template path, as {label}", "s", samples[label],
               COMMAND + ("" if label == "root" else "  (runuser -u USER, the user's daemon)"))
        for label in ("root", "user")
    ]  # fmt: skip
    root_median = figures[0].median or 0.0
    user_median = figures[1].median or 0.0
    figures.append(
        Figure(
            SECTION,
            "user / root (medians, same run)",
            "x",
            summary=(user_median / root_median if root_median else 0.0, None, None),
            derived=True,
            note=f"{from_template} of the user's starts came from a template",
        )
    )
    return figures


def _user_run(user: object) -> float:
    from userenv import BUSYBOX, User

    assert isinstance(user, User)
    started = time.monotonic()
    done = user.husk("run", "--rm", BUSYBOX, "true", timeout=TIMEOUT)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"as {user.name}: exit {done.returncode}: {done.stderr.strip()}")
    return seconds


if __name__ == "__main__":
    benchlib.part_main("rootless", __doc__ or "", measure)
