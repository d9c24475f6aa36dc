"""The CLI's client of the broker service's HTTPS JSON API (docs/broker.md, "The API").

Standard library only (http.client, ssl, json): `portagent-broker grants` must start
fast, so nothing here imports grpc, protobuf or cryptography; a test checks that.

Errors are mapped here, at the boundary, into two exceptions: the service answered
and refused (ApiRefusedError, from its {"error": {code, reason, field, message}}
body), or there was no usable answer (ApiUnreachableError: connection refused, TLS
failure, timeout, a body that is not the API's JSON), naming the URL and what failed.

Retries: a request is sent again only when repeating it cannot do anything twice:
GET and PUT, and a POST the caller marks idempotent (a grant carries its request_id,
which the service deduplicates; a revocation of a revoked grant is a no-op). Only
on a connection failure or a 503, at most `tries` times, with a doubling pause.
"""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Imported when a request is made, not when the CLI starts: http.client pulls in the
    # email package, ssl OpenSSL; together half of `portagent-broker --help`'s start-up.
    import http.client
    import ssl

from portagent.broker.settings import ApiSettings, parse_api_url

DEFAULT_TIMEOUT = 10.0
DEFAULT_TRIES = 3
FIRST_BACKOFF = 0.25
# An answer of the API is at most a page of 1,000 records; this bounds what is read.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
MAX_TOKEN_BYTES = 4096
# An OIDC ID token (JWT) is longer than an admin token; ADR 0008 bounds it at 16 KiB.
MAX_JWT_BYTES = 16 * 1024
# Bounds every paged listing (pages x page size): a server that never stops paging
# cannot keep the CLI looping.
MAX_PAGES = 10_000
TOKEN_ENV = "PORTAGENT_BROKER_TOKEN"  # noqa: S105 - a variable name, not a token
# A person's (or a job's) OIDC token for the commands that act as that identity
# (requests approve/deny/close, whoami): the same variable portagent-request reads.
PERSON_TOKEN_ENV = "PORTAGENT_TOKEN"  # noqa: S105 - a variable name, not a token
_RETRY_STATUSES = frozenset({503})
_SAFE_METHODS = frozenset({"GET", "PUT"})
# TLS alerts a server sends about *our* certificate, by OpenSSL reason: the message
# then says the client certificate was refused, not that the server is broken.
_CLIENT_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "a client certificate is required",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate revoked",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "signed by a CA the server does not trust",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
}


class ApiError(Exception):
    """Base of the API client's errors."""


class ApiConfigError(ApiError):
    """The client cannot be set up (unreadable CA, certificate, key or token)."""


class ApiRefusedError(ApiError):
    """The service answered with an error: `status` (HTTP), `code` (canonical gRPC
    code name), `reason` (UPPER_SNAKE), `field` (the request field at fault, "" if
    none) and `message` (human text, which names the field)."""

    def __init__(self, status: int, code: str, reason: str, message: str, field: str = "") -> None:
        self.status, self.code, self.reason = status, code, reason
        self.message, self.field = message, field
        text = message if not field or message.startswith(f"{field}:") else f"{field}: {message}"
        super().__init__(f"{text} ({code} {reason})" if reason else f"{text} ({code})")


class ApiUnreachableError(ApiError):
    """No usable answer from `url`; `detail` says what failed."""

    def __init__(self, url: str, detail: str, *, maybe_done: bool = False) -> None:
        super().__init__(f"broker service at {url}: {detail}")
        self.url, self.detail = url, detail
        # The request may have reached the service before the failure.
        self.maybe_done = maybe_done


def read_token(
    path: Path, *, where: str = "api.token_file", max_bytes: int = MAX_TOKEN_BYTES
) -> str:
    """A bearer token from a file only its owner can read; ApiConfigError otherwise.
    `where` names the setting or flag in messages."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ApiConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ApiConfigError(f"{where}: {path} is not a regular file")
        # Like ssh with a private key: a token others can read is a token others have.
        if info.st_mode & 0o077:
            raise ApiConfigError(
                f"{where}: {path} is readable by others "
                f"(mode {info.st_mode & 0o777:04o}); chmod 600 it"
            )
        data = os.read(fd, max_bytes + 2)  # + a final newline, + 1 to see "too long"
    finally:
        os.close(fd)
    return check_token(data.decode("utf-8", "replace"), f"{where}: {path}", max_bytes=max_bytes)


def check_token(text: str, where: str, *, max_bytes: int = MAX_TOKEN_BYTES) -> str:
    token = text.strip()
    if not token:
        raise ApiConfigError(f"{where}: empty token")
    # It goes into an HTTP header: printable ASCII without blanks, bounded.
    if len(token) > max_bytes or not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ApiConfigError(
            f"{where}: a token is at most {max_bytes} printable ASCII characters, no blanks"
        )
    return token


def person_token(token_file: Path | None) -> str | None:
    """The OIDC token a command acts with instead of the admin credentials of [api]:
    `--token-file`, else $PORTAGENT_TOKEN, else None (the admin credentials)."""
    if token_file is not None:
        return read_token(token_file, where="--token-file", max_bytes=MAX_JWT_BYTES)
    env = os.environ.get(PERSON_TOKEN_ENV)
    if env:
        return check_token(env, f"${PERSON_TOKEN_ENV}", max_bytes=MAX_JWT_BYTES)
    return None


def ssl_context(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """Verifies the server against `ca_file` (else the system's CAs); presents the
    client certificate when given."""
    import ssl

    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ApiConfigError(f"api.ca: cannot load {ca_file}: {_ssl_text(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        try:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ApiConfigError(
                f"api.cert, api.key: cannot load {cert_file} / {key_file}: {_ssl_text(exc)}"
            ) from None
    return context


def _ssl_text(exc: BaseException) -> str:
    import ssl

    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class ApiClient:
    """One keep-alive HTTPS connection to the service; `request` returns the decoded
    JSON object of a 2xx answer or raises ApiRefusedError / ApiUnreachableError."""

    def __init__(
        self,
        url: str,
        *,
        context: ssl.SSLContext,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tries: int = DEFAULT_TRIES,
        client_cert: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.host, self.port, self.prefix = parse_api_url(url)
        self.url = url.rstrip("/")
        self._context = context
        self._token = token
        self.timeout = timeout
        self.tries = max(1, tries)
        # For messages only: which files a TLS failure is about.
        self._client_cert = client_cert
        self._ca_file = ca_file
        self._conn: http.client.HTTPSConnection | None = None

    @classmethod
    def from_settings(
        cls,
        api: ApiSettings,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tries: int = DEFAULT_TRIES,
        token: str | None = None,
    ) -> ApiClient:
        """The token comes from `token` (a person's OIDC token, see person_token), else
        $PORTAGENT_BROKER_TOKEN, else `[api] token_file`; a client certificate may stand
        in for it (or come with it)."""
        env = os.environ.get(TOKEN_ENV)
        if token is not None:
            pass  # the service reads a bearer token before the client certificate
        elif env:
            token = check_token(env, f"${TOKEN_ENV}")
        elif api.token_file is not None:
            token = read_token(api.token_file)
        elif api.cert_file is None:
            raise ApiConfigError(
                f"api: no credentials: set api.token_file (or ${TOKEN_ENV}), "
                "or api.cert and api.key"
            )
        return cls(
            api.url,
            context=ssl_context(api.ca_file, api.cert_file, api.key_file),
            token=token,
            timeout=timeout,
            tries=tries,
            client_cert=api.cert_file,
            ca_file=api.ca_file,
        )

    # ---- plumbing ---------------------------------------------------------------------

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _path(self, path: str, query: Sequence[tuple[str, str]] = ()) -> str:
        target = self.prefix + path
        if query:
            target += "?" + urllib.parse.urlencode(list(query))
        return target

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        idempotent: bool = False,
    ) -> dict[str, Any]:
        target = self._path(path, query)
        payload = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Accept": "application/json", "User-Agent": "portagent-broker"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        may_retry = idempotent or method in _SAFE_METHODS
        tries = self.tries if may_retry else 1
        pause = FIRST_BACKOFF
        for attempt in range(1, tries + 1):
            last = attempt == tries
            try:
                status, data = self._once(method, target, payload, headers)
            except ApiUnreachableError as exc:
                if last or not _transient(exc):
                    raise
            else:
                if status in _RETRY_STATUSES and not last:
                    pass  # the service is up but cannot serve now (database down): again
                else:
                    return self._decode(status, data)
            time.sleep(pause)
            pause *= 2
        raise AssertionError("unreachable: the last try returns or raises")

    def _once(
        self, method: str, target: str, payload: bytes | None, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        import http.client

        sent = False
        try:
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self._context
                )
                self._conn.connect()
            self._conn.request(method, target, body=payload, headers=dict(headers))
            sent = True
            response = self._conn.getresponse()
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
                raise _Failure(f"answer of {length} bytes is larger than {MAX_RESPONSE_BYTES}")
            data = response.read(MAX_RESPONSE_BYTES + 1)
            if len(data) > MAX_RESPONSE_BYTES:
                raise _Failure(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
            if response.will_close:
                self.close()
            return response.status, data
        except _Failure as exc:
            self.close()
            raise ApiUnreachableError(self.url, str(exc)) from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ApiUnreachableError(
                self.url, self._describe(exc), maybe_done=sent and method != "GET"
            ) from None

    def _describe(self, exc: BaseException) -> str:
        """What failed, in the operator's terms."""
        import http.client
        import socket
        import ssl

        if isinstance(exc, ssl.SSLCertVerificationError):
            against = f"against {self._ca_file}" if self._ca_file else "against the system CAs"
            return (
                f"TLS: the service's certificate failed verification {against}: "
                f"{exc.verify_message or exc.reason}"
            )
        if isinstance(exc, ssl.SSLError):
            reason = str(exc.reason or "")
            if reason in _CLIENT_CERT_ALERTS:
                cert = f" ({self._client_cert})" if self._client_cert else " (none configured)"
                return (
                    f"TLS: the service refused our client certificate{cert}: "
                    f"{_CLIENT_CERT_ALERTS[reason]}"
                )
            if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE" and self._client_cert is None:
                # TLS 1.2's answer to a missing client certificate.
                return (
                    "TLS: the service refused the handshake; it may require a client "
                    "certificate (none configured: set api.cert and api.key)"
                )
            if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
                # TLS 1.3: the server checks our certificate after the client's side of the
                # handshake; its alert can be lost when it closes before we read it.
                cert = f" ({self._client_cert})" if self._client_cert else ""
                return (
                    "TLS: the service closed the connection during the handshake "
                    f"(did it refuse our client certificate{cert}?)"
                )
            return f"TLS handshake failed: {reason or exc}"
        if isinstance(exc, ConnectionRefusedError):
            return f"connection refused (is `portagent-broker serve` listening on {self.port}?)"
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve {self.host}: {exc.strerror}"
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.timeout:g}s"
        if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
            return "the service closed the connection without an answer"
        if isinstance(exc, OSError):
            return exc.strerror or str(exc)
        return f"bad HTTP answer: {exc!r}"

    def _decode(self, status: int, data: bytes) -> dict[str, Any]:
        try:
            value = json.loads(data) if data else None
        except (ValueError, RecursionError):
            value = None
        if 200 <= status < 300:
            if not isinstance(value, dict):
                raise ApiUnreachableError(self.url, f"HTTP {status} without a JSON object")
            return value
        error = value.get("error") if isinstance(value, dict) else None
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            return _raise_refusal(status, error)
        snippet = data[:200].decode("utf-8", "replace").strip()
        raise ApiUnreachableError(
            self.url, f"HTTP {status} without the API's error body: {snippet!r}"
        )

    # ---- the API ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/v1/healthz")

    def create_grant(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST /v1/grants; retried only with the body's request_id (idempotent)."""
        return _object(self.request("POST", "/v1/grants", body=body, idempotent=True), "grant")

    def get_grant(self, grant_id: str) -> dict[str, Any]:
        return _object(self.request("GET", f"/v1/grants/{_segment(grant_id)}"), "grant")

    def revoke_grant(self, grant_id: str, reason: str) -> dict[str, Any]:
        # Revoking a revoked grant returns it unchanged: safe to send again.
        answer = self.request(
            "POST",
            f"/v1/grants/{_segment(grant_id)}/revoke",
            body={"reason": reason},
            idempotent=True,
        )
        return _object(answer, "grant")

    def iter_grants(
        self,
        *,
        host: str | None = None,
        labels: Sequence[str] = (),
        subject: str | None = None,
        state: str | None = None,
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        query: list[tuple[str, str]] = [("label", label) for label in labels]
        for name, value in (("host", host), ("subject", subject), ("state", state)):
            if value is not None:
                query.append((name, value))
        yield from self._pages("/v1/grants", "grants", query, page_size)

    def list_hosts(self, labels: Sequence[str] = ()) -> list[dict[str, Any]]:
        answer = self.request("GET", "/v1/hosts", query=[("label", label) for label in labels])
        return _objects(answer, "hosts")

    def get_host(self, host_id: str) -> dict[str, Any]:
        return _object(self.request("GET", f"/v1/hosts/{_segment(host_id)}"), "host")

    def add_host(self, host_id: str, labels: Mapping[str, str]) -> dict[str, Any]:
        answer = self.request("POST", "/v1/hosts", body={"host_id": host_id, "labels": labels})
        return _object(answer, "host")

    def set_host_labels(self, host_id: str, labels: Mapping[str, str]) -> dict[str, Any]:
        answer = self.request(
            "PUT", f"/v1/hosts/{_segment(host_id)}/labels", body={"labels": dict(labels)}
        )
        return _object(answer, "host")

    def remove_host(self, host_id: str) -> None:
        self.request("DELETE", f"/v1/hosts/{_segment(host_id)}")

    # ---- access requests, policy, identity (ADR 0008) ---------------------------------

    def whoami(self) -> dict[str, Any]:
        return _object(self.request("GET", "/v1/whoami"), "identity")

    def get_policy(self) -> dict[str, Any]:
        """GET /v1/policy: {digest, source, rules: [...]}."""
        return self.request("GET", "/v1/policy")

    def explain(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST /v1/policy/explain: the explanation (it changes nothing: safe to resend)."""
        return self.request("POST", "/v1/policy/explain", body=body, idempotent=True)

    def iter_requests(
        self, *, state: str | None = None, host: str | None = None, page_size: int = 1000
    ) -> Iterator[dict[str, Any]]:
        query: list[tuple[str, str]] = []
        for name, value in (("state", state), ("host", host)):
            if value is not None:
                query.append((name, value))
        yield from self._pages("/v1/requests", "requests", query, page_size)

    def get_request(self, request_id: str) -> dict[str, Any]:
        """{"request": {...}, "grant": {...} | null, "applied": bool}."""
        answer = self.request("GET", f"/v1/requests/{_segment(request_id)}")
        _object(answer, "request")
        return answer

    def decide_request(
        self, request_id: str, *, approve: bool, comment: str = ""
    ) -> dict[str, Any]:
        """POST /v1/requests/{id}/approve | /deny. Not resent: a second vote of the same
        identity is refused (ALREADY_DECIDED), which would hide that the first counted."""
        verb = "approve" if approve else "deny"
        body = {"comment": comment} if comment else {}
        answer = self.request("POST", f"/v1/requests/{_segment(request_id)}/{verb}", body=body)
        _object(answer, "request")
        return answer

    def close_request(self, request_id: str) -> dict[str, Any]:
        answer = self.request("POST", f"/v1/requests/{_segment(request_id)}/close", body={})
        _object(answer, "request")
        return answer

    def iter_audit(self, *, after: int = 0, page_size: int = 1000) -> Iterator[dict[str, Any]]:
        cursor: int | None = after
        for _ in range(MAX_PAGES):
            query = [("after", str(cursor)), ("limit", str(page_size))]
            answer = self.request("GET", "/v1/audit", query=query)
            yield from _objects(answer, "records")
            following = answer.get("next_after")
            if following is None:
                return
            if (
                not isinstance(following, int)
                or isinstance(following, bool)
                or following <= (cursor or 0)
            ):
                raise ApiUnreachableError(self.url, f"audit: bad next_after {following!r}")
            cursor = following
        raise ApiUnreachableError(self.url, f"audit: more than {MAX_PAGES} pages")

    def _pages(
        self, path: str, key: str, query: list[tuple[str, str]], page_size: int
    ) -> Iterator[dict[str, Any]]:
        after: str | None = None
        for _ in range(MAX_PAGES):
            page = [*query, ("limit", str(page_size))]
            if after is not None:
                page.append(("after", after))
            answer = self.request("GET", path, query=page)
            yield from _objects(answer, key)
            following = answer.get("next_after")
            if following is None:
                return
            if not isinstance(following, str) or following == after:
                raise ApiUnreachableError(self.url, f"{key}: bad next_after {following!r}")
            after = following
        raise ApiUnreachableError(self.url, f"{key}: more than {MAX_PAGES} pages")


class _Failure(Exception):
    """A transport-level problem found while reading an answer."""


def _transient(exc: ApiUnreachableError) -> bool:
    """Worth another try: the service may be restarting. A TLS or certificate failure,
    a name that does not resolve or a malformed answer will not change in a second."""
    return not exc.detail.startswith(("TLS", "cannot resolve", "HTTP", "answer"))


def _raise_refusal(status: int, error: Mapping[str, Any]) -> dict[str, Any]:
    def text(name: str) -> str:
        value = error.get(name)
        return value[:2000] if isinstance(value, str) else ""

    raise ApiRefusedError(
        status, text("code"), text("reason"), text("message") or f"HTTP {status}", text("field")
    )


def _segment(value: str) -> str:
    """A path segment: quoted, so an id can never change the route ("../x")."""
    return urllib.parse.quote(value, safe="")


def _object(answer: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = answer.get(key)
    if not isinstance(value, dict):
        raise ApiError(f"the answer has no {key!r} object")
    return value


def _objects(answer: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = answer.get(key)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ApiError(f"the answer has no {key!r} list of objects")
    return value
