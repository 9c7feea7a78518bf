"""The container cannot reach the guest agent: attacks by a hostile image and a root workload.

Each test boots the real bundle with a hostile busybox root (built here, with
gcc) and tries, as an attacker would, to run code in the agent, reach the
agent's files, use the VM's devices or escape the container's namespaces.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from guestfs import busybox_tree
from husk.agent.client import ProcessSpec
from husk.guest.protocol import MsgType
from husk.sandbox.sandbox import Sandbox
from test_guest import run, run_workload

pytestmark = pytest.mark.vm

# Docker's default capability set: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID
# SETPCAP NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP.
DOCKER_CAPS = "00000000a80425fb"
# What the archive child may use to extract: CHOWN DAC_OVERRIDE FOWNER FSETID MKNOD.
PUT_CAPS = "000000000800001b"
# Top-level entries of the agent's initramfs root that no test image has (the hostile
# image has a /husk/lib of its own, so /husk alone proves nothing).
AGENT_MARKERS = ("init", "mnt")

NSS_MODULE = r"""
#include <fcntl.h>
#include <unistd.h>
/* Runs as soon as glibc loads this module for an NSS lookup. */
__attribute__((constructor)) static void pwned(void) {
    const char *paths[] = {"/nss-pwned", "/tmp/nss-pwned"};
    for (int i = 0; i < 2; i++) {
        int fd = open(paths[i], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            (void)write(fd, "pwned\n", 6);
            close(fd);
        }
    }
}
"""

IMPORT_PAYLOAD = """
with open("/import-pwned", "w") as marker:
    marker.write(__file__)
raise ImportError("the container's module ran")
"""

CHROOT_ESCAPE = r"""
#include <dirent.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>
/* The classic escape: chroot deeper while keeping the cwd outside, walk up, chroot there. */
int main(void) {
    mkdir("/escape-jail", 0755);
    if (chroot("/escape-jail") != 0) { perror("chroot jail"); return 2; }
    for (int i = 0; i < 64; i++) {
        if (chdir("..") != 0) { perror("chdir .."); return 3; }
    }
    if (chroot(".") != 0) { perror("chroot ."); return 4; }
    DIR *root = opendir("/");
    if (root == NULL) { perror("opendir /"); return 5; }
    struct dirent *entry;
    while ((entry = readdir(root)) != NULL) printf("%s\n", entry->d_name);
    return 0;
}
"""


def _compile(source: str, output: Path, *flags: str) -> None:
    src = output.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-O1", "-o", str(output), str(src), *flags], check=True)
    src.unlink()


@pytest.fixture(scope="session")
def hostile_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root with an NSS module that runs code, a chroot escape and a device node."""
    work = tmp_path_factory.mktemp("hostile")
    tree = busybox_tree(work / "root")
    (tree / "etc" / "nsswitch.conf").write_text(
        "passwd: evil files\ngroup: evil files\nshadow: evil files\nhosts: evil files\n"
    )
    module = work / "libnss_evil.so.2"
    _compile(NSS_MODULE, module, "-shared", "-fPIC")
    for libdir in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib"):
        (tree / libdir).mkdir(parents=True, exist_ok=True)
        (tree / libdir / module.name).write_bytes(module.read_bytes())
    _compile(CHROOT_ESCAPE, tree / "bin" / "escape", "-static")
    # Python modules the agent's CPython would find on its sys.path inside the container.
    for directory in ("husk/lib", "usr/lib/python3.11"):
        (tree / directory).mkdir(parents=True, exist_ok=True)
        for module in ("bz2", "lzma"):
            (tree / directory / f"{module}.py").write_text(IMPORT_PAYLOAD)
    data = tree / "data"
    data.mkdir()
    (data / "root-owned.txt").write_text("root's\n")
    (data / "app-owned.txt").write_text("app's\n")
    os.chown(data / "app-owned.txt", 1000, 50)  # "app" and "staff" in the image's files
    (tree / "evil").mkdir()
    os.mknod(tree / "evil" / "mem", 0o020666, os.makedev(1, 1))  # /dev/mem, shipped by the image
    image = work / "hostile.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(tree)], check=True)
    return image


@pytest.fixture
def vm_state(tmp_path: Path, guest_bundle: object) -> Path:
    return tmp_path / "vm"


async def _sh(box: Sandbox, script: str, user: str = "") -> tuple[int, str, str]:
    process = await box.client.exec(ProcessSpec(argv=["sh", "-c", script], user=user))
    code, out, err = await process.collect()
    return code, out.decode(errors="replace"), err.decode(errors="replace")


def _status_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def test_cp_out_never_runs_the_images_nss_module(hostile_disk: Path, vm_state: Path) -> None:
    async def body(box: Sandbox) -> None:
        await box.client.run(ProcessSpec(argv=["sleep", "300"]))
        get = await box.client.archive("/data", "get")
        code, out, err = await get.collect()
        assert code == 0, err
        with tarfile.open(fileobj=io.BytesIO(out)) as tar:
            members = {m.name: m for m in tar.getmembers()}
        app, root = members["data/app-owned.txt"], members["data/root-owned.txt"]
        assert (app.uid, app.gid, root.uid, root.gid) == (1000, 50, 0, 0)
        # Owners travel as numbers only: no name was looked up in the container's files.
        assert {(m.uname, m.gname) for m in members.values()} == {("", "")}
        stat = await box.client.archive("/data/app-owned.txt", "stat")
        assert (await stat.wait()) == 0
        # The first check in this VM: busybox itself would load the module on a name lookup.
        code, listing, _ = await _sh(box, "ls / /tmp")
        assert code == 0
        assert "nss-pwned" not in listing, "the image's NSS module ran during cp"

    run(hostile_disk, vm_state, body)


def test_cp_in_never_imports_the_containers_python(hostile_disk: Path, vm_state: Path) -> None:
    """A bz2 or xz stream makes tarfile import a module the agent does not ship."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2") as tar:
        info = tarfile.TarInfo("compressed.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bz\n"))
    oversized = io.BytesIO()
    with tarfile.open(fileobj=oversized, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big-header.txt")
        info.pax_headers = {"comment": "c" * (2 * 1024 * 1024)}
        tar.addfile(info)

    async def body(box: Sandbox) -> None:
        await box.client.run(ProcessSpec(argv=["sleep", "300"]))
        put = await box.client.archive("/tmp", "put")
        await put.write_stdin(buffer.getvalue())
        await put.close_stdin()
        code, _, err = await put.collect()
        assert code != 0 and b"bz2" in err, err  # a clear error: no such module here
        _, listing, _ = await _sh(box, "ls /")
        assert "import-pwned" not in listing.split(), "the container's module ran in cp"
        # A header claiming more than 1 MiB is refused, not read into the child's memory.
        put = await box.client.archive("/tmp", "put")
        await put.write_stdin(oversized.getvalue())
        await put.close_stdin()
        code, _, err = await put.collect()
        assert code != 0 and b"over the 1048576 byte limit" in err, err

    run(hostile_disk, vm_state, body)


def test_root_workload_cannot_reach_the_agents_files(hostile_disk: Path, vm_state: Path) -> None:
    async def body(box: Sandbox) -> None:
        await box.client.run(ProcessSpec(argv=["sleep", "300"]))
        code, listing, err = await _sh(box, "ls -a /proc/1/root/")
        assert code == 0, err
        entries = listing.split()
        assert "www" in entries and "data" in entries  # the container's own root
        assert not set(AGENT_MARKERS) & set(entries), listing
        # No process the container can see has its root anywhere else.
        code, leaks, _ = await _sh(
            box,
            "for p in /proc/[0-9]*; do"
            " test -e $p/root/husk/init.py && echo LEAK $p;"
            " test -e $p/cwd/husk/init.py && echo LEAK-CWD $p; done; true",
        )
        assert leaks == ""
        # ".." above the root, and chroot(2) with CAP_SYS_CHROOT then "..": both land in
        # the container's root again.
        code, above, _ = await _sh(box, "cd /../../.. && ls -a")
        assert "www" in above.split() and not set(AGENT_MARKERS) & set(above.split())
        code, escaped, err = await _sh(box, "/bin/escape")
        assert code == 0, err
        entries = escaped.split()
        assert "www" in entries and not set(AGENT_MARKERS) & set(entries), escaped
        # Paths named by the mount table lead nowhere outside the container.
        code, mountinfo, _ = await _sh(box, "cat /proc/self/mountinfo")
        named = {
            option.split("=", 1)[1]
            for line in mountinfo.splitlines()
            for option in line.split()[-1].split(",")
            if option.split("=", 1)[0] in ("lowerdir", "upperdir", "workdir")
        }
        assert named, mountinfo
        for path in sorted(named):
            for candidate in path.split(":"):
                code, _, _ = await _sh(box, f"test -e {candidate}/husk || test -e {candidate}/bin")
                assert code != 0, f"{candidate} from mountinfo is reachable"
        # Try to destroy the agent's code through every path; the agent keeps working,
        # including code it imports only now (the archive module).
        await _sh(box, "rm -rf /proc/*/root/husk /proc/*/root/usr/lib/python3* 2>/dev/null; true")
        get = await box.client.archive("/etc/passwd", "get")
        code, out, err = await get.collect()
        assert code == 0 and out, err

    run(hostile_disk, vm_state, body)


def test_workload_is_pid_1_and_sees_only_the_container(hostile_disk: Path, vm_state: Path) -> None:
    async def body(box: Sandbox) -> None:
        await box.client.run(ProcessSpec(argv=["sleep", "301"]))
        code, out, err = await _sh(
            box, "sleep 302 & for p in /proc/[0-9]*; do echo ${p#/proc/} $(cat $p/comm); done"
        )
        assert code == 0, err
        processes = dict(line.split(" ", 1) for line in out.splitlines())
        assert processes["1"] == "sleep"
        assert set(processes.values()) <= {"sleep", "sh"}, out  # no agent, no kernel threads
        code, cmdline, _ = await _sh(box, "tr '\\0' ' ' </proc/1/cmdline")
        assert cmdline.strip() == "sleep 301"
        # `top` lists the same processes, with the container's own pids.
        figures = await box.client.request(MsgType.STATS, {"processes": True})
        rows = figures["processes"]
        by_pid = {row["pid"]: row["cmd"] for row in rows}
        assert by_pid.get(1) == "sleep 301", rows
        assert "sleep 302" in by_pid.values()
        assert not any("python" in cmd or "husk" in cmd for cmd in by_pid.values()), rows
        assert figures["pids"] == len(rows)

    run(hostile_disk, vm_state, body)


def test_capabilities_are_dockers_default_set(hostile_disk: Path, vm_state: Path) -> None:
    async def body(box: Sandbox) -> None:
        await box.client.run(ProcessSpec(argv=["sleep", "300"]))
        for target in ("/proc/1/status", "/proc/self/status"):
            code, out, err = await _sh(box, f"cat {target}")
            assert code == 0, err
            fields = _status_fields(out)
            assert fields["CapBnd"] == DOCKER_CAPS, target
            assert fields["CapPrm"] == fields["CapEff"] == DOCKER_CAPS, target
            assert fields["CapInh"] == fields["CapAmb"] == "0000000000000000", target
        code, out, _ = await _sh(box, "cat /proc/self/status", user="1000")
        fields = _status_fields(out)
        assert fields["CapBnd"] == DOCKER_CAPS
        assert fields["CapPrm"] == fields["CapEff"] == "0000000000000000"
        # No new user namespace, where the process would get every capability back.
        code, _, err = await _sh(box, "unshare -U -r true")
        assert code != 0, "a root workload created a user namespace"

    run(hostile_disk, vm_state, body)


def test_devices_beyond_runcs_default_set_are_unusable(hostile_disk: Path, vm_state: Path) -> None:
    script = r"""
    usable() { if head -c 1 "$1" >/dev/null; then echo "USABLE $1"; fi; }
    major_minor() { cat "$1" | tr ':' ' '; }
    mknod /tmp/vda b $(major_minor /sys/block/vda/dev) && usable /tmp/vda
    for port in /sys/class/virtio-ports/*; do
        mknod /tmp/port c $(major_minor $port/dev) && (exec 3<>/tmp/port) && echo "USABLE port"
        rm -f /tmp/port
    done
    mknod /tmp/mem c 1 1 && usable /tmp/mem
    mknod /tmp/kmsg c 1 11 && usable /tmp/kmsg
    usable /evil/mem
    echo fine >/dev/null && head -c 4 /dev/urandom | wc -c
    """

    async def body(box: Sandbox) -> None:
        await box.client.run(ProcessSpec(argv=["sleep", "300"]))
        _, out, err = await _sh(box, script)
        assert "USABLE" not in out, out
        assert out.strip() == "4", (out, err)  # the default devices still work
        # mknod itself is allowed (Docker's MKNOD); every open is refused.
        assert "mknod" not in err, err
        assert err.count("Operation not permitted") >= 5, err

    run(hostile_disk, vm_state, body)


def test_kernel_settings_are_read_only(hostile_disk: Path, vm_state: Path) -> None:
    async def body(box: Sandbox) -> None:
        await box.client.run(ProcessSpec(argv=["sleep", "300"]))
        _, out, _ = await _sh(
            box,
            "echo '|/bin/sh -c id' >/proc/sys/kernel/core_pattern && echo WROTE-CORE;"
            " echo 1 >/proc/sys/kernel/sysrq && echo WROTE-SYSRQ;"
            " echo h >/proc/sysrq-trigger && echo WROTE-TRIGGER;"
            " echo x >/sys/kernel/uevent_helper && echo WROTE-UEVENT;"
            " cat /proc/sys/kernel/core_pattern",
        )
        assert "WROTE" not in out, out
        assert out.strip() == "core"

    run(hostile_disk, vm_state, body)


def test_signals_reach_the_main_process_only(hostile_disk: Path, vm_state: Path) -> None:
    script = "trap 'echo trapped' USR1; sleep 300 & echo ready; while :; do sleep 0.1; done"

    async def body(box: Sandbox) -> None:
        workload = await box.client.run(ProcessSpec(argv=["sh", "-c", script]))
        seen = b""
        output = workload.output()
        async for _stream, data in output:
            seen += data
            if b"ready" in seen:
                break
        await workload.signal(signal.SIGUSR1)
        async for _stream, data in output:
            seen += data
            if b"trapped" in seen:
                break
        code, out, _ = await _sh(box, "ps -o args")
        assert "sleep 300" in out, "the signal reached the workload's children too"
        # /proc/1/fd/1 is the workload's own stdout: what is written there reaches the logs.
        await _sh(box, "echo via-proc-1 >/proc/1/fd/1")
        async for _stream, data in output:
            seen += data
            if b"via-proc-1" in seen:
                break
        # PID 1 without a handler: SIGTERM is ignored, as under Docker; SIGKILL is not.
        await workload.signal(signal.SIGTERM)
        code, out, _ = await _sh(box, "sleep 0.5; tr '\\0' ' ' </proc/1/cmdline")
        assert code == 0 and out.startswith("sh -c"), out
        await workload.signal(signal.SIGKILL)
        assert await workload.wait() == 137

    run(hostile_disk, vm_state, body)


def test_archive_child_holds_only_what_it_needs(hostile_disk: Path, vm_state: Path) -> None:
    payload = b"x" * 4000
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("put.txt")
        info.size = len(payload)
        info.uid, info.gid, info.uname, info.gname = 1234, 5678, "root", "root"
        tar.addfile(info, io.BytesIO(payload))
    stream = buffer.getvalue()
    find_child = (
        "for p in /proc/[0-9]*; do"
        ' if [ "$(cat $p/comm 2>/dev/null)" = python3.11 ]; then cat $p/status; fi; done'
    )

    async def body(box: Sandbox) -> None:
        await box.client.run(ProcessSpec(argv=["sleep", "300"]))
        put = await box.client.archive("/tmp", "put")
        await put.write_stdin(stream[:2048])  # the child now waits for the rest
        found: dict[str, Any] = {}
        for _ in range(50):
            _, out, _ = await _sh(box, find_child)
            found = _status_fields(out)
            if "CapEff" in found:
                break
        assert found.get("CapEff") == PUT_CAPS, found
        assert found.get("CapPrm") == PUT_CAPS, found
        assert found.get("NoNewPrivs") == "1", found
        assert found["Uid"].split()[0] == "0"
        await put.write_stdin(stream[2048:])
        await put.close_stdin()
        code, _, err = await put.collect()
        assert code == 0, err
        _, out, _ = await _sh(box, "stat -c '%u:%g %s' /tmp/put.txt")
        assert out.strip() == f"1234:5678 {len(payload)}"  # numeric owners, not the names

    run(hostile_disk, vm_state, body)


def test_exec_and_workload_basics_survive_the_namespaces(
    hostile_disk: Path, vm_state: Path
) -> None:
    async def body(box: Sandbox) -> None:
        code, out, err = await run_workload(
            box, ["sh", "-c", "cd /tmp && pwd && hostname && echo $$ && id -u"], user="0:0"
        )
        assert (code, err) == (0, b"")
        assert out.decode().split() == ["/tmp", "guest-test", "1", "0"]

    run(hostile_disk, vm_state, body)


def test_init_forwards_signals_and_reaps_orphans(hostile_disk: Path, vm_state: Path) -> None:
    """``init: true`` in RUN (docker run --init): a reaping init is PID 1, the workload 2."""
    script = "echo pid=$$; (sleep 0.2 &); sleep 300"

    async def body(box: Sandbox) -> None:
        spec = ProcessSpec(argv=["sh", "-c", script]).body()
        workload = await box.client._start(MsgType.RUN, {**spec, "init": True})
        seen = b""
        async for _stream, data in workload.output():
            seen += data
            if b"\n" in seen:
                break
        assert seen == b"pid=2\n"
        await asyncio.sleep(1.0)  # the orphaned `sleep 0.2` has exited by now
        _, stats, _ = await _sh(box, "cat /proc/[0-9]*/stat")
        states = {line.rsplit(")", 1)[1].split()[0] for line in stats.splitlines()}
        assert "Z" not in states, stats  # the init reaped it
        _, status, _ = await _sh(box, "cat /proc/1/status")
        fields = _status_fields(status)
        assert fields["CapEff"] == fields["CapPrm"] == DOCKER_CAPS  # no more than the workload
        assert fields["NoNewPrivs"] == "1"
        _, stat, _ = await _sh(box, "cat /proc/2/stat")
        _state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        assert (ppid, pgrp) == ("1", "2")  # the init's child, in a process group of its own
        _, fds, _ = await _sh(box, "ls /proc/1/fd")
        assert fds.split() == ["0", "1", "2"]  # nothing of the agent's stays open in it
        # TERM reaches the shell through the init (PID 1 alone would ignore it).
        await workload.signal(signal.SIGTERM)
        assert await workload.wait() == 143

    run(hostile_disk, vm_state, body)


def test_capability_hook_and_privileged(hostile_disk: Path, vm_state: Path) -> None:
    """RUN's optional cap_add / cap_drop / privileged (for docker run's flags, issue 18)."""

    async def status(box: Sandbox, path: str) -> dict[str, str]:
        _, out, _ = await _sh(box, f"cat {path}")
        return _status_fields(out)

    async def adjusted(box: Sandbox) -> None:
        spec = ProcessSpec(argv=["sleep", "300"]).body()
        await box.client._start(MsgType.RUN, {**spec, "cap_drop": ["ALL"], "cap_add": ["CHOWN"]})
        for path in ("/proc/1/status", "/proc/self/status"):  # execs get the same set
            fields = await status(box, path)
            assert fields["CapBnd"] == fields["CapEff"] == "0000000000000001", path

    async def privileged(box: Sandbox) -> None:
        spec = ProcessSpec(argv=["sleep", "300"]).body()
        await box.client._start(MsgType.RUN, {**spec, "privileged": True})
        fields = await status(box, "/proc/self/status")
        assert fields["CapEff"] == fields["CapBnd"] and int(fields["CapBnd"], 16) >> 21 & 1
        script = "head -c 1 /evil/mem | wc -c; echo 1 >/proc/sys/kernel/sysrq"
        code, out, err = await _sh(box, script)
        assert (code, out.strip()) == (0, "1"), err  # every device, /proc/sys writable

    run(hostile_disk, vm_state, adjusted)
    run(hostile_disk, vm_state.with_name("vm2"), privileged)
