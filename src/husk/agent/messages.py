"""Shape checks for every message the host reads from a guest agent.

The guest is untrusted: a workload with root in its VM can write any bytes to
the agent port. Every JSON body is therefore parsed with bounds (size, number
of tokens, nesting) and checked field by field before anything uses it. A bad
message raises :class:`MalformedMessage`, a :class:`~husk.errors.GuestError`
whose text names the message and the field, never a KeyError or TypeError.

Validators return plain, normalised values: only the fields checked here,
with the types promised, so callers need no further checks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from husk import confinement
from husk.errors import GuestError, InvalidArgument
from husk.guest import netstate, protocol
from husk.guest.netconfig import LAN_SLOTS
from husk.guest.protocol import Frame, MsgType
from husk.humanize import escape_controls
from husk.spec import ContainerSpec

MAX_JSON_BYTES = protocol.MAX_PAYLOAD
MAX_JSON_TOKENS = 64 * 1024
"""Brackets, commas and colons in one body: bounds how many objects json.loads builds
(a 1 MiB body of ``[[],[],...]`` would otherwise cost tens of MB to parse)."""
MAX_DEPTH = 8
MAX_TEXT = 8192
"""Longest string accepted in any field (error messages, command lines)."""
MAX_SESSIONS = 1024
MAX_PROCESSES = 4096
MAX_STATS_FIELDS = 64
INT64_MAX = (1 << 63) - 1
PID_MAX = (1 << 22) - 1  # Linux's highest pid_max
UID_MAX = (1 << 32) - 1
EXIT_CODE_MAX = 255
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


class MalformedMessage(GuestError):
    """The guest agent sent a message whose shape is wrong (a hostile or broken guest)."""

    protocol_violation = True
    """Read by the runtime (husk.runtime.faults): such a guest's container ends."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(f"guest agent sent a malformed {message}: {problem}")
        self.problem = problem


class UnexpectedMessage(MalformedMessage):
    """A well-formed message of a type that makes no sense at this point."""

    def __init__(self, got: MsgType, expected: str) -> None:
        GuestError.__init__(self, f"guest agent answered {got.name} instead of {expected}")
        self.problem = f"{got.name} instead of {expected}"


class GuestRefused(GuestError):
    """The agent answered a request with an ERROR message."""

    def __init__(self, message: str, code: str = "error", exit_code: int | None = None) -> None:
        super().__init__(message, guest_kind=code, exit_code=exit_code)
        self.code = code


# -- parsing ----------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_body(frame: Frame) -> dict[str, Any]:
    """The frame's JSON object, parsed within bounds (raises MalformedMessage)."""
    name = frame.type.name
    payload = frame.payload
    if frame.type in protocol.RAW_TYPES:
        raise MalformedMessage(name, "carries raw bytes, not JSON")
    if len(payload) > MAX_JSON_BYTES:
        raise MalformedMessage(name, f"body of {len(payload)} bytes exceeds {MAX_JSON_BYTES}")
    tokens = sum(payload.count(c) for c in (b"[", b"{", b",", b":"))
    if tokens > MAX_JSON_TOKENS:
        raise MalformedMessage(name, f"body has more than {MAX_JSON_TOKENS} JSON tokens")
    if not payload:
        return {}
    try:
        body = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedMessage(name, f"body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise MalformedMessage(name, "body is not a JSON object")
    if _depth(body) > MAX_DEPTH:
        raise MalformedMessage(name, f"body nests deeper than {MAX_DEPTH} levels")
    return body


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


# -- field readers ----------------------------------------------------------


class Fields:
    """Typed access to one JSON object; every failure names ``message`` and the field path."""

    def __init__(self, message: str, data: dict[str, Any], path: str = "") -> None:
        self.message = message
        self.data = data
        self.path = path

    def fail(self, key: str, problem: str) -> MalformedMessage:
        return MalformedMessage(self.message, f"field {self.path + key!r} {problem}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def integer(self, key: str, low: int = 0, high: int = INT64_MAX) -> int:
        value = self.data.get(key)
        if key not in self.data:
            raise self.fail(key, "is missing")
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"must be an integer, not {_kind(value)}")
        if not low <= value <= high:
            raise self.fail(key, f"must be between {low} and {high}, not {value}")
        return value

    def optional_integer(self, key: str, low: int = 0, high: int = INT64_MAX) -> int | None:
        return self.integer(key, low, high) if self.has(key) else None

    def text(self, key: str, limit: int = MAX_TEXT) -> str:
        value = self.data.get(key)
        if key not in self.data:
            raise self.fail(key, "is missing")
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {_kind(value)}")
        if len(value) > limit:
            raise self.fail(key, f"is longer than {limit} characters")
        return value

    def optional_text(self, key: str, default: str = "", limit: int = MAX_TEXT) -> str:
        return self.text(key, limit) if self.has(key) else default

    def optional_bool(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {_kind(value)}")
        return value

    def objects(self, key: str, limit: int) -> list[Fields]:
        """A list of JSON objects (absent or null: empty), each as its own Fields."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, not {_kind(value)}")
        if len(value) > limit:
            raise self.fail(key, f"has more than {limit} entries")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.fail(f"{key}[{i}]", f"must be an object, not {_kind(item)}")
            out.append(Fields(self.message, item, f"{self.path}{key}[{i}]."))
        return out

    def optional_object(self, key: str) -> Fields:
        value = self.data.get(key)
        if value is None:
            return Fields(self.message, {}, f"{self.path}{key}.")
        if not isinstance(value, dict):
            raise self.fail(key, f"must be an object, not {_kind(value)}")
        return Fields(self.message, value, f"{self.path}{key}.")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def fields_of(frame: Frame) -> Fields:
    return Fields(frame.type.name, parse_body(frame))


def expect(frame: Frame, *types: MsgType) -> None:
    """Raises UnexpectedMessage unless ``frame`` is one of ``types`` (ERROR raises its own)."""
    if frame.type is MsgType.ERROR:
        raise error(frame)
    if frame.type not in types:
        raise UnexpectedMessage(frame.type, " or ".join(t.name for t in types))


# -- messages ---------------------------------------------------------------

SESSION_KINDS = frozenset({"run", "exec", "archive"})


@dataclass(frozen=True)
class SessionInfo:
    """A process session the agent still holds (listed in READY after a reconnect)."""

    channel: int
    kind: str
    pid: int
    emitted: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "kind": self.kind,
            "pid": self.pid,
            "emitted": dict(self.emitted),
            "exit_code": self.exit_code,
        }


@dataclass(frozen=True)
class Ready:
    version: int
    sessions: list[SessionInfo]
    agent: str = ""
    prepared: bool = False
    uptime_ns: int | None = None
    identity: dict[str, Any] | None = None
    """What the agent set of the identity the HELLO carried ("entropy_bytes", and "mac"
    if one was asked for); None from an agent that does not take it with the HELLO."""

    def as_dict(self) -> dict[str, Any]:
        """The normalised body: only validated fields (what ``AgentClient.ready`` holds)."""
        return {
            "version": self.version,
            "agent": self.agent,
            "sessions": [s.as_dict() for s in self.sessions],
            "prepared": self.prepared,
            "uptime_ns": self.uptime_ns,
            "identity": self.identity,
        }


def ready(frame: Frame) -> Ready:
    expect(frame, MsgType.READY)
    body = fields_of(frame)
    version = body.integer("version", 0, INT64_MAX)
    if version != protocol.PROTOCOL_VERSION:
        return Ready(version=version, sessions=[])  # the rest may differ: the caller refuses it
    sessions = []
    seen: set[int] = set()
    for entry in body.objects("sessions", MAX_SESSIONS):
        # The host continues numbering after the highest id: leave room above it.
        channel = entry.integer("channel", 1, protocol.MAX_CHANNEL - MAX_SESSIONS)
        if channel in seen:
            raise entry.fail("channel", f"repeats channel {channel}")
        seen.add(channel)
        kind = entry.text("kind", 32)
        if kind not in SESSION_KINDS:
            raise entry.fail("kind", f"must be one of {', '.join(sorted(SESSION_KINDS))}")
        emitted = entry.optional_object("emitted")
        sessions.append(
            SessionInfo(
                channel=channel,
                kind=kind,
                pid=entry.integer("pid", 1, PID_MAX),
                emitted={
                    name: count
                    for name in ("stdout", "stderr")
                    if (count := emitted.optional_integer(name)) is not None
                },
                exit_code=entry.optional_integer("exit_code", 0, EXIT_CODE_MAX),
            )
        )
    return Ready(
        version=version,
        sessions=sessions,
        agent=body.optional_text("agent", limit=64),
        prepared=bool(body.optional_bool("prepared")),
        uptime_ns=body.optional_integer("uptime_ns"),
        identity=_ready_identity(body),
    )


def _ready_identity(body: Fields) -> dict[str, Any] | None:
    """READY's "identity": how much host randomness the guest credited, the MAC it set."""
    if not body.has("identity"):
        return None
    applied = body.optional_object("identity")
    identity: dict[str, Any] = {"entropy_bytes": applied.integer("entropy_bytes", 1, 1 << 20)}
    if applied.has("mac"):
        identity["mac"] = applied.text("mac", 64)
    return identity


def started(frame: Frame) -> int:
    """The pid in a STARTED message."""
    expect(frame, MsgType.STARTED)
    return fields_of(frame).integer("pid", 1, PID_MAX)


def exited(frame: Frame) -> int:
    """The exit code in an EXITED message (signal deaths arrive as 128+N)."""
    expect(frame, MsgType.EXITED)
    return fields_of(frame).integer("code", 0, EXIT_CODE_MAX)


def stdin_done(frame: Frame) -> tuple[int, int]:
    """The (offset, length) of the transfer ring range a STDIN_DONE frees."""
    expect(frame, MsgType.STDIN_DONE)
    body = fields_of(frame)
    return body.integer("offset", 0, INT64_MAX), body.integer("length", 0, INT64_MAX)


def error(frame: Frame, what: str = "") -> GuestError:
    """The error an ERROR message stands for (MalformedMessage if the ERROR itself is bad)."""
    if frame.type is not MsgType.ERROR:
        return UnexpectedMessage(frame.type, "ERROR")
    try:
        body = fields_of(frame)
        # Shown by clients (docker prints an API error raw), logged: no terminal controls.
        message = escape_controls(body.text("message"))
        code = body.optional_text("code", "error", limit=64)
        exit_code = body.optional_integer("exit_code", 0, EXIT_CODE_MAX)
    except MalformedMessage as exc:
        return exc
    return GuestRefused(f"{what}: {message}" if what else message, code, exit_code)


def ok(frame: Frame) -> dict[str, Any]:
    """The body of an OK reply: a bounded JSON object (callers check the fields they read)."""
    expect(frame, MsgType.OK)
    return parse_body(frame)


def stats(frame: Frame) -> dict[str, Any]:
    """A STATS reply: named numbers, and optionally ``processes`` (for top)."""
    expect(frame, MsgType.STATS)
    body = fields_of(frame)
    if len(body.data) > MAX_STATS_FIELDS + 1:
        raise MalformedMessage("STATS", f"has more than {MAX_STATS_FIELDS} fields")
    figures: dict[str, Any] = {}
    for key in body.data:
        if key == "processes":
            continue
        if not _NAME.fullmatch(key):
            raise MalformedMessage("STATS", f"field name {key[:80]!r} is not a plain name")
        figures[key] = body.integer(key)
    if "processes" in body.data:
        figures["processes"] = [
            {
                "pid": row.integer("pid", 1, PID_MAX),
                "ppid": row.integer("ppid", 0, PID_MAX),
                "uid": row.integer("uid", 0, UID_MAX),
                "time": row.text("time", 32),
                "cmd": row.text("cmd", MAX_TEXT),
            }
            for row in body.objects("processes", MAX_PROCESSES)
        ]
    return figures


def time_reply(frame: Frame) -> dict[str, Any]:
    """The OK reply to SET_TIME: the guest clock after setting it."""
    body = Fields("SET_TIME reply", ok(frame))
    return {"unix_ns": body.integer("unix_ns")}


def network_reply(frame: Frame) -> dict[str, Any]:
    """The OK reply to OVERLAY_CONFIG: the guest's address (and new MAC, if one was set)."""
    body = Fields("OVERLAY_CONFIG reply", ok(frame))
    reply: dict[str, Any] = {"address": body.optional_text("address", limit=64)}
    if body.has("mac"):
        reply["mac"] = body.text("mac", 64)
    return reply


_INTERFACE = re.compile(r"[A-Za-z0-9._-]{1,15}")


def network_config_reply(frame: Frame) -> dict[str, Any]:
    """The OK reply to NETWORK: ``{"interfaces": {"1": "eth1", ...}}`` (slot → interface)."""
    body = Fields("NETWORK reply", ok(frame))
    raw = body.data.get("interfaces")
    if not isinstance(raw, dict) or len(raw) > LAN_SLOTS:
        raise body.fail("interfaces", f"must be an object of at most {LAN_SLOTS} entries")
    interfaces: dict[str, str] = {}
    for slot, name in raw.items():
        if not (slot.isdigit() and 1 <= int(slot) <= LAN_SLOTS):
            raise body.fail("interfaces", f"{slot!r} is not a LAN slot")
        if not isinstance(name, str) or not _INTERFACE.fullmatch(name):
            raise body.fail("interfaces", f"slot {slot}: {name!r} is not an interface name")
        interfaces[slot] = name
    return {"interfaces": interfaces}


# -- requests ---------------------------------------------------------------


def run_options(spec: ContainerSpec) -> dict[str, Any]:
    """The RUN body's process settings of a container (only those it sets).

    The guest agent (husk.guest.agent.limits) applies them to the workload and to
    every exec session after it; ``host-gateway`` is resolved here, on the host.
    """
    body: dict[str, Any] = {}
    if spec.read_only:
        body["read_only"] = True
    if spec.cap_add:
        body["cap_add"] = list(spec.cap_add)
    if spec.cap_drop:
        body["cap_drop"] = list(spec.cap_drop)
    if spec.ulimits:
        body["ulimits"] = [{"name": u.name, "soft": u.soft, "hard": u.hard} for u in spec.ulimits]
    if spec.sysctls:
        body["sysctls"] = dict(spec.sysctls)
    # Always sent: a container's /dev/shm has Docker's size (64 MiB unless set).
    body["shm_size"] = spec.shm_size or confinement.DEFAULT_SHM_SIZE
    if spec.group_add:
        body["group_add"] = list(spec.group_add)
    if spec.no_new_privileges:
        body["no_new_privileges"] = True
    if confinement.unconfined_system_paths(spec.security_opt):
        body["unconfined_system_paths"] = True
    if spec.pids_limit:
        body["pids_limit"] = spec.pids_limit
    if spec.oom_score_adj:
        body["oom_score_adj"] = spec.oom_score_adj
    if spec.extra_hosts:
        body["extra_hosts"] = confinement.hosts_entries(spec.extra_hosts)
    if spec.dns:
        body["dns"] = list(spec.dns)
    if spec.dns_search:
        body["dns_search"] = list(spec.dns_search)
    if spec.dns_options:
        body["dns_options"] = list(spec.dns_options)
    return body


def network_body(body: dict[str, Any]) -> dict[str, Any]:
    """A NETWORK request's body, checked and normalised (docs/NETWORKS.md).

    InvalidArgument names the field that is wrong: the body comes from husk's own
    network model, so a bad one is a caller's bug or bad input, not the guest's.
    """
    try:
        return netstate.check(body)
    except ValueError as err:
        raise InvalidArgument(f"invalid container network state: {err}") from None
