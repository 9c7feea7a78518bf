"""The warm pool against real VMs: containers take restored idle VMs over, and it stays bounded."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from daemon_fixtures import RunningDaemon, husk_daemon  # noqa: F401 - fixture
from husk.errors import InvalidArgument
from husk.runtime.runtime import Runtime
from husk.sandbox import pool
from husk.sandbox.pool import PoolShape
from husk.spec import ContainerSpec, NetworkRequest, parse_size
from test_cli import IMAGE, Cli
from test_runtime import busybox_image, logs_text, with_runtime  # noqa: F401 - fixture

pytestmark = pytest.mark.vm

MEMORY = parse_size("256m")
SHAPE = PoolShape(memory_bytes=MEMORY, cpus=1.0)
MOUNT_POINTS = "cut -d' ' -f5 /proc/self/mountinfo | sort | tr '\\n' ' '; echo"
# Each interface's name, flags, MTU, qdisc and state (not its MAC: the container's own)
LINKS = "ip -o link | awk '{print $2, $3, $5, $7, $9}' | tr '\\n' ' '; echo"
IDENTITY = (
    "hostname; cat /sys/class/net/eth0/address; cat /proc/sys/kernel/random/boot_id;"
    " date +%s; cat /kept.txt 2>/dev/null || echo none; echo kept > /kept.txt;"
    " wc -c < /bin/true; cat /etc/hostname; " + MOUNT_POINTS + "; " + LINKS
)


async def until_idle(runtime: Runtime, count: int, timeout: float = 90.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        report = runtime.pool_report()
        if report["idle"] == count:
            return report
        assert time.monotonic() < deadline, f"the pool never held {count} idle VMs: {report}"
        await asyncio.sleep(0.1)


async def echo_path(runtime: Runtime, image: str, text: str) -> str:
    """Runs `echo text` in a container of the pool's shape; how its VM started."""
    record = await runtime.create(ContainerSpec(image=image, memory=MEMORY, cmd=["echo", text]))
    await runtime.start(record.id)
    path = runtime.live[record.id].sandbox.boot_path
    assert await runtime.wait(record.id) == 0
    assert await logs_text(runtime, record.id) == text + "\n"
    return path


def test_pool_settings_are_bounded_and_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path))
    with pytest.raises(InvalidArgument, match="0 to 16"):
        pool.validate(pool.MAX_POOL + 1, SHAPE)
    with pytest.raises(InvalidArgument, match="half the host's memory"):
        pool.validate(16, PoolShape(memory_bytes=1 << 50))
    assert pool.read_settings() == (0, PoolShape())
    (tmp_path / "config.json").write_text('{"templates": true}')
    pool.write_settings(3, SHAPE)
    assert pool.read_settings() == (3, SHAPE)
    assert json.loads((tmp_path / "config.json").read_text())["templates"] is True
    pool.write_settings(0, SHAPE)
    assert pool.read_settings() == (0, PoolShape())
    (tmp_path / "config.json").write_text('{"warm_pool": {"size": "many"}}')
    with pytest.raises(InvalidArgument, match="warm pool settings"):
        pool.read_settings()


def test_containers_take_pooled_vms_over(busybox_image: str) -> None:  # noqa: F811
    async def body(runtime: Runtime) -> None:
        await runtime.configure_pool(2, SHAPE, persist=False)
        report = await until_idle(runtime, 2)
        assert int(str(report["rss_bytes"])) > 0
        # each VM rehearsed a start (PREPARE and RUN on placeholder file systems) and
        # undid it before it was offered: what follows checks nothing of it shows
        assert report["rehearsed"] is True
        assert float(str(report["rehearsal_cpu_seconds"])) > 0
        seen = []
        mounts = []
        for name in ("pooled-a", "pooled-b"):
            record = await runtime.create(
                ContainerSpec(image=busybox_image, name=name, memory=MEMORY, cmd=["sleep", "300"])
            )
            pool_pids = {vm.machine.pid for vm in runtime.pool._idle}  # type: ignore[union-attr]
            await runtime.start(record.id)
            sandbox = runtime.live[record.id].sandbox
            assert sandbox.boot_path == "pool"
            assert sandbox.machine.pid in pool_pids
            # the VM now lives in the container's own state directory
            assert sandbox.machine.state_dir == runtime.vm_dir(record.id)
            host_before = time.time()
            code, output, _ = await runtime.exec_simple(record.id, ["sh", "-c", IDENTITY])
            host_now = time.time()
            assert code == 0
            lines = output.decode().split("\n")
            hostname, mac, boot_id, clock, kept, true_size, hostname_file = lines[:7]
            mounts.append(lines[7] + "\n" + lines[8])
            assert hostname == hostname_file == record.id[:12]
            assert int(true_size) > 4096  # the image's /bin/true, not the rehearsal's
            assert mac == runtime.get(record.id).mac_address
            assert host_before - 2 <= int(clock) <= host_now + 1  # read during the exec
            assert kept == "none"
            seen.append((mac, boot_id))
            # writes land on the container's own disk: they outlive this VM
            await runtime.stop(record.id, timeout=1)
            record = runtime.get(record.id)
            assert record.spec.cmd == ["sleep", "300"]
            await runtime.start(record.id)
            assert await runtime.exec_simple(record.id, ["cat", "/kept.txt"]) == (0, b"kept\n", b"")
            await runtime.remove(record.id, force=True)
        assert seen[0][0] != seen[1][0] and seen[0][1] != seen[1][1]

        # refilled in the background, up to the size asked for
        await until_idle(runtime, 2)
        assert runtime.pool_report()["taken"] >= 2

        # another shape restores from its template as usual; its container has the
        # same mounts and interfaces as the pooled ones had: the rehearsals (PREPARE,
        # NETWORK on LAN slot 1, RUN) left nothing behind
        other = await runtime.create(
            ContainerSpec(
                image=busybox_image,
                memory=parse_size("320m"),
                cmd=["sh", "-c", MOUNT_POINTS + "; " + LINKS],
            )
        )
        await runtime.start(other.id)
        assert runtime.live[other.id].sandbox.boot_path in ("template", "cold")
        assert await runtime.wait(other.id) == 0
        assert mounts[0] == mounts[1] == (await logs_text(runtime, other.id)).rstrip("\n")
        assert " /dev/shm " in mounts[0] and mounts[0].startswith("/ ")
        assert "eth1: <BROADCAST,MULTICAST,UP,LOWER_UP>" in mounts[0]  # the default bridge

        # an idle VM that died is skipped: the start takes the ordinary path
        for vm in list(runtime.pool._idle):  # type: ignore[union-attr]
            await vm.machine.kill()
        assert await echo_path(runtime, busybox_image, "fallback") == "template"

        # a pool of 0 ends the idle VMs
        await until_idle(runtime, 2)
        idle_pids = [vm.machine.pid for vm in runtime.pool._idle]  # type: ignore[union-attr]
        await runtime.configure_pool(0, SHAPE, persist=False)
        assert runtime.pool_report()["size"] == 0
        for pid in idle_pids:
            assert not os.path.exists(f"/proc/{pid}/stat") or _zombie(pid)

        # a daemon that died with a pool leaves its VMs behind: the next one ends them
        await runtime.configure_pool(1, SHAPE, persist=False)
        await until_idle(runtime, 1)
        orphan = runtime.pool._idle[0].machine  # type: ignore[union-attr]
        runtime.pool = None  # forgotten without closing, as by a crash
        try:
            assert any(
                p.name.startswith(pool.POOL_PREFIX) for p in orphan.state_dir.parent.iterdir()
            )
            pool.remove_leftovers()
            assert await orphan.wait(5.0) is not None
            assert not any(
                p.name.startswith(pool.POOL_PREFIX) for p in orphan.state_dir.parent.iterdir()
            )
        finally:
            await orphan.kill()

    with_runtime(body)


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stream:
        return stream.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_system_warm_pool_through_the_daemon(husk_daemon: RunningDaemon) -> None:  # noqa: F811
    from husk.oci.store import ImageStore
    from testimages import install_busybox_image

    install_busybox_image(ImageStore(husk_daemon.data_dir / "images"))
    cli = Cli(husk_daemon)
    try:
        report = json.loads(cli.ok("system", "warm", "-m", "256m", "--pool", "1", "--json"))
        assert (report["pool"]["size"], report["pool"]["idle"]) == (1, 1)
        assert report["pool"]["rss_bytes"] > 0
        settings = json.loads((husk_daemon.data_dir / "config.json").read_text())
        assert settings["warm_pool"]["size"] == 1  # the daemon keeps it after a restart
        assert cli.ok("run", "--rm", "-m", "256m", IMAGE, "echo", "hi") == "hi\n"
        assert "warm pool: 1 of 1 VMs idle" in cli.ok("system", "warm", "-m", "256m", "--pool", "1")
        cli.fails("system", "warm", "--pool", "2", "--binds", "1", message="bind mounts")
        cli.fails("system", "warm", "--pool", "99", message="0 to 16")
    finally:
        off = json.loads(cli.ok("system", "warm", "-m", "256m", "--pool", "0", "--json"))
    assert off["pool"]["size"] == 0
    assert "warm_pool" not in json.loads((husk_daemon.data_dir / "config.json").read_text())


def test_a_remembered_pool_is_filled_at_startup(busybox_image: str) -> None:  # noqa: F811
    async def body(runtime: Runtime) -> None:
        pool.write_settings(1, SHAPE)
        try:
            await runtime.startup()
            assert runtime.pool is not None and runtime.pool.shape == SHAPE
            await until_idle(runtime, 1)
        finally:
            pool.write_settings(0, SHAPE)
        await runtime.shutdown()  # a daemon going away ends its idle VMs
        assert runtime.pool is None

    with_runtime(body)


def test_a_new_bundle_replaces_the_pools_vms(
    busybox_image: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from testimages import install_busybox_image

    # A data directory of its own: templates of the other bundle prune the usual ones.
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    install_busybox_image()

    async def body(runtime: Runtime) -> None:
        await runtime.configure_pool(1, SHAPE, persist=False)
        await until_idle(runtime, 1)
        old = runtime.pool._idle[0]  # type: ignore[union-attr]
        # The same initramfs plus zero padding (which the kernel skips): another digest.
        other_initrd = tmp_path / "initramfs.cpio"
        other_initrd.write_bytes(Path(os.environ["HUSK_INITRD"]).read_bytes() + bytes(4096))
        monkeypatch.setenv("HUSK_INITRD", str(other_initrd))
        assert await echo_path(runtime, busybox_image, "new bundle") == "template"
        assert await old.machine.wait(10.0) is not None  # the stale VM was ended
        await until_idle(runtime, 1)
        fresh = runtime.pool._idle[0]  # type: ignore[union-attr]
        assert fresh.template_key not in (None, old.template_key)

    try:
        with_runtime(body)
    finally:
        monkeypatch.undo()


def test_containers_on_user_and_internal_networks_stay_on_the_fast_paths(
    busybox_image: str,  # noqa: F811
) -> None:
    """A start on a user network restores a template (or takes a pooled VM) like any
    other; a pooled VM handed to a container of an internal network loses its way out."""

    async def start_on(runtime: Runtime, network: str, script: str) -> tuple[str, int, str]:
        spec = ContainerSpec(
            image=busybox_image,
            memory=MEMORY,
            cmd=["sh", "-c", script],
            network_mode=network,
            networks=[NetworkRequest(network)],
        )
        record = await runtime.create(spec)
        await runtime.start(record.id)
        path = runtime.live[record.id].sandbox.boot_path
        code = await runtime.wait(record.id)
        return path, code, await logs_text(runtime, record.id)

    async def body(runtime: Runtime) -> None:
        await runtime.networks.create("fastpath")
        await runtime.networks.create("fastpath-int", internal=True)
        address = "ip -o -4 addr show | grep -c 'inet 172\\.'"
        # the template exists after the first start of this shape
        await start_on(runtime, "fastpath", "true")
        path, code, out = await start_on(runtime, "fastpath", address)
        assert (path, code, out.strip()) == ("template", 0, "1")
        await runtime.configure_pool(1, SHAPE, persist=False)
        await until_idle(runtime, 1)
        # the pooled VM booted with a way out: the internal network's container has none
        egress = "ip -o -4 addr show eth0 | grep -c inet || true"
        path, code, out = await start_on(runtime, "fastpath-int", f"{address}; {egress}")
        assert (path, code, out.split()) == ("pool", 0, ["1", "0"])
        await runtime.configure_pool(0, SHAPE, persist=False)

    with_runtime(body)
