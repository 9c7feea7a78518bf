"""Docker's container ``create`` body (Config + HostConfig) → husk's :class:`ContainerSpec`.

Everything husk honours is translated; settings husk cannot honour are refused
with NotSupported when a client asks for them (a default or empty value is
accepted, since clients send many fields with their zero values).
"""

from __future__ import annotations

import shlex
from typing import Any

from husk import confinement, sizes
from husk.confinement import Ulimit
from husk.errors import InvalidArgument, NotSupported
from husk.network.manager import NOT_SUPPORTED_HOST, validate_ipv4
from husk.network.model import DEFAULT_MODES, DEFAULT_NETWORK, HOST_NETWORK, NONE_NETWORK
from husk.spec import (
    BindMount,
    ContainerSpec,
    HealthCheck,
    NetworkRequest,
    PortBinding,
    RestartPolicy,
    TmpfsMount,
    parse_restart_policy,
    parse_signal,
    parse_tmpfs,
)
from husk.volumes import mountspec
from husk.volumes.model import check_driver

NANOS = 1_000_000_000
DEFAULT_HEALTH_SECONDS = 30.0

# HostConfig fields husk has no equivalent for; a non-empty value is refused.
UNSUPPORTED_HOST_FIELDS = {
    "Devices": "device passthrough",
    "DeviceRequests": "device requests (GPUs)",
    "Links": "container links",
    "IpcMode": None,
    "PidMode": "sharing a PID namespace",
    "UTSMode": "sharing the host's UTS namespace",
    "UsernsMode": "user namespace modes",
    "Runtime": None,
}


# Resource and isolation fields husk has no way to honour in its VMs: a value other than
# the zero one (or the listed harmless ones) is refused with the field's name.
REFUSED_HOST_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "CpuShares": ((0, None), "CPU shares (each container is a VM with its own vCPUs)"),
    "CpuRealtimePeriod": ((0, None), "real-time CPU periods"),
    "CpuRealtimeRuntime": ((0, None), "real-time CPU runtime"),
    "CpusetMems": (("", None), "memory nodes (the VM has one)"),
    "BlkioWeight": ((0, None), "block I/O weights"),
    "BlkioWeightDevice": (([], None), "block I/O weights"),
    "BlkioDeviceReadBps": (([], None), "block I/O limits"),
    "BlkioDeviceWriteBps": (([], None), "block I/O limits"),
    "BlkioDeviceReadIOps": (([], None), "block I/O limits"),
    "BlkioDeviceWriteIOps": (([], None), "block I/O limits"),
    "MemoryReservation": ((0, None), "memory reservations"),
    "KernelMemory": ((0, None), "kernel memory limits"),
    "KernelMemoryTCP": ((0, None), "kernel TCP memory limits"),
    "MemorySwappiness": ((-1, None), "memory swappiness (the VM has no swap)"),
    "OomKillDisable": (
        (False, None),
        "disabling the OOM killer (the VM's kernel must be able to "
        "end a process when the VM runs out of memory)",
    ),
    "CgroupParent": (("", None), "cgroup parents"),
    "Cgroup": (("", None), "sharing a cgroup"),
    "DeviceCgroupRules": (([], None), "device cgroup rules"),
    "MaskedPaths": ((None,), "custom masked paths"),
    "ReadonlyPaths": ((None,), "custom read-only paths"),
    "IOMaximumIOps": ((0, None), "I/O limits"),
    "IOMaximumBandwidth": ((0, None), "I/O limits"),
    "IpcMode": (("", "private", "shareable", None), "sharing an IPC namespace"),
    "CgroupnsMode": (("", "private", None), "the host's cgroup namespace"),
    "Isolation": (("", "default", None), "isolation technologies other than the default"),
    "Annotations": (({}, None), "OCI annotations"),
}
# Config (not HostConfig) fields of the same kind.
REFUSED_CONFIG_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "Domainname": (("", None), "a domain name"),
    "MacAddress": (("", None), "a chosen MAC address (each VM gets its own)"),
}
LOG_DRIVERS = ("", "json-file", "local")


def _string_list(value: Any, field: str) -> list[str] | None:
    """Docker's "strslice": a list of strings, a single string, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidArgument(f"invalid {field}: expected a string or a list of strings")


# Docker refuses a health-check duration below a millisecond (0 means "the default").
MINIMUM_HEALTH_NANOS = 1_000_000


def _seconds(value: Any, field: str) -> float | None:
    if value in (None, 0):
        return None
    if not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"invalid {field}: expected a non-negative number of nanoseconds")
    if value < MINIMUM_HEALTH_NANOS:
        raise InvalidArgument(f"invalid {field}: cannot be less than 1ms")
    return value / NANOS


def _healthcheck(value: Any) -> HealthCheck | None:
    if not value:
        return None
    if not isinstance(value, dict):
        raise InvalidArgument("invalid Healthcheck: expected an object")
    test = _string_list(value.get("Test"), "Healthcheck.Test") or []
    if not test:
        return None  # inherit: husk applies no image health check
    if test[0] not in ("CMD", "CMD-SHELL", "NONE"):
        raise InvalidArgument(
            f"invalid Healthcheck.Test {test!r}: the first element must be CMD, CMD-SHELL or NONE"
        )
    if test[0] == "NONE":
        return HealthCheck(test=["NONE"])
    retries = value.get("Retries") or 3
    if not isinstance(retries, int) or retries < 0:
        raise InvalidArgument("invalid Healthcheck.Retries: expected a non-negative integer")
    return HealthCheck(
        test=test,
        interval=_seconds(value.get("Interval"), "Healthcheck.Interval") or DEFAULT_HEALTH_SECONDS,
        timeout=_seconds(value.get("Timeout"), "Healthcheck.Timeout") or DEFAULT_HEALTH_SECONDS,
        retries=retries,
        start_period=_seconds(value.get("StartPeriod"), "Healthcheck.StartPeriod") or 0.0,
    )


def _port_key(key: str) -> tuple[int, str]:
    number, _, proto = key.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp"):
        raise InvalidArgument(f"invalid port {key!r}: protocol must be tcp or udp")
    try:
        port = int(number)
    except ValueError:
        raise InvalidArgument(f"invalid port {key!r}") from None
    if not 0 < port <= 65535:
        raise InvalidArgument(f"invalid port {key!r}")
    return port, proto


def _port_bindings(value: Any) -> list[PortBinding]:
    if not value:
        return []
    if not isinstance(value, dict):
        raise InvalidArgument("invalid PortBindings: expected an object")
    bindings: list[PortBinding] = []
    for key, entries in value.items():
        port, proto = _port_key(key)
        for entry in entries or [{}]:
            host_ip = str((entry or {}).get("HostIp") or "")
            host_port_text = str((entry or {}).get("HostPort") or "")
            if "-" in host_port_text:
                first, _, last = host_port_text.partition("-")
                if first != last:
                    raise NotSupported(
                        f"host port ranges are not supported ({host_port_text} for {key})"
                    )
                host_port_text = first
            try:
                host_port = int(host_port_text) if host_port_text else 0
            except ValueError:
                raise InvalidArgument(f"invalid host port {host_port_text!r} for {key}") from None
            if not 0 <= host_port <= 65535:
                raise InvalidArgument(f"invalid host port {host_port} for {key}")
            bindings.append(PortBinding(port, proto, host_ip, host_port))
    return bindings


def _binds(value: Any) -> list[BindMount]:
    return [mountspec.parse_volume(text) for text in _string_list(value, "Binds") or []]


def _tmpfs(value: Any) -> list[TmpfsMount]:
    if not value:
        return []
    if not isinstance(value, dict):
        raise InvalidArgument("invalid Tmpfs: expected an object of path to options")
    mounts: list[TmpfsMount] = []
    for target, options in value.items():
        kept = [o for o in str(options or "").split(",") if o and o not in ("rw", "exec", "suid")]
        if any(o in ("ro", "noexec", "nosuid", "nodev") for o in kept):
            bad = [o for o in kept if o in ("ro", "noexec", "nosuid", "nodev")]
            raise NotSupported(f"tmpfs option {bad[0]!r} is not supported (size and mode are)")
        mount = parse_tmpfs(f"{target}:{','.join(kept)}" if kept else str(target))
        mount.written = str(options or "")
        mounts.append(mount)
    return mounts


def _restart(value: Any) -> RestartPolicy:
    if not value:
        return RestartPolicy()
    if not isinstance(value, dict):
        raise InvalidArgument("invalid RestartPolicy: expected an object")
    name = str(value.get("Name") or "no")
    retries = value.get("MaximumRetryCount") or 0
    policy = parse_restart_policy(name)
    if retries:
        if name != "on-failure":
            raise InvalidArgument(
                f"maximum retry count cannot be used with restart policy '{name}'"
            )
        policy.max_retries = int(retries)
    return policy


def _check_refused_config(body: dict[str, Any]) -> None:
    for key, (accepted, refused) in REFUSED_CONFIG_FIELDS.items():
        if key in body and body[key] not in accepted:
            raise InvalidArgument(f"Config.{key}: {refused} is not supported by husk")
    log_config = body.get("HostConfig", {}).get("LogConfig") or {}
    driver = log_config.get("Type") if isinstance(log_config, dict) else None
    if driver not in (*LOG_DRIVERS, None):
        raise InvalidArgument(
            f"HostConfig.LogConfig.Type: the {driver!r} logging driver is not supported by "
            "husk (its logs are json-file's: docker logs reads them)"
        )


def _check_unsupported(host: dict[str, Any]) -> None:
    for key, (accepted, refused) in REFUSED_HOST_FIELDS.items():
        if key in host and host[key] not in accepted:
            raise InvalidArgument(f"HostConfig.{key}: {refused} is not supported by husk")
    for key, what in UNSUPPORTED_HOST_FIELDS.items():
        value = host.get(key)
        if what is None or not value:
            continue
        raise NotSupported(f"{what} ({key}) is not supported by husk: each container is a VM")
    runtime = str(host.get("Runtime") or "")
    if runtime not in ("", "husk", "runc"):
        raise NotSupported(f"runtime {runtime!r} is not available; husk is the only runtime")


def _network_mode(body: dict[str, Any], host: dict[str, Any]) -> str:
    """HostConfig.NetworkMode: "" (the default network), a network, or none."""
    mode = str(host.get("NetworkMode") or "")
    if body.get("NetworkDisabled"):
        if mode not in (*DEFAULT_MODES, NONE_NETWORK):
            raise InvalidArgument(f"NetworkDisabled conflicts with network mode {mode}")
        return NONE_NETWORK
    if mode == HOST_NETWORK:
        raise NotSupported(NOT_SUPPORTED_HOST)
    if mode.startswith("container:"):
        raise NotSupported(
            f"network mode {mode} is not supported: each husk container is a VM with its own "
            "network stack"
        )
    return mode


def endpoint_request(config: Any, network: str) -> tuple[list[str], str | None]:
    """(aliases, IPv4 address) of an EndpointSettings; what husk cannot honour is refused
    (clients send empty values with every create: only values that ask for something)."""
    if not config:
        return [], None
    if not isinstance(config, dict):
        raise InvalidArgument(f"invalid endpoint settings for network {network}")
    aliases = config.get("Aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise InvalidArgument(f"invalid Aliases for network {network}: expected strings")
    for key, what in (
        ("Links", "links"),
        ("MacAddress", "a chosen MAC address (husk derives it from the IP address)"),
        ("DriverOpts", "endpoint driver options"),
        ("GwPriority", "gateway priorities"),
    ):
        if config.get(key):
            raise NotSupported(f"{what} ({network}.{key}) is not supported by husk")
    ipam = config.get("IPAMConfig") or {}
    if not isinstance(ipam, dict):
        raise InvalidArgument(f"invalid IPAMConfig for network {network}")
    if ipam.get("IPv6Address"):
        raise NotSupported(f"IPv6 addresses ({network}.IPAMConfig.IPv6Address) are not supported")
    if ipam.get("LinkLocalIPs"):
        raise NotSupported(
            f"link-local addresses ({network}.IPAMConfig.LinkLocalIPs) are not supported"
        )
    address = str(ipam.get("IPv4Address") or "")
    return list(aliases), validate_ipv4(address) if address else None


def _network_requests(mode: str, networking: Any) -> list[NetworkRequest]:
    """NetworkingConfig.EndpointsConfig as requests, the mode's network first (empty: the
    mode's network alone, with no settings)."""
    if not networking:
        return []
    if not isinstance(networking, dict):
        raise InvalidArgument("invalid NetworkingConfig: expected an object")
    endpoints = networking.get("EndpointsConfig") or {}
    if not isinstance(endpoints, dict):
        raise InvalidArgument("invalid NetworkingConfig.EndpointsConfig: expected an object")
    requests: list[NetworkRequest] = []
    for name, settings in endpoints.items():
        network = DEFAULT_NETWORK if name in DEFAULT_MODES else str(name)
        aliases, ipv4 = endpoint_request(settings, str(name))
        if network == NONE_NETWORK and not aliases and not ipv4:
            continue  # none's settings: nothing to join
        requests.append(NetworkRequest(network, aliases, ipv4))
    if not requests:
        return []
    first = DEFAULT_NETWORK if mode in DEFAULT_MODES else mode
    if first != NONE_NETWORK and all(r.network != first for r in requests):
        requests.insert(0, NetworkRequest(first))
    requests.sort(key=lambda r: r.network != first)
    return requests


def _anonymous_volumes(volumes: Any, covered: list[str]) -> list[BindMount]:
    """Config.Volumes: an anonymous volume for each path no other mount covers (docker-py
    lists every bind target there, as testcontainers' Ryuk does for the docker socket)."""
    if not volumes:
        return []
    if not isinstance(volumes, dict):
        raise InvalidArgument("invalid Config.Volumes: expected an object")
    return mountspec.anonymous_volumes([str(path) for path in volumes], covered)


def _volumes_from(value: Any) -> list[str]:
    entries = _string_list(value, "VolumesFrom") or []
    for entry in entries:
        mountspec.parse_volumes_from(entry)
    return entries


def _mounts_written(value: Any) -> list[dict[str, Any]] | None:
    return [dict(m) for m in value] if isinstance(value, list) and value else None


def spec_from_create(body: dict[str, Any], name: str | None) -> ContainerSpec:
    """The ContainerSpec a ``POST /containers/create`` body asks for."""
    image = body.get("Image")
    if not image or not isinstance(image, str):
        raise InvalidArgument("Config.Image is required")
    host: dict[str, Any] = body.get("HostConfig") or {}
    if not isinstance(host, dict):
        raise InvalidArgument("invalid HostConfig: expected an object")
    _check_unsupported(host)
    _check_refused_config(body)
    mode = _network_mode(body, host)
    networks = _network_requests(mode, body.get("NetworkingConfig"))
    binds = _binds(host.get("Binds"))
    mount_binds, mount_tmpfs = mountspec.mounts_from_api(host.get("Mounts"))
    binds += mount_binds
    tmpfs = _tmpfs(host.get("Tmpfs")) + mount_tmpfs
    binds += _anonymous_volumes(
        body.get("Volumes"), [b.target for b in binds] + [t.target for t in tmpfs]
    )
    mountspec.check_targets(binds, tmpfs)
    driver = host.get("VolumeDriver") or ""
    if driver:
        check_driver(str(driver))

    entrypoint = _string_list(body.get("Entrypoint"), "Entrypoint")
    if entrypoint == [""]:
        entrypoint = []  # Docker's --entrypoint "": drop the image's entrypoint
    cmd = _string_list(body.get("Cmd"), "Cmd")
    env = _string_list(body.get("Env"), "Env") or []
    labels = body.get("Labels") or {}
    if not isinstance(labels, dict):
        raise InvalidArgument("invalid Labels: expected an object")
    exposed = body.get("ExposedPorts") or {}
    if not isinstance(exposed, dict):
        raise InvalidArgument("invalid ExposedPorts: expected an object")
    exposed_ports = []
    for key in exposed:
        port, proto = _port_key(str(key))
        exposed_ports.append(f"{port}/{proto}")

    stop_signal = body.get("StopSignal") or None
    if stop_signal is not None:
        parse_signal(str(stop_signal))
    stop_timeout = body.get("StopTimeout")
    if stop_timeout is not None and not isinstance(stop_timeout, int):
        raise InvalidArgument("invalid StopTimeout: expected an integer number of seconds")

    memory = host.get("Memory") or None
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, int):
            # int() of a string or an object was a 500 with a traceback; Docker's is a 400.
            raise InvalidArgument("invalid HostConfig.Memory: expected a number of bytes")
        memory = sizes.parse_memory(int(memory))
    cpus = _cpus(host)

    ports = _port_bindings(host.get("PortBindings"))
    for binding in ports:
        key = binding.key()
        if key not in exposed_ports:
            exposed_ports.append(key)

    workdir = body.get("WorkingDir") or None
    if workdir is not None and not str(workdir).startswith("/"):
        raise InvalidArgument(
            f"the working directory '{workdir}' is invalid, it needs to be an absolute path"
        )

    restart = _restart(host.get("RestartPolicy"))
    if host.get("AutoRemove") and restart.name != "no":
        raise InvalidArgument("can't create 'AutoRemove' container with restart policy")

    return ContainerSpec(
        image=image,
        name=name or None,
        entrypoint=entrypoint,
        cmd=cmd,
        env=env,
        workdir=workdir,
        user=body.get("User") or None,
        cpus=cpus,
        memory=memory,
        hostname=body.get("Hostname") or None,
        labels={str(k): str(v) for k, v in labels.items()},
        binds=binds,
        tmpfs=tmpfs,
        volumes_from=_volumes_from(host.get("VolumesFrom")),
        binds_written=_string_list(host.get("Binds"), "Binds") or None,
        mounts_written=_mounts_written(host.get("Mounts")),
        ports=ports,
        publish_all=bool(host.get("PublishAllPorts")),
        exposed_ports=exposed_ports,
        stop_signal=str(stop_signal) if stop_signal else None,
        stop_timeout=stop_timeout,
        restart=restart,
        healthcheck=_healthcheck(body.get("Healthcheck")),
        tty=bool(body.get("Tty")),
        open_stdin=bool(body.get("OpenStdin")),
        auto_remove=bool(host.get("AutoRemove")),
        privileged=bool(host.get("Privileged")),
        init=bool(host.get("Init")),
        network_mode=mode,
        networks=networks,
        storage_size=sizes.parse_storage_opt(host.get("StorageOpt")),
        **_confinement(host, memory),
    )


def _cpus(host: dict[str, Any]) -> float | None:
    """``NanoCpus`` (checked against the host, as Docker does) or ``CpuQuota``/``CpuPeriod``."""
    nano = _int_field(host, "NanoCpus") or 0
    quota = _int_field(host, "CpuQuota") or 0
    period = _int_field(host, "CpuPeriod") or 0
    if nano and (quota or period):
        raise InvalidArgument(
            "Conflicting options: Nano CPUs and CPU Period/Quota cannot both be set"
        )
    if nano:
        cpus = nano / NANOS
        confinement.check_cpus(cpus)
        return cpus
    if quota > 0:
        if quota < 1000:
            raise InvalidArgument("CPU cfs quota can not be less than 1ms (i.e. 1000)")
        if period and not 1000 <= period <= 1_000_000:
            raise InvalidArgument(
                "CPU cfs period can not be less than 1ms (i.e. 1000) "
                "or larger than 1s (i.e. 1000000)"
            )
        return quota / (period or 100_000)  # the kernel's default period: 100 ms
    return None


def _int_field(host: dict[str, Any], key: str) -> int | None:
    value = host.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"invalid HostConfig.{key}: expected an integer")
    return value


def _ulimits(value: Any) -> list[Ulimit]:
    if not value:
        return []
    if not isinstance(value, list):
        raise InvalidArgument("invalid HostConfig.Ulimits: expected a list")
    limits = []
    for item in value:
        if not isinstance(item, dict):
            raise InvalidArgument("invalid HostConfig.Ulimits: each entry must be an object")
        soft, hard = item.get("Soft"), item.get("Hard")
        if not isinstance(soft, int) or not isinstance(hard, int):
            raise InvalidArgument("invalid HostConfig.Ulimits: Soft and Hard must be integers")
        limits.append(confinement.check_ulimit(Ulimit(str(item.get("Name")), soft, hard)))
    return limits


def _sysctls(value: Any) -> dict[str, str]:
    if not value:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument("invalid HostConfig.Sysctls: expected an object")
    sysctls = {str(k): str(v) for k, v in value.items()}
    for key, text in sysctls.items():
        confinement.check_sysctl(key, text)
    return sysctls


def _extra_hosts(host: dict[str, Any]) -> list[str]:
    entries = _string_list(host.get("ExtraHosts"), "HostConfig.ExtraHosts") or []
    for entry in entries:
        confinement.parse_add_host(entry)
    return entries  # as given, as Docker's inspect shows them


def _capabilities(host: dict[str, Any], key: str) -> list[str]:
    names = _string_list(host.get(key), f"HostConfig.{key}") or []
    confinement.capability_names(names, key)
    return names


def _confinement(host: dict[str, Any], memory: int | None) -> dict[str, Any]:
    """The ContainerSpec fields of HostConfig's process settings, validated as Docker does."""
    shm_size = _int_field(host, "ShmSize")
    if shm_size is not None and shm_size < 0:
        raise InvalidArgument("SHM size can not be less than 0")
    pids_limit = _int_field(host, "PidsLimit")
    oom_score_adj = confinement.check_oom_score_adj(_int_field(host, "OomScoreAdj") or 0)
    memory_swap = _int_field(host, "MemorySwap")
    if memory_swap is not None:
        confinement.check_memory_swap(memory, memory_swap)
    cpuset = host.get("CpusetCpus") or None
    if cpuset is not None:
        confinement.parse_cpuset(str(cpuset))
    security_opt = _string_list(host.get("SecurityOpt"), "HostConfig.SecurityOpt") or []
    group_add = _string_list(host.get("GroupAdd"), "HostConfig.GroupAdd") or []
    for group in group_add:
        if not group or ":" in group or "\n" in group:
            raise InvalidArgument(f"invalid HostConfig.GroupAdd entry {group!r}")
    return {
        "read_only": bool(host.get("ReadonlyRootfs")),
        # Stored as the client gave them (Docker's inspect shows them so); checked here.
        "cap_add": _capabilities(host, "CapAdd"),
        "cap_drop": _capabilities(host, "CapDrop"),
        "ulimits": _ulimits(host.get("Ulimits")),
        "sysctls": _sysctls(host.get("Sysctls")),
        "shm_size": shm_size or None,
        "group_add": group_add,
        "security_opt": security_opt,
        "no_new_privileges": confinement.no_new_privileges(security_opt),
        "pids_limit": pids_limit if pids_limit and pids_limit > 0 else None,
        "oom_score_adj": oom_score_adj,
        "memory_swap": memory_swap or None,
        "cpuset_cpus": str(cpuset) if cpuset else None,
        "extra_hosts": _extra_hosts(host),
        "dns": [
            confinement.check_dns_server(d)
            for d in _string_list(host.get("Dns"), "HostConfig.Dns") or []
        ],
        "dns_search": [
            confinement.check_dns_search(d)
            for d in _string_list(host.get("DnsSearch"), "HostConfig.DnsSearch") or []
        ],
        "dns_options": [
            confinement.check_dns_option(d)
            for d in _string_list(host.get("DnsOptions"), "HostConfig.DnsOptions") or []
        ],
    }


def inspect_fields(spec: ContainerSpec) -> dict[str, Any]:
    """HostConfig's process settings as ``inspect`` shows them (Docker's zero values)."""
    fields: dict[str, Any] = {
        "ReadonlyRootfs": spec.read_only,
        "CapAdd": list(spec.cap_add) or None,
        "CapDrop": list(spec.cap_drop) or None,
        "Ulimits": [{"Name": u.name, "Hard": u.hard, "Soft": u.soft} for u in spec.ulimits] or None,
        "ShmSize": spec.shm_size or confinement.DEFAULT_SHM_SIZE,
        "GroupAdd": list(spec.group_add) or None,
        "SecurityOpt": list(spec.security_opt) or None,
        "PidsLimit": spec.pids_limit,
        "OomScoreAdj": spec.oom_score_adj,
        "MemorySwap": spec.memory_swap or 0,
        "CpusetCpus": spec.cpuset_cpus or "",
        "ExtraHosts": list(spec.extra_hosts) or None,
        "Dns": list(spec.dns),
        "DnsSearch": list(spec.dns_search),
        "DnsOptions": list(spec.dns_options),
    }
    if spec.sysctls:  # Docker leaves the field out when empty (omitempty)
        fields["Sysctls"] = dict(spec.sysctls)
    if spec.storage_size:
        fields["StorageOpt"] = {"size": str(spec.storage_size)}
    return fields


def exec_argv(value: Any) -> list[str]:
    """An exec's ``Cmd``: a list, or a string split like a shell would."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:  # an unclosed quotation: a 400, not a 500
            raise InvalidArgument(f"invalid Cmd {value!r}: {exc}") from None
    return _string_list(value, "Cmd") or []
