"""A pull builds the image's disk while it downloads (issue 16: image readiness).

Each layer is applied onto the disk's staging tree as soon as it is downloaded (and
every layer below it applied); applying is the layer's check, so a broken or hostile
layer still fails the pull and leaves nothing: no blob, no image, no disk, no staging
tree, no held lock. A real docker-registry serves every image.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest

from diskcache import disk_cache_entries
from husk.errors import HuskError
from husk.oci.pull import pull
from husk.oci.rootfs import RootfsBuild, chain_id, ensure_rootfs_image, rootfs_image_path
from husk.oci.store import ImageStore
from registry_fixtures import RunningRegistry, registry, run_skopeo  # noqa: F401 - fixture
from testimages import Entry, ImageSpec, Layer, LayoutWriter, directory, file

pytestmark = pytest.mark.registry


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def push(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
    name: str,
    layers: list[list[Entry]],
) -> str:
    writer = LayoutWriter(tmp_path / name)
    writer.tag(writer.image(ImageSpec(layers=[Layer(e, "gzip") for e in layers])), "latest")
    return registry.push_oci_layout(tmp_path / name, f"pulldisk/{name}:latest")


def listing(disk: Path, path: str) -> set[str]:
    """Names in directory ``path`` of an erofs disk, read by erofs-utils."""
    out = subprocess.run(
        ["dump.erofs", "--ls", f"--path={path}", str(disk)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    table = out.split("FILENAME", 1)[1]  # after the inode's header: NID TYPE FILENAME rows
    names = {line.split()[-1] for line in table.splitlines() if line.strip()}
    return names - {".", ".."}


def leftovers() -> list[str]:
    """The disk cache's entries other than disks and locks (staging trees)."""
    names = [n for n in disk_cache_entries() if not n.endswith(".erofs")]
    return sorted(names)


def base_layer(tag: str) -> list[Entry]:
    return [
        directory("etc"),
        file("etc/base.txt", f"base {tag}\n"),
        file("etc/remove-me.txt", "deleted above\n"),
    ]


def test_pull_builds_the_disk_layer_by_layer(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    tag = str(time.time_ns())
    reference = push(
        registry,
        tmp_path,
        "twolayers",
        [base_layer(tag), [file("etc/.wh.remove-me.txt"), file("etc/top.txt", "top\n")]],
    )
    store = ImageStore()
    record = asyncio.run(pull(reference, store=store, build_disk=True))
    disk = rootfs_image_path(chain_id(record.diff_ids))
    assert disk.is_file()
    assert listing(disk, "/etc") == {"base.txt", "top.txt"}  # the whiteout applied
    built_at = disk.stat().st_mtime_ns
    # The first container finds it and builds nothing.
    assert ensure_rootfs_image(store, record) == disk
    assert disk.stat().st_mtime_ns == built_at
    assert leftovers() == []


def test_layers_already_stored_are_applied_from_the_store(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    tag = str(time.time_ns())
    shared = base_layer(tag)
    first = push(registry, tmp_path, "first", [shared])
    second = push(registry, tmp_path, "second", [shared, [file("etc/second.txt", "2\n")]])
    store = ImageStore()
    asyncio.run(pull(first, store=store))  # no disk: the base layer is only stored
    record = asyncio.run(pull(second, store=store, build_disk=True))
    disk = rootfs_image_path(chain_id(record.diff_ids))
    assert listing(disk, "/etc") == {"base.txt", "remove-me.txt", "second.txt"}


def test_a_hostile_layer_fails_the_pull_and_leaves_nothing(
    registry: RunningRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    tag = str(time.time_ns())
    reference = push(
        registry,
        tmp_path,
        "hostile",
        [base_layer(tag), [file("../../escaped.txt", "out\n")]],
    )
    store = ImageStore()
    with pytest.raises(HuskError) as caught:
        asyncio.run(pull(reference, store=store, build_disk=True))
    assert "\n" not in str(caught.value)
    assert [r.id for r in store.list_images()] == []
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "data" / "escaped.txt").exists()
    assert disk_cache_entries() == []
    # The build lock was released: another build of the same layers may start at once.
    manifest = registry.inspect(reference)
    config = json.loads(
        run_skopeo("inspect", "--config", "--tls-verify=false", f"docker://{reference}")
    )
    diff_ids = [str(d) for d in config["rootfs"]["diff_ids"]]
    assert len(diff_ids) == len(manifest["Layers"])
    build = RootfsBuild.begin(diff_ids, names=list(manifest["Layers"]), timeout=0.0)
    assert build is not None
    build.close()
