"""The docker engine puts a husk-runtime container on its own bridge network.

docker's libnetwork configures a container's network from an OCI ``prestart`` hook, in
the network namespace the runtime made for the container: husk-runtime's keeper makes it
(its own), runs the hook, then its VM takes the interface libnetwork put there. dockerd
runs in a network namespace this test creates (``unshare --net``; its bridge and veths
live there, nothing in the host's) and a mount namespace with private mounts, with
``--add-runtime husk``. A runc container on the
same user network reaches the husk container by name (docker's embedded DNS) and address.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_fixtures import DOCKER_CLI
from ociruntime_fixtures import (
    EngineDaemon,
    assert_no_leftovers,
    busybox_tar,
    kill_processes,
    kill_shims,
    leftovers,
    run_checked,
    write_wrapper,
)

pytestmark = pytest.mark.vm

IMAGE = "localhost/husk-oci-busybox:latest"
NETWORK = "husk-oci-net"
SUBNET = "10.89.9.0/24"
SERVER = "while true; do echo from-husk-vm | nc -l -p 7000; done"
CLIENT = "for i in $(seq 30); do nc -w 5 {host} 7000 && exit 0; sleep 1; done; exit 1"


class NamespacedDockerd:
    """dockerd in a network namespace of its own, everything under ``work``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.socket = work / "d.sock"
        self.run_dir = Path(tempfile.mkdtemp(prefix="hr-dn-", dir="/tmp"))
        self.state_root = work / "runtime-root"
        wrapper = write_wrapper(work, self.run_dir, self.state_root)
        self.env = {"DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(work)}
        dockerd = [
            "dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
            "--data-root", str(work / "data"), "--exec-root", str(work / "exec"),
            "--pidfile", str(work / "d.pid"), "-H", f"unix://{self.socket}",
            "--add-runtime", f"husk={wrapper}",
        ]  # fmt: skip
        # A new network namespace (the bridge and veths live there) and a mount namespace
        # with private mounts: nothing else on the host can unmount dockerd's rootfs.
        shell = ["sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
        unshare = ["unshare", "--net", "--mount", "--propagation", "private", "--"]
        self.daemon = EngineDaemon([*unshare, *shell, *dockerd], work / "d.log")

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_checked([DOCKER_CLI, *args], env=self.env, check=check)


@pytest.fixture
def dockerd(guest_bundle: object) -> Iterator[NamespacedDockerd]:
    work = Path(tempfile.mkdtemp(prefix="husk-dn-"))
    engine = NamespacedDockerd(work)
    try:
        engine.daemon.wait_ready(lambda: engine.docker("version", check=False).returncode == 0, 60)
        engine.docker("import", str(busybox_tar(work)), IMAGE)
        engine.docker("network", "create", "--subnet", SUBNET, NETWORK)
        yield engine
    finally:
        ids = engine.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            engine.docker("rm", "-f", *ids, check=False)
        engine.daemon.stop()
        kill_processes(engine.run_dir)
        kill_shims(work)
        for sub in ("exec", "data"):
            subprocess.run(["umount", "-R", str(work / sub)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(engine.run_dir, ignore_errors=True)


def test_a_husk_runtime_container_is_on_dockers_user_network(dockerd: NamespacedDockerd) -> None:
    dockerd.docker(
        "run", "-d", "--runtime", "husk", "--name", "husk-srv", "--network", NETWORK,
        IMAGE, "sh", "-c", SERVER,
    )  # fmt: skip
    address = dockerd.docker(
        "inspect",
        "-f",
        f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}',
        "husk-srv",
    ).stdout.strip()
    assert address.startswith("10.89.9."), address
    for host in ("husk-srv", address):  # by name (docker's DNS) and by address
        reply = dockerd.docker(
            "run", "--rm", "--network", NETWORK, IMAGE, "sh", "-c", CLIENT.format(host=host),
            check=False,
        )  # fmt: skip
        assert reply.returncode == 0 and "from-husk-vm" in reply.stdout, reply
    # The workload answers from the VM: the container's process is the keeper.
    runtime = dockerd.docker("inspect", "-f", "{{.HostConfig.Runtime}}", "husk-srv").stdout
    assert runtime.strip() == "husk"
    dockerd.docker("rm", "-f", "husk-srv")
    assert_no_leftovers(lambda: leftovers(dockerd.run_dir, dockerd.state_root))
