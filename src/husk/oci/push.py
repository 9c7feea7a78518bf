"""Pushing an image from the store to a registry.

Blobs the registry already has are skipped; blobs that another repository of
the same registry holds are mounted; the rest are uploaded (monolithic, or in
chunks when ``chunk_size`` is given). The manifest goes last, byte for byte as
stored, so its digest is the one the image has locally.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from husk.errors import InvalidArgument
from husk.oci.reference import parse_reference
from husk.oci.registry import RegistryClient
from husk.oci.store import ImageStore

DEFAULT_PARALLEL_UPLOADS = 3


@dataclass(frozen=True)
class PushEvent:
    """Progress of one blob. ``status``: waiting, exists, mounted, uploading, done."""

    digest: str
    status: str
    total: int = 0
    completed: int = 0


PushProgress = Callable[[PushEvent], None]
ClientFactory = Callable[[str], RegistryClient]


@dataclass(frozen=True)
class PushResult:
    reference: str
    digest: str
    size: int


async def push(
    reference: str,
    *,
    destination: str | None = None,
    store: ImageStore | None = None,
    progress: PushProgress | None = None,
    chunk_size: int | None = None,
    client_factory: ClientFactory | None = None,
    max_parallel: int = DEFAULT_PARALLEL_UPLOADS,
) -> PushResult:
    """Push the local image ``reference`` to ``destination`` (default: its own name)."""
    store = store if store is not None else ImageStore()
    record = store.resolve(reference)
    target = parse_reference(destination or reference)
    if target.digest is not None:
        raise InvalidArgument(f"cannot push to a digest reference: {destination or reference}")
    manifest_bytes = store.read_blob(record.manifest_digest)
    mount_sources = [
        parse_reference(d).path
        for d in record.repo_digests
        if parse_reference(d).domain == target.domain and parse_reference(d).path != target.path
    ]
    factory = client_factory or (lambda domain: RegistryClient(domain))
    blobs = [(record.id, record.config_size or store.blob_size(record.id))]
    blobs += [(layer.digest, layer.size) for layer in record.layers]
    semaphore = asyncio.Semaphore(max(1, max_parallel))

    async with factory(target.domain) as client:

        async def send(digest: str, size: int) -> None:
            async with semaphore:
                if progress:
                    progress(PushEvent(digest, "waiting", size))
                if await client.blob_exists(target.path, digest):
                    if progress:
                        progress(PushEvent(digest, "exists", size, size))
                    return
                for source in mount_sources:
                    if await client.mount_blob(target.path, digest, source):
                        if progress:
                            progress(PushEvent(digest, "mounted", size, size))
                        return
                done = 0

                def advance(count: int) -> None:
                    nonlocal done
                    done += count
                    if progress:
                        progress(PushEvent(digest, "uploading", size, done))

                await client.upload_blob(
                    target.path,
                    digest,
                    store.blob_path(digest),
                    chunk_size=chunk_size,
                    progress=advance,
                )
                if progress:
                    progress(PushEvent(digest, "done", size, size))

        tasks = [asyncio.ensure_future(send(digest, size)) for digest, size in blobs]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        digest = await client.put_manifest(
            target.path, target.tag or "latest", manifest_bytes, record.manifest_media_type
        )
    store.add_repo_digest(record.manifest_digest, f"{target.repository}@{digest}")
    return PushResult(str(target), digest, len(manifest_bytes))
