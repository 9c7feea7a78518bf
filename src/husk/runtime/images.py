"""The image service: the one set of rules for finding, pulling, tagging, removing and
pruning images, and for moving them in and out of archives.

Every front door goes through it: the Docker API's image endpoints, and through the
daemon every ``husk`` image command. It knows which images containers use (through
the ``users`` callable it is given), so the rule Docker keeps holds everywhere: an
image a container uses, running or stopped, is never deleted by a prune, and ``rmi``
refuses it unless forced.

One deliberate difference from Docker: a forced ``rmi`` of an image a stopped
container uses untags it but keeps its content (it becomes dangling), because a
husk container starts from its image's content; Docker would delete the image
record and keep the layers in the container's own mount.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from husk.errors import Conflict, InvalidArgument, NotFound
from husk.oci.archive import import_rootfs, load_path, save_images
from husk.oci.pull import ClientFactory, ProgressCallback
from husk.oci.pull import pull as pull_image
from husk.oci.push import PushProgress, PushResult
from husk.oci.push import push as push_image
from husk.oci.reference import parse_reference
from husk.oci.rootfs import chain_id, prune_rootfs_images
from husk.oci.store import ImageRecord, ImageStore, PruneResult, RemovalResult


@dataclass(frozen=True)
class ImageUser:
    """A container and the image (id) it was created from."""

    container_id: str
    image_id: str
    running: bool


class ImageService:
    def __init__(self, store: ImageStore, users: Callable[[], Iterable[ImageUser]]) -> None:
        self.store = store
        self._users = users

    # ------------------------------------------------------------------ reading

    def all(self) -> list[ImageRecord]:
        return self.store.list_images()

    def find(self, name: str) -> ImageRecord:
        """The image ``name`` names in any spelling Docker accepts: a name (``alpine``,
        ``repo:tag``, ``repo@digest``), a full or short id, a ``sha256:`` id.

        Names are looked up before id prefixes, as Docker does.
        """
        try:
            return self.store.resolve(name)
        except (NotFound, InvalidArgument):
            raise NotFound(f"No such image: {name}") from None

    def users_of(self, image_id: str) -> list[ImageUser]:
        return [user for user in self._users() if user.image_id == image_id]

    def in_use(self) -> frozenset[str]:
        """Ids of the images containers use, running or stopped."""
        return frozenset(user.image_id for user in self._users())

    def use_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for user in self._users():
            counts[user.image_id] = counts.get(user.image_id, 0) + 1
        return counts

    # ------------------------------------------------------------------ pulling

    async def pull(
        self,
        reference: str,
        *,
        policy: str = "always",
        platform: str | None = None,
        progress: ProgressCallback | None = None,
        client_factory: ClientFactory | None = None,
    ) -> ImageRecord:
        """Make ``reference`` present as ``policy`` says. An id is only ever looked up
        locally; a name found locally is not fetched under the ``missing`` policy.

        A download also builds the image's disk, layer by layer as they arrive (as
        other engines unpack on pull), so the first container of it starts at once."""

        return await pull_image(
            reference,
            policy=policy,
            platform=platform,
            progress=progress,
            store=self.store,
            client_factory=client_factory,
            build_disk=True,
        )

    async def push(
        self,
        reference: str,
        *,
        destination: str | None = None,
        progress: PushProgress | None = None,
        chunk_size: int | None = None,
        client_factory: ClientFactory | None = None,
    ) -> PushResult:
        """Upload the local image ``reference`` to its registry (or to ``destination``)."""

        self.find(reference)
        return await push_image(
            reference,
            destination=destination,
            store=self.store,
            progress=progress,
            chunk_size=chunk_size,
            client_factory=client_factory,
        )

    # ------------------------------------------------------------------ names

    def tag(self, source: str, target: str) -> tuple[ImageRecord, str]:
        """Give the image ``source`` names the name ``target``; (the image, the full name)."""
        record = self.find(source)
        target_ref = parse_reference(target)
        if target_ref.digest is not None:
            raise InvalidArgument(f"refusing to create a tag with a digest reference: {target}")
        # By id: the name moves to exactly the image found, even if ``source`` is also a name.
        self.store.tag(record.manifest_digest, str(target_ref))
        return record, str(target_ref)

    def remove(self, name: str, *, force: bool = False) -> RemovalResult:
        """``rmi``: untag a name, or delete the image given by id, with Docker's rules.

        A name that is one of several only loses that name. When the image itself
        would go: a running container's image is refused even with ``force``; a
        stopped container's image is refused without ``force`` and with it only
        loses its names (the container keeps its image).
        """
        record = self.find(name)
        plan = self.store.plan_removal(name, force=force)
        keep = False
        if plan.deletes:
            users = self.users_of(record.id)
            running = [u for u in users if u.running]
            by_id = not plan.by_name
            if running and (by_id or not force):
                raise Conflict(
                    f"conflict: unable to delete {record.short_id} (cannot be forced) - "
                    f"image is being used by running container {running[0].container_id[:12]}"
                    if by_id
                    else f'conflict: unable to remove repository reference "{name}" '
                    f"(must force) - container {running[0].container_id[:12]} is using its "
                    f"referenced image {record.short_id}"
                )
            if users and not force:
                raise Conflict(
                    f"conflict: unable to delete {record.short_id} (must be forced) - image is "
                    f"being used by stopped container {users[0].container_id[:12]}"
                    if by_id
                    else f'conflict: unable to remove repository reference "{name}" '
                    f"(must force) - container {users[0].container_id[:12]} is using its "
                    f"referenced image {record.short_id}"
                )
            keep = bool(users)
        result = self.store.remove_image(name, force=force, keep_image=keep)
        self._drop_unused_disks()
        return result

    def prune(self, *, all_images: bool = False) -> PruneResult:
        """Delete dangling images (every unused one with ``all_images``), never one a
        container uses."""
        result = self.store.prune(all_images=all_images, keep=self.in_use())
        self._drop_unused_disks()
        return result

    def _drop_unused_disks(self) -> None:
        """Deletes the erofs disks no remaining image has (its layer chain): removing an
        image frees its disk as well as its blobs. A VM that has one open keeps it."""
        chains = {chain_id(r.diff_ids) for r in self.store.list_images() if r.diff_ids}
        prune_rootfs_images(chains)
        # Root-ready snapshots of the disks just removed go with them.
        from husk.sandbox import rootready  # the VM layer: only a removal needs it

        with contextlib.suppress(OSError):
            rootready.prune()

    # ------------------------------------------------------------------ archives

    def load(
        self, source: Path, *, name: str | None = None, platform: str | None = None
    ) -> list[ImageRecord]:
        """Load a docker-archive, an OCI archive or an OCI layout directory."""

        return load_path(source, store=self.store, name=name, platform=platform)

    def save(
        self, names: list[str], output: Path | IO[bytes], *, format: str = "docker-archive"
    ) -> None:

        if not names:
            raise InvalidArgument("no image given to save")
        for name in names:
            self.find(name)
        save_images(names, output, format=format, store=self.store)

    def import_rootfs(
        self,
        source: Path,
        reference: str | None,
        *,
        changes: Iterable[str] = (),
        message: str = "",
        platform: str | None = None,
    ) -> ImageRecord:

        return import_rootfs(
            source,
            reference,
            store=self.store,
            changes=changes,
            message=message,
            platform=platform,
        )
