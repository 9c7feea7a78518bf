"""Volumes without a daemon: names, options, every mount form and its bad input, the
manager's rules (in use, force, prune, idempotent create, resolution at create)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from husk.daemon.docker.create_config import spec_from_create
from husk.errors import Conflict, InvalidArgument, NotFound, NotSupported
from husk.spec import BindMount, ContainerSpec, TmpfsMount, image_volumes
from husk.volumes import mountspec
from husk.volumes.manager import VolumeManager, VolumeUser
from husk.volumes.model import ANONYMOUS_LABEL, check_name, check_options
from husk.volumes.store import VolumeStore

# ------------------------------------------------------------------ names, options


@pytest.mark.parametrize("name", ["db", "my_vol.1-x", "A0", "x" * 255])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("", "empty"),
        ("a", "invalid characters"),  # Docker's pattern needs two characters
        ("a/b", "invalid characters"),
        ("..", "invalid characters"),
        ("a..b", "invalid characters"),
        ("-x", "invalid characters"),
        ("x" * 256, "too long"),
        ("sp ace", "invalid characters"),
    ],
)
def test_bad_names(name: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        check_name(name)


def test_options_of_the_local_driver(tmp_path: Path) -> None:
    assert check_options({}) == {}
    bind = {"type": "none", "o": "bind", "device": str(tmp_path)}
    assert check_options(bind) == bind
    with pytest.raises(NotSupported, match="type=tmpfs is not supported"):
        check_options({"type": "tmpfs", "device": "tmpfs"})
    with pytest.raises(NotSupported, match="type=nfs"):
        check_options({"type": "nfs", "o": "addr=1.2.3.4", "device": ":/x"})
    with pytest.raises(InvalidArgument, match="no such host directory"):
        check_options({"type": "none", "o": "bind", "device": str(tmp_path / "absent")})
    with pytest.raises(InvalidArgument, match="absolute"):
        check_options({"type": "none", "o": "bind", "device": "rel"})
    with pytest.raises(NotSupported, match="o=ro"):
        check_options({"type": "none", "o": "ro", "device": str(tmp_path)})
    with pytest.raises(InvalidArgument, match="'quota'"):
        check_options({"quota": "1g"})
    assert check_options({"size": "1g"}) == {"size": "1g"}
    with pytest.raises(InvalidArgument, match="need type"):
        check_options({"device": str(tmp_path)})


# ------------------------------------------------------------------ -v / Binds


def test_volume_flag_forms() -> None:
    anonymous = mountspec.parse_volume("/data")
    assert (anonymous.volume, anonymous.anonymous, anonymous.copy_up) == ("", True, True)
    named = mountspec.parse_volume("db:/var/lib/db")
    assert (named.volume, named.source, named.target, named.mode) == ("db", "", "/var/lib/db", "z")
    assert named.copy_up and not named.readonly and not named.anonymous
    quiet = mountspec.parse_volume("db:/d:ro,nocopy")
    assert quiet.readonly and not quiet.copy_up and quiet.mode == "ro,nocopy"
    bind = mountspec.parse_volume("/srv:/srv:ro,Z,rprivate")
    assert (bind.source, bind.volume, bind.readonly) == ("/srv", "", True)
    assert not mountspec.parse_volume("/srv:/srv:cached").readonly


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ("rel/path:/x", InvalidArgument, "invalid characters"),
        ("../up:/x", InvalidArgument, "invalid characters"),
        ("db:rel", InvalidArgument, "absolute path"),
        ("db:/", InvalidArgument, "can't be '/'"),
        ("relative", InvalidArgument, "absolute path"),
        ("/a:/b:rx", InvalidArgument, "invalid mode"),
        ("/a:/b:ro,rw", InvalidArgument, "invalid mode"),
        ("/a:/b:ro:x", InvalidArgument, "invalid volume specification"),
        ("/a::ro", InvalidArgument, "invalid volume specification"),
        ("/a:/b:nocopy", InvalidArgument, "volumes only"),
        ("/a:/b:rshared", NotSupported, "propagation"),
        ("db:/b:rslave", InvalidArgument, "binds only"),
    ],
)
def test_volume_flag_refusals(text: str, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        mountspec.parse_volume(text)


# ------------------------------------------------------------------ --mount / Mounts


def test_mount_flag_forms() -> None:
    volume = mountspec.parse_mount_flag(
        "type=volume,source=db,target=/d,readonly,volume-nocopy,volume-opt=type=none,"
        "volume-opt=o=bind,volume-opt=device=/tmp,volume-label=k=v"
    )
    assert volume == {
        "Type": "volume",
        "Source": "db",
        "Target": "/d",
        "ReadOnly": True,
        "VolumeOptions": {
            "NoCopy": True,
            "DriverConfig": {"Options": {"type": "none", "o": "bind", "device": "/tmp"}},
            "Labels": {"k": "v"},
        },
    }
    made = mountspec.mount_from_api(volume)
    assert isinstance(made, BindMount)
    assert (made.volume, made.readonly, made.copy_up) == ("db", True, False)
    assert made.volume_options["device"] == "/tmp" and made.volume_labels == {"k": "v"}
    anonymous = mountspec.mount_from_api(mountspec.parse_mount_flag("target=/cache"))
    assert isinstance(anonymous, BindMount) and anonymous.anonymous and anonymous.copy_up
    tmpfs = mountspec.mount_from_api(
        mountspec.parse_mount_flag("type=tmpfs,dst=/t,tmpfs-size=64m,tmpfs-mode=1770")
    )
    assert tmpfs == TmpfsMount("/t", 64 * 1024 * 1024, 0o1770)
    bind = mountspec.parse_mount_flag(
        "type=bind,src=/srv,target=/s,ro=true,bind-propagation=rprivate"
    )
    made = mountspec.mount_from_api(bind)
    assert isinstance(made, BindMount) and (made.source, made.readonly) == ("/srv", True)


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ("type=bind,source=/a,target=/b,bind-propagation=rshared", NotSupported, "propagation"),
        ("type=bind,source=rel,target=/b", InvalidArgument, "absolute host path"),
        ("type=bind,source=/a", InvalidArgument, "no target"),
        ("type=volume,source=a/b,target=/b", InvalidArgument, "invalid characters"),
        ("type=volume,source=..,target=/b", InvalidArgument, "invalid characters"),
        ("type=volume,target=rel", InvalidArgument, "absolute path"),
        ("type=tmpfs,target=/t,tmpfs-size=lots", InvalidArgument, "tmpfs-size"),
        ("type=tmpfs,target=/t,tmpfs-mode=9z", InvalidArgument, "octal"),
        ("type=tmpfs,source=x,target=/t", InvalidArgument, "no source"),
        ("type=image,target=/t", NotSupported, "mount type"),
        ("type=volume,target=/t,volume-driver=nfs", NotSupported, "driver"),
        ("type=volume,target=/t,volume-opt=type=tmpfs", NotSupported, "tmpfs"),
        ("type=volume,target=/t,volume-subpath=x", NotSupported, "subpath"),
        ("type=volume,target=/t,bogus=1", InvalidArgument, "unexpected key"),
        ("type=volume,target=/t,readonly=maybe", InvalidArgument, "true or false"),
    ],
)
def test_mount_flag_refusals(text: str, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        mountspec.parse_mount_flag(text)


def test_api_mounts_refuse_misplaced_options() -> None:
    with pytest.raises(InvalidArgument, match="VolumeOptions is for volume"):
        mountspec.mount_from_api(
            {"Type": "bind", "Source": "/a", "Target": "/b", "VolumeOptions": {"NoCopy": True}}
        )
    with pytest.raises(InvalidArgument, match="tmpfs size"):
        mountspec.mount_from_api(
            {"Type": "tmpfs", "Target": "/b", "TmpfsOptions": {"SizeBytes": "big"}}
        )


# ------------------------------------------------------------------ the create body


def test_create_body_volumes_binds_mounts_and_config_volumes() -> None:
    body: dict[str, Any] = {
        "Image": "b",
        "Volumes": {"/cache": {}, "/named": {}, "/srv": {}},
        "HostConfig": {
            "Binds": ["db:/named:ro", "/srv:/srv"],
            "Mounts": [{"Type": "volume", "Target": "/m", "VolumeOptions": {"NoCopy": True}}],
            "VolumesFrom": ["other:ro"],
        },
    }
    spec = spec_from_create(body, None)
    got = [(b.target, b.volume, b.anonymous, b.copy_up, b.readonly) for b in spec.binds]
    assert got == [
        ("/named", "db", False, True, True),
        ("/srv", "", False, False, False),
        ("/m", "", True, False, False),
        ("/cache", "", True, True, False),  # Config.Volumes nothing else covers
    ]
    assert spec.volumes_from == ["other:ro"]
    assert spec.binds_written == ["db:/named:ro", "/srv:/srv"]
    assert spec.mounts_written == body["HostConfig"]["Mounts"]
    assert ContainerSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


@pytest.mark.parametrize(
    ("host", "error", "words"),
    [
        ({"Binds": ["/a:/x", "v1:/x/"]}, InvalidArgument, "Duplicate mount point: /x"),
        ({"Binds": ["/a:/x"], "Tmpfs": {"/x": ""}}, InvalidArgument, "Duplicate mount point"),
        ({"VolumesFrom": ["c:rx"]}, InvalidArgument, "volumes-from"),
        ({"VolumeDriver": "nfs"}, NotSupported, "driver"),
    ],
)
def test_create_body_mount_refusals(
    host: dict[str, Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        spec_from_create({"Image": "b", "HostConfig": host}, None)


def test_image_volumes_and_anonymous_volumes_for_uncovered_targets() -> None:
    config = {"config": {"Volumes": {"/var/lib/db": {}, "/logs/": {}}}}
    assert image_volumes(config) == ["/logs/", "/var/lib/db"]
    made = mountspec.anonymous_volumes(image_volumes(config), ["/var/lib/db/"])
    assert [(b.target, b.anonymous, b.copy_up) for b in made] == [("/logs", True, True)]


def test_volumes_from_copies_mounts_with_the_asked_access() -> None:
    assert mountspec.parse_volumes_from("web") == ("web", None)
    assert mountspec.parse_volumes_from("web:ro") == ("web", True)
    theirs = [
        BindMount("/v/_data", "/d", volume="anon", anonymous=True, copy_up=True),
        BindMount("/srv", "/s", readonly=True),
    ]
    copied = mountspec.copied_mounts(theirs, False)
    assert [(b.volume, b.anonymous, b.copy_up, b.readonly) for b in copied] == [
        ("anon", False, False, False),  # never removed with the copying container
        ("", False, False, False),
    ]


# ------------------------------------------------------------------ the manager


class Users:
    def __init__(self) -> None:
        self.users: list[VolumeUser] = []

    def __call__(self) -> list[VolumeUser]:
        return list(self.users)


@pytest.fixture
def manager(tmp_path: Path) -> tuple[VolumeManager, Users, list[tuple[str, str]]]:
    users = Users()
    events: list[tuple[str, str]] = []
    made = VolumeManager(
        VolumeStore(tmp_path / "volumes"),
        users,
        event=lambda action, volume, **_: events.append((action, volume.name)),
    )
    return made, users, events


def test_create_is_idempotent_and_persisted(manager: Any, tmp_path: Path) -> None:
    volumes, _users, events = manager
    first = volumes.create("db", labels={"a": "1"})
    assert Path(first.mountpoint) == tmp_path / "volumes" / "db" / "_data"
    assert Path(first.mountpoint).is_dir()
    assert volumes.create("db") is first  # same driver and options: the same volume
    with pytest.raises(Conflict, match="already exists"):
        volumes.create("db", options={"type": "none", "o": "bind", "device": str(tmp_path)})
    assert events == [("create", "db")]
    reloaded = VolumeStore(tmp_path / "volumes").find("db")
    assert reloaded is not None and reloaded.labels == {"a": "1"}
    unnamed = volumes.create()
    assert len(unnamed.name) == 64 and not unnamed.anonymous
    with pytest.raises(InvalidArgument):
        volumes.create("a/b")
    assert not (tmp_path / "volumes" / "a").exists()


def test_remove_refused_in_use_and_force_ignores_only_absence(manager: Any) -> None:
    volumes, users, events = manager
    volumes.create("db")
    users.users = [VolumeUser("c" * 64, "web", ("db",))]
    with pytest.raises(Conflict, match=r"volume is in use - \[c+\] \(web\)"):
        volumes.remove("db")
    with pytest.raises(Conflict):
        volumes.remove("db", force=True)
    users.users = []
    volumes.remove("db")
    assert ("destroy", "db") in events
    with pytest.raises(NotFound, match="no such volume"):
        volumes.remove("db")
    volumes.remove("db", force=True)


def test_prune_anonymous_only_unless_all(manager: Any) -> None:
    volumes, users, _events = manager
    volumes.create("named")
    volumes.create("kept")
    anonymous = volumes.create(anonymous=True)
    used = volumes.create(anonymous=True)
    assert anonymous.labels == {ANONYMOUS_LABEL: ""}
    users.users = [VolumeUser("c" * 64, "web", (used.name, "kept"))]
    assert [v.name for v in volumes.prune(lambda _v: True)] == [anonymous.name]
    assert [v.name for v in volumes.prune(lambda _v: True, all_volumes=True)] == ["named"]
    assert sorted(v.name for v in volumes.list()) == sorted(["kept", used.name])


def test_resolve_makes_what_is_missing_and_undo_removes_it(manager: Any, tmp_path: Path) -> None:
    volumes, _users, _events = manager
    existing = volumes.create("full")
    (Path(existing.mountpoint) / "f").write_text("x")
    binds = [
        mountspec.parse_volume("full:/a"),
        mountspec.parse_volume("fresh:/b:nocopy"),
        mountspec.parse_volume("new:/c"),
        mountspec.parse_volume("/d"),
        BindMount("/srv", "/e"),
    ]
    resolved = volumes.resolve("c" * 64, binds)
    got = [(b.volume, b.copy_up, b.source) for b in resolved.binds]
    assert got[0] == ("full", False, existing.mountpoint)  # not empty: no copy-up
    assert got[1][:2] == ("fresh", False)  # nocopy
    assert got[2][:2] == ("new", True)
    assert got[3][1] is True and len(got[3][0]) == 64 and resolved.binds[3].anonymous
    assert got[4] == ("", False, "/srv")
    assert sorted(resolved.created) == sorted(["fresh", "new", got[3][0]])
    with pytest.raises(Conflict):  # held by the container being created
        volumes.remove("new")
    volumes.undo("c" * 64, resolved.created)
    assert [v.name for v in volumes.list()] == ["full"]


def test_resolve_failure_leaves_nothing(manager: Any) -> None:
    volumes, _users, _events = manager
    binds = [
        mountspec.parse_volume("one:/a"),
        BindMount("", "/b", volume="two", volume_options={"type": "tmpfs"}),
    ]
    with pytest.raises(NotSupported):
        volumes.resolve("c" * 64, binds)
    assert volumes.list() == [] and volumes.usage() == {}


def test_remove_anonymous_spares_named_and_used(manager: Any) -> None:
    volumes, users, _events = manager
    resolved = volumes.resolve(
        "c" * 64, [mountspec.parse_volume("/a"), mountspec.parse_volume("n1:/b")]
    )
    volumes.settle("c" * 64)
    anonymous = resolved.binds[0].volume
    users.users = [VolumeUser("d" * 64, "other", (anonymous,))]  # --volumes-from
    volumes.remove_anonymous(resolved.binds)
    assert sorted(v.name for v in volumes.list()) == sorted([anonymous, "n1"])
    users.users = []
    volumes.remove_anonymous(resolved.binds)
    assert [v.name for v in volumes.list()] == ["n1"]


# ------------------------------------------------------------------ the CLI's create body


def test_cli_volume_options_become_binds_mounts_and_volumes_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from husk.cli.createopts import build_create_request

    monkeypatch.chdir(tmp_path)
    options: dict[str, Any] = {
        "env": (),
        "env_file": (),
        "tmpfs": (),
        "publish": (),
        "expose": (),
        "label": (),
        "label_file": (),
        "restart": "no",
        "pull_policy": "missing",
        "volume": ("./conf:/etc/app:ro", "data:/data", "/anon"),
        "mounts": ("type=volume,src=logs,dst=/logs,volume-nocopy",),
        "volumes_from": ("web:ro",),
    }
    host = build_create_request("img", (), options, attach=False).body["HostConfig"]
    assert host["Binds"] == [f"{tmp_path}/conf:/etc/app:ro", "data:/data", "/anon"]
    assert host["Mounts"] == [
        {"Type": "volume", "Source": "logs", "Target": "/logs", "VolumeOptions": {"NoCopy": True}}
    ]
    assert host["VolumesFrom"] == ["web:ro"]
