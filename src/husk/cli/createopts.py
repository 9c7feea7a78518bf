"""The API body of ``husk run`` and ``husk create``, from their parsed options.

Every value is validated here, before anything reaches the daemon, so a typo
costs one clear line and leaves no container behind. The options themselves (click's
declarations) are in :mod:`husk.cli.createflags`; this module imports no click, so the
quick parse of ``husk run`` (:mod:`husk.cli.quick`) builds the same body without it.
"""

from __future__ import annotations

import os
import re
from typing import Any

from husk import sizes
from husk.errors import InvalidArgument

# husk.spec, husk.confinement, husk.volumes.mountspec and husk.cli.timeparse are
# imported by the options that need them (each marked "lazy: CLI start-up"): together
# about 25 ms of every `husk run` and `husk create` that uses none of them.


class CreateRequest:
    """What ``POST /containers/create`` gets, plus what the client itself needs.

    A plain class, not a dataclass: importing ``dataclasses`` costs every ``husk run``
    a few milliseconds (inspect, ast, dis, tokenize)."""

    def __init__(
        self,
        *,
        name: str | None,
        image: str,
        body: dict[str, Any],
        pull_policy: str,
        platform: str | None,
        auto_remove: bool,
        tty: bool,
        interactive: bool,
    ) -> None:
        self.name = name
        self.image = image
        self.body = body
        self.pull_policy = pull_policy
        self.platform = platform
        self.auto_remove = auto_remove
        self.tty = tty
        self.interactive = interactive

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CreateRequest) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"CreateRequest({vars(self)!r})"

    def query(self) -> dict[str, Any]:
        return {"name": self.name, "platform": self.platform}


def build_create_request(
    image: str, command: tuple[str, ...], options: dict[str, Any], *, attach: bool
) -> CreateRequest:
    """Validate the options of run/create and turn them into the API's create body."""
    if not image:
        raise InvalidArgument("an image name is required")
    body: dict[str, Any] = {"Image": image}
    host: dict[str, Any] = {}

    interactive = bool(options.get("interactive"))
    tty = bool(options.get("tty"))
    body["Tty"] = tty
    body["OpenStdin"] = interactive
    body["StdinOnce"] = interactive and attach
    body["AttachStdin"] = interactive and attach
    body["AttachStdout"] = attach
    body["AttachStderr"] = attach
    if command:
        body["Cmd"] = list(command)
    entrypoint = options.get("entrypoint")
    if entrypoint is not None:
        # An empty --entrypoint clears the image's, as Docker's [""] says.
        body["Entrypoint"] = [entrypoint]

    env = [*read_env_files(options.get("env_file") or ()), *env_values(options.get("env") or ())]
    if env:
        body["Env"] = env
    labels = _labels(options.get("label") or (), options.get("label_file") or ())
    if options.get("no_template"):
        # Carried as a label: the Docker API has no field for it, and labels persist.
        from husk.spec import NO_TEMPLATE_LABEL  # lazy: CLI start-up (see the top)

        labels[NO_TEMPLATE_LABEL] = "true"
    if labels:
        body["Labels"] = labels
    if options.get("workdir"):
        if not str(options["workdir"]).startswith("/"):
            raise InvalidArgument(
                f"the working directory {options['workdir']!r} is not an absolute path"
            )
        body["WorkingDir"] = options["workdir"]
    if options.get("user"):
        body["User"] = options["user"]
    if options.get("hostname"):
        body["Hostname"] = _hostname(options["hostname"])
    if options.get("stop_signal"):
        from husk import spec  # lazy: CLI start-up (see the top)

        spec.parse_signal(options["stop_signal"])
        body["StopSignal"] = options["stop_signal"]
    if options.get("stop_timeout") is not None:
        body["StopTimeout"] = int(options["stop_timeout"])
    health = _healthcheck(options)
    if health is not None:
        body["Healthcheck"] = health

    exposed: dict[str, dict[str, Any]] = {}
    bindings: dict[str, list[dict[str, str]]] = {}
    if options.get("expose") or options.get("publish"):
        _ports(options, exposed, bindings)
    if exposed:
        body["ExposedPorts"] = exposed
    if bindings:
        host["PortBindings"] = bindings
    if options.get("publish_all"):
        host["PublishAllPorts"] = True

    _volumes(options, host)
    tmpfs: dict[str, str] = {}
    for text in options.get("tmpfs") or ():
        from husk import spec  # lazy: CLI start-up (see the top)

        tmpfs[spec.parse_tmpfs(text).target] = text.partition(":")[2]
    if tmpfs:
        host["Tmpfs"] = tmpfs

    if options.get("memory"):
        host["Memory"] = sizes.parse_memory(options["memory"])
    if options.get("cpus") is not None:
        host["NanoCpus"] = sizes.cpus_to_nanos(sizes.parse_cpus(options["cpus"], "--cpus"))

    restart_name, restart_retries = "no", 0
    if options.get("restart") not in (None, "", "no"):  # "no" needs no parsing
        from husk import spec  # lazy: CLI start-up (see the top)

        restart = spec.parse_restart_policy(options["restart"])
        restart_name, restart_retries = restart.name, restart.max_retries
    auto_remove = bool(options.get("auto_remove"))
    if auto_remove and restart_name != "no":
        raise InvalidArgument("conflicting options: --restart and --rm")
    host["RestartPolicy"] = {"Name": restart_name, "MaximumRetryCount": restart_retries}
    host["AutoRemove"] = auto_remove
    if options.get("privileged"):
        host["Privileged"] = True
    if options.get("init"):
        host["Init"] = True
    host.update(_confinement(options))
    networking = _networking(options)
    if networking:
        host["NetworkMode"] = networking[0]
        body["NetworkingConfig"] = {"EndpointsConfig": networking[1]}
    body["HostConfig"] = host

    name = options.get("name")
    if name is not None:
        _check_name(name)
    return CreateRequest(
        name=name,
        image=image,
        body=body,
        pull_policy=options.get("pull_policy") or "missing",
        platform=options.get("platform"),
        auto_remove=auto_remove,
        tty=tty,
        interactive=interactive,
    )


def _ports(
    options: dict[str, Any],
    exposed: dict[str, dict[str, Any]],
    bindings: dict[str, list[dict[str, str]]],
) -> None:
    """--expose and --publish into ExposedPorts and PortBindings."""
    from husk import spec  # lazy: CLI start-up (see the top)

    for text in options.get("expose") or ():
        for binding in spec.parse_port_spec(text):
            if binding.host_port or binding.host_ip:
                raise InvalidArgument(f"--expose takes container ports only, not {text!r}")
            exposed[binding.key()] = {}
    for text in options.get("publish") or ():
        for binding in spec.parse_port_spec(text):
            exposed[binding.key()] = {}
            bindings.setdefault(binding.key(), []).append(
                {
                    "HostIp": binding.host_ip,
                    "HostPort": str(binding.host_port) if binding.host_port else "",
                }
            )


def _networking(options: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(NetworkMode, EndpointsConfig) of --network, --network-alias and --ip, as Docker's
    CLI sends them: the aliases and the address belong to the first network."""
    names = list(options.get("networks") or ())
    aliases = list(options.get("network_alias") or ())
    address = options.get("ip")
    if not names and not aliases and not address:
        return None
    if len(set(names)) != len(names):
        repeated = next(n for n in names if names.count(n) > 1)
        raise InvalidArgument(f"network {repeated!r} is specified multiple times")
    if address:
        from husk import confinement  # lazy: CLI start-up (see the top)

        confinement.check_dns_server(address)  # an IP address, with Docker's message
    mode = names[0] if names else "default"
    first: dict[str, Any] = {}
    if aliases:
        first["Aliases"] = aliases
    if address:
        first["IPAMConfig"] = {"IPv4Address": address}
    endpoints: dict[str, Any] = {mode: first}
    for name in names[1:]:
        endpoints[name] = {}
    return mode, endpoints


def _absolute_source(text: str) -> str:
    """``-v ./dir:/x``: a source starting with ``.`` is a path, relative to here."""
    source, sep, rest = text.partition(":")
    if sep and (source in (".", "..") or source.startswith(("./", "../"))):
        return f"{os.path.abspath(source)}:{rest}"
    return text


def _volumes(options: dict[str, Any], host: dict[str, Any]) -> None:
    """-v, --mount and --volumes-from into Binds, Mounts and VolumesFrom, checked here
    so that bad input is refused before anything is asked of the daemon."""
    if not any(options.get(flag) for flag in ("volume", "mounts", "tmpfs", "volumes_from")):
        return
    # lazy: CLI start-up (see the top)
    from husk import spec
    from husk.volumes import mountspec

    binds = [_absolute_source(text) for text in options.get("volume") or ()]
    parsed = [mountspec.parse_volume(text) for text in binds]
    mounts = [mountspec.parse_mount_flag(text) for text in options.get("mounts") or ()]
    tmpfs_targets = [spec.parse_tmpfs(t).target for t in options.get("tmpfs") or ()]
    mount_binds, mount_tmpfs = mountspec.mounts_from_api(mounts)
    mountspec.check_targets(
        [*parsed, *mount_binds],
        [*mount_tmpfs, *(spec.TmpfsMount(t) for t in tmpfs_targets)],
    )
    for entry in options.get("volumes_from") or ():
        mountspec.parse_volumes_from(entry)
    if binds:
        host["Binds"] = binds
    if mounts:
        host["Mounts"] = mounts
    if options.get("volumes_from"):
        host["VolumesFrom"] = list(options["volumes_from"])


def _check_name(name: str) -> None:
    if not re.fullmatch(r"/?[a-zA-Z0-9][a-zA-Z0-9_.-]*", name):
        raise InvalidArgument(
            f"invalid container name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )


def _hostname(name: str) -> str:
    if len(name) > 63 or not re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?", name):
        raise InvalidArgument(f"invalid hostname {name!r}")
    return name


def env_values(values: tuple[str, ...] | list[str]) -> list[str]:
    """``KEY=VALUE`` as given; a bare ``KEY`` takes the host's value, or is dropped."""
    out = []
    for value in values:
        key, sep, _ = value.partition("=")
        if not key:
            raise InvalidArgument(f"invalid environment variable {value!r}: the name is empty")
        if any(ch.isspace() for ch in key):
            raise InvalidArgument(f"invalid environment variable name {key!r}: it has spaces")
        if sep:
            out.append(value)
        elif key in os.environ:
            out.append(f"{key}={os.environ[key]}")
    return out


def _read_lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise InvalidArgument(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"cannot read {what} {path}: {err}") from None
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def read_env_files(paths: tuple[str, ...] | list[str]) -> list[str]:
    out: list[str] = []
    for path in paths:
        out.extend(env_values(_read_lines(path, "env file")))
    return out


def _labels(values: tuple[str, ...], files: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    lines = [line for path in files for line in _read_lines(path, "label file")]
    for value in [*lines, *values]:
        key, _, text = value.partition("=")
        if not key:
            raise InvalidArgument(f"invalid label {value!r}: the key is empty")
        labels[key] = text
    return labels


def _healthcheck(options: dict[str, Any]) -> dict[str, Any] | None:
    timings = {
        "Interval": options.get("health_interval"),
        "Timeout": options.get("health_timeout"),
        "StartPeriod": options.get("health_start_period"),
    }
    retries = options.get("health_retries")
    if options.get("no_healthcheck"):
        if options.get("health_cmd") or retries is not None or any(timings.values()):
            raise InvalidArgument("--no-healthcheck conflicts with --health-* options")
        return {"Test": ["NONE"]}
    if not options.get("health_cmd") and retries is None and not any(timings.values()):
        return None
    health: dict[str, Any] = {}
    if options.get("health_cmd"):
        health["Test"] = ["CMD-SHELL", options["health_cmd"]]
    flag_names = {
        "Interval": "--health-interval",
        "Timeout": "--health-timeout",
        "StartPeriod": "--health-start-period",
    }
    for key, text in timings.items():
        if text:
            from husk.cli.timeparse import parse_duration  # lazy: CLI start-up (see the top)

            seconds = parse_duration(text, flag_names[key])
            if seconds < 0.001 and not (key == "StartPeriod" and seconds == 0):
                raise InvalidArgument(f"{flag_names[key]} must be at least 1ms, not {text!r}")
            health[key] = int(seconds * 1e9)
    if retries is not None:
        if retries < 0:
            raise InvalidArgument("--health-retries cannot be negative")
        health["Retries"] = retries
    return health


def _confinement(options: dict[str, Any]) -> dict[str, Any]:
    """The HostConfig fields of the process-level flags, checked as Docker's CLI does."""
    host: dict[str, Any] = {}
    if any(options.get(flag) for flag in _CONFINEMENT_CHECKED):
        host.update(_checked_confinement(options))
    if options.get("read_only"):
        host["ReadonlyRootfs"] = True
    if options.get("shm_size"):
        host["ShmSize"] = _size(options["shm_size"], "--shm-size")
    if options.get("storage_opt"):
        storage = dict(text.partition("=")[::2] for text in options["storage_opt"])
        if any("=" not in text for text in options["storage_opt"]):
            raise InvalidArgument("invalid --storage-opt: expected size=N")
        sizes.parse_storage_opt(storage)  # refused here already, as Docker's CLI does
        host["StorageOpt"] = storage
    if options.get("group_add"):
        host["GroupAdd"] = list(options["group_add"])
    if options.get("pids_limit") is not None:
        host["PidsLimit"] = int(options["pids_limit"])
    if options.get("oom_kill_disable"):
        host["OomKillDisable"] = True
    if options.get("memory_swap"):
        text = str(options["memory_swap"])
        host["MemorySwap"] = -1 if text == "-1" else _size(text, "--memory-swap")
    if options.get("cpuset_cpus"):
        host["CpusetCpus"] = options["cpuset_cpus"]
    return host


_CONFINEMENT_CHECKED = (
    "oom_score_adj",
    "cap_add",
    "cap_drop",
    "ulimit",
    "sysctl",
    "security_opt",
    "add_host",
    "dns",
    "dns_search",
    "dns_option",
)
"""The flags :mod:`husk.confinement` checks (imported only when one is given)."""


def _checked_confinement(options: dict[str, Any]) -> dict[str, Any]:
    """The HostConfig fields of the flags in _CONFINEMENT_CHECKED."""
    from husk import confinement  # lazy: CLI start-up (see the top)

    host: dict[str, Any] = {}
    if options.get("oom_score_adj"):
        host["OomScoreAdj"] = confinement.check_oom_score_adj(int(options["oom_score_adj"]))
    if options.get("cap_add"):
        host["CapAdd"] = confinement.capability_names(list(options["cap_add"]), "CapAdd")
    if options.get("cap_drop"):
        host["CapDrop"] = confinement.capability_names(list(options["cap_drop"]), "CapDrop")
    if options.get("ulimit"):
        limits = [confinement.parse_ulimit(text) for text in options["ulimit"]]
        host["Ulimits"] = [{"Name": u.name, "Soft": u.soft, "Hard": u.hard} for u in limits]
    if options.get("sysctl"):
        sysctls: dict[str, str] = {}
        for text in options["sysctl"]:
            key, sep, value = text.partition("=")
            if not sep:
                raise InvalidArgument(f"sysctl '{text}' is not allowed")
            confinement.check_sysctl(key, value)
            sysctls[key] = value
        host["Sysctls"] = sysctls
    if options.get("security_opt"):
        confinement.no_new_privileges(list(options["security_opt"]))
        host["SecurityOpt"] = list(options["security_opt"])
    if options.get("add_host"):
        for entry in options["add_host"]:
            confinement.parse_add_host(entry)
        host["ExtraHosts"] = list(options["add_host"])
    if options.get("dns"):
        host["Dns"] = [confinement.check_dns_server(d) for d in options["dns"]]
    if options.get("dns_search"):
        host["DnsSearch"] = [confinement.check_dns_search(d) for d in options["dns_search"]]
    if options.get("dns_option"):
        host["DnsOptions"] = [confinement.check_dns_option(d) for d in options["dns_option"]]
    return host


def _size(text: str, flag: str) -> int:
    if str(text).strip().startswith("-"):
        raise InvalidArgument(f"invalid argument {text!r} for {flag}: invalid size: '{text}'")
    return sizes.parse_size(text, flag)
