"""podman drives husk-runtime on its own CNI bridge network, with a published port.

podman (its bridge, its NAT rules for ``-p``, its container network namespaces) runs inside
a network and mount namespace this test creates (``unshare --net --mount``, a private
``/run/netns``), as in tests/test_ociruntime_netns_podman_vm.py, but here the container is
started by podman with ``--runtime husk-runtime``: the keeper finds the namespace path in
the bundle, takes the interface podman's CNI made (husk.ociruntime.netns) and the guest
answers on podman's address and through podman's published port. Nothing touches the
host's own network namespace.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ociruntime_fixtures import assert_no_leftovers, leftovers, write_wrapper
from test_ociruntime_netns_podman_vm import CLIENT, Engine, podman_in_a_namespace

pytestmark = pytest.mark.vm

SUBNET = "10.89.8.0/24"
HOST_PORT, GUEST_PORT = 8090, 7000
SERVER = f"while true; do echo from-husk-vm | nc -l -p {GUEST_PORT}; done"

SETUP = textwrap.dedent(
    """
    set -e
    mkdir -p /run/netns && mount -t tmpfs tmpfs /run/netns
    ip link set lo up
    cd "$WORK"
    mkdir -p image/bin
    cp /bin/busybox image/bin/
    for applet in sh nc sleep; do ln -s busybox image/bin/$applet; done
    tar -C image -cf image.tar .
    $PODMAN import image.tar localhost/husk-net-test:1 >/dev/null
    $PODMAN network create --subnet {subnet} husknet2 >/dev/null
    $PODMAN --runtime "$WRAPPER" run -d --name husk-net-test --network husknet2 \\
        -p 127.0.0.1:{host_port}:{guest_port} localhost/husk-net-test:1 sh -c "$SERVER" >/dev/null
    echo READY $($PODMAN inspect husk-net-test --format \\
        '{{{{.State.Pid}}}} {{{{.NetworkSettings.Networks.husknet2.IPAddress}}}}')
    exec sleep 900
    """
).format(subnet=SUBNET, host_port=HOST_PORT, guest_port=GUEST_PORT)


@pytest.fixture
def podman_on_a_bridge(guest_bundle: object) -> Iterator[tuple[Engine, str, Path, Path]]:
    run_dir = Path(tempfile.mkdtemp(prefix="hr-pn-", dir="/tmp"))
    state_roots: list[Path] = []

    def husk_runtime(work: Path) -> dict[str, str]:
        state_roots.append(work / "state")
        wrapper = write_wrapper(work, run_dir, state_roots[0])
        return {"WRAPPER": str(wrapper), "SERVER": SERVER}

    try:
        with podman_in_a_namespace(SETUP, "husk-net-test", husk_runtime) as (engine, podman):
            yield engine, podman, run_dir, state_roots[0]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_husk_runtime_container_serves_on_podmans_bridge_and_published_port(
    podman_on_a_bridge: tuple[Engine, str, Path, Path],
) -> None:
    engine, podman, run_dir, state_root = podman_on_a_bridge
    # Through podman's bridge, to the address podman's IPAM gave the container.
    done = engine.run(sys.executable, "-c", CLIENT, engine.container_ip, str(GUEST_PORT))
    assert done.returncode == 0 and "from-husk-vm" in done.stdout, done
    # Through podman's published port (its NAT rules in the engine's namespace).
    done = engine.run(sys.executable, "-c", CLIENT, "127.0.0.1", str(HOST_PORT))
    assert done.returncode == 0 and "from-husk-vm" in done.stdout, done
    # The workload runs in the VM: the engine's namespace holds the keeper, no workload.
    inspect = engine.run(*podman.split(), "inspect", "-f", "{{.OCIRuntime}}", "husk-net-test")
    assert inspect.stdout.strip().endswith("husk-runtime"), inspect
    removed = engine.run(*podman.split(), "rm", "-f", "-t", "0", "husk-net-test", timeout=120)
    assert removed.returncode == 0, removed
    assert_no_leftovers(lambda: leftovers(run_dir, state_root))
