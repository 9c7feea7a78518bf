"""Volumes and the writable layer (issue 13): sequential write/read MB/s and small-file
create rate inside a container, beside the host and a docker engine container.

Where the bytes go, per target:

- **husk** (one busybox container, one VM): a named volume and a bind mount (both host
  directories shared into the VM over 9p, served by QEMU), the writable layer (the
  container's ``upper.ext4`` on virtio-blk) and a tmpfs (guest RAM, for reference);
- **docker** (peer): Debian's dockerd 20.10 started by the bench inside a network
  namespace of its own, exactly as bench_networks.py does (``unshare --net``, its own
  data/exec roots and socket under the scratch directory), one container of the same
  busybox image (loaded from ``husk save``) with the same four targets (overlay2 for the
  writable layer);
- **host**: the same commands in a temporary directory, for the floor.

The husk container runs ``--privileged`` only so that its root may write
``/proc/sys/vm/drop_caches`` (the I/O path is the same); the host runs busybox's sh, dd,
tar and sync like the containers, and every ``sync`` is ``sync -f DIR`` (that file
system only).

Every figure is timed where it happens with ``/proc/uptime`` around the command (in the
guest for husk, in the host kernel for docker and the host):

- write: ``dd if=/dev/zero of=D/seq bs=1M count=N conv=fsync``;
- read: ``dd if=D/seq of=/dev/null bs=1M`` after dropping the file from the caches: on
  the host with ``dd iflag=nocache count=0`` on the file that holds the bytes (the shared
  file, the overlay2 upper file, or the container's whole ``upper.ext4``), and in the husk
  guest with ``echo 3 > /proc/sys/vm/drop_caches`` when the guest allows it (the figure's
  note says when it did not: then the read is from the guest's cache);
- small files: ``tar xf`` of an archive of F files of 4 KiB (held in a tmpfs of the
  container), then ``sync``: files created per second.

Samples alternate their order between runs; the two engines run one after the other on an
otherwise idle VM set (one VM, one docker container).

    python3 bench/bench_volumes.py [--runs 3] [--quick] [--json]
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
from bench_networks import Dockerd, Husk, StepFailed
from benchlib import Figure, PartOptions, progress

SECTION = "volumes and the writable layer (issue 13)"
IMAGE = benchlib.BUSYBOX_IMAGE
VOLUME = "benchvol"
MIB = 1024 * 1024
FILE_SIZE = 4096
SEQ_MIB, QUICK_SEQ_MIB = 64, 16
FILES, QUICK_FILES = 2000, 500
# /proc/uptime ticks in 10 ms: a sample shorter than this is stretched (more MiB, more
# extractions of the archive) until it lasts this long, within the caps below.
SAMPLE_SECONDS, QUICK_SAMPLE_SECONDS = 1.0, 0.3
MAX_MIB = 1024  # on the host's disk
MAX_MIB_GUEST_RAM = 64  # a husk tmpfs lives in the guest's RAM
MAX_REPEAT = 50
ARCHIVE = "/src/files.tar"
# The four places inside a container, and what each is backed by.
TARGETS = {
    "named volume": "/vol",
    "bind mount": "/bind",
    "writable layer": "/wl",
    "tmpfs": "/tmpfs",
}
UPTIME = "$(cut -d' ' -f1 /proc/uptime)"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "dd", "tar", "sync", "seq", "cut", "rm", "mkdir", "echo")


def write_script(directory: str, mib: int) -> str:
    return (
        f"rm -f {directory}/seq; sync -f {directory}; a={UPTIME}; "
        f"dd if=/dev/zero of={directory}/seq bs={MIB} count={mib} conv=fsync 2>/dev/null; "
        f"rc=$?; b={UPTIME}; echo $a $b $rc"
    )


def read_script(directory: str, drop_guest: bool) -> str:
    """Prints ``start end status dropped|cached``."""
    drop = (
        f"sync -f {directory}; if echo 3 2>/dev/null >/proc/sys/vm/drop_caches; "
        "then c=dropped; else c=cached; fi; "
        if drop_guest
        else "c=dropped; "
    )
    return (
        f"{drop}a={UPTIME}; dd if={directory}/seq of=/dev/null bs={MIB} 2>/dev/null; "
        f"rc=$?; b={UPTIME}; echo $a $b $rc $c"
    )


def small_files_script(directory: str, archive: str, repeat: int) -> str:
    """Extracts ``archive`` ``repeat`` times (into small/1, small/2, ...), then syncs."""
    return (
        f"rm -rf {directory}/small; mkdir {directory}/small; sync -f {directory}; a={UPTIME}; "
        f"rc=0; for i in $(seq {repeat}); do mkdir {directory}/small/$i && "
        f"tar xf {archive} -C {directory}/small/$i || rc=1; done; sync -f {directory}; "
        f"b={UPTIME}; echo $a $b $rc"
    )


def cleanup_script(directory: str) -> str:
    return f"rm -rf {directory}/seq {directory}/small"


def parse_timed(output: str) -> tuple[float, list[str]]:
    """Seconds between the two uptimes of a ``start end status [extra...]`` line, and the
    extra words; a non-zero status or no measurable time is a failure."""
    lines = output.strip().splitlines()
    words = lines[-1].split() if lines else []
    if len(words) < 3 or words[2] != "0":
        raise StepFailed(f"command failed: {output.strip()[-300:]!r}")
    try:
        seconds = float(words[1]) - float(words[0])
    except ValueError:
        raise StepFailed(f"no uptimes in {output.strip()[-300:]!r}") from None
    if seconds <= 0:
        raise StepFailed(f"took no measurable time: {output.strip()!r}")
    return seconds, words[3:]


def make_archive(path: Path, count: int) -> None:
    """``small/fNNNNN``: ``count`` files of 4 KiB each (a little varied, not all zeros)."""
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("small")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for index in range(count):
            info = tarfile.TarInfo(f"small/f{index:05d}")
            info.size = FILE_SIZE
            info.mode = 0o644
            data = (f"{index:08d}" * (FILE_SIZE // 8)).encode()
            tar.addfile(info, io.BytesIO(data))


def drop_host_cache(path: Path) -> None:
    """Evicts one file's pages from the host's page cache (GNU dd; affects nobody else)."""
    subprocess.run(
        ["dd", f"if={path}", "iflag=nocache", "count=0", "status=none"],
        capture_output=True,
        timeout=60,
        check=False,
    )


# -- one place to measure ---------------------------------------------------------------


@dataclass
class Place:
    """A directory reachable by a shell (guest, container or host) and its figures."""

    engine: str  # husk, docker, host
    target: str
    directory: str
    sh: Callable[[str], str]
    archive: str
    host_files: Callable[[], list[Path]] = lambda: []
    drop_guest: bool = False
    write: list[float] = field(default_factory=list)
    read: list[float] = field(default_factory=list)
    files: list[float] = field(default_factory=list)
    max_mib: int = MAX_MIB
    mib: int = 0
    repeat: int = 1
    cached_reads: int = 0
    status: str = ""

    @property
    def label(self) -> str:
        return f"{self.engine}, {self.target}"

    def calibrate(self, mib: int, seconds: float) -> None:
        """Sizes for samples of at least ``seconds`` (unrecorded runs)."""
        if self.status:
            return
        try:
            self.mib = min(mib, self.max_mib)
            while True:
                took, _ = parse_timed(self.sh(write_script(self.directory, self.mib)))
                if took >= seconds or self.mib >= self.max_mib:
                    break
                self.mib = min(self.max_mib, self.mib * 4)
            took, _ = parse_timed(self.sh(small_files_script(self.directory, self.archive, 1)))
            self.repeat = max(1, min(MAX_REPEAT, math.ceil(seconds / took)))
            self.sh(cleanup_script(self.directory))
            progress(f"volumes: {self.label}: samples of {self.mib} MiB, {self.repeat} x tar")
        except (StepFailed, subprocess.SubprocessError, OSError, ValueError) as err:
            self.fail(err)

    def sample(self, count: int) -> None:
        if self.status:
            return
        try:
            seconds, _ = parse_timed(self.sh(write_script(self.directory, self.mib)))
            self.write.append(self.mib * MIB / seconds / benchlib.MB)
            for path in self.host_files():
                drop_host_cache(path)
            seconds, extra = parse_timed(self.sh(read_script(self.directory, self.drop_guest)))
            self.read.append(self.mib * MIB / seconds / benchlib.MB)
            if extra[:1] != ["dropped"]:
                self.cached_reads += 1
            script = small_files_script(self.directory, self.archive, self.repeat)
            seconds, _ = parse_timed(self.sh(script))
            self.files.append(count * self.repeat / seconds)
            self.sh(cleanup_script(self.directory))
        except (StepFailed, subprocess.SubprocessError, OSError, ValueError) as err:
            self.fail(err)

    def fail(self, err: Exception) -> None:
        self.status = f"failed: {err}"[:400]
        progress(f"volumes: {self.label}: {self.status}")


def husk_places(husk: Husk, scratch: Path) -> list[Place]:
    bind = scratch / "husk-bind"
    bind.mkdir()
    shutil.copy(scratch / "files.tar", bind / "files.tar")
    husk(
        "run", "-d", "--name", "vb", "--privileged", "-v", f"{VOLUME}:/vol", "-v", f"{bind}:/bind",
        "--tmpfs", "/tmpfs", "--tmpfs", "/src", IMAGE, "sleep", "36000",
    )  # fmt: skip
    husk.sh("vb", f"mkdir -p /wl && cp /bind/files.tar {ARCHIVE} && rm /bind/files.tar")
    volume = Path(husk("volume", "inspect", "-f", "{{.Mountpoint}}", VOLUME).strip())
    full_id = husk("inspect", "-f", "{{.Id}}", "vb").strip()

    def upper() -> list[Path]:
        return [p for p in (husk.root / "data").rglob("upper.ext4") if full_id in str(p)]

    host_files = {
        "named volume": lambda: [volume / "seq"],
        "bind mount": lambda: [bind / "seq"],
        "writable layer": upper,
        "tmpfs": lambda: [],
    }
    return [
        Place(
            "husk",
            target,
            directory,
            lambda script: husk.sh("vb", script),
            ARCHIVE,
            host_files[target],
            drop_guest=True,
            max_mib=MAX_MIB_GUEST_RAM if target == "tmpfs" else MAX_MIB,
        )
        for target, directory in TARGETS.items()
    ]


def docker_places(dockerd: Dockerd, husk: Husk, scratch: Path) -> list[Place]:
    archive = scratch / "busybox.tar"
    husk("save", "-o", str(archive), IMAGE)
    dockerd.start()
    dockerd("load", "-i", str(archive))
    bind = scratch / "docker-bind"
    bind.mkdir()
    shutil.copy(scratch / "files.tar", bind / "files.tar")
    dockerd(
        "run", "-d", "--name", "vb", "--network", "none", "-v", f"{VOLUME}:/vol",
        "-v", f"{bind}:/bind", "--tmpfs", "/tmpfs", "--tmpfs", "/src", IMAGE, "sleep", "36000",
    )  # fmt: skip
    dockerd.sh("vb", f"mkdir -p /wl && cp /bind/files.tar {ARCHIVE} && rm /bind/files.tar")
    volume = Path(dockerd("volume", "inspect", "-f", "{{.Mountpoint}}", VOLUME).strip())
    upper = Path(dockerd("inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", "vb").strip())
    host_files = {
        "named volume": lambda: [volume / "seq"],
        "bind mount": lambda: [bind / "seq"],
        "writable layer": lambda: [upper / "wl" / "seq"],
        "tmpfs": lambda: [],
    }
    return [
        Place(
            "docker",
            target,
            directory,
            lambda script: dockerd.sh("vb", script),
            ARCHIVE,
            host_files[target],
        )
        for target, directory in TARGETS.items()
    ]


def host_place(scratch: Path) -> Place:
    """The host's kernel and disk with the containers' tools: busybox's sh, dd, tar, sync."""
    directory = scratch / "host-dir"
    directory.mkdir()
    tools = scratch / "busybox-bin"
    tools.mkdir()
    for applet in BUSYBOX_APPLETS:
        (tools / applet).symlink_to(BUSYBOX)
    env = {"PATH": str(tools), "LC_ALL": "C"}

    def sh(script: str) -> str:
        result = subprocess.run(
            [BUSYBOX, "sh", "-c", script],
            capture_output=True,
            timeout=600,
            check=False,
            text=True,
            env=env,
        )
        if result.returncode != 0:
            raise StepFailed(f"host sh exited {result.returncode}: {result.stderr[-300:]}")
        return result.stdout

    return Place(
        "host",
        "temporary directory",
        str(directory),
        sh,
        str(scratch / "files.tar"),
        lambda: [directory / "seq"],
    )


def setup(make: Callable[[], list[Place]], engine: str) -> list[Place]:
    try:
        return make()
    except (StepFailed, subprocess.SubprocessError, OSError, ValueError) as err:
        status = f"failed: {err}"[:400]
        progress(f"volumes: {engine}: {status}")
        return [Place(engine, t, d, lambda _s: "", "", status=status) for t, d in TARGETS.items()]


def measure(options: PartOptions) -> list[Figure]:
    runs = min(2, options.runs) if options.quick else options.runs
    mib = QUICK_SEQ_MIB if options.quick else SEQ_MIB
    seconds = QUICK_SAMPLE_SECONDS if options.quick else SAMPLE_SECONDS
    count = QUICK_FILES if options.quick else FILES
    with benchlib.scratch_root("hv") as scratch:
        make_archive(scratch / "files.tar", count)
        progress("volumes: husk installation, busybox image")
        husk = Husk.create("a", scratch / "a")
        dockerd = Dockerd(scratch / "docker")
        try:
            places = [host_place(scratch)]
            places += setup(lambda: husk_places(husk, scratch), "husk")
            places += setup(lambda: docker_places(dockerd, husk, scratch), "docker")
            for place in places:
                place.calibrate(mib, seconds)
            for index in range(runs):
                for place in places if index % 2 == 0 else reversed(places):
                    progress(f"volumes: {place.label} {index + 1}/{runs}")
                    place.sample(count)
        finally:
            dockerd.stop()
            husk.stop()
    left = benchlib._processes_of(scratch)
    if left:
        progress(f"volumes: WARNING: {len(left)} process(es) survived the clean-up: {left}")
    return figures(places, count)


def figures(places: list[Place], count: int) -> list[Figure]:
    result: list[Figure] = []
    for place in places:
        peer = place.engine == "docker"
        where = {"husk": "husk exec vb", "docker": "docker exec vb", "host": ""}[place.engine]
        prefix = f"{where} sh -c '" if where else "sh -c '"
        directory = place.directory
        read_note = "host page cache of the file dropped (dd iflag=nocache)"
        if place.engine == "husk":
            read_note += "; guest page cache dropped (echo 3 > /proc/sys/vm/drop_caches)"
            if place.cached_reads:
                read_note = (
                    f"{place.cached_reads} of {len(place.read)} read(s) from the guest's cache "
                    "(drop_caches refused in the guest)"
                )
        if place.target == "tmpfs":
            read_note = "from memory (tmpfs)"
        for kind, unit, samples, command, note in (
            (
                "sequential write",
                "MB/s",
                place.write,
                f"dd if=/dev/zero of={directory}/seq bs=1M count={place.mib} conv=fsync",
                f"{place.mib} MiB, timed with /proc/uptime",
            ),
            (
                "sequential read",
                "MB/s",
                place.read,
                f"dd if={directory}/seq of=/dev/null bs=1M",
                read_note,
            ),
            (
                "small-file create",
                "files/s",
                place.files,
                f"for i in $(seq {place.repeat}); do mkdir {directory}/small/$i; "
                f"tar xf files.tar -C {directory}/small/$i; done; sync -f {directory}",
                f"{place.repeat} x {count} files of 4 KiB, sync included",
            ),
        ):
            result.append(
                Figure(
                    SECTION,
                    f"{kind}, {place.label}",
                    unit,
                    samples,
                    f"{prefix}{command}'",
                    peer=peer,
                    note=note,
                    status=place.status if not samples else "",
                )
            )
    return result


if __name__ == "__main__":
    benchlib.part_main("volumes", __doc__ or "", measure, default_runs=3)
