"""Real registries for the tests: Debian's ``docker-registry`` on 127.0.0.1.

Three flavours, each started once per test session (process-wide, so that
importing these fixtures into several modules still starts one of each):

- ``registry``: no auth.
- ``auth_registry``: htpasswd basic auth (user ``husk`` / password ``husk-secret``).
- ``token_registry``: bearer tokens from :class:`TokenIssuer`, an aiohttp server in
  these fixtures that signs real ES256 JWTs the registry verifies through
  ``auth.token.rootcertbundle`` (a self-signed certificate). Anonymous clients
  get pull access to ``public/*``; ``husk``/``husk-secret`` gets pull+push everywhere.

Each fixture yields a :class:`RunningRegistry` with ``.host`` ("127.0.0.1:PORT")
and :meth:`RunningRegistry.push_oci_layout`, which pushes with the real skopeo.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import datetime
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REGISTRY_BINARY = "/usr/bin/docker-registry"
SKOPEO = "skopeo"
USERNAME = "husk"
PASSWORD = "husk-secret"
TOKEN_SERVICE = "husk-test-registry"
TOKEN_ISSUER = "husk-test-issuer"
STARTUP_DEADLINE = 20.0
SKOPEO_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for htpasswd (Go's bcrypt accepts $2b$); cost 4 keeps logins fast."""
    try:
        import bcrypt  # type: ignore[import-not-found]

        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode())
    except ImportError:
        pass
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # glibc/libxcrypt implements bcrypt

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


# ------------------------------------------------------------------ tokens


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """A token server (the registry's ``auth.token.realm``) signing ES256 JWTs."""

    def __init__(self, workdir: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "husk test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = workdir / "token-root.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._cert_der_b64 = base64.b64encode(
            self.cert.public_bytes(serialization.Encoding.DER)
        ).decode()
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self.lifetime = 300
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="token-issuer", daemon=True)
        self._runner: Any = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._cert_der_b64]}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    @staticmethod
    def granted(user: str | None, scope: str) -> dict[str, Any] | None:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository" or not name:
            return None
        wanted = [a for a in actions.split(",") if a]
        if user == USERNAME:
            allowed = wanted
        elif name.startswith("public/"):
            allowed = [a for a in wanted if a == "pull"]
        else:
            allowed = []
        return {"type": "repository", "name": name, "actions": allowed}

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        user: str | None = None
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            decoded = base64.b64decode(header[6:]).decode()
            name, _, password = decoded.partition(":")
            if name != USERNAME or password != PASSWORD:
                return web.json_response({"details": "bad credentials"}, status=401)
            user = name
        scopes = request.query.getall("scope", [])
        self.requests.append({"user": user, "scopes": list(scopes)})
        access = [g for g in (self.granted(user, s) for s in scopes) if g is not None]
        now = int(time.time())
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": user or "",
            "aud": request.query.get("service", TOKEN_SERVICE),
            "exp": now + self.lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        return web.json_response(
            {
                "token": self.sign(claims),
                "expires_in": self.lifetime,
                "issued_at": datetime.datetime.fromtimestamp(now, datetime.UTC).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                ),
            }
        )

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/token", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(STARTUP_DEADLINE):
            raise RuntimeError("token issuer did not start")

    def stop(self) -> None:
        if self._runner is not None:
            future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            with contextlib.suppress(Exception):
                future.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# ---------------------------------------------------------------- registry


@dataclass
class RunningRegistry:
    kind: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes]
    token_issuer: TokenIssuer | None = None
    username: str | None = None
    password: str | None = None
    log_path: Path = field(default_factory=Path)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        """The registry's filesystem storage (for tests that corrupt it on purpose)."""
        return self.workdir / "storage"

    def blob_data_path(self, digest: str) -> Path:
        hex_digest = digest.split(":", 1)[1]
        return (
            self.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"
        )

    def skopeo_creds(self) -> list[str]:
        if self.username is None:
            return []
        return ["--creds", f"{self.username}:{self.password}"]

    def push_oci_layout(self, layout_dir: Path, ref: str, *, tag: str = "latest") -> str:
        """Push ``oci:layout_dir:tag`` to ``docker://HOST/ref`` with skopeo; return the ref."""
        target = ref if ref.startswith(self.host + "/") else f"{self.host}/{ref}"
        run_skopeo(
            "copy",
            "--all",
            "--dest-tls-verify=false",
            *(["--dest-creds", f"{self.username}:{self.password}"] if self.username else []),
            f"oci:{layout_dir}:{tag}",
            f"docker://{target}",
        )
        return target

    def inspect(self, ref: str, *, raw: bool = False) -> Any:
        """``skopeo inspect`` of an image in this registry (raw: the manifest bytes)."""
        target = ref if ref.startswith(self.host + "/") else f"{self.host}/{ref}"
        args = ["inspect", "--tls-verify=false", *self.skopeo_creds()]
        if raw:
            args.append("--raw")
        out = run_skopeo(*args, f"docker://{target}")
        return out if raw else json.loads(out)

    def manifest_digest(self, ref: str) -> str:
        """The digest the registry reports for ``ref`` (read with plain urllib)."""
        repo, _, tag = ref.rpartition(":")
        request = urllib.request.Request(
            f"http://{self.host}/v2/{repo}/manifests/{tag}",
            method="HEAD",
            headers={
                "Accept": ", ".join(
                    [
                        "application/vnd.oci.image.index.v1+json",
                        "application/vnd.oci.image.manifest.v1+json",
                        "application/vnd.docker.distribution.manifest.v2+json",
                        "application/vnd.docker.distribution.manifest.list.v2+json",
                    ]
                )
            },
        )
        if self.kind == "basic":
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        elif self.kind == "token":
            raise NotImplementedError("manifest_digest is for the plain and basic registries")
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(response.headers["Docker-Content-Digest"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.token_issuer is not None:
            self.token_issuer.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def run_skopeo(*args: str) -> str:
    env = dict(os.environ)
    # skopeo wants a policy; an insecureAcceptAnything one keeps the tests self-contained.
    policy = Path(tempfile.gettempdir()) / "husk-test-skopeo-policy.json"
    if not policy.exists():
        policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
    result = subprocess.run(
        [SKOPEO, "--policy", str(policy), *args],
        capture_output=True,
        timeout=SKOPEO_TIMEOUT,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)} failed: {result.stderr.decode().strip()}")
    return result.stdout.decode()


def _config_yaml(kind: str, port: int, workdir: Path, issuer: TokenIssuer | None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {workdir / 'storage'}",
        "  delete:",
        "    enabled: true",
        "  cache:",
        "    blobdescriptor: inmemory",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        f"  secret: {secrets.token_hex(16)}",
    ]
    if kind == "basic":
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(f"{USERNAME}:{bcrypt_hash(PASSWORD)}\n")
        lines += ["auth:", "  htpasswd:", "    realm: husk-test", f"    path: {htpasswd}"]
    elif kind == "token":
        assert issuer is not None
        lines += [
            "auth:",
            "  token:",
            f"    realm: {issuer.realm}",
            f"    service: {TOKEN_SERVICE}",
            f"    issuer: {TOKEN_ISSUER}",
            f"    rootcertbundle: {issuer.cert_path}",
        ]
    return "\n".join(lines) + "\n"


def _wait_ready(registry: RunningRegistry) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            log = registry.log_path.read_text(errors="replace")
            raise RuntimeError(f"docker-registry exited early: {log[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{registry.host}/v2/", timeout=2):
                return
        except urllib.error.HTTPError as err:
            if err.code == 401:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry on {registry.host} not ready in {STARTUP_DEADLINE}s")


def start_registry(kind: str = "plain") -> RunningRegistry:
    """Start a registry (``plain``, ``basic`` or ``token``); the caller must stop() it."""
    if not Path(REGISTRY_BINARY).exists():
        raise RuntimeError(f"{REGISTRY_BINARY} missing: install the Debian package docker-registry")
    workdir = Path(tempfile.mkdtemp(prefix=f"husk-registry-{kind}-"))
    issuer = None
    if kind == "token":
        issuer = TokenIssuer(workdir)
        issuer.start()
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(_config_yaml(kind, port, workdir, issuer))
    log_path = workdir / "registry.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    registry = RunningRegistry(
        kind=kind,
        port=port,
        workdir=workdir,
        process=process,
        token_issuer=issuer,
        username=USERNAME if kind != "plain" else None,
        password=PASSWORD if kind != "plain" else None,
        log_path=log_path,
    )
    try:
        _wait_ready(registry)
    except BaseException:
        registry.stop()
        raise
    return registry


_RUNNING: dict[str, RunningRegistry] = {}
_RUNNING_LOCK = threading.Lock()


def shared_registry(kind: str) -> RunningRegistry:
    """One registry of each kind per test process, stopped at exit."""
    with _RUNNING_LOCK:
        running = _RUNNING.get(kind)
        if running is None or running.process.poll() is not None:
            running = start_registry(kind)
            _RUNNING[kind] = running
        return running


@atexit.register
def _stop_all() -> None:
    for running in _RUNNING.values():
        running.stop()
    _RUNNING.clear()


@pytest.fixture(scope="session")
def registry() -> Iterator[RunningRegistry]:
    yield shared_registry("plain")


@pytest.fixture(scope="session")
def auth_registry() -> Iterator[RunningRegistry]:
    yield shared_registry("basic")


@pytest.fixture(scope="session")
def token_registry() -> Iterator[RunningRegistry]:
    yield shared_registry("token")


# ------------------------------------------------------------- fault proxy


class FaultProxy:
    """An HTTP proxy in front of a real registry that misbehaves on purpose.

    ``faults`` maps a blob or manifest digest/tag (the last URL path segment) to
    one of: ``truncate`` (send half the body, then drop the connection),
    ``huge-manifest-chunked`` (the same without a Content-Length),
    ``truncate-once`` (only on the first request, so a resume can succeed),
    ``corrupt`` (flip one byte, same length), ``huge-manifest`` (a 100 MB body),
    ``503-once`` (one "503 Service Unavailable", then normal service).
    ``requests`` logs (method, path, Range header) of every request.
    """

    HUGE_MANIFEST_BYTES = 100 * 1024 * 1024

    def __init__(self, upstream: RunningRegistry) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.faults: dict[str, str] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.huge_bytes_sent = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._runner: Any = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web

        self.requests.append((request.method, request.path, request.headers.get("Range", "")))
        key = request.path.rstrip("/").rsplit("/", 1)[-1]
        fault = self.faults.get(key, "")
        if fault.startswith("huge-manifest") and "/manifests/" in request.path:
            headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
            if fault == "huge-manifest":
                headers["Content-Length"] = str(self.HUGE_MANIFEST_BYTES)
            response = web.StreamResponse(headers=headers)
            if fault != "huge-manifest":
                response.enable_chunked_encoding()
            await response.prepare(request)
            chunk = b" " * 65536
            with contextlib.suppress(ConnectionError, RuntimeError):
                for _ in range(self.HUGE_MANIFEST_BYTES // len(chunk)):
                    await response.write(chunk)
                    self.huge_bytes_sent += len(chunk)
            return response
        if fault == "503-once":
            del self.faults[key]
            return web.Response(status=503, text="try again")
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("accept", "authorization", "range", "content-type")
        }
        body = await request.read()
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                f"http://{self.upstream.host}{request.path_qs}",
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as upstream,
        ):
            payload = await upstream.read()
            passthrough = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower()
                in (
                    "content-type",
                    "docker-content-digest",
                    "www-authenticate",
                    "location",
                    "content-range",
                    "docker-distribution-api-version",
                    "accept-ranges",
                )
            }
            status = upstream.status
        if request.method == "GET" and fault in ("truncate", "truncate-once") and status < 300:
            if fault == "truncate-once":
                del self.faults[key]
            response = web.StreamResponse(
                status=status, headers={**passthrough, "Content-Length": str(len(payload))}
            )
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            request.transport.close()
            return response
        if request.method == "GET" and fault == "corrupt" and payload:
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        return web.Response(status=status, body=payload, headers=passthrough)

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(STARTUP_DEADLINE):
            raise RuntimeError("fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            with contextlib.suppress(Exception):
                future.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
