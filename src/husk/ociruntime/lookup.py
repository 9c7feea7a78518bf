"""Finding the workload's program in the engine's root file system before the VM boots.

runc fails ``create`` when ``process.args[0]`` cannot be found, and engines turn that
message ("executable file not found in $PATH", "no such file or directory") into exit
status 127. husk-runtime checks the same in the rootfs directory, resolving symlinks
as the container would (an absolute link points into the rootfs, never out of it).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from husk.ociruntime.errors import RuntimeFailure

MAX_LINKS = 40
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def resolve(rootfs: Path, path: str) -> Path | None:
    """``path`` of the container (absolute) as a host path inside ``rootfs``; None if missing."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = rootfs.joinpath(*resolved, part)
        try:
            info = os.lstat(candidate)
        except OSError:
            return None
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > MAX_LINKS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return rootfs.joinpath(*resolved)


def _executable(host_path: Path | None) -> bool:
    if host_path is None:
        return False
    try:
        info = os.stat(host_path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)


def check_program(rootfs: Path, program: str, env: list[str], cwd: str = "/") -> None:
    """RuntimeFailure with runc's words when ``program`` cannot run in the container."""
    if "/" in program:
        where = program if program.startswith("/") else os.path.join(cwd, program)
        found = resolve(rootfs, where)
        if found is None:
            raise RuntimeFailure(f'exec: "{program}": stat {program}: no such file or directory')
        if not _executable(found):
            raise RuntimeFailure(f'exec: "{program}": permission denied')
        return
    path = DEFAULT_PATH
    for entry in env:
        if entry.startswith("PATH="):
            path = entry[5:]
    for directory in path.split(":"):
        if directory.startswith("/") and _executable(resolve(rootfs, f"{directory}/{program}")):
            return
    raise RuntimeFailure(f'exec: "{program}": executable file not found in $PATH')
