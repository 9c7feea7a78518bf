"""Image prune and rmi never remove an image a container uses (Docker's rule).

``husk image prune`` and ``husk rmi`` go through the daemon, which knows the
containers: a stopped container's image survives ``image prune -a -f`` and the
container still starts; an image no container uses is removed. A daemon of its
own (not the session's), since pruning every unused image would pull the rug
from under other test modules.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_fixtures import RunningDaemon, short_root, start_daemon
from testimages import BUSYBOX_NAME, install_busybox_image, small_image_layout

pytestmark = pytest.mark.vm

CLI_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def daemon(guest_bundle: object) -> Iterator[RunningDaemon]:
    root = short_root("husk-prune-")
    running = start_daemon(root, templates_from_session=True)
    try:
        yield running
    finally:
        running.remove_all_containers()
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def husk(daemon: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "husk.cli.main", *args],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def ok(daemon: RunningDaemon, *args: str) -> str:
    result = husk(daemon, *args)
    assert result.returncode == 0, (
        f"husk {' '.join(args)}: {result.returncode}\n{result.stdout}\n{result.stderr}\n"
        f"daemon log: {daemon.log()[-2000:]}"
    )
    return result.stdout


def add_unused_image(daemon: RunningDaemon, tmp_path: Path, name: str) -> str:
    """An image no container uses, loaded into the daemon's store; its id."""
    from husk.oci.archive import load_path
    from husk.oci.store import ImageStore

    layout = small_image_layout(tmp_path / name, f"{name} {time.time_ns()}")
    store = ImageStore(daemon.data_dir / "images")
    return load_path(layout, store=store, name=f"husk.local/{name}:latest")[0].id


def image_ids(daemon: RunningDaemon) -> set[str]:
    return set(ok(daemon, "images", "-q", "--no-trunc").split())


def test_prune_keeps_a_stopped_containers_image_and_removes_unused_ones(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    from husk.oci.store import ImageStore

    busybox = install_busybox_image(ImageStore(daemon.data_dir / "images")).id
    unused = add_unused_image(daemon, tmp_path, "unused")
    ok(daemon, "run", "--name", "stopped", BUSYBOX_NAME, "true")
    assert ok(daemon, "ps", "-a", "--filter", "name=stopped", "--format", "{{.State}}").strip() == (
        "exited"
    )
    ok(daemon, "create", "--name", "created", BUSYBOX_NAME, "true")

    # Dangling only (the default): a named image stays even when unused.
    ok(daemon, "image", "prune", "-f")
    assert {busybox, unused} <= image_ids(daemon)

    pruned = ok(daemon, "image", "prune", "-a", "-f")
    assert f"deleted: {unused}" in pruned
    assert busybox not in pruned
    assert busybox in image_ids(daemon) and unused not in image_ids(daemon)
    # The stopped container still starts from its image.
    assert ok(daemon, "start", "-a", "stopped") == ""
    state = ok(daemon, "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", "stopped")
    assert state.strip() == "exited 0"

    # rmi without -f refuses an image a (stopped) container uses, with Docker's message.
    refused = husk(daemon, "rmi", BUSYBOX_NAME)
    assert refused.returncode == 125
    assert "conflict" in refused.stderr and "is using its referenced image" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert busybox in image_ids(daemon)

    # rmi -f only untags it: the stopped container keeps its image and still starts.
    forced = ok(daemon, "rmi", "-f", BUSYBOX_NAME)
    assert "Untagged:" in forced and "Deleted" not in forced
    assert busybox in image_ids(daemon)
    assert ok(daemon, "start", "-a", "stopped") == ""

    # Once no container uses it, prune -a removes it too.
    ok(daemon, "rm", "stopped", "created")
    pruned = ok(daemon, "image", "prune", "-a", "-f")
    assert f"deleted: {busybox}" in pruned
    assert image_ids(daemon) == set()


def test_docker_cli_prune_keeps_used_images(daemon: RunningDaemon, tmp_path: Path) -> None:
    from husk.oci.store import ImageStore

    busybox = install_busybox_image(ImageStore(daemon.data_dir / "images")).id
    unused = add_unused_image(daemon, tmp_path, "other")
    ok(daemon, "create", "--name", "holder", BUSYBOX_NAME, "true")
    try:
        pruned = daemon.docker("image", "prune", "-a", "-f").stdout.decode()
        assert unused in pruned and busybox not in pruned
        assert image_ids(daemon) == {busybox}
    finally:
        ok(daemon, "rm", "-f", "holder")
