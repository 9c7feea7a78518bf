"""The guest bundle: cpio writer, module selection, kernel extraction, locate(), and a real boot.

The real bundle (a probe variant whose /husk/init.py reports what the guest
sees) is built once and cached across sessions in HUSK_TEST_CACHE
(default /var/tmp/husk-test-cache); it is rebuilt whenever its inputs change.
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from husk.bundle import Bundle, cpio, debs, locate
from husk.bundle import builder as bundle_builder
from husk.bundle.kernel import extract_vmlinux, has_pvh_entry, require_pvh
from husk.bundle.locate import INITRD_ENV, KERNEL_ENV, canonical_json, manifest_digest
from husk.bundle.modules import GUEST_MODULES, ModuleTree
from husk.cli.main import EXIT_HUSK_ERROR
from husk.cli.main import main as husk_main
from husk.errors import BundleError

MARKER = "HUSK-PROBE-OK"
PROBE_ENTRY = """\
import os, sys
sys.path.insert(0, "/husk/lib")
pid = int(open("/etc/husk/modules.pid").read())
_, status = os.waitpid(pid, 0)
if os.fork() == 0:
    os.execv("/bin/busybox", ["mount", "-t", "proc", "proc", "/proc"])
os.wait()
import json, tarfile, husk.guest.protocol
with open("/dev/console", "w") as console:
    uptime = open("/proc/uptime").read().split()[0]
    loaded = sorted(line.split()[0] for line in open("/proc/modules"))
    console.write("%s loader=%d uptime=%s modules=%s\\n" % (
        "HUSK-PROBE-OK", os.waitstatus_to_exitcode(status), uptime, ",".join(loaded)))
os.execv("/bin/busybox", ["poweroff", "-f"])
"""
# Kernel arguments that trim TCG boot time (no legacy probing, no TSC calibration).
FAST_CMDLINE = (
    "console=ttyS0 panic=-1 8250.nr_uarts=1 i8042.noaux i8042.nopnp "
    "tsc=reliable no_timer_check noreplace-smp quiet"
)
BOOT_DEADLINE = 120.0


def host_tsc_khz() -> int | None:
    """The host's TSC rate, which a TCG guest's TSC runs at.

    Handing it to the guest (tsc_early_khz=) spares the PIT calibration that
    fails on a busy host, after which the kernel waits forever for jiffies.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.MULTILINE)
    return round(float(match.group(1)) * 1000) if match else None


def boot_cmdline() -> str:
    khz = host_tsc_khz()
    return FAST_CMDLINE if khz is None else f"{FAST_CMDLINE} tsc_early_khz={khz}"


EXPECTED_MODULES = {
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_rng",
    "virtio_balloon",
    "crc32c_generic",
    "libcrc32c",
    "erofs",
    "jbd2",
    "mbcache",
    "crc16",
    "ext4",
    "overlay",
    "9pnet",
    "netfs",
    "fscache",
    "9p",
    "9pnet_virtio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
}


def shared_cache_root() -> Path:
    """Survives test sessions: .debs and built bundles are expensive to redo."""
    return Path(os.environ.get("HUSK_TEST_CACHE", "/var/tmp/husk-test-cache"))


@pytest.fixture(scope="session")
def deb_cache() -> Path:
    return shared_cache_root() / "debs"


@pytest.fixture(scope="session")
def probe_bundle(deb_cache: Path) -> Bundle:
    return bundle_builder.ensure_built(
        shared_cache_root() / "bundle-probe", deb_cache=deb_cache, agent_entry=PROBE_ENTRY
    )


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.delenv(INITRD_ENV, raising=False)
    yield tmp_path


# --- cpio -----------------------------------------------------------------


def _sample_entries() -> list[cpio.Entry]:
    return [
        cpio.directory("bin"),
        cpio.regular("bin/busybox", b"\x7fELF fake", 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.directory("dev"),
        cpio.char_device("dev/console", 5, 1),
        cpio.regular("init", b"#!/bin/sh\n", 0o755),
        cpio.directory("tmp", 0o1777),
    ]


def _archive(entries: list[cpio.Entry], mtime: int = 0) -> bytes:
    import io

    buffer = io.BytesIO()
    cpio.write_newc(buffer, entries, mtime=mtime)
    return buffer.getvalue()


def test_cpio_is_independent_of_entry_order() -> None:
    entries = _sample_entries()
    shuffled = entries[:]
    random.Random(7).shuffle(shuffled)
    assert _archive(entries) == _archive(shuffled)
    assert _archive(entries, mtime=1) != _archive(entries)


def test_cpio_members_as_gnu_cpio_reads_them(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(_archive(_sample_entries(), mtime=1_700_000_000))
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet", "-F", str(archive)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing]
    assert names == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init", "tmp"]
    console = next(line for line in listing if line.endswith("dev/console"))
    assert console.startswith("crw-------") and re.search(r" 5,\s+1 ", console)
    assert all(" root " in line for line in listing)
    assert next(line for line in listing if line.endswith(" tmp")).startswith("drwxrwxrwt")
    assert "bin/sh -> busybox" in next(line for line in listing if "bin/sh" in line)


def test_cpio_rejects_duplicate_and_absolute_paths() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        _archive([cpio.directory("bin"), cpio.directory("bin")])
    with pytest.raises(ValueError):
        _archive([cpio.directory("/bin")])


def test_cpio_header_fields() -> None:
    data = _archive([cpio.regular("f", b"abc", 0o644)], mtime=0x1234)
    assert data[:6] == b"070701"
    fields = [int(data[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size = fields[:7]
    assert (ino, uid, gid, nlink, mtime, size) == (1, 0, 0, 1, 0x1234, 3)
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o644
    assert data.endswith(b"TRAILER!!!\0\0\0\0")


# --- kernel modules (synthetic .ko files) ---------------------------------


def _fake_module(path: Path, **modinfo: str | list[str]) -> None:
    """A minimal ELF64 relocatable holding only a .modinfo section."""
    items: list[str] = []
    for key, value in modinfo.items():
        for single in [value] if isinstance(value, str) else value:
            items.append(f"{key}={single}")
    info = b"".join(item.encode() + b"\0" for item in items)
    names = b"\0.modinfo\0.shstrtab\0"
    info_offset = 64
    names_offset = info_offset + len(info)
    section_offset = (names_offset + len(names) + 7) & ~7
    header = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
        1, 62, 1, 0, 0, section_offset, 0, 64, 0, 0, 64, 3, 2,
    )  # fmt: skip
    sections = [
        struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, info_offset, len(info), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, names_offset, len(names), 0, 0, 1, 0),
    ]
    body = header + info + names
    body += b"\0" * (section_offset - len(body))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body + b"".join(sections))


def _fake_tree(tmp_path: Path) -> Path:
    release = tmp_path / "lib" / "modules" / "6.1.0-test"
    kernel = release / "kernel"
    _fake_module(kernel / "fs/ext4.ko", name="ext4", depends="jbd2", softdep="pre: crypto-crc32c")
    _fake_module(kernel / "fs/jbd2.ko", name="jbd2", depends="")
    _fake_module(
        kernel / "crypto/crc32c-intel.ko", name="crc32c_intel", alias=["crypto-crc32c", "crc32c"]
    )
    _fake_module(
        kernel / "crypto/crc32c_generic.ko",
        name="crc32c_generic",
        alias=["crypto-crc32c", "crc32c"],
    )
    _fake_module(kernel / "drivers/virtio-rng.ko", name="virtio_rng", depends="virtio")
    _fake_module(kernel / "drivers/virtio.ko", name="virtio", depends="", softdep="post: late")
    _fake_module(kernel / "drivers/late.ko", name="late", depends="")
    (release / "modules.builtin").write_text("kernel/drivers/tty/builtin_console.ko\n")
    return release


def test_module_order_follows_depends_and_softdeps(tmp_path: Path) -> None:
    tree = ModuleTree(_fake_tree(tmp_path))
    order = [m.name for m in tree.load_order(("ext4", "virtio-rng", "builtin_console"))]
    # crc32c comes from a soft dependency on an alias; the generic provider wins.
    assert order == ["crc32c_generic", "jbd2", "ext4", "virtio", "late", "virtio_rng"]


def test_missing_module_is_a_bundle_error(tmp_path: Path) -> None:
    tree = ModuleTree(_fake_tree(tmp_path))
    with pytest.raises(BundleError, match="kernel module nosuch not found"):
        tree.load_order(("nosuch",))


def test_unresolvable_softdep_is_a_bundle_error(tmp_path: Path) -> None:
    release = _fake_tree(tmp_path)
    _fake_module(release / "kernel/fs/odd.ko", name="odd", softdep="pre: crypto-nothing")
    with pytest.raises(BundleError, match="crypto-nothing"):
        ModuleTree(release).load_order(("odd",))


# --- kernel image ---------------------------------------------------------


def test_extract_vmlinux_rejects_non_kernels() -> None:
    with pytest.raises(BundleError, match="no XZ-compressed payload"):
        extract_vmlinux(b"MZ" + b"\0" * 4096)
    with pytest.raises(BundleError, match="decompress"):
        extract_vmlinux(b"\0" * 100 + b"\xfd7zXZ\x00" + b"garbage" * 10)


def test_pvh_check_rejects_an_elf_without_the_note() -> None:
    busybox = Path("/bin/busybox").read_bytes()
    assert not has_pvh_entry(busybox)
    with pytest.raises(BundleError, match="PVH"):
        require_pvh(busybox)
    with pytest.raises(BundleError, match="not a usable ELF"):
        require_pvh(b"not an elf at all")


# --- packages -------------------------------------------------------------


def test_deb_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is not a directory"):
        debs.from_directory(tmp_path / "absent")
    with pytest.raises(BundleError, match=r"lacks .*busybox-static"):
        debs.from_directory(tmp_path)


# --- locate ---------------------------------------------------------------


def _fake_bundle(directory: Path) -> dict[str, object]:
    directory.mkdir(parents=True)
    artifacts = {}
    for name, content in (("vmlinux", b"kernel-bytes"), ("initramfs.cpio", b"initrd-bytes")):
        (directory / name).write_bytes(content)
        import hashlib

        artifacts[name] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
    manifest: dict[str, object] = {"format": 1, "artifacts": artifacts}
    (directory / "manifest.json").write_bytes(canonical_json(manifest))
    return manifest


def test_locate_missing_bundle_says_how_to_build(isolated_env: Path) -> None:
    with pytest.raises(BundleError) as caught:
        locate()
    message = str(caught.value)
    assert str(isolated_env / "data" / "bundle") in message
    assert "run `husk bundle build`" in message


def test_locate_reads_the_manifest(isolated_env: Path) -> None:
    manifest = _fake_bundle(isolated_env / "data" / "bundle")
    found = locate(verify=True)
    assert found.kernel == isolated_env / "data" / "bundle" / "vmlinux"
    assert found.initrd == isolated_env / "data" / "bundle" / "initramfs.cpio"
    assert found.digest == manifest_digest(manifest)
    assert found.digest.startswith("sha256:")


def test_locate_detects_corruption(isolated_env: Path) -> None:
    directory = isolated_env / "data" / "bundle"
    _fake_bundle(directory)
    (directory / "vmlinux").write_bytes(b"kernel-bytez")  # same size, other content
    locate()  # the cheap check only compares sizes
    with pytest.raises(BundleError, match=r"vmlinux does not match its sha256.*rebuild"):
        locate(verify=True)
    (directory / "initramfs.cpio").write_bytes(b"short")
    with pytest.raises(BundleError, match=r"corrupt \(initramfs.cpio is 5 bytes.*rebuild"):
        locate()
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"corrupt.*rebuild"):
        locate()


def test_env_overrides_replace_the_artifacts(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = isolated_env / "my-vmlinux"
    initrd = isolated_env / "my-initrd"
    kernel.write_bytes(b"k1")
    initrd.write_bytes(b"i1")
    monkeypatch.setenv(KERNEL_ENV, str(kernel))
    monkeypatch.setenv(INITRD_ENV, str(initrd))
    first = locate()  # no installed bundle needed
    assert (first.kernel, first.initrd) == (kernel, initrd)
    kernel.write_bytes(b"k2")
    os.utime(kernel, ns=(1, 1))  # a new identity for the per-process hash cache
    assert locate().digest != first.digest

    monkeypatch.setenv(KERNEL_ENV, str(isolated_env / "absent"))
    with pytest.raises(BundleError, match=r"HUSK_KERNEL=.*absent is not a file"):
        locate()

    monkeypatch.delenv(KERNEL_ENV)
    with pytest.raises(BundleError, match="run `husk bundle build`"):
        locate()  # the kernel still has to come from a bundle
    _fake_bundle(isolated_env / "data" / "bundle")
    mixed = locate()
    assert mixed.kernel == isolated_env / "data" / "bundle" / "vmlinux"
    assert mixed.initrd == initrd


def test_cli_info_errors_in_one_line(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        husk_main(["bundle", "info"])
    assert caught.value.code == EXIT_HUSK_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("husk: guest bundle not found at") and "\n" not in err


# --- the real bundle --------------------------------------------------------


def test_real_bundle_manifest(probe_bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    # A VM test earlier in the session points these at the installed bundle.
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.delenv(INITRD_ENV, raising=False)
    manifest = probe_bundle.manifest
    names = {package["name"] for package in manifest["inputs"]["packages"]}
    assert set(debs.PACKAGES) <= names
    assert f"linux-image-{manifest['kernel_release']}" in names
    assert set(manifest["modules"]) == EXPECTED_MODULES
    order = manifest["modules"]
    for first, then in [
        ("crc32c_generic", "ext4"),
        ("jbd2", "ext4"),
        ("libcrc32c", "erofs"),
        ("virtio_ring", "virtio_mmio"),
        ("vsock", "vmw_vsock_virtio_transport"),
        ("9pnet", "9pnet_virtio"),
    ]:
        assert order.index(first) < order.index(then), (first, then)
    assert set(GUEST_MODULES) <= set(order)
    assert has_pvh_entry(probe_bundle.kernel.read_bytes())
    assert locate(probe_bundle.kernel.parent, verify=True).digest == probe_bundle.digest


def test_real_initramfs_contents(probe_bundle: Bundle) -> None:
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet", "-F", str(probe_bundle.initrd)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    names = set(
        subprocess.run(
            ["cpio", "-it", "--quiet", "-F", str(probe_bundle.initrd)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    )
    for required in [
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/insmod",
        "dev/console",
        "dev/null",
        "usr/bin/python3.11",
        "lib/x86_64-linux-gnu/libc.so.6",
        "lib64/ld-linux-x86-64.so.2",
        "usr/lib/python3.11/os.pyc",
        "usr/lib/python3.11/json/__init__.pyc",
        "husk/lib/husk/__init__.pyc",
        "husk/lib/husk/guest/protocol.pyc",
        "husk/init.py",
        "etc/husk/load-modules.sh",
        "lib/modules/ext4.ko",
    ]:
        assert required in names, required
    # Sourceless and trimmed: no .py outside the entry script, no caches, no tests.
    assert [n for n in names if n.endswith(".py")] == ["husk/init.py"]
    assert not [n for n in names if "__pycache__" in n or n.startswith("usr/lib/python3.11/test/")]
    assert not [n for n in names if "lib2to3" in n or "idlelib" in n or "ensurepip" in n]
    assert all(line.split()[2:4] == ["root", "root"] for line in listing)


def test_same_inputs_give_the_same_digest(probe_bundle: Bundle, deb_cache: Path) -> None:
    # Rebuilt from the cached .debs as an offline --deb-dir: both paths must agree.
    again = bundle_builder.build(
        shared_cache_root() / "bundle-probe-again", deb_dir=deb_cache, agent_entry=PROBE_ENTRY
    )
    assert again.digest == probe_bundle.digest
    assert again.initrd.read_bytes() == probe_bundle.initrd.read_bytes()
    manifest = json.loads((again.kernel.parent / "manifest.json").read_text())
    assert manifest_digest(manifest) == again.digest


def _boot(bundle: Bundle, workdir: Path) -> tuple[str, float]:
    console = workdir / "console.log"
    argv = [
        "qemu-system-x86_64",
        "-M", "microvm", "-accel", "tcg", "-m", "256",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", f"file:{console}",
        "-device", "virtio-serial-device",
        "-device", "virtio-rng-device",
        "-kernel", str(bundle.kernel),
        "-initrd", str(bundle.initrd),
        "-append", boot_cmdline(),
    ]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker_seen: float | None = None
    try:
        while process.poll() is None and time.monotonic() - started < BOOT_DEADLINE:
            if (
                marker_seen is None
                and console.exists()
                and MARKER in console.read_text(errors="replace")
            ):
                marker_seen = time.monotonic() - started
            time.sleep(0.01)
        if process.poll() is None:
            process.kill()
            pytest.fail(
                f"guest did not power off within {BOOT_DEADLINE:.0f} s:\n"
                + console.read_text(errors="replace")[-3000:]
            )
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
    text = console.read_text(errors="replace")
    if marker_seen is None and MARKER in text:
        marker_seen = time.monotonic() - started
    return text, marker_seen if marker_seen is not None else -1.0


@pytest.mark.vm
def test_bundle_boots_loads_modules_and_runs_python(probe_bundle: Bundle, tmp_path: Path) -> None:
    text, seconds = _boot(probe_bundle, tmp_path)
    lines = [line for line in text.splitlines() if line.startswith(MARKER)]
    assert lines, f"no probe marker on the console:\n{text[-3000:]}"
    fields = dict(item.split("=", 1) for item in lines[0].split()[1:])
    assert fields["loader"] == "0", text  # every insmod succeeded
    loaded = set(fields["modules"].split(","))
    assert {"virtio_console", "erofs", "ext4", "overlay", "virtio_blk", "crc32c_generic"} <= loaded
    assert loaded == EXPECTED_MODULES
    print(f"QEMU start to probe marker: {seconds:.2f} s (guest uptime {fields['uptime']} s)")


def test_ensure_built_reuses_an_up_to_date_bundle(probe_bundle: Bundle, deb_cache: Path) -> None:
    # The probe bundle lives in a cache that test sessions of other checkouts (other guest
    # sources) share: make sure it is this checkout's right before asking again.
    current = bundle_builder.ensure_built(
        probe_bundle.kernel.parent, deb_cache=deb_cache, agent_entry=PROBE_ENTRY
    )
    before = current.initrd.stat()
    again = bundle_builder.ensure_built(
        probe_bundle.kernel.parent, deb_cache=deb_cache, agent_entry=PROBE_ENTRY
    )
    after = again.initrd.stat()
    assert again.digest == current.digest
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
