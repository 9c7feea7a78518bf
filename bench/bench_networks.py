"""Container networks (issue 12): TCP throughput and latency between containers, beside docker.

One paired run on this machine, everything inside VMs or network namespaces the bench
creates, every socket on 127.0.0.1 or inside them:

- **husk, user network**: two busybox containers on ``husk network create``; frames go
  guest → virtio-net → QEMU ``-netdev socket`` → the user-space switch → the other VM.
- **docker** (peer): Debian's dockerd 20.10 started by the bench inside a new network
  namespace (``unshare -n``, ``lo`` up first, ``--iptables=false``, its own data, exec
  and pid paths and socket under the scratch directory), a ``docker network create``
  bridge *in that namespace* and two containers of the same busybox image (loaded from
  ``husk save``). The host's own network namespace is never touched.
- **husk, WireGuard overlay**: two husk daemons (two data/run directories, as two hosts
  would be), one container each, joined with ``husk network overlay attach``; the
  tunnel's UDP goes through each daemon's gateway relay over 127.0.0.1.

Each pair is measured with the same busybox commands: throughput is ``dd if=/dev/zero
bs=64k count=N | nc SERVER 5001`` timed inside the client's guest (``/proc/uptime``
around it) against a server that discards (``nc -l -p 5001 >/dev/null``, restarted per
connection, its stdin a FIFO that never ends: busybox nc closes the connection as soon as
its stdin ends), N calibrated per path so one sample takes a few seconds; latency is the
average of ``ping -c 20 -i 0.2 SERVER``. Runs alternate between the paths. Finally,
``husk run --rm --network N busybox true`` against ``husk run --rm busybox true``,
interleaved: what a user network adds to a start.

podman is not measured: see PODMAN_STATUS (why, in one line).

    python3 bench/bench_networks.py [--runs 5] [--quick] [--json]
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
from benchlib import Figure, PartOptions, progress

SECTION = "container networks (issue 12)"
IMAGE = benchlib.BUSYBOX_IMAGE
NETWORK = "benchnet"
DOCKER_NETWORK = "benchnet"
PORT = 5001
BLOCK = 64 * 1024
TIMEOUT = 600.0
SAMPLE_SECONDS = 3.0  # what one throughput sample should take
QUICK_SAMPLE_SECONDS = 1.0
CALIBRATION_BLOCKS = 32  # 2 MiB: the first, unrecorded transfer of each path
CALIBRATION_SECONDS = 0.5  # a shorter calibration transfer is mostly set-up: try 8x more
MIN_BLOCKS, MAX_BLOCKS = 16, 16384  # 1 MiB .. 1 GiB
PINGS, PING_INTERVAL = 20, 0.2
OVERLAY_IP_A, OVERLAY_IP_B = "10.200.0.1", "10.200.0.2"
DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
DOCKER = shutil.which("docker") or "/usr/local/bin/docker"
DOCKERD_DEADLINE = 60.0
HANDSHAKE_DEADLINE = 120.0
START_RUNS_PER_RUN = 2  # starts are short: twice as many pairs as transfer runs

# The server: nc's stdin is a FIFO the shell holds open for writing too, so it never ends
# (busybox nc drops the connection when its stdin ends); a fresh nc per connection.
SERVER_SCRIPT = (
    f"mkfifo /tmp/never; exec 3<>/tmp/never; while true; do nc -l -p {PORT} <&3 >/dev/null; done"
)
PING_RE = re.compile(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+)")

PODMAN_STATUS = (
    "not measured: podman 4.3 here networks through CNI, which bind-mounts each container's "
    "namespace under the host's /run/netns and keeps IPAM state in /var/lib/cni (outside any "
    "namespace the bench makes); tried under nsenter into a bench-made namespace, the bridge "
    'came up there, but the /run/netns bind mounts do not hold on this host ("unknown FS '
    'magic on /run/netns/netns-…: ef53", 2 of 3 containers failed)'
)


class StepFailed(RuntimeError):
    pass


def client_script(server: str, blocks: int) -> str:
    """Prints the guest's uptime before and after sending ``blocks`` x 64 KiB to ``server``."""
    return (
        "a=$(cut -d' ' -f1 /proc/uptime); "
        f"dd if=/dev/zero bs={BLOCK} count={blocks} 2>/dev/null | nc {server} {PORT}; "
        "rc=$?; b=$(cut -d' ' -f1 /proc/uptime); echo $a $b $rc"
    )


def ping_script(server: str) -> str:
    return f"ping -c {PINGS} -i {PING_INTERVAL} {server}"


def parse_transfer(output: str, blocks: int) -> float:
    """MB/s from :func:`client_script`'s output."""
    words = output.split()
    if len(words) < 3 or words[-1] != "0":
        raise StepFailed(f"transfer failed: {output.strip()[-300:]!r}")
    seconds = float(words[-2]) - float(words[-3])
    if seconds <= 0:
        raise StepFailed(f"transfer took no measurable time: {output.strip()!r}")
    return blocks * BLOCK / seconds / benchlib.MB


def parse_ping(output: str) -> float:
    """busybox ping's average round trip, ms."""
    match = PING_RE.search(output)
    if match is None:
        raise StepFailed(f"no round-trip line in ping's output: {output.strip()[-300:]!r}")
    return float(match.group(2))


def blocks_for(rate_mb_s: float, seconds: float) -> int:
    wanted = int(rate_mb_s * benchlib.MB * seconds / BLOCK)
    return max(MIN_BLOCKS, min(MAX_BLOCKS, wanted))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads), 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(argv: list[str], env: dict[str, str], timeout: float = TIMEOUT) -> str:
    result = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise StepFailed(
            f"{' '.join(argv[-6:])[:120]} exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()[-1500:]}"
        )
    return result.stdout.decode(errors="replace")


# -- the two engines -------------------------------------------------------------------


@dataclass
class Husk:
    """One isolated husk installation (this checkout's sources) and its on-demand daemon."""

    name: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    stopped: bool = False

    @classmethod
    def create(cls, name: str, root: Path) -> Husk:
        benchlib.link_bundle(root)
        benchlib.import_busybox(root)
        env = benchlib.husk_env(root)
        env["PYTHONPATH"] = str(benchlib.REPO_ROOT / "src")
        return cls(name, root, env)

    def __call__(self, *args: str, timeout: float = TIMEOUT) -> str:
        argv = [sys.executable, "-c", "from husk.cli.main import main; main()", *args]
        return run(argv, self.env, timeout)

    def timed(self, *args: str) -> float:
        started = time.perf_counter()
        self(*args)
        return time.perf_counter() - started

    def sh(self, container: str, script: str, timeout: float = 300) -> str:
        return self("exec", container, "sh", "-c", script, timeout=timeout)

    def address(self, container: str, network: str) -> str:
        out = self("inspect", "--format", "{{json .NetworkSettings.Networks}}", container)
        networks: dict[str, Any] = json.loads(out)
        return str(networks[network]["IPAddress"])

    def lan_cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of this installation's switch and of its QEMUs (together)."""
        used: dict[str, float] = {}
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = int(json.loads((self.root / "run" / "switch.json").read_text())["pid"])
            used["switch"] = cpu_seconds(pid)
        qemus = benchlib.qemu_pids_under(self.root)
        if qemus:
            used["QEMUs"] = sum(cpu_seconds(pid) for pid in qemus)
        return used

    def daemon_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.root / "run" / "husk.pid").read_text().strip())
        return None

    def stop(self) -> None:
        """Containers, daemon and switch (the switch outlives a daemon by design); once (a
        second ``husk ps`` would start a daemon again)."""
        if self.stopped:
            return
        self.stopped = True
        with contextlib.suppress(StepFailed, subprocess.SubprocessError, OSError):
            ids = self("ps", "-aq", timeout=60).split()
            if ids:
                self("rm", "-f", *ids, timeout=120)
        run_dir = self.root / "run"
        with contextlib.suppress(OSError, ValueError):
            pid = int((run_dir / "husk.pid").read_text().strip())
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                benchlib.wait_until(lambda: not Path(f"/proc/{pid}").exists(), 20, "daemon exit")
        with contextlib.suppress(Exception):
            from husk.network.switchclient import stop_switch

            stop_switch(run_dir)


@dataclass
class Dockerd:
    """dockerd in a network namespace of its own (``unshare -n``), everything under ``root``."""

    root: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = f"unix://{self.root / 'docker.sock'}"
        env["DOCKER_CONFIG"] = str(self.root / "cli")
        return env

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        dockerd = [
            DOCKERD,
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--data-root",
            str(self.root / "data"),
            "--exec-root",
            str(self.root / "exec"),
            "--pidfile",
            str(self.root / "docker.pid"),
            "-H",
            f"unix://{self.root / 'docker.sock'}",
            "--storage-driver",
            "overlay2",
            "--log-level",
            "warn",
        ]
        # A new network namespace, and only that: no bridge, route or rule in the host's.
        argv = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
        with open(self.root / "dockerd.log", "ab") as log:
            self.process = subprocess.Popen(
                [*argv, *dockerd],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + DOCKERD_DEADLINE
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_text = (self.root / "dockerd.log").read_text(errors="replace")
                raise StepFailed(f"dockerd did not start: {log_text.strip()[-500:]}")
            time.sleep(0.2)
        own = os.readlink("/proc/self/ns/net")
        if os.readlink(f"/proc/{self.process.pid}/ns/net") == own:
            raise StepFailed("dockerd runs in the host's network namespace")

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(str(self.root / "docker.sock"))
                sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def __call__(self, *args: str, timeout: float = TIMEOUT) -> str:
        return run([DOCKER, *args], self.env, timeout)

    def sh(self, container: str, script: str, timeout: float = 300) -> str:
        return self("exec", container, "sh", "-c", script, timeout=timeout)

    def address(self, container: str) -> str:
        out = self("inspect", "--format", "{{json .NetworkSettings.Networks}}", container)
        networks: dict[str, Any] = json.loads(out)
        return str(networks[DOCKER_NETWORK]["IPAddress"])

    def stop(self) -> None:
        """Containers, dockerd, its containerd and shims, its mounts."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(StepFailed, subprocess.SubprocessError, OSError):
                ids = self("ps", "-aq", timeout=60).split()
                if ids:
                    self("rm", "-f", *ids, timeout=120)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        benchlib.kill_processes_of(self.root)
        for point in mounts_under(self.root):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def mounts_under(root: Path) -> list[str]:
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(str(root) + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


# -- the overlay's keys ------------------------------------------------------------------


def keypair() -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(private).decode(), base64.b64encode(public).decode()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def overlay_config(
    ip: str, private: str, host_port: int, peer_ip: str, peer_key: str, peer_port: int
) -> dict[str, Any]:
    return {
        "overlay_ip": ip,
        "prefix_len": 24,
        "private_key": private,
        "listen_port": 51820,
        "host_port": host_port,
        "peers": [
            {
                "public_key": peer_key,
                "endpoint": f"127.0.0.1:{peer_port}",
                "allowed_ips": [f"{peer_ip}/32"],
                "persistent_keepalive_secs": 5,
            }
        ],
    }


# -- one path between two containers ---------------------------------------------------


@dataclass
class Link:
    """Two containers that can reach each other: how to run a script in the client."""

    label: str
    client_sh: Callable[[str], str]
    server: str  # the address the client dials
    blocks: int = 0
    throughput: list[float] = field(default_factory=list)
    rtt: list[float] = field(default_factory=list)
    status: str = ""
    cpu_probe: Callable[[], dict[str, float]] | None = None
    """CPU seconds so far of the host processes that carry this path's traffic."""
    cpu_percent: dict[str, list[float]] = field(default_factory=dict)
    """Their CPU time during each throughput sample, in % of one CPU over the transfer."""

    def calibrate(self, seconds: float) -> None:
        """Picks N from unrecorded transfers, larger until one takes a measurable while."""
        blocks = CALIBRATION_BLOCKS
        while True:
            rate = parse_transfer(self.client_sh(client_script(self.server, blocks)), blocks)
            if blocks * BLOCK / benchlib.MB / rate >= CALIBRATION_SECONDS or blocks >= MAX_BLOCKS:
                break
            blocks = min(MAX_BLOCKS, blocks * 8)
        self.blocks = blocks_for(rate, seconds)
        progress(f"networks: {self.label}: ~{rate:.1f} MB/s, samples of {self.blocks} x 64 KiB")

    def sample(self) -> None:
        if self.status:
            return
        try:
            before = self.cpu_probe() if self.cpu_probe else {}
            out = self.client_sh(client_script(self.server, self.blocks))
            rate = parse_transfer(out, self.blocks)
            self.throughput.append(rate)
            if self.cpu_probe:
                seconds = self.blocks * BLOCK / benchlib.MB / rate
                for name, used in self.cpu_probe().items():
                    share = (used - before.get(name, used)) / seconds * 100
                    self.cpu_percent.setdefault(name, []).append(share)
            self.rtt.append(parse_ping(self.client_sh(ping_script(self.server))))
        except (StepFailed, subprocess.SubprocessError, OSError, ValueError) as err:
            self.fail(f"failed: {err}")

    def fail(self, status: str) -> None:
        self.status = status[:400]
        progress(f"networks: {self.label}: {self.status}")


def husk_lan(husk: Husk) -> Link:
    husk("network", "create", NETWORK)
    husk("run", "-d", "--network", NETWORK, "--name", "srv", IMAGE, "sh", "-c", SERVER_SCRIPT)
    husk("run", "-d", "--network", NETWORK, "--name", "cli", IMAGE, "sleep", "36000")
    return Link(
        "husk user network",
        lambda script: husk.sh("cli", script),
        husk.address("srv", NETWORK),
        cpu_probe=husk.lan_cpu_seconds,
    )


def docker_lan(dockerd: Dockerd, husk: Husk, scratch: Path) -> Link:
    archive = scratch / "busybox.tar"
    husk("save", "-o", str(archive), IMAGE)
    dockerd.start()
    dockerd("load", "-i", str(archive))
    dockerd("network", "create", DOCKER_NETWORK)
    dockerd(
        "run", "-d", "--network", DOCKER_NETWORK, "--name", "srv", IMAGE, "sh", "-c", SERVER_SCRIPT
    )
    dockerd("run", "-d", "--network", DOCKER_NETWORK, "--name", "cli", IMAGE, "sleep", "36000")
    return Link(
        "docker user network (peer)",
        lambda script: dockerd.sh("cli", script),
        dockerd.address("srv"),
    )


def husk_overlay(a: Husk, b: Husk, scratch: Path) -> Link:
    a("run", "-d", "--name", "ova", IMAGE, "sleep", "36000")
    b("run", "-d", "--name", "ovb", IMAGE, "sh", "-c", SERVER_SCRIPT)
    private_a, public_a = keypair()
    private_b, public_b = keypair()
    port_a, port_b = free_udp_port(), free_udp_port()
    configs = {
        "a": overlay_config(OVERLAY_IP_A, private_a, port_a, OVERLAY_IP_B, public_b, port_b),
        "b": overlay_config(OVERLAY_IP_B, private_b, port_b, OVERLAY_IP_A, public_a, port_a),
    }
    for husk, container in ((a, "ova"), (b, "ovb")):
        config = scratch / f"overlay-{husk.name}.json"
        config.write_text(json.dumps(configs[husk.name]))
        husk("network", "overlay", "attach", "--config", str(config), container)
    deadline = time.monotonic() + HANDSHAKE_DEADLINE
    while True:
        try:
            a.sh("ova", f"ping -c 1 -W 3 {OVERLAY_IP_B}", timeout=30)
            break
        except (StepFailed, subprocess.TimeoutExpired):
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"no ping through the overlay within {HANDSHAKE_DEADLINE:.0f}s"
                ) from None

    def cpu_probe() -> dict[str, float]:
        pids = [pid for pid in (a.daemon_pid(), b.daemon_pid()) if pid is not None]
        qemus = benchlib.qemu_pids_under(a.root) + benchlib.qemu_pids_under(b.root)
        return {
            "daemons": sum(cpu_seconds(pid) for pid in pids),
            "QEMUs": sum(cpu_seconds(pid) for pid in qemus),
        }

    return Link(
        "husk WireGuard overlay",
        lambda script: a.sh("ova", script),
        OVERLAY_IP_B,
        cpu_probe=cpu_probe,
    )


def setup(path_of: Callable[[], Link], label: str) -> Link:
    try:
        return path_of()
    except (StepFailed, subprocess.SubprocessError, OSError, ValueError, KeyError) as err:
        path = Link(label, lambda _script: "", "")
        path.fail(f"failed: {err}")
        return path


# -- the run ----------------------------------------------------------------------------


@dataclass
class Starts:
    default: list[float] = field(default_factory=list)
    network: list[float] = field(default_factory=list)
    status: str = ""


def measure_starts(husk: Husk, runs: int) -> Starts:
    starts = Starts()
    default = ["run", "--rm", IMAGE, "true"]
    on_network = ["run", "--rm", "--network", NETWORK, IMAGE, "true"]
    try:
        husk(*default)  # warm-up (template, image cache) for both
        husk(*on_network)
        for index in range(runs):
            progress(f"networks: start times {index + 1}/{runs}")
            order = [(default, starts.default), (on_network, starts.network)]
            for args, samples in order if index % 2 == 0 else reversed(order):
                samples.append(husk.timed(*args))
    except (StepFailed, subprocess.SubprocessError, OSError) as err:
        starts.status = f"failed: {err}"[:400]
        progress(f"networks: {starts.status}")
    return starts


def measure(options: PartOptions) -> list[Figure]:
    runs = min(3, options.runs) if options.quick else options.runs
    seconds = QUICK_SAMPLE_SECONDS if options.quick else SAMPLE_SECONDS
    with benchlib.scratch_root("hn") as scratch:
        progress("networks: two husk installations, busybox image")
        a = Husk.create("a", scratch / "a")
        b = Husk.create("b", scratch / "b")
        dockerd = Dockerd(scratch / "docker")
        try:
            lan = setup(lambda: husk_lan(a), "husk user network")
            docker = setup(lambda: docker_lan(dockerd, a, scratch), "docker user network (peer)")
            overlay = setup(lambda: husk_overlay(a, b, scratch), "husk WireGuard overlay")
            paths = [lan, docker, overlay]
            for path in paths:
                if not path.status:
                    try:
                        path.calibrate(seconds)
                    except (StepFailed, subprocess.SubprocessError, OSError, ValueError) as err:
                        path.fail(f"failed: {err}")
            for index in range(runs):
                for path in paths if index % 2 == 0 else reversed(paths):
                    progress(f"networks: {path.label} {index + 1}/{runs}")
                    path.sample()
            # The starts run alone: idle VMs tick under TCG and would load the host.
            progress("networks: removing the transfer setups before the start times")
            dockerd.stop()
            b.stop()
            with contextlib.suppress(StepFailed, subprocess.SubprocessError):
                a("rm", "-f", "srv", "cli", "ova")
            starts = measure_starts(a, runs * START_RUNS_PER_RUN)
        finally:
            dockerd.stop()
            for husk in (a, b):
                husk.stop()
    left = benchlib._processes_of(scratch)
    if left:
        progress(f"networks: WARNING: {len(left)} process(es) survived the clean-up: {left}")
    return figures(lan, docker, overlay, starts)


def figures(lan: Link, docker: Link, overlay: Link, starts: Starts) -> list[Figure]:
    result: list[Figure] = []
    for path, peer in ((lan, False), (docker, True), (overlay, False)):
        where = (
            "two containers on one user network"
            if path is not overlay
            else "two daemons, WireGuard overlay over 127.0.0.1"
        )
        engine = "docker" if peer else "husk"
        size = f"{path.blocks * BLOCK // (1024 * 1024)} MiB" if path.blocks else "N x 64 KiB"
        result.append(
            Figure(
                SECTION,
                f"TCP throughput, {where} ({engine})",
                "MB/s",
                path.throughput,
                f"{engine} exec CLIENT sh -c 'dd if=/dev/zero bs=64k count={path.blocks or 'N'} "
                f"| nc SERVER {PORT}'  (server: nc -l -p {PORT} >/dev/null)",
                peer=peer,
                note=f"{size} per sample, timed in the client with /proc/uptime",
                status=path.status if not path.throughput else "",
            )
        )
        result.append(
            Figure(
                SECTION,
                f"ping round trip, {where} ({engine})",
                "ms",
                path.rtt,
                f"{engine} exec CLIENT {ping_script('SERVER')}  (average)",
                peer=peer,
                status=path.status if not path.rtt else "",
            )
        )
    whose = {
        "switch": "the switch process",
        "QEMUs": "the QEMU processes (the transfer's two, 1-2 idle ones), together",
        "daemons": "both husk daemons (relays, published port), together",
    }
    for link, transfer in ((lan, "user-network"), (overlay, "overlay")):
        for name, shares in link.cpu_percent.items():
            result.append(
                Figure(
                    SECTION,
                    f"CPU of {whose[name]} during the husk {transfer} transfer",
                    "% of a CPU",
                    shares,
                    "utime + stime from /proc/PID/stat around each transfer / its duration",
                )
            )
    for name, unit, samples in (
        ("TCP throughput", "MB/s", "throughput"),
        ("ping round trip", "ms", "rtt"),
    ):
        husk_median = Figure("", "", unit, getattr(lan, samples)).median
        docker_median = Figure("", "", unit, getattr(docker, samples)).median
        if husk_median and docker_median:
            result.append(
                Figure(
                    SECTION,
                    f"{name}, husk / docker (medians, same run)",
                    "x",
                    summary=(husk_median / docker_median, None, None),
                    runs_label="-",
                    derived=True,
                )
            )
    result.append(
        Figure(
            SECTION,
            "TCP throughput, two podman containers on a podman network",
            "MB/s",
            peer=True,
            status=PODMAN_STATUS,
        )
    )
    command = f"husk run --rm {IMAGE} true"
    result.append(
        Figure(
            SECTION,
            "`run --rm true`, default network",
            "s",
            starts.default,
            command,
            status=starts.status if not starts.default else "",
        )
    )
    result.append(
        Figure(
            SECTION,
            "`run --rm true`, on a user network",
            "s",
            starts.network,
            f"husk run --rm --network {NETWORK} {IMAGE} true  (interleaved with the above)",
            status=starts.status if not starts.network else "",
        )
    )
    default_median = Figure("", "", "s", starts.default).median
    network_median = Figure("", "", "s", starts.network).median
    if default_median is not None and network_median is not None:
        result.append(
            Figure(
                SECTION,
                "added by a user network to a start (median difference)",
                "ms",
                summary=((network_median - default_median) * 1000, None, None),
                runs_label="-",
                derived=True,
            )
        )
    return result


if __name__ == "__main__":
    benchlib.part_main("networks", __doc__ or "", measure, default_runs=5)
