"""Boot templates against real VMs: save, restore, per-clone identity, fallbacks, warm.

Every VM test here runs in its own template store (HUSK_DATA_DIR of the module)
so the first start of each scenario really has to boot cold and save.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import mmap
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from husk.agent.client import ProcessSpec
from husk.errors import GuestError, InvalidArgument
from husk.oci.rootfs import make_ext4_disk
from husk.sandbox import templates
from husk.sandbox.sandbox import Sandbox, SandboxConfig
from husk.sandbox.templates import TemplateInputs
from husk.vm.machine import ShareConfig, random_mac

MIB = 1024 * 1024
MEMORY = 256 * MIB
UPPER_BYTES = 1024 * MIB
DEADLINE = 120.0
IDENTITY_SCRIPT = (
    "cat /sys/class/net/eth0/address; hostname;"
    " head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
    " cat /proc/sys/kernel/random/boot_id; date +%s"
)


# -- switches and keys (no VM) ------------------------------------------------------------


def _inputs(**changes: Any) -> TemplateInputs:
    base: dict[str, Any] = {
        "bundle_digest": "sha256:aa",
        "qemu_version": "7.2.22",
        "accel": "tcg",
        "cpu_model": "qemu64",
        "cpus": 1,
        "memory_mib": 512,
        "tsc_khz": 2_000_000,
        "cmdline_extra": (),
        "disks": (("husk-image", True, "writeback", 4 << 30),),
        "shares": (),
        "net": True,
        "lan_slots": 4,
    }
    base.update(changes)
    return TemplateInputs(**base)


def test_every_input_changes_the_key() -> None:
    key = _inputs().key
    variants = [
        _inputs(bundle_digest="sha256:bb"),
        _inputs(qemu_version="8.0"),
        _inputs(accel="kvm"),
        _inputs(cpu_model="max"),
        _inputs(cpus=2),
        _inputs(memory_mib=256),
        _inputs(tsc_khz=None),
        _inputs(cmdline_extra=("quiet",)),
        _inputs(disks=(("husk-image", True, "writeback", 8 << 30),)),
        _inputs(disks=(("husk-image", False, "writeback", 4 << 30),)),
        _inputs(shares=("bind0",)),
        _inputs(net=False),
    ]
    keys = {variant.key for variant in variants}
    assert key not in keys
    assert len(keys) == len(variants)
    assert _inputs().key == key  # stable


def test_image_disk_size_classes() -> None:
    gib = 1 << 30
    assert templates.image_disk_size(1) == 4 * gib
    assert templates.image_disk_size(4 * gib) == 4 * gib
    assert templates.image_disk_size(4 * gib + 1) == 8 * gib
    assert templates.image_disk_size(9 * gib) == 16 * gib


def test_switches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("HUSK_NO_TEMPLATE", raising=False)
    assert templates.templates_enabled()
    monkeypatch.setenv("HUSK_NO_TEMPLATE", "1")
    assert not templates.templates_enabled()
    monkeypatch.delenv("HUSK_NO_TEMPLATE")
    settings = tmp_path / "config.json"
    settings.write_text('{"templates": false, "other": 1}')
    assert not templates.templates_enabled()
    settings.write_text('{"templates": true}')
    assert templates.templates_enabled()
    settings.write_text('{"templates": "no"}')
    with pytest.raises(InvalidArgument, match="true or false"):
        templates.templates_enabled()
    settings.write_text("{not json")
    with pytest.raises(InvalidArgument, match=r"config\.json"):
        templates.templates_enabled()


def stage(inputs: TemplateInputs, state: bytes, memory: bytes = b"guest RAM") -> Path:
    """A build directory holding what a saved VM leaves: device state and a sparse RAM file."""
    staging = templates.new_build_dir(inputs.key)
    (staging / templates.SNAPSHOT).write_bytes(state)
    with (staging / templates.MEMORY).open("wb") as stream:
        stream.truncate(8 * MIB)
        stream.seek(3 * MIB + 5)
        stream.write(memory)
    return staging


def test_memory_digest_reads_data_only_and_ignores_layout(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.ram"
    with sparse.open("wb") as stream:
        stream.truncate(64 * MIB)
        stream.seek(10 * MIB)
        stream.write(b"data")
    dense = tmp_path / "dense.ram"
    content = bytearray(64 * MIB)
    content[10 * MIB : 10 * MIB + 4] = b"data"
    dense.write_bytes(bytes(content))
    digests = []
    for path in (sparse, dense):
        fd = os.open(path, os.O_RDONLY)
        try:
            digests.append(templates.memory_digest(fd))
        finally:
            os.close(fd)
    assert digests[0] == digests[1]
    assert digests[0][0] == 64 * MIB
    with sparse.open("r+b") as stream:
        stream.seek(10 * MIB + 2)
        stream.write(b"X")
    fd = os.open(sparse, os.O_RDONLY)
    try:
        assert templates.memory_digest(fd) != digests[0]
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return templates.sha256_of_fd(fd)[1]
    finally:
        os.close(fd)


def test_store_swaps_and_discards_only_what_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path))
    inputs = _inputs()
    assert templates.open_template(inputs)[0] is None

    def build(content: bytes) -> None:
        staging = stage(inputs, content)
        with templates.template_lock(inputs.key) as locked:
            assert locked
            templates.publish(staging, inputs, console=b"boot log", seconds=0.1)

    build(b"first state")
    first = templates.open_template(inputs)[0]
    assert first is not None
    first.verify()
    assert [templates.record_failure(first) for _ in range(2)] == [1, 2]
    templates.mark_used(first)  # a success resets the count of failures in a row
    assert templates.record_failure(first) == 1
    assert first.console == b"boot log"
    assert os.read(first.snapshot_fd, 100) == b"first state"
    build(b"second state")  # replaced while `first` is open: `first` still reads its own
    assert os.pread(first.snapshot_fd, 100, 0) == b"first state"
    assert not templates.discard(first, "test")  # it is no longer the stored one
    first.close()
    second = templates.open_template(inputs)[0]
    assert second is not None
    second.verify()  # published by this process: trusted without reading it again
    memory = second.directory / templates.MEMORY
    os.chmod(memory, 0o600)
    with open(memory, "r+b") as stream:
        stream.seek(3 * MIB + 6)
        stream.write(b"X")
    with pytest.raises(templates.TemplateCorrupt, match="memory does not match"):
        second.verify()
    assert templates.discard(second, "test")
    second.close()
    assert templates.open_template(inputs) == (None, f"no template {inputs.key} yet")
    build(b"third state")
    third = templates.open_template(inputs)[0]
    assert third is not None
    os.chmod(third.directory / templates.SNAPSHOT, 0o600)
    with open(third.directory / templates.SNAPSHOT, "r+b") as stream:
        stream.write(b"X")
    with pytest.raises(templates.TemplateCorrupt, match="snapshot does not match"):
        third.verify()
    third.close()
    (third.directory / templates.MEMORY).unlink()
    template, reason = templates.open_template(inputs)
    assert template is None and "no memory file" in reason
    other = _inputs(memory_mib=1024)
    templates.publish(stage(other, b"state"), other, console=b"", seconds=0.1)
    meta = templates.template_dir(other.key) / templates.METADATA
    doctored = json.loads(meta.read_text())
    doctored["inputs"]["bundle_digest"] = "sha256:other"
    meta.write_text(json.dumps(doctored))
    template, reason = templates.open_template(other)
    assert template is None and "other inputs" in reason
    removed = templates.prune(other)
    assert templates.template_dir(other.key) in removed
    assert not any(p.name == other.key for p in templates.templates_dir().iterdir())


# -- real VMs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, guest_bundle: object, busybox_disk: Path
) -> Iterator[Path]:
    """A template store of this module's own (a fresh data directory)."""
    saved = os.environ.get("HUSK_DATA_DIR")
    data = tmp_path_factory.mktemp("templates-data")
    os.environ["HUSK_DATA_DIR"] = str(data)
    os.environ.pop("HUSK_NO_TEMPLATE", None)
    yield data
    if saved is not None:
        os.environ["HUSK_DATA_DIR"] = saved


@pytest.fixture
def image(store: Path, busybox_disk: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "image.erofs"
    # The session's disk may already be padded to its 4 GiB template size (a sparse
    # file): copy it sparse, or every test writes gigabytes of zeros.
    subprocess.run(["cp", "--sparse=always", str(busybox_disk), str(copy)], check=True)
    return copy


def upper_disk(directory: Path, name: str) -> Path:
    path = directory / f"{name}.ext4"
    make_ext4_disk(path, UPPER_BYTES)
    return path


def box_config(image: Path, upper: Path | None, name: str, **changes: Any) -> SandboxConfig:
    state = Path(os.environ["HUSK_RUN_DIR"]) / "vms" / f"t-{name}-{os.urandom(3).hex()}"
    config = SandboxConfig(
        state_dir=state,
        image_disk=image,
        upper_disk=upper,
        hostname=name,
        mac=random_mac(),
        memory_bytes=MEMORY,
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@asynccontextmanager
async def started(config: SandboxConfig) -> AsyncIterator[Sandbox]:
    box = await Sandbox.boot(config)
    try:
        yield box
    finally:
        await box.client.close()
        await box.machine.kill()


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), DEADLINE))


async def collect(box: Sandbox, argv: list[str], **kwargs: Any) -> tuple[int, bytes, bytes]:
    process = await box.client.run(ProcessSpec(argv=argv, **kwargs))
    return await process.collect()


def stored_keys() -> set[str]:
    base = templates.templates_dir()
    if not base.is_dir():
        return set()
    return {p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")}


async def ensure_template(image: Path, directory: Path) -> str:
    """Starts (and stops) one container so that the template for this layout exists."""
    async with started(box_config(image, upper_disk(directory, "seed"), "seed")) as box:
        assert box.template_key is not None, box.cold_reason
        return box.template_key


@pytest.mark.vm
def test_first_start_saves_and_clones_get_their_own_identity(image: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with started(box_config(image, upper_disk(tmp_path, "first"), "first")) as first:
            # The first start builds the template with a VM of its own, then restores it.
            assert first.boot_path == "template", first.cold_reason
            assert first.built_template
            assert "no template" in first.cold_reason
            key = first.template_key
            assert key is not None and key in stored_keys()
            directory = templates.template_dir(key)
            assert (directory / templates.SNAPSHOT).stat().st_size < 1_000_000  # no RAM in it
            memory = (directory / templates.MEMORY).stat()
            assert memory.st_size == MEMORY
            assert 0 < memory.st_blocks * 512 < MEMORY  # sparse: only what the guest used
            code, out, _ = await collect(first, ["sh", "-c", IDENTITY_SCRIPT])
            assert code == 0
            first_random = out.split(b"\n")[2]
        configs = [
            box_config(image, upper_disk(tmp_path, name), name) for name in ("clone-a", "clone-b")
        ]
        boxes = await asyncio.gather(*(Sandbox.boot(c) for c in configs))
        try:
            reports = []
            for box, config in zip(boxes, configs, strict=True):
                assert box.boot_path == "template", box.cold_reason
                assert not box.built_template
                assert box.template_key == key
                # The restore's HELLO carried the identity; the agent set it before READY.
                assert box.client.identity is not None
                assert box.client.identity["mac"] == config.mac
                # QEMU had the restored guest announce nothing (no GARP rounds to run).
                parameters = await box.machine._execute("query-migrate-parameters", timeout=10)
                assert parameters["announce-rounds"] == 0
                code, out, err = await collect(box, ["sh", "-c", IDENTITY_SCRIPT])
                host_now = time.time()
                assert code == 0, err
                mac, hostname, random_hex, boot_id, clock = out.decode().split("\n")[:5]
                assert mac == config.mac
                assert hostname == config.hostname
                assert len(random_hex) == 64
                assert abs(int(clock) - host_now) <= 2
                reports.append((mac, random_hex, boot_id))
            (mac_a, random_a, boot_a), (mac_b, random_b, boot_b) = reports
            assert mac_a != mac_b
            assert random_a != random_b
            assert first_random.decode() not in (random_a, random_b)
            # boot_id is drawn on first read, after the reseed: clones differ here too
            assert boot_a != boot_b
            console = boxes[0].machine.console_log.read_text(errors="replace")
            assert "husk-agent: ready" in console
            assert f"restored from template {key}" in console
            # Clones never write the template's memory: their pages are copied on write.
            assert (
                file_sha256(directory / templates.SNAPSHOT)
                == json.loads((directory / templates.METADATA).read_text())["snapshot_sha256"]
            )
            fd = os.open(directory / templates.MEMORY, os.O_RDONLY)
            try:
                _, digest = templates.memory_digest(fd)
            finally:
                os.close(fd)
            assert (
                digest == json.loads((directory / templates.METADATA).read_text())["memory_sha256"]
            )
        finally:
            for box in boxes:
                await box.client.close()
                await box.machine.kill()

    run(body)


def ram_descriptor(pid: int) -> Path:
    """The descriptor QEMU holds for its guest RAM backend."""
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(entry)
            if target.startswith("/memfd:husk-") or target.endswith(templates.MEMORY):
                return entry
    held = [os.readlink(entry) for entry in Path(f"/proc/{pid}/fd").iterdir()]
    raise AssertionError(f"QEMU {pid} holds no descriptor of the template's RAM: {held}")


@pytest.mark.vm
def test_a_clone_cannot_write_the_template_ram(image: Path, tmp_path: Path) -> None:
    """What a clone's QEMU maps its RAM from refuses writes, whoever holds it."""

    async def body() -> None:
        key = await ensure_template(image, tmp_path)
        async with started(box_config(image, upper_disk(tmp_path, "ram"), "ram")) as box:
            assert box.template_key == key, box.cold_reason
            held = ram_descriptor(box.machine.pid)
            # Even root, opening QEMU's own descriptor read-write, cannot write through it.
            fd = os.open(held, os.O_RDWR)
            try:
                data = os.pread(fd, 4096, 0)
                with pytest.raises(PermissionError):
                    os.pwrite(fd, data, 0)  # the same bytes: harmless if it ever succeeded
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                for seal in (fcntl.F_SEAL_WRITE, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SHRINK):
                    assert seals & seal
                with pytest.raises(PermissionError):
                    mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            # The clone writes most of its RAM; the template's RAM stays as recorded.
            code, _, err = await collect(
                box, ["sh", "-c", "head -c 150m /dev/urandom > /dev/shm/fill; rm /dev/shm/fill"]
            )
            assert code == 0, err
        directory = templates.template_dir(key)
        fd = os.open(directory / templates.MEMORY, os.O_RDONLY)
        try:
            _, digest = templates.memory_digest(fd)
        finally:
            os.close(fd)
        assert digest == json.loads((directory / templates.METADATA).read_text())["memory_sha256"]

    run(body)


@pytest.mark.vm
def test_core_behaviour_on_the_restored_path(image: Path, tmp_path: Path) -> None:
    async def body() -> None:
        await ensure_template(image, tmp_path)

        async def restored(name: str) -> Sandbox:
            box = await Sandbox.boot(box_config(image, upper_disk(tmp_path, name), name))
            assert box.boot_path == "template", box.cold_reason
            return box

        box = await restored("echo")
        try:
            with pytest.raises(GuestError, match="multicast"):
                await box.client.set_interface(mac="01:00:5e:00:00:01")
            with pytest.raises(GuestError, match="invalid MAC"):
                await box.client.set_interface(mac="not-a-mac")
            assert await collect(box, ["echo", "hello"]) == (0, b"hello\n", b"")
        finally:
            await box.machine.kill()
        box = await restored("exit")
        try:
            assert await collect(box, ["sh", "-c", "echo oops >&2; exit 7"]) == (7, b"", b"oops\n")
        finally:
            await box.machine.kill()
        box = await restored("stdin")
        try:
            process = await box.client.run(ProcessSpec(argv=["cat"], stdin=True))
            payload = os.urandom(100_000)
            await process.write_stdin(payload)
            await process.close_stdin()
            assert await process.collect() == (0, payload, b"")
        finally:
            await box.machine.kill()
        box = await restored("exec")
        try:
            workload = await box.client.run(ProcessSpec(argv=["sleep", "300"]))
            hi = await box.client.exec(ProcessSpec(argv=["echo", "hi"]))
            assert await hi.collect() == (0, b"hi\n", b"")
            write = await box.client.exec(
                ProcessSpec(argv=["sh", "-c", "echo kept > /data.txt; cat /data.txt"])
            )
            assert await write.collect() == (0, b"kept\n", b"")
            term = await box.client.exec(ProcessSpec(argv=["sleep", "300"]))
            await asyncio.sleep(0.2)
            await term.signal(signal.SIGTERM)
            assert await term.wait() == 143
            await workload.signal(signal.SIGKILL)
            assert await workload.wait() == 137
        finally:
            await box.machine.kill()

    run(body)


@pytest.mark.vm
def test_doctored_metadata_is_not_trusted(image: Path, tmp_path: Path) -> None:
    async def body() -> None:
        key = await ensure_template(image, tmp_path)
        meta = templates.template_dir(key) / templates.METADATA
        doctored = json.loads(meta.read_text())
        doctored["inputs"]["bundle_digest"] = "sha256:" + "0" * 64
        meta.write_text(json.dumps(doctored))
        async with started(box_config(image, upper_disk(tmp_path, "b"), "b")) as box:
            assert (box.boot_path, box.built_template) == ("template", True)
            assert "other inputs" in box.cold_reason
            assert box.template_key == key  # rebuilt in place
        assert (
            json.loads(meta.read_text())["inputs"]["bundle_digest"]
            != doctored["inputs"]["bundle_digest"]
        )

    run(body)


@pytest.mark.vm
@pytest.mark.parametrize("damage", ["flipped-bytes", "garbage-stream", "memory"])
def test_corrupted_template_means_cold_boot_and_rebuild(
    image: Path, tmp_path: Path, damage: str
) -> None:
    async def body() -> None:
        key = await ensure_template(image, tmp_path)
        directory = templates.template_dir(key)
        snapshot = directory / templates.SNAPSHOT
        memory = directory / templates.MEMORY
        created = json.loads((directory / templates.METADATA).read_text())["created"]
        target = memory if damage == "memory" else snapshot
        os.chmod(target, 0o600)
        with target.open("r+b") as stream:
            if damage == "garbage-stream":
                stream.write(b"this is not a QEMU migration stream" * 100)
            else:
                # into data the guest really has (the memory file is mostly holes)
                start = 0 if damage == "memory" else target.stat().st_size // 2
                offset = os.lseek(stream.fileno(), start, os.SEEK_DATA)
                stream.seek(offset)
                stream.write(os.urandom(4096))
        if damage == "garbage-stream":
            # The recorded hash matches the garbage: QEMU itself must reject it.
            meta = directory / templates.METADATA
            doctored = json.loads(meta.read_text())
            doctored["snapshot_sha256"] = file_sha256(snapshot)
            meta.write_text(json.dumps(doctored))
        async with started(box_config(image, upper_disk(tmp_path, "c"), "c")) as box:
            # The bad template is discarded; a VM boots cold to save a new one, and
            # this start restores from that.
            assert "restoring template" in box.cold_reason
            if damage != "garbage-stream":
                assert "sha256" in box.cold_reason
            assert (box.boot_path, box.built_template) == ("template", True), box.cold_reason
            assert box.template_key == key
            assert await collect(box, ["echo", "fine"]) == (0, b"fine\n", b"")
        metadata = json.loads((directory / templates.METADATA).read_text())
        assert metadata["snapshot_sha256"] == file_sha256(snapshot)
        assert metadata["created"] > created  # a new template, not the damaged one
        async with started(box_config(image, upper_disk(tmp_path, "d"), "d")) as box:
            assert (box.boot_path, box.built_template) == ("template", False), box.cold_reason

    run(body)


@pytest.mark.vm
def test_switches_force_cold_boots(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        await ensure_template(image, tmp_path)
        config = box_config(image, upper_disk(tmp_path, "e"), "e", use_template=False)
        async with started(config) as box:
            assert (box.boot_path, box.template_key) == ("cold", None)
            assert await collect(box, ["echo", "cold"]) == (0, b"cold\n", b"")
        monkeypatch.setenv("HUSK_NO_TEMPLATE", "1")
        async with started(box_config(image, upper_disk(tmp_path, "f"), "f")) as box:
            assert (box.boot_path, box.template_key) == ("cold", None)

    try:
        run(body)
    finally:
        monkeypatch.undo()


@pytest.mark.vm
def test_racing_first_starts_build_one_template(image: Path, tmp_path: Path) -> None:
    async def body() -> None:
        # A layout no other test uses (no writable disk), so no template exists yet.
        configs = [box_config(image, None, f"race{i}") for i in range(3)]
        boxes = await asyncio.gather(*(Sandbox.boot(c) for c in configs))
        try:
            # One builds the template; the others wait for it; all three restore it.
            assert [box.boot_path for box in boxes] == ["template"] * 3
            assert sorted(box.built_template for box in boxes) == [False, False, True]
            keys = {box.template_key for box in boxes}
            assert len(keys) == 1 and None not in keys
            assert len([k for k in stored_keys() if k in keys]) == 1
            for box in boxes:
                assert await collect(box, ["echo", "x"]) == (0, b"x\n", b"")
        finally:
            for box in boxes:
                await box.machine.kill()

    run(body)


@pytest.mark.vm
def test_bind_mounts_have_templates_of_their_own(image: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "note.txt").write_text("from the host\n")

    async def body() -> None:
        keys = []
        for name in ("bind-first", "bind-second"):
            share = ShareConfig(tag="bind0", path=shared, readonly=True)
            config = box_config(image, upper_disk(tmp_path, name), name, shares=[share])
            async with started(config) as box:
                keys.append(box.template_key)
                await box.client.mount(fstype="9p", source="bind0", target="/mnt", readonly=True)
                assert await collect(box, ["cat", "/mnt/note.txt"]) == (0, b"from the host\n", b"")
                if name == "bind-second":
                    assert box.boot_path == "template", box.cold_reason
        assert keys[0] == keys[1] is not None

    run(body)


@pytest.mark.vm
def test_system_warm_builds_ahead_of_time(
    image: Path, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon_fixtures import short_root, start_daemon
    from husk.cli.main import cli

    # The daemon builds the template (the CLI boots no VM), into this module's store.
    root = short_root("husk-warm-")
    daemon = start_daemon(root, data_dir=store)
    try:
        monkeypatch.setenv("HUSK_RUN_DIR", str(daemon.run_dir))
        runner = CliRunner()
        args = ["system", "warm", "--memory", "320m", "--json"]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, f"{result.output}\n{daemon.log()[-2000:]}"
        report = json.loads(result.output)
        again = json.loads(runner.invoke(cli, args).output)
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
        monkeypatch.undo()
    assert report["built"] is True
    assert report["inputs"]["memory_mib"] == 320
    assert 0 < report["snapshot_bytes"] < 1_000_000  # device state only
    assert 0 < report["memory_bytes"] < 320 * MIB  # the guest RAM in use, sparse
    assert (again["built"], again["key"]) == (False, report["key"])

    async def body() -> None:
        # The runtime's own layout: 8 GiB writable disk, as `warm` assumes.
        from husk.runtime.runtime import UPPER_DISK_BYTES

        upper = tmp_path / "warm.ext4"
        make_ext4_disk(upper, UPPER_DISK_BYTES)
        config = box_config(image, upper, "warm", memory_bytes=320 * MIB)
        async with started(config) as box:
            assert box.boot_path == "template", box.cold_reason
            assert box.template_key == report["key"]

    run(body)


@pytest.mark.vm
def test_template_of_another_bundle_is_not_used(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        old_key = await ensure_template(image, tmp_path)
        # Last in this module: it prunes the templates of the usual bundle.
        # The same initramfs plus zero padding (which the kernel skips): another digest.
        other_initrd = tmp_path / "initramfs.cpio"
        shutil.copyfile(os.environ["HUSK_INITRD"], other_initrd)
        with other_initrd.open("ab") as stream:
            stream.write(bytes(4096))
        monkeypatch.setenv("HUSK_INITRD", str(other_initrd))
        async with started(box_config(image, upper_disk(tmp_path, "other"), "other")) as box:
            assert (box.boot_path, box.built_template) == ("template", True)
            assert box.template_key not in (None, old_key)
            assert "no template" in box.cold_reason
            assert await collect(box, ["echo", "ok"]) == (0, b"ok\n", b"")
        # the old bundle's template can never be used again: it was pruned
        assert old_key not in stored_keys()

    try:
        run(body)
    finally:
        monkeypatch.undo()


def test_prune_keeps_the_most_recently_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path))
    made = [_inputs(memory_mib=m) for m in (256, 512, 1024, 2048)]
    for index, inputs in enumerate(made):
        templates.publish(stage(inputs, b"state"), inputs, console=b"", seconds=0.1)
        last_used = time.time() - 1000 + 100 * index  # made[0] least recently used
        os.utime(templates.template_dir(inputs.key), (last_used, last_used))
    # made[0] is the one in use right now: it stays although it is the oldest
    removed = templates.prune(made[0], keep=3)
    assert {p.name for p in removed} == {made[1].key}
    assert stored_keys() == {made[0].key, made[2].key, made[3].key}


def test_restore_from_a_missing_snapshot_is_a_clear_error(tmp_path: Path) -> None:
    from husk.vm.machine import MachineConfig
    from husk.vm.qemu import QemuMachine

    machine = QemuMachine(MachineConfig(Path("k"), Path("i"), tmp_path / "vm"))
    with pytest.raises(GuestError, match="cannot open snapshot"):
        asyncio.run(machine.restore(tmp_path / "missing.state"))
