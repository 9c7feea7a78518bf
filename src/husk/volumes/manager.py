"""The volumes and who uses them: create, get, list, remove, prune, and the volumes a
new container's mounts need (Docker's rules for the ``local`` driver).

:class:`VolumeManager` knows no container records: a ``users`` callable (the runtime's)
says which containers mount which volumes. Containers being created hold their volumes
from :meth:`VolumeManager.resolve` until :meth:`VolumeManager.settle`, so that a volume
cannot be removed under a container that is about to record it.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from husk import settings
from husk.errors import Conflict, HuskError, InvalidArgument, NotFound
from husk.spec import BindMount
from husk.volumes.model import (
    ANONYMOUS_LABEL,
    SIZE_OPTION,
    Volume,
    anonymous_name,
    check_driver,
    check_name,
    check_options,
)
from husk.volumes.store import VolumeStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeUser:
    """A container, as far as volumes care: its id, its name and the volumes it mounts."""

    id: str
    name: str
    volumes: tuple[str, ...]


Users = Callable[[], Iterable[VolumeUser]]
VolumeEvent = Callable[..., None]
"""``event(action, volume, **attributes)``: a volume event for ``docker events``."""


def _no_event(_action: str, _volume: Volume, **_attributes: str) -> None:
    return None


@dataclass
class Resolved:
    """What :meth:`VolumeManager.resolve` made of a container's mounts."""

    binds: list[BindMount]
    created: list[str] = field(default_factory=list)
    """The volumes made for this container (removed again if its create fails)."""


def allocated_bytes(path: str) -> int:
    """Bytes really used under ``path`` (sparse files by their blocks); slow: off the loop."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _is_empty(path: str) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


class VolumeManager:
    def __init__(self, store: VolumeStore, users: Users, *, event: VolumeEvent = _no_event) -> None:
        self.store = store
        self.users = users
        self._event = event
        self._pending: dict[str, set[str]] = {}
        """Volumes held by containers being created (container id → names)."""

    # -- finding ------------------------------------------------------------------------
    def get(self, name: str) -> Volume:
        found = self.store.find(name) if name else None
        if found is None:
            raise NotFound(f"get {name}: no such volume")
        return found

    def list(self) -> builtins.list[Volume]:
        return self.store.all()

    def usage(self) -> dict[str, builtins.list[VolumeUser]]:
        """Volume name → the containers that mount it (pending creations included)."""
        used: dict[str, builtins.list[VolumeUser]] = {}
        for user in self.users():
            for name in dict.fromkeys(user.volumes):
                used.setdefault(name, []).append(user)
        for container_id, names in self._pending.items():
            for name in names:
                used.setdefault(name, []).append(VolumeUser(container_id, container_id[:12], ()))
        return used

    def in_use(self, name: str) -> builtins.list[VolumeUser]:
        return self.usage().get(name, [])

    # -- create -------------------------------------------------------------------------
    def create(
        self,
        name: str = "",
        *,
        driver: str = "",
        options: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        anonymous: bool = False,
    ) -> Volume:
        """A new volume, or the existing one of that name if it has the same driver and
        options (Docker's idempotent create); different ones are a conflict. Without a
        name it gets a random one; ``anonymous`` (a container's own) marks it so."""
        driver = check_driver(driver)
        options = check_options(dict(options or {}))
        labels = dict(labels or {})
        if anonymous:
            labels.setdefault(ANONYMOUS_LABEL, "")
        if not name:
            name = anonymous_name()
        check_name(name)
        existing = self.store.find(name)
        if existing is not None:
            if existing.driver != driver or existing.options != options:
                raise Conflict(
                    f"volume {name} already exists with other options "
                    f"({_describe(existing.options)}); remove it first or use other options"
                )
            return existing
        if not options:
            options = _default_options()
        volume = Volume(
            name=name,
            mountpoint=str(self.store.data_dir(name)),
            driver=driver,
            labels=labels,
            options=options,
        )
        self.store.add(volume)
        self._event("create", volume)
        return volume

    # -- remove, prune --------------------------------------------------------------------
    def remove(self, name: str, *, force: bool = False) -> None:
        """Refused while a container uses it; ``force`` only ignores a missing volume."""
        volume = self.store.find(name)
        if volume is None:
            if force:
                return
            raise NotFound(f"get {name}: no such volume")
        users = self.in_use(name)
        if users:
            raise Conflict(
                f"remove {name}: volume is in use - "
                f"[{', '.join(u.id for u in users)}] ({', '.join(u.name for u in users)})"
            )
        self.store.delete(name)
        self._event("destroy", volume)

    def prune(
        self, wanted: Callable[[Volume], bool], *, all_volumes: bool = False
    ) -> builtins.list[Volume]:
        """Removes the unused volumes ``wanted`` accepts: anonymous ones, named ones too
        with ``all_volumes``. A volume that cannot be removed is logged and kept."""
        used = self.usage()
        removed = []
        for volume in self.store.all():
            if volume.name in used or not (all_volumes or volume.anonymous):
                continue
            if not wanted(volume):
                continue
            try:
                self.remove(volume.name)
            except Exception as err:  # one volume's trouble must not stop the prune
                log.warning("could not prune volume %s: %s", volume.name, err)
                continue
            removed.append(volume)
        return removed

    def remove_anonymous(self, binds: Iterable[BindMount]) -> None:
        """A removed container's anonymous volumes (``rm -v``, ``--rm``), those no other
        container uses; failures are logged (the container is gone already)."""
        for bind in binds:
            if bind.volume and bind.anonymous:
                try:
                    self.remove(bind.volume, force=True)
                except Exception as err:
                    log.warning("could not remove volume %s: %s", bind.volume, err)

    # -- a new container's mounts ---------------------------------------------------------
    def resolve(self, container_id: str, binds: Iterable[BindMount]) -> Resolved:
        """Each volume mount with its volume: named ones made if missing, anonymous ones
        made and named, ``source`` set to the volume's data and ``copy_up`` kept only
        for a volume that is empty (the parser sets it unless nocopy was asked).

        Holds the volumes for ``container_id`` until :meth:`settle`; on failure, what
        was made is removed again and nothing is held.
        """
        resolved = Resolved(binds=[])
        held = self._pending.setdefault(container_id, set())
        try:
            for bind in binds:
                if not bind.volume and not bind.anonymous:
                    resolved.binds.append(bind)
                    continue
                name = bind.volume
                existed = bool(name) and self.store.find(name) is not None
                volume = (
                    self.create(
                        name,
                        options=bind.volume_options,
                        labels=bind.volume_labels,
                        anonymous=bind.anonymous,
                    )
                    if not existed
                    else self.get(name)
                )
                if not existed:
                    resolved.created.append(volume.name)
                held.add(volume.name)
                copy_up = bind.copy_up and not volume.device and _is_empty(volume.data_path)
                resolved.binds.append(
                    BindMount(
                        source=volume.data_path,
                        target=bind.target,
                        readonly=bind.readonly,
                        volume=volume.name,
                        anonymous=bind.anonymous,
                        copy_up=copy_up,
                        mode=bind.mode,
                    )
                )
        except BaseException:
            self.undo(container_id, resolved.created)
            raise
        return resolved

    def settle(self, container_id: str) -> None:
        """The container's record is saved (or its create failed): its volumes count
        through its record from now on."""
        self._pending.pop(container_id, None)

    def undo(self, container_id: str, created: Iterable[str]) -> None:
        """A failed create: the volumes it made go again."""
        self.settle(container_id)
        for name in created:
            try:
                self.remove(name, force=True)
            except Exception as err:
                log.warning("could not remove volume %s after a failed create: %s", name, err)


def _default_options() -> dict[str, str]:
    """The options of a new volume made without any: config.json's volume_size, if set."""
    default = settings.default_volume_size()
    if default is None:
        return {}
    try:
        return check_options({SIZE_OPTION: default})
    except HuskError as err:
        raise InvalidArgument(f'"volume_size" in {settings.config_path()}: {err}') from None


def _describe(options: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(options.items())) or "no options"
