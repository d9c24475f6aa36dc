"""The broker's access-request API over HTTPS, with nothing but the standard library.

One TLS connection is kept for a whole run (create, long-poll, close reuse it), so the
handshake happens once. Every answer is parsed here, once: a bounded status line and
header block, a size-limited body, a JSON object, and for errors the broker's
`{"error": {code, reason, field, message}}`; callers get dicts or a `BrokerError`.

Why not http.client: its import pulls in the email package, ~10 ms of a command whose
whole budget (spawn -> port open) is 50 ms. What is left is a small HTTP/1.1 client for
one server we know (JSON bodies with Content-Length; chunked is read too), strict about
what it accepts. Likewise no urllib.parse and no typing at run time.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from typing import Any

MAX_BODY = 1 << 20  # the broker's answers are small; a huge one is not the broker
MAX_HEAD = 64 * 1024  # status line and headers
MAX_HEADERS = 100
MAX_WAIT = 30  # the broker caps a long poll at 30 s
CONNECT_TIMEOUT = 10.0
# PORTAGENT_REQUEST_TRACE=1: one stderr line per phase with CLOCK_MONOTONIC (shared by
# all network namespaces), so a benchmark can tell where the time goes.
_TRACE = bool(os.environ.get("PORTAGENT_REQUEST_TRACE"))
# What a request id (ours or the broker's) and a path may contain: no quoting needed.
ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_PATH_CHARS = ID_CHARS | frozenset("/~%!$&'()*+,;=:@")


def trace(phase: str) -> None:
    if _TRACE:
        print(f"portagent-request: trace {phase} {time.monotonic():.6f}", file=sys.stderr,
              flush=True)


def valid_id(text: str) -> bool:
    return 0 < len(text) <= 64 and all(c in ID_CHARS for c in text)


class BrokerError(Exception):
    """The broker answered with an error (or not at all: status 0)."""

    def __init__(self, status: int, code: str, reason: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.reason = reason
        self.message = message
        self.field = field

    @property
    def unreachable(self) -> bool:
        return self.status == 0

    def describe(self) -> str:
        """One line for the requester: the broker's reason code, field and message."""
        if self.status == 0:
            return self.message
        where = f" ({self.field})" if self.field else ""
        label = self.reason or self.code or f"HTTP {self.status}"
        return f"{label}{where}: {self.message}"


class Endpoint:
    """scheme://host:port + a path (the broker's prefix, or a token endpoint's target)."""

    __slots__ = ("host", "path", "port", "scheme")

    def __init__(self, scheme: str, host: str, port: int, path: str) -> None:
        self.scheme, self.host, self.port, self.path = scheme, host, port, path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Endpoint) and (self.scheme, self.host, self.port,
                                                self.path) == (other.scheme, other.host,
                                                               other.port, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.host, self.port, self.path))

    def __repr__(self) -> str:
        return f"Endpoint({self.scheme!r}, {self.host!r}, {self.port}, {self.path!r})"

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str, *, query: bool = False) -> Endpoint:
    """scheme://host[:port][/path][?query] -> Endpoint, strictly; ValueError says why.

    `query` allows a query string (kept in `path`); user info and fragments never."""
    if len(url) > 2048:
        raise ValueError("longer than 2048 characters")
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("https", "http"):
        raise ValueError(f"{url!r}: must start with https://")
    cut = min([i for i in (rest.find("/"), rest.find("?")) if i >= 0], default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority or "#" in path:
        raise ValueError(f"{url!r}: no user or fragment allowed")
    if "?" in path and not query:
        raise ValueError(f"{url!r}: no query allowed")
    if authority.startswith("["):
        host, bracket, port_text = authority[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(f"{url!r}: bad IPv6 address")
        port_text = port_text[1:]
    else:
        host, _, port_text = authority.partition(":")
    if not host or not all(c.isascii() and (c.isalnum() or c in ".-:_") for c in host):
        raise ValueError(f"{url!r}: no host, or not a host name")
    if port_text:
        if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
            raise ValueError(f"{url!r}: bad port")
        port = int(port_text)
    else:
        port = 443 if scheme == "https" else 80
    target, _, query_text = path.partition("?")
    if not all(c in _PATH_CHARS for c in target) or not all(
            c in _PATH_CHARS or c == "?" for c in query_text):
        raise ValueError(f"{url!r}: characters not allowed in the path")
    return Endpoint(scheme, host.lower(), port, path)


def parse_broker_url(url: str) -> Endpoint:
    """https://host[:port][/prefix]; http:// only to loopback (the token is a credential).

    ValueError names what is wrong; the caller adds which flag/variable it came from."""
    ep = parse_url(url)
    if ep.scheme == "http" and not loopback(ep.host):
        raise ValueError(f"{url!r}: http:// only to a loopback address; use https://")
    return Endpoint(ep.scheme, ep.host, ep.port, ep.path.rstrip("/"))


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- HTTP/1.1 ------------------------------------------------------------------------------


class HttpError(Exception):
    """The peer's answer is not HTTP we accept, or the connection ended mid-answer."""

    def __init__(self, message: str, unanswered: bool = False) -> None:
        super().__init__(message)
        self.unanswered = unanswered  # closed before any byte of an answer


class Connection:
    """One HTTP/1.1 connection (TLS for https), kept alive between requests."""

    def __init__(self, endpoint: Endpoint, context: ssl.SSLContext | None, timeout: float) -> None:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=endpoint.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buffer = b""
        self.open = True

    def close(self) -> None:
        self.open = False
        try:  # noqa: SIM105 - contextlib costs start-up time
            self.sock.close()
        except OSError:
            pass

    def _fill(self, limit: int) -> bool:
        if len(self.buffer) > limit:
            return True
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def _line_block(self, limit: int, what: str, answered: bool) -> bytes:
        """Bytes up to the first CRLF CRLF (the header block), at most `limit`."""
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end > limit or (end < 0 and len(self.buffer) > limit):
                raise HttpError(f"{what} longer than {limit} bytes")
            if end >= 0:
                block, self.buffer = self.buffer[:end], self.buffer[end + 4:]
                return block
            if not self._fill(limit):
                raise HttpError("the connection closed before a complete answer",
                                unanswered=not answered and not self.buffer)

    def _exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            if not self._fill(count):
                raise HttpError("the connection closed in the middle of the body")
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _crlf_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if len(self.buffer) > 1024 or not self._fill(1024):
                raise HttpError("bad chunked body")
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def request(self, method: str, target: str, headers: dict[str, str],
                body: bytes | None) -> tuple[int, bytes]:
        lines = [f"{method} {target} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b""))
        answered = False
        while True:  # 1xx interim answers are skipped
            head = self._line_block(MAX_HEAD, "the answer's header", answered)
            answered = True
            status_line, *header_lines = head.split(b"\r\n")
            parts = status_line.split(b" ", 2)
            if (len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
                    or len(parts[1]) != 3 or not parts[1].isdigit()):
                raise HttpError(f"not an HTTP answer: {status_line[:60]!r}")
            status = int(parts[1])
            if status >= 200:
                break
        if len(header_lines) > MAX_HEADERS:
            raise HttpError(f"more than {MAX_HEADERS} header lines")
        fields: dict[str, str] = {}
        for raw in header_lines:
            name, colon, value = raw.partition(b":")
            if not colon or not name or name != name.strip():
                raise HttpError(f"bad header line {raw[:60]!r}")
            key = name.decode("ascii", "replace").lower()
            text = value.strip().decode("latin-1")
            fields[key] = f"{fields[key]}, {text}" if key in fields else text
        keep = parts[0] == b"HTTP/1.1" and "close" not in fields.get("connection", "").lower()
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            data = self._chunked()
        elif "content-length" in fields:
            length_text = fields["content-length"]
            if not (length_text.isascii() and length_text.isdigit()):
                raise HttpError(f"bad Content-Length {length_text[:20]!r}")
            length = int(length_text)
            if length > MAX_BODY:
                raise HttpError(f"an answer larger than {MAX_BODY} bytes")
            data = self._exactly(length)
        else:  # the body ends with the connection
            while self._fill(MAX_BODY):
                if len(self.buffer) > MAX_BODY:
                    raise HttpError(f"an answer larger than {MAX_BODY} bytes")
            data, self.buffer, keep = self.buffer, b"", False
        if not keep:
            self.close()
        return status, data

    def _chunked(self) -> bytes:
        data = b""
        for _ in range(100_000):
            size_text = self._crlf_line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError("bad chunk size") from None
            if size == 0:
                for _ in range(MAX_HEADERS):  # trailers, up to the empty line
                    if not self._crlf_line():
                        return data
                raise HttpError(f"more than {MAX_HEADERS} trailer lines")
            if len(data) + size > MAX_BODY:
                raise HttpError(f"an answer larger than {MAX_BODY} bytes")
            data += self._exactly(size)
            if self._exactly(2) != b"\r\n":
                raise HttpError("bad chunk end")
        raise HttpError("too many chunks")


def percent_encode(text: str) -> str:
    """A query value, as encodeURIComponent would send it (RFC 3986 unreserved kept)."""
    keep = ID_CHARS | {"~"}
    return "".join(c if c in keep else "".join(f"%{b:02X}" for b in c.encode())
                   for c in text)


def tls_context(ca: str | None) -> ssl.SSLContext:
    import ssl

    # cafile alone when given: loading the system store costs milliseconds we do not need.
    return ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()


def fetch(url: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    """One GET (the CI's token endpoint); OSError/HttpError/ValueError on failure."""
    ep = parse_url(url, query=True)
    if ep.scheme == "http" and not loopback(ep.host):
        raise ValueError("must be an https:// URL")
    conn = Connection(ep, tls_context(None) if ep.scheme == "https" else None, timeout)
    try:
        return conn.request("GET", ep.path or "/", {"Host": ep.host_header, **headers,
                                                    "Connection": "close"}, None)
    finally:
        conn.close()


class Broker:
    """A session with the broker: one connection, the bearer token on every call."""

    def __init__(self, url: str, token: str, ca: str | None = None) -> None:
        self.endpoint = parse_broker_url(url)
        self._token = token
        self._ca = ca
        self._context: ssl.SSLContext | None = None
        self._conn: Connection | None = None

    # -- the routes ------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        wait = int(body.get("wait", 0) or 0)
        return self.call("POST", "/v1/requests", body, timeout=CONNECT_TIMEOUT + wait)

    def get(self, request_id: str, wait: int = 0) -> dict[str, Any]:
        wait = max(0, min(MAX_WAIT, wait))
        path = f"/v1/requests/{_checked_id(request_id)}" + (f"?wait={wait}" if wait else "")
        return self.call("GET", path, None, timeout=CONNECT_TIMEOUT + wait)

    def close_request(self, request_id: str) -> dict[str, Any]:
        return self.call("POST", f"/v1/requests/{_checked_id(request_id)}/close", {})

    def whoami(self) -> dict[str, Any]:
        return self.call("GET", "/v1/whoami", None)

    # -- transport ---------------------------------------------------------------------

    def _connection(self, timeout: float) -> Connection:
        if self._conn is None or not self._conn.open:
            if self.endpoint.scheme == "https" and self._context is None:
                self._context = tls_context(self._ca)
            self._conn = Connection(self.endpoint, self._context, timeout)
            trace("connected")
        self._conn.sock.settimeout(timeout)
        return self._conn

    def drop(self) -> None:
        """Forget the connection (after an interrupted call its state is unknown)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None,
             timeout: float = CONNECT_TIMEOUT) -> dict[str, Any]:
        import ssl

        payload = None if body is None else json.dumps(body).encode()
        headers = {"Host": self.endpoint.host_header, "Authorization": f"Bearer {self._token}",
                   "Accept": "application/json", "User-Agent": "portagent-request"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        # A kept-alive connection the server closed meanwhile fails on first use: one
        # fresh retry, only when the request was never answered.
        for attempt in (0, 1):
            reused = self._conn is not None and self._conn.open
            try:
                conn = self._connection(timeout)
                status, raw = conn.request(method, self.endpoint.path + path, headers, payload)
                break
            except HttpError as exc:
                self.drop()
                if exc.unanswered and reused and attempt == 0:
                    continue
                raise BrokerError(0, "UNAVAILABLE", "BROKER_UNREACHABLE",
                                  f"broker {self.endpoint.origin}: {exc}") from None
            except (BrokenPipeError, ConnectionResetError) as exc:
                self.drop()
                if reused and attempt == 0:
                    continue
                raise BrokerError(0, "UNAVAILABLE", "BROKER_UNREACHABLE",
                                  f"broker {self.endpoint.origin}: {exc}") from None
            except TimeoutError:
                self.drop()
                raise BrokerError(0, "DEADLINE_EXCEEDED", "BROKER_TIMEOUT",
                                  f"broker {self.endpoint.origin}: no answer in "
                                  f"{timeout:g}s") from None
            except ssl.SSLCertVerificationError as exc:
                self.drop()
                raise BrokerError(0, "UNAVAILABLE", "BROKER_UNTRUSTED",
                                  f"broker {self.endpoint.origin}: TLS certificate not "
                                  f"trusted ({exc.verify_message}); pass --ca or set "
                                  "PORTAGENT_BROKER_CA") from None
            except OSError as exc:
                self.drop()
                raise BrokerError(0, "UNAVAILABLE", "BROKER_UNREACHABLE",
                                  f"broker {self.endpoint.origin}: "
                                  f"{exc.strerror or exc or type(exc).__name__}") from None
        return _answer(status, raw)


def _checked_id(request_id: str) -> str:
    # Ids go into the path unquoted: only what needs no quoting gets there.
    if not valid_id(request_id):
        raise BrokerError(0, "INVALID_ARGUMENT", "BAD_REQUEST_ID",
                          f"{request_id[:80]!r} is not a request id")
    return request_id


def _answer(status: int, raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        obj = None
    if not isinstance(obj, dict):
        if 200 <= status < 300:
            raise BrokerError(502, "INVALID_ANSWER", "ANSWER_NOT_JSON",
                              f"HTTP {status} with a body that is not a JSON object")
        text = raw[:200].decode("utf-8", "replace").strip()
        raise BrokerError(status, "", "", f"HTTP {status}: {text or 'no body'}")
    if 200 <= status < 300:
        return obj
    err = obj.get("error")
    if not isinstance(err, dict):
        raise BrokerError(status, "", "", f"HTTP {status}: {json.dumps(obj)[:200]}")
    code, reason, message, field = (str(v)[:500] if isinstance(v, str | int) else ""
                                    for v in (err.get(k) for k in
                                              ("code", "reason", "message", "field")))
    raise BrokerError(status, code, reason, message or f"HTTP {status}", field)


def request_view(answer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
    """(request, grant or None, applied) out of a /v1/requests answer, shape-checked."""
    request = answer.get("request")
    grant = answer.get("grant")
    applied = answer.get("applied", False)
    if (not isinstance(request, dict) or not isinstance(request.get("id"), str)
            or not valid_id(request["id"]) or not isinstance(request.get("state"), str)
            or not (grant is None or isinstance(grant, dict)) or not isinstance(applied, bool)):
        raise BrokerError(502, "INVALID_ANSWER", "ANSWER_SHAPE",
                          "the broker's answer has no request {id, state}, grant and applied")
    return request, grant, applied
