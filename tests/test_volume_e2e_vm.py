"""Volumes end to end with real VMs, the real daemon and the docker CLI (issue 13).

- One named volume mounted by two containers that run at the same time: each sees what
  the other writes while both run (9p, no stale cache), a third started later reads both
  files; ``volume rm`` is refused while a container still uses the volume, the volume
  outlives ``rm -f`` of every container, and ``volume rm`` succeeds after.
- An image with ``VOLUME /data`` holding files of several owners, run with ``run -d``:
  ``inspect`` shows the anonymous volume in Mounts, the copied-up content keeps its
  owners and modes inside the guest, and ``rm -v`` removes that anonymous volume.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon_fixtures import (  # noqa: F401 - fixtures
    RunningDaemon,
    daemon_busybox,
    husk_daemon,
    registry,
    registry_busybox,
)
from registry_fixtures import RunningRegistry
from testimages import Layer, LayoutWriter, busybox_spec, directory, file

pytestmark = [pytest.mark.vm, pytest.mark.registry]

SHARED = "e2eshared"


def _volumes(daemon: RunningDaemon) -> list[str]:
    return daemon.docker("volume", "ls", "-q").stdout.decode().split()


def _inspect(daemon: RunningDaemon, name: str) -> dict[str, Any]:
    data = json.loads(daemon.docker("inspect", name).stdout)
    assert isinstance(data, list) and len(data) == 1
    item: dict[str, Any] = data[0]
    return item


@pytest.fixture(scope="module")
def owned_volume_image(husk_daemon: RunningDaemon, registry: RunningRegistry) -> Iterator[str]:  # noqa: F811
    """busybox with ``VOLUME /data``; /data holds files and a directory of several owners."""
    spec = busybox_spec()
    spec.layers = [
        *spec.layers,
        Layer(
            [
                directory("data", mode=0o755, uid=1000, gid=1000),
                file("data/root.txt", "root-owned\n", mode=0o600),
                file("data/user.txt", "user-owned\n", mode=0o640, uid=1000, gid=1001),
                directory("data/sub", mode=0o750, uid=33, gid=33),
                file("data/sub/deep.txt", "deep\n", uid=33, gid=33),
            ],
            "gzip",
        ),
    ]
    spec.volumes = ["/data"]
    layout = Path(tempfile.mkdtemp(prefix="husk-vole2e-")) / "layout"
    try:
        writer = LayoutWriter(layout)
        writer.tag(writer.image(spec), "latest")
        ref = registry.push_oci_layout(layout, "husk/volowners")
    finally:
        shutil.rmtree(layout.parent, ignore_errors=True)
    husk_daemon.docker("pull", f"{ref}:latest")
    yield f"{ref}:latest"


@pytest.mark.timeout(900)
def test_a_named_volume_is_shared_live_by_running_containers(
    husk_daemon: RunningDaemon,  # noqa: F811
    daemon_busybox: str,  # noqa: F811
) -> None:
    d = husk_daemon
    mount = f"{SHARED}:/data"
    try:
        for name in ("vsa", "vsb"):
            d.docker("run", "-d", "--name", name, "-v", mount, daemon_busybox, "sleep", "3600")
        # A writes, B reads while both run; then the other way round.
        d.docker("exec", "vsa", "sh", "-c", "echo from-a > /data/a")
        assert d.docker("exec", "vsb", "cat", "/data/a").stdout == b"from-a\n"
        d.docker("exec", "vsb", "sh", "-c", "echo from-b > /data/b")
        assert d.docker("exec", "vsa", "cat", "/data/b").stdout == b"from-b\n"
        # An overwrite is seen too (no stale page cache on the reader's side).
        d.docker("exec", "vsa", "sh", "-c", "echo again-a > /data/a")
        assert d.docker("exec", "vsb", "cat", "/data/a").stdout == b"again-a\n"
        listing = d.docker("exec", "vsb", "ls", "/data").stdout.decode().split()
        assert sorted(listing) == ["a", "b"]

        # A third container, started later, reads both files.
        third = d.docker("run", "--rm", "-v", mount, daemon_busybox, "cat", "/data/a", "/data/b")
        assert third.stdout == b"again-a\nfrom-b\n"

        # In use by a running container: refused, the volume and its files untouched.
        d.docker("rm", "-f", "vsa")
        refused = d.docker("volume", "rm", SHARED, check=False)
        assert refused.returncode == 1, refused
        message = refused.stderr.decode()
        assert "in use" in message and SHARED in message, message
        assert SHARED in _volumes(d)
        assert d.docker("exec", "vsb", "cat", "/data/b").stdout == b"from-b\n"

        # It outlives every container that used it.
        d.docker("rm", "-f", "vsb")
        assert SHARED in _volumes(d)
        mountpoint = d.docker("volume", "inspect", "-f", "{{.Mountpoint}}", SHARED).stdout
        data = Path(mountpoint.decode().strip())
        assert (data / "a").read_text() == "again-a\n"
        assert (data / "b").read_text() == "from-b\n"

        # Nobody uses it any more: removed, directory and all.
        removed = d.docker("volume", "rm", SHARED)
        assert removed.stdout.decode().strip() == SHARED
        assert SHARED not in _volumes(d)
        assert not data.exists()
    finally:
        d.docker("rm", "-f", "vsa", "vsb", check=False)
        d.docker("volume", "rm", "-f", SHARED, check=False)


@pytest.mark.timeout(900)
def test_an_image_volume_is_copied_up_with_its_owners_and_removed_by_rm_v(
    husk_daemon: RunningDaemon,  # noqa: F811
    owned_volume_image: str,
) -> None:
    d = husk_daemon
    before = set(_volumes(d))
    try:
        d.docker("run", "-d", "--name", "vown", owned_volume_image, "sleep", "3600")
        mounts = _inspect(d, "vown")["Mounts"]
        assert len(mounts) == 1, mounts
        mount = mounts[0]
        assert mount["Type"] == "volume" and mount["Destination"] == "/data", mount
        anonymous = mount["Name"]
        assert len(anonymous) == 64 and int(anonymous, 16) >= 0, anonymous
        assert mount["RW"] is True
        assert set(_volumes(d)) - before == {anonymous}

        stat = d.docker(
            "exec", "vown", "stat", "-c", "%n %u:%g %a",
            "/data", "/data/root.txt", "/data/user.txt", "/data/sub", "/data/sub/deep.txt",
        ).stdout.decode().splitlines()  # fmt: skip
        assert stat == [
            "/data 1000:1000 755",
            "/data/root.txt 0:0 600",
            "/data/user.txt 1000:1001 640",
            "/data/sub 33:33 750",
            "/data/sub/deep.txt 33:33 644",
        ]
        read = d.docker("exec", "vown", "cat", "/data/user.txt", "/data/sub/deep.txt")
        assert read.stdout == b"user-owned\ndeep\n"
        # The copy is the volume's: on the host, under husk's data directory.
        where = d.docker("volume", "inspect", "-f", "{{.Mountpoint}}", anonymous).stdout
        mountpoint = Path(where.decode().strip())
        assert (mountpoint / "root.txt").read_text() == "root-owned\n"

        d.docker("rm", "-f", "-v", "vown")
        assert anonymous not in _volumes(d)
        assert not mountpoint.exists()
    finally:
        d.docker("rm", "-f", "-v", "vown", check=False)
