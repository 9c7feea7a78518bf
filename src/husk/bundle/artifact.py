"""The guest bundle as an OCI artifact: push it to a registry, pull it back.

Layout: an OCI image manifest whose config blob is the bundle's manifest.json and
whose two layers are vmlinux and initramfs.cpio. On pull the bundle is re-extracted
only when the registry's manifest digest differs from the one installed, and it is
installed atomically; an unreachable registry leaves the cached bundle in use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from husk import paths
from husk.bundle.builder import _install, _locked
from husk.bundle.locate import INITRD, KERNEL, MANIFEST, Bundle, file_sha256, load
from husk.errors import BundleError, PullFailed
from husk.oci.reference import parse_reference
from husk.oci.registry import RegistryClient, RegistryUnreachable, scope_pull

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "application/vnd.husk.bundle.v1"
CONFIG_TYPE = "application/vnd.husk.bundle.manifest.v1+json"
LAYER_TYPES = {
    KERNEL: "application/vnd.husk.bundle.kernel.v1",
    INITRD: "application/vnd.husk.bundle.initrd.v1",
}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SOURCE_FILE = ".source.json"  # which registry manifest the installed bundle came from
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class PullOutcome:
    bundle: Bundle
    manifest_digest: str | None
    action: str  # "installed", "up-to-date", "offline-cached"
    warning: str = ""


def _descriptor(media_type: str, path: Path, title: str) -> dict[str, object]:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + file_sha256(path),
        "size": path.stat().st_size,
        "annotations": {"org.opencontainers.image.title": title},
    }


async def push(reference: str, directory: Path | None = None) -> str:
    """Uploads the installed bundle to ``reference``; returns the manifest digest."""
    bundle = load(directory or paths.bundle_dir(), verify=True)
    folder = bundle.kernel.parent
    ref = parse_reference(reference)
    config = _descriptor(CONFIG_TYPE, folder / MANIFEST, MANIFEST)
    layers = [_descriptor(LAYER_TYPES[name], folder / name, name) for name in (KERNEL, INITRD)]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": config,
        "layers": layers,
        "annotations": {"org.husk.bundle.digest": bundle.digest},
    }
    async with RegistryClient(ref.domain) as client:
        for descriptor, name in [(config, MANIFEST), *zip(layers, (KERNEL, INITRD), strict=True)]:
            digest = str(descriptor["digest"])
            if not await client.blob_exists(ref.path, digest):
                await client.upload_blob(ref.path, digest, folder / name)
        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        return await client.put_manifest(ref.path, ref.ref, body, OCI_MANIFEST)


def _installed_source(destination: Path) -> dict[str, str]:
    try:
        data = json.loads((destination / SOURCE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _cached(destination: Path) -> Bundle | None:
    try:
        return load(destination)
    except BundleError:
        return None


async def pull(reference: str, directory: Path | None = None) -> PullOutcome:
    """Installs the bundle at ``reference`` unless the installed one came from the same digest."""
    destination = directory or paths.bundle_dir()
    ref = parse_reference(reference)
    try:
        async with RegistryClient(ref.domain) as client:
            remote = await client.manifest_digest(ref.path, ref.ref)
            source = _installed_source(destination)
            cached = _cached(destination)
            if cached is not None and source.get("manifest_digest") == remote:
                return PullOutcome(cached, remote, "up-to-date")
            fetched = await client.get_manifest(ref.path, remote)
            manifest = json.loads(fetched.data)
            if manifest.get("artifactType") != ARTIFACT_TYPE:
                raise PullFailed(f"{reference} is not a husk guest bundle")
            destination.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".bundle-pull-"))
            try:
                out = staging / "bundle"
                out.mkdir()
                wanted = [(manifest["config"], MANIFEST)]
                for layer in manifest["layers"]:
                    title = layer.get("annotations", {}).get("org.opencontainers.image.title")
                    if title not in (KERNEL, INITRD):
                        raise PullFailed(f"{reference} has an unexpected layer {title!r}")
                    wanted.append((layer, title))
                for descriptor, name in wanted:
                    await _download(client, ref.path, descriptor, out / name)
                (out / SOURCE_FILE).write_text(
                    json.dumps({"reference": reference, "manifest_digest": remote})
                )
                for name in (KERNEL, INITRD, MANIFEST):
                    os.chmod(out / name, 0o644)
                os.chmod(out, 0o755)
                load(out, verify=True)  # a bundle that does not verify is never installed
                with _locked(destination):
                    _install(out, destination)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return PullOutcome(load(destination), remote, "installed")
    except (RegistryUnreachable, aiohttp.ClientConnectionError, TimeoutError) as exc:
        cached = _cached(destination)
        if cached is None:
            raise PullFailed(
                f"cannot reach the registry for {reference} and no bundle is cached: {exc}"
            ) from None
        warning = f"registry unreachable ({exc}); using the cached bundle {cached.digest}"
        log.warning(warning)
        return PullOutcome(cached, None, "offline-cached", warning)


async def _download(
    client: object, repository: str, descriptor: dict[str, object], target: Path
) -> None:
    assert isinstance(client, RegistryClient)
    digest = str(descriptor["digest"])
    size = int(str(descriptor["size"]))
    hasher = hashlib.sha256()
    written = 0
    async with client.request(
        "GET", f"/v2/{repository}/blobs/{digest}", scope=scope_pull(repository)
    ) as response:
        with open(target, "wb") as fh:
            async for chunk in response.content.iter_chunked(_CHUNK):
                written += len(chunk)
                if written > size:
                    raise PullFailed(f"blob {digest} is larger than its descriptor says")
                hasher.update(chunk)
                fh.write(chunk)
    if written != size or "sha256:" + hasher.hexdigest() != digest:
        raise PullFailed(f"blob {digest} failed verification (truncated or corrupt)")
