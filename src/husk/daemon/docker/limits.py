"""How much the API accepts: request bodies, and the fields a container record stores.

Any local client can reach the API, so sizes are bounded before anything is read
into memory or written to disk.

Request bodies, by kind of endpoint:

* **JSON bodies** (container create, exec create and start, start, the pool, every
  other small request) are read whole into memory: at most :data:`MAX_JSON_BODY`
  (4 MiB; a create body that needs more is not a real one). Beyond it the daemon
  answers ``413`` with a one-line message and stores nothing. A body announced as
  too large by its ``Content-Length`` is refused before any of it is read.
* **Streamed uploads** are never held in memory: ``PUT /containers/{id}/archive``
  goes straight into the guest and is bounded by the container's writable disk;
  ``POST /images/load`` and ``POST /images/create?fromSrc=-`` are written to a file
  in the image store's ingest directory and are bounded by the free space of the
  data directory's filesystem (and by the archive reader's own limits).

Stored fields (a ``400`` names the field and its limit): a container's name, its
labels, environment, command and entrypoint, health-check command, mounts, ports
and the short strings (image, user, working directory, hostname, stop signal),
and the same for an exec. The figures follow what Linux itself accepts where there
is such a limit (128 KiB for one argument or variable, 64 bytes for a hostname,
4096 for a path) and are generous elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from husk.errors import HuskError, InvalidArgument

if TYPE_CHECKING:
    from husk.runtime.execs import ExecSpec
    from husk.spec import ContainerSpec

KiB = 1024
MiB = 1024 * KiB

MAX_JSON_BODY = 4 * MiB

MAX_NAME = 128
MAX_ARG = 128 * KiB  # Linux's MAX_ARG_STRLEN: one argv or environment string
MAX_ARGV_TOTAL = 1 * MiB  # command + entrypoint (Linux's ARG_MAX is 2 MiB with env)
MAX_ARGS = 4096
MAX_ENV_TOTAL = 1 * MiB
MAX_ENV = 4096
MAX_LABEL_KEY = 1 * KiB
MAX_LABEL_VALUE = 64 * KiB
MAX_LABELS_TOTAL = 256 * KiB
MAX_LABELS = 1024
MAX_PATH = 4096
MAX_MOUNTS = 256
MAX_PORTS = 4096
MAX_IMAGE = 1 * KiB
MAX_USER = 256
MAX_HOSTNAME = 64
MAX_SIGNAL = 32


class PayloadTooLarge(HuskError):
    """A request body beyond what the endpoint accepts (HTTP 413)."""

    http_status = 413
    kind = "payload_too_large"


def human(size: int) -> str:
    for unit, factor in (("MiB", MiB), ("KiB", KiB)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value.is_integer() else f"{value:.1f} {unit}"
    return f"{size} bytes"


def body_too_large(limit: int = MAX_JSON_BODY, size: int | None = None) -> PayloadTooLarge:
    given = f" ({human(size)} sent)" if size is not None else ""
    return PayloadTooLarge(f"request body too large{given}: the limit is {human(limit)}")


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_text(field: str, value: str | None, limit: int) -> None:
    if value is not None and _size(value) > limit:
        raise InvalidArgument(
            f"{field} is too long ({human(_size(value))}): the limit is {human(limit)}"
        )


def check_strings(
    field: str, values: Iterable[str] | None, *, each: int, total: int, count: int
) -> None:
    items = list(values or [])
    if len(items) > count:
        raise InvalidArgument(f"{field} has {len(items)} entries: the limit is {count}")
    size = 0
    for item in items:
        check_text(f"an entry of {field}", item, each)
        size += _size(item)
    if size > total:
        raise InvalidArgument(f"{field} is too large ({human(size)}): the limit is {human(total)}")


def check_name(name: str | None) -> None:
    check_text("the container name", name, MAX_NAME)


def check_labels(labels: dict[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"Labels has {len(labels)} entries: the limit is {MAX_LABELS}")
    total = 0
    for key, value in labels.items():
        check_text("a label key", key, MAX_LABEL_KEY)
        check_text(f"the value of label {key!r}", value, MAX_LABEL_VALUE)
        total += _size(key) + _size(value)
    if total > MAX_LABELS_TOTAL:
        raise InvalidArgument(
            f"Labels are too large ({human(total)}): the limit is {human(MAX_LABELS_TOTAL)}"
        )


def check_argv(field: str, argv: Iterable[str] | None) -> None:
    check_strings(field, argv, each=MAX_ARG, total=MAX_ARGV_TOTAL, count=MAX_ARGS)


def check_env(env: Iterable[str] | None) -> None:
    check_strings("Env", env, each=MAX_ARG, total=MAX_ENV_TOTAL, count=MAX_ENV)


def check_spec(spec: ContainerSpec) -> None:
    """Every stored field of a container create within its limit, else a 400."""
    check_name(spec.name)
    check_text("Image", spec.image, MAX_IMAGE)
    check_argv("Cmd and Entrypoint", [*(spec.entrypoint or []), *(spec.cmd or [])])
    check_env(spec.env)
    check_labels(spec.labels)
    check_text("WorkingDir", spec.workdir, MAX_PATH)
    check_text("User", spec.user, MAX_USER)
    check_text("Hostname", spec.hostname, MAX_HOSTNAME)
    check_text("StopSignal", spec.stop_signal, MAX_SIGNAL)
    if spec.healthcheck is not None:
        check_argv("Healthcheck.Test", spec.healthcheck.test)
    mounts = len(spec.binds) + len(spec.tmpfs)
    if mounts > MAX_MOUNTS:
        raise InvalidArgument(f"{mounts} mounts: the limit is {MAX_MOUNTS}")
    for bind in spec.binds:
        check_text("a bind mount's source", bind.source, MAX_PATH)
        check_text("a bind mount's target", bind.target, MAX_PATH)
    for tmpfs in spec.tmpfs:
        check_text("a tmpfs mount's target", tmpfs.target, MAX_PATH)
    ports = len(spec.ports) + len(spec.exposed_ports)
    if ports > MAX_PORTS:
        raise InvalidArgument(f"{ports} ports: the limit is {MAX_PORTS}")
    for binding in spec.ports:
        check_text("a port binding's host IP", binding.host_ip, MAX_USER)


def check_exec(spec: ExecSpec) -> None:
    """An exec's fields within the same limits as a container's."""
    check_argv("Cmd", spec.argv)
    check_env(spec.env)
    check_text("User", spec.user, MAX_USER)
    check_text("WorkingDir", spec.workdir, MAX_PATH)
    check_text("DetachKeys", spec.detach_keys, MAX_SIGNAL)
