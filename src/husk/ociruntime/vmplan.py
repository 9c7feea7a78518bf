"""What the keeper's VM is made of: the bundle's root and mounts as shares and MOUNT bodies.

The root file system directory is the share tagged ``root``. Directory binds are shares
of their own; a file bind shares a private directory holding only that file
(:mod:`husk.ociruntime.fileshare`) and the guest binds the one file
(:func:`husk.guest.agent.container_root.mount_into_root`'s ``file``). Binds from one
directory share it once, and tags are numbered in order, so containers of the same
shape (podman's and docker's file binds all come from one directory) restore from the
same boot template.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from husk.ociruntime.bundle import Bundle, Mount
from husk.ociruntime.errors import RuntimeFailure
from husk.ociruntime.fileshare import FileBind
from husk.vm.machine import ShareConfig

ROOT_TAG = "root"
SECURITY_MODEL = "none"
"""The engine's files as they are (symlinks, modes): mapped-xattr would hide host
symlinks and record guest owners in xattrs of the engine's directories."""


@dataclass
class VmPlan:
    shares: list[ShareConfig] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    """MOUNT bodies, a mount's parents before it."""
    files: list[FileBind] = field(default_factory=list)
    """Single-file binds the keeper makes (:func:`husk.ociruntime.fileshare.bind`)."""


def _depth(target: str) -> int:
    return len([part for part in target.split("/") if part])


def plan(bundle: Bundle, files_dir: Path) -> VmPlan:
    """``files_dir``: the container's private directory for single-file binds."""
    result = VmPlan(shares=[ShareConfig(ROOT_TAG, bundle.rootfs, security_model=SECURITY_MODEL)])
    by_directory: dict[tuple[str, bool], str] = {}

    def share(directory: str, readonly: bool, *, file: str = "") -> str:
        key = (directory, readonly)
        if file or key not in by_directory:
            tag = f"m{len(result.shares)}"
            if file:
                # Never the file's own directory: only the file, bound by the keeper.
                result.files.append(FileBind(file, files_dir / tag, readonly))
                directory = str(files_dir / tag)
            result.shares.append(
                ShareConfig(tag, Path(directory), readonly, security_model=SECURITY_MODEL)
            )
            if file:
                return tag
            by_directory[key] = tag
        return by_directory[key]

    for mount in sorted(bundle.mounts, key=lambda m: _depth(m.destination)):
        result.mounts.append(_mount_body(mount, share))
    return result


def _mount_body(mount: Mount, share: Any) -> dict[str, Any]:
    if mount.kind == "tmpfs":
        options = mount.options or "mode=1777"
        return {
            "fstype": "tmpfs",
            "source": "tmpfs",
            "target": mount.destination,
            "options": options,
            "readonly": mount.readonly,
        }
    source = os.path.realpath(mount.source)
    try:
        info = os.stat(source)
    except FileNotFoundError:
        raise RuntimeFailure(
            f"bind mount source {mount.source} for {mount.destination} does not exist"
        ) from None
    except OSError as exc:
        raise RuntimeFailure(f"bind mount source {mount.source}: {exc.strerror}") from None
    if "," in source:
        raise RuntimeFailure(f"bind mount source {source} must not contain a comma")
    body: dict[str, Any] = {
        "fstype": "9p",
        "target": mount.destination,
        "readonly": mount.readonly,
    }
    if stat.S_ISDIR(info.st_mode):
        body["source"] = share(source, mount.readonly)
    elif stat.S_ISREG(info.st_mode):
        directory, name = os.path.split(source)
        # A 9p share can be mounted once at a time, and a file bind keeps its share
        # mounted: every file bind gets a share of its own.
        body["source"] = share(directory, mount.readonly, file=source)
        body["file"] = name
    else:
        raise RuntimeFailure(
            f"bind mount of {mount.source} on {mount.destination} is not supported: "
            "only directories and regular files can be shared with the VM"
        )
    return body
