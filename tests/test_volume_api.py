"""Volumes through the real daemon: the docker CLI (Docker 28), docker-py and husk's CLI.

Containers here are created, never started: no VM boots (what happens at start is the
guest's, tested with VMs elsewhere). The images come from a local registry on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
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

pytestmark = [pytest.mark.registry]


@pytest.fixture(scope="module")
def volume_image(husk_daemon: RunningDaemon, registry: RunningRegistry) -> Iterator[str]:  # noqa: F811
    """busybox with ``VOLUME /data`` (holding a file) and ``VOLUME /cache``, pulled."""
    spec = busybox_spec()
    spec.layers = [
        *spec.layers,
        Layer([directory("data"), file("data/seed.txt", "seed\n"), directory("cache")], "gzip"),
    ]
    spec.volumes = ["/data", "/cache"]
    layout = Path(tempfile.mkdtemp(prefix="husk-vol-")) / "layout"
    try:
        writer = LayoutWriter(layout)
        writer.tag(writer.image(spec), "latest")
        ref = registry.push_oci_layout(layout, "husk/volimage")
    finally:
        shutil.rmtree(layout.parent, ignore_errors=True)
    husk_daemon.docker("pull", f"{ref}:latest")
    yield f"{ref}:latest"


def _fails(daemon: RunningDaemon, *args: str) -> str:
    result = daemon.docker(*args, check=False)
    assert result.returncode != 0, f"docker {' '.join(args)} succeeded: {result.stdout!r}"
    return result.stderr.decode()


def _volumes(daemon: RunningDaemon, *filters: str) -> list[str]:
    args = [arg for f in filters for arg in ("--filter", f)]
    return daemon.docker("volume", "ls", "-q", *args).stdout.decode().split()


def _inspect(daemon: RunningDaemon, *args: str) -> Any:
    return json.loads(daemon.docker("inspect", *args).stdout)[0]


def _mounts(daemon: RunningDaemon, container: str) -> dict[str, dict[str, Any]]:
    return {m["Destination"]: m for m in _inspect(daemon, container)["Mounts"]}


def _cleanup(daemon: RunningDaemon, containers: list[str]) -> None:
    daemon.docker("rm", "-f", *containers, check=False)
    for name in _volumes(daemon):
        daemon.docker("volume", "rm", "-f", name, check=False)


@pytest.mark.timeout(600)
def test_docker_cli_volume_commands(husk_daemon: RunningDaemon, daemon_busybox: str) -> None:  # noqa: F811
    d = husk_daemon
    containers = ["vc1", "vc2", "vc3"]
    since = str(int(time.time()) - 1)
    try:
        assert d.docker("volume", "create", "--label", "tier=db", "vol1").stdout.strip() == b"vol1"
        assert d.docker("volume", "create", "vol1").stdout.strip() == b"vol1"  # idempotent
        info = json.loads(d.docker("volume", "inspect", "vol1").stdout)[0]
        assert info["Name"] == "vol1" and info["Driver"] == "local" and info["Scope"] == "local"
        assert info["Labels"] == {"tier": "db"}
        assert Path(info["Mountpoint"]) == d.data_dir / "volumes" / "vol1" / "_data"
        assert Path(info["Mountpoint"]).is_dir()
        unnamed = d.docker("volume", "create").stdout.decode().strip()
        assert len(unnamed) == 64
        before = sorted(_volumes(d))
        # Bad input: one clear error each, nothing made.
        assert "not supported" in _fails(d, "volume", "create", "-o", "type=tmpfs", "vt")
        assert "not supported" in _fails(d, "volume", "create", "-d", "nfs", "vn")
        assert "invalid characters" in _fails(d, "volume", "create", "a..b")
        assert "no such host directory" in _fails(
            d, "volume", "create", "-o", "type=none", "-o", "o=bind", "-o", "device=/nope", "vb"
        )
        assert "already exists" in _fails(
            d, "volume", "create", "-o", "type=none", "-o", "o=bind", "-o", "device=/tmp", "vol1"
        )
        assert "invalid characters" in _fails(d, "create", "-v", "a..b:/x", daemon_busybox)
        assert "does not exist" in _fails(d, "create", "-v", "/nope/at/all:/x", daemon_busybox)
        assert "absolute path" in _fails(d, "create", "-v", "newvol:rel", daemon_busybox)
        assert sorted(_volumes(d)) == before

        d.docker("create", "--name", "vc1", "-v", "vol1:/data:ro", "-v", "/anon", daemon_busybox)
        mounts = _mounts(d, "vc1")
        assert mounts["/data"]["Type"] == "volume" and mounts["/data"]["Name"] == "vol1"
        assert mounts["/data"]["Source"] == info["Mountpoint"]
        assert mounts["/data"]["Driver"] == "local" and mounts["/data"]["RW"] is False
        anon = mounts["/anon"]["Name"]
        assert len(anon) == 64 and mounts["/anon"]["RW"] is True
        shown = _inspect(d, "vc1")
        assert shown["HostConfig"]["Binds"] == ["vol1:/data:ro"]  # -v /anon is Config.Volumes
        assert shown["Config"]["Volumes"] == {"/anon": {}}
        assert "volume is in use" in _fails(d, "volume", "rm", "vol1")
        assert "volume is in use" in _fails(d, "volume", "rm", "-f", "vol1")
        assert "vol1" in _volumes(d, "dangling=false")
        assert unnamed in _volumes(d, "dangling=true")
        assert _volumes(d, "label=tier=db") == ["vol1"]
        assert _volumes(d, "name=ol1") == ["vol1"]

        # A named volume is made on first use; --volumes-from copies the mounts.
        d.docker(
            "create", "--name", "vc2", "-v", "fresh:/f", "--volumes-from", "vc1:rw", daemon_busybox
        )
        mounts = _mounts(d, "vc2")
        assert mounts["/f"]["Name"] == "fresh" and mounts["/data"]["Name"] == "vol1"
        assert mounts["/data"]["RW"] is True and mounts["/anon"]["Name"] == anon
        assert _inspect(d, "vc2")["HostConfig"]["VolumesFrom"] == ["vc1:rw"]
        d.docker(
            "create", "--name", "vc3",
            "--mount", "type=volume,src=mnt,dst=/m,volume-nocopy,volume-label=made=1",
            "--mount", "type=tmpfs,dst=/t,tmpfs-size=1m",
            daemon_busybox,
        )  # fmt: skip
        mounts = _mounts(d, "vc3")
        assert mounts["/m"]["Name"] == "mnt" and mounts["/t"]["Type"] == "tmpfs"
        assert json.loads(d.docker("volume", "inspect", "mnt").stdout)[0]["Labels"] == {"made": "1"}
        assert _inspect(d, "vc3")["HostConfig"]["Mounts"][0]["Source"] == "mnt"

        d.docker("rm", "vc2", "vc3")
        assert {"fresh", "mnt", anon} <= set(_volumes(d))  # plain rm keeps every volume
        d.docker("rm", "-v", "vc1")
        names = set(_volumes(d))
        assert anon not in names and {"vol1", "fresh", "mnt"} <= names  # named ones stay

        df = d.docker("system", "df", "-v").stdout.decode()
        assert "Local Volumes space usage" in df and "vol1" in df
        pruned = d.docker("volume", "prune", "-f").stdout.decode()
        assert set(_volumes(d)) == names  # no anonymous ones left: nothing to prune
        pruned = d.docker("volume", "prune", "-f", "-a", "--filter", "label=made").stdout.decode()
        assert "mnt" in pruned and "mnt" not in _volumes(d)
        d.docker("volume", "rm", "vol1", "fresh")
        assert "no such volume" in _fails(d, "volume", "inspect", "vol1")
        assert "no such volume" in _fails(d, "volume", "rm", "vol1")
        d.docker("volume", "rm", "-f", "vol1")  # force: a missing volume is no error

        until = str(int(time.time()) + 1)
        events = d.docker(
            "events", "--since", since, "--until", until, "--filter", "type=volume",
            "--format", "{{.Action}} {{.Actor.ID}}",
        ).stdout.decode().splitlines()  # fmt: skip
        for wanted in ("create vol1", "create fresh", f"destroy {anon}", "destroy vol1"):
            assert wanted in events, events
    finally:
        _cleanup(d, containers)


@pytest.mark.timeout(600)
def test_image_volumes_config_volumes_and_docker_py(
    husk_daemon: RunningDaemon,  # noqa: F811
    volume_image: str,
) -> None:
    import docker.errors

    d = husk_daemon
    client = d.client()
    try:
        # The image's VOLUMEs: an anonymous volume each, copy-up asked (new and empty).
        d.docker("create", "--name", "iv1", "-v", "keep:/cache", volume_image)
        mounts = _mounts(d, "iv1")
        data = mounts["/data"]
        assert data["Type"] == "volume" and len(data["Name"]) == 64
        assert mounts["/cache"]["Name"] == "keep"  # a mount covers the image's VOLUME
        assert _inspect(d, "iv1")["Config"]["Volumes"] == {"/data": {}}
        container_id = _inspect(d, "iv1")["Id"]
        record = json.loads((d.data_dir / "containers" / container_id / "config.json").read_text())
        binds = {b["target"]: b for b in record["spec"]["binds"]}
        assert binds["/data"]["copy_up"] is True and binds["/data"]["anonymous"] is True
        assert binds["/cache"]["copy_up"] is True  # "keep" was new too
        anonymous = client.volumes.get(data["Name"])
        assert anonymous.attrs["Labels"] == {"com.docker.volume.anonymous": ""}
        d.docker("rm", "iv1")
        assert data["Name"] in _volumes(d)  # rm without -v keeps it, prune takes it
        pruned = client.volumes.prune()
        assert pruned["VolumesDeleted"] == [data["Name"]]
        assert "keep" in _volumes(d)

        # docker-py: the volumes API.
        made = client.volumes.create("pyvol", labels={"k": "v"})
        assert made.name == "pyvol" and made.attrs["Labels"] == {"k": "v"}
        assert [v.name for v in client.volumes.list(filters={"label": "k=v"})] == ["pyvol"]
        # docker-py's volumes= sends Config.Volumes for every target and Binds: the bind is
        # no volume, the named one is made, the path alone is anonymous.
        share = Path(tempfile.mkdtemp(prefix="husk-share-"))
        try:
            container = client.containers.create(
                volume_image,
                volumes={str(share): {"bind": "/share", "mode": "ro"}, "pyvol": {"bind": "/p"}},
            )
            mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
            assert mounts["/share"]["Type"] == "bind" and mounts["/share"]["RW"] is False
            assert mounts["/p"]["Name"] == "pyvol"
            anon = mounts["/data"]["Name"]
            with pytest.raises(docker.errors.APIError, match="volume is in use"):
                client.volumes.get("pyvol").remove()
            container.remove(v=True)
            assert anon not in _volumes(d) and "pyvol" in _volumes(d)
        finally:
            shutil.rmtree(share, ignore_errors=True)
        api = client.api
        created = api.create_container(
            volume_image, volumes=["/extra"], host_config=api.create_host_config(auto_remove=True)
        )
        extra = {m["Destination"]: m for m in api.inspect_container(created["Id"])["Mounts"]}
        assert extra["/extra"]["Type"] == "volume" and extra["/data"]["Type"] == "volume"
        api.remove_container(created["Id"], v=True)
        assert extra["/extra"]["Name"] not in _volumes(d)
        with pytest.raises(docker.errors.APIError, match="invalid characters"):
            client.volumes.create("no/slash")
        with pytest.raises(docker.errors.NotFound):
            client.volumes.get("absent-volume")
        usage = api.df()["Volumes"]
        assert {v["Name"]: v["UsageData"]["RefCount"] for v in usage}["pyvol"] == 0
        client.volumes.get("pyvol").remove()
    finally:
        client.close()
        _cleanup(d, ["iv1"])


def _husk(daemon: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from husk.cli.main import main; main()", *args],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(600)
def test_husk_cli_volume_commands(husk_daemon: RunningDaemon, daemon_busybox: str) -> None:  # noqa: F811
    d = husk_daemon
    try:
        made = _husk(d, "volume", "create", "-l", "k=v", "hvol")
        assert made.returncode == 0 and made.stdout.strip() == "hvol", made.stderr
        bad = _husk(d, "volume", "create", "-o", "type=tmpfs", "htmp")
        assert bad.returncode == 1 and "not supported" in bad.stderr
        listed = _husk(d, "volume", "ls", "--filter", "label=k=v")
        assert listed.stdout.split() == ["DRIVER", "VOLUME", "NAME", "local", "hvol"]
        assert _husk(d, "volume", "ls", "-q").stdout.split() == ["hvol"]
        shown = json.loads(_husk(d, "volume", "inspect", "hvol").stdout)
        assert shown[0]["Labels"] == {"k": "v"}
        created = _husk(d, "create", "--name", "hc1", "-v", "hvol:/d", "-v", "/a", daemon_busybox)
        assert created.returncode == 0, created.stderr
        refused = _husk(d, "create", "-v", "x/y:/d", daemon_busybox)
        assert refused.returncode == 125 and "invalid characters" in refused.stderr
        propagation = "type=bind,src=/,dst=/x,bind-propagation=rshared"
        refused = _husk(d, "create", "--mount", propagation, daemon_busybox)
        assert refused.returncode == 125 and "not supported" in refused.stderr
        in_use = _husk(d, "volume", "rm", "hvol")
        assert in_use.returncode == 1 and "volume is in use" in in_use.stderr
        anon = _mounts(d, "hc1")["/a"]["Name"]
        assert _husk(d, "rm", "-v", "hc1").returncode == 0
        assert anon not in _volumes(d)
        df = _husk(d, "system", "df", "-v")
        assert "hvol" in df.stdout, df.stderr
        pruned = _husk(d, "volume", "prune", "-f", "-a")
        assert "hvol" in pruned.stdout and _volumes(d) == []
    finally:
        _cleanup(d, ["hc1"])
