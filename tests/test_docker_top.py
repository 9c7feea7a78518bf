"""``docker top``'s ps options and the guest's process list, without a VM."""

from __future__ import annotations

import pytest

from husk.daemon.docker import top
from husk.errors import NotSupported
from husk.runtime.container import _process_row

PROCESSES: list[dict[str, int | str]] = [
    {"pid": 1, "ppid": 0, "uid": 0, "time": "0:00", "cmd": "sh -c sleep 300", "comm": "sh"},
    {"pid": 7, "ppid": 1, "uid": 1000, "time": "0:01", "cmd": "sleep 300", "comm": "sleep"},
]


@pytest.mark.parametrize("ps_args", ["", "-ef", "  -e  -f ", "-A"])
def test_the_default_columns(ps_args: str) -> None:
    titles, keys = top.columns(ps_args)
    assert titles == ["UID", "PID", "PPID", "TIME", "CMD"]
    assert top.rows(PROCESSES, keys)[1] == ["1000", "7", "1", "0:01", "sleep 300"]


def test_a_column_list_as_docker_top_minus_o() -> None:
    titles, keys = top.columns("-o pid,args")
    assert titles == ["PID", "COMMAND"]
    assert top.rows(PROCESSES, keys) == [["1", "sh -c sleep 300"], ["7", "sleep 300"]]


def test_renamed_headers_and_other_spellings() -> None:
    assert top.columns("-eo pid=P,comm") == (["P", "COMMAND"], ["pid", "comm"])
    assert top.columns("o user ppid") == (["USER", "PPID"], ["uid", "ppid"])
    assert top.columns("-o=uid,time") == (["UID", "TIME"], ["uid", "time"])


@pytest.mark.parametrize("ps_args", ["aux", "-o pid,rss", "--forest", "-o ,"])
def test_options_husk_cannot_lay_out_are_refused_by_name(ps_args: str) -> None:
    with pytest.raises(NotSupported) as caught:
        top.columns(ps_args)
    assert repr(ps_args) in str(caught.value)


def test_the_guests_list_keeps_only_known_fields_of_the_right_types() -> None:
    row = _process_row(
        {"pid": "1; rm -rf /", "ppid": 3, "uid": 2.5, "cmd": "x" * 100_000, "evil": [1], "time": 9}
    )
    assert row["pid"] == 0 and row["ppid"] == 3 and row["uid"] == 0
    assert row["time"] == "" and "evil" not in row
    assert len(str(row["cmd"])) == 4096
    assert row["comm"] == "x" * 4096


def test_a_process_without_a_name_is_named_from_its_command() -> None:
    assert _process_row({"pid": 2, "cmd": "/usr/bin/sleep 5"})["comm"] == "sleep"


def test_endpoint_settings_husk_cannot_honour_are_refused() -> None:
    from husk.daemon.docker.create_config import spec_from_create

    empty = {"default": {"Aliases": None, "IPAMConfig": None, "GwPriority": 0, "MacAddress": ""}}
    spec = spec_from_create({"Image": "x", "NetworkingConfig": {"EndpointsConfig": empty}}, None)
    assert [r.network for r in spec.networks] == ["bridge"]
    for key, value in (("GwPriority", 10), ("MacAddress", "02:42:00:00:00:01")):
        body = {"Image": "x", "NetworkingConfig": {"EndpointsConfig": {"default": {key: value}}}}
        with pytest.raises(NotSupported, match=f"default\\.{key}\\) is not supported"):
            spec_from_create(body, None)


def test_tmpfs_options_are_shown_as_written_and_unknown_mount_options_refused() -> None:
    from husk.daemon.docker.create_config import spec_from_create

    spec = spec_from_create(
        {"Image": "x", "HostConfig": {"Tmpfs": {"/tmp": "", "/r": "size=1m"}}}, None
    )
    assert [t.written for t in spec.tmpfs] == ["", "size=1m"]
    mount = {"Type": "tmpfs", "Target": "/t", "TmpfsOptions": {"Options": [["noexec"]]}}
    with pytest.raises(NotSupported, match=r"TmpfsOptions\.Options"):
        spec_from_create({"Image": "x", "HostConfig": {"Mounts": [mount]}}, None)
