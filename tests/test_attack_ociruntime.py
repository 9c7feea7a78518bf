"""Attacks on husk-runtime from other local users and from a hostile bundle, refused
(docs/SECURITY.md, "husk-runtime")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from husk.ociruntime import cli, state
from husk.ociruntime.errors import RuntimeFailure


def test_pid_file_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    """The engine's --pid-file may be in a directory others can write to: the runtime (as
    root) wrote ``.NAME.<its pid>`` there first, following a symlink another user planted
    at that predictable name (and so truncated the file it named)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    (shared / f".ctr.pid.{os.getpid()}").symlink_to(victim)
    cli._write_pid_file(str(shared / "ctr.pid"), 4242)
    assert victim.read_text() == "precious\n"
    assert (shared / "ctr.pid").read_text() == "4242"
    assert (shared / "ctr.pid").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".", "", "x\0y", "/etc", "a" * 1025])
def test_container_ids_cannot_leave_the_state_root(tmp_path: Path, bad: str) -> None:
    """Already refused: an id is one path component of safe characters."""
    with pytest.raises(RuntimeFailure, match="invalid container id"):
        state.container_dir(tmp_path, bad)


@pytest.mark.parametrize("cpus", ["nan", "inf", "-1", "0", "1e9"])
def test_a_bundle_cannot_ask_for_impossible_vcpus(tmp_path: Path, cpus: str) -> None:
    """``io.husk.cpus=nan`` or ``inf`` crashed the keeper while it sized the VM (a
    traceback instead of an error); ``1e9`` asked QEMU for a billion vCPUs."""
    from husk.ociruntime import bundle
    from test_ociruntime import make_bundle

    make_bundle(tmp_path, annotations={"io.husk.cpus": cpus})
    with pytest.raises(RuntimeFailure, match="CPU limit must be between"):
        bundle.load(tmp_path)
    make_bundle(tmp_path, linux={"resources": {"cpu": {"quota": 10**12, "period": 1}}})
    with pytest.raises(RuntimeFailure, match="CPU limit must be between"):
        bundle.load(tmp_path)


@pytest.mark.parametrize(
    ("mounts", "message"),
    [
        ([{"destination": "/a/../../etc", "type": "bind", "source": "/"}], "'..'"),
        ([{"destination": "/x", "type": "bind", "source": "relative/../x"}], "absolute host"),
        ([{"destination": "/x", "type": "nfs", "source": "srv:/"}], "not supported"),
    ],
)
def test_bundle_mounts_are_confined(tmp_path: Path, mounts: list[Any], message: str) -> None:
    """Already refused: a mount destination climbing out of the root, a relative source."""
    from husk.ociruntime import bundle
    from test_ociruntime import make_bundle

    make_bundle(tmp_path, mounts=mounts)
    with pytest.raises(RuntimeFailure, match=message):
        bundle.load(tmp_path)


def _keeper_listening_at(control: Path) -> Any:
    from husk.ociruntime.keeper import Keeper

    keeper = Keeper.__new__(Keeper)
    keeper.control_path = control
    keeper.server = None
    keeper.listen()
    return keeper


def test_the_keeper_socket_is_only_its_users(tmp_path: Path) -> None:
    control = tmp_path / "run" / "oci" / "c.sock"
    keeper = _keeper_listening_at(control)
    try:
        assert control.stat().st_mode & 0o777 == 0o600
        assert control.parent.stat().st_mode & 0o777 == 0o700
    finally:
        keeper.server.close()


@pytest.mark.usefixtures("as_root")
def test_the_keeper_refuses_a_run_directory_another_user_made(tmp_path: Path) -> None:
    """A run directory squatted by another user (``/tmp/husk-UID`` without
    XDG_RUNTIME_DIR): they could replace the keeper's socket with theirs and receive the
    engine's requests (and its stdio descriptors)."""
    from husk.paths import UnsafePath

    squatted = tmp_path / "run"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, 65534, 65534)
    with pytest.raises(UnsafePath, match="refusing to use"):
        _keeper_listening_at(squatted / "oci" / "c.sock")
    assert not (squatted / "oci").exists()


@pytest.mark.usefixtures("as_root")
def test_no_ram_holder_in_a_run_directory_another_user_made(tmp_path: Path) -> None:
    """Keepers take a boot template's RAM from the holder whose socket is in husk's run
    directory: in one another user made, they could serve keepers forged RAM (the VM's
    whole guest), so no holder is started, and one planted there is not asked."""
    from husk.ociruntime import ramholder

    squatted = tmp_path / "run"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, 65534, 65534)
    ramholder.ensure_running(squatted)
    assert not (squatted / ramholder.SOCKET_NAME).exists()
    assert not (squatted / ramholder.LOCK_NAME).exists()


_BIND_IN_OWN_NAMESPACE = """
import json, os, sys
from pathlib import Path
from husk.ociruntime import bundle, fileshare, namespaces, vmplan
namespaces.hold_mounts()
plan = vmplan.plan(bundle.load(Path(sys.argv[1])), Path(sys.argv[2]))
for file in plan.files:
    fileshare.bind(file)
seen = {}
for share in plan.shares[1:]:
    where = str(share.path)
    entry = {"listing": sorted(os.listdir(where)), "errors": []}
    name = entry["listing"][0]
    entry["content"] = open(os.path.join(where, name)).read()
    for attempt in (
        lambda: open(os.path.join(where, name), "a").write("guest\\n"),
        lambda: open(os.path.join(where, "planted"), "w").close(),
        lambda: os.unlink(os.path.join(where, name)),
        lambda: os.symlink("/etc/shadow", os.path.join(where, "link")),
    ):
        try:
            attempt()
            entry["errors"].append(None)
        except OSError as exc:
            entry["errors"].append(exc.errno)
    seen[share.tag] = entry
print(json.dumps(seen))
"""


@pytest.mark.usefixtures("as_root")
def test_a_file_bind_shares_that_file_and_nothing_beside_it(tmp_path: Path) -> None:
    """A file bind (the docker engine's /etc/hosts, podman's, ``-v FILE:...``) shared the
    file's whole directory with the VM, whose QEMU writes with DAC_OVERRIDE: a guest
    owning its VM could rewrite the docker engine's ``hostconfig.json`` beside
    ``hosts`` (``Privileged``, a bind of ``/`` at the next start) or read all of /etc
    through ``-v /etc/localtime:/etc/localtime:ro``. The share now holds that one file,
    bound in the keeper's own mount namespace (here a child's): writable only if the
    bind is, not removable, nothing can be added, and no mount is left on the host."""
    import errno
    import json
    import subprocess
    import sys

    from test_ociruntime import make_bundle

    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    (engine_dir / "hosts").write_text("127.0.0.1 localhost\n")
    (engine_dir / "hostconfig.json").write_text('{"Privileged": false}\n')
    (engine_dir / "localtime").write_text("UTC\n")
    make_bundle(
        tmp_path,
        mounts=[
            {"destination": "/etc/hosts", "type": "bind", "source": str(engine_dir / "hosts")},
            {
                "destination": "/etc/localtime",
                "type": "bind",
                "source": str(engine_dir / "localtime"),
                "options": ["ro"],
            },
        ],
    )
    private = tmp_path / "state" / "files"
    result = subprocess.run(
        [sys.executable, "-c", _BIND_IN_OWN_NAMESPACE, str(tmp_path), str(private)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["m1"]["listing"] == ["hosts"] and seen["m2"]["listing"] == ["localtime"]
    assert seen["m1"]["content"] == "127.0.0.1 localhost\n"
    assert seen["m2"]["content"] == "UTC\n"
    # Writable file, read-only file; nothing planted, removed or linked beside them.
    assert seen["m1"]["errors"] == [None, errno.EROFS, errno.EROFS, errno.EROFS]
    assert seen["m2"]["errors"] == [errno.EROFS, errno.EROFS, errno.EROFS, errno.EROFS]
    assert (engine_dir / "hosts").read_text() == "127.0.0.1 localhost\nguest\n"
    assert (engine_dir / "localtime").read_text() == "UTC\n"
    assert sorted(os.listdir(engine_dir)) == ["hostconfig.json", "hosts", "localtime"]
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    assert sorted(os.listdir(private / "m1")) == ["hosts"]
    assert (private / "m1" / "hosts").read_text() == ""  # the bind's placeholder


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_the_default_state_root_refuses_one_another_user_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """Without --root and XDG_RUNTIME_DIR the state root is ``/tmp/husk-runtime-UID``:
    another local user could make it first (or plant a symlink to a directory of theirs)
    and then read and forge our containers' state (the keeper's pid and control socket,
    which ``kill`` and ``delete`` act on). It is now checked as the daemon's run
    directory is, and refused with its owner's name."""
    other = tmp_path / "others"
    other.mkdir(mode=0o777)
    os.chown(other, 65534, 65534)
    squatted = tmp_path / "husk-runtime-0"
    if kind == "directory":
        squatted.mkdir(mode=0o777)
        os.chown(squatted, 65534, 65534)
    else:
        squatted.symlink_to(other)
    monkeypatch.setattr(state, "default_root", lambda: squatted)
    with pytest.raises(RuntimeFailure, match="refusing to use"):
        cli.run(["list"])
    assert os.listdir(other) == []
    # An explicit --root is the engine's choice, as with runc.
    assert cli.run(["--root", str(tmp_path / "mine"), "list"]) == 0
    capsys.readouterr()


@pytest.mark.usefixtures("as_root")
def test_the_keeper_makes_no_vm_directory_in_a_run_directory_another_user_made(
    tmp_path: Path,
) -> None:
    """The keeper made its VM's directory (QMP and agent sockets, which husk connects to
    by path, and the console log) under the run directory before checking it: a
    ``/tmp/husk-UID`` another user made first could swap in their own agent socket and
    receive the workload's command, environment and stdio."""
    import asyncio
    from types import SimpleNamespace

    from husk.ociruntime import bundle
    from husk.ociruntime.keeper import Keeper
    from husk.paths import UnsafePath
    from test_ociruntime import make_bundle

    squatted = tmp_path / "run"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, 65534, 65534)
    make_bundle(tmp_path)
    keeper = Keeper.__new__(Keeper)
    keeper.bundle = bundle.load(tmp_path)
    keeper.directory = tmp_path / "state" / "c"
    keeper.vm_dir = squatted / "vms" / "c"
    keeper.options = SimpleNamespace(container_id="c")
    keeper.attachment = None
    with pytest.raises(UnsafePath, match="refusing to use"):
        asyncio.run(keeper.boot())
    assert os.listdir(squatted) == []
