"""A distribution-spec (v2) registry client on aiohttp.

One client talks to one registry. It answers auth challenges (anonymous or
basic credentials, bearer tokens cached per scope), retries transient failures
with backoff, streams blobs into the store with their digest verified before
they enter it, resumes interrupted blobs with Range, and refuses oversized
manifests without reading them whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from husk.errors import HuskError, InvalidArgument, NotFound, PullFailed
from husk.oci.auth import Challenge, Credentials, lookup_credentials, parse_challenge
from husk.oci.locks import async_file_lock
from husk.oci.manifest import (
    ACCEPT_MANIFESTS,
    MAX_MANIFEST_BYTES,
    document_media_type,
    sha256_digest,
)
from husk.oci.regconfig import allows_plain_http
from husk.oci.store import ImageStore

DOCKER_HUB_API = "registry-1.docker.io"
CHUNK_SIZE = 256 * 1024
MAX_REDIRECTS = 5
TOKEN_MIN_LIFETIME = 60
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}

ProgressFn = Callable[[int], None]


class RegistryError(PullFailed):
    """The registry refused or failed a request."""


class RegistryUnreachable(RegistryError):
    """No answer from the registry at all (connection refused, DNS, timeouts)."""


class _Transient(Exception):
    """A failure worth retrying (connection reset, 5xx, 429)."""


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str
    digest: str


@dataclass
class _Token:
    value: str
    expires_at: float


def scope_pull(repository: str) -> str:
    return f"repository:{repository}:pull"


def scope_push(repository: str) -> str:
    return f"repository:{repository}:pull,push"


class RegistryClient:
    """Client of one registry (``domain`` as in a reference: ``docker.io``, ``host:5000``)."""

    def __init__(
        self,
        domain: str,
        *,
        credentials: Credentials | None = None,
        use_stored_credentials: bool = True,
        retries: int = 4,
        backoff: float = 0.2,
        connect_timeout: float = 30.0,
        read_timeout: float = 60.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.domain = domain
        self.api_host = DOCKER_HUB_API if domain == "docker.io" else domain
        self._credentials = credentials
        self._use_stored = use_stored_credentials and credentials is None
        self._credentials_loaded = credentials is not None
        self.retries = max(1, retries)
        self.backoff = backoff
        self._plain_http_allowed = allows_plain_http(domain)
        self._base_url: str | None = None
        self._challenge: Challenge | None = None
        self._tokens: dict[str, _Token] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout,
            sock_connect=connect_timeout,
            sock_read=read_timeout,
        )
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> RegistryClient:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(limit=16)
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("RegistryClient used outside 'async with'")
        return self._session

    # ------------------------------------------------------------ plumbing

    def _credentials_for_host(self) -> Credentials | None:
        if not self._credentials_loaded:
            self._credentials_loaded = True
            if self._use_stored:
                self._credentials = lookup_credentials(self.domain)
        return self._credentials

    async def base_url(self) -> str:
        """``https://host``, or ``http://host`` where plain HTTP is allowed and TLS is absent."""
        if self._base_url is not None:
            return self._base_url
        if not self._plain_http_allowed:
            self._base_url = f"https://{self.api_host}"
            return self._base_url
        # Insecure or loopback: prefer TLS without verification, fall back to plain HTTP.
        probe = f"https://{self.api_host}/v2/"
        try:
            async with self.session.get(
                probe,
                ssl=False,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=5),
            ):
                self._base_url = f"https://{self.api_host}"
        except (TimeoutError, aiohttp.ClientError, ssl.SSLError, OSError):
            self._base_url = f"http://{self.api_host}"
        return self._base_url

    def _ssl_setting(self, url: str) -> bool:
        """False (no certificate check) only for an insecure registry's own host."""
        return not (
            url.startswith("https://")
            and self._plain_http_allowed
            and urlsplit(url).netloc == self.api_host
        )

    async def _auth_header(self, scope: str) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._credentials_for_host()
            return creds.basic_header() if creds and creds.username else None
        if challenge.scheme == "bearer":
            return "Bearer " + await self._token(scope, challenge)
        return None

    async def _token(self, scope: str, challenge: Challenge, *, refresh: bool = False) -> str:
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(scope)
            if cached is not None and not refresh and cached.expires_at > time.monotonic():
                return cached.value
            token = await self._fetch_token(scope, challenge)
            self._tokens[scope] = token
            return token.value

    async def _fetch_token(self, scope: str, challenge: Challenge) -> _Token:
        realm = challenge.get("realm")
        if not realm:
            raise RegistryError(f"registry {self.domain} sent a bearer challenge without a realm")
        realm_parts = urlsplit(realm)
        if realm_parts.scheme not in ("https", "http"):
            raise RegistryError(f"registry {self.domain} sent an invalid token realm {realm!r}")
        if realm_parts.scheme == "http" and not allows_plain_http(realm_parts.netloc):
            raise RegistryError(
                f"registry {self.domain} wants tokens over plain HTTP from {realm_parts.netloc}; "
                "refusing to send credentials unencrypted (list it as an insecure registry)"
            )
        params: list[tuple[str, str]] = []
        if challenge.get("service"):
            params.append(("service", challenge.get("service")))
        params.extend(("scope", s) for s in scope.split(" ") if s)
        creds = self._credentials_for_host()
        headers: dict[str, str] = {}
        ssl_setting = self._ssl_setting(realm)
        started = time.monotonic()
        for attempt in range(self.retries):
            try:
                if creds is not None and creds.identity_token:
                    form = {
                        "grant_type": "refresh_token",
                        "refresh_token": creds.identity_token,
                        "client_id": "husk",
                        "service": challenge.get("service"),
                        "scope": scope,
                    }
                    request = self.session.post(realm, data=form, ssl=ssl_setting)
                else:
                    if creds is not None and creds.username:
                        headers["Authorization"] = creds.basic_header()
                    url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(params)}"
                    request = self.session.get(url, headers=headers, ssl=ssl_setting)
                async with request as response:
                    if response.status in _TRANSIENT_STATUS:
                        raise _Transient(f"token server answered {response.status}")
                    if response.status in (401, 403):
                        who = (
                            f"as {creds.username!r}" if creds and creds.username else "anonymously"
                        )
                        raise RegistryError(
                            f"authentication to {self.domain} failed {who}: "
                            f"token server answered {response.status}"
                        )
                    if response.status != 200:
                        raise RegistryError(
                            f"token server for {self.domain} answered {response.status}"
                        )
                    body = await response.content.read(1024 * 1024)
                break
            except (TimeoutError, _Transient, aiohttp.ClientError) as err:
                if attempt + 1 >= self.retries:
                    raise RegistryError(f"cannot get a token for {self.domain}: {err}") from None
                await asyncio.sleep(self.backoff * 2**attempt)
        try:
            answer = json.loads(body)
        except ValueError:
            raise RegistryError(f"token server for {self.domain} returned invalid JSON") from None
        value = answer.get("token") or answer.get("access_token")
        if not isinstance(value, str) or not value:
            raise RegistryError(f"token server for {self.domain} returned no token")
        lifetime = answer.get("expires_in")
        if not isinstance(lifetime, int) or lifetime < TOKEN_MIN_LIFETIME:
            lifetime = TOKEN_MIN_LIFETIME
        # Expire early so a token never lapses mid-request.
        return _Token(value, started + lifetime * 0.9)

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        body: Callable[[], Any] | None = None,
        expect: tuple[int, ...] = (200,),
        allow_missing: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request with auth, redirects and retries; yield the response.

        ``path`` is relative to the registry (``/v2/…``) or an absolute URL from a
        Location header. ``body`` builds a fresh body for each attempt. With
        ``allow_missing`` a 404 is yielded instead of raised.
        """
        response = await self._send(method, path, scope=scope, headers=headers, body=body)
        try:
            if response.status not in expect and not (allow_missing and response.status == 404):
                await self._raise_for(response, method, path)
            yield response
        finally:
            response.release()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: dict[str, str] | None,
        body: Callable[[], Any] | None,
    ) -> aiohttp.ClientResponse:
        base = await self.base_url()
        url = path if path.startswith(("http://", "https://")) else base + path
        last_error = ""
        authenticated_retry = False
        attempt = 0
        while attempt < self.retries:
            attempt += 1
            try:
                response = await self._send_once(method, url, scope, headers, body)
            except (TimeoutError, aiohttp.ClientError, OSError) as err:
                last_error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
                continue
            if response.status == 401 and not authenticated_retry:
                header = response.headers.get("WWW-Authenticate", "")
                response.release()
                if not header:
                    raise RegistryError(f"{self.domain} answered 401 without an auth challenge")
                self._challenge = parse_challenge(header)
                if self._challenge.scheme == "bearer":
                    await self._token(scope, self._challenge, refresh=True)
                elif self._challenge.scheme != "basic":
                    raise RegistryError(
                        f"{self.domain} asks for unsupported auth scheme {self._challenge.scheme!r}"
                    )
                authenticated_retry = True
                attempt -= 1
                continue
            if response.status in _TRANSIENT_STATUS:
                last_error = f"HTTP {response.status}"
                delay = self.backoff * 2 ** (attempt - 1)
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    delay = max(delay, min(float(retry_after), 30.0))
                if attempt < self.retries:
                    response.release()
                    await asyncio.sleep(delay)
                    continue
            return response
        message = f"{method} {url} failed after {self.retries} attempts: {last_error}"
        if str(last_error).startswith("HTTP "):
            raise RegistryError(message)
        raise RegistryUnreachable(message)

    async def _send_once(
        self,
        method: str,
        url: str,
        scope: str,
        headers: dict[str, str] | None,
        body: Callable[[], Any] | None,
    ) -> aiohttp.ClientResponse:
        request_headers = dict(headers or {})
        auth = await self._auth_header(scope)
        origin = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            send_headers = dict(request_headers)
            if auth is not None and urlsplit(url).netloc == origin:
                send_headers["Authorization"] = auth
            response = await self.session.request(
                method,
                url,
                headers=send_headers,
                data=body() if body is not None else None,
                allow_redirects=False,
                ssl=self._ssl_setting(url),
            )
            if response.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = response.headers.get("Location")
                response.release()
                if not location:
                    raise RegistryError(f"{url} redirected without a Location")
                target = urljoin(url, location)
                if target.startswith("http://") and not url.startswith("http://"):
                    raise RegistryError(f"{url} redirected from HTTPS to plain HTTP")
                url = target
                continue
            return response
        raise RegistryError(f"too many redirects from {url}")

    async def _raise_for(self, response: aiohttp.ClientResponse, method: str, path: str) -> None:
        detail = ""
        with contextlib.suppress(Exception):
            raw = await response.content.read(64 * 1024)
            errors = json.loads(raw).get("errors") or []
            if errors:
                detail = "; ".join(
                    f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors
                )
        detail = f" ({detail})" if detail else ""
        where = f"{self.domain}{urlsplit(path).path or path}"
        if response.status == 401:
            creds = self._credentials_for_host()
            if creds is None:
                raise RegistryError(
                    f"{where}: authentication required; run 'husk login {self.domain}'{detail}"
                )
            raise RegistryError(f"{where}: authentication failed for {creds.username!r}{detail}")
        if response.status == 403:
            raise RegistryError(f"{where}: access denied{detail}")
        if response.status == 404:
            raise NotFound(f"{where}: not found{detail}")
        raise RegistryError(f"{method} {where} answered HTTP {response.status}{detail}")

    async def check_credentials(self) -> None:
        """Authenticate against ``/v2/`` (what ``husk login`` verifies)."""
        async with self.request("GET", "/v2/", scope=""):
            pass

    # ------------------------------------------------------------ manifests

    async def get_manifest(
        self, repository: str, reference: str, *, max_bytes: int = MAX_MANIFEST_BYTES
    ) -> FetchedManifest:
        """Fetch a manifest or index by tag or digest, verified when asked by digest."""
        path = f"/v2/{repository}/manifests/{reference}"
        async with self.request(
            "GET", path, scope=scope_pull(repository), headers={"Accept": ACCEPT_MANIFESTS}
        ) as response:
            length = response.content_length
            if length is not None and length > max_bytes:
                raise PullFailed(
                    f"manifest {repository}:{reference} is {length} bytes, more than the "
                    f"{max_bytes} husk accepts; refusing it"
                )
            chunks: list[bytes] = []
            received = 0
            async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                received += len(chunk)
                if received > max_bytes:
                    raise PullFailed(
                        f"manifest {repository}:{reference} exceeds {max_bytes} bytes; refusing it"
                    )
                chunks.append(chunk)
            data = b"".join(chunks)
            header_type = response.headers.get("Content-Type")
            header_digest = response.headers.get("Docker-Content-Digest")
        digest = sha256_digest(data)
        if reference.startswith("sha256:") and digest != reference:
            raise PullFailed(
                f"manifest digest mismatch for {repository}: asked for {reference}, got {digest}"
            )
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise PullFailed(
                f"manifest digest mismatch for {repository}:{reference}: registry says "
                f"{header_digest}, content is {digest}"
            )
        try:
            media_type = document_media_type(data, header_type)
        except InvalidArgument as err:
            raise PullFailed(f"bad manifest for {repository}:{reference}: {err}") from None
        return FetchedManifest(data, media_type, digest)

    async def manifest_digest(self, repository: str, reference: str) -> str:
        """The digest the registry holds for a tag, from a HEAD request when possible."""
        path = f"/v2/{repository}/manifests/{reference}"
        async with self.request(
            "HEAD", path, scope=scope_pull(repository), headers={"Accept": ACCEPT_MANIFESTS}
        ) as response:
            header = response.headers.get("Docker-Content-Digest", "")
        if header.startswith("sha256:"):
            return header
        return (await self.get_manifest(repository, reference)).digest

    async def put_manifest(
        self, repository: str, reference: str, data: bytes, media_type: str
    ) -> str:
        path = f"/v2/{repository}/manifests/{reference}"
        async with self.request(
            "PUT",
            path,
            scope=scope_push(repository),
            headers={"Content-Type": media_type},
            body=lambda: data,
            expect=(200, 201, 202),
        ):
            pass
        return sha256_digest(data)

    # ---------------------------------------------------------------- blobs

    async def fetch_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        store: ImageStore,
        *,
        progress: ProgressFn | None = None,
        lock_timeout: float = 3600.0,
        verify: Callable[[Path], object] | None = None,
    ) -> bool:
        """Download a blob into ``store`` unless it is there. True if it was downloaded.

        Concurrent pulls of one blob (threads or processes) serialise on the
        blob's lock, so it is downloaded once. ``verify`` (run in a thread, on the
        complete download whose size and digest matched) may refuse the content by
        raising InvalidArgument: the blob is then discarded, never stored.
        """
        if store.has_blob(digest):
            if progress:
                progress(size)
            return False
        async with async_file_lock(store.blob_lock_path(digest), timeout=lock_timeout):
            if store.has_blob(digest):
                if progress:
                    progress(size)
                return False
            ingest = store.ingest(digest, size)
            try:
                await self._download_into(repository, digest, size, ingest, progress, verify)
            finally:
                ingest.close()
        return True

    async def _download_into(
        self,
        repository: str,
        digest: str,
        size: int,
        ingest: Any,
        progress: ProgressFn | None,
        verify: Callable[[Path], object] | None = None,
    ) -> None:
        offset = ingest.open(resume=True)
        if progress and offset:
            progress(offset)
        path = f"/v2/{repository}/blobs/{digest}"
        last_error = ""
        for attempt in range(self.retries + 1):
            if offset < size:
                headers = {"Range": f"bytes={offset}-"} if offset else {}
                try:
                    async with self.request(
                        "GET",
                        path,
                        scope=scope_pull(repository),
                        headers=headers,
                        expect=(200, 206),
                    ) as response:
                        if response.status == 200 and offset:
                            if progress:
                                progress(-offset)
                            offset = ingest.reset()
                        elif response.status == 206:
                            start = _content_range_start(response.headers.get("Content-Range", ""))
                            if start != offset:
                                if progress:
                                    progress(-offset)
                                offset = ingest.reset()
                                raise _Transient("registry ignored the Range offset")
                        async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                            ingest.write(chunk)
                            offset += len(chunk)
                            if progress:
                                progress(len(chunk))
                except InvalidArgument as err:
                    ingest.discard()
                    raise PullFailed(
                        f"blob {digest} from {self.domain}/{repository}: {err}"
                    ) from None
                except HuskError:
                    raise
                except (TimeoutError, _Transient, aiohttp.ClientError, OSError) as err:
                    last_error = str(err) or type(err).__name__
                    await asyncio.sleep(self.backoff * 2**attempt)
                    continue
            if offset >= size:
                try:
                    if verify is None:
                        ingest.commit()
                    else:
                        await asyncio.to_thread(ingest.commit, verify)
                except InvalidArgument as err:
                    raise PullFailed(
                        f"blob {digest} from {self.domain}/{repository} refused: {err}"
                    ) from None
                return
            last_error = f"stream ended after {offset} of {size} bytes"
            await asyncio.sleep(self.backoff * 2**attempt)
        ingest.close()
        raise PullFailed(
            f"blob {digest} from {self.domain}/{repository} is truncated or unavailable: "
            f"{last_error}"
        )

    async def blob_exists(self, repository: str, digest: str) -> bool:
        async with self.request(
            "HEAD",
            f"/v2/{repository}/blobs/{digest}",
            scope=scope_push(repository),
            allow_missing=True,
        ) as response:
            return response.status == 200

    async def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Cross-repository mount; False if the registry wants the blob uploaded instead."""
        query = urlencode({"mount": digest, "from": from_repository})
        scope = f"{scope_push(repository)} {scope_pull(from_repository)}"
        async with self.request(
            "POST", f"/v2/{repository}/blobs/uploads/?{query}", scope=scope, expect=(201, 202)
        ) as response:
            mounted = response.status == 201
            location = response.headers.get("Location", "")
        if not mounted and location:
            # Abandon the upload session the registry opened instead of mounting.
            with contextlib.suppress(HuskError):
                async with self.request(
                    "DELETE",
                    await self._absolute(location),
                    scope=scope_push(repository),
                    expect=(200, 202, 204, 404),
                ):
                    pass
        return mounted

    async def _absolute(self, location: str) -> str:
        return urljoin(await self.base_url() + "/", location)

    async def upload_blob(
        self,
        repository: str,
        digest: str,
        source: Path,
        *,
        chunk_size: int | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        """Upload ``source`` as ``digest``: monolithic PUT, or PATCH chunks then PUT."""
        scope = scope_push(repository)
        size = source.stat().st_size
        async with self.request(
            "POST", f"/v2/{repository}/blobs/uploads/", scope=scope, expect=(202,)
        ) as response:
            location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"{self.domain} opened an upload without a Location")
        location = await self._absolute(location)
        final_headers = {"Content-Type": "application/octet-stream"}
        if chunk_size is not None and chunk_size > 0:
            offset = 0
            while offset < size:
                length = min(chunk_size, size - offset)
                async with self.request(
                    "PATCH",
                    location,
                    scope=scope,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + length - 1}",
                        "Content-Length": str(length),
                    },
                    body=_file_range_body(source, offset, length),
                    expect=(202,),
                ) as response:
                    location = await self._absolute(response.headers.get("Location") or location)
                offset += length
                if progress:
                    progress(length)
            final_body = _file_range_body(source, 0, 0)
            final_headers["Content-Length"] = "0"
        else:
            final_body = _file_range_body(source, 0, size, progress)
            final_headers["Content-Length"] = str(size)
        separator = "&" if "?" in location else "?"
        async with self.request(
            "PUT",
            f"{location}{separator}{urlencode({'digest': digest})}",
            scope=scope,
            headers=final_headers,
            body=final_body,
            expect=(201, 204),
        ):
            pass


def _file_range_body(
    path: Path, start: int, length: int, progress: ProgressFn | None = None
) -> Callable[[], Any]:
    """A body factory: each attempt streams ``length`` bytes of ``path`` from ``start``."""

    async def stream() -> AsyncIterator[bytes]:
        remaining = length
        with open(path, "rb") as handle:
            handle.seek(start)
            while remaining > 0:
                chunk = handle.read(min(CHUNK_SIZE, remaining))
                if not chunk:
                    raise RegistryError(f"{path} shrank while it was being uploaded")
                remaining -= len(chunk)
                if progress:
                    progress(len(chunk))
                yield chunk

    def factory() -> Any:
        return stream() if length else b""

    return factory


def _content_range_start(header: str) -> int:
    # "bytes 100-199/200"
    try:
        return int(header.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1
