"""Images without a registry: load, save, import, tag, cross-checked with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from husk.errors import InvalidArgument, NotFound, NotSupported
from husk.oci.archive import import_rootfs, load_path, save_images
from husk.oci.store import ImageStore
from registry_fixtures import run_skopeo
from testimages import (
    BUSYBOX_NAME,
    busybox_image_layout,
    install_busybox_image,
    multilayer_image_layout,
    multiplatform_index_layout,
)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "data" / "images")


@pytest.fixture(scope="session")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archive-layouts")
    return {
        "busybox": busybox_image_layout(root / "busybox"),
        "multilayer": multilayer_image_layout(root / "multilayer"),
        "multiplatform": multiplatform_index_layout(root / "multiplatform"),
    }


def _state(store: ImageStore) -> tuple[list[str], list[str]]:
    return sorted(p.name for p in store.blobs_dir.iterdir()), [r.id for r in store.list_images()]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_install_busybox_offline(store: ImageStore) -> None:
    record = install_busybox_image(store)
    assert record.names == (BUSYBOX_NAME,)
    assert store.resolve("husk.local/busybox").config["config"]["Cmd"] == ["sh"]
    again = install_busybox_image(store)
    assert again.manifest_digest == record.manifest_digest  # deterministic build


def test_oci_archive_from_skopeo_loads_with_the_same_digest(
    layouts: dict[str, Path], store: ImageStore, tmp_path: Path
) -> None:
    archive = tmp_path / "skopeo-oci.tar"
    run_skopeo("copy", f"oci:{layouts['multilayer']}:latest", f"oci-archive:{archive}:v7")
    manifest_digest = json.loads(run_skopeo("inspect", f"oci-archive:{archive}:v7"))["Digest"]
    (record,) = load_path(archive, store=store, name="example.com/multilayer")
    assert record.names == ("example.com/multilayer:v7",)
    assert record.manifest_digest == manifest_digest
    # skopeo keeps zstd but gzips the uncompressed fourth layer.
    assert [layer.media_type.rsplit(".", 1)[-1] for layer in record.layers] == [
        "tar+gzip",
        "tar+gzip",
        "tar+zstd",
        "tar+gzip",
    ]


def test_docker_archive_from_skopeo_loads(
    layouts: dict[str, Path], store: ImageStore, tmp_path: Path
) -> None:
    archive = tmp_path / "skopeo-docker.tar"
    # Docker archives cannot hold zstd layers, so this one is busybox.
    run_skopeo("copy", f"oci:{layouts['busybox']}:latest", f"docker-archive:{archive}:acme/bb:3")
    config = run_skopeo("inspect", "--config", "--raw", f"docker-archive:{archive}")
    (record,) = load_path(archive, store=store)
    assert record.names == ("docker.io/acme/bb:3",)
    assert record.id == _sha(config.encode())
    assert store.resolve("acme/bb:3").config["config"]["Cmd"] == ["sh"]
    # Compressed archives load too (docker load accepts gzip).
    zipped = tmp_path / "skopeo-docker.tar.gz"
    zipped.write_bytes(gzip.compress(archive.read_bytes(), 1))
    (again,) = load_path(zipped, store=ImageStore(tmp_path / "other"))
    assert again.id == record.id


def test_saved_archives_are_read_by_skopeo(
    layouts: dict[str, Path], store: ImageStore, tmp_path: Path
) -> None:
    (record,) = load_path(layouts["multilayer"], store=store, name="example.com/ml:1")
    oci_archive = tmp_path / "saved-oci.tar"
    save_images(["example.com/ml:1"], oci_archive, format="oci-archive", store=store)
    inspected = json.loads(run_skopeo("inspect", f"oci-archive:{oci_archive}"))
    assert inspected["Digest"] == record.manifest_digest
    assert inspected["Layers"] == [layer.digest for layer in record.layers]

    docker_archive = tmp_path / "saved-docker.tar"
    save_images(["example.com/ml:1"], docker_archive, store=store)
    config = run_skopeo("inspect", "--config", "--raw", f"docker-archive:{docker_archive}")
    assert _sha(config.encode()) == record.id
    copy = tmp_path / "copied"
    run_skopeo("copy", f"docker-archive:{docker_archive}", f"oci:{copy}:x")
    assert (copy / "index.json").is_file()
    with tarfile.open(docker_archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        for name, diff_id in zip(manifest[0]["Layers"], record.diff_ids, strict=True):
            assert _sha(tar.extractfile(name).read()) == diff_id  # type: ignore[union-attr]
    assert manifest[0]["RepoTags"] == ["example.com/ml:1"]

    # Both load back into an empty store as the same image.
    for archive in (oci_archive, docker_archive):
        fresh = ImageStore(tmp_path / f"fresh-{archive.stem}")
        (loaded,) = load_path(archive, store=fresh)
        assert loaded.id == record.id
        assert loaded.names == ("example.com/ml:1",)


def test_multiplatform_layout_picks_a_platform(layouts: dict[str, Path], store: ImageStore) -> None:
    (amd64,) = load_path(layouts["multiplatform"], store=store, name="example.com/mp")
    assert amd64.architecture == "amd64" and amd64.index_digest is not None
    (arm64,) = load_path(
        layouts["multiplatform"], store=store, name="example.com/mp", platform="linux/arm64"
    )
    assert arm64.architecture == "arm64"
    with pytest.raises(NotFound, match="linux/riscv64"):
        load_path(layouts["multiplatform"], store=store, platform="linux/riscv64")


def _tar(entries: dict[str, bytes], *, extra: list[tarfile.TarInfo] = ()) -> bytes:  # type: ignore[assignment]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buffer.getvalue()


def test_hostile_archives_are_refused(store: ImageStore, tmp_path: Path) -> None:
    before = _state(store)
    escaping = tmp_path / "escape.tar"
    escaping.write_bytes(_tar({"../../outside": b"x", "manifest.json": b"[]"}))
    with pytest.raises(InvalidArgument, match="escapes the archive"):
        load_path(escaping, store=store)
    assert not (tmp_path / "outside").exists()

    layer = _tar({"hello.txt": b"hi"})
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [_sha(b"not it")]},
        }
    ).encode()
    mismatch = tmp_path / "mismatch.tar"
    mismatch.write_bytes(
        _tar(
            {
                "manifest.json": json.dumps(
                    [{"Config": "c.json", "RepoTags": ["bad:1"], "Layers": ["l.tar"]}]
                ).encode(),
                "c.json": config,
                "l.tar": layer,
            }
        )
    )
    with pytest.raises(InvalidArgument, match=r"has diff_id .* the config says"):
        load_path(mismatch, store=store)

    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(gzip.compress(mismatch.read_bytes())[:200])
    with pytest.raises(InvalidArgument, match="truncated or corrupt"):
        load_path(truncated, store=store)

    not_an_image = tmp_path / "plain.tar"
    not_an_image.write_bytes(_tar({"etc/hostname": b"x"}))
    with pytest.raises(InvalidArgument, match="neither a docker-archive"):
        load_path(not_an_image, store=store)
    with pytest.raises(NotFound):
        load_path(tmp_path / "absent.tar", store=store)
    assert _state(store)[1] == before[1]
    store.collect_garbage()
    assert _state(store) == before


def test_import_rootfs_tarball(store: ImageStore, tmp_path: Path) -> None:
    rootfs = _tar({"bin/hello": b"#!/bin/sh\necho hi\n", "etc/os-release": b"ID=husk\n"})
    source = tmp_path / "rootfs.tar"
    source.write_bytes(rootfs)
    record = import_rootfs(
        source,
        "example.com/imported:1",
        store=store,
        changes=['CMD ["/bin/hello"]', "ENV FOO=bar", "WORKDIR /srv", "EXPOSE 80", "USER 1000"],
        message="from a tarball",
    )
    assert record.names == ("example.com/imported:1",)
    assert record.diff_ids == (_sha(rootfs),)
    assert record.layers[0].media_type.endswith("tar+gzip")
    assert gzip.decompress(store.read_blob(record.layers[0].digest)) == rootfs
    config = record.config["config"]
    assert config["Cmd"] == ["/bin/hello"]
    assert "FOO=bar" in config["Env"] and config["WorkingDir"] == "/srv"
    assert config["ExposedPorts"] == {"80/tcp": {}} and config["User"] == "1000"
    assert record.config["history"][0]["comment"] == "from a tarball"

    compressed = tmp_path / "rootfs.tar.gz"
    compressed.write_bytes(gzip.compress(rootfs))
    again = import_rootfs(compressed, None, store=store)
    assert again.diff_ids == record.diff_ids and again.names == ()

    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tarball at all" * 30)
    with pytest.raises(InvalidArgument, match="not a valid"):
        import_rootfs(bad, "x", store=store)
    with pytest.raises(NotSupported, match="ONBUILD"):
        import_rootfs(source, "x", store=store, changes=["ONBUILD RUN true"])


def test_cli_save_load_import_tag(
    layouts: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # ``image rm`` goes through the daemon (it knows which containers use an image): run
    # one of this test's own, on the data directory the other commands use.
    from daemon_fixtures import short_root, start_daemon

    root = short_root("husk-archive-")
    daemon = start_daemon(root)

    def stop_daemon() -> None:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)

    request.addfinalizer(stop_daemon)
    env = dict(daemon.env)

    def husk(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "husk.cli.main", *args],
            input=stdin,
            capture_output=True,
            env=env,
            timeout=120,
            check=False,
        )

    loaded = husk("load", "-i", str(layouts["busybox"]), "--name", "husk.local/busybox")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.decode().strip() == "Loaded image: husk.local/busybox:latest"
    assert husk("tag", "husk.local/busybox", "mine:1").returncode == 0
    out = tmp_path / "out.tar"
    assert husk("save", "-o", str(out), "mine:1").returncode == 0
    assert husk("image", "rm", "mine:1", "husk.local/busybox").returncode == 0
    assert husk("images", "-q").stdout == b""
    piped = husk("load", stdin=out.read_bytes())
    assert piped.stdout.decode().strip() == "Loaded image: mine:1"  # as docker load says
    streamed = husk("save", "--format", "oci-archive", "mine:1").stdout
    with tarfile.open(fileobj=io.BytesIO(streamed)) as saved:
        assert saved.getmember("index.json").isfile()
    rootfs = _tar({"hello": b"x"})
    imported = husk("import", "-", "imported:1", stdin=rootfs)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.decode().startswith("sha256:")
    listing = husk("images").stdout.decode().splitlines()
    assert [line.split()[:2] for line in listing[1:]] == [["imported", "1"], ["mine", "1"]]
    bad = husk("load", "-i", str(tmp_path / "out.tar"), "--platform", "nonsense")
    assert bad.returncode == 125 and bad.stderr.decode().startswith("husk: invalid platform")
