"""Docker's JSON shapes, built from husk's records.

Docker clients decode these with fixed Go structs or dict lookups, so field
names, types and the zero values of absent things follow Docker exactly:
container names carry a leading "/", list entries give ``Created`` as unix
seconds, inspect gives RFC 3339 timestamps with nanoseconds.
"""

from __future__ import annotations

import math
import shlex
import time
from typing import TYPE_CHECKING, Any

from husk import sizes
from husk.daemon.docker import create_config
from husk.daemon.docker.params import iso_to_unix, nanos_to_iso
from husk.daemon.docker.routing import LATEST, ApiVersion
from husk.humanize import human_duration
from husk.network.model import (
    DEFAULT_MODES,
    DEFAULT_NETWORK,
    LOCAL_SCOPE,
    PREDEFINED,
    Endpoint,
    Member,
    Network,
)
from husk.oci.inspect import image_inspect as store_view
from husk.oci.reference import parse_reference
from husk.oci.store import ImageRecord
from husk.runtime.model import ZERO_TIME, ContainerRecord, ContainerState
from husk.spec import BindMount, ContainerSpec

if TYPE_CHECKING:
    from husk.runtime.execs import ExecRecord


# ------------------------------------------------------------------ helpers


def familiar(name: str) -> str:
    """``docker.io/library/busybox:latest`` → ``busybox:latest``, as Docker shows names."""
    try:
        ref = parse_reference(name, default_tag=False)
    except Exception:
        return name
    text = ref.familiar_repository
    if ref.tag is not None:
        text += f":{ref.tag}"
    if ref.digest is not None:
        text += f"@{ref.digest}"
    return text


def status_text(state: ContainerState, now: float | None = None) -> str:
    """The ``Status`` column of ``docker ps``: ``Up 3 minutes (healthy)``, ``Exited (0) …``."""
    now = time.time() if now is None else now
    status = state.status
    if status in ("running", "paused"):
        text = "Up " + human_duration(now - iso_to_unix(state.started_at))
        if status == "paused":
            return text + " (Paused)"
        if state.health == "starting":
            return text + " (health: starting)"
        if state.health:
            return text + f" ({state.health})"
        return text
    if status == "restarting":
        ago = human_duration(now - iso_to_unix(state.finished_at))
        return f"Restarting ({state.exit_code}) {ago} ago"
    if status == "removing":
        return "Removal In Progress"
    if status == "dead":
        return "Dead"
    if status == "exited":
        if state.finished_at == ZERO_TIME:
            return f"Exited ({state.exit_code})"
        ago = human_duration(now - iso_to_unix(state.finished_at))
        return f"Exited ({state.exit_code}) {ago} ago"
    return "Created"


def _command_text(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) if a == "" or " " in a else a for a in argv)


def _port_entries(ports: dict[str, list[dict[str, str]]]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for key, bindings in sorted(ports.items()):
        number, _, proto = key.partition("/")
        private = int(number)
        if not bindings:
            entries.append({"PrivatePort": private, "Type": proto or "tcp"})
            continue
        for binding in bindings:
            entry: dict[str, Any] = {"PrivatePort": private, "Type": proto or "tcp"}
            if binding.get("HostPort"):
                entry["IP"] = binding.get("HostIp") or "0.0.0.0"
                entry["PublicPort"] = int(binding["HostPort"])
            entries.append(entry)
    return entries


def _all_ports(record: ContainerRecord) -> dict[str, list[dict[str, str]] | None]:
    """Published ports with their bindings, exposed-only ports as null (inspect's shape)."""
    ports: dict[str, list[dict[str, str]] | None] = {}
    for key in record.spec.exposed_ports:
        ports[key] = None
    for key, bindings in record.ports.items():
        ports[key] = list(bindings)
    return ports


def _bind_mount_json(bind: BindMount) -> dict[str, Any]:
    """One bind or volume mount as Docker's ``Mounts`` shows it."""
    if bind.volume:
        return {
            "Type": "volume",
            "Name": bind.volume,
            "Source": bind.source,
            "Destination": bind.target,
            "Driver": "local",
            "Mode": bind.mode,
            "RW": not bind.readonly,
            "Propagation": "",
        }
    return {
        "Type": "bind",
        "Source": bind.source,
        "Destination": bind.target,
        "Mode": bind.mode,
        "RW": not bind.readonly,
        "Propagation": "rprivate",
    }


def _binds_written(spec: ContainerSpec) -> list[str] | None:
    """HostConfig.Binds as the client gave them; for a spec made in-process (no API
    body), its plain binds."""
    if spec.binds_written is not None or spec.mounts_written is not None:
        return list(spec.binds_written or []) or None
    plain = [b for b in spec.binds if not b.volume and not b.anonymous]
    return [f"{b.source}:{b.target}{':ro' if b.readonly else ''}" for b in plain] or None


def _mounts(record: ContainerRecord) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [_bind_mount_json(bind) for bind in record.spec.binds]
    mounts.extend(
        {
            "Type": "tmpfs",
            "Source": "",
            "Destination": tmpfs.target,
            "Mode": tmpfs.options(),
            "RW": True,
            "Propagation": "",
        }
        for tmpfs in record.spec.tmpfs
    )
    return mounts


def network_mode(record: ContainerRecord) -> str:
    """HostConfig.NetworkMode as Docker shows it: the default network is ``bridge``."""
    mode = record.spec.network_mode
    return DEFAULT_NETWORK if mode in DEFAULT_MODES else mode


def endpoint_json(record: ContainerRecord, endpoint: Endpoint) -> dict[str, Any]:
    """One entry of NetworkSettings.Networks: the endpoint's address is the container's
    from create to removal (husk keeps it across stop/start)."""
    user_defined = endpoint.network_name not in PREDEFINED
    names = [record.name, *endpoint.aliases, record.id[:12]]
    if record.spec.hostname:
        names.append(record.spec.hostname)
    return {
        "IPAMConfig": {"IPv4Address": endpoint.ipam_address} if endpoint.ipam_address else None,
        "Links": None,
        "Aliases": list(endpoint.aliases) or None,
        "MacAddress": endpoint.mac,
        "DriverOpts": None,
        "GwPriority": 0,
        "NetworkID": endpoint.network_id,
        "EndpointID": endpoint.endpoint_id,
        "Gateway": endpoint.gateway,
        "IPAddress": endpoint.address,
        "IPPrefixLen": endpoint.prefix_len,
        "IPv6Gateway": "",
        "GlobalIPv6Address": "",
        "GlobalIPv6PrefixLen": 0,
        "DNSNames": list(dict.fromkeys(names)) if user_defined else None,
    }


def _networks_json(record: ContainerRecord) -> dict[str, Any]:
    return {
        name: endpoint_json(record, endpoint)
        for name, endpoint in sorted(record.networks.items(), key=lambda item: item[1].slot)
    }


# --------------------------------------------------------------- containers


def container_summary(record: ContainerRecord) -> dict[str, Any]:
    """One entry of ``GET /containers/json``."""
    spec = record.spec
    return {
        "Id": record.id,
        "Names": ["/" + record.name],
        "Image": record.image_ref or spec.image,
        "ImageID": record.image_id,
        "Command": _command_text(record.argv),
        "Created": int(iso_to_unix(record.created)),
        "Ports": _port_entries(record.ports),
        "Labels": dict(spec.labels),
        "State": record.state.status,
        "Status": status_text(record.state),
        "HostConfig": {"NetworkMode": network_mode(record)},
        "NetworkSettings": {"Networks": _networks_json(record)},
        "Mounts": _mounts(record),
    }


def _health(state: ContainerState) -> dict[str, Any] | None:
    if not state.health:
        return None
    return {
        "Status": state.health,
        "FailingStreak": state.failing_streak,
        "Log": [
            {
                "Start": str(entry.get("Start") or entry.get("start") or ZERO_TIME),
                "End": str(entry.get("End") or entry.get("end") or ZERO_TIME),
                "ExitCode": int(entry.get("ExitCode", entry.get("exit_code", 0)) or 0),
                "Output": str(entry.get("Output") or entry.get("output") or ""),
            }
            for entry in state.health_log
        ],
    }


def _healthcheck_config(record: ContainerRecord) -> dict[str, Any] | None:
    check = record.spec.healthcheck
    if check is None:
        return None
    test = list(check.test)
    if test and test[0] not in ("CMD", "CMD-SHELL", "NONE"):
        test = ["CMD", *test]
    return {
        "Test": test,
        "Interval": int(check.interval * 1e9),
        "Timeout": int(check.timeout * 1e9),
        "Retries": check.retries,
        "StartPeriod": int(check.start_period * 1e9),
    }


def effective_command(
    record: ContainerRecord, image_config: dict[str, Any] | None
) -> tuple[list[str] | None, list[str] | None]:
    """Config's (Entrypoint, Cmd) as Docker reports them: the spec's, else the image's."""
    spec = record.spec
    image = (image_config or {}).get("config") or {}
    entrypoint = spec.entrypoint if spec.entrypoint is not None else image.get("Entrypoint")
    if spec.cmd:
        cmd: list[str] | None = list(spec.cmd)
    elif spec.entrypoint is None:
        cmd = image.get("Cmd")
    else:
        cmd = None
    return (list(entrypoint) if entrypoint else None), (list(cmd) if cmd else None)


def container_inspect(
    record: ContainerRecord,
    exec_ids: list[str] | None,
    image_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``GET /containers/{id}/json``."""
    spec = record.spec
    entrypoint, cmd = effective_command(record, image_config)
    state = record.state
    argv = list(record.argv) or ["true"]
    state_json: dict[str, Any] = {
        "Status": state.status,
        "Running": state.status in ("running", "paused"),
        "Paused": state.status == "paused",
        "Restarting": state.status == "restarting",
        "OOMKilled": state.oom_killed,
        "Dead": state.status == "dead",
        "Pid": state.pid if state.running else 0,
        "ExitCode": state.exit_code,
        "Error": state.error,
        "StartedAt": state.started_at,
        "FinishedAt": state.finished_at,
    }
    health = _health(state)
    if health is not None:
        state_json["Health"] = health
    port_bindings = {
        p.key(): [{"HostIp": p.host_ip, "HostPort": str(p.host_port) if p.host_port else ""}]
        for p in spec.ports
    }
    host_config: dict[str, Any] = {
        "Binds": _binds_written(spec),
        "ContainerIDFile": "",
        "LogConfig": {"Type": "json-file", "Config": {}},
        "NetworkMode": network_mode(record),
        "PortBindings": port_bindings,
        "RestartPolicy": {
            "Name": spec.restart.name,
            "MaximumRetryCount": spec.restart.max_retries,
        },
        "AutoRemove": spec.auto_remove,
        "VolumeDriver": "",
        "VolumesFrom": list(spec.volumes_from) or None,
        "ConsoleSize": [0, 0],
        "CapAdd": None,
        "CapDrop": None,
        "CgroupnsMode": "",
        "Dns": [],
        "DnsOptions": [],
        "DnsSearch": [],
        "ExtraHosts": None,
        "GroupAdd": None,
        "IpcMode": "private",
        "Cgroup": "",
        "Links": None,
        "OomScoreAdj": 0,
        "PidMode": "",
        "Privileged": spec.privileged,
        "PublishAllPorts": spec.publish_all,
        "ReadonlyRootfs": False,
        "SecurityOpt": None,
        "UTSMode": "",
        "UsernsMode": "",
        "ShmSize": 67108864,
        "Runtime": "husk",
        "Isolation": "",
        "CpuShares": 0,
        "Memory": spec.memory or 0,
        "NanoCpus": sizes.cpus_to_nanos(spec.cpus or 0),
        "CgroupParent": "",
        "BlkioWeight": 0,
        "CpuPeriod": 0,
        "CpuQuota": 0,
        "CpusetCpus": "",
        "CpusetMems": "",
        "Devices": [],
        "MemoryReservation": 0,
        "MemorySwap": 0,
        "MemorySwappiness": None,
        "OomKillDisable": False,
        "PidsLimit": None,
        "Ulimits": None,
        "Mounts": [dict(m) for m in spec.mounts_written] if spec.mounts_written else None,
        "Tmpfs": {t.target: t.written if t.written is not None else t.options() for t in spec.tmpfs}
        or None,
        "Init": True if spec.init else None,
    }
    host_config.update(create_config.inspect_fields(spec))
    config: dict[str, Any] = {
        "Hostname": spec.hostname or record.id[:12],
        "Domainname": "",
        "User": record.user,
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "ExposedPorts": {key: {} for key in sorted(_all_ports(record))} or None,
        "Tty": spec.tty,
        "OpenStdin": spec.open_stdin,
        "StdinOnce": False,
        "Env": list(record.env),
        "Cmd": cmd,
        "Image": record.image_ref or spec.image,
        "Volumes": {b.target: {} for b in spec.binds if b.anonymous} or None,
        "WorkingDir": record.workdir if record.workdir != "/" or spec.workdir else "",
        "Entrypoint": entrypoint,
        "OnBuild": None,
        "Labels": dict(spec.labels),
        "StopSignal": record.stop_signal,
        "StopTimeout": record.stop_timeout,
    }
    healthcheck = _healthcheck_config(record)
    if healthcheck is not None:
        config["Healthcheck"] = healthcheck
    default = record.networks.get(DEFAULT_NETWORK)
    endpoint = endpoint_json(record, default) if default is not None else None
    network_settings: dict[str, Any] = {
        "Bridge": "",
        "SandboxID": "",
        "SandboxKey": "",
        "HairpinMode": False,
        "LinkLocalIPv6Address": "",
        "LinkLocalIPv6PrefixLen": 0,
        "Ports": _all_ports(record) if state.running else {},
        "SecondaryIPAddresses": None,
        "SecondaryIPv6Addresses": None,
        # Docker's deprecated top-level fields: the default bridge network's endpoint.
        "EndpointID": endpoint["EndpointID"] if endpoint else "",
        "Gateway": endpoint["Gateway"] if endpoint else "",
        "GlobalIPv6Address": "",
        "GlobalIPv6PrefixLen": 0,
        "IPAddress": endpoint["IPAddress"] if endpoint else "",
        "IPPrefixLen": endpoint["IPPrefixLen"] if endpoint else 0,
        "IPv6Gateway": "",
        "MacAddress": endpoint["MacAddress"] if endpoint else "",
        "Networks": _networks_json(record),
        "HuskOverlay": (record.overlay or None) if state.running else None,
    }
    return {
        "Id": record.id,
        "Created": record.created,
        "Path": argv[0],
        "Args": argv[1:],
        "State": state_json,
        "Image": record.image_id,
        "ResolvConfPath": "",
        "HostnamePath": "",
        "HostsPath": "",
        "LogPath": "",
        "Name": "/" + record.name,
        "RestartCount": state.restart_count,
        "Driver": "husk",
        "Platform": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "",
        "ExecIDs": exec_ids or None,
        "HostConfig": host_config,
        "GraphDriver": {"Data": None, "Name": "husk"},
        "Mounts": _mounts(record),
        "Config": config,
        "NetworkSettings": network_settings,
    }


def exec_inspect(record: ExecRecord, container: ContainerRecord | None) -> dict[str, Any]:
    spec = record.spec
    argv = list(spec.argv)
    return {
        "ID": record.id,
        "Running": record.running,
        "ExitCode": record.exit_code,
        "ProcessConfig": {
            "privileged": False,
            "user": spec.user,
            "tty": spec.tty,
            "entrypoint": argv[0] if argv else "",
            "arguments": argv[1:],
        },
        "OpenStdin": spec.stdin,
        "OpenStderr": True,
        "OpenStdout": True,
        "CanRemove": False,
        "ContainerID": record.container_id if container is None else container.id,
        "DetachKeys": spec.detach_keys,
        "Pid": record.pid,
    }


# -------------------------------------------------------------------- stats


UINT32_MAX = (1 << 32) - 1
INT64_MAX = (1 << 63) - 1


def guest_count(sample: dict[str, Any] | None, key: str, high: int = INT64_MAX) -> int:
    """A figure of ``sample`` as a count Docker's clients decode: an integer in [0, high].

    The figures come from the guest (shape-checked by husk.agent.messages, but stats
    documents must never fail whatever a sample holds): anything that is not a finite
    number counts 0, and numbers are clamped. Docker's Go types are unsigned, some of
    32 bits (``online_cpus``): a value beyond them would make ``docker stats`` fail.
    """
    value = (sample or {}).get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float):
        if not math.isfinite(value):
            return 0
        value = int(value)
    return min(max(value, 0), high)


def guest_seconds(sample: dict[str, Any] | None, key: str) -> float:
    value = (sample or {}).get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    seconds = float(value)
    return seconds if math.isfinite(seconds) and seconds >= 0 else 0.0


def _cpu_stats(sample: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "cpu_usage": {
            "total_usage": guest_count(sample, "cpu_ns"),
            "usage_in_kernelmode": guest_count(sample, "cpu_system_ns"),
            "usage_in_usermode": guest_count(sample, "cpu_user_ns"),
        },
        "system_cpu_usage": guest_count(sample, "system_cpu_ns"),
        "online_cpus": guest_count(sample, "online_cpus", UINT32_MAX),
        "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0},
    }


def stats_json(
    record: ContainerRecord,
    sample: dict[str, Any] | None,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    """Docker's stats document from a guest sample (and the one before it, for CPU deltas)."""

    def number(key: str) -> int:
        return guest_count(sample, key)

    read = nanos_to_iso(number("time_ns")) if sample else ZERO_TIME
    preread = nanos_to_iso(guest_count(previous, "time_ns")) if previous else ZERO_TIME
    blkio = (
        [
            {"major": 254, "minor": 0, "op": "read", "value": number("block_read_bytes")},
            {"major": 254, "minor": 0, "op": "write", "value": number("block_write_bytes")},
        ]
        if sample
        else None
    )
    serviced = (
        [
            {"major": 254, "minor": 0, "op": "read", "value": number("block_read_ops")},
            {"major": 254, "minor": 0, "op": "write", "value": number("block_write_ops")},
        ]
        if sample
        else None
    )
    document: dict[str, Any] = {
        "name": "/" + record.name,
        "id": record.id,
        "read": read,
        "preread": preread,
        "pids_stats": {"current": number("pids")} if sample else {},
        "blkio_stats": {
            "io_service_bytes_recursive": blkio,
            "io_serviced_recursive": serviced,
            "io_queue_recursive": None,
            "io_service_time_recursive": None,
            "io_wait_time_recursive": None,
            "io_merged_recursive": None,
            "io_time_recursive": None,
            "sectors_recursive": None,
        },
        "num_procs": 0,
        "storage_stats": {},
        "cpu_stats": _cpu_stats(sample),
        "precpu_stats": _cpu_stats(previous),
        "memory_stats": (
            {
                "usage": number("memory_used"),
                "limit": number("memory_total"),
                "stats": {"cache": number("memory_cache")},
            }
            if sample
            else {}
        ),
    }
    if sample:
        document["networks"] = {
            "eth0": {
                "rx_bytes": number("net_rx_bytes"),
                "rx_packets": number("net_rx_packets"),
                "rx_errors": 0,
                "rx_dropped": 0,
                "tx_bytes": number("net_tx_bytes"),
                "tx_packets": number("net_tx_packets"),
                "tx_errors": 0,
                "tx_dropped": 0,
            }
        }
        document["husk_host"] = {
            "vm_rss_bytes": number("vm_rss_bytes"),
            "vm_cpu_seconds": guest_seconds(sample, "vm_cpu_seconds"),
        }
    return document


# ------------------------------------------------------------------- images


def repo_tags(record: ImageRecord) -> list[str]:
    return [familiar(n) for n in record.names if "@" not in n]


def repo_digests(record: ImageRecord) -> list[str]:
    return [familiar(d) for d in record.repo_digests]


def image_summary(
    record: ImageRecord, *, containers: int = -1, version: ApiVersion = LATEST
) -> dict[str, Any]:
    """One entry of ``GET /images/json`` (``VirtualSize`` left out from API 1.44 on)."""
    summary = {
        "Id": record.id,
        "ParentId": "",
        "RepoTags": repo_tags(record),
        "RepoDigests": repo_digests(record),
        "Created": int(iso_to_unix(record.created)),
        "Size": record.size,
        "SharedSize": -1,
        "VirtualSize": record.size,
        "Labels": record.labels,
        "Containers": containers,
    }
    if version >= (1, 44):
        del summary["VirtualSize"]
    return summary


# Container-only fields Docker put in an image's Config before API 1.50, always empty.
_IMAGE_CONFIG_EXTRAS: dict[str, Any] = {
    "Hostname": "",
    "Domainname": "",
    "AttachStdin": False,
    "AttachStdout": False,
    "AttachStderr": False,
    "Tty": False,
    "OpenStdin": False,
    "StdinOnce": False,
    "Image": "",
}


def image_inspect(record: ImageRecord, *, version: ApiVersion = LATEST) -> dict[str, Any]:
    """``GET /images/{name}/json``: the store's view with Docker's name spelling.

    Versioned as Docker's: ``VirtualSize`` until 1.43, ``Container`` and
    ``ContainerConfig`` until 1.44, the empty container-only ``Config`` fields until 1.49.
    """
    data = store_view(record)
    data["RepoTags"] = repo_tags(record)
    data["RepoDigests"] = repo_digests(record)
    data["GraphDriver"] = {"Data": None, "Name": "husk"}
    config = dict(data.get("Config") or {})
    for key, empty in _IMAGE_CONFIG_EXTRAS.items():
        if version < (1, 50):
            config.setdefault(key, empty)
        else:
            config.pop(key, None)
    data["Config"] = config
    if version < (1, 45):
        data["Container"] = ""
        data["ContainerConfig"] = dict(config)
    if version >= (1, 44):
        data.pop("VirtualSize", None)
    if not data.get("Variant"):
        data.pop("Variant", None)
    return data


def image_history(record: ImageRecord) -> list[dict[str, Any]]:
    """``GET /images/{name}/history``: newest step first, the top one carrying the id and tags."""
    history = record.config.get("history") or []
    layer_sizes = [layer.size for layer in record.layers]
    steps: list[dict[str, Any]] = []
    layer_index = 0
    for entry in history:
        if not isinstance(entry, dict):
            continue
        empty = bool(entry.get("empty_layer"))
        size = 0
        if not empty and layer_index < len(layer_sizes):
            size = layer_sizes[layer_index]
            layer_index += 1
        steps.append(
            {
                "Id": "<missing>",
                "Created": int(iso_to_unix(str(entry.get("created") or ""))),
                "CreatedBy": str(entry.get("created_by") or ""),
                "Tags": None,
                "Size": size,
                "Comment": str(entry.get("comment") or ""),
            }
        )
    if not steps:
        steps = [
            {
                "Id": "<missing>",
                "Created": int(iso_to_unix(record.created)),
                "CreatedBy": "",
                "Tags": None,
                "Size": size,
                "Comment": "",
            }
            for size in layer_sizes
        ]
    steps.reverse()
    if steps:
        steps[0]["Id"] = record.id
        steps[0]["Tags"] = repo_tags(record) or None
    return steps


# ----------------------------------------------------------------- networks


def network_json(network: Network, members: list[tuple[Member, Endpoint]]) -> dict[str, Any]:
    """A network as ``GET /networks/{id}`` shows it, with the containers holding endpoints."""
    config = [{"Subnet": network.subnet, "Gateway": network.gateway}] if network.subnet else []
    return {
        "Name": network.name,
        "Id": network.id,
        "Created": network.created,
        "Scope": LOCAL_SCOPE,
        "Driver": network.driver,
        "EnableIPv4": True,
        "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": {}, "Config": config},
        "Internal": network.internal,
        "Attachable": network.attachable,
        "Ingress": False,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": False,
        "Containers": {
            member.id: {
                "Name": member.name,
                "EndpointID": endpoint.endpoint_id,
                "MacAddress": endpoint.mac,
                "IPv4Address": endpoint.cidr,
                "IPv6Address": "",
            }
            for member, endpoint in members
        },
        "Options": dict(network.options),
        "Labels": dict(network.labels),
    }
