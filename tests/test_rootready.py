"""Root-ready snapshots' decisions on fake machines (no QEMU): which starts use one, what
one is keyed by, that it is built in the background, never shared between containers,
dropped with its image, and that a failing one falls back with the writable disk intact.

The real AgentClient, sandbox, template and snapshot code run against fake machines
(tests/fake_machine.py); the VM-level checks are in tests/test_rootready_vm.py.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from fake_machine import FakeBackend
from husk import settings
from husk.errors import InvalidArgument
from husk.guest.protocol import MsgType
from husk.oci.rootfs import make_ext4_disk
from husk.sandbox import rootready, rootready_boot, templates
from husk.sandbox.config import SandboxConfig
from husk.sandbox.rootready import ImageIdentity
from husk.sandbox.sandbox import Sandbox
from husk.vm.machine import ShareConfig
from test_provisioning import MIB, backend, boot, box_config, env, machines, run  # noqa: F401

UPPER_BYTES = 16 * MIB


@pytest.fixture(autouse=True)
def root_ready_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switched on as config.json's {"root_ready": true} does (off by default)."""
    monkeypatch.delenv("HUSK_NO_ROOT_READY", raising=False)
    monkeypatch.setattr(settings, "ROOT_READY_DEFAULT", True)
    monkeypatch.setattr(rootready_boot, "BUILD_DELAY", 0.0)
    monkeypatch.setattr(rootready_boot, "_failed", set())


def first_start(
    root: Path, name: str, image: Path | None = None, **overrides: Any
) -> SandboxConfig:
    """A container's first start: a fresh ext4 writable disk, nothing mounted."""
    disks = root / "disks"
    disks.mkdir(exist_ok=True)
    upper = disks / f"{name}.ext4"
    make_ext4_disk(upper, UPPER_BYTES)
    if image is None:
        image = disks / "image.erofs"
        if not image.exists():
            image.write_bytes(b"an image disk" + bytes(4096))
    settings: dict[str, Any] = {"image_disk": image, "upper_disk": upper, "root_ready": True}
    settings.update(overrides)
    return box_config(root, name, **settings)


def prepare_bodies(box: Sandbox) -> list[dict[str, Any]]:
    agent = box.machine.agent  # type: ignore[attr-defined]
    return [json.loads(frame.payload) for frame in agent.frames_of(MsgType.PREPARE)]


async def start_and_build(root: Path, backend: FakeBackend, name: str) -> Sandbox:  # noqa: F811
    """The image's first start (the shape template), then its snapshot's background build."""
    box = await boot(first_start(root, name), backend)
    assert not box.root_ready and box.boot_path == "template"
    await rootready_boot.wait_for_builds()
    return box


def stored() -> list[Path]:
    base = rootready.snapshots_dir()
    return sorted(p for p in base.iterdir() if not p.name.startswith(".")) if base.is_dir() else []


def test_a_first_start_builds_the_snapshot_and_later_first_starts_restore_their_own_copy(
    env: Path,  # noqa: F811
    backend: FakeBackend,  # noqa: F811
) -> None:
    async def scenario() -> None:
        first = await start_and_build(env, backend, "one")
        (snapshot,) = stored()
        (builder,) = [m for m in machines(backend) if m.config.disks[1].path.name == "upper.ext4"]
        # The snapshot's VM mounted the image disk itself and a fresh writable disk of
        # the container's size, never the container's own, and had a hostname of its own.
        assert builder.config.disks[0].path == first.machine.config.disks[0].path
        assert builder.config.disks[1].path.name == rootready.UPPER
        assert builder.calls == ["boot", "snapshot", "kill"]
        body = prepare_bodies(first)[0]
        assert body["hostname"] == "one" and "identity_only" not in body
        metadata = json.loads((snapshot / templates.METADATA).read_text())
        assert metadata["image"] == ImageIdentity.of(env / "disks" / "image.erofs").to_json()
        assert (snapshot / rootready.UPPER).stat().st_mode & 0o777 == 0o400
        await first.discard()

        boxes = []
        for name in ("two", "three"):
            config = first_start(env, name)
            pristine = os.stat(config.upper_disk).st_ino  # type: ignore[arg-type]
            box = await boot(config, backend)
            assert (box.boot_path, box.root_ready) == ("template", True), box.cold_reason
            assert box.machine.restored_from is not None  # type: ignore[attr-defined]
            assert str(builder.state_dir).encode() in box.machine.restored_from  # type: ignore[attr-defined]
            # Only the identity is written after the restore: its own hostname.
            assert prepare_bodies(box) == [{"identity_only": True, "hostname": name, "dns": None}]
            upper = config.upper_disk
            assert upper is not None
            # Its writable disk is a copy of the snapshot's, in a file of its own.
            assert upper.read_bytes() == (snapshot / rootready.UPPER).read_bytes()
            assert upper.stat().st_ino not in (pristine, (snapshot / rootready.UPPER).stat().st_ino)
            assert not [p for p in upper.parent.iterdir() if p.name.startswith(".")]
            boxes.append((box, upper))
        # Two containers of one snapshot share no written data: one's writes are its own.
        (_, upper_two), (_, upper_three) = boxes
        with upper_two.open("r+b") as stream:
            stream.seek(4 * MIB)
            stream.write(b"written by two")
        assert b"written by two" not in upper_three.read_bytes()
        assert b"written by two" not in (snapshot / rootready.UPPER).read_bytes()
        for box, _ in boxes:
            await box.discard()

    run(scenario())


def test_only_a_first_start_with_nothing_mounted_may_use_a_snapshot(
    env: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert rootready.unfit(first_start(env, "plain")) == ""
    share = ShareConfig(tag="bind0", path=env)
    cases = {
        "not offered": first_start(env, "mounts", root_ready=False),
        "templates": first_start(env, "cold", use_template=False),
        "shares": first_start(env, "volume", shares=[share]),
        "own start": first_start(env, "maintenance", maintenance=True),
        "no writable disk": first_start(env, "tmpfs", upper_disk=None),
    }
    for words, config in cases.items():
        assert words in rootready.unfit(config)
    # A writable disk mounted once (an earlier start, a `cp` into the created container)
    # is not pristine: its superblock counts the mount.
    used = first_start(env, "used")
    assert used.upper_disk is not None
    with used.upper_disk.open("r+b") as stream:
        stream.seek(1024 + 0x34)
        stream.write(struct.pack("<H", 1))
    assert "has been used" in rootready.unfit(used)
    not_ext4 = first_start(env, "sparse")
    assert not_ext4.upper_disk is not None
    not_ext4.upper_disk.write_bytes(bytes(8192))
    assert "has been used" in rootready.unfit(not_ext4)

    assert rootready.enabled()
    monkeypatch.setenv("HUSK_NO_ROOT_READY", "1")
    assert not rootready.enabled()
    monkeypatch.delenv("HUSK_NO_ROOT_READY")
    config_file = env / "data" / "config.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text('{"root_ready": false}')
    assert not rootready.enabled()
    config_file.write_text('{"templates": false}')
    assert not rootready.enabled()
    config_file.write_text('{"root_ready": true}')
    assert rootready.enabled()
    monkeypatch.setattr(settings, "ROOT_READY_DEFAULT", False)
    config_file.write_text("{}")
    assert not rootready.enabled()  # off unless config.json asks for it
    config_file.write_text('{"root_ready": true}')
    assert rootready.enabled()
    monkeypatch.setenv("HUSK_NO_ROOT_READY", "1")  # the environment wins
    assert not rootready.enabled()
    monkeypatch.delenv("HUSK_NO_ROOT_READY")
    config_file.write_text('{"root_ready": "yes"}')
    with pytest.raises(InvalidArgument, match='"root_ready"'):
        rootready.enabled()


def test_switched_off_no_snapshot_is_built_or_used(
    env: Path,  # noqa: F811
    backend: FakeBackend,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        await (await start_and_build(env, backend, "one")).discard()
        assert stored()
        monkeypatch.setenv("HUSK_NO_ROOT_READY", "1")
        box = await boot(first_start(env, "two"), backend)
        assert not box.root_ready and prepare_bodies(box)[0]["hostname"] == "two"
        await box.discard()

    run(scenario())


def test_the_key_names_the_shape_the_image_file_and_the_hosts_file(tmp_path: Path) -> None:
    image = tmp_path / "image.erofs"
    image.write_bytes(b"one")
    identity = ImageIdentity.of(image)
    inputs = templates.TemplateInputs(
        "sha256:b", "q", "tcg", "max", 1, 256, None, (), (("d", True, "none", 4096),), (), True, 4
    )
    key = rootready.snapshot_key(inputs, identity, hosts_later=True)
    assert key == rootready.snapshot_key(inputs, ImageIdentity.of(image), hosts_later=True)
    assert key != rootready.snapshot_key(inputs, identity, hosts_later=False)
    other_shape = templates.TemplateInputs(
        "sha256:b", "q", "tcg", "max", 1, 512, None, (), (("d", True, "none", 4096),), (), True, 4
    )
    assert key != rootready.snapshot_key(other_shape, identity, hosts_later=True)
    # The same name made again is another file: another key, and the old one is stale.
    image.unlink()
    image.write_bytes(b"one")
    remade = ImageIdentity.of(image)
    assert not identity.current() and remade.current()
    assert key != rootready.snapshot_key(inputs, remade, hosts_later=True)


def test_a_snapshot_whose_image_was_removed_is_not_used_and_is_pruned(
    env: Path,  # noqa: F811
    backend: FakeBackend,  # noqa: F811
) -> None:
    async def scenario() -> None:
        await (await start_and_build(env, backend, "one")).discard()
        (snapshot,) = stored()
        image = env / "disks" / "image.erofs"
        image.unlink()  # the image removed, then pulled and its disk made again
        image.write_bytes(b"an image disk" + bytes(4096))
        box = await boot(first_start(env, "two"), backend)
        assert not box.root_ready
        body = prepare_bodies(box)[0]
        assert (body["image"], body["upper"], body["hostname"]) == (
            "husk-image",
            "husk-upper",
            "two",
        )
        assert "identity_only" not in body
        await box.discard()
        # The remade image gets a snapshot of its own; the old one is gone.
        await rootready_boot.wait_for_builds()
        assert snapshot not in stored() and len(stored()) == 1
        # Removing the image (its disk) drops its snapshot with it.
        image.unlink()
        assert rootready.prune() and stored() == []

    run(scenario())


def test_snapshots_are_bounded_least_recently_used_first(
    env: Path,  # noqa: F811
    backend: FakeBackend,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rootready, "MAX_SNAPSHOTS", 2)

    async def scenario() -> None:
        for index in range(3):
            image = env / "disks" / f"image{index}.erofs"
            image.parent.mkdir(exist_ok=True)
            image.write_bytes(b"image %d" % index + bytes(4096))
            box = await boot(first_start(env, f"c{index}", image=image), backend)
            await box.discard()
            await rootready_boot.wait_for_builds()
        assert len(stored()) == 2

    run(scenario())


def test_a_failing_snapshot_falls_back_with_the_pristine_disk_and_a_corrupt_one_goes(
    env: Path,  # noqa: F811
    backend: FakeBackend,  # noqa: F811
) -> None:
    async def scenario() -> None:
        await (await start_and_build(env, backend, "one")).discard()
        (snapshot,) = stored()
        config = first_start(env, "two")
        assert config.upper_disk is not None
        pristine = config.upper_disk.read_bytes()
        inode = config.upper_disk.stat().st_ino
        backend.fail_restores = 1  # the snapshot's restore fails; the shape template's works
        box = await boot(config, backend)
        assert (box.boot_path, box.root_ready) == ("template", False)
        assert prepare_bodies(box)[0]["hostname"] == "two"
        # The container's own pristine disk is back, untouched, and nothing else is left.
        assert config.upper_disk.stat().st_ino == inode
        assert config.upper_disk.read_bytes() == pristine
        assert [p.name for p in config.upper_disk.parent.iterdir() if p.name.startswith(".")] == []
        assert (snapshot / templates.FAILURES).read_text() == "1"
        await box.discard()

        # A snapshot whose state file changed on disk is discarded; the start goes on.
        os.chmod(snapshot / templates.SNAPSHOT, 0o600)
        with (snapshot / templates.SNAPSHOT).open("r+b") as stream:
            stream.seek(-1, os.SEEK_END)
            stream.write(b"!")  # same size: only its recorded digest tells
        box = await boot(first_start(env, "three"), backend)
        assert not box.root_ready and box.boot_path == "template"
        assert not snapshot.exists()
        await box.discard()

    run(scenario())


def test_a_failed_build_is_not_retried_and_never_fails_a_start(
    env: Path,  # noqa: F811
    backend: FakeBackend,  # noqa: F811
) -> None:
    async def scenario() -> None:
        await (await boot(first_start(env, "zero"), backend)).discard()  # the shape template
        await rootready_boot.wait_for_builds()
        for entry in stored():
            templates._move_aside(entry)
        backend.fail_boots = 1  # the snapshot's own VM does not come up
        box = await boot(first_start(env, "one"), backend)
        assert box.boot_path == "template"
        await rootready_boot.wait_for_builds()
        assert stored() == []
        assert not [p for p in rootready.snapshots_dir().iterdir()]  # no half-built leftovers
        booted = len(machines(backend))
        await (await boot(first_start(env, "two"), backend)).discard()
        await rootready_boot.wait_for_builds()
        assert len(machines(backend)) == booted + 1  # the start's clone, no second build
        await box.discard()

    run(scenario())
