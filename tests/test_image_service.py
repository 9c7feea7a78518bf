"""The image service's rules, without a VM: prune, rmi (untag vs delete, refusal, -f), tag,
and images by any name Docker accepts (full and short ids, ``sha256:`` ids, ``repo@digest``),
resolved locally and never sent to a registry when a local image matches.

The containers are plain :class:`ImageUser` values: the service only needs to know
which image each container uses and whether it runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
from pathlib import Path

import pytest

from husk.errors import Conflict, InvalidArgument, NotFound
from husk.oci.archive import load_path
from husk.oci.manifest import canonical_json
from husk.oci.pull import local_image
from husk.oci.pull import pull as pull_image
from husk.oci.reference import names_an_id
from husk.oci.rootfs import ensure_rootfs_image
from husk.oci.store import ImageRecord, ImageStore
from husk.runtime.images import ImageService, ImageUser
from testimages import small_image_layout


class Containers:
    """What the daemon's runtime would say: which container uses which image."""

    def __init__(self) -> None:
        self.users: list[ImageUser] = []

    def add(self, image: ImageRecord, *, running: bool = False) -> ImageUser:
        user = ImageUser(f"{len(self.users):064x}", image.id, running)
        self.users.append(user)
        return user

    def __call__(self) -> list[ImageUser]:
        return list(self.users)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture
def containers() -> Containers:
    return Containers()


@pytest.fixture
def service(store: ImageStore, containers: Containers) -> ImageService:
    return ImageService(store, containers)


def add_image(store: ImageStore, tmp_path: Path, text: str, name: str | None) -> ImageRecord:
    layout = tmp_path / f"layout-{hashlib.sha1(text.encode()).hexdigest()}"
    return load_path(small_image_layout(layout, text), store=store, name=name)[0]


def ids(service: ImageService) -> set[str]:
    return {record.id for record in service.all()}


# ----------------------------------------------------------------------- prune


def test_prune_removes_dangling_only_and_never_an_image_in_use(
    service: ImageService, store: ImageStore, containers: Containers, tmp_path: Path
) -> None:
    named = add_image(store, tmp_path, "named", "example.com/named:1")
    dangling = add_image(store, tmp_path, "dangling", None)
    used_dangling = add_image(store, tmp_path, "used-dangling", None)
    containers.add(used_dangling)  # a stopped container's image, without a name

    result = service.prune()
    assert result.deleted_images == (dangling.id,)
    assert ids(service) == {named.id, used_dangling.id}
    assert result.reclaimed_bytes > 0
    assert not store.has_blob(dangling.layers[0].digest)  # its blobs went too


def test_prune_all_removes_every_unused_image_and_keeps_stopped_and_running_ones(
    service: ImageService, store: ImageStore, containers: Containers, tmp_path: Path
) -> None:
    unused = add_image(store, tmp_path, "unused", "example.com/unused:1")
    stopped = add_image(store, tmp_path, "stopped", "example.com/stopped:1")
    running = add_image(store, tmp_path, "running", "example.com/running:1")
    containers.add(stopped, running=False)
    containers.add(running, running=True)

    result = service.prune(all_images=True)
    assert result.deleted_images == (unused.id,)
    assert ids(service) == {stopped.id, running.id}
    # The kept images are whole: their names and blobs are still there.
    assert service.find("example.com/stopped:1").id == stopped.id
    assert all(store.has_blob(layer.digest) for layer in stopped.layers)


# ------------------------------------------------------------------ tag, rmi


def test_tag_adds_a_name_and_rmi_of_one_name_only_untags(
    service: ImageService, store: ImageStore, containers: Containers, tmp_path: Path
) -> None:
    image = add_image(store, tmp_path, "app", "example.com/app:1")
    containers.add(image, running=True)  # untagging one of several names needs no check
    record, name = service.tag(image.short_id, "app:2")
    assert (record.id, name) == (image.id, "docker.io/library/app:2")
    assert set(service.find("app:2").names) == {"example.com/app:1", name}
    with pytest.raises(InvalidArgument, match="digest"):
        service.tag("app:2", "app@sha256:" + "a" * 64)
    with pytest.raises(NotFound, match="No such image: missing"):
        service.tag("missing", "x")

    result = service.remove("app:2")
    assert (result.untagged, result.deleted) == ((name,), ())
    assert service.find("example.com/app:1").names == ("example.com/app:1",)


def test_rmi_deletes_an_unused_image_by_its_last_name_or_by_id(
    service: ImageService, store: ImageStore, tmp_path: Path
) -> None:
    first = add_image(store, tmp_path, "first", "example.com/first:1")
    second = add_image(store, tmp_path, "second", "example.com/second:1")
    removed = service.remove("example.com/first:1")
    assert (removed.untagged, removed.deleted) == (("example.com/first:1",), (first.id,))
    by_id = service.remove(second.short_id)
    assert (by_id.untagged, by_id.deleted) == (("example.com/second:1",), (second.id,))
    assert ids(service) == set()
    with pytest.raises(NotFound, match="No such image"):
        service.remove(second.short_id)


def test_rmi_refuses_a_stopped_containers_image_unless_forced_and_then_keeps_it(
    service: ImageService, store: ImageStore, containers: Containers, tmp_path: Path
) -> None:
    image = add_image(store, tmp_path, "held", "example.com/held:1")
    user = containers.add(image, running=False)
    with pytest.raises(Conflict, match=rf"must force.*container {user.container_id[:12]}"):
        service.remove("example.com/held:1")
    with pytest.raises(Conflict, match=r"must be forced.*stopped container"):
        service.remove(image.id)
    assert service.find("example.com/held:1").id == image.id  # nothing changed

    forced = service.remove("example.com/held:1", force=True)
    assert (forced.untagged, forced.deleted) == (("example.com/held:1",), ())
    # The container's image stays (dangling) and still resolves by its id; prune keeps it.
    assert service.find(image.id).names == ()
    assert service.prune(all_images=True).deleted_images == ()
    assert image.id in ids(service)


def test_rmi_never_deletes_a_running_containers_image(
    service: ImageService, store: ImageStore, containers: Containers, tmp_path: Path
) -> None:
    image = add_image(store, tmp_path, "live", "example.com/live:1")
    containers.add(image, running=True)
    with pytest.raises(Conflict, match=r"cannot be forced.*running container"):
        service.remove(image.short_id, force=True)
    with pytest.raises(Conflict, match="must force"):
        service.remove("example.com/live:1")
    # By name and forced: the name goes, the image stays for the running container.
    forced = service.remove("example.com/live:1", force=True)
    assert (forced.untagged, forced.deleted) == (("example.com/live:1",), ())
    assert image.id in ids(service)


def test_rmi_by_id_of_an_image_in_several_repositories_needs_force(
    service: ImageService, store: ImageStore, tmp_path: Path
) -> None:
    image = add_image(store, tmp_path, "multi", "example.com/a:1")
    service.tag("example.com/a:1", "example.com/b:1")
    with pytest.raises(Conflict, match="several repositories"):
        service.remove(image.short_id)
    forced = service.remove(image.short_id, force=True)
    assert set(forced.untagged) == {"example.com/a:1", "example.com/b:1"}
    assert forced.deleted == (image.id,)


# --------------------------------------------------------- names and ids


def test_every_spelling_docker_accepts_finds_the_image(
    service: ImageService, store: ImageStore, tmp_path: Path
) -> None:
    image = add_image(store, tmp_path, "spell", "example.com/spell:1")
    hex_id = image.id.removeprefix("sha256:")
    repo_digest = f"example.com/spell@{image.manifest_digest}"
    for spelling in (
        "example.com/spell:1",
        image.id,
        hex_id,
        hex_id[:12],
        hex_id[:5],
        f"sha256:{hex_id[:12]}",
        repo_digest,
    ):
        assert service.find(spelling).id == image.id, spelling
    for wrong in ("example.com/spell:2", "sha256:" + "0" * 64, "UPPER", ""):
        with pytest.raises(NotFound, match="No such image"):
            service.find(wrong)


def test_a_name_wins_over_an_id_prefix_that_spells_the_same(
    service: ImageService, store: ImageStore, tmp_path: Path
) -> None:
    image = add_image(store, tmp_path, "by-id", None)
    prefix = image.id.removeprefix("sha256:")[:12]
    other = add_image(store, tmp_path, "by-name", prefix)  # a repository named like the id
    assert service.find(prefix).id == other.id
    assert service.find(image.id).id == image.id


def test_ids_are_identified_without_parsing_them_as_names() -> None:
    assert names_an_id("sha256:" + "a" * 64)
    assert names_an_id("sha256:abc")
    assert names_an_id("a" * 64)
    assert not names_an_id("a" * 12)  # could be a repository name: looked up both ways
    assert not names_an_id("alpine")


class NoRegistry:
    """A registry client factory that fails the test if a registry is contacted."""

    contacted: list[str] = []

    def __call__(self, domain: str) -> object:
        self.contacted.append(domain)
        raise AssertionError(f"a registry was contacted: {domain}")


@pytest.mark.parametrize("policy", ["missing", "always", "newer", "never"])
def test_pulling_a_local_image_by_id_never_contacts_a_registry(
    store: ImageStore, tmp_path: Path, policy: str
) -> None:
    image = add_image(store, tmp_path, f"local-{policy}", "example.com/local:1")
    hex_id = image.id.removeprefix("sha256:")
    factory = NoRegistry()
    for spelling in (image.id, hex_id, hex_id[:12], f"sha256:{hex_id[:12]}"):
        pulled = asyncio.run(
            pull_image(spelling, policy=policy, store=store, client_factory=factory)  # type: ignore[arg-type]
        )
        assert pulled.id == image.id, spelling
    assert factory.contacted == []
    # A local name under the default policy is not fetched either.
    local = asyncio.run(
        pull_image("example.com/local:1", policy="missing", store=store, client_factory=factory)  # type: ignore[arg-type]
    )
    assert local.id == image.id


def test_an_unknown_id_is_not_found_and_not_pulled_as_a_name(store: ImageStore) -> None:
    factory = NoRegistry()
    for spelling in ("sha256:" + "b" * 64, "b" * 64, "sha256:bbbb"):
        with pytest.raises(NotFound, match="No such image"):
            asyncio.run(pull_image(spelling, store=store, client_factory=factory))  # type: ignore[arg-type]
    assert factory.contacted == []
    assert local_image(store, "sha256:" + "b" * 64) is None


# ------------------------------------------------------- save -> load round trip


@pytest.mark.parametrize("archive_format", ["docker-archive", "oci-archive"])
def test_save_then_load_of_a_present_image_keeps_one_unambiguous_image(
    service: ImageService, store: ImageStore, tmp_path: Path, archive_format: str
) -> None:
    image = add_image(store, tmp_path, f"trip-{archive_format}", "example.com/trip:1")
    archive = tmp_path / "saved.tar"
    service.save(["example.com/trip:1"], archive, format=archive_format)
    with tarfile.open(archive) as saved:
        assert saved.getnames()
    (loaded,) = service.load(archive)
    assert loaded.id == image.id
    # One image, not two manifests of one id: every spelling of the id still resolves.
    assert [r.id for r in service.all()] == [image.id]
    for spelling in (image.id, image.id.removeprefix("sha256:"), image.short_id):
        assert service.find(spelling).manifest_digest == image.manifest_digest
    assert "example.com/trip:1" in service.find(image.id).names


def test_a_store_already_holding_two_manifests_of_one_id_still_resolves_it(
    store: ImageStore, tmp_path: Path
) -> None:
    """A store written before loads were merged: the id is not "ambiguous"."""
    image = add_image(store, tmp_path, "old-store", "example.com/old:1")
    # Record a second manifest of the same config as a second image, as older husk did.
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": image.id,
            "size": image.config_size,
        },
        "layers": [
            {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
            for layer in image.layers
        ],
        "annotations": {"made": "twice"},
    }
    second = store.add_blob_bytes(canonical_json(manifest))
    index = store._read_index()
    index["images"][second] = {"added": "9999", "index": None, "repo_digests": []}
    store._write_index(index)
    assert len(store._read_index()["images"]) == 2
    for spelling in (image.id, image.id.removeprefix("sha256:"), image.short_id):
        assert store.resolve(spelling).id == image.id


def test_the_cli_never_asks_for_an_id_to_be_pulled(tmp_path: Path) -> None:
    from husk.client.http import ApiClient
    from husk.client.images import pull

    nowhere = ApiClient(str(tmp_path / "no-daemon.sock"))  # any request would fail differently
    for spelling in ("sha256:" + "c" * 64, "c" * 64, "sha256:cccc"):
        with pytest.raises(NotFound, match="No such image"):
            pull(nowhere, spelling)


# ------------------------------------------------------- the daemon's doors


def test_daemon_image_doors_and_their_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoints every CLI image command uses, on a real store, without a VM."""
    from aiohttp.test_utils import TestClient, TestServer

    from husk.daemon.docker import build_app
    from husk.runtime.runtime import Runtime

    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    layout = small_image_layout(tmp_path / "layout", "doors")
    archive = tmp_path / "layout.tar"
    with tarfile.open(archive, "w") as tar:
        for child in sorted(layout.iterdir()):
            tar.add(child, arcname=child.name)

    async def body() -> None:
        async with TestClient(TestServer(build_app(Runtime()))) as client:
            loaded = await client.post(
                "/images/load?name=husk.local/doors:1&platform=linux/amd64",
                data=archive.read_bytes(),
            )
            assert loaded.status == 200
            assert "Loaded image: husk.local/doors:1" in await loaded.text()
            saved = await client.get("/images/get?names=husk.local/doors:1&format=oci-archive")
            assert saved.status == 200
            (tmp_path / "saved.tar").write_bytes(await saved.read())
            with tarfile.open(tmp_path / "saved.tar") as tar:
                assert "index.json" in tar.getnames()
            bad_platform = await client.post(
                "/images/load?platform=nonsense", data=archive.read_bytes()
            )
            assert bad_platform.status == 400
            assert "invalid platform" in (await bad_platform.json())["message"]
            by_id = await client.post("/images/create?fromImage=sha256:" + "d" * 64)
            assert by_id.status == 400
            assert "by its id" in (await by_id.json())["message"]
            to_digest = await client.post(
                "/images/husk.local/doors:1/push?destination=x@sha256:" + "e" * 64
            )
            assert "digest reference" in await to_digest.text()
            for template_body, problem in (
                ({"Memory": "big", "Cpus": 1}, "Memory must be a number"),
                ({"Memory": 1 << 29, "Cpus": 0}, "Cpus must be at least"),
                ({"Memory": 1 << 29, "Cpus": 1, "Binds": 65}, "at most 64"),
                ({"Memory": 1 << 29, "Cpus": 1, "Rebuild": "yes"}, "true or false"),
            ):
                refused = await client.post("/husk/templates", json=template_body)
                assert refused.status == 400, template_body
                assert problem in (await refused.json())["message"]

    asyncio.run(body())


def test_removing_an_image_frees_its_disk_but_not_one_another_image_shares(
    service: ImageService, store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    gone = add_image(store, tmp_path, "gone", "example.com/gone:1")
    kept = add_image(store, tmp_path, "kept", "example.com/kept:1")
    gone_disk, kept_disk = ensure_rootfs_image(store, gone), ensure_rootfs_image(store, kept)
    service.tag("example.com/kept:1", "example.com/alias:1")
    service.remove("example.com/gone:1")
    assert not gone_disk.exists()
    service.remove("example.com/alias:1")  # only a name: the image and its disk stay
    assert kept_disk.is_file()
    service.prune(all_images=True)
    assert not kept_disk.exists()
