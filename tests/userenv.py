"""A Python environment an unprivileged test user can run husk from, installed nowhere global.

The test session's interpreter may live where other users cannot read it (pyenv under
/root), so the user gets a venv made with Debian's ``/usr/bin/python3`` and copies of
husk's dependency distributions (found through ``importlib.metadata``, as pip installed
them for this interpreter); husk itself comes from the worktree through ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from husk.tools import find_tool
from testimages import busybox_image_layout

SYSTEM_PYTHON = "/usr/bin/python3"
HUSK_REQUIREMENTS = ("click", "rich", "qemu.qmp", "aiohttp", "zstandard")
REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 240.0
USER_PATH = "/usr/local/bin:/usr/bin:/bin"  # Debian's PATH for an ordinary user: no /sbin
BUSYBOX = "husk.local/busybox:latest"
RUNUSER = find_tool("runuser") or "/usr/sbin/runuser"
UNSHARE = find_tool("unshare") or "/usr/bin/unshare"
TUN_DEVICE = Path("/dev/net/tun")


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


# -- throwaway users (root only) -------------------------------------------------------------


def prepare_base(bundle_dir: Path) -> Path:
    """A directory under /tmp everyone can read, holding husk's code, import-busybox.sh and
    a root-owned copy of the guest bundle (``system/bundle``) and husk.local/busybox
    (``system/images``), as a package and install.sh would leave them. The caller
    removes it."""
    base = Path(tempfile.mkdtemp(prefix="husk-rl-", dir="/tmp"))
    base.chmod(0o755)
    shutil.copytree(REPO / "src" / "husk", base / "src" / "husk",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy2(REPO / "scripts" / "import-busybox.sh", base / "import-busybox.sh")
    bundle = base / "system" / "bundle"
    bundle.mkdir(parents=True)
    for name in ("vmlinux", "initramfs.cpio", "manifest.json"):
        shutil.copy2(bundle_dir / name, bundle / name)
    if TUN_DEVICE.exists() and TUN_DEVICE.stat().st_mode & 0o006 != 0o006:
        os.mknod(base / "tun", stat.S_IFCHR | 0o666, os.makedev(10, 200))
    # husk.local/busybox installed for every user, as install.sh does (an OCI layout here).
    busybox_image_layout(base / "system" / "images" / "husk.local" / "busybox" / "latest")
    for root, dirs, files in os.walk(base):
        for entry in dirs:
            os.chmod(os.path.join(root, entry), 0o755)
        for entry in files:
            mode = 0o755 if entry.endswith(".sh") else 0o666 if entry == "tun" else 0o644
            os.chmod(os.path.join(root, entry), mode)
    return base


@dataclass
class User:
    name: str
    uid: int
    home: Path
    runtime_dir: Path
    env: dict[str, str]
    python: Path
    tun: Path | None = None
    """A 0666 tun device node to see as /dev/net/tun (see :meth:`run`)."""

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "husk" / "husk.sock"

    def run(
        self, *argv: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        prefix: list[str] = []
        if self.tun is not None:
            # Debian's /dev/net/tun is 0666; where the host's is not, the user's commands
            # (and so the daemon they start, and its slirp4netns) see a 0666 node bound over
            # it in a mount namespace of their own: the host is not changed.
            prefix = [UNSHARE, "--mount", "--propagation", "private", "sh", "-c",
                      'mount --bind "$0" /dev/net/tun && exec "$@"', str(self.tun)]  # fmt: skip
        return subprocess.run(
            [*prefix, RUNUSER, "-u", self.name, "--", *argv],
            env={**self.env, **(env or {})},
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def husk(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.python), "-m", "husk.cli.main", *args, **kwargs)  # type: ignore[arg-type]

    def ok(self, *args: str) -> str:
        done = self.husk(*args)
        assert done.returncode == 0, f"husk {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout


def add_user(base: Path, python: Path | None) -> User:
    name = f"hrl{secrets.token_hex(4)}"
    home = base / name
    useradd = find_tool("useradd") or "useradd"
    subprocess.run(
        [useradd, "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh",
         "--user-group", name],
        check=True,
    )  # fmt: skip
    entry = pwd.getpwnam(name)
    home.mkdir(mode=0o700)
    runtime_dir = base / f"run-{name}"
    runtime_dir.mkdir(mode=0o700)  # what pam_systemd makes as /run/user/UID
    if python is None:
        python = make_user_venv(home / "venv")
    for path in (home, runtime_dir):
        subprocess.run(["chown", "-R", f"{entry.pw_uid}:{entry.pw_gid}", str(path)], check=True)
    env = {
        "HOME": str(home),
        "USER": name,
        "LOGNAME": name,
        "PATH": USER_PATH,
        "LANG": "C.UTF-8",
        "XDG_RUNTIME_DIR": str(runtime_dir),
        "PYTHONPATH": str(base / "src"),
        "HUSK_SYSTEM_BUNDLE": str(base / "system" / "bundle"),
        "HUSK_SYSTEM_IMAGES": str(base / "system" / "images"),
        "HUSK_ACCEL": "tcg",
    }
    tun = base / "tun"
    return User(name, entry.pw_uid, home, runtime_dir, env, python, tun if tun.exists() else None)


def kill_processes_of(uid: int) -> None:
    """SIGKILLs every process of ``uid`` (a user this module made: all of them are ours)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    os.kill(int(entry.name), 9)
            except OSError:
                pass


def remove_user(user: User) -> None:
    try:
        user.husk("rm", "-f", *user.husk("ps", "-aq").stdout.split())
    finally:
        kill_processes_of(user.uid)
        time.sleep(0.2)
        userdel = find_tool("userdel") or "/usr/sbin/userdel"
        subprocess.run([userdel, user.name], check=False, capture_output=True)


def import_busybox(user: User, base: Path) -> None:
    """husk.local/busybox in ``user``'s own image store (scripts/import-busybox.sh)."""
    done = user.run(
        "bash", str(base / "import-busybox.sh"), BUSYBOX,
        env={"HUSK": f"{user.python} -m husk.cli.main"},
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"import-busybox.sh as {user.name}: {done.stdout}{done.stderr}")
