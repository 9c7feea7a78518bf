"""Issue 18, item 4: images by any name Docker accepts; save → load → run round trips."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from engines import Engine

pytestmark = [pytest.mark.vm, pytest.mark.registry]

Check = Callable[[str, Callable[[Engine], Any]], Any]


def image_id(engine: Engine, name: str) -> str:
    return (
        engine.docker("image", "inspect", "-f", "{{.Id}}", name, check=True).stdout.decode().strip()
    )


def test_same_image_id_on_both_engines(husk_engine: Engine, docker_engine: Engine) -> None:
    """Pulled from the same registry, the image has the same id (its config digest)."""
    husk_id = husk_engine.docker("image", "inspect", "-f", "{{.Id}}", husk_engine.image)
    docker_id = image_id(docker_engine, docker_engine.image)
    assert docker_id.startswith("sha256:") and len(docker_id) == 71
    assert (husk_id.returncode, husk_id.stdout.decode().strip()) == (0, docker_id)


def test_create_by_full_short_and_sha256_id(engine: Engine, same_as_docker: Check) -> None:
    """``create`` by every id form resolves to the image (never a pull of ``<id>:latest``)."""

    def scenario(e: Engine) -> list[tuple[int, bool]]:
        full = image_id(e, e.image)
        seen = []
        for reference in (full, full.removeprefix("sha256:"), full[7:19]):
            result = e.docker("create", *e.run_args, reference, "true")
            cid = result.stdout.decode().strip()
            same = result.returncode == 0 and e.inspect(cid)[0]["Image"] == full
            seen.append((result.returncode, same))
            if result.returncode == 0:
                e.docker("rm", "-f", cid)
        return seen

    assert same_as_docker("create-by-id", scenario) == [(0, True)] * 3


def test_run_by_short_id_and_by_image_object(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        short = image_id(e, e.image)[7:19]
        by_cli = e.run(short, "echo", "by-id")
        client = e.client()
        try:
            image = client.images.get(e.image)
            container = client.containers.create(
                image, ["true"], network_mode="none" if e.name == "docker" else None
            )
            try:
                created_from = container.attrs["Image"]
            finally:
                container.remove(force=True)
        finally:
            client.close()
        return by_cli.returncode, by_cli.stdout.decode(), created_from == image.id

    assert same_as_docker("run-by-id", scenario) == (0, "by-id\n", True)


def test_save_load_run_round_trip_with_the_image_present(
    engine: Engine, same_as_docker: Check, variant_images: dict[str, str]
) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        image = variant_images["roundtrip"]
        e.docker("pull", "-q", image, check=True)
        full = image_id(e, image)
        with tempfile.TemporaryDirectory(prefix="conf-save-") as tmp:
            archive = Path(tmp) / "image.tar"
            saved = e.docker("save", "-o", str(archive), image).returncode
            loaded = e.docker("load", "-i", str(archive))
        listed = e.docker("images", "--no-trunc", "-q", image.rsplit(":", 1)[0])
        by_id = e.run(full, "echo", "after-load")
        by_name = e.run(image, "echo", "after-load")
        return (
            saved,
            loaded.returncode,
            loaded.stdout.decode().strip(),
            listed.stdout.decode().split(),
            image_id(e, image) == full,
            (by_id.returncode, by_id.stdout.decode()),
            (by_name.returncode, by_name.stdout.decode()),
        )

    observed = same_as_docker("save-load", scenario)
    saved, loaded, message, listed, same_id, by_id, by_name = observed
    assert (saved, loaded) == (0, 0)
    assert message.startswith("Loaded image: ") and message.endswith(":latest")
    assert len(listed) == 1 and same_id
    assert by_id == by_name == (0, "after-load\n")


def test_load_an_archive_docker_saved(
    husk_engine: Engine, docker_engine: Engine, variant_images: dict[str, str]
) -> None:
    """An archive written by dockerd 20.10's ``save`` loads into husk and runs."""
    image = variant_images["fromdocker"]
    docker_engine.docker("pull", "-q", image, check=True)
    with tempfile.TemporaryDirectory(prefix="conf-xsave-") as tmp:
        archive = Path(tmp) / "from-docker.tar"
        docker_engine.docker("save", "-o", str(archive), image, check=True)
        loaded = husk_engine.docker("load", "-i", str(archive))
    assert loaded.returncode == 0, loaded.stderr.decode()
    assert loaded.stdout.decode().strip() == f"Loaded image: {image}"
    assert image_id(husk_engine, image) == image_id(docker_engine, image)
    ran = husk_engine.run(image, "echo", "from-docker")
    assert (ran.returncode, ran.stdout) == (0, b"from-docker\n")


def test_repo_at_digest(engine: Engine, same_as_docker: Check) -> None:
    def scenario(e: Engine) -> tuple[Any, ...]:
        digests = e.inspect(e.image, kind="image")[0]["RepoDigests"]
        repo = e.image.rsplit(":", 1)[0]
        pinned = [d for d in digests if d.startswith(repo + "@")]
        if not pinned:
            return "no RepoDigests", digests
        result = e.docker("create", *e.run_args, pinned[0], "true")
        cid = result.stdout.decode().strip()
        same = result.returncode == 0 and e.inspect(cid)[0]["Image"] == image_id(e, e.image)
        if result.returncode == 0:
            e.docker("rm", "-f", cid)
        return result.returncode, same

    assert same_as_docker("repo-digest", scenario) == (0, True)
