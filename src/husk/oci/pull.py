"""Pulling an image into the store: pull policies, platform choice, parallel layers."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from husk import settings
from husk.errors import HuskError, InvalidArgument, NotFound, PullFailed
from husk.oci import system_images
from husk.oci.archive import load_path
from husk.oci.manifest import (
    MAX_CONFIG_BYTES,
    Descriptor,
    Manifest,
    is_index,
    parse_config,
    parse_index,
    parse_manifest,
)
from husk.oci.platform import Platform, host_platform, parse_platform, select_platform
from husk.oci.reference import Reference, names_an_id, parse_reference
from husk.oci.registry import FetchedManifest, RegistryClient
from husk.oci.rootfs import RootfsBuild
from husk.oci.store import ImageRecord, ImageStore
from husk.oci.unpack import check_layer

POLICIES = ("always", "missing", "never", "newer")
_POLICY_ALIASES = {
    "if-not-present": "missing",
    "ifnotpresent": "missing",
    "if-missing": "missing",
    "missing": "missing",
    "always": "always",
    "never": "never",
    "newer": "newer",
}
DEFAULT_PARALLEL_LAYERS = 3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullEvent:
    """Progress of one blob. ``status``: waiting, exists, downloading, done, resolved.

    ``resolved`` carries the manifest digest (in ``digest``) once it is known.
    """

    digest: str
    status: str
    total: int = 0
    completed: int = 0
    media_type: str = ""


ProgressCallback = Callable[[PullEvent], None]
ClientFactory = Callable[[str], RegistryClient]


def local_image(store: ImageStore, reference: str) -> ImageRecord | None:
    """The local image ``reference`` names, in any spelling Docker accepts (name,
    ``repo@digest``, full or short id, ``sha256:`` id), or None."""
    try:
        return store.resolve(reference)
    except (NotFound, InvalidArgument):
        return None


def _named_by(record: ImageRecord, reference: str) -> bool:
    """Whether ``reference`` is one of the image's names rather than its id."""
    try:
        ref = parse_reference(reference)
    except InvalidArgument:
        return False
    key = ref.with_digest(ref.digest).tagged() if ref.digest is not None else str(ref)
    return key in record.names or ref.digest is not None


def normalise_policy(policy: str) -> str:
    key = policy.strip().lower()
    if key not in _POLICY_ALIASES:
        raise InvalidArgument(
            f"invalid pull policy {policy!r}: expected always, missing (if-not-present), "
            "never or newer"
        )
    return _POLICY_ALIASES[key]


def _choose_manifest(
    fetched: FetchedManifest, reference: Reference, wanted: Platform
) -> Descriptor:
    index = parse_index(fetched.data)
    entries = [
        (d.platform, d)
        for d in index.manifests
        if d.platform is not None and not is_index(d.media_type)
    ]
    chosen = select_platform(((p, d.digest) for p, d in entries), wanted)
    if chosen is None:
        offered = sorted(
            {str(p) for p, _ in entries if p.os != "unknown" and p.architecture != "unknown"}
        )
        raise NotFound(
            f"{reference} has no image for platform {wanted} "
            f"(available: {', '.join(offered) or 'none'})"
        )
    return next(d for p, d in entries if d.digest == chosen[1])


LOCAL_ONLY_DOMAINS = frozenset({"husk.local"})
"""Registries that do not exist: names of images made on this host (``scripts/import-busybox.sh``,
``husk load``, ``husk build``), never pulled."""


def local_only_missing(name: str, store: ImageStore) -> str:
    """Why a ``husk.local/…`` image cannot be had: it is not in this user's store."""
    return (
        f"image {name} is not in this user's image store ({store.root}) nor installed for "
        f"every user (in {settings.system_images_dir()}); husk.local/ names are made on "
        "this host and never pulled: import it here (scripts/import-busybox.sh, husk load "
        "or husk build), or use the user who has it"
    )


async def _load_system_image(ref: Reference, store: ImageStore) -> ImageRecord:
    """``ref`` loaded from the images installed for every user (husk.oci.system_images)."""
    source = system_images.source_for(ref)
    if source is None:
        raise NotFound(local_only_missing(str(ref), store))
    await asyncio.to_thread(load_path, source, store=store, name=str(ref))
    found = local_image(store, str(ref))
    if found is None:
        raise NotFound(f"{source} does not hold {ref}: {local_only_missing(str(ref), store)}")
    return found


async def pull(
    reference: str,
    *,
    policy: str = "missing",
    platform: str | Platform | None = None,
    progress: ProgressCallback | None = None,
    store: ImageStore | None = None,
    client_factory: ClientFactory | None = None,
    max_parallel: int = DEFAULT_PARALLEL_LAYERS,
    build_disk: bool = False,
) -> ImageRecord:
    """Make ``reference`` present in the store according to ``policy`` and return it.

    With ``build_disk``, a pull that downloads the image also builds its erofs disk
    (:mod:`husk.oci.rootfs`), each layer applied as soon as it is downloaded, so the
    first container of the image does not wait for it.
    """
    store = store if store is not None else ImageStore()
    policy = normalise_policy(policy)
    wanted = parse_platform(platform) if isinstance(platform, str) else platform
    local = local_image(store, reference)
    if local is None and names_an_id(reference):
        # An image id names no registry image: never sent to a registry as ``<id>:latest``.
        raise NotFound(f"No such image: {reference}")
    ref = parse_reference(reference)
    if local is not None and policy != "never" and not _named_by(local, reference):
        # Found by id (or id prefix): a local image, whatever the policy says.
        return local
    if local is not None and wanted is not None and not _matches(local, wanted):
        local = None
    if policy == "never":
        if local is None:
            raise NotFound(
                f"image {reference} is not present locally and the pull policy is 'never'"
            )
        return local
    if policy == "missing" and local is not None:
        return local
    if ref.domain in LOCAL_ONLY_DOMAINS:
        if local is not None:
            return local
        return await _load_system_image(ref, store)

    factory = client_factory or (lambda domain: RegistryClient(domain))
    async with factory(ref.domain) as client:
        if policy == "newer" and local is not None:
            remote = await client.manifest_digest(ref.path, ref.ref)
            if remote == store.source_digest(str(ref)) or remote == local.manifest_digest:
                return local
        try:
            with store.gc_guard():
                return await _pull_from(
                    client, ref, wanted, store, progress, max_parallel, build_disk
                )
        except BaseException:
            # Drop blobs this failed pull left unreferenced (skipped while others pull).
            store.collect_garbage()
            raise


def _matches(record: ImageRecord, wanted: Platform) -> bool:
    return wanted.matches(Platform(record.os, record.architecture, record.variant))


async def _pull_from(
    client: RegistryClient,
    ref: Reference,
    wanted: Platform | None,
    store: ImageStore,
    progress: ProgressCallback | None,
    max_parallel: int,
    build_disk: bool = False,
) -> ImageRecord:
    top = await client.get_manifest(ref.path, ref.ref)
    index_digest: str | None = None
    fetched = top
    if is_index(top.media_type):
        descriptor = _choose_manifest(top, ref, wanted or host_platform())
        fetched = await client.get_manifest(ref.path, descriptor.digest)
        index_digest = top.digest
    manifest = _parse_or_fail(fetched, ref)
    if progress:
        progress(PullEvent(fetched.digest, "resolved", media_type=fetched.media_type))
        for layer in manifest.layers:
            progress(PullEvent(layer.digest, "waiting", layer.size, 0, layer.media_type))

    if manifest.config.size > MAX_CONFIG_BYTES:
        raise PullFailed(
            f"{ref}: image config is {manifest.config.size} bytes, more than {MAX_CONFIG_BYTES}"
        )
    await client.fetch_blob(ref.path, manifest.config.digest, manifest.config.size, store)
    try:
        config = parse_config(
            store.read_blob(manifest.config.digest), layer_count=len(manifest.layers)
        )
    except InvalidArgument as err:
        raise PullFailed(f"{ref}: bad image config: {err}") from None
    if wanted is not None and index_digest is None:
        offered = Platform(
            str(config.get("os", "")),
            str(config.get("architecture", "")),
            str(config.get("variant", "") or ""),
        )
        if not wanted.matches(offered):
            raise NotFound(f"{ref} is an image for {offered}, not for the requested {wanted}")

    semaphore = asyncio.Semaphore(max(1, max_parallel))
    diff_ids = [str(d) for d in config["rootfs"]["diff_ids"]]
    build = await _begin_disk(diff_ids, manifest) if build_disk else None

    async def fetch_layer(index: int, layer: Descriptor, diff_id: str) -> None:
        async with semaphore:
            done = 0

            def advance(count: int) -> None:
                nonlocal done
                done += count
                if progress:
                    progress(
                        PullEvent(layer.digest, "downloading", layer.size, done, layer.media_type)
                    )

            # A layer is read through before it enters the store: complete compressed
            # stream, well-formed tar to its end, uncompressed digest = the config's
            # diff_id. A broken layer fails the pull, not the first container. When the
            # pull builds the image's disk, applying the layer is that reading.
            verify: Callable[[Path], object]
            if build is not None:
                verify = functools.partial(build.apply, index, media_type=layer.media_type)
            else:
                verify = functools.partial(
                    check_layer, media_type=layer.media_type, diff_id=diff_id, name=layer.digest
                )
            downloaded = await client.fetch_blob(
                ref.path,
                layer.digest,
                layer.size,
                store,
                progress=advance if progress else None,
                verify=verify,
            )
            if build is not None and not downloaded:
                await asyncio.to_thread(
                    build.apply, index, store.blob_path(layer.digest), layer.media_type
                )
            if progress:
                status = "done" if downloaded else "exists"
                progress(PullEvent(layer.digest, status, layer.size, layer.size, layer.media_type))

    tasks = [
        asyncio.ensure_future(fetch_layer(index, layer, diff_id))
        for index, (layer, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True))
    ]
    try:
        try:
            await asyncio.gather(*tasks)
        except BaseException as failure:
            if build is not None:
                build.fail(failure)  # layers waiting for their turn give up too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if build is not None:
            await _finish_disk(build, ref)
    finally:
        if build is not None:
            await asyncio.to_thread(build.close)

    if index_digest is not None:
        store.add_blob_bytes(top.data, top.digest)
    store.add_blob_bytes(fetched.data, fetched.digest)
    name = ref.with_digest(ref.digest).tagged() if ref.digest else str(ref)
    return store.add_image(
        fetched.digest, names=[name], index_digest=index_digest, source_digest=top.digest
    )


async def _begin_disk(diff_ids: list[str], manifest: Manifest) -> RootfsBuild | None:
    """A build of the image's disk, unless it exists. It holds no lock that a container
    of another image with the same layers would wait for while this pull downloads."""
    try:
        return await asyncio.to_thread(
            RootfsBuild.begin_speculative,
            diff_ids,
            names=[layer.digest for layer in manifest.layers],
            expected_bytes=sum(layer.size for layer in manifest.layers),
        )
    except InvalidArgument:
        return None  # a config the store refuses anyway


async def _finish_disk(build: RootfsBuild, ref: Reference) -> None:
    # The image is complete without its disk: a failure here only defers the build to
    # the first container (which reports it if it fails again).
    try:
        await asyncio.to_thread(build.finish)
    except HuskError as err:
        log.warning("%s: the image disk was not built at pull time: %s", ref, err)


def _parse_or_fail(fetched: FetchedManifest, ref: Reference) -> Manifest:
    try:
        return parse_manifest(fetched.data)
    except InvalidArgument as err:
        raise PullFailed(f"{ref}: bad manifest {fetched.digest}: {err}") from None
