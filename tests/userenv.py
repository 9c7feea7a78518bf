"""A Python environment an unprivileged test user can run husk from, installed nowhere global.

The test session's interpreter may live where other users cannot read it (pyenv under
/root), so the user gets a venv made with Debian's ``/usr/bin/python3`` and copies of
husk's dependency distributions (found through ``importlib.metadata``, as pip installed
them for this interpreter); husk itself comes from the worktree through ``PYTHONPATH``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
HUSK_REQUIREMENTS = ("click", "rich", "qemu.qmp", "aiohttp", "zstandard")


def _requirement_name(text: str) -> str | None:
    """The distribution a requirement names, unless it applies only to an extra."""
    if "extra ==" in text:
        return None
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)", text)
    return match.group(1) if match else None


def dependency_closure(names: tuple[str, ...]) -> list[metadata.Distribution]:
    """Every installed distribution ``names`` need, themselves included."""
    seen: dict[str, metadata.Distribution] = {}
    pending = list(names)
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an environment marker excluded it (e.g. a backport for older Pythons)
        seen[key] = dist
        for requirement in dist.requires or []:
            dependency = _requirement_name(requirement)
            if dependency:
                pending.append(dependency)
    return list(seen.values())


def make_user_venv(target: Path) -> Path:
    """A venv at ``target`` with husk's dependencies; returns its python."""
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(target)], check=True)
    (site,) = target.glob("lib/python3*/site-packages")
    for dist in dependency_closure(HUSK_REQUIREMENTS):
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if ".." in file.parts or not source.is_file():
                continue
            destination = site / file
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
    return target / "bin" / "python3"
