"""Rootless mode's logic, without VMs: tool lookup, where the guest bundle is found,
husk.local names, the low-port message and remembered template failures.

The real thing, as an unprivileged user with real VMs, is tests/test_rootless_vm.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from fake_machine import FakeBackend, FakeMachine
from husk.bundle.locate import load as load_bundle
from husk.bundle.locate import locate as locate_bundle
from husk.errors import BundleError, GuestError, NotFound
from husk.oci.pull import pull
from husk.oci.rootfs import make_ext4_disk
from husk.oci.store import ImageStore
from husk.runtime import ports
from husk.sandbox import template_failures
from husk.tools import SYSTEM_DIRS, find_tool
from test_provisioning import backend, boot, box_config, env, machines, run

__all__ = ["backend", "env"]  # fixtures used by name

# -- tools ---------------------------------------------------------------------------------


def test_sbin_tools_are_found_whatever_path_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")  # an ordinary user's PATH
    found = find_tool("mkfs.ext4")
    assert found is not None and Path(found).parent.as_posix() in SYSTEM_DIRS
    assert found.rsplit("/", 2)[-2] in ("sbin",)  # Debian installs it in /sbin or /usr/sbin


def test_path_comes_first_and_missing_tools_are_none(tmp_path: Path) -> None:
    own = tmp_path / "mkfs.ext4"
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    assert find_tool("mkfs.ext4", path=str(tmp_path)) == str(own)
    assert find_tool("husk-no-such-tool", path=str(tmp_path)) is None
    assert find_tool(str(own)) == str(own)
    assert find_tool(str(tmp_path / "absent")) is None


def test_a_writable_disk_is_made_with_a_users_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mkfs.ext4 lives in /sbin: an ordinary PATH used to mean 'not installed'."""
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")
    disk = tmp_path / "upper.img"
    make_ext4_disk(disk, 16 << 20)
    with disk.open("rb") as stream:
        stream.seek(1024 + 56)
        assert stream.read(2) == b"\x53\xef"  # the ext4 superblock's magic


# -- the guest bundle ----------------------------------------------------------------------


def _fake_bundle(directory: Path, kernel: bytes = b"kernel") -> Path:
    directory.mkdir(parents=True)
    artifacts: dict[str, Any] = {}
    for name, data in (("vmlinux", kernel), ("initramfs.cpio", b"initrd")):
        (directory / name).write_bytes(data)
        artifacts[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps({"artifacts": artifacts}))
    return directory


@pytest.fixture
def no_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("HUSK_KERNEL", "HUSK_INITRD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_the_system_bundle_is_used_until_the_user_has_one(
    no_overrides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = _fake_bundle(no_overrides / "system" / "bundle")
    monkeypatch.setenv("HUSK_SYSTEM_BUNDLE", str(system))
    assert locate_bundle().kernel == system / "vmlinux"
    own = _fake_bundle(no_overrides / "data" / "bundle", kernel=b"my own kernel")
    found = locate_bundle()
    assert found.kernel == own / "vmlinux"
    assert found.digest != load_bundle(system).digest


def test_a_missing_bundle_says_how_to_get_one(
    no_overrides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUSK_SYSTEM_BUNDLE", str(no_overrides / "nowhere"))
    with pytest.raises(BundleError) as caught:
        locate_bundle()
    message = str(caught.value)
    assert "husk bundle build" in message and "install.sh" in message
    assert str(no_overrides / "nowhere") in message and "not installed" in message


def test_a_system_bundle_others_can_write_is_not_booted(
    no_overrides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = _fake_bundle(no_overrides / "system" / "bundle")
    system.chmod(0o777)
    monkeypatch.setenv("HUSK_SYSTEM_BUNDLE", str(system))
    with pytest.raises(BundleError, match="others can write to it"):
        locate_bundle()
    system.chmod(0o755)
    assert locate_bundle().kernel == system / "vmlinux"


# -- husk.local names ----------------------------------------------------------------------


def test_a_husk_local_name_is_never_pulled(tmp_path: Path) -> None:
    def no_registry(domain: str) -> Any:
        raise AssertionError(f"a registry was contacted: {domain}")

    store = ImageStore(tmp_path / "images")
    for policy in ("missing", "always"):
        with pytest.raises(NotFound) as caught:
            asyncio.run(
                pull("husk.local/busybox", policy=policy, store=store, client_factory=no_registry)
            )
        assert "not in this user's image store" in str(caught.value)
        assert "never pulled" in str(caught.value)


def test_a_husk_local_image_installed_for_every_user_is_loaded_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from testimages import busybox_image_layout

    system = tmp_path / "system-images"
    layout = system / "husk.local" / "busybox" / "latest"
    busybox_image_layout(layout)
    monkeypatch.setenv("HUSK_SYSTEM_IMAGES", str(system))

    def no_registry(domain: str) -> Any:
        raise AssertionError(f"a registry was contacted: {domain}")

    store = ImageStore(tmp_path / "images")
    record = asyncio.run(pull("husk.local/busybox", store=store, client_factory=no_registry))
    assert "husk.local/busybox:latest" in record.names
    assert store.exists("husk.local/busybox:latest")
    with pytest.raises(NotFound, match="nor installed for every user"):
        asyncio.run(pull("husk.local/other", store=store, client_factory=no_registry))

    # One that another user could have replaced is not trusted.
    other = ImageStore(tmp_path / "other-images")
    layout.chmod(0o777)
    with pytest.raises(NotFound):
        asyncio.run(pull("husk.local/busybox", store=other, client_factory=no_registry))


# -- low ports -----------------------------------------------------------------------------


def test_the_low_port_message_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = tmp_path / "start"
    start.write_text("1024\n")
    monkeypatch.setattr(ports, "UNPRIVILEGED_PORT_START", str(start))
    hint = ports.privileged_port_hint()
    assert "ports below 1024 need root" in hint
    assert "ip_unprivileged_port_start" in hint


# -- remembered template failures ----------------------------------------------------------

PERMISSION_DENIED = "can't open backing store /proc/self/fd/9 for guest RAM: Permission denied"


@pytest.fixture
def refusing_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host where QEMU refuses every restore (as in a jail that cannot open the RAM)."""

    async def restore(self: FakeMachine, source: Path | int, **_: Any) -> None:
        self.calls.append("restore")
        self._returncode = 1  # QEMU quits by itself
        raise GuestError(PERMISSION_DENIED)

    monkeypatch.setattr(FakeMachine, "restore", restore)


def test_a_template_that_cannot_be_restored_is_not_rebuilt(
    env: Path, backend: FakeBackend, refusing_host: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        first = await boot(box_config(env, "one"), backend)
        assert first.boot_path == "cold" and PERMISSION_DENIED in first.cold_reason
        await first.discard()
        (record,) = template_failures.list_failures()
        assert record["stage"] == "restore" and PERMISSION_DENIED in record["reason"]
        assert stat.S_IMODE(os.stat(template_failures.record_path(record["key"])).st_mode) == 0o600
        built = len(machines(backend))

        # The next starts boot cold at once: no template build, no failed restore.
        second = await boot(box_config(env, "two"), backend)
        assert second.boot_path == "cold"
        assert "cannot be restored here since" in second.cold_reason
        assert PERMISSION_DENIED in second.cold_reason
        assert [m.calls[0] for m in machines(backend)[built:]] == ["boot"]
        await second.discard()

        # Something changed (here: the host's kernel): the template is tried again.
        host = {**template_failures.host_fingerprint(), "kernel": "another"}
        monkeypatch.setattr(template_failures, "host_fingerprint", lambda: host)
        before = len(machines(backend))
        third = await boot(box_config(env, "three"), backend)
        assert "snapshot" in machines(backend)[before].calls  # built again
        assert third.boot_path == "cold"
        await third.discard()
        assert [r["host"]["kernel"] for r in template_failures.list_failures()] == ["another"]

    run(scenario())


def test_a_template_that_cannot_be_built_twice_is_not_tried_again(
    env: Path, backend: FakeBackend
) -> None:
    async def scenario() -> None:
        for attempt, name in enumerate(("one", "two"), start=1):
            backend.fail_boots = 1  # the template's build boot fails; the cold boot works
            box = await boot(box_config(env, name), backend)
            assert box.boot_path == "cold" and "building it failed" in box.cold_reason
            await box.discard()
            # One failed build may be a loaded host: only the second stops further tries.
            assert len(template_failures.list_failures()) == (attempt == 2)
        before = len(machines(backend))
        third = await boot(box_config(env, "three"), backend)
        assert third.boot_path == "cold" and "cannot be built here since" in third.cold_reason
        assert [m.calls for m in machines(backend)[before:]] == [["boot"]]
        await third.discard()

    run(scenario())


def test_a_good_restore_elsewhere_is_unaffected_and_records_can_be_forgotten(
    env: Path, backend: FakeBackend
) -> None:
    async def scenario() -> None:
        first = await boot(box_config(env, "one"), backend)
        assert first.boot_path == "template"
        await first.discard()
        assert template_failures.list_failures() == []
        assert first.template_key is not None
        inputs_key = first.template_key
        # A record for this shape (made by an older husk on this host) stops templates…
        record = {
            "key": inputs_key,
            "stage": "restore",
            "reason": "test",
            "time": 0,
            "inputs": "-",
            "host": template_failures.host_fingerprint(),
        }
        template_failures.record_path(inputs_key).write_text(json.dumps(record))
        second = await boot(box_config(env, "two"), backend)
        assert second.boot_path == "cold" and "test" in second.cold_reason
        await second.discard()
        # …until `husk system check --retry-templates` forgets it.
        assert template_failures.forget_all() == 1
        third = await boot(box_config(env, "three"), backend)
        assert third.boot_path == "template"
        await third.discard()

    run(scenario())


# -- husk system check ---------------------------------------------------------------------


def test_system_check_reports_rootless_mode_and_remembered_failures(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from husk import diagnostics

    # Patches os.geteuid for everyone (diagnostics.os is os): the record is written as
    # the unprivileged user would have written it.
    monkeypatch.setattr(diagnostics.os, "geteuid", lambda: 1000)
    record = {
        "key": "ab" * 16,
        "stage": "restore",
        "reason": PERMISSION_DENIED,
        "time": 0,
        "inputs": "1 vCPU, 512 MiB, tcg, 2 disks, 0 shares",
        "host": template_failures.host_fingerprint(),
    }
    directory = template_failures.record_path(record["key"]).parent
    directory.mkdir(parents=True)
    template_failures.record_path(record["key"]).write_text(json.dumps(record))
    monkeypatch.setattr(diagnostics.jail, "TUN_DEVICE", str(env / "no-tun"))
    report = asyncio.run(diagnostics.run_check(boot=False))
    lines = "\n".join(diagnostics.format_report(report))
    assert "mode:          rootless" in lines
    assert "no network egress" in lines and "chmod 0666" in lines
    assert "published ports at the gateway (10.0.2.2)" in lines
    assert f"templates:     off for one shape: template {'ab' * 6}" in lines
    assert PERMISSION_DENIED in lines
    assert report.to_json()["mode"] == "rootless"


# -- the daemon's socket -------------------------------------------------------------------


def test_the_daemon_socket_is_private_and_the_umask_left_alone(tmp_path: Path) -> None:
    from husk.daemon.server import bind_private_socket

    path = tmp_path / "husk.sock"
    stale = bind_private_socket(path)
    stale.close()  # a socket file left by a daemon that died
    before = os.umask(0o022)
    try:
        sock = bind_private_socket(path)
        assert os.umask(0o022) == 0o022  # restored at once, not after some await
    finally:
        os.umask(before)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert sock.getsockname() == str(path)
    finally:
        sock.close()
