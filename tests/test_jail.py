"""QEMU's confinement, checked from /proc for real VMs started through the real runtime.

Each container's QEMU must run as a uid of its own with no capabilities, under
NoNewPrivs and seccomp, in mount/network/IPC/UTS namespaces of its own whose root
holds only what QEMU needs, in a cgroup of its own; 9p shares must not let guest
root create setuid files or device nodes on the host; the console log is capped.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from husk.runtime.runtime import Runtime
from husk.spec import ContainerSpec, parse_bind
from husk.tools import find_tool
from husk.vm import jail, qemu, qemu_argv

IMAGE = "husk.local/busybox:latest"
DEADLINE = 240.0
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the jail's uid and cgroup need root")


@pytest.fixture(scope="session")
def busybox_image(guest_bundle: object) -> str:
    from testimages import install_busybox_image

    install_busybox_image()
    return IMAGE


def with_runtime(body: Callable[[Runtime], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        runtime = Runtime()
        before = {r.id for r in runtime.list(all=True)}
        try:
            return await asyncio.wait_for(body(runtime), DEADLINE)
        finally:
            for record in runtime.list(all=True):
                if record.id not in before:
                    await runtime.remove(record.id, force=True)
            await runtime.shutdown()

    return asyncio.run(main())


def machine_state(runtime: Runtime, container_id: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((runtime.vm_dir(container_id) / qemu.STATE_FILE).read_text())
    return state


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def jail_files(root: Path) -> set[str]:
    """Every path under QEMU's root, except inside /usr and /proc (host binds)."""
    found = set()
    for directory, subdirs, files in os.walk(root):
        relative = "/" + os.path.relpath(directory, root)
        if relative in ("/usr", "/proc"):
            subdirs[:] = []
            continue
        for name in files:
            found.add(os.path.normpath(f"{relative}/{name}"))
    return found


async def sleeper(runtime: Runtime, **spec: Any) -> str:
    record = await runtime.create(ContainerSpec(image=IMAGE, cmd=["sleep", "300"], **spec))
    await runtime.start(record.id)
    return record.id


# -- the pieces, without a VM ---------------------------------------------------------------


@root_only
def test_id_leases_are_unique_while_held(tmp_path: Path) -> None:
    directory = tmp_path / "ids"
    first, second = jail.lease_id(directory), jail.lease_id(directory)
    assert (first.slot, second.slot) == (0, 1)
    assert first.uid == jail.ID_BASE and second.gid == jail.ID_BASE + 1
    first.close()  # the VM holding slot 0 is gone
    third = jail.lease_id(directory)
    assert third.slot == 0
    second.close()
    third.close()


@root_only
def test_id_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ids"
    directory.mkdir(mode=0o777)
    directory.chmod(0o777)
    with pytest.raises(OSError, match="owned by root"):
        jail.lease_id(directory)


def test_jail_root_is_built_parents_first(tmp_path: Path) -> None:
    kernel = tmp_path / "bundle" / "vmlinux"
    kernel.parent.mkdir()
    kernel.write_bytes(b"k")
    share = tmp_path / "share"
    share.mkdir()
    spec = jail.JailSpec(
        tmp_path / "root",
        [jail.Bind(Path("/usr")), jail.Bind(kernel), jail.Bind(share, readonly=False, userns_fd=9)],
        {"/etc/resolv.conf": b"nameserver 10.0.3.3\n"},
        uid=jail.ID_BASE,
        gid=jail.ID_BASE,
    )
    operations = jail._root_operations(spec, b"/R")
    order = [(kind, path.decode()) for kind, path, *_ in operations]
    assert ("bind-dir", "/R/usr") in order
    assert ("bind-file", f"/R{kernel}") in order
    assert ("bind-idmap", f"/R{share}") in order
    assert ("write", "/R/etc/resolv.conf") in order
    # every directory comes before what is made inside it
    made = [path for _, path in order]
    for index, path in enumerate(made):
        parent = os.path.dirname(path)
        if parent != "/R":
            assert parent in made[:index], path
    idmap = next(op for op in operations if op[0] == "bind-idmap")
    assert idmap[3] is False and idmap[4] == 9  # writable, through user namespace 9


def test_no_jail_switch_gives_an_unconfined_qemu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(jail.NO_JAIL_ENV, "1")
    confinement = jail.confine(
        name="x",
        mount_point=tmp_path / "root",
        binary="/usr/bin/true",
        read_only=[],
        shares=[],
        kvm=False,
        memory_mib=128,
        resolv_conf=None,
    )
    assert not confinement.jailed and confinement.preexec() is None
    assert jail.NO_JAIL_ENV in confinement.reason


# -- real VMs through the real runtime --------------------------------------------------


@pytest.mark.vm
@root_only
def test_qemu_runs_jailed(busybox_image: str, tmp_path: Path) -> None:
    """uid/gid, capabilities, NoNewPrivs, seccomp, namespaces, root, cgroup, all from /proc."""
    share = tmp_path / "share"
    share.mkdir()

    async def body(runtime: Runtime) -> None:
        first = await sleeper(runtime, binds=[parse_bind(f"{share}:/data")])
        second = await sleeper(runtime)
        states = [machine_state(runtime, ref) for ref in (first, second)]
        pids = [int(state["pid"]) for state in states]
        uids = []
        for pid, state in zip(pids, states, strict=True):
            fields = status_fields(pid)
            uid = int(fields["Uid"].split()[0])
            assert fields["Uid"].split() == [str(uid)] * 4
            assert fields["Gid"].split() == [str(uid)] * 4
            assert jail.ID_BASE <= uid < jail.ID_BASE + jail.ID_SLOTS
            assert fields["Groups"] == ""
            for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(fields[capabilities], 16) == 0, capabilities
            assert fields["NoNewPrivs"] == "1"
            assert fields["Seccomp"] == "2"
            for kind in ("mnt", "net", "ipc", "uts"):
                assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(
                    f"/proc/self/ns/{kind}"
                ), kind
            uids.append(uid)
            # Its root: a read-only tmpfs with /usr, /proc, the guest kernel and initrd,
            # two devices, resolv.conf, ld.so.cache and the 9p share; nothing else.
            root = Path(f"/proc/{pid}/root")
            config = state["config"]
            expected = {
                "/dev/null",
                "/dev/urandom",
                "/etc/resolv.conf",
                "/etc/ld.so.cache",
                config["kernel"],
                config["initrd"],
            }
            listed = jail_files(root)
            assert listed == expected, listed ^ expected
            assert (root / "etc/resolv.conf").read_text() == "nameserver 10.0.3.3\n"
            assert not (root / str(runtime.vm_dir(first)).lstrip("/")).exists()
            assert not (root / "root").exists() and not (root / "home").exists()
            mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            assert mounts[0].split()[4] == "/" and " ro," in mounts[0] and " tmpfs " in mounts[0]
            assert any("hidepid=invisible" in line for line in mounts)
            # Its network namespace: only lo and slirp4netns's tap0.
            devices = Path(f"/proc/{pid}/net/dev").read_text()
            assert "tap0:" in devices and "lo:" in devices
            assert "eth0" not in devices and "veth" not in devices
            # Its cgroup: memory = guest RAM + QEMU's overhead; pids bounded.
            assert state["jail"]["cgroup"], "no cgroup"
            for path in state["jail"]["cgroup"]:
                procs = Path(path, "cgroup.procs").read_text().split()
                assert str(pid) in procs
                assert str(state["egress"]["pid"]) in procs  # slirp4netns joins it
            memory_mib = config["memory_mib"]
            for path in map(Path, state["jail"]["cgroup"]):
                if (path / "memory.limit_in_bytes").exists():
                    limit = int((path / "memory.limit_in_bytes").read_text())
                    assert limit == (memory_mib + jail.QEMU_OVERHEAD_MIB) * 1024 * 1024
                if (path / "pids.max").exists():
                    assert int((path / "pids.max").read_text()) == jail.PIDS_LIMIT
            own = {
                line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().split()
            }
            assert any(group.startswith(f"/{jail.CGROUP_PARENT}/") for group in own)
        assert uids[0] != uids[1]
        # The share is an idmapped bind: in QEMU's view its owner (root here) is QEMU.
        share_in_jail = Path(f"/proc/{pids[0]}/root") / str(share).lstrip("/")
        assert share_in_jail.stat().st_uid == uids[0]
        egress = [int(state["egress"]["pid"]) for state in states]
        cgroups = [Path(path) for state in states for path in state["jail"]["cgroup"]]
        for ref in (first, second):
            await runtime.remove(ref, force=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            Path(f"/proc/{pid}").exists() for pid in pids + egress
        ):
            await asyncio.sleep(0.05)
        for pid in pids + egress:
            assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived its container"
        for path in cgroups:
            assert not path.exists(), f"{path} outlived its VM"

    with_runtime(body)


@pytest.mark.vm
@root_only
def test_guest_root_makes_no_setuid_file_or_device_node_on_the_host(
    busybox_image: str, tmp_path: Path
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "from-host.txt").write_text("host data\n")
    script = (
        "cp /bin/busybox /data/suid && chown 0:0 /data/suid && chmod 4755 /data/suid"
        " && mknod /data/block b 8 0 && mknod /data/char c 1 3 && mkdir /data/dir"
        " && stat -c '%n %u %g %a %F' /data/suid /data/block /data/char /data/from-host.txt"
    )

    async def body(runtime: Runtime) -> None:
        record = await runtime.create(
            ContainerSpec(
                image=IMAGE, cmd=["sh", "-c", script], binds=[parse_bind(f"{share}:/data")]
            )
        )
        await runtime.start(record.id)
        assert await runtime.wait(record.id) == 0
        output = "".join([entry.data.decode() async for entry in runtime.logs(record.id)])
        lines = {line.split()[0]: line.split()[1:] for line in output.splitlines()}
        # Inside the guest, the files look as guest root made them ...
        assert lines["/data/suid"][:3] == ["0", "0", "4755"]
        assert lines["/data/block"][3:] == ["block", "special", "file"]
        assert lines["/data/char"][3:] == ["character", "special", "file"]
        # ... and a host file shows the host's mode; its owner reads as the VM's uid.
        assert lines["/data/from-host.txt"][2] == "644"

    with_runtime(body)
    # On the host: plain files owned by the share's owner, no setuid bit, no device.
    owner = share.stat()
    for name in ("suid", "block", "char"):
        info = os.lstat(share / name)
        assert stat.S_ISREG(info.st_mode), name
        assert not info.st_mode & (stat.S_ISUID | stat.S_ISGID), name
        assert (info.st_uid, info.st_gid) == (owner.st_uid, owner.st_gid), name
        assert stat.S_IMODE(info.st_mode) == qemu_argv.SHARE_FILE_MODE, name
    assert stat.S_IMODE(os.lstat(share / "dir").st_mode) == qemu_argv.SHARE_DIR_MODE
    # The guest's view is kept in user.virtfs.* attributes.
    mode = int.from_bytes(os.getxattr(share / "suid", "user.virtfs.mode"), "little")
    assert mode & stat.S_ISUID
    assert not [
        path for path in share.rglob("*") if path.is_block_device() or path.is_char_device()
    ]


@pytest.mark.vm
def test_console_flood_is_capped(busybox_image: str) -> None:
    """Guest root writing to the serial port as fast as it can does not fill /run."""
    flood = "mknod /tmp/ttyS0 c 4 64 && while :; do cat /bin/busybox; done > /tmp/ttyS0"

    async def body(runtime: Runtime) -> None:
        # Privileged: root that owns its VM (a container's own root cannot open the port).
        spec = ContainerSpec(image=IMAGE, cmd=["sh", "-c", flood], privileged=True)
        record = await runtime.create(spec)
        await runtime.start(record.id)
        directory = runtime.vm_dir(record.id)
        console = directory / qemu.CONSOLE_LOG
        old = directory / qemu.OLD_CONSOLE_LOG
        deadline = time.monotonic() + 60
        written = 0
        largest = 0
        while time.monotonic() < deadline and not old.exists():
            await asyncio.sleep(0.1)
        assert old.exists(), "console.log was never rotated"
        end = time.monotonic() + 5
        while time.monotonic() < end:
            sizes = [path.stat().st_size for path in (console, old) if path.exists()]
            largest = max(largest, sum(sizes))
            written += 1
            await asyncio.sleep(0.05)
        # The cap plus what a guest can write between two checks.
        assert largest <= 3 * qemu.CONSOLE_MAX_BYTES, largest
        machine = runtime.live[record.id].sandbox.machine
        machine.check_alive()  # still running, and no panic invented by the rotation

    with_runtime(body)


@root_only
def test_host_owned_shares_give_qemu_file_capabilities_under_its_own_uid(tmp_path: Path) -> None:
    """husk-runtime's jail: an engine's root file system (files of every owner) is a plain
    bind, and the jailed process reads and writes it with CAP_CHOWN, CAP_DAC_OVERRIDE,
    CAP_FOWNER and CAP_FSETID kept as ambient capabilities of the VM's own uid; nothing
    else (it cannot signal a root process, change its uid or see the host's files)."""
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir(mode=0o755)
    secret = rootfs / "shadow"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    confinement = jail.confine(
        name="filecaps-test",
        mount_point=tmp_path / "jail",
        binary="/usr/bin/sh",
        read_only=[],
        shares=[(rootfs, False)],
        kvm=False,
        memory_mib=64,
        resolv_conf=None,
        host_owned_shares=True,
    )
    script = (
        "grep -E '^(Uid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status; "
        f"cat {secret}; echo appended >> {secret}; "
        f"chown 1234:1234 {rootfs}/shadow && echo chowned; "
        "kill -0 1 2>/dev/null && echo signalled-init || echo no-signal; "
        "test -e /etc/passwd && echo host-files || echo no-host-files"
    )
    try:
        done = subprocess.run(
            ["/usr/bin/sh", "-c", script],
            preexec_fn=confinement.preexec(),
            pass_fds=confinement.inherited_fds(),
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        confinement.release()
    assert done.returncode == 0, done.stderr
    output = done.stdout.decode().splitlines()
    fields = dict(line.split(":\t", 1) for line in output if ":\t" in line)
    uid = int(fields["Uid"].split()[0])
    assert jail.ID_BASE <= uid < jail.ID_BASE + jail.ID_SLOTS
    mask = sum(1 << cap for cap in jail.FILE_CAPABILITIES)
    for name in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[name], 16) == mask, (name, fields[name])
    assert fields["NoNewPrivs"].strip() == "1"
    lines = output
    assert "root only" in lines and "chowned" in lines
    assert "no-signal" in lines and "no-host-files" in lines
    assert secret.read_text() == "root only\nappended\n"
    assert (secret.stat().st_uid, secret.stat().st_gid) == (1234, 1234)


def test_a_jail_keeps_no_capability_but_file_ones(tmp_path: Path) -> None:
    spec = jail.JailSpec(tmp_path, [], {}, uid=None, gid=None, ambient_caps=(jail.CAP_CHOWN,))
    with pytest.raises(ValueError, match="only file capabilities, as root"):
        jail.make_preexec(spec)  # rootless: no capability at all
    spec = jail.JailSpec(tmp_path, [], {}, uid=1, gid=1, ambient_caps=(21,))  # CAP_SYS_ADMIN
    with pytest.raises(ValueError, match="only file capabilities"):
        jail.make_preexec(spec)


def _probe_jailed_proc(tmp_path: Path) -> list[str]:
    """What a jailed process holding husk-runtime's file capabilities can open for writing
    in /proc (root's files: the sysrq trigger, IRQ affinity, init's OOM score), whether it
    sees init, and whether /proc/self/fd still opens its descriptors (QEMU's RAM, disks)."""
    confinement = jail.confine(
        name="proc-test",
        mount_point=tmp_path / "jail",
        binary="/usr/bin/sh",
        read_only=[],
        shares=[],
        kvm=False,
        memory_mib=64,
        resolv_conf=None,
        host_owned_shares=True,
    )
    # Opened for appending, never written: a successful open is the finding.
    script = "".join(
        f"(exec 3>>{path}) 2>/dev/null && echo writable {path}; "
        for path in (
            "/proc/sysrq-trigger",
            "/proc/irq/default_smp_affinity",
            "/proc/1/oom_score_adj",
        )
    ) + (
        "test -e /proc/1/status && echo sees-init; "
        "(exec 3<>/proc/self/fd/0) && echo fd-links-work || echo no-fd-links"
    )
    try:
        done = subprocess.run(
            ["/usr/bin/sh", "-c", script],
            preexec_fn=confinement.preexec(),
            pass_fds=confinement.inherited_fds(),
            stdin=subprocess.PIPE,
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        confinement.release()
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().splitlines()


@root_only
def test_a_qemu_with_file_capabilities_cannot_reach_the_hosts_proc(tmp_path: Path) -> None:
    """With CAP_DAC_OVERRIDE (husk-runtime's QEMU), the host's /proc would let it write
    /proc/sysrq-trigger (reboot or crash the host), IRQ affinities and other processes'
    OOM scores."""
    lines = _probe_jailed_proc(tmp_path)
    assert lines == ["fd-links-work"]


@root_only
def test_a_kernel_without_proc_subsets_never_gets_qemu_the_hosts_proc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux before 5.8 has no ``hidepid=invisible,subset=pid``: that mount failed and the
    jail bound the host's whole /proc instead, sysrq trigger and all. (Simulated here by
    an option no kernel knows, tried first.)"""
    monkeypatch.setattr(
        jail, "PROC_MOUNT_OPTIONS", (b"husk-no-such-option", *jail.PROC_MOUNT_OPTIONS[1:])
    )
    lines = _probe_jailed_proc(tmp_path)
    assert lines == ["fd-links-work"]


UNSHARE_MOUNTS = ("unshare", "--mount", "--propagation", "private")
_SUBMOUNT_PROBE = """
import subprocess, sys, tempfile
from pathlib import Path
from husk.vm import jail
subprocess.run(["mount", "-t", "tmpfs", "husk-test", sys.argv[1]], check=True)
scratch = Path(tempfile.mkdtemp())
confinement = jail.confine(
    name="submount-test", mount_point=scratch / "jail", binary="/usr/bin/sh", read_only=[],
    shares=[], kvm=False, memory_mib=64, resolv_conf=None, host_owned_shares=True,
)
try:
    done = subprocess.run(
        ["/usr/bin/sh", "-c", f"echo x > {sys.argv[1]}/planted && echo wrote || echo refused"],
        preexec_fn=confinement.preexec(), pass_fds=confinement.inherited_fds(),
        capture_output=True, text=True, timeout=30,
    )
finally:
    confinement.release()
print(done.stdout.strip())
"""


@root_only
def test_a_mount_below_usr_is_read_only_in_the_jail_too(tmp_path: Path) -> None:
    """/usr is bound with its submounts and remounted read-only, which made only the top
    mount read-only: a file system mounted below it (a /usr/local partition) stayed
    writable, and husk-runtime's QEMU (CAP_DAC_OVERRIDE) could plant programs there that
    the host's root runs. In a mount namespace of the test's own, on /usr/local/src."""
    target = "/usr/local/src"
    assert os.path.isdir(target)
    done = subprocess.run(
        [*UNSHARE_MOUNTS, sys.executable, "-c", _SUBMOUNT_PROBE, target],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refused"
    assert not os.path.exists(f"{target}/planted")


_ROOTLESS_PROC_PROBE = """
import subprocess, sys, tempfile
from pathlib import Path
from husk.vm import jail
victim = subprocess.Popen(["sleep", "60"])
scratch = Path(tempfile.mkdtemp())
confinement = jail.confine(
    name="proc-test", mount_point=scratch / "jail", binary="/usr/bin/sh", read_only=[],
    shares=[], kvm=False, memory_mib=64, resolv_conf=None,
)
assert confinement.reason.startswith("rootless"), confinement.reason
try:
    done = subprocess.run(
        ["/usr/bin/sh", "-c", f"echo 1000 > /proc/{victim.pid}/oom_score_adj && echo wrote"],
        preexec_fn=confinement.preexec(), pass_fds=confinement.inherited_fds(),
        capture_output=True, text=True, timeout=30,
    )
finally:
    confinement.release()
    victim.kill()
print(done.stdout.strip() or "refused", Path(f"/proc/{victim.pid}/oom_score_adj").read_text())
"""


def _probe_as_throwaway_user(prefix: str, probe: str) -> subprocess.CompletedProcess[str]:
    """Runs Python ``probe`` (with a copy of husk importable) as a new unprivileged user,
    removed afterwards: what a rootless QEMU's jail allows its own user."""
    import shutil

    name = f"{prefix}{os.getpid() % 100000}"
    base = Path(tempfile.mkdtemp(prefix="husk-probe-"))
    base.chmod(0o755)
    shutil.copytree(Path(jail.__file__).resolve().parents[1], base / "husk")
    tools = {tool: find_tool(tool) or tool for tool in ("useradd", "userdel", "runuser")}
    subprocess.run([tools["useradd"], "--no-create-home", "--shell", "/bin/sh", name], check=True)
    try:
        return subprocess.run(
            [tools["runuser"], "-u", name, "--", "/usr/bin/python3", "-c", probe],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(base), "HOME": str(base)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        subprocess.run([tools["userdel"], name], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@root_only
def test_a_rootless_qemu_writes_nothing_through_the_hosts_proc(tmp_path: Path) -> None:
    """A user namespace may not mount a proc of its own, so rootless QEMU's jail binds the
    host's: writable, it let a QEMU raise the OOM score of every process of its user (the
    daemon's first) for the kernel to kill. Run as a throwaway unprivileged user."""
    done = _probe_as_throwaway_user("hrp", _ROOTLESS_PROC_PROBE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["refused", "0"]


_ROOTLESS_SIGNAL_PROBE = """
import os, subprocess, sys, tempfile
from pathlib import Path
from husk.vm import jail
victim = subprocess.Popen(["sleep", "60"])
# One victim per descriptor-owner attack: each would SIGKILL its own.
owned = [subprocess.Popen(["sleep", "60"]) for _ in range(4)]
# A secret in the session keyring the jailed process inherits (as QEMU inherits the daemon's).
import ctypes, resource
libc = ctypes.CDLL(None, use_errno=True)
KEY_SPEC_SESSION_KEYRING = -3
key = libc.syscall(248 if __import__("platform").machine() == "x86_64" else 217,
    b"user", b"husk-probe", b"secret", 6, KEY_SPEC_SESSION_KEYRING)
assert key > 0, ctypes.get_errno()
limits = resource.prlimit(victim.pid, resource.RLIMIT_NOFILE)
nice, cpus = os.getpriority(os.PRIO_PROCESS, victim.pid), os.sched_getaffinity(victim.pid)
scratch = Path(tempfile.mkdtemp())
confinement = jail.confine(
    name="signal-test", mount_point=scratch / "jail", binary="/usr/bin/python3", read_only=[],
    shares=[], kvm=False, memory_mib=64, resolv_conf=None,
)
assert confinement.reason.startswith("rootless"), confinement.reason
inner = '''
import ctypes, fcntl, os, signal, socket, struct, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
victim = int(sys.argv[1])
owned = [int(pid) for pid in sys.argv[2:]]
F_SETSIG, F_SETOWN_EX, F_OWNER_PID, FIOASYNC = 10, 15, 1, 0x5452
import platform, resource
X86 = platform.machine() == "x86_64"
def syscall(number, *args):
    result = libc.syscall(number, *args)
    if result < 0:
        raise OSError(ctypes.get_errno(), "syscall")
    return result
def read_key():
    # KEYCTL_SEARCH the session keyring for the key, then KEYCTL_READ it.
    key = syscall(250 if X86 else 219, 10, -3, b"user", b"husk-probe", 0)
    buffer = ctypes.create_string_buffer(64)
    syscall(250 if X86 else 219, 11, key, buffer, 64)
    assert buffer.value == b"secret"
def ioprio_of_the_user():
    # ioprio_set(IOPRIO_WHO_USER, 0: this uid, the idle class): every process of the user.
    syscall(251 if X86 else 30, 3, 0, 3 << 13)
def on_ready(fd, set_owner):
    # The kernel sends F_SETSIG's signal to the descriptor's owner once it is readable.
    set_owner(fd)
    fcntl.fcntl(fd, F_SETSIG, signal.SIGKILL)
    fcntl.ioctl(fd, FIOASYNC, struct.pack("i", 1))
def pipe_owner(set_owner):
    def call():
        read, write = os.pipe()
        on_ready(read, set_owner)
        os.write(write, b"x")
    return call
def socket_owner(request, pid):
    def call():
        one, two = socket.socketpair()
        on_ready(one.fileno(), lambda fd: fcntl.ioctl(fd, request, struct.pack("i", pid)))
        two.send(b"x")
    return call
def attempt(name, call):
    try:
        call()
        print(name, "allowed")
    except OSError as err:
        print(name, err.errno)
def ptrace():
    if libc.ptrace(16, victim, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "ptrace")
attempt("ptrace", ptrace)
attempt("kill", lambda: os.kill(victim, signal.SIGKILL))
attempt("group", lambda: os.kill(0, 0))
attempt("everyone", lambda: os.kill(-1, 0))
attempt("pidfd", lambda: os.close(os.pidfd_open(victim)))
signal.signal(signal.SIGUSR1, lambda *_: None)
attempt("itself", lambda: os.kill(os.getpid(), signal.SIGUSR1))
attempt("its-thread", lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1))
attempt("setown", pipe_owner(lambda fd: fcntl.fcntl(fd, fcntl.F_SETOWN, owned[0])))
attempt("setown-ex", pipe_owner(
    lambda fd: fcntl.fcntl(fd, F_SETOWN_EX, struct.pack("ii", F_OWNER_PID, owned[1]))
))
attempt("fiosetown", socket_owner(0x8901, owned[2]))
attempt("siocspgrp", socket_owner(0x8902, owned[3]))
attempt("setown-itself", lambda: fcntl.fcntl(0, fcntl.F_SETOWN, os.getpid()))
attempt("prlimit", lambda: resource.prlimit(victim, resource.RLIMIT_NOFILE, (3, 3)))
attempt("prlimit-itself", lambda: resource.prlimit(0, resource.RLIMIT_CORE, (0, 0)))
attempt("ioprio-user", ioprio_of_the_user)
attempt("ioprio-itself", lambda: syscall(251 if X86 else 30, 1, 0, 0))
attempt("keyring", read_key)
attempt("nice-user", lambda: os.setpriority(os.PRIO_USER, 0, 19))
attempt("nice-itself", lambda: os.setpriority(os.PRIO_PROCESS, 0, 1))
attempt("affinity", lambda: os.sched_setaffinity(victim, {min(os.sched_getaffinity(0))}))
time.sleep(0.2)
'''
try:
    done = subprocess.run(
        ["/usr/bin/python3", "-c", inner, str(victim.pid), *(str(p.pid) for p in owned)],
        preexec_fn=confinement.preexec(), pass_fds=confinement.inherited_fds(),
        capture_output=True, text=True, timeout=30,
    )
finally:
    confinement.release()
alive = ",".join(str(p.poll()) for p in [victim, *owned])
ioprio = libc.syscall(252 if __import__("platform").machine() == "x86_64" else 31, 1, victim.pid)
kept = [
    resource.prlimit(victim.pid, resource.RLIMIT_NOFILE) == limits,
    ioprio >> 13 != 3,
    os.getpriority(os.PRIO_PROCESS, victim.pid) == nice,
    os.sched_getaffinity(victim.pid) == cpus,
]
results = done.stdout.strip().replace(chr(10), ";")
print(results, done.stderr.strip(), ",".join(map(str, kept)), alive)
for p in [victim, *owned]:
    p.kill()
"""


@root_only
def test_a_rootless_qemu_signals_and_traces_none_of_its_users_processes(tmp_path: Path) -> None:
    """Rootless QEMU keeps the user's uid (in a user namespace of its own), so the kernel
    let it SIGKILL every process of that user (the daemon, the other VMs, the user's
    shell). Its seccomp filter now lets it signal only itself; tracing, refused across user
    namespaces by the kernel already, is refused by the filter too. Nor may it make
    another process a descriptor's owner (F_SETOWN, F_SETOWN_EX, FIOSETOWN, SIOCSPGRP),
    which with F_SETSIG had the kernel SIGKILL it. As a throwaway user."""
    done = _probe_as_throwaway_user("hrs", _ROOTLESS_SIGNAL_PROBE)
    assert done.returncode == 0, done.stderr
    results, kept, victim_status = done.stdout.strip().rsplit(" ", 2)
    results = results.strip()
    # Its resource limit, I/O class, priority and CPUs.
    assert kept == "True,True,True,True", f"the user's other process was changed: {results}"
    assert victim_status == "None,None,None,None,None", "the user's other process was killed"
    assert results.split(";") == [
        "ptrace 1",
        "kill 1",
        "group 1",
        "everyone 1",
        "pidfd 1",
        "itself allowed",
        "its-thread allowed",
        "setown 1",
        "setown-ex 1",
        "fiosetown 1",
        "siocspgrp 1",
        "setown-itself allowed",
        "prlimit 1",
        "prlimit-itself allowed",
        "ioprio-user 1",
        "ioprio-itself allowed",
        "keyring 1",
        "nice-user 1",
        "nice-itself allowed",
        "affinity 1",
    ]


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_signal_filter_jumps_only_inside_itself(machine: str) -> None:
    from husk.vm import signalfilter

    built = signalfilter.build(machine)
    assert built is not None
    count = len(built.instructions)
    for index, op in enumerate(built.instructions):
        if op.code == 0x06:
            continue
        assert index + 1 + max(op.jt, op.jf) < count
    assert built.instructions[count - 1].code == 0x06  # the program ends in a return
    assert signalfilter.build("mips") is None
