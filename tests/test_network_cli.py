"""``run/create --network/--network-alias/--ip`` become Docker's create body (no daemon)."""

from __future__ import annotations

from typing import Any

import pytest

from husk.cli.createopts import build_create_request
from husk.daemon.docker.create_config import spec_from_create
from husk.errors import InvalidArgument, NotSupported


def _body(**options: Any) -> dict[str, Any]:
    return build_create_request("busybox", (), options, attach=False).body


def test_networks_aliases_and_address_go_to_the_first_network() -> None:
    body = _body(networks=("web", "back"), network_alias=("api",), ip="10.1.0.5")
    assert body["HostConfig"]["NetworkMode"] == "web"
    assert body["NetworkingConfig"] == {
        "EndpointsConfig": {
            "web": {"Aliases": ["api"], "IPAMConfig": {"IPv4Address": "10.1.0.5"}},
            "back": {},
        }
    }
    spec = spec_from_create(body, None)
    assert spec.network_mode == "web"
    assert [(r.network, r.aliases, r.ipv4) for r in spec.networks] == [
        ("web", ["api"], "10.1.0.5"),
        ("back", [], None),
    ]
    plain = _body()
    assert "NetworkingConfig" not in plain and "NetworkMode" not in plain["HostConfig"]
    assert spec_from_create(plain, None).networks == []


def test_bad_network_options_are_refused_before_the_daemon() -> None:
    with pytest.raises(InvalidArgument, match="specified multiple times"):
        _body(networks=("web", "web"))
    with pytest.raises(InvalidArgument, match="IP address"):
        _body(networks=("web",), ip="10.1.0")


def test_the_mode_network_comes_first_and_host_or_container_modes_are_refused() -> None:
    body = {
        "Image": "x",
        "HostConfig": {"NetworkMode": "b"},
        "NetworkingConfig": {"EndpointsConfig": {"a": {}, "b": {"Aliases": ["x"]}}},
    }
    assert [r.network for r in spec_from_create(body, None).networks] == ["b", "a"]
    only_others = {**body, "NetworkingConfig": {"EndpointsConfig": {"a": {}}}}
    assert [r.network for r in spec_from_create(only_others, None).networks] == ["b", "a"]
    for mode in ("host", "container:abc"):
        with pytest.raises(NotSupported, match="not supported"):
            spec_from_create({"Image": "x", "HostConfig": {"NetworkMode": mode}}, None)
    disabled = spec_from_create({"Image": "x", "NetworkDisabled": True}, None)
    assert disabled.network_mode == "none"
    with pytest.raises(NotSupported, match="IPv6"):
        ipv6 = {"IPAMConfig": {"IPv6Address": "fd00::5"}}
        spec_from_create({"Image": "x", "NetworkingConfig": {"EndpointsConfig": {"a": ipv6}}}, None)
