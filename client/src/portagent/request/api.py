"""The broker's access-request API over HTTPS, with nothing but the standard library.

One `http.client.HTTPSConnection` is kept for a whole run (create, long-poll, close
reuse it), so the TLS handshake happens once on the fast path. Every answer is parsed
here, once: a size-limited body, a JSON object, and for errors the broker's
`{"error": {code, reason, field, message}}`; callers get dicts or a `BrokerError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    import http.client

MAX_BODY = 1 << 20  # the broker's answers are small; a huge one is not the broker
MAX_WAIT = 30  # the broker caps a long poll at 30 s
CONNECT_TIMEOUT = 10.0
# PORTAGENT_REQUEST_TRACE=1: one stderr line per phase with CLOCK_MONOTONIC (shared by
# all network namespaces), so a benchmark can tell where the time goes.
_TRACE = bool(os.environ.get("PORTAGENT_REQUEST_TRACE"))


def trace(phase: str) -> None:
    if _TRACE:
        print(f"portagent-request: trace {phase} {time.monotonic():.6f}", file=sys.stderr,
              flush=True)


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


class Endpoint(NamedTuple):
    scheme: str
    host: str
    port: int
    prefix: str  # path prefix without a trailing slash ("" for none)


def parse_broker_url(url: str) -> Endpoint:
    """https://host[:port][/prefix]; http:// only to loopback (the token is a credential).

    ValueError names what is wrong; the caller adds which flag/variable it came from."""
    if len(url) > 2048:
        raise ValueError("longer than 2048 characters")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("https", "http"):
        raise ValueError(f"{url!r}: must start with https://")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{url!r}: no user, query or fragment allowed")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"{url!r}: no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    if parts.scheme == "http" and not _loopback(host):
        raise ValueError(f"{url!r}: http:// only to a loopback address; use https://")
    return Endpoint(parts.scheme, host, port, parts.path.rstrip("/"))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Broker:
    """A session with the broker: one connection, the bearer token on every call."""

    def __init__(self, url: str, token: str, ca: str | None = None) -> None:
        self.endpoint = parse_broker_url(url)
        self._token = token
        self._ca = ca
        self._conn: http.client.HTTPConnection | None = None

    # -- the routes ------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        wait = int(body.get("wait", 0) or 0)
        return self.call("POST", "/v1/requests", body, timeout=CONNECT_TIMEOUT + wait)

    def get(self, request_id: str, wait: int = 0) -> dict[str, Any]:
        wait = max(0, min(MAX_WAIT, wait))
        path = f"/v1/requests/{quote(request_id, safe='')}" + (f"?wait={wait}" if wait else "")
        return self.call("GET", path, None, timeout=CONNECT_TIMEOUT + wait)

    def close_request(self, request_id: str) -> dict[str, Any]:
        return self.call("POST", f"/v1/requests/{quote(request_id, safe='')}/close", {})

    def whoami(self) -> dict[str, Any]:
        return self.call("GET", "/v1/whoami", None)

    # -- transport ---------------------------------------------------------------------

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        import http.client

        if self._conn is None:
            ep = self.endpoint
            if ep.scheme == "https":
                import ssl

                # cafile only: loading the system store costs ~10 ms we do not need.
                context = (ssl.create_default_context(cafile=self._ca) if self._ca
                           else ssl.create_default_context())
                self._conn = http.client.HTTPSConnection(ep.host, ep.port, timeout=timeout,
                                                         context=context)
            else:
                self._conn = http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)
            if _TRACE:  # connect (and handshake) here, only to time it apart
                self._conn.connect()
                trace("connected")
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def drop(self) -> None:
        """Forget the connection (after an interrupted call its state is unknown)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None,
             timeout: float = CONNECT_TIMEOUT) -> dict[str, Any]:
        import http.client

        payload = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json",
                   "User-Agent": "portagent-request"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        # A kept-alive connection the server closed meanwhile fails on first use: one
        # fresh retry, only when the request was never answered.
        for attempt in (0, 1):
            reused = self._conn is not None and self._conn.sock is not None
            try:
                conn = self._connection(timeout)
                conn.request(method, self.endpoint.prefix + path, body=payload, headers=headers)
                response = conn.getresponse()
                status = response.status
                raw = response.read(MAX_BODY + 1)
                if response.will_close:
                    self.drop()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as exc:
                self.drop()
                if reused and attempt == 0:
                    continue
                raise BrokerError(0, "UNAVAILABLE", "BROKER_UNREACHABLE",
                                  f"broker {self._where()}: {exc or type(exc).__name__}") from None
            except TimeoutError:
                self.drop()
                raise BrokerError(0, "DEADLINE_EXCEEDED", "BROKER_TIMEOUT",
                                  f"broker {self._where()}: no answer in {timeout:g}s") from None
            except (OSError, http.client.HTTPException) as exc:
                self.drop()
                raise BrokerError(0, "UNAVAILABLE", "BROKER_UNREACHABLE",
                                  f"broker {self._where()}: {_oserror_text(exc)}") from None
        return _answer(status, raw)

    def _where(self) -> str:
        ep = self.endpoint
        return f"{ep.scheme}://{ep.host}:{ep.port}"


def _oserror_text(exc: BaseException) -> str:
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS certificate not trusted ({exc.verify_message}); "
                "pass --ca or set PORTAGENT_BROKER_CA")
    return str(exc) or type(exc).__name__


def _answer(status: int, raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BODY:
        raise BrokerError(status or 502, "INVALID_ANSWER", "ANSWER_TOO_LARGE",
                          f"the broker's answer is larger than {MAX_BODY} bytes")
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
    return_fields = [err.get(k) for k in ("code", "reason", "message", "field")]
    code, reason, message, field = (str(v)[:500] if isinstance(v, str | int) else ""
                                    for v in return_fields)
    raise BrokerError(status, code, reason, message or f"HTTP {status}", field)


def request_view(answer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
    """(request, grant or None, applied) out of a /v1/requests answer, shape-checked."""
    request = answer.get("request")
    grant = answer.get("grant")
    applied = answer.get("applied", False)
    if (not isinstance(request, dict) or not isinstance(request.get("id"), str)
            or not isinstance(request.get("state"), str)
            or not (grant is None or isinstance(grant, dict)) or not isinstance(applied, bool)):
        raise BrokerError(502, "INVALID_ANSWER", "ANSWER_SHAPE",
                          "the broker's answer has no request {id, state}, grant and applied")
    return request, grant, applied
