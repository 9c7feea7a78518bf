"""Docker's network model as husk keeps it: networks and the endpoints containers hold.

A :class:`Network` is persisted by :mod:`husk.network.store`; an :class:`Endpoint` lives
in the record of the container that holds it (``networks``: network name → endpoint), so
the addresses in use on a network are always the ones the container records say.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

from husk import timestamps
from husk.errors import HuskError
from husk.guest.netconfig import LAN_MTU

DEFAULT_NETWORK = "bridge"
"""The network a container joins when it names none (Docker's default ``bridge``)."""
DEFAULT_SUBNET = "172.17.0.0/16"
DEFAULT_GATEWAY = "172.17.0.1"
NONE_NETWORK = "none"
HOST_NETWORK = "host"
PREDEFINED = (DEFAULT_NETWORK, HOST_NETWORK, NONE_NETWORK)
"""Networks that always exist and cannot be removed, as Docker lists them."""
DEFAULT_MODES = ("", "default", DEFAULT_NETWORK)
"""NetworkMode values that mean the default network."""

BRIDGE_DRIVER = "bridge"
DRIVERS = {DEFAULT_NETWORK: BRIDGE_DRIVER, HOST_NETWORK: "host", NONE_NETWORK: "null"}
MTU_OPTION = "com.docker.network.driver.mtu"
LOCAL_SCOPE = "local"


class Forbidden(HuskError):
    """403: what Docker forbids (removing a pre-defined network, or one in use)."""

    http_status = 403
    kind = "forbidden"


def new_id() -> str:
    return secrets.token_hex(32)


@dataclass
class Network:
    id: str
    name: str
    driver: str = BRIDGE_DRIVER
    subnet: str = ""
    """IPv4 CIDR; "" for ``host`` and ``none``, which have no addresses."""
    gateway: str = ""
    subnet_configured: bool = False
    """The user chose the subnet (Docker allows ``--ip`` only on such networks)."""
    internal: bool = False
    attachable: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=timestamps.now)

    @property
    def predefined(self) -> bool:
        return self.name in PREDEFINED

    @property
    def user_defined(self) -> bool:
        """Docker's "custom" networks: the ones with names, aliases and an embedded DNS."""
        return not self.predefined

    @property
    def addressed(self) -> bool:
        """Whether members get addresses (``bridge`` and user networks; not host/none)."""
        return bool(self.subnet)

    @property
    def prefix_len(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen if self.subnet else 0

    @property
    def mtu(self) -> int:
        """The option ``com.docker.network.driver.mtu`` (checked at create), else LAN_MTU."""
        text = self.options.get(MTU_OPTION)
        return int(text) if text else LAN_MTU

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Network:
        """Raises ValueError or TypeError for a document that is not a network."""
        if not isinstance(data, dict):
            raise ValueError("the network record is not a JSON object")
        known = set(cls.__dataclass_fields__)
        network = cls(**{k: v for k, v in data.items() if k in known})
        for name in ("id", "name", "driver", "subnet", "gateway", "created"):
            if not isinstance(getattr(network, name), str):
                raise ValueError(f"the network record's {name} is not a string")
        if network.subnet:
            ipaddress.IPv4Network(network.subnet)
            ipaddress.IPv4Address(network.gateway)
        network.labels = {str(k): str(v) for k, v in dict(network.labels).items()}
        network.options = {str(k): str(v) for k, v in dict(network.options).items()}
        return network


def mac_for(address: str) -> str:
    """Docker's bridge MAC: ``02:42:`` followed by the IPv4 address's four bytes."""
    packed = ipaddress.IPv4Address(address).packed
    return "02:42:" + ":".join(f"{b:02x}" for b in packed)


@dataclass
class Endpoint:
    """A container's membership of one network: its LAN slot and its address there."""

    network_id: str
    network_name: str
    slot: int
    """The VM's LAN slot (1..LAN_SLOTS) that carries this network; 0 for a network
    without addresses (never used: ``host`` and ``none`` take no endpoints)."""
    address: str
    prefix_len: int
    gateway: str
    mac: str
    aliases: list[str] = field(default_factory=list)
    endpoint_id: str = field(default_factory=new_id)
    ipam_address: str = ""
    """The address the client asked for (``--ip``), shown as IPAMConfig.IPv4Address."""

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefix_len}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Endpoint:
        """Raises ValueError or TypeError for a document that is not an endpoint."""
        if not isinstance(data, dict):
            raise ValueError("the endpoint is not a JSON object")
        known = set(cls.__dataclass_fields__)
        endpoint = cls(**{k: v for k, v in data.items() if k in known})
        if not isinstance(endpoint.slot, int) or not isinstance(endpoint.prefix_len, int):
            raise ValueError("the endpoint's slot or prefix is not a number")
        ipaddress.IPv4Address(endpoint.address)
        endpoint.aliases = [str(a) for a in endpoint.aliases]
        return endpoint


def endpoints_from_json(data: Any) -> dict[str, Endpoint]:
    """A record's ``networks`` (name → endpoint); raises ValueError for anything else."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("the record's networks are not a JSON object")
    return {str(name): Endpoint.from_json(value) for name, value in data.items()}


@dataclass
class Member:
    """A container as the network layer sees it (built by the runtime from its record)."""

    id: str
    name: str
    running: bool = False
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    """Network name → endpoint, as the record holds them."""
    network_mode: str = ""
    hostname: str = ""
    """The host name the container was given (``--hostname``), "" if none."""
    labels: dict[str, str] = field(default_factory=dict)
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    dns_options: list[str] = field(default_factory=list)
    extra_hosts: list[str] = field(default_factory=list)
    """``name:address`` entries (``--add-host``), host-gateway already resolved."""

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def isolated(self) -> bool:
        """``--network none``: no networks, no egress, and none can be connected."""
        return self.network_mode == NONE_NETWORK
