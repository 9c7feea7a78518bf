"""Registry credentials and authentication challenges.

Credentials come, in order, from husk's own store (``husk login``, a 0600 file
under data_dir()), then from Docker's ``config.json``: a per-registry credential
helper, the inline ``auths`` entry, then the default ``credsStore`` helper.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from husk import settings
from husk.errors import InvalidArgument, PullFailed
from husk.fileio import write_json_atomic
from husk.paths import data_dir

DOCKER_HUB_DOMAIN = "docker.io"
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
HELPER_TIMEOUT_SECONDS = 30.0
_DOCKER_HUB_ALIASES = {
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
}


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def registry_key(server: str) -> str:
    """The host[:port] a credential entry is for (``https://host/v1/`` → ``host``)."""
    text = server.strip()
    for prefix in ("https://", "http://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = text.split("/", 1)[0].lower()
    return DOCKER_HUB_DOMAIN if text in _DOCKER_HUB_ALIASES else text


def husk_auth_path() -> Path:
    return data_dir() / "auth.json"


def docker_config_path() -> Path:
    base = settings.docker_config_dir()
    return base / "config.json" if base else Path.home() / ".docker" / "config.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise InvalidArgument(f"cannot read credentials file {path}: {err}") from None
    return data if isinstance(data, dict) else {}


def _decode_auth_entry(entry: Any, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = str(entry.get("identitytoken") or "")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidArgument(f"credentials in {where} are not valid base64") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise InvalidArgument(f"credentials in {where} are not 'user:password'")
        return Credentials(user, password, token)
    if entry.get("username"):
        return Credentials(str(entry["username"]), str(entry.get("password") or ""), token)
    if token:
        return Credentials(identity_token=token)
    return None


def _find_entry(auths: dict[str, Any], host: str) -> Any:
    for server, entry in auths.items():
        if registry_key(server) == host:
            return entry
    return None


def run_credential_helper(name: str, host: str) -> Credentials | None:
    """``docker-credential-NAME get``: the Docker credential-helper protocol."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise InvalidArgument(f"invalid credential helper name {name!r}")
    server = DOCKER_HUB_AUTH_KEY if host == DOCKER_HUB_DOMAIN else host
    program = f"docker-credential-{name}"
    try:
        result = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT_SECONDS,
            check=False,
        )
    except FileNotFoundError:
        raise PullFailed(f"credential helper {program} is configured but not installed") from None
    except subprocess.TimeoutExpired:
        raise PullFailed(
            f"credential helper {program} did not answer within {HELPER_TIMEOUT_SECONDS:.0f}s"
        ) from None
    if result.returncode != 0:
        message = result.stdout.decode(errors="replace").strip()
        if "credentials not found" in message.lower():
            return None
        detail = message or result.stderr.decode(errors="replace").strip()
        raise PullFailed(f"credential helper {program} failed: {detail}")
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        raise PullFailed(f"credential helper {program} returned invalid JSON") from None
    username = str(answer.get("Username") or "")
    secret = str(answer.get("Secret") or "")
    if username == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username, secret)


def lookup_credentials(host: str) -> Credentials | None:
    """Credentials for a registry ``host[:port]``, or None to go anonymous."""
    host = registry_key(host)
    own = _find_entry(_read_json(husk_auth_path()).get("auths") or {}, host)
    found = _decode_auth_entry(own, str(husk_auth_path()))
    if found is not None:
        return found
    config_path = docker_config_path()
    config = _read_json(config_path)
    helpers = config.get("credHelpers") or {}
    for server, helper in helpers.items():
        if registry_key(server) == host:
            return run_credential_helper(str(helper), host)
    entry = _find_entry(config.get("auths") or {}, host)
    found = _decode_auth_entry(entry, str(config_path))
    if found is not None:
        return found
    if config.get("credsStore"):
        return run_credential_helper(str(config["credsStore"]), host)
    return None


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)  # private: it holds credentials


def store_credentials(host: str, username: str, password: str) -> Path:
    """Save credentials for ``husk login`` (base64 like Docker; the file is 0600)."""
    if not username:
        raise InvalidArgument("username must not be empty")
    if ":" in username:
        raise InvalidArgument("username must not contain ':'")
    path = husk_auth_path()
    data = _read_json(path)
    auths = {
        k: v for k, v in (data.get("auths") or {}).items() if registry_key(k) != registry_key(host)
    }
    auths[registry_key(host)] = {
        "auth": base64.b64encode(f"{username}:{password}".encode()).decode()
    }
    data["auths"] = auths
    _write_private_json(path, data)
    return path


def remove_credentials(host: str) -> bool:
    path = husk_auth_path()
    data = _read_json(path)
    auths = data.get("auths") or {}
    kept = {k: v for k, v in auths.items() if registry_key(k) != registry_key(host)}
    if len(kept) == len(auths):
        return False
    data["auths"] = kept
    _write_private_json(path, data)
    return True


# --------------------------------------------------------------- challenges

_AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower-case: "bearer" or "basic"
    params: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str:
        for name, value in self.params:
            if name == key:
                return value
        return ""


def parse_challenge(header: str) -> Challenge:
    """Parse one ``WWW-Authenticate`` value, e.g. ``Bearer realm="…",service="…"``."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        raise PullFailed("registry sent an empty WWW-Authenticate challenge")
    params: list[tuple[str, str]] = []
    pos = 0
    while pos < len(rest):
        match = _AUTH_PARAM.match(rest, pos)
        if match is None or match.end() == pos:
            break
        quoted, bare = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else (bare or "")
        params.append((match.group(1).lower(), value))
        pos = match.end()
    return Challenge(scheme.lower(), tuple(params))
