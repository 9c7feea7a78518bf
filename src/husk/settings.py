"""Everything a user can set for husk: environment variables and ``config.json``.

Host code reads a setting only through this module (the guest agent, which runs in the
VM with the standard library alone, keeps its own). Values are read when asked for, not
at import, so a test or a long-lived daemon sees the environment as it is now.

Environment variables (unset and empty mean the same: the default):

==========================  ========  ===================================================
variable                    type      meaning (default)
==========================  ========  ===================================================
HUSK_DATA_DIR               path      images, containers, bundle, templates, config.json
                                      (/var/lib/husk for root, else
                                      $XDG_DATA_HOME/husk)
XDG_DATA_HOME               path      a user's data home (~/.local/share)
HUSK_RUN_DIR                path      sockets, pid and lock files, VM state
                                      (/run/husk for root, else $XDG_RUNTIME_DIR/husk)
XDG_RUNTIME_DIR             path      a user's runtime directory (/tmp/husk-UID)
HUSK_SOCKET                 path      the daemon's socket (<run dir>/husk.sock)
HUSK_DAEMON_START_TIMEOUT   seconds   how long a command waits for the daemon it
                                      started (60; must be positive)
HUSK_ACCEL                  choice    kvm, tcg or auto (auto: KVM where a probe boot
                                      reaches the agent, else TCG)
HUSK_QEMU                   command   the QEMU binary (qemu-system-x86_64)
HUSK_NO_JAIL                flag      run QEMU unconfined (off)
HUSK_NO_TEMPLATE            flag      boot every VM cold, never from a template (off)
HUSK_NO_REHEARSAL           flag      offer warm-pool VMs without rehearsing a start in
                                      them first (off; for benchmarks)
HUSK_NO_ROOT_READY          flag      never start a container from a root-ready snapshot
                                      (a template per image saved after its root is
                                      assembled) nor build one, whatever config.json
                                      says (off)
HUSK_DISK_STAGING           flag      unpack image layers for a disk build on disk, never
                                      in memory (/dev/shm) (off)
HUSK_NO_RAM_HOLDER          flag      husk-runtime's keepers load a boot template's RAM
                                      themselves, never from a RAM holder (off)
HUSK_KERNEL                 path      a kernel to boot instead of the bundle's
HUSK_INITRD                 path      an initramfs to boot instead of the bundle's
HUSK_SYSTEM_BUNDLE          path      the system-wide guest bundle every user may boot
                                      when they have none of their own
                                      (/usr/local/share/husk/bundle, then
                                      /var/lib/husk/bundle)
HUSK_SYSTEM_IMAGES          path      husk.local/ images installed for every user
                                      (/usr/local/share/husk/images)
HUSK_INSECURE_REGISTRIES    list      comma-separated host[:port] spoken to over plain
                                      HTTP (loopback always is)
SOURCE_DATE_EPOCH           integer   the time stamped into a built bundle (0)
DOCKER_CONFIG               path      Docker's client configuration directory, for
                                      registry credentials (~/.docker)
DOCKER_CERT_PATH            path      the daemon's TLS files (~/.docker)
HTTP_PROXY, HTTPS_PROXY,    text      reported by ``GET /info`` as Docker does
NO_PROXY
==========================  ========  ===================================================

A flag is on when its value is 1, true, yes or on (any case). ``husk run -e NAME``
passes the caller's ``NAME`` into a container: that is the user's data, not a setting.

``<data dir>/config.json`` (a JSON object; absent means every default):

==============  ===========================================  ======================
key             value                                        default
==============  ===========================================  ======================
templates       true or false: restore VMs from templates    true
root_ready      true or false: first starts of an image's    false
                containers restore a snapshot saved after
                its root was assembled (needs templates;
                docs/PERFORMANCE.md: a small gain so far)
warm_pool       {"size": n, "memory": bytes, "cpus": n}:      no pool
                idle VMs the daemon keeps booted
volume_size     a size such as "10G": the limit of every new  no limit (as Docker)
                volume made without options (its own size=
                wins); needs root (docs/VOLUMES.md)
==============  ===========================================  ======================
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

from husk.errors import BundleError, InvalidArgument
from husk.fileio import ensure_private_dir, write_file_atomic

# -- the environment ---------------------------------------------------------------------

HUSK_DATA_DIR = "HUSK_DATA_DIR"
HUSK_RUN_DIR = "HUSK_RUN_DIR"
XDG_DATA_HOME = "XDG_DATA_HOME"
XDG_RUNTIME_DIR = "XDG_RUNTIME_DIR"
HUSK_SOCKET = "HUSK_SOCKET"
HUSK_DAEMON_START_TIMEOUT = "HUSK_DAEMON_START_TIMEOUT"
HUSK_ACCEL = "HUSK_ACCEL"
HUSK_QEMU = "HUSK_QEMU"
HUSK_NO_JAIL = "HUSK_NO_JAIL"
HUSK_NO_TEMPLATE = "HUSK_NO_TEMPLATE"
HUSK_NO_REHEARSAL = "HUSK_NO_REHEARSAL"
HUSK_NO_ROOT_READY = "HUSK_NO_ROOT_READY"
HUSK_DISK_STAGING = "HUSK_DISK_STAGING"
HUSK_NO_RAM_HOLDER = "HUSK_NO_RAM_HOLDER"
HUSK_KERNEL = "HUSK_KERNEL"
HUSK_INITRD = "HUSK_INITRD"
HUSK_SYSTEM_BUNDLE = "HUSK_SYSTEM_BUNDLE"
HUSK_SYSTEM_IMAGES = "HUSK_SYSTEM_IMAGES"
HUSK_INSECURE_REGISTRIES = "HUSK_INSECURE_REGISTRIES"
SOURCE_DATE_EPOCH = "SOURCE_DATE_EPOCH"
DOCKER_CONFIG = "DOCKER_CONFIG"
DOCKER_CERT_PATH = "DOCKER_CERT_PATH"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

VARIABLES = (
    HUSK_DATA_DIR,
    XDG_DATA_HOME,
    HUSK_RUN_DIR,
    XDG_RUNTIME_DIR,
    HUSK_SOCKET,
    HUSK_DAEMON_START_TIMEOUT,
    HUSK_ACCEL,
    HUSK_QEMU,
    HUSK_NO_JAIL,
    HUSK_NO_TEMPLATE,
    HUSK_NO_REHEARSAL,
    HUSK_NO_ROOT_READY,
    HUSK_DISK_STAGING,
    HUSK_NO_RAM_HOLDER,
    HUSK_KERNEL,
    HUSK_INITRD,
    HUSK_SYSTEM_BUNDLE,
    HUSK_SYSTEM_IMAGES,
    HUSK_INSECURE_REGISTRIES,
    SOURCE_DATE_EPOCH,
    DOCKER_CONFIG,
    DOCKER_CERT_PATH,
    *PROXY_VARIABLES,
)
"""Every variable husk's host code reads (the table above documents each)."""

DEFAULT_START_TIMEOUT = 60.0
_TRUE = ("1", "true", "yes", "on")
Accel = Literal["kvm", "tcg"]


def raw(name: str) -> str | None:
    """The variable's text, None when unset or empty. Only declared variables may be read."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a husk setting (declare it in husk.settings)")
    return os.environ.get(name) or None


def _path(name: str) -> Path | None:
    value = raw(name)
    return Path(value) if value else None


def _flag(name: str) -> bool:
    return (raw(name) or "").strip().lower() in _TRUE


def data_dir() -> Path:
    """Where husk keeps its data; root uses the system location, others their XDG one."""
    override = _path(HUSK_DATA_DIR)
    if override:
        return override
    if os.geteuid() == 0:
        return Path("/var/lib/husk")
    return (_path(XDG_DATA_HOME) or Path.home() / ".local" / "share") / "husk"


def run_dir() -> Path:
    """Where husk keeps sockets and per-VM runtime state (see husk.paths for trusting it)."""
    override = _path(HUSK_RUN_DIR)
    if override:
        return override
    if os.geteuid() == 0:
        return Path("/run/husk")
    return (_path(XDG_RUNTIME_DIR) or Path(f"/tmp/husk-{os.geteuid()}")) / "husk"


SYSTEM_BUNDLE_DIRS = (Path("/usr/local/share/husk/bundle"), Path("/var/lib/husk/bundle"))
"""Where install.sh puts the guest bundle for every user, then root's own bundle."""


def system_bundle_dirs() -> tuple[Path, ...]:
    """The system-wide bundle directories, in the order they are tried."""
    override = _path(HUSK_SYSTEM_BUNDLE)
    return (override,) if override else SYSTEM_BUNDLE_DIRS


def system_images_dir() -> Path:
    """Where husk.local/ images installed for every user are (husk.oci.system_images)."""
    return _path(HUSK_SYSTEM_IMAGES) or Path("/usr/local/share/husk/images")


def socket_override() -> Path | None:
    """``HUSK_SOCKET``: the daemon's socket, wherever the run directory is."""
    return _path(HUSK_SOCKET)


def daemon_start_timeout() -> float:
    text = raw(HUSK_DAEMON_START_TIMEOUT)
    if not text:
        return DEFAULT_START_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgument(f"{HUSK_DAEMON_START_TIMEOUT} must be a number of seconds") from None
    if value <= 0:
        raise InvalidArgument(f"{HUSK_DAEMON_START_TIMEOUT} must be positive")
    return value


def accel_requested() -> str:
    """``HUSK_ACCEL`` as given, lower case: kvm, tcg or auto (not validated)."""
    return (raw(HUSK_ACCEL) or "").strip().lower() or "auto"


def forced_accel() -> Accel | None:
    """The accelerator ``HUSK_ACCEL`` forces, None for auto; refuses anything else."""
    value = accel_requested()
    if value == "auto":
        return None
    if value == "kvm":
        return "kvm"
    if value == "tcg":
        return "tcg"
    raise InvalidArgument(f"{HUSK_ACCEL}={value} is not one of kvm, tcg, auto")


def qemu_command() -> str | None:
    """``HUSK_QEMU``: the QEMU binary to run instead of the default."""
    return raw(HUSK_QEMU)


def jail_disabled() -> bool:
    return _flag(HUSK_NO_JAIL)


def templates_disabled_by_env() -> bool:
    return _flag(HUSK_NO_TEMPLATE)


def pool_rehearsal_disabled() -> bool:
    return _flag(HUSK_NO_REHEARSAL)


def disk_staging() -> bool:
    return _flag(HUSK_DISK_STAGING)


def ram_holder_disabled() -> bool:
    """``HUSK_NO_RAM_HOLDER`` (husk.ociruntime.ramholder)."""
    return _flag(HUSK_NO_RAM_HOLDER)


def kernel_override() -> str | None:
    """``HUSK_KERNEL`` (the caller checks that it names a file)."""
    return raw(HUSK_KERNEL)


def initrd_override() -> str | None:
    """``HUSK_INITRD`` (the caller checks that it names a file)."""
    return raw(HUSK_INITRD)


def insecure_registries() -> set[str]:
    """``HUSK_INSECURE_REGISTRIES``, lower case, blanks dropped."""
    text = raw(HUSK_INSECURE_REGISTRIES) or ""
    return {entry.strip().lower() for entry in text.split(",") if entry.strip()}


def source_date_epoch() -> int:
    # BundleError, not InvalidArgument: only the bundle builder reads it, and reports so.
    value = raw(SOURCE_DATE_EPOCH) or "0"
    try:
        return int(value)
    except ValueError as err:
        raise BundleError(f"{SOURCE_DATE_EPOCH}={value!r} is not an integer") from err


def docker_config_dir() -> Path | None:
    return _path(DOCKER_CONFIG)


def docker_cert_path() -> Path | None:
    return _path(DOCKER_CERT_PATH)


def proxy(name: str) -> str:
    """One of HTTP_PROXY, HTTPS_PROXY, NO_PROXY; empty when unset."""
    if name not in PROXY_VARIABLES:
        raise KeyError(name)
    return raw(name) or ""


# -- config.json ---------------------------------------------------------------------------

CONFIG_FILE = "config.json"
TEMPLATES_KEY = "templates"
ROOT_READY_KEY = "root_ready"
WARM_POOL_KEY = "warm_pool"
VOLUME_SIZE_KEY = "volume_size"


def config_path() -> Path:
    return data_dir() / CONFIG_FILE


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_config() -> dict[str, Any]:
    """The whole of config.json; {} when there is none."""
    path = config_path()
    try:
        config = _load(path)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise InvalidArgument(f"cannot read husk settings {path}: {err}") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"husk settings {path} must hold a JSON object")
    return config


def templates_enabled() -> bool:
    """False when HUSK_NO_TEMPLATE is set, or config.json says {"templates": false}."""
    if templates_disabled_by_env():
        return False
    value = read_config().get(TEMPLATES_KEY, True)
    if not isinstance(value, bool):
        raise InvalidArgument(
            f'"{TEMPLATES_KEY}" in {config_path()} must be true or false, not {value!r}'
        )
    return value


ROOT_READY_DEFAULT = False
"""Whether root-ready snapshots are used when config.json does not say. Off: they cut a
start's QEMU CPU by ~6 % (docs/PERFORMANCE.md) for a VM booted per image and shape in the
background and ~130 MB of disk and of the daemon's sealed RAM each."""


def root_ready_enabled() -> bool:
    """False when templates are off, HUSK_NO_ROOT_READY is set, or config.json says
    {"root_ready": false}."""
    if _flag(HUSK_NO_ROOT_READY) or not templates_enabled():
        return False
    value = read_config().get(ROOT_READY_KEY, ROOT_READY_DEFAULT)
    if not isinstance(value, bool):
        raise InvalidArgument(
            f'"{ROOT_READY_KEY}" in {config_path()} must be true or false, not {value!r}'
        )
    return value


def default_volume_size() -> str | None:
    """config.json's "volume_size" (checked by the volume layer), None when unset."""
    value = read_config().get(VOLUME_SIZE_KEY)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidArgument(
            f'"{VOLUME_SIZE_KEY}" in {config_path()} must be a size such as "10G", not {value!r}'
        )
    return value


class WarmPoolSetting(NamedTuple):
    """config.json's "warm_pool": how many idle VMs of which shape (size 0: none).

    A NamedTuple, not a dataclass: every CLI command reads settings, and importing
    dataclasses (with inspect, ast, dis, tokenize) was a third of ``husk exec``'s imports."""

    size: int = 0
    memory_bytes: int | None = None
    cpus: float | None = None


def warm_pool() -> WarmPoolSetting:
    path = config_path()
    try:
        section = _load(path).get(WARM_POOL_KEY) or {}
        memory = section.get("memory")
        cpus = section.get("cpus")
        return WarmPoolSetting(
            int(section.get("size", 0)),
            int(memory) if memory is not None else None,
            float(cpus) if cpus is not None else None,
        )
    except FileNotFoundError:
        return WarmPoolSetting()
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise InvalidArgument(f"cannot read the warm pool settings in {path}: {err}") from None


def set_config(key: str, value: Any | None) -> None:
    """Set (or, with None, remove) one key of config.json, keeping the others."""
    path = config_path()
    try:
        config = _load(path)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        config = {}
    except (OSError, ValueError) as err:
        raise InvalidArgument(f"cannot read husk settings {path}: {err}") from None
    if value is None:
        config.pop(key, None)
    else:
        config[key] = value
    ensure_private_dir(path.parent)
    write_file_atomic(path, (json.dumps(config, indent=1, sort_keys=True) + "\n").encode())


def set_warm_pool(setting: WarmPoolSetting) -> None:
    if not setting.size:
        set_config(WARM_POOL_KEY, None)
        return
    set_config(
        WARM_POOL_KEY,
        {"size": setting.size, "memory": setting.memory_bytes, "cpus": setting.cpus},
    )
