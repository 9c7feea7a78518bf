"""Assembling the container's root: read-only image disk + writable layer, runc-style /dev.

The agent itself stays in the initramfs root (its CPython lives there); only the
workload and exec processes enter this root, in their own namespaces
(:mod:`husk.guest.agent.isolation`). Every path of the container the agent
touches here is resolved inside this root (:mod:`husk.guest.agent.beneath`): an
image's symlinks never lead the agent's mounts or writes into its own files.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from typing import Any

from husk.guest.agent import beneath, copyup, syscalls
from husk.guest.agent.loop import log
from husk.guest.agent.mounts import mount
from husk.guest.agent.system import SystemError_, block_device_for_serial
from husk.guest.netconfig import GUEST_DNS

STATE = "/run/husk"
IMAGE_MOUNT = f"{STATE}/image"
UPPER_MOUNT = f"{STATE}/upper"
ROOT = f"{STATE}/root"
SHARES = f"{STATE}/shares"
"""Where a share is mounted first when the agent must work in it before the container
sees it (copy-up, a single file); detached once bound into the container."""
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288,cache=mmap"
_TAG = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,30}")

# (name, mode, major, minor) of runc's default device set.
_DEVICES = (
    ("null", 0o666, 1, 3),
    ("zero", 0o666, 1, 5),
    ("full", 0o666, 1, 7),
    ("random", 0o666, 1, 8),
    ("urandom", 0o666, 1, 9),
    ("tty", 0o666, 5, 0),
)
_DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("core", "/proc/kcore"),
    ("ptmx", "pts/ptmx"),
)

DEFAULT_HOSTS = """127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
ff00::0\tip6-mcastprefix
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""


DEFAULT_DNS = GUEST_DNS
"""The resolver of QEMU's user-mode network."""


def write_hosts(hostname: str, address: str | None, extra: list[str]) -> None:
    """/etc/hosts as Docker writes it: localhost, the ``--add-host`` lines, then our name."""
    lines = [*extra]
    if address:
        lines.append(f"{address}\t{hostname}")
    _write_file("/etc/hosts", DEFAULT_HOSTS + "".join(f"{line}\n" for line in lines))


def write_resolv_conf(servers: list[str], search: list[str], options: list[str]) -> None:
    """/etc/resolv.conf: the given servers (else slirp's resolver), search and options."""
    text = "".join(f"nameserver {server}\n" for server in servers or [DEFAULT_DNS])
    if search:
        text = "search " + " ".join(search) + "\n" + text
    if options:
        text += "options " + " ".join(options) + "\n"
    _write_file("/etc/resolv.conf", text)


def read_text(path: str, limit: int = 1 << 16) -> str | None:
    """The container's file ``path`` (None: missing or unreadable)."""
    try:
        return beneath.read_file(ROOT, path, limit).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None


def write_text(path: str, content: str) -> None:
    """Writes the container's file ``path`` afresh (never through a link)."""
    _write_file(path, content)


def prepared() -> bool:
    return os.path.ismount(ROOT)


def write_dockerenv() -> None:
    """An empty /.dockerenv (0755, as Docker makes it): tools such as testcontainers
    check for it to know they run inside a container."""
    _write_file("/.dockerenv", "")
    # write_file left a fresh regular file there (never a link), and nothing of the
    # container runs yet, so the path is safe to use.
    os.chmod(inside("/.dockerenv"), 0o755)


def inside(path: str) -> str:
    """``path`` of the container, as seen from the agent's root."""
    return ROOT + "/" + path.lstrip("/")


def _populate_dev() -> None:
    dev = inside("/dev")
    for name, mode, major, minor in _DEVICES:
        node = f"{dev}/{name}"
        os.mknod(node, 0o020000 | mode, os.makedev(major, minor))
        os.chmod(node, mode)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")


def _write_file(path: str, content: str) -> None:
    # The image may ship these as symlinks (e.g. into /run); never write through one.
    try:
        beneath.write_file(ROOT, path, content)
    except OSError as exc:
        raise SystemError_(f"cannot write {path} in the container: {exc.strerror}") from None


def _directory(path: str, *, follow: bool) -> int:
    """An O_PATH descriptor of the container's directory ``path``, made if missing."""
    try:
        fd = beneath.open_path(ROOT, path, create_dirs=True, follow=follow)
    except OSError as exc:
        raise SystemError_(f"{path} in the container: {exc.strerror}") from None
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        kind = "not a directory" if follow else "a symlink or not a directory"
        raise SystemError_(f"{path} in the image is {kind}: refusing to mount over it")
    return fd


def _mount_inside(fstype: str, source: str, path: str, options: str = "") -> None:
    # An image whose /proc or /dev is a symlink must not get a mount outside its root.
    fd = _directory(path, follow=False)
    try:
        mount(fstype, source, beneath.proc_path(fd), options)
    finally:
        os.close(fd)


def prepare(body: dict[str, Any], address: str | None) -> dict[str, Any]:
    """Handles PREPARE: mounts the layers and writes the identity files."""
    if body.get("identity_only") is True:
        return _reidentify(body, address)
    if os.path.ismount(ROOT):
        raise SystemError_("the container root is already prepared")
    if body.get("root_share"):
        return _prepare_shared_root(body)
    image_serial = str(body.get("image") or "husk-image")
    upper_serial = body.get("upper")
    image_dev = block_device_for_serial(image_serial)
    mount("erofs", image_dev, IMAGE_MOUNT, "ro")
    if upper_serial:
        mount("ext4", block_device_for_serial(str(upper_serial)), UPPER_MOUNT)
    else:
        mount("tmpfs", "upper", UPPER_MOUNT, "mode=0755")
    for directory in ("upper", "work"):
        os.makedirs(f"{UPPER_MOUNT}/{directory}", exist_ok=True)
    overlay = f"lowerdir={IMAGE_MOUNT},upperdir={UPPER_MOUNT}/upper,workdir={UPPER_MOUNT}/work"
    mount("overlay", "overlay", ROOT, overlay)
    if body.get("maintenance"):
        # A stopped container's files are served (cp, export, diff): its writable
        # layer gets nothing but what the host's requests put there.
        return {"root": ROOT}
    _system_mounts()
    _write_identity(body, address)
    write_dockerenv()
    for extra in body.get("mounts") or []:
        mount_into_root(extra)
    return {"root": ROOT}


def _write_identity(body: dict[str, Any], address: str | None) -> None:
    """The container's hostname and its files: /etc/hostname, hosts, resolv.conf."""
    hostname = str(body.get("hostname") or "husk")
    socket.sethostname(hostname)
    _write_file("/etc/hostname", hostname + "\n")
    if body.get("hosts_later") is not True:
        # (The runtime's NETWORK message writes it next, with the container's address.)
        write_hosts(hostname, address, [str(e) for e in body.get("extra_hosts") or []])
    write_resolv_conf(
        [str(d) for d in body.get("dns") or []],
        [str(d) for d in body.get("dns_search") or []],
        [],
    )


def _reidentify(body: dict[str, Any], address: str | None) -> dict[str, Any]:
    """PREPARE with ``identity_only``: a VM restored from a root-ready snapshot (its root
    assembled before the save) gets this container's identity written over the
    snapshot's. Only before the workload: nothing of a container may have run in it."""
    if not os.path.ismount(ROOT):
        raise SystemError_("identity_only needs a prepared root (a root-ready snapshot)")
    _write_identity(body, address)
    return {"root": ROOT}


def _system_mounts() -> None:
    """/sys, /dev (runc's devices), /dev/pts and /dev/shm of the container."""
    # /proc is mounted by the workload itself, for its own PID namespace.
    os.close(_directory("/proc", follow=False))
    _mount_inside("sysfs", "sysfs", "/sys", "ro,nosuid,nodev,noexec")
    _mount_inside("tmpfs", "tmpfs", "/dev", "nosuid,mode=755,size=65536k")
    _mount_inside("devpts", "devpts", "/dev/pts", "newinstance,ptmxmode=0666,mode=0620,gid=5")
    _mount_inside("tmpfs", "shm", "/dev/shm", "nosuid,nodev,mode=1777")
    # The overlay root inherits the image's mode; a workdir like /tmp must stay usable.
    _populate_dev()


def _prepare_shared_root(body: dict[str, Any]) -> dict[str, Any]:
    """PREPARE with ``root_share``: the root is a host directory shared over 9p (an OCI
    engine's assembled rootfs, husk-runtime). The engine owns that directory and its
    identity files (it binds /etc/hosts, resolv.conf, hostname): nothing is written
    into it but the mount points the bundle asks for."""
    tag = str(body["root_share"])
    if not _TAG.fullmatch(tag):
        raise SystemError_(f"root_share must be a share's tag, not {tag!r}")
    # root.readonly is the RUN body's read_only (as docker's --read-only): the mount
    # points below are made first.
    mount("9p", tag, ROOT, NINEP_OPTIONS)
    _system_mounts()
    hostname = str(body.get("hostname") or "husk")
    socket.sethostname(hostname)
    for extra in body.get("mounts") or []:
        mount_into_root(extra)
    return {"root": ROOT}


def mount_into_root(body: dict[str, Any]) -> dict[str, Any]:
    """Handles MOUNT: a 9p share or a tmpfs at a path inside the container.

    A 9p body may also carry ``file`` (the share holds that one file, bound onto the
    target), ``copy_up`` (fill an empty share with the image's content at the target
    first) and ``root_owner`` ([uid, gid, mode] the share's root takes first: a new
    volume's). See docs/VOLUMES.md.
    """
    if not os.path.ismount(ROOT):
        raise SystemError_("the container root is not prepared yet")
    target = str(body["target"])
    if not target.startswith("/") or ".." in target.split("/"):
        raise SystemError_(f"mount target must be an absolute path without '..': {target!r}")
    fstype = str(body["fstype"])
    readonly = bool(body.get("readonly"))
    if fstype == "9p":
        tag = str(body.get("source") or "")
        if not _TAG.fullmatch(tag):
            raise SystemError_(f"a 9p mount needs the share's tag as source, not {tag!r}")
        if body.get("file") is not None:
            _mount_file(tag, str(body["file"]), target, readonly)
            return {"target": target}
        owner = body.get("root_owner")
        if body.get("copy_up") or owner is not None:
            _mount_volume(tag, target, readonly, bool(body.get("copy_up")), _owner(owner))
            return {"target": target}
        options = NINEP_OPTIONS
        source = tag
    elif fstype == "tmpfs":
        options = str(body.get("options") or "mode=1777")
        source = "tmpfs"
    else:
        raise SystemError_(f"mount type {fstype!r} is not supported (9p, tmpfs)")
    if readonly:
        options += ",ro"
    # Symlinks on the way are followed as the container would (Docker does the same),
    # never out of its root.
    fd = _directory(target, follow=True)
    try:
        mount(fstype, source, beneath.proc_path(fd), options)
    finally:
        os.close(fd)
    return {"target": target}


def _owner(value: Any) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise SystemError_("root_owner must be [uid, gid, mode]")
    return value[0], value[1], value[2] & 0o7777


def _stage(tag: str) -> str:
    """Mounts the share (read-write) at the agent's own staging point for it."""
    staging = f"{SHARES}/{tag}"
    mount("9p", tag, staging, NINEP_OPTIONS)
    return staging


def _unstage(staging: str) -> None:
    # Detached: the bind made from it keeps the share mounted where the container sees it.
    try:
        syscalls.umount(staging, syscalls.MNT_DETACH)
        os.rmdir(staging)
    except OSError as exc:
        log(f"cannot remove the staging mount {staging}: {exc}")


def _bind(source: str, target: str, what: str) -> None:
    try:
        syscalls.mount(source, target, None, syscalls.MS_BIND)
    except OSError as exc:
        raise SystemError_(f"mounting {what} failed: {os.strerror(exc.errno or 0)}") from None


def _seal(staging: str, readonly: bool) -> None:
    """Makes the staging mount read-only when asked: the binds made from it inherit that."""
    if readonly:
        flags = syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY
        try:
            syscalls.mount(None, staging, None, flags)
        except OSError as exc:
            raise SystemError_(f"making a share read-only failed: {exc.strerror}") from None


def _mount_volume(
    tag: str, target: str, readonly: bool, copy_up: bool, owner: tuple[int, int, int] | None
) -> None:
    staging = _stage(tag)
    try:
        if owner is not None:
            # Through 9p (mapped-xattr) this records the owner the guest sees: a new
            # volume is root's, 0755, as Docker makes it.
            try:
                os.chown(staging, owner[0], owner[1])
                os.chmod(staging, owner[2])
            except OSError as exc:
                raise SystemError_(
                    f"giving the volume on {target} its owner failed: {exc.strerror}"
                ) from None
        if copy_up:
            _copy_up(target, staging)
        _seal(staging, readonly)
        fd = _directory(target, follow=True)
        try:
            _bind(staging, beneath.proc_path(fd), f"the volume on {target}")
        finally:
            os.close(fd)
    finally:
        _unstage(staging)


def _copy_up(target: str, staging: str) -> None:
    """The image's content at ``target`` into the (empty) share at ``staging``."""
    try:
        found = beneath.open_path(ROOT, target)
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there in the image: nothing to copy
    except OSError as exc:
        raise SystemError_(f"{target} in the container: {exc.strerror}") from None
    try:
        if not stat.S_ISDIR(os.fstat(found).st_mode):
            return  # mounting over it is refused next, with the reason
        source = os.open(beneath.proc_path(found), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        os.close(found)
    try:
        destination = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if copyup.is_empty(destination):
                copyup.copy_tree(source, destination)
        finally:
            os.close(destination)
    except (copyup.CopyError, OSError) as exc:
        raise SystemError_(f"copying the image's {target} into the volume failed: {exc}") from None
    finally:
        os.close(source)


def _mount_file(tag: str, name: str, target: str, readonly: bool) -> None:
    """Binds the one file the share holds onto the container's ``target``."""
    if not name or "/" in name or name in (".", ".."):
        raise SystemError_(f"invalid file name {name!r} in a file share")
    staging = _stage(tag)
    try:
        _seal(staging, readonly)
        source = os.open(f"{staging}/{name}", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(source).st_mode):
                raise SystemError_(f"the share for {target} holds no regular file {name!r}")
            fd = _file_target(target)
            try:
                _bind(beneath.proc_path(source), beneath.proc_path(fd), f"the file on {target}")
            finally:
                os.close(fd)
        finally:
            os.close(source)
    finally:
        _unstage(staging)


def _file_target(target: str) -> int:
    """An O_PATH descriptor of the container's ``target`` for a file mount: an empty
    file is made there (and its directories) if missing; a directory is refused."""
    parent_path, _, name = target.rstrip("/").rpartition("/")
    if not name:
        raise SystemError_(f"cannot mount a file on {target}")
    try:
        try:
            fd = beneath.open_path(ROOT, target)
        except FileNotFoundError:
            parent = beneath.open_path(ROOT, parent_path or "/", create_dirs=True)
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                os.close(os.open(name, flags, 0o644, dir_fd=parent))
            finally:
                os.close(parent)
            fd = beneath.open_path(ROOT, target)
    except FileExistsError:
        raise SystemError_(f"{target} in the image is a dangling symlink") from None
    except OSError as exc:
        raise SystemError_(f"{target} in the container: {exc.strerror}") from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise SystemError_(f"cannot mount a file on {target}: it is a directory in the image")
    return fd
