"""What a user asks for (ContainerSpec) and the one place it is merged with an image's config.

Merging rules (docs/DESIGN.md, "Reference behaviour"):
- argv: spec entrypoint + (spec cmd, else image Cmd); else spec cmd after the image
  Entrypoint; else image Entrypoint + Cmd; an empty result runs ``true``.
- env: image Env overridden key by key by the spec's.
- workdir: spec, else image, else ``/``. user: spec, else image, else root.
"""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass, field
from typing import Any

from husk.confinement import Ulimit
from husk.errors import InvalidArgument
from husk.sizes import parse_size as parse_size  # re-exported: callers import it here

RESTART_POLICIES = ("no", "always", "unless-stopped", "on-failure")
NO_TEMPLATE_LABEL = "org.husk.no-template"
"""A container labelled ``…=true`` always boots cold (``husk run --no-template``)."""


@dataclass
class PortBinding:
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""
    host_port: int = 0  # 0: pick a free port

    def key(self) -> str:
        return f"{self.container_port}/{self.protocol}"


@dataclass
class BindMount:
    source: str
    target: str
    readonly: bool = False
    socket: str = ""
    """For a source that is a unix socket: its real path, resolved once at create."""
    volume: str = ""
    """The named volume this mount is of ("" for a host path); ``source`` is then the
    volume's data directory (husk.volumes fills it in)."""
    anonymous: bool = False
    """A volume made for this container alone (``-v /path``, the image's VOLUME):
    ``rm -v`` and ``--rm`` remove it with the container."""
    copy_up: bool = False
    """Fill the volume with the image's content at ``target`` before mounting it over
    (a new, empty volume, unless nocopy was asked)."""
    mode: str = ""
    """The mode as written (``-v``'s third part, e.g. ``ro,z``), shown by inspect."""
    volume_options: dict[str, str] = field(default_factory=dict)
    """Driver options for a volume made on first use (``--mount volume-opt=``)."""
    volume_labels: dict[str, str] = field(default_factory=dict)
    """Labels for a volume made on first use (``--mount volume-label=``)."""


@dataclass
class TmpfsMount:
    target: str
    size: int | None = None
    mode: int | None = None
    written: str | None = None
    """The options as the client wrote them (``HostConfig.Tmpfs``), shown back by inspect."""

    def options(self) -> str:
        opts = [f"mode={self.mode:o}" if self.mode is not None else "mode=1777"]
        if self.size:
            opts.append(f"size={self.size}")
        return ",".join(opts)


@dataclass
class RestartPolicy:
    name: str = "no"
    max_retries: int = 0


@dataclass
class HealthCheck:
    test: list[str]
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0


@dataclass
class NetworkRequest:
    """One network a container asks to join (``--network``, ``EndpointsConfig``)."""

    network: str
    """The network's name or id (prefix), as the client gave it."""
    aliases: list[str] = field(default_factory=list)
    ipv4: str | None = None


@dataclass
class ContainerSpec:
    image: str
    name: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    cpus: float | None = None
    memory: int | None = None  # bytes
    hostname: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    binds: list[BindMount] = field(default_factory=list)
    tmpfs: list[TmpfsMount] = field(default_factory=list)
    ports: list[PortBinding] = field(default_factory=list)
    publish_all: bool = False
    exposed_ports: list[str] = field(default_factory=list)  # "80/tcp"
    stop_signal: str | None = None
    stop_timeout: int | None = None
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    healthcheck: HealthCheck | None = None
    tty: bool = False
    open_stdin: bool = False
    auto_remove: bool = False
    privileged: bool = False
    """Every capability and device inside the guest (the VM stays the boundary)."""
    init: bool = False
    """A small reaping init is PID 1 of the container and runs the workload."""
    # Process-level settings (Docker's HostConfig), validated by husk.confinement and
    # applied by the guest agent.
    read_only: bool = False
    cap_add: list[str] = field(default_factory=list)  # "CAP_X" or "ALL"
    cap_drop: list[str] = field(default_factory=list)
    ulimits: list[Ulimit] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    shm_size: int | None = None  # bytes; None: Docker's 64 MiB
    group_add: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)
    no_new_privileges: bool = False
    pids_limit: int | None = None  # None: unlimited
    oom_score_adj: int = 0
    """The workload's and every exec's oom_score_adj inside the VM (-1000 to 1000)."""
    memory_swap: int | None = None
    cpuset_cpus: str | None = None
    extra_hosts: list[str] = field(default_factory=list)  # "name:ip" (ip may be host-gateway)
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    dns_options: list[str] = field(default_factory=list)
    network_mode: str = ""
    """Docker's HostConfig.NetworkMode: "" (the default network), a network's name, "none"."""
    networks: list[NetworkRequest] = field(default_factory=list)
    """The networks to join at create, the mode's first; empty: the mode's network alone."""
    storage_size: int | None = None
    """Bytes of the writable layer's disk (``--storage-opt size=``); None: the default."""
    volumes_from: list[str] = field(default_factory=list)
    """``CONTAINER[:ro|rw]``: mount what that container mounts (resolved at create)."""
    binds_written: list[str] | None = None
    """HostConfig.Binds as the client gave them (inspect shows them back)."""
    mounts_written: list[dict[str, Any]] | None = None
    """HostConfig.Mounts as the client gave them (inspect shows them back)."""

    @property
    def use_template(self) -> bool:
        return self.labels.get(NO_TEMPLATE_LABEL, "").lower() not in ("true", "1", "yes")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContainerSpec:
        data = dict(data)
        data["binds"] = [BindMount(**b) for b in data.get("binds") or []]
        data["tmpfs"] = [TmpfsMount(**t) for t in data.get("tmpfs") or []]
        data["ports"] = [PortBinding(**p) for p in data.get("ports") or []]
        data["restart"] = RestartPolicy(**(data.get("restart") or {}))
        data["ulimits"] = [Ulimit(**u) for u in data.get("ulimits") or []]
        data["networks"] = [NetworkRequest(**n) for n in data.get("networks") or []]
        if data.get("healthcheck"):
            data["healthcheck"] = HealthCheck(**data["healthcheck"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ProcessPlan:
    """The workload as the guest will run it."""

    argv: list[str]
    env: list[str]
    workdir: str
    user: str


def _image_section(image_config: dict[str, Any]) -> dict[str, Any]:
    section = image_config.get("config") or image_config.get("Config") or {}
    return section if isinstance(section, dict) else {}


def resolve_argv(
    entrypoint: list[str] | None,
    cmd: list[str] | None,
    image_entrypoint: list[str] | None,
    image_cmd: list[str] | None,
) -> list[str]:
    if entrypoint:
        argv = [*entrypoint, *(cmd if cmd else image_cmd or [])]
    elif entrypoint is not None:  # an explicitly empty entrypoint drops the image's
        argv = list(cmd or image_cmd or [])
    elif cmd:
        argv = [*(image_entrypoint or []), *cmd]
    else:
        argv = [*(image_entrypoint or []), *(image_cmd or [])]
    return argv or ["true"]


def merge_env(image_env: list[str], spec_env: list[str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in [*image_env, *spec_env]:
        key, sep, value = item.partition("=")
        if not key:
            continue
        merged[key] = value if sep else merged.get(key, "")
    return [f"{k}={v}" for k, v in merged.items()]


def plan_process(spec: ContainerSpec, image_config: dict[str, Any]) -> ProcessPlan:
    image = _image_section(image_config)
    argv = resolve_argv(spec.entrypoint, spec.cmd, image.get("Entrypoint"), image.get("Cmd"))
    env = merge_env(list(image.get("Env") or []), spec.env)
    workdir = spec.workdir or image.get("WorkingDir") or "/"
    user = spec.user if spec.user is not None and spec.user != "" else image.get("User") or ""
    return ProcessPlan(argv=argv, env=env, workdir=workdir, user=user)


def image_exposed_ports(image_config: dict[str, Any]) -> list[str]:
    return sorted((_image_section(image_config).get("ExposedPorts") or {}).keys())


def image_volumes(image_config: dict[str, Any]) -> list[str]:
    """The image's ``VOLUME`` paths."""
    volumes = _image_section(image_config).get("Volumes") or {}
    return sorted(str(path) for path in volumes) if isinstance(volumes, dict) else []


def image_stop_signal(image_config: dict[str, Any]) -> str | None:
    value = _image_section(image_config).get("StopSignal")
    return str(value) if value else None


# -- parsing user input ------------------------------------------------------


def parse_signal(value: str | int) -> int:
    """A signal given by name (TERM, SIGTERM, sigkill) or number, validated."""
    text = str(value).strip()
    if text.isdigit():
        number = int(text)
        if 1 <= number < signal.NSIG:
            return number
        raise InvalidArgument(f"invalid signal: {value}")
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidArgument(f"invalid signal: {value}") from None


def parse_port_spec(text: str) -> list[PortBinding]:
    """``[ip:][hostPort:]containerPort[/proto]``, with ranges ``8000-8001:80-81``."""
    body, _, proto = text.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp"):
        raise InvalidArgument(f"invalid protocol {proto!r} in port spec {text!r}")
    host_ip = ""
    if body.startswith("["):  # [::1]:8080:80
        close = body.find("]")
        if close < 0:
            raise InvalidArgument(f"invalid port spec {text!r}")
        host_ip, body = body[1:close], body[close + 2 :]
    parts = body.split(":")
    if len(parts) == 3:
        host_ip, host_part, container_part = parts
    elif len(parts) == 2:
        host_part, container_part = parts
    elif len(parts) == 1:
        host_part, container_part = "", parts[0]
    else:
        raise InvalidArgument(f"invalid port spec {text!r}")
    container_ports = _port_range(container_part, text)
    host_ports = _port_range(host_part, text) if host_part else [0] * len(container_ports)
    if len(host_ports) != len(container_ports):
        raise InvalidArgument(f"port ranges differ in length in {text!r}")
    return [
        PortBinding(container_port=c, protocol=proto, host_ip=host_ip, host_port=h)
        for h, c in zip(host_ports, container_ports, strict=True)
    ]


def _port_range(text: str, whole: str) -> list[int]:
    first, sep, last = text.partition("-")
    try:
        start = int(first)
        end = int(last) if sep else start
    except ValueError:
        raise InvalidArgument(f"invalid port {text!r} in port spec {whole!r}") from None
    if not (0 < start <= end <= 65535):
        raise InvalidArgument(f"invalid port {text!r} in port spec {whole!r}")
    return list(range(start, end + 1))


def parse_restart_policy(text: str) -> RestartPolicy:
    name, _, count = text.partition(":")
    if name not in RESTART_POLICIES:
        raise InvalidArgument(
            f"invalid restart policy {text!r}: use no, always, unless-stopped or on-failure[:N]"
        )
    if count and (name != "on-failure" or not count.isdigit()):
        raise InvalidArgument(f"invalid restart policy {text!r}")
    return RestartPolicy(name=name, max_retries=int(count or 0))


def parse_bind(text: str) -> BindMount:
    """``/host/path:/container/path[:ro|rw]``."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InvalidArgument(f"invalid bind mount {text!r}: use /host/path:/container/path[:ro]")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise InvalidArgument(f"invalid bind mount mode {mode!r} in {text!r}")
    if not parts[0].startswith("/"):
        raise InvalidArgument(f"bind mount source must be an absolute path: {parts[0]!r}")
    if not parts[1].startswith("/"):
        raise InvalidArgument(f"bind mount target must be an absolute path: {parts[1]!r}")
    return BindMount(source=parts[0], target=parts[1], readonly=mode == "ro")


def parse_tmpfs(text: str) -> TmpfsMount:
    """``/path[:size=64m,mode=1777]``."""
    target, _, options = text.partition(":")
    if not target.startswith("/"):
        raise InvalidArgument(f"tmpfs target must be an absolute path: {target!r}")
    mount = TmpfsMount(target=target)
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key == "size":
            mount.size = parse_size(value, "tmpfs size")
        elif key == "mode":
            try:
                mount.mode = int(value, 8)
            except ValueError:
                raise InvalidArgument(f"invalid tmpfs mode {value!r}") from None
        else:
            raise InvalidArgument(f"unsupported tmpfs option {option!r} (size, mode)")
    return mount
