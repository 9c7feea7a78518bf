"""Networks (Docker's model, kept by husk.network)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from husk.daemon.docker import shapes
from husk.daemon.docker.context import context
from husk.daemon.docker.create_config import endpoint_request
from husk.daemon.docker.errors import json_reply
from husk.daemon.docker.params import (
    filters_of,
    iso_to_unix,
    json_body,
    label_matches,
    parse_timestamp,
)
from husk.daemon.docker.routing import add_route
from husk.errors import InvalidArgument, NotSupported
from husk.network.manager import NetworkManager
from husk.network.model import LOCAL_SCOPE, Network

NETWORK_FILTERS = {"name", "id", "driver", "scope", "type", "label", "dangling"}
PRUNE_FILTERS = {"label", "until"}
NETWORK_TYPES = ("custom", "builtin")


def _manager(request: web.Request) -> NetworkManager:
    return context(request).runtime.networks


def _search(pattern: str, text: str) -> bool:
    """Docker matches name and id filters as regular expressions (substring search)."""
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return pattern in text


def _bool_filter(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise InvalidArgument(f"invalid filter '{key}={value}': expected true or false")


def network_listed(network: Network, in_use: bool, filters: dict[str, list[str]]) -> bool:
    """Docker's network filters: values of one key are alternatives, keys must all hold."""
    for key, values in filters.items():
        if not values:
            continue
        if key == "name":
            ok = any(_search(v, network.name) for v in values)
        elif key == "id":
            ok = any(_search(v, network.id) for v in values)
        elif key == "driver":
            ok = network.driver in values
        elif key == "scope":
            ok = LOCAL_SCOPE in values
        elif key == "type":
            for value in values:
                if value not in NETWORK_TYPES:
                    raise InvalidArgument(f"invalid filter: 'type'='{value}'")
            ok = ("builtin" if network.predefined else "custom") in values
        elif key == "label":
            ok = label_matches(network.labels, values)
        elif key == "dangling":
            dangling = network.user_defined and not in_use
            ok = any(_bool_filter(key, v) == dangling for v in values)
        else:
            ok = False
        if not ok:
            return False
    return True


def _network_json(manager: NetworkManager, network: Network) -> dict[str, Any]:
    return shapes.network_json(network, manager.members_of(network))


async def list_networks(request: web.Request) -> web.StreamResponse:
    filters = filters_of(request, NETWORK_FILTERS)
    manager = _manager(request)
    listed = []
    for network in manager.list():
        document = _network_json(manager, network)
        if network_listed(network, bool(document["Containers"]), filters):
            listed.append(document)
    return json_reply(listed)


async def inspect_network(request: web.Request) -> web.StreamResponse:
    manager = _manager(request)
    return json_reply(_network_json(manager, manager.get(request.match_info["id"])))


def _string_map(value: Any, field: str) -> dict[str, str]:
    if not value:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"invalid {field}: expected an object")
    return {str(k): str(v) for k, v in value.items()}


def _ipam(value: Any) -> tuple[str | None, str | None]:
    """(subnet, gateway) of the create body's IPAM (one IPv4 pool at most)."""
    if not value:
        return None, None
    if not isinstance(value, dict):
        raise InvalidArgument("invalid IPAM: expected an object")
    driver = value.get("Driver") or "default"
    if driver != "default":
        raise NotSupported(f'IPAM driver "{driver}" is not supported by husk (only default)')
    if value.get("Options"):
        raise NotSupported("IPAM options are not supported by husk")
    configs = value.get("Config") or []
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise InvalidArgument("invalid IPAM.Config: expected a list of objects")
    if len(configs) > 1:
        raise NotSupported("husk networks have one IPv4 subnet: give one IPAM.Config at most")
    if not configs:
        return None, None
    config = configs[0]
    for key, what in (("IPRange", "--ip-range"), ("AuxiliaryAddresses", "--aux-address")):
        if config.get(key):
            raise NotSupported(f"{what} (IPAM.Config.{key}) is not supported by husk")
    subnet = str(config.get("Subnet") or "") or None
    gateway = str(config.get("Gateway") or "") or None
    return subnet, gateway


async def create_network(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    name = body.get("Name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("a network needs a name (Name)")
    if body.get("Ingress"):
        raise NotSupported("ingress networks (swarm) are not supported by husk")
    if body.get("ConfigOnly") or (body.get("ConfigFrom") or {}).get("Network"):
        raise NotSupported("configuration-only networks are not supported by husk")
    scope = body.get("Scope") or LOCAL_SCOPE
    if scope != LOCAL_SCOPE:
        raise NotSupported(f"network scope {scope!r} is not supported by husk (only local)")
    subnet, gateway = _ipam(body.get("IPAM"))
    network = await _manager(request).create(
        name,
        driver=str(body.get("Driver") or ""),
        subnet=subnet,
        gateway=gateway,
        internal=bool(body.get("Internal")),
        attachable=bool(body.get("Attachable")),
        labels=_string_map(body.get("Labels"), "Labels"),
        options=_string_map(body.get("Options"), "Options"),
        ipv6=bool(body.get("EnableIPv6")),
    )
    return json_reply({"Id": network.id, "Warning": ""}, status=201)


def _container_of(body: dict[str, Any]) -> str:
    container = body.get("Container")
    if not isinstance(container, str) or not container:
        raise InvalidArgument("no container given (Container)")
    return container


async def connect_network(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    network = request.match_info["id"]
    aliases, ipv4 = endpoint_request(body.get("EndpointConfig"), network)
    await _manager(request).connect(network, _container_of(body), aliases=aliases, ipv4=ipv4)
    return web.Response(status=200)


async def disconnect_network(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    await _manager(request).disconnect(
        request.match_info["id"], _container_of(body), force=bool(body.get("Force"))
    )
    return web.Response(status=200)


async def remove_network(request: web.Request) -> web.StreamResponse:
    await _manager(request).remove(request.match_info["id"])
    return web.Response(status=204)


async def prune_networks(request: web.Request) -> web.StreamResponse:
    filters = filters_of(request, PRUNE_FILTERS)
    until = parse_timestamp(filters["until"][-1], "until") if filters.get("until") else None
    labels = filters.get("label") or []

    def wanted(network: Network) -> bool:
        if until is not None and iso_to_unix(network.created) >= until:
            return False
        return label_matches(network.labels, labels)

    removed = await _manager(request).prune(wanted)
    return json_reply({"NetworksDeleted": [n.name for n in removed] or None})


def register(app: web.Application) -> None:
    add_route(app, "GET", "/networks", list_networks)
    add_route(app, "POST", "/networks/create", create_network)
    add_route(app, "POST", "/networks/prune", prune_networks)
    add_route(app, "GET", "/networks/{id}", inspect_network)
    add_route(app, "DELETE", "/networks/{id}", remove_network)
    add_route(app, "POST", "/networks/{id}/connect", connect_network)
    add_route(app, "POST", "/networks/{id}/disconnect", disconnect_network)
