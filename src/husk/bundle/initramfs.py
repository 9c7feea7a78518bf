"""The guest's root file system: busybox, /init, kernel modules, the agent; and its archive.

Boot sequence, kept tiny because every step is slow under TCG: the kernel
runs /init (a busybox script), which starts loading modules in the background,
records that job's pid, and execs CPython on the agent. The loader becomes a
child of the agent (PID 1 after exec), which waits for it before it needs a
device; the loader's exit status is non-zero if a module failed to load.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from husk.bundle import cpio
from husk.bundle.modules import ModuleInfo

BUSYBOX = "bin/busybox"
# Applets the boot scripts and the agent call; each is a symlink to busybox.
APPLETS: tuple[str, ...] = (
    "cat",
    "dmesg",
    "echo",
    "grep",
    "hostname",
    "insmod",
    "ip",
    "kill",
    "ls",
    "lsmod",
    "mkdir",
    "mount",
    "poweroff",
    "ps",
    "reboot",
    "rm",
    "sh",
    "sleep",
    "sync",
    "true",
    "umount",
)
MODULES_DIR = "lib/modules"
MODULES_LIST = "etc/husk/modules"
MODULES_LOADER = "etc/husk/load-modules.sh"
MODULES_PID = "etc/husk/modules.pid"
AGENT_LIB = "husk/lib"
AGENT_ENTRY = "husk/init.py"
GUEST_PYTHON = "/usr/bin/python3.11"

DEFAULT_AGENT_ENTRY = (
    'import sys; sys.path.insert(0, "/husk/lib"); from husk.guest.agent.main import main; main()\n'
)

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox sh /{MODULES_LOADER} &
echo $! >/{MODULES_PID}
exec {GUEST_PYTHON} -I -S -B /{AGENT_ENTRY}
"""

# Mount points and directories the agent expects to exist, with their permissions.
EMPTY_DIRECTORIES: tuple[tuple[str, int], ...] = (
    ("dev", 0o755),
    ("etc", 0o755),
    ("mnt", 0o755),
    ("proc", 0o555),
    ("run", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
)
DEVICE_NODES: tuple[tuple[str, int, int, int], ...] = (
    ("dev/console", 5, 1, 0o600),
    ("dev/null", 1, 3, 0o666),
    ("dev/zero", 1, 5, 0o666),
    ("dev/random", 1, 8, 0o666),
    # CPython reads it at startup when getrandom() would block (early boot, no entropy yet).
    ("dev/urandom", 1, 9, 0o666),
)


def install_busybox(root: Path, busybox: Path) -> None:
    target = root / BUSYBOX
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, target)
    target.chmod(0o755)
    for applet in APPLETS:
        (target.parent / applet).symlink_to("busybox")


def loader_script(modules: list[ModuleInfo]) -> str:
    err = f"/{MODULES_LOADER}.err"
    lines = [
        "# Load the guest's kernel modules in dependency order (written by husk bundle build).",
        "failed=0",
        "l() {",
        f"  insmod /{MODULES_DIR}/$1.ko 2>{err} && return",
        f"  grep -q 'File exists' {err} && return",
        f'  echo "husk: cannot load kernel module $1: $(cat {err})" >/dev/console',
        "  failed=1",
        "}",
        *(f"l {module.name}" for module in modules),
        f"rm -f {err}",
        "exit $failed",
    ]
    return "\n".join(lines) + "\n"


def install_modules(root: Path, modules: list[ModuleInfo]) -> None:
    directory = root / MODULES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    for module in modules:
        shutil.copyfile(module.path, directory / f"{module.name}.ko")
    (root / MODULES_LIST).parent.mkdir(parents=True, exist_ok=True)
    (root / MODULES_LIST).write_text("".join(f"{module.name}\n" for module in modules))
    (root / MODULES_LOADER).write_text(loader_script(modules))


def install_on_demand(root: Path, feature: str, modules: list[ModuleInfo]) -> None:
    """Modules the agent loads itself when ``feature`` is first used: the .ko files, and
    their load order in ``etc/husk/modules.<feature>``; the boot loader never sees them."""
    directory = root / MODULES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    for module in modules:
        shutil.copyfile(module.path, directory / f"{module.name}.ko")
    listing = root / f"{MODULES_LIST}.{feature}"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"{module.name}\n" for module in modules))


def install_agent(root: Path, husk_package: Path, entry: str | None) -> None:
    """Copy ``husk/__init__.py`` and the stdlib-only ``husk.guest`` package, and the entry."""
    target = root / AGENT_LIB / "husk"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(husk_package / "__init__.py", target / "__init__.py")
    guest = husk_package / "guest"
    for source in sorted(guest.rglob("*.py")):
        relative = source.relative_to(husk_package)
        if "__pycache__" in relative.parts:
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target / relative)
    (root / AGENT_ENTRY).write_text(DEFAULT_AGENT_ENTRY if entry is None else entry)


def install_init(root: Path) -> None:
    init = root / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)


def _tree_entries(root: Path) -> Iterator[cpio.Entry]:
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        here = Path(directory)
        for name in [*subdirs, *sorted(files)]:
            path = here / name
            relative = path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                yield cpio.symlink(relative, os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                yield cpio.directory(relative)
            elif stat.S_ISREG(info.st_mode):
                executable = info.st_mode & 0o111
                yield cpio.regular(relative, path.read_bytes(), 0o755 if executable else 0o644)
            else:
                raise ValueError(f"unexpected file type in the initramfs tree: {relative}")


def write_archive(root: Path, output: Path, mtime: int) -> None:
    """Archive the tree at ``root`` plus the fixed directories and device nodes."""
    entries = {entry.path: entry for entry in _tree_entries(root)}
    for path, permissions in EMPTY_DIRECTORIES:
        entries[path] = cpio.directory(path, permissions)
    for path, major, minor, permissions in DEVICE_NODES:
        entries[path] = cpio.char_device(path, major, minor, permissions)
    with output.open("wb") as stream:
        cpio.write_newc(stream, entries.values(), mtime=mtime)
