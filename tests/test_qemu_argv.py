"""The QEMU command line (husk.vm.qemu_argv): a pure function of the configuration, no QEMU run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from husk.errors import InvalidArgument
from husk.vm.machine import DiskConfig, MachineConfig, MemoryFile, NetConfig, ShareConfig
from husk.vm.qemu_argv import (
    GUEST_MEMORY_CMDLINE,
    KVM_CPU,
    SANDBOX,
    TCG_CPU,
    build_command,
    default_cpu_model,
    kernel_cmdline,
)


def _argv(config: MachineConfig, **overrides: object) -> list[str]:
    settings: dict[str, object] = {
        "binary": "qemu",
        "accel": "tcg",
        "qmp_fd": 5,
        "agent_fd": 6,
        "boot_time_ns": 1,
    }
    settings.update(overrides)
    return build_command(config, **settings)  # type: ignore[arg-type]


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_command_has_every_device_and_the_sandbox(tmp_path: Path) -> None:
    config = MachineConfig(
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd",
        state_dir=tmp_path / "vm",
        cpus=1,
        memory_mib=300,
        disks=[
            DiskConfig(tmp_path / "image.erofs", "husk-image", readonly=True),
            DiskConfig(tmp_path / "upper.ext4", "husk-upper", cache="unsafe"),
        ],
        shares=[ShareConfig("vol0", tmp_path, readonly=True)],
        net=NetConfig("02:11:22:33:44:55"),
        cmdline_extra=["husk.debug=1"],
    )
    argv = build_command(
        config,
        binary="qemu",
        accel="tcg",
        qmp_fd=5,
        agent_fd=6,
        boot_time_ns=123,
        disk_fds=[[7], [8, 10]],
        console_fd=9,
    )
    joined = " ".join(argv)
    assert argv[argv.index("-sandbox") + 1] == SANDBOX
    assert "spawn=deny" in SANDBOX
    assert argv[argv.index("-m") + 1] == "300M"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot", "-nographic"):
        assert flag in argv
    assert argv[argv.index("-M") + 1].startswith("microvm")
    # Disks and the console are descriptors QEMU inherits (fd sets), never paths.
    assert str(tmp_path / "image.erofs") not in joined
    assert "-add-fd fd=7,set=10 -drive if=none,id=disk0,file=/dev/fdset/10," in joined
    assert (
        "-add-fd fd=8,set=11 -add-fd fd=10,set=11 -drive if=none,id=disk1,file=/dev/fdset/11,"
        in joined
    )
    assert "-add-fd fd=9,set=1 -chardev file,id=console,path=/dev/fdset/1,append=on" in joined
    assert "file=/dev/fdset/10,format=raw,readonly=on" in joined
    assert "virtio-blk-device,drive=disk0,serial=husk-image" in joined
    assert "readonly=off,cache=unsafe" in joined
    assert "virtio-blk-device,drive=disk1,serial=husk-upper" in joined
    # Guest root can create neither setuid files nor device nodes in a share.
    assert "security_model=mapped-xattr,fmode=0600,dmode=0700,readonly=on" in joined
    assert "virtio-9p-device,fsdev=fs0,mount_tag=vol0" in joined
    assert "virtio-net-device,netdev=net0,mac=02:11:22:33:44:55" in joined
    assert "hostfwd" not in joined
    assert "virtio-rng-device" in joined
    assert "socket,id=agent,fd=6,server=on,wait=off" in joined
    assert "virtserialport,chardev=agent,name=org.husk.agent" in joined
    assert "socket,id=qmp,fd=5,server=on,wait=off" in joined
    append = argv[argv.index("-append") + 1].split()
    assert "husk.boottime=123" in append
    assert "console=ttyS0" in append
    assert append[-1] == "husk.debug=1"


def test_the_host_tsc_rate_is_told_to_tcg_guests_only(tmp_path: Path) -> None:
    config = MachineConfig(Path("k"), Path("i"), tmp_path, cmdline_extra=["x=1"])
    tcg = kernel_cmdline(config, accel="tcg", boot_time_ns=7, tsc_khz=2_500_000).split()
    kvm = kernel_cmdline(config, accel="kvm", boot_time_ns=7, tsc_khz=2_500_000).split()
    unknown = kernel_cmdline(config, accel="tcg", boot_time_ns=7, tsc_khz=None).split()
    assert "tsc_early_khz=2500000" in tcg
    assert not any(word.startswith("tsc_early_khz") for word in kvm + unknown)
    assert tcg[-1] == "x=1"  # the caller's words come last: they win over the defaults
    argv = _argv(config, tsc_khz=2_500_000)
    assert "tsc_early_khz=2500000" in _option(argv, "-append").split()


def test_the_accelerator_picks_the_cpu_model_and_translation_cache(tmp_path: Path) -> None:
    config = MachineConfig(Path("k"), Path("i"), tmp_path)
    tcg = _argv(config, accel="tcg")
    kvm = _argv(config, accel="kvm")
    assert (_option(tcg, "-accel"), _option(tcg, "-cpu")) == ("tcg,tb-size=32", TCG_CPU)
    assert (_option(kvm, "-accel"), _option(kvm, "-cpu")) == ("kvm", KVM_CPU)
    assert default_cpu_model("kvm") == KVM_CPU and default_cpu_model("tcg") == TCG_CPU
    named = MachineConfig(Path("k"), Path("i"), tmp_path, cpu_model="qemu64")
    assert _option(_argv(named, accel="kvm"), "-cpu") == "qemu64"
    # a warm pool's rehearsed VMs ask for a larger translation cache
    larger = MachineConfig(Path("k"), Path("i"), tmp_path, tcg_cache_mib=64)
    assert _option(_argv(larger, accel="tcg"), "-accel") == "tcg,tb-size=64"
    assert _option(_argv(larger, accel="kvm"), "-accel") == "kvm"


def test_a_memory_file_backs_guest_ram_through_its_descriptor(tmp_path: Path) -> None:
    shared = MachineConfig(
        Path("k"), Path("i"), tmp_path, memory_mib=256, memory_file=MemoryFile(tmp_path / "m", True)
    )
    argv = _argv(shared)
    assert _option(argv, "-M") == "microvm,x-option-roms=off,memory-backend=husk-ram"
    assert f"memory-backend-file,id=husk-ram,size=256M,mem-path={tmp_path / 'm'},share=on" in argv
    clone = MachineConfig(
        Path("k"),
        Path("i"),
        tmp_path,
        memory_mib=256,
        memory_file=MemoryFile(tmp_path / "m", False, fd=42),
    )
    argv = _argv(clone)
    # A clone maps the template's sealed memfd privately, never the file by name.
    assert "memory-backend-file,id=husk-ram,size=256M,mem-path=/proc/self/fd/42,share=off" in argv
    assert not any(
        "memory-backend" in word for word in _argv(MachineConfig(Path("k"), Path("i"), tmp_path))
    )


def test_incoming_waits_paused_for_a_saved_state(tmp_path: Path) -> None:
    config = MachineConfig(Path("k"), Path("i"), tmp_path)
    assert _argv(config, incoming=True)[-3:] == ["-incoming", "defer", "-S"]
    assert "-incoming" not in _argv(config)


def test_without_descriptors_the_paths_are_used(tmp_path: Path) -> None:
    config = MachineConfig(
        Path("k"), Path("i"), tmp_path / "vm", disks=[DiskConfig(tmp_path / "d", "husk-image")]
    )
    argv = _argv(config)
    joined = " ".join(argv)
    assert "-add-fd" not in argv
    assert f"file={tmp_path / 'd'},format=raw" in joined
    assert f"path={tmp_path / 'vm' / 'console.log'},append=on" in joined


def test_descriptors_must_match_the_disks(tmp_path: Path) -> None:
    config = MachineConfig(
        Path("k"), Path("i"), tmp_path, disks=[DiskConfig(tmp_path / "d", "husk-image")]
    )
    with pytest.raises(InvalidArgument, match="1 disks but 2 descriptors"):
        _argv(config, disk_fds=[[7], [8]])


def test_building_the_command_touches_nothing(tmp_path: Path) -> None:
    """Pure: the same argv twice, and no file appears (the state directory is not made)."""
    config = MachineConfig(
        tmp_path / "k",
        tmp_path / "i",
        tmp_path / "vm",
        disks=[DiskConfig(tmp_path / "d", "husk-image")],
        shares=[ShareConfig("vol0", tmp_path / "share")],
        net=NetConfig("02:00:00:00:00:01"),
    )
    assert _argv(config) == _argv(config)
    assert list(tmp_path.iterdir()) == []


def test_free_page_reporting_only_with_anonymous_ram(tmp_path: Path) -> None:
    """Cold boots give freed guest memory back (a balloon that reports free pages); VMs
    whose RAM is a file (templates, their clones) have no balloon: QEMU 7.2 would punch
    holes in that file, and a template and its clones must keep one device model."""
    config = MachineConfig(tmp_path / "k", tmp_path / "i", tmp_path / "vm", memory_mib=256)
    cold = _argv(config)
    balloon = "virtio-balloon-device,free-page-reporting=on"
    assert cold[cold.index(balloon) - 1] == "-device"
    for shared in (True, False):
        memory = MemoryFile(tmp_path / "memory.ram", shared=shared, fd=12)
        filed = _argv(replace(config, memory_file=memory))
        assert not any("balloon" in word for word in filed)


def test_a_cold_boot_reads_the_kernel_and_initramfs_from_its_private_copies(
    tmp_path: Path,
) -> None:
    """QEMU opens the copies it inherits (husk.vm.bootimages) instead of the bundle files,
    so the daemon can empty them once the guest runs; without copies, the paths."""
    config = MachineConfig(tmp_path / "vmlinux", tmp_path / "initrd", tmp_path / "vm")
    copied = _argv(config, boot_image_fds=(14, 15))
    assert (_option(copied, "-kernel"), _option(copied, "-initrd")) == (
        "/proc/self/fd/14",
        "/proc/self/fd/15",
    )
    assert str(tmp_path / "vmlinux") not in " ".join(copied)
    plain = _argv(config)
    assert (_option(plain, "-kernel"), _option(plain, "-initrd")) == (
        str(tmp_path / "vmlinux"),
        str(tmp_path / "initrd"),
    )


def test_every_guest_boots_with_the_memory_options(tmp_path: Path) -> None:
    # Pages not zeroed on allocation, kernel memory not charged to memory cgroups: both
    # shrink what an idle guest touches (docs/PERFORMANCE.md, "Memory, round three").
    config = MachineConfig(Path("k"), Path("i"), tmp_path, cmdline_extra=["init_on_alloc=1"])
    words = kernel_cmdline(config, accel="kvm", boot_time_ns=7).split()
    assert GUEST_MEMORY_CMDLINE == ("init_on_alloc=0", "cgroup.memory=nokmem")
    assert set(GUEST_MEMORY_CMDLINE) <= set(words)
    # A caller's own words come after them, so they can turn one back on.
    assert words.index("init_on_alloc=1") > words.index("init_on_alloc=0")
