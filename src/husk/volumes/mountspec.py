"""Every way to ask for a mount, read into the spec's :class:`BindMount` and
:class:`TmpfsMount`: ``-v``/``Binds``, ``--mount``/``Mounts``, ``Config.Volumes``, the
image's ``VOLUME``, ``--volumes-from``. Shared by the CLI (early errors) and the daemon.

A volume mount leaves here unresolved: ``volume`` names it ("" and ``anonymous`` for a
volume still to be made), ``source`` is "" and ``copy_up`` means "copy up unless the
volume turns out not to be new" (:meth:`husk.volumes.manager.VolumeManager.resolve`).
Bad input raises one InvalidArgument (or NotSupported) naming what is wrong.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from typing import Any

from husk.errors import InvalidArgument, NotSupported
from husk.sizes import parse_size
from husk.spec import BindMount, TmpfsMount
from husk.volumes.model import LOCAL_DRIVER, check_driver, check_name, check_options

ACCESS_MODES = {"ro", "rw"}
LABEL_MODES = {"z", "Z"}
"""SELinux relabelling: nothing to relabel in a husk guest, accepted as Docker does."""
CONSISTENCY_MODES = {"consistent", "cached", "delegated"}
"""Docker Desktop's file-sharing hints: meaningless on Linux, accepted."""
DEFAULT_PROPAGATION = {"private", "rprivate"}
OTHER_PROPAGATION = {"shared", "rshared", "slave", "rslave"}
NOT_SUPPORTED_PROPAGATION = (
    "bind propagation {mode!r} is not supported: a husk container is a VM, whose mounts "
    "cannot propagate to or from the host (rprivate is the only mode)"
)


def _target(target: str, what: str) -> str:
    if not target:
        raise InvalidArgument(f"invalid mount {what}: no target (container path) given")
    if not target.startswith("/"):
        raise InvalidArgument(
            f"invalid mount {what}: the target {target!r} must be an absolute path"
        )
    if posixpath.normpath(target) == "/":
        raise InvalidArgument(f"invalid mount {what}: the target can't be '/'")
    return target


def _propagation(mode: str) -> None:
    if mode in OTHER_PROPAGATION:
        raise NotSupported(NOT_SUPPORTED_PROPAGATION.format(mode=mode))
    if mode and mode not in DEFAULT_PROPAGATION:
        raise InvalidArgument(f"invalid bind propagation {mode!r}")


def _source(source: str) -> tuple[str, str]:
    """(host path, "") for a bind, ("", name) for a named volume."""
    if source.startswith("/"):
        return source, ""
    return "", check_name(source)


def parse_volume(text: str) -> BindMount:
    """``-v``/``Binds``: ``/path`` (anonymous), ``NAME:/path`` (named volume) or
    ``/host:/path`` (bind), each with an optional ``:mode[,mode…]``."""
    parts = text.split(":")
    what = repr(text)
    if len(parts) > 3 or not all(parts):
        raise InvalidArgument(f"invalid volume specification {what}")
    if len(parts) == 1:
        return BindMount("", _target(parts[0], what), anonymous=True, copy_up=True)
    source, target = parts[0], _target(parts[1], what)
    mode = parts[2] if len(parts) == 3 else ""
    host, name = _source(source)
    modes = mode.split(",") if mode else []
    unknown = [
        m
        for m in modes
        if m
        not in ACCESS_MODES
        | LABEL_MODES
        | CONSISTENCY_MODES
        | DEFAULT_PROPAGATION
        | OTHER_PROPAGATION
        | {"nocopy"}
    ]
    if unknown or len(set(modes) & ACCESS_MODES) > 1 or len(set(modes)) != len(modes):
        raise InvalidArgument(f"invalid mode {mode!r} in volume specification {what}")
    for m in modes:
        if m in DEFAULT_PROPAGATION | OTHER_PROPAGATION:
            if name:
                raise InvalidArgument(
                    f"invalid mode {m!r} in {what}: propagation applies to binds only"
                )
            _propagation(m)
    if "nocopy" in modes and host:
        raise InvalidArgument(f"invalid mode 'nocopy' in {what}: it applies to volumes only")
    readonly = "ro" in modes
    if host:
        return BindMount(host, target, readonly=readonly, mode=mode)
    return BindMount(
        "",
        target,
        readonly=readonly,
        volume=name,
        copy_up="nocopy" not in modes,
        mode=mode or "z",
    )


def _flag_bool(key: str, value: str | None) -> bool:
    if value is None or value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise InvalidArgument(f"invalid value {value!r} for --mount option {key} (true or false)")


def parse_mount_flag(text: str) -> dict[str, Any]:
    """``--mount type=…,source=…,target=…,…`` as the API's ``Mounts`` item."""
    mount: dict[str, Any] = {"Type": "volume"}
    volume: dict[str, Any] = {}
    tmpfs: dict[str, Any] = {}
    bind: dict[str, Any] = {}
    what = f"--mount {text!r}"
    for field_text in text.split(","):
        if not field_text:
            continue
        key, sep, raw = field_text.partition("=")
        key = key.strip().lower()
        value = raw if sep else None
        if key == "type":
            mount["Type"] = value or ""
        elif key in ("source", "src"):
            mount["Source"] = value or ""
        elif key in ("target", "destination", "dst"):
            mount["Target"] = value or ""
        elif key in ("readonly", "ro"):
            mount["ReadOnly"] = _flag_bool(key, value)
        elif key == "consistency":
            mount["Consistency"] = value or ""
        elif key == "volume-nocopy":
            volume["NoCopy"] = _flag_bool(key, value)
        elif key in ("volume-opt", "volume-label"):
            name, eq, option = (value or "").partition("=")
            if not name or not eq:
                raise InvalidArgument(f"invalid {key} {value!r} in {what}: use key=value")
            if key == "volume-opt":
                volume.setdefault("DriverConfig", {}).setdefault("Options", {})[name] = option
            else:
                volume.setdefault("Labels", {})[name] = option
        elif key == "volume-driver":
            volume.setdefault("DriverConfig", {})["Name"] = value or ""
        elif key == "volume-subpath":
            raise NotSupported("--mount volume-subpath is not supported by husk")
        elif key == "tmpfs-size":
            tmpfs["SizeBytes"] = parse_size(value or "", "tmpfs-size")
        elif key == "tmpfs-mode":
            tmpfs["Mode"] = _octal(value or "", "tmpfs-mode")
        elif key == "bind-propagation":
            bind["Propagation"] = value or ""
        elif key in ("bind-nonrecursive", "bind-recursive"):
            raise NotSupported(f"--mount {key} is not supported by husk")
        else:
            raise InvalidArgument(f"unexpected key {key!r} in {what}")
    if volume:
        mount["VolumeOptions"] = volume
    if tmpfs:
        mount["TmpfsOptions"] = tmpfs
    if bind:
        mount["BindOptions"] = bind
    mount_from_api(mount)  # every check now, on the client's side too
    return mount


def _octal(value: str, what: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise InvalidArgument(f"invalid {what} {value!r}: expected an octal mode") from None
    if not 0 <= mode <= 0o7777:
        raise InvalidArgument(f"invalid {what} {value!r}: expected an octal mode")
    return mode


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"invalid Mounts: {what} must be an object")
    return value


def _strings(value: Any, what: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in _object(value, what).items()}


def mount_from_api(mount: Any) -> BindMount | TmpfsMount:
    """One item of HostConfig.Mounts."""
    if not isinstance(mount, dict):
        raise InvalidArgument("invalid Mounts: each mount must be an object")
    kind = mount.get("Type") or "volume"
    source = str(mount.get("Source") or "")
    what = f"{kind} mount"
    target = _target(str(mount.get("Target") or ""), what)
    readonly = bool(mount.get("ReadOnly"))
    bind = _object(mount.get("BindOptions"), "BindOptions")
    volume = _object(mount.get("VolumeOptions"), "VolumeOptions")
    tmpfs = _object(mount.get("TmpfsOptions"), "TmpfsOptions")
    if bind and kind != "bind":
        raise InvalidArgument(f"invalid {what}: BindOptions is for bind mounts only")
    if volume and kind != "volume":
        raise InvalidArgument(f"invalid {what}: VolumeOptions is for volume mounts only")
    if tmpfs and kind != "tmpfs":
        raise InvalidArgument(f"invalid {what}: TmpfsOptions is for tmpfs mounts only")
    if kind == "bind":
        if not source.startswith("/"):
            raise InvalidArgument(
                f"invalid bind mount: the source {source!r} must be an absolute host path"
            )
        _propagation(str(bind.get("Propagation") or ""))
        for key in ("NonRecursive", "ReadOnlyNonRecursive", "ReadOnlyForceRecursive"):
            if bind.get(key):
                raise NotSupported(f"Mounts[].BindOptions.{key} is not supported by husk")
        return BindMount(source, target, readonly=readonly)
    if kind == "volume":
        if source:
            check_name(source)
        if volume.get("Subpath"):
            raise NotSupported("Mounts[].VolumeOptions.Subpath is not supported by husk")
        driver = _object(volume.get("DriverConfig"), "VolumeOptions.DriverConfig")
        check_driver(str(driver.get("Name") or LOCAL_DRIVER))
        options = _strings(driver.get("Options"), "VolumeOptions.DriverConfig.Options")
        check_options(options)
        return BindMount(
            "",
            target,
            readonly=readonly,
            volume=source,
            anonymous=not source,
            copy_up=not volume.get("NoCopy"),
            volume_options=options,
            volume_labels=_strings(volume.get("Labels"), "VolumeOptions.Labels"),
        )
    if kind == "tmpfs":
        if source:
            raise InvalidArgument("invalid tmpfs mount: a tmpfs has no source")
        if tmpfs.get("Options"):
            raise NotSupported("Mounts[].TmpfsOptions.Options is not supported (size and mode are)")
        size = tmpfs.get("SizeBytes")
        mode = tmpfs.get("Mode")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise InvalidArgument(f"invalid tmpfs size {size!r}: expected bytes")
        if mode is not None and (not isinstance(mode, int) or not 0 <= mode <= 0o7777):
            raise InvalidArgument(f"invalid tmpfs mode {mode!r}")
        if readonly:
            raise NotSupported("read-only tmpfs mounts are not supported by husk")
        return TmpfsMount(target, size or None, mode if mode else None)
    if kind == "npipe":
        raise NotSupported("npipe mounts are Windows-only")
    raise NotSupported(f"mount type {kind!r} is not supported by husk (bind, volume, tmpfs)")


def mounts_from_api(value: Any) -> tuple[list[BindMount], list[TmpfsMount]]:
    if not value:
        return [], []
    if not isinstance(value, list):
        raise InvalidArgument("invalid Mounts: expected a list")
    binds: list[BindMount] = []
    tmpfs: list[TmpfsMount] = []
    for item in value:
        mount = mount_from_api(item)
        (binds if isinstance(mount, BindMount) else tmpfs).append(mount)  # type: ignore[arg-type]
    return binds, tmpfs


def normal(path: str) -> str:
    return posixpath.normpath(path) if path else path


def anonymous_volumes(targets: Iterable[str], covered: Iterable[str]) -> list[BindMount]:
    """Anonymous volumes for ``targets`` (Config.Volumes, the image's VOLUME) that no
    other mount covers."""
    taken = {normal(t) for t in covered}
    made = []
    for target in targets:
        path = normal(str(target))
        if path in taken:
            continue
        _target(path, f"volume {target!r}")
        taken.add(path)
        made.append(BindMount("", path, anonymous=True, copy_up=True))
    return made


def check_targets(binds: Iterable[BindMount], tmpfs: Iterable[TmpfsMount]) -> None:
    """Two mounts on one target are refused (Docker's "Duplicate mount point")."""
    seen: set[str] = set()
    for target in [*(b.target for b in binds), *(t.target for t in tmpfs)]:
        path = normal(target)
        if path in seen:
            raise InvalidArgument(f"Duplicate mount point: {path}")
        seen.add(path)


def parse_volumes_from(text: str) -> tuple[str, bool | None]:
    """``CONTAINER[:ro|rw]``: the container and the access asked (None: as it has them)."""
    container, sep, mode = text.partition(":")
    if not container or (sep and mode not in ACCESS_MODES):
        raise InvalidArgument(f"invalid --volumes-from {text!r}: use CONTAINER[:ro|rw]")
    return container, (mode == "ro") if sep else None


def copied_mounts(binds: Iterable[BindMount], readonly: bool | None) -> list[BindMount]:
    """Another container's volume and bind mounts, for ``--volumes-from`` (its anonymous
    volumes stay its own: removing this container never removes them)."""
    return [
        BindMount(
            b.source,
            b.target,
            readonly=b.readonly if readonly is None else readonly,
            socket=b.socket,
            volume=b.volume,
            mode=b.mode,
        )
        for b in binds
    ]
