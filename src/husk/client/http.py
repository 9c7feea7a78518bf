"""HTTP/1.1 over a unix socket: just enough of it for the Docker Engine API.

Not ``http.client``: importing it pulls in the email package, about 12 ms on
this machine, more than a tenth of the whole budget of ``husk ps``. The subset
needed here is small: one request per connection, bodies framed by
Content-Length, chunked encoding or the end of the connection, and hijacked
connections (``Upgrade: tcp``) for attach and exec.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from husk import errors

API_VERSION = "1.50"
DEFAULT_TIMEOUT = 300.0
_READ_SIZE = 64 * 1024
_MAX_HEAD_BYTES = 256 * 1024
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

MULTIPLEXED_STREAM = "application/vnd.docker.multiplexed-stream"
RAW_STREAM = "application/vnd.docker.raw-stream"


NotModified = errors.NotModified  # callers catch it from here too


class DaemonUnavailable(errors.HuskError):
    """Nothing answers on the daemon's socket."""

    kind = "daemon_unavailable"


_ERROR_CLASSES: tuple[type[errors.HuskError], ...] = (
    errors.NotFound,
    errors.Conflict,
    errors.InvalidArgument,
    errors.NotSupported,
    errors.PullFailed,
    errors.CreateFailed,
    errors.StartFailed,
    errors.GuestError,
    errors.BundleError,
    errors.Internal,
    NotModified,
)
_ERRORS_BY_KIND = {cls.kind: cls for cls in _ERROR_CLASSES}
_ERRORS_BY_STATUS: dict[int, type[errors.HuskError]] = {
    304: NotModified,
    400: errors.InvalidArgument,
    404: errors.NotFound,
    409: errors.Conflict,
    501: errors.NotSupported,
}


def error_for(status: int, body: bytes) -> errors.HuskError:
    """The husk error a daemon's error response stands for.

    The Docker API's error body is ``{"message": …}``; husk's daemon may add
    ``"kind"`` (a :class:`husk.errors.HuskError` kind), which is more precise
    than the status alone, and ``"ExitCode"`` (a failed start or exec's code).
    """
    message = ""
    kind = ""
    exit_code: int | None = None
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        message = str(doc.get("message") or "")
        kind = str(doc.get("kind") or "")
        code = doc.get("ExitCode")
        exit_code = code if type(code) is int else None
    if not message:
        message = body.decode("utf-8", "replace").strip() or f"the husk daemon answered {status}"
    message = " ".join(message.splitlines())
    cls = _ERRORS_BY_KIND.get(kind) or _ERRORS_BY_STATUS.get(status) or errors.Internal
    err = cls(message)
    err.exit_code = exit_code
    return err


def is_multiplexed(content_type: str, tty: bool) -> bool:
    """Whether a stdio stream carries 8-byte frame headers.

    The content type says so when the daemon sets it; otherwise, as with Docker
    before API 1.42, a tty session is raw and anything else is multiplexed.
    """
    if content_type == MULTIPLEXED_STREAM:
        return True
    if content_type == RAW_STREAM:
        return False
    return not tty


def quote(text: str) -> str:
    """Percent-encode everything but RFC 3986's unreserved characters."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in text.encode())


def encode_query(params: dict[str, Any] | None) -> str:
    """``?a=1&b=x``; None values are left out, booleans become 1/0, containers JSON."""
    if not params:
        return ""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, dict | list):
            text = json.dumps(value, separators=(",", ":"))
        else:
            text = str(value)
        parts.append(f"{quote(key)}={quote(text)}")
    return "?" + "&".join(parts) if parts else ""


class UntrustedDaemon(errors.HuskError):
    """What answers on the socket runs as another user: it is not our daemon."""

    kind = "untrusted_daemon"


_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def check_peer(sock: socket.socket, path: str) -> None:
    """The process listening on ``sock`` runs as us or as root, else it is refused.

    The kernel reports who created the listening socket (SO_PEERCRED), whatever the
    path looked like: another local user's fake daemon never gets a request, not
    even after winning a race for the path.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    _pid, uid, _gid = _PEER_CREDENTIALS.unpack(raw)
    if uid not in (os.geteuid(), 0):
        raise UntrustedDaemon(
            f"refusing to talk to {path}: the process serving it runs as uid {uid}, "
            f"not as you (uid {os.geteuid()}) or root"
        )


class BufferedSocket:
    """A socket with a read-ahead buffer that can be handed over after the headers."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock = sock
        self.buffer = bytearray(buffered)

    def recv_some(self) -> bytes:
        """Buffered bytes first, else one ``recv``; ``b""`` at the end of the stream."""
        if self.buffer:
            data = bytes(self.buffer)
            self.buffer.clear()
            return data
        return _recv(self.sock)

    def read_line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > _MAX_HEAD_BYTES:
                raise errors.Internal("the husk daemon sent an over-long header line")
            data = _recv(self.sock)
            if not data:
                raise errors.Internal("the husk daemon closed the connection mid-response")
            self.buffer += data

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = _recv(self.sock)
            if not data:
                raise errors.Internal("the husk daemon closed the connection mid-response")
            self.buffer += data
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    def read_upto(self, size: int) -> bytes:
        if not self.buffer:
            data = _recv(self.sock)
            if not data:
                return b""
            self.buffer += data
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(_READ_SIZE)
    except TimeoutError:
        raise errors.Internal(
            f"the husk daemon did not answer within {sock.gettimeout():g} s"
        ) from None
    except ConnectionResetError:
        return b""


class Response:
    """A response whose body is read incrementally (``logs -f``, stats, pulls)."""

    def __init__(
        self,
        conn: BufferedSocket,
        status: int,
        reason: str,
        headers: dict[str, str],
        has_body: bool,
    ) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._remaining: int | None = None
        if not has_body:
            self._remaining = 0
        elif not self._chunked and length is not None:
            try:
                self._remaining = int(length)
            except ValueError:
                raise errors.Internal(f"bad Content-Length from the daemon: {length!r}") from None
        self._chunk_left = 0
        self._done = self._remaining == 0

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    def read_some(self) -> bytes:
        """The next piece of the body; ``b""`` once it is complete."""
        if self._done:
            return b""
        if self._chunked:
            return self._read_chunk()
        if self._remaining is None:
            data = self._conn.recv_some()
            if not data:
                self._done = True
            return data
        data = self._conn.read_upto(min(self._remaining, _READ_SIZE))
        if not data:
            raise errors.Internal("the husk daemon closed the connection mid-response")
        self._remaining -= len(data)
        self._done = self._remaining == 0
        return data

    def _read_chunk(self) -> bytes:
        if self._chunk_left == 0:
            size_line = self._conn.read_line().split(b";")[0].strip()
            try:
                self._chunk_left = int(size_line, 16)
            except ValueError:
                raise errors.Internal(f"bad chunk size from the daemon: {size_line!r}") from None
            if self._chunk_left == 0:
                while self._conn.read_line() not in (b"\r\n", b"\n"):
                    pass  # trailers
                self._done = True
                return b""
        data = self._conn.read_upto(min(self._chunk_left, _READ_SIZE))
        if not data:
            raise errors.Internal("the husk daemon closed the connection mid-response")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            self._conn.read_exact(2)  # CRLF after the chunk
        return data

    def iter_body(self) -> Iterator[bytes]:
        while True:
            data = self.read_some()
            if not data:
                return
            yield data

    def iter_lines(self) -> Iterator[bytes]:
        """Newline-delimited documents (streamed JSON)."""
        pending = b""
        for data in self.iter_body():
            pending += data
            *lines, pending = pending.split(b"\n")
            yield from (line for line in lines if line.strip())
        if pending.strip():
            yield pending

    def read(self) -> bytes:
        return b"".join(self.iter_body())

    def json(self) -> Any:
        body = self.read()
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise errors.Internal("the husk daemon sent a body that is not JSON") from None

    def close(self) -> None:
        self._conn.sock.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HijackedStream:
    """The raw connection after ``101 UPGRADED``: stdin goes up, output comes down."""

    def __init__(self, conn: BufferedSocket, content_type: str) -> None:
        self._conn = conn
        self.sock = conn.sock
        self.content_type = content_type

    def multiplexed(self, tty: bool) -> bool:
        return is_multiplexed(self.content_type, tty)

    def has_buffered(self) -> bool:
        return bool(self._conn.buffer)

    def recv(self) -> bytes:
        return self._conn.recv_some()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close_write(self) -> None:
        """Tell the daemon stdin has ended; output keeps coming."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


Body = bytes | BinaryIO | None


class ApiClient:
    """Docker Engine API requests to one unix socket, one connection per request."""

    def __init__(
        self,
        socket_path: str,
        *,
        on_unavailable: Callable[[], None] | None = None,
        api_version: str = API_VERSION,
    ) -> None:
        self.socket_path = socket_path
        self._on_unavailable = on_unavailable
        self._prefix = f"/v{api_version}"

    # -- connections ---------------------------------------------------------

    def connect_socket(self, timeout: float | None) -> socket.socket:
        try:
            return self._open(timeout)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            if self._on_unavailable is None:
                raise DaemonUnavailable(
                    f"cannot reach the husk daemon at {self.socket_path}: {err.strerror}"
                ) from None
        starter, self._on_unavailable = self._on_unavailable, None
        starter()
        try:
            return self._open(timeout)
        except OSError as err:
            raise DaemonUnavailable(
                f"cannot reach the husk daemon at {self.socket_path}: {err.strerror or err}"
            ) from None

    def _open(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
            check_peer(sock, self.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock

    def target(self, path: str, query: dict[str, Any] | None = None) -> str:
        """The request target: versioned path and query string."""
        return self._prefix + path + encode_query(query)

    def ping(self, timeout: float = 2.0) -> bool:
        """Whether a daemon answers on the socket (never starts one)."""
        try:
            sock = self._open(timeout)
        except OSError:
            return False
        try:
            send_request(sock, "GET", self.target("/_ping"), {}, None)
            response = read_head(BufferedSocket(sock), "GET")
            return response.status == 200
        except (OSError, errors.HuskError):
            return False
        finally:
            sock.close()

    # -- requests ------------------------------------------------------------

    def open(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Body = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Response:
        """Send a request and return the response with its body unread.

        Raises the matching :mod:`husk.errors` exception (or :class:`NotModified`)
        for any status of 300 and above.
        """
        all_headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers["Content-Type"] = "application/json"
        sock = self.connect_socket(timeout)
        try:
            send_request(sock, method, self.target(path, query), all_headers, body)
            response = read_head(BufferedSocket(sock), method)
            if response.status >= 300:
                raise error_for(response.status, response.read())
        except BaseException:
            sock.close()
            raise
        return response

    def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        json_body: Any = None,
        body: Body = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Any:
        """A whole request: the decoded JSON body, or None for an empty one."""
        with self.open(
            method,
            path,
            query=query,
            json_body=json_body,
            body=body,
            headers=headers,
            timeout=timeout,
        ) as response:
            return response.json()

    def get(self, path: str, query: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return self.call("GET", path, query=query, **kwargs)

    def post(
        self,
        path: str,
        query: dict[str, Any] | None = None,
        json_body: Any = None,
        **kwargs: Any,
    ) -> Any:
        return self.call("POST", path, query=query, json_body=json_body, **kwargs)

    def delete(self, path: str, query: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return self.call("DELETE", path, query=query, **kwargs)

    def hijack(
        self,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> HijackedStream:
        """POST with ``Upgrade: tcp``; the connection then carries raw stdio both ways."""
        headers = {**(headers or {}), "Connection": "Upgrade", "Upgrade": "tcp"}
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        sock = self.connect_socket(DEFAULT_TIMEOUT)
        try:
            send_request(sock, "POST", self.target(path, query), headers, body)
            conn = BufferedSocket(sock)
            response = read_head(conn, "POST")
            if response.status >= 300:
                raise error_for(response.status, response.read())
            if response.status not in (101, 200):
                raise errors.Internal(
                    f"the husk daemon answered {response.status} {response.reason} to an attach"
                )
        except BaseException:
            sock.close()
            raise
        # Output may pause for as long as the workload likes.
        sock.settimeout(None)
        return HijackedStream(conn, response.content_type)


def send_request(
    sock: socket.socket, method: str, target: str, headers: dict[str, str], body: Body
) -> None:
    lines = [f"{method} {target} HTTP/1.1", "Host: husk", "User-Agent: husk-cli"]
    streamed = body is not None and not isinstance(body, bytes)
    if isinstance(body, bytes):
        lines.append(f"Content-Length: {len(body)}")
    elif streamed:
        lines.append("Transfer-Encoding: chunked")
    elif method in ("POST", "PUT"):
        lines.append("Content-Length: 0")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if isinstance(body, bytes):
        sock.sendall(head + body)
        return
    sock.sendall(head)
    if body is not None:
        while True:
            data = body.read(_READ_SIZE)
            if not data:
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
        sock.sendall(b"0\r\n\r\n")


def read_head(conn: BufferedSocket, method: str) -> Response:
    status_line = conn.read_line().decode("latin-1").rstrip("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise errors.Internal(f"the husk daemon sent a malformed status line: {status_line!r}")
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    headers: dict[str, str] = {}
    size = 0
    while True:
        line = conn.read_line()
        size += len(line)
        if size > _MAX_HEAD_BYTES:
            raise errors.Internal("the husk daemon sent over-long response headers")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    has_body = method != "HEAD" and status not in (101, 204, 304) and status >= 200
    return Response(conn, status, reason, headers, has_body)
