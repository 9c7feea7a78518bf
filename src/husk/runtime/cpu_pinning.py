"""``--cpuset-cpus``: a VM's threads (its vCPUs among them) run only on the host CPUs named.

Docker confines a container's processes to those CPUs with the cpuset cgroup; a
husk container's processes are the threads of its QEMU, so each of them gets the
same affinity. Threads QEMU starts later inherit it from the thread creating them.
"""

from __future__ import annotations

import os
from pathlib import Path

from husk.confinement import parse_cpuset
from husk.errors import StartFailed


def pin(pid: int, cpuset: str) -> None:
    """Sets the CPU affinity of every thread of process ``pid`` (raises StartFailed)."""
    cpus = set(parse_cpuset(cpuset))
    try:
        threads = [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir()]
    except OSError as err:
        raise StartFailed(f"cannot pin the VM to CPUs {cpuset}: {err.strerror}") from None
    for thread in threads:
        try:
            os.sched_setaffinity(thread, cpus)
        except ProcessLookupError:
            continue  # a thread that just ended
        except OSError as err:
            raise StartFailed(
                f"cannot pin the VM to CPUs {cpuset} (--cpuset-cpus): {err.strerror}"
            ) from None


def vcpus_for_cpuset(cpuset: str | None) -> int | None:
    """Without ``--cpus``, a VM gets one vCPU per CPU of its set (as many as Docker's
    container could use at once); None without a set."""
    return len(parse_cpuset(cpuset)) if cpuset else None
