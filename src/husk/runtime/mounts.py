"""What a container's mounts become when it starts: the 9p shares its VM gets and the
MOUNT requests its agent answers (docs/VOLUMES.md, "Mounts at start").

- A directory (a bind source, a volume's data directory) is shared as it is. A volume
  whose directory has no owner recorded for the guest yet is presented as root's,
  0755 (Docker's new volume); ``copy_up`` asks the agent to fill an empty one with
  the image's content at the target first (the share is then writable for that
  start even when the mount is read-only: the agent seals it after the copy).
- A regular file is shared through a private directory of the container holding a
  hard link to it (same inode: writes go both ways); where no hard link can be made a
  read-only bind gets a copy and a read-write one fails with the reason.
- Unix sockets are relayed, not shared (:mod:`husk.runtime.socket_relay`).

Bind sources are resolved on the host as the daemon, as Docker resolves them; only
the final file is ever linked (never a symlink, which the guest would follow in its
own root).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from husk.agent.client import REQUEST_TIMEOUT
from husk.errors import HuskError, StartFailed
from husk.spec import BindMount, ContainerSpec
from husk.vm.machine import ShareConfig
from husk.vm.qemu_argv import MAPPED_OWNER_XATTR
from husk.volumes import sized
from husk.volumes.store import DATA as VOLUME_DATA

FILE_SHARES = "files"
"""Under the container's directory: one private directory per single-file bind."""
COPY_UP_TIMEOUT = 600.0
"""A copy-up copies the image's directory through 9p: minutes for a large one under TCG."""
NEW_VOLUME_OWNER = [0, 0, 0o755]
"""uid, gid and mode of a new volume's root, as Docker creates it."""


@dataclass
class MountRequest:
    body: dict[str, Any]
    timeout: float = REQUEST_TIMEOUT

    @property
    def target(self) -> str:
        return str(self.body["target"])


@dataclass
class MountPlan:
    shares: list[ShareConfig] = field(default_factory=list)
    requests: list[MountRequest] = field(default_factory=list)
    """In Docker's order: a mount's parents before it (by the depth of the target)."""


def share_tag(index: int) -> str:
    return f"bind{index}"


def plan_mounts(spec: ContainerSpec, container_dir: Path) -> MountPlan:
    """The shares and MOUNT requests of ``spec``'s binds and tmpfs mounts.

    Makes (afresh) the private directories of single-file binds under ``container_dir``;
    StartFailed names the bind that cannot be made.
    """
    plan = MountPlan()
    for index, bind in enumerate(spec.binds):
        if bind.socket:
            continue
        tag = share_tag(index)
        if bind.volume:
            _ensure_volume_mounted(bind)
        share, body = _bind_share(bind, tag, container_dir / FILE_SHARES / tag)
        plan.shares.append(share)
        timeout = COPY_UP_TIMEOUT if body.get("copy_up") else REQUEST_TIMEOUT
        plan.requests.append(MountRequest(body, timeout))
    for tmpfs in spec.tmpfs:
        plan.requests.append(
            MountRequest(
                {
                    "fstype": "tmpfs",
                    "source": "tmpfs",
                    "target": tmpfs.target,
                    "options": tmpfs.options(),
                }
            )
        )
    plan.requests.sort(key=lambda request: _depth(request.target))
    return plan


def _ensure_volume_mounted(bind: BindMount) -> None:
    """A sized volume's file system is on its directory, or the start fails: without it
    the container would write into the unlimited directory underneath."""
    source = Path(bind.source)
    if (source.name, source.parent.name) != (VOLUME_DATA, bind.volume):
        # A named bind (device=…): a directory the user named, never one with a disk
        # husk made beside it. Its neighbour "disk.ext4" may be anyone's (in /tmp, or
        # written by a guest through a bind of the parent): root never mounts it.
        return
    try:
        sized.ensure_mounted(Path(bind.source))
    except HuskError as err:
        raise StartFailed(f"volume {bind.volume}: {err}") from None


def _depth(target: str) -> int:
    return len([part for part in target.split("/") if part and part != "."])


def _bind_share(bind: BindMount, tag: str, file_dir: Path) -> tuple[ShareConfig, dict[str, Any]]:
    body: dict[str, Any] = {
        "fstype": "9p",
        "source": tag,
        "target": bind.target,
        "readonly": bind.readonly,
    }
    resolved = os.path.realpath(bind.source)
    try:
        fd = os.open(resolved, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StartFailed(
            f'invalid mount config for type "bind": bind source path does not exist: {bind.source}'
        ) from None
    except OSError as exc:
        raise StartFailed(f"bind source {bind.source}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            if bind.volume and not owner_recorded(resolved):
                body["root_owner"] = NEW_VOLUME_OWNER
            if bind.copy_up:
                body["copy_up"] = True
            # A copy-up writes into the share even for a read-only mount.
            readonly = bind.readonly and not bind.copy_up
            return ShareConfig(tag, Path(bind.source), readonly), body
        if not stat.S_ISREG(info.st_mode):
            raise StartFailed(
                f"bind source {bind.source} is neither a directory nor a regular file: "
                "husk cannot share it with the container's VM"
            )
        body["file"] = share_file(fd, info, resolved, file_dir, readonly=bind.readonly)
        return ShareConfig(tag, file_dir, bind.readonly), body
    finally:
        os.close(fd)


def owner_recorded(directory: str) -> bool:
    """Whether a guest already gave the share directory an owner (9p's mapped-xattr keeps
    it in an xattr); without one the guest would see the VM's own uid."""
    try:
        return MAPPED_OWNER_XATTR in os.listxattr(directory)
    except OSError:
        return True  # cannot tell: leave the directory as it is


def share_file(
    fd: int, info: os.stat_result, source: str, directory: Path, *, readonly: bool
) -> str:
    """Puts the regular file open as ``fd`` (O_PATH) in the fresh private ``directory``:
    a hard link to it, else (read-only) a copy. Returns the file's name there."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(directory)  # a previous start's link: the file may be another one now
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.mkdir(mode=0o700)
    if os.geteuid() == 0:
        # The jail maps the share directory's owner to the VM's uid: as the file's
        # owner, QEMU gets the owner's access to it.
        os.chown(directory, info.st_uid, info.st_gid)
    name = os.path.basename(source)
    destination = directory / name
    target_dir = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # linkat(…, AT_SYMLINK_FOLLOW) of the descriptor's /proc link: the very file
        # checked above (CPython calls link(2), which would not follow, without a dir fd).
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=target_dir, follow_symlinks=True)
        return name
    except OSError as exc:
        if not readonly:
            raise StartFailed(
                f"cannot bind the file {source} read-write: {_why_no_link(exc, directory)}. "
                "A single file is shared through a hard link; bind its directory instead, "
                "or bind the file read-only (:ro) to share a copy"
            ) from None
    finally:
        os.close(target_dir)
    _copy_file(fd, info, source, destination)
    return name


def _why_no_link(exc: OSError, directory: Path) -> str:
    if exc.errno == errno.EXDEV:
        return f"it is on another file system than husk's container directory {directory.parent}"
    if exc.errno == errno.EPERM:
        return "the kernel refuses a hard link to it (fs.protected_hardlinks)"
    return f"no hard link can be made to it ({exc.strerror})"


def _copy_file(fd: int, info: os.stat_result, source: str, destination: Path) -> None:
    try:
        with (
            open(f"/proc/self/fd/{fd}", "rb") as reader,
            open(destination, "xb") as writer,
        ):
            shutil.copyfileobj(reader, writer, 1024 * 1024)
        os.chmod(destination, stat.S_IMODE(info.st_mode) & 0o777)
        if os.geteuid() == 0:
            os.chown(destination, info.st_uid, info.st_gid)
    except OSError as exc:
        raise StartFailed(f"cannot copy the bound file {source}: {exc.strerror}") from None
