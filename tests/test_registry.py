"""Pulling and pushing against a real docker-registry, cross-checked with skopeo."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from husk.errors import InvalidArgument, NotFound
from husk.oci.archive import load_path
from husk.oci.pull import PullEvent, pull
from husk.oci.push import PushEvent, push
from husk.oci.store import ImageStore
from registry_fixtures import (  # noqa: F401 - fixtures
    FaultProxy,
    RunningRegistry,
    registry,
    run_skopeo,
)
from testimages import (
    busybox_image_layout,
    multilayer_image_layout,
    multiplatform_index_layout,
    small_image_layout,
)

pytestmark = pytest.mark.registry


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "data" / "images")


@pytest.fixture(scope="session")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {
        "busybox": busybox_image_layout(root / "busybox"),
        "multilayer": multilayer_image_layout(root / "multilayer"),
        "multiplatform": multiplatform_index_layout(root / "multiplatform"),
    }


@pytest.fixture(scope="session")
def pushed(registry: RunningRegistry, layouts: dict[str, Path]) -> dict[str, str]:  # noqa: F811
    """The test images, pushed once by skopeo."""
    return {
        "busybox": registry.push_oci_layout(layouts["busybox"], "test/busybox:latest"),
        "multilayer": registry.push_oci_layout(layouts["multilayer"], "test/multilayer:v1"),
        "multiplatform": registry.push_oci_layout(layouts["multiplatform"], "test/multi:latest"),
    }


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_skopeo_pushed_image_pulls_with_the_same_digest(
    registry: RunningRegistry,  # noqa: F811
    pushed: dict[str, str],
    store: ImageStore,
) -> None:
    events: list[PullEvent] = []
    record = asyncio.run(pull(pushed["busybox"], store=store, progress=events.append))
    skopeo_digest = registry.inspect("test/busybox:latest")["Digest"]
    assert (
        record.manifest_digest == skopeo_digest == registry.manifest_digest("test/busybox:latest")
    )
    assert record.names == (pushed["busybox"],)
    assert record.config["config"]["Cmd"] == ["sh"]
    for digest in (record.manifest_digest, record.id, *(layer.digest for layer in record.layers)):
        assert _sha256(store.blob_path(digest)) == digest
    layer = record.layers[0]
    statuses = [e.status for e in events if e.digest == layer.digest]
    assert statuses[0] == "waiting" and statuses[-1] == "done"
    assert max(e.completed for e in events if e.digest == layer.digest) == layer.size
    assert store.resolve(f"{registry.host}/test/busybox").id == record.id


def test_multilayer_image_with_gzip_zstd_and_plain_layers(
    pushed: dict[str, str], store: ImageStore
) -> None:
    record = asyncio.run(pull(pushed["multilayer"], store=store))
    # skopeo gzips the layout's uncompressed fourth layer on its way to a registry.
    assert [layer.media_type.rsplit(".", 1)[-1] for layer in record.layers] == [
        "tar+gzip",
        "tar+gzip",
        "tar+zstd",
        "tar+gzip",
    ]
    assert len(record.diff_ids) == 4
    assert record.config["config"]["WorkingDir"] == "/data"
    assert record.size == sum(layer.size for layer in record.layers) + record.config_size


def test_index_selects_the_platform(
    registry: RunningRegistry,  # noqa: F811
    pushed: dict[str, str],
    store: ImageStore,
) -> None:
    index_digest = registry.manifest_digest("test/multi:latest")
    amd64 = asyncio.run(pull(pushed["multiplatform"], store=store, platform="linux/amd64"))
    assert amd64.architecture == "amd64"
    assert amd64.index_digest == index_digest
    assert store.has_blob(index_digest)
    arm64 = asyncio.run(
        pull(pushed["multiplatform"], store=store, platform="linux/arm64", policy="always")
    )
    assert (arm64.architecture, arm64.variant) == ("arm64", "v8")
    assert arm64.manifest_digest != amd64.manifest_digest
    # The name moved to the arm64 image; the amd64 one is now dangling.
    assert store.resolve(pushed["multiplatform"]).architecture == "arm64"
    with pytest.raises(NotFound, match=r"no image for platform linux/s390x.*linux/amd64"):
        asyncio.run(pull(pushed["multiplatform"], store=store, platform="linux/s390x"))
    with pytest.raises(InvalidArgument, match="os/arch"):
        asyncio.run(pull(pushed["multiplatform"], store=store, platform="amd64"))


def test_pull_by_digest(
    registry: RunningRegistry,  # noqa: F811
    pushed: dict[str, str],
    store: ImageStore,
) -> None:
    digest = registry.manifest_digest("test/busybox:latest")
    reference = f"{registry.host}/test/busybox@{digest}"
    record = asyncio.run(pull(reference, store=store))
    assert record.manifest_digest == digest
    assert record.names == (reference,)
    assert store.resolve(reference).id == record.id
    assert store.resolve(f"{registry.host}/test/busybox:whatever@{digest}").id == record.id


def test_missing_image_and_repository(registry: RunningRegistry, store: ImageStore) -> None:  # noqa: F811
    with pytest.raises(NotFound, match="not found"):
        asyncio.run(pull(f"{registry.host}/test/nothing-here:latest", store=store))
    assert store.list_images() == []


def test_pull_policies(
    registry: RunningRegistry,  # noqa: F811
    layouts: dict[str, Path],
    store: ImageStore,
    tmp_path: Path,
) -> None:
    ref = registry.push_oci_layout(small_image_layout(tmp_path / "v1", "one"), "test/policy:latest")
    with pytest.raises(NotFound, match="pull policy is 'never'"):
        asyncio.run(pull(ref, store=store, policy="never"))
    with FaultProxy(registry) as proxy:
        via_proxy = ref.replace(registry.host, proxy.host)
        first = asyncio.run(pull(via_proxy, store=store, policy="if-not-present"))
        proxy.requests.clear()
        assert asyncio.run(pull(via_proxy, store=store, policy="missing")).id == first.id
        assert asyncio.run(pull(via_proxy, store=store, policy="never")).id == first.id
        assert proxy.requests == []
        assert asyncio.run(pull(via_proxy, store=store, policy="newer")).id == first.id
        assert [m for m, _, _ in proxy.requests if m != "HEAD"] == [], proxy.requests
        registry.push_oci_layout(small_image_layout(tmp_path / "v2", "two"), "test/policy:latest")
        assert asyncio.run(pull(via_proxy, store=store, policy="missing")).id == first.id
        second = asyncio.run(pull(via_proxy, store=store, policy="newer"))
        assert second.id != first.id
        proxy.requests.clear()
        assert asyncio.run(pull(via_proxy, store=store, policy="always")).id == second.id
        assert any("/manifests/" in path for m, path, _ in proxy.requests if m == "GET")
    with pytest.raises(InvalidArgument, match="invalid pull policy"):
        asyncio.run(pull(ref, store=store, policy="sometimes"))


def test_concurrent_pulls_download_each_blob_once(
    registry: RunningRegistry,  # noqa: F811
    pushed: dict[str, str],
    tmp_path: Path,
) -> None:
    store = ImageStore(tmp_path / "shared")
    with FaultProxy(registry) as proxy:
        reference = pushed["multilayer"].replace(registry.host, proxy.host)

        async def both() -> list[object]:
            return list(
                await asyncio.gather(
                    pull(reference, store=store, policy="always"),
                    pull(reference, store=ImageStore(store.root), policy="always"),
                )
            )

        first, second = asyncio.run(both())
        blob_gets = [p for m, p, _ in proxy.requests if m == "GET" and "/blobs/" in p]
    assert first == second
    assert len(blob_gets) == len(set(blob_gets)) == 5  # config + 4 layers


def test_interrupted_blob_resumes_with_range(
    registry: RunningRegistry,  # noqa: F811
    pushed: dict[str, str],
    store: ImageStore,
) -> None:
    digest = registry.inspect("test/busybox:latest")["Layers"][0]
    with FaultProxy(registry) as proxy:
        proxy.faults[digest] = "truncate-once"
        record = asyncio.run(
            pull(pushed["busybox"].replace(registry.host, proxy.host), store=store)
        )
        ranges = [r for m, p, r in proxy.requests if m == "GET" and p.endswith(digest)]
    assert record.layers[0].digest == digest
    assert _sha256(store.blob_path(digest)) == digest
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert list(store.ingest_dir.glob("*.partial")) == []


def test_husk_push_is_read_back_by_skopeo(
    registry: RunningRegistry,  # noqa: F811
    layouts: dict[str, Path],
    store: ImageStore,
    tmp_path: Path,
) -> None:
    record = load_path(layouts["multilayer"], store=store, name="husk.local/multilayer:v1")[0]
    target = f"{registry.host}/pushed/multilayer:v1"
    events: list[PushEvent] = []
    result = asyncio.run(
        push("husk.local/multilayer:v1", destination=target, store=store, progress=events.append)
    )
    assert result.digest == record.manifest_digest
    inspected = registry.inspect("pushed/multilayer:v1")
    assert inspected["Digest"] == record.manifest_digest
    assert inspected["Layers"] == [layer.digest for layer in record.layers]
    # husk pushes blobs as they are: the plain tar layer stays uncompressed.
    raw = json.loads(registry.inspect("pushed/multilayer:v1", raw=True))
    assert [layer["mediaType"] for layer in raw["layers"]] == [
        layer.media_type for layer in record.layers
    ]
    assert record.layers[3].media_type == "application/vnd.oci.image.layer.v1.tar"
    run_skopeo("copy", "--src-tls-verify=false", f"docker://{target}", f"oci:{tmp_path}/copy:v1")
    assert (tmp_path / "copy" / "index.json").exists()

    # Pushing again skips every blob; a second repository mounts them.
    events.clear()
    asyncio.run(
        push("husk.local/multilayer:v1", destination=target, store=store, progress=events.append)
    )
    assert {e.status for e in events} == {"waiting", "exists"}
    events.clear()
    other = f"{registry.host}/pushed/elsewhere:v1"
    asyncio.run(
        push("husk.local/multilayer:v1", destination=other, store=store, progress=events.append)
    )
    assert "mounted" in {e.status for e in events}
    assert registry.inspect("pushed/elsewhere:v1")["Digest"] == record.manifest_digest

    # Round trip: a fresh store pulls the pushed image with the same digest.
    fresh = ImageStore(tmp_path / "fresh")
    pulled = asyncio.run(pull(target, store=fresh))
    assert pulled.manifest_digest == record.manifest_digest


def test_chunked_push(
    registry: RunningRegistry,  # noqa: F811
    layouts: dict[str, Path],
    store: ImageStore,
) -> None:
    record = load_path(layouts["busybox"], store=store, name="husk.local/busybox:latest")[0]
    target = f"{registry.host}/pushed/chunked:latest"
    asyncio.run(push("husk.local/busybox", destination=target, store=store, chunk_size=200_000))
    assert registry.inspect("pushed/chunked:latest")["Digest"] == record.manifest_digest


def test_cli_pull_images_rmi(
    registry: RunningRegistry,  # noqa: F811
    pushed: dict[str, str],
    layouts: dict[str, Path],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    # rmi goes through the daemon (it knows which containers use an image): run one
    # of this test's own, on the data directory the CLI's pull writes to.
    from daemon_fixtures import short_root, start_daemon

    root = short_root("husk-rmi-")
    daemon = start_daemon(root)

    def stop_daemon() -> None:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)

    request.addfinalizer(stop_daemon)
    env = {**daemon.env, "DOCKER_CONFIG": str(tmp_path)}

    def husk(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "husk.cli.main", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    result = husk("pull", pushed["busybox"])
    assert result.returncode == 0, result.stderr
    digest = registry.manifest_digest("test/busybox:latest")
    assert result.stdout.splitlines() == [
        f"latest: Pulling from {registry.host}/test/busybox",
        f"Digest: {digest}",
        f"Status: Downloaded newer image for {pushed['busybox']}",
        pushed["busybox"],
    ]
    again = husk("pull", "-q", pushed["busybox"])
    assert again.stdout.splitlines() == [pushed["busybox"]]
    assert "Image is up to date" in husk("pull", "--policy", "newer", pushed["busybox"]).stdout
    assert "\x1b[" not in result.stdout  # no progress bars when not a terminal
    listing = husk("images", "--digests").stdout.splitlines()
    assert listing[0].split() == ["REPOSITORY", "TAG", "DIGEST", "IMAGE", "ID", "CREATED", "SIZE"]
    assert listing[1].split()[:3] == [f"{registry.host}/test/busybox", "latest", digest]
    assert listing[1].split()[-1] == "1.04MB"
    image_id = husk("images", "-q").stdout.strip()
    assert len(image_id) == 12
    inspect = husk("image", "inspect", pushed["busybox"])
    assert f'"{digest}"' in inspect.stdout
    bad = husk("pull", "Not/Valid")
    assert bad.returncode == 125
    assert (
        bad.stderr.strip()
        == "husk: invalid reference 'Not/Valid': bad repository component 'Not' (must be lowercase)"
    )
    removed = husk("rmi", image_id)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines()[-1].startswith("Deleted: sha256:" + image_id)
    assert husk("images", "-q").stdout == ""
    missing = husk("rmi", image_id)
    assert missing.returncode == 125 and "no such image" in missing.stderr.lower()

    # push goes through the daemon too: under another name, in chunks, no local tag added.
    loaded = husk("load", "-i", str(layouts["busybox"]), "--name", "husk.local/busybox")
    assert loaded.returncode == 0, loaded.stderr
    destination = f"{registry.host}/cli/pushed:1"
    result = husk("push", "--chunk-size", "200000", "husk.local/busybox", destination)
    assert result.returncode == 0, result.stderr
    digest = registry.inspect("cli/pushed:1")["Digest"]
    size = len(registry.inspect("cli/pushed:1", raw=True))
    assert result.stdout.splitlines() == [f"{destination}: digest: {digest} size: {size}"]
    assert husk("push", "-q", "husk.local/busybox", destination).stdout.strip() == digest
    assert "cli/pushed" not in husk("images").stdout
    bad = husk("push", "husk.local/busybox", f"{registry.host}/x@sha256:{'a' * 64}")
    assert bad.returncode == 125 and "digest reference" in bad.stderr
