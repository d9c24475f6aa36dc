"""The broker's HTTPS JSON API (Starlette; described by openapi.json next to this file).

Every request body is read with a cap (MAX_BODY_BYTES, 413 beyond), parsed once as
strict JSON (duplicate keys, NaN/Infinity and unknown keys refused, 400 naming the
key) and checked with the same canonical parsers the CLI uses
(portagent.broker.signing). Errors are `{"error": {code, reason, field, message}}`
with the HTTP status of the canonical code.

Authentication, on every route but /v1/healthz and /v1/openapi.json, gives the caller's
Identity (ADR 0008):
* `Authorization: Bearer TOKEN` where TOKEN is an admin token: the tokens file holds
  `NAME SHA256HEX` lines; the token's SHA-256 is compared with every entry
  (hmac.compare_digest); an ADMIN identity, actor "admin:NAME";
* `Authorization: Bearer JWT`: an OIDC ID token, verified by the TokenVerifier (in a
  thread: it may fetch JWKS) against `[[service.issuers]]`; a token that does not
  verify is 401 with the verifier's reason (TOKEN_EXPIRED, ...), 503 when no keys can
  be had (JWKS_UNAVAILABLE);
* or a client certificate signed by `[service.api] client_ca`: an ADMIN identity,
  actor "admin:<CN>".
The fleet's own routes (hosts, grants, audit, policy) are for admins; an OIDC identity
may read and revoke its own grants and use the access-request routes.
  uvicorn does not put the peer certificate in the ASGI scope, so `PeerCertProtocol`
  (an h11 protocol subclass passed as uvicorn's `http=`) reads it from the TLS
  object once per connection, after the handshake, and wraps that connection's ASGI
  app to add it to the scope as PEER_CN_SCOPE_KEY. Nothing a client sends can set
  that key: it is not derived from the request.

Blocking store calls run in a thread pool; the delivery hub hears of every committed
change through `publish` (the in-process bus).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from portagent.broker.fleet.audit import record_json
from portagent.broker.fleet.keyring import KeyRing
from portagent.broker.fleet.metrics import UNMATCHED_ROUTE, BrokerMetrics
from portagent.broker.fleet.model import (
    AccessRequest,
    BrokerGrant,
    FleetError,
    GrantState,
    Host,
    RequestState,
    StoreError,
)
from portagent.broker.fleet.notify import Notifier
from portagent.broker.fleet.store import FleetStore
from portagent.broker.fleet.waiters import Waiters
from portagent.broker.identity.model import Identity, IdentityError, IdentityKind, admin_identity
from portagent.broker.identity.oidc import TokenVerifier, looks_like_jwt
from portagent.broker.policy.cedar import Policy, explanation_json, limits_json, query_from_json
from portagent.broker.policy.model import AccessQuery, PolicyDecision
from portagent.broker.signing import InputError, check_grant_id, grant_request
from portagent.wire.config import MAX_DURATION, read_config_text
from portagent.wire.errors import ConfigError
from portagent.wire.ports import GuardedPort, PortRange, Protocol
from portagent.wire.records import rfc3339
from portagent.wire.sources import parse_network
from portagent.wire.timestamps import timestamp

MAX_BODY_BYTES = 64 * 1024
MAX_TOKEN_BYTES = 4096  # an admin token
MAX_JWT_BYTES = 16 * 1024  # an OIDC ID token (the verifier's own cap)
MAX_WAIT = 30.0  # seconds a request call may wait for approval / the agent
MAX_REQUEST_REASON = 256
MAX_COMMENT = 256
DEFAULT_REQUEST_TTL = 3600.0
MAX_LIST = 1000
MAX_AUDIT_LIST = 10_000
API_THREADS = 4
EXPIRE_EVERY = 2.0
PRUNE_EVERY = 3600.0
# A change older than this is for a grant that expired long ago; resuming past it
# costs a snapshot instead (the hub falls back when the log is pruned).
CHANGE_RETENTION = 8 * 86400.0
PEER_CN_SCOPE_KEY = "portagent.peer_cn"
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
TOKEN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_ACCESS_REQUEST_ID = re.compile(r"r-[0-9a-f]{16}")
_FIELD_PREFIX = re.compile(r"([a-z_][a-z0-9_.]{0,63}): ")
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "INTERNAL": 500,
}
# Input fields as the signing parsers name them -> as this API's body names them.
_FIELD = {"source": "sources", "max-connections": "max_connections"}

T = TypeVar("T")
Log = Callable[..., None]


class ApiError(Exception):
    def __init__(
        self,
        code: str,
        reason: str,
        message: str,
        field: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.field = field
        self.status = status or HTTP_STATUS[code]


def _bad(field: str, message: str, reason: str = "INVALID_ARGUMENT") -> ApiError:
    return ApiError("INVALID_ARGUMENT", reason, f"{field}: {message}", field)


# --- tokens ---------------------------------------------------------------------------------


class Tokens:
    """The admins' bearer tokens: name -> SHA-256 of the token (never the token)."""

    def __init__(self, entries: Mapping[str, bytes]) -> None:
        self._entries = dict(entries)

    @classmethod
    def load(cls, path: Path) -> Tokens:
        text = read_config_text(path, "a tokens file")
        entries: dict[str, bytes] = {}
        problems: list[str] = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if (
                len(parts) != 2
                or not TOKEN_NAME_PATTERN.fullmatch(parts[0])
                or not _SHA256_HEX.fullmatch(parts[1])
            ):
                problems.append(
                    f"{path}:{number}: expected `NAME SHA256HEX` (NAME 1-64 of [A-Za-z0-9._@-], "
                    "the lower-case hex SHA-256 of the token)"
                )
                continue
            if parts[0] in entries:
                problems.append(f"{path}:{number}: {parts[0]!r} appears twice")
                continue
            entries[parts[0]] = bytes.fromhex(parts[1])
        if problems:
            raise ConfigError(problems)
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, token: str) -> str | None:
        """The name the token belongs to, or None. Every entry is compared, so the time
        taken does not tell which (or whether a) name matched first."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for name, expected in self._entries.items():
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return found


def token_line(name: str, token: str) -> str:
    """The tokens-file line for `token` (for set-up tools and tests)."""
    return f"{name} {hashlib.sha256(token.encode()).hexdigest()}\n"


# --- the peer certificate (mTLS admins) -----------------------------------------------------


def peer_cert_protocol() -> type:
    """uvicorn's h11 protocol, recording the verified client certificate's CN per
    connection and handing it to that connection's requests in the ASGI scope."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerCertProtocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            cn = _peer_cn(transport.get_extra_info("ssl_object"))
            inner = self.app

            async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
                scope = dict(scope)
                scope[PEER_CN_SCOPE_KEY] = cn
                await inner(scope, receive, send)

            self.app = app

    return PeerCertProtocol


def _peer_cn(ssl_object: ssl.SSLObject | None) -> str | None:
    if ssl_object is None:
        return None
    # getpeercert() returns only a certificate the handshake verified against client_ca.
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    subject: Any = cert.get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str) and value.isprintable():
                return value[:128]
    return None


# --- JSON -----------------------------------------------------------------------------------


def _pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in items:
        if key in result:
            raise ValueError(f"duplicate key {key[:64]!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(data: bytes) -> dict[str, Any]:
    """One strict parse of a request body into a JSON object."""
    try:
        value = json.loads(
            data.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_no_constant
        )
    except UnicodeDecodeError:
        raise ApiError("INVALID_ARGUMENT", "INVALID_JSON", "body: not UTF-8") from None
    except RecursionError:
        raise ApiError("INVALID_ARGUMENT", "INVALID_JSON", "body: nested too deeply") from None
    except ValueError as exc:
        raise ApiError(
            "INVALID_ARGUMENT", "INVALID_JSON", f"body: not valid JSON ({exc})"
        ) from None
    if not isinstance(value, dict):
        raise ApiError("INVALID_ARGUMENT", "INVALID_JSON", "body: expected a JSON object")
    return value


class Body:
    """Typed access to a parsed body; unknown keys are refused up front."""

    def __init__(self, obj: dict[str, Any], known: set[str]) -> None:
        for key in sorted(obj):
            if key not in known:
                raise _bad(
                    key[:64],
                    f"unknown key (expected one of {', '.join(sorted(known))})",
                    "UNKNOWN_FIELD",
                )
        self.obj = obj

    def text(self, name: str, *, required: bool = False, default: str = "") -> str:
        if name not in self.obj:
            if required:
                raise _bad(name, "required")
            return default
        value = self.obj[name]
        if not isinstance(value, str):
            raise _bad(name, f"expected a string, got {type(value).__name__}")
        return value

    def optional_text(self, name: str) -> str | None:
        if self.obj.get(name) is None:
            return None
        return self.text(name)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.obj.get(name, default)
        if not isinstance(value, bool):
            raise _bad(name, "expected true or false")
        return value

    def integer(self, name: str, default: int = 0) -> int:
        value = self.obj.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(name, "expected an integer")
        return value

    def texts(self, name: str) -> list[str]:
        value = self.obj.get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(name, "expected a list of strings")
        return value

    def labels(self, name: str) -> dict[str, str]:
        value = self.obj.get(name, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _bad(name, "expected an object of string values")
        return value


async def read_body(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise ApiError(
            "RESOURCE_EXHAUSTED",
            "BODY_TOO_LARGE",
            f"body: larger than {MAX_BODY_BYTES} bytes",
            status=413,
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(
                "RESOURCE_EXHAUSTED",
                "BODY_TOO_LARGE",
                f"body: larger than {MAX_BODY_BYTES} bytes",
                status=413,
            )
        chunks.append(chunk)
    return parse_json_object(b"".join(chunks))


# --- projections ----------------------------------------------------------------------------


def _time(seconds: float | None) -> str | None:
    return None if seconds is None else rfc3339(timestamp(seconds))


def grant_json(grant: BrokerGrant, now: float) -> dict[str, Any]:
    state = grant.state_at(now)
    ports = (
        str(grant.port_first)
        if grant.port_first == grant.port_last
        else f"{grant.port_first}-{grant.port_last}"
    )
    return {
        "grant_id": grant.grant_id,
        "host_id": grant.host_id,
        "subject": grant.subject,
        "sources": list(grant.sources),
        "protocol": grant.protocol,
        "ports": ports,
        "state": state.value,
        "not_before": _time(grant.not_before),
        "expire_time": _time(grant.expire_time),
        "issue_time": _time(grant.issue_time),
        "remaining_seconds": (
            max(0, int(grant.expire_time - now)) if state is GrantState.ACTIVE else 0
        ),
        "reason": grant.reason,
        "key_id": grant.key_id,
        "created_by": grant.created_by,
        "generation": grant.generation,
        "request_id": grant.request_id,
        "revoke_time": _time(grant.revoked_at),
        "revoked_by": grant.revoked_by,
        "revoke_reason": grant.revoke_reason,
        "connections": grant.usage.connections,
        "packets": grant.usage.packets,
        "bytes": grant.usage.bytes,
        "last_seen": _time(grant.usage.last_seen),
        "identity": grant.identity.to_json() if grant.identity is not None else None,
        "access_request_id": grant.access_request_id,
    }


def request_json(access: AccessRequest) -> dict[str, Any]:
    """An access request as the API, the webhooks and the CLI show it."""
    ports = (
        str(access.port_first)
        if access.port_first == access.port_last
        else f"{access.port_first}-{access.port_last}"
    )
    return {
        "id": access.request_id,
        "state": access.state.value,
        "requester": access.requester.to_json(),
        "host_id": access.host_id,
        "protocol": access.protocol,
        "ports": ports,
        "sources": list(access.sources),
        "ttl_seconds": access.ttl,
        "reason": access.reason,
        "rule": access.rule,
        "approvals_required": access.approvals_required,
        "approvers": access.approvers,
        "approved": access.approved_count,
        "approvals": [
            {
                "approver": a.approver.to_json(),
                "approve": a.approve,
                "time": _time(a.time),
                "comment": a.comment,
            }
            for a in access.approvals
        ],
        "created_at": _time(access.created_at),
        "expires_at": _time(access.expires_at),
        "decided_at": _time(access.decided_at),
        "grant_id": access.grant_id,
        "client_request_id": access.client_request_id,
    }


def host_json(host: Host) -> dict[str, Any]:
    connected = host.connected_since is not None
    refused = bool(getattr(host, "refused_since_ack", False))  # when the store keeps it
    return {
        "host_id": host.host_id,
        "labels": host.labels,
        "broker_labels": dict(host.broker_labels),
        "agent_labels": dict(host.agent_labels),
        "agent_version": host.agent_version,
        "connected": connected,
        "connected_since": _time(host.connected_since),
        "replica": host.replica,
        "last_seen": _time(host.last_seen),
        "generation": host.generation,
        "acked_generation": host.acked_generation,
        "behind": host.behind,
        "drift": (connected and host.behind > 0) or refused,
        "trusted_key_ids": list(host.trusted_key_ids),
    }


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "code": exc.code,
                "reason": exc.reason,
                "field": exc.field,
                "message": exc.message,
            }
        },
        status_code=exc.status,
    )


# --- query strings --------------------------------------------------------------------------


def _query(request: Request, known: set[str]) -> None:
    for key in request.query_params:
        if key not in known:
            raise _bad(
                key[:64],
                f"unknown query parameter (expected one of {', '.join(sorted(known))})",
                "UNKNOWN_FIELD",
            )
    for key in known - {"label"}:
        if len(request.query_params.getlist(key)) > 1:
            raise _bad(key, "given more than once")


def _labels_query(request: Request) -> dict[str, str] | None:
    values = request.query_params.getlist("label")
    if not values:
        return None
    labels: dict[str, str] = {}
    for value in values[:64]:
        key, sep, wanted = value.partition("=")
        if not sep or not key:
            raise _bad("label", f"{value[:80]!r} is not KEY=VALUE")
        labels[key] = wanted
    return labels


def _int_query(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise _bad(name, f"{text[:40]!r} is not an integer from {low} to {high}")
    return int(text)


def _host_id(text: str, field: str = "host_id") -> str:
    if not _HOST_ID.fullmatch(text):
        raise _bad(field, f"{text[:80]!r} is not 1-253 of [A-Za-z0-9._-]", "INVALID_HOST")
    return text


# --- the app ---------------------------------------------------------------------------------


@dataclass
class ApiContext:
    store: FleetStore
    keyring: Callable[[], KeyRing]
    tokens: Callable[[], Tokens]
    publish: Callable[[str], None]
    log: Log
    on_host_removed: Callable[[str], None] = lambda host_id: None
    clock: Callable[[], float] = time.time
    verifier: TokenVerifier | None = None  # None: no [[service.issuers]]
    policy: Callable[[], Policy | None] = lambda: None  # the policy in force (SIGHUP)
    notifier: Notifier | None = None
    request_ttl: float = DEFAULT_REQUEST_TTL  # how long a pending request waits
    # Shared with the hub; `serve` exposes its registry on [service.metrics] listen.
    metrics: BrokerMetrics = field(default_factory=lambda: BrokerMetrics(process=False))

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=API_THREADS, thread_name_prefix="api-store")
        # Token verification (may fetch JWKS) and policy decisions: their own threads,
        # so a slow issuer never queues the store's calls.
        self._cpu = ThreadPoolExecutor(max_workers=API_THREADS, thread_name_prefix="api-verify")
        self.waiters = Waiters(self._stored_ack)

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, partial(fn, *args, **kwargs))

    async def work(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._cpu, partial(fn, *args))

    async def _stored_ack(self, host_id: str) -> int | None:
        host = await self.db(self.store.get_host, host_id)
        return None if host is None else host.acked_generation

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._cpu.shutdown(wait=False, cancel_futures=True)

    def notify(self, event: str, access: AccessRequest) -> None:
        """A webhook for `event` (never blocks) and a wake-up for the request's waiters."""
        self.waiters.changed(access.request_id)
        self.metrics.request_event(event, access)
        if self.notifier is not None:
            self.notifier.submit(event, request_json(access))

    async def authenticate(self, request: Request) -> Identity:
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                if len(token) <= MAX_TOKEN_BYTES:
                    name = self.tokens().check(token)
                    if name is not None:
                        return admin_identity(name)
                if looks_like_jwt(token):
                    return await self._verify(token)
        cn = request.scope.get(PEER_CN_SCOPE_KEY)
        if isinstance(cn, str) and cn:
            return admin_identity(cn, certificate=True)
        raise ApiError(
            "UNAUTHENTICATED",
            "UNAUTHENTICATED",
            "a valid `Authorization: Bearer TOKEN` (an OIDC ID token or an admin token) "
            "or an admin client certificate is required",
        )

    async def _verify(self, token: str) -> Identity:
        verifier = self.verifier
        if verifier is None:
            raise ApiError(
                "UNAUTHENTICATED",
                "TOKEN_ISSUER",
                "this broker trusts no OIDC issuer ([[service.issuers]] is not configured)",
            )
        try:
            return await self.work(verifier.verify, token)
        except IdentityError as exc:
            code = "UNAVAILABLE" if exc.reason == "JWKS_UNAVAILABLE" else "UNAUTHENTICATED"
            raise ApiError(code, exc.reason, exc.message) from None


Handler = Callable[[ApiContext, Request, Identity], Awaitable[Response]]
# Who may call a route: nobody needs to authenticate, admins only, or any verified
# identity (the handler then decides what that identity may see or do).
PUBLIC, ADMIN, ANYONE = "public", "admin", "anyone"
_NOBODY = Identity(kind=IdentityKind.ADMIN, issuer="-", issuer_name="-", subject="-")


def _is_admin(who: Identity) -> bool:
    return who.kind is IdentityKind.ADMIN


def _admin_only(who: Identity) -> None:
    if not _is_admin(who):
        raise ApiError(
            "PERMISSION_DENIED",
            "ADMIN_ONLY",
            f"this route is for admins (an admin token or client certificate); "
            f"{who.label} is not one",
        )


def _endpoint(
    ctx: ApiContext, handler: Handler, *, access: str = ADMIN
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            who = _NOBODY if access == PUBLIC else await ctx.authenticate(request)
            if access == ADMIN:
                _admin_only(who)
            return await handler(ctx, request, who)
        except ApiError as exc:
            return error_response(exc)
        except InputError as exc:
            field = _FIELD.get(exc.field, exc.field)
            return error_response(
                ApiError(
                    "INVALID_ARGUMENT", "INVALID_" + field.upper(), f"{field}: {exc.message}", field
                )
            )
        except FleetError as exc:
            code = exc.status if exc.status in HTTP_STATUS else "INTERNAL"
            return error_response(ApiError(code, exc.reason, exc.message, exc.field))
        except StoreError as exc:
            ctx.log("store_unavailable", error=str(exc)[:300])
            return error_response(ApiError("UNAVAILABLE", "STORE_UNAVAILABLE", str(exc)[:300]))
        except Exception as exc:
            ctx.log("api_internal_error", path=request.url.path, error=repr(exc)[:300])
            return error_response(ApiError("INTERNAL", "INTERNAL", "internal error (logged)"))

    return endpoint


async def healthz(ctx: ApiContext, request: Request, who: Identity) -> Response:
    database = "postgresql" if ctx.store.is_postgresql else "sqlite"
    try:
        await ctx.db(ctx.store.get_host, "healthz")
    except Exception as exc:
        ctx.log("healthz_failed", error=repr(exc)[:300])
        return JSONResponse(
            {"status": "unavailable", "replica": ctx.store.replica, "database": database},
            status_code=503,
        )
    return JSONResponse({"status": "ok", "replica": ctx.store.replica, "database": database})


async def openapi(ctx: ApiContext, request: Request, who: Identity) -> Response:
    return Response(OPENAPI_PATH.read_bytes(), media_type="application/json")


async def create_grant(ctx: ApiContext, request: Request, who: Identity) -> Response:
    body = Body(
        await read_body(request),
        {
            "host",
            "subject",
            "sources",
            "port",
            "protocol",
            "ttl",
            "reason",
            "keep_established",
            "max_connections",
            "request_id",
        },
    )
    ttl = body.obj.get("ttl")
    if not isinstance(ttl, str | int | float) or isinstance(ttl, bool):
        raise _bad("ttl", 'required: a duration ("15m") or seconds')
    if not isinstance(ttl, str) and not 0 < ttl <= MAX_DURATION:  # also keeps float() finite
        limit = f"must be more than 0 and at most {MAX_DURATION:.0f}"
        raise _bad("ttl", f"{ttl!r} seconds: {limit}", "INVALID_TTL")
    request_id = body.optional_text("request_id")
    if request_id is not None and not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise _bad("request_id", "not 1-64 of [A-Za-z0-9._-]", "INVALID_REQUEST_ID")
    host = _host_id(body.text("host", required=True), "host")
    grant_req = grant_request(
        host_id=host,
        subject=body.text("subject", required=True),
        sources=body.texts("sources"),
        port=body.text("port", required=True),
        ttl=ttl if isinstance(ttl, str) else float(ttl),
        protocol=body.optional_text("protocol"),
        reason=body.text("reason"),
        keep_established=body.boolean("keep_established"),
        max_connections=body.integer("max_connections"),
    )
    if grant_req.ttl > MAX_DURATION:
        raise _bad(
            "ttl", f"at most {MAX_DURATION:g}s (the agent's policy caps it further)", "INVALID_TTL"
        )
    now = ctx.clock()
    grant, created = await ctx.db(
        ctx.store.create_grant,
        grant_req,
        keyring=ctx.keyring(),
        actor=who.label,
        request_id=request_id,
        now=now,
        identity=who,  # break-glass: recorded with the admin's identity
    )
    if created:
        ctx.publish(grant.host_id)
        ctx.metrics.grants_issued.labels(by="admin").inc()
        ctx.log("grant_created", grant_id=grant.grant_id, host_id=grant.host_id, actor=who.label)
    return JSONResponse({"grant": grant_json(grant, now)}, status_code=201 if created else 200)


async def list_grants(ctx: ApiContext, request: Request, who: Identity) -> Response:
    _query(request, {"host", "label", "subject", "state", "limit", "after"})
    q = request.query_params
    host = q.get("host")
    state_text = q.get("state")
    state = None
    if state_text is not None:
        try:
            state = GrantState(state_text)
        except ValueError:
            raise _bad("state", f"{state_text[:40]!r} is not active, revoked or expired") from None
    after = q.get("after")
    if after is not None:
        try:
            check_grant_id(after)
        except InputError as exc:
            raise _bad("after", exc.message) from None
    limit = _int_query(request, "limit", 100, 1, MAX_LIST)
    now = ctx.clock()
    grants = await ctx.db(
        ctx.store.list_grants,
        host_id=_host_id(host, "host") if host is not None else None,
        labels=_labels_query(request),
        subject=q.get("subject"),
        state=state,
        now=now,
        limit=limit,
        after=after,
    )
    return JSONResponse(
        {
            "grants": [grant_json(g, now) for g in grants],
            "next_after": grants[-1].grant_id if len(grants) == limit else None,
        }
    )


def _grant_id(request: Request) -> str:
    grant_id = str(request.path_params["grant_id"])
    try:
        return check_grant_id(grant_id)
    except InputError as exc:
        raise _bad("grant_id", exc.message, "INVALID_GRANT_ID") from None


def _grant_not_found(grant_id: str) -> ApiError:
    return ApiError("NOT_FOUND", "GRANT_NOT_FOUND", f"grant_id: {grant_id!r} not found", "grant_id")


def _owns(who: Identity, grant: BrokerGrant) -> bool:
    return grant.identity is not None and grant.identity.key == who.key


async def get_grant(ctx: ApiContext, request: Request, who: Identity) -> Response:
    grant_id = _grant_id(request)
    grant = await ctx.db(ctx.store.get_grant, grant_id)
    # Someone else's grant reads as absent: ids are not to be probed.
    if grant is None or not (_is_admin(who) or _owns(who, grant)):
        raise _grant_not_found(grant_id)
    return JSONResponse({"grant": grant_json(grant, ctx.clock())})


async def revoke_grant(ctx: ApiContext, request: Request, who: Identity) -> Response:
    grant_id = _grant_id(request)
    body = Body(await read_body(request), {"reason"})
    reason = body.text("reason")
    if len(reason) > 1024 or not reason.isprintable():
        raise _bad("reason", "must be printable and at most 1024 characters")
    now = ctx.clock()
    before = await ctx.db(ctx.store.get_grant, grant_id)
    if before is not None and not (_is_admin(who) or _owns(who, before)):
        raise _grant_not_found(grant_id)
    grant = await ctx.db(
        ctx.store.revoke_grant,
        grant_id,
        keyring=ctx.keyring(),
        actor=who.label,
        reason=reason,
        now=now,
    )
    if before is None or before.state is not GrantState.REVOKED:
        ctx.publish(grant.host_id)
        ctx.metrics.grants_revoked.inc()
        ctx.log("grant_revoked", grant_id=grant_id, host_id=grant.host_id, actor=who.label)
    return JSONResponse({"grant": grant_json(grant, now)})


async def list_hosts(ctx: ApiContext, request: Request, who: Identity) -> Response:
    _query(request, {"label"})
    hosts = await ctx.db(ctx.store.list_hosts, labels=_labels_query(request))
    return JSONResponse({"hosts": [host_json(h) for h in hosts]})


async def add_host(ctx: ApiContext, request: Request, who: Identity) -> Response:
    body = Body(await read_body(request), {"host_id", "labels"})
    host_id = _host_id(body.text("host_id", required=True))
    host = await ctx.db(
        ctx.store.add_host, host_id, body.labels("labels"), actor=who.label, now=ctx.clock()
    )
    ctx.log("host_added", host_id=host_id, actor=who.label)
    return JSONResponse({"host": host_json(host)}, status_code=201)


def _path_host(request: Request) -> str:
    return _host_id(str(request.path_params["host_id"]))


async def get_host(ctx: ApiContext, request: Request, who: Identity) -> Response:
    host_id = _path_host(request)
    host = await ctx.db(ctx.store.get_host, host_id)
    if host is None:
        raise ApiError("NOT_FOUND", "HOST_NOT_FOUND", f"host_id: {host_id!r} not found", "host_id")
    return JSONResponse({"host": host_json(host)})


async def set_labels(ctx: ApiContext, request: Request, who: Identity) -> Response:
    host_id = _path_host(request)
    body = Body(await read_body(request), {"labels"})
    if "labels" not in body.obj:
        raise _bad("labels", "required")
    host = await ctx.db(
        ctx.store.set_host_labels, host_id, body.labels("labels"), actor=who.label, now=ctx.clock()
    )
    return JSONResponse({"host": host_json(host)})


async def remove_host(ctx: ApiContext, request: Request, who: Identity) -> Response:
    host_id = _path_host(request)
    await ctx.db(ctx.store.remove_host, host_id, actor=who.label, now=ctx.clock())
    ctx.on_host_removed(host_id)
    ctx.log("host_removed", host_id=host_id, actor=who.label)
    return JSONResponse({"host_id": host_id})


async def audit(ctx: ApiContext, request: Request, who: Identity) -> Response:
    _query(request, {"after", "limit"})
    after = _int_query(request, "after", 0, 0, 2**62)
    limit = _int_query(request, "limit", 1000, 1, MAX_AUDIT_LIST)
    records = await ctx.db(ctx.store.audit_records, after_seq=after, limit=limit)
    return JSONResponse(
        {
            "records": [record_json(r) for r in records],
            "next_after": records[-1].seq if len(records) == limit else None,
        }
    )


# --- access requests (ADR 0008) -------------------------------------------------------------


def requester_network(request: Request) -> str:
    """The caller's own address as this API sees it, as one source (/32 or /128); an
    IPv4-mapped IPv6 address is the IPv4 address it carries."""
    client = request.client
    try:
        address = ipaddress.ip_address(client.host if client is not None else "")
    except ValueError:
        raise ApiError(
            "FAILED_PRECONDITION",
            "NO_CLIENT_ADDRESS",
            "sources: the caller's address is unknown here; name the sources explicitly",
            "sources",
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return f"{address}/{address.max_prefixlen}"


def _policy_in_force(ctx: ApiContext) -> Policy:
    policy = ctx.policy()
    if policy is None:
        raise ApiError(
            "FAILED_PRECONDITION",
            "NO_POLICY",
            "no policy is configured ([service.policy] file): every access request is refused",
        )
    return policy


def _wait(body: Body) -> float:
    value = body.obj.get("wait", 0)
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not 0 <= value <= MAX_WAIT  # also refuses NaN
    ):
        raise _bad("wait", f"{value!r} is not a number of seconds from 0 to {MAX_WAIT:g}")
    return float(value)


def _request_reason(text: str, field: str = "reason", *, required: bool = True) -> str:
    if required and not text.strip():
        raise _bad(field, "required: a ticket or a few words (1-256 characters)", "INVALID_REASON")
    if len(text) > MAX_REQUEST_REASON or not text.isprintable():
        raise _bad(
            field,
            f"must be printable and at most {MAX_REQUEST_REASON} characters",
            "INVALID_" + field.upper(),
        )
    return text


def _ttl_value(body: Body) -> str | float:
    ttl = body.obj.get("ttl")
    if not isinstance(ttl, str | int | float) or isinstance(ttl, bool):
        raise _bad("ttl", 'required: a duration ("15m") or seconds')
    if not isinstance(ttl, str) and not 0 < ttl <= MAX_DURATION:  # also keeps float() finite
        limit = f"must be more than 0 and at most {MAX_DURATION:.0f}"
        raise _bad("ttl", f"{ttl!r} seconds: {limit}", "INVALID_TTL")
    return ttl if isinstance(ttl, str) else float(ttl)


async def _applied(ctx: ApiContext, grant: BrokerGrant | None, wait: float) -> bool:
    """The host acknowledged the grant's generation (waiting up to `wait` seconds)."""
    if grant is None:
        return False
    if ctx.waiters.known_acked(grant.host_id) >= grant.generation:
        return True
    if wait > 0 and grant.state_at(ctx.clock()) is GrantState.ACTIVE:
        return await ctx.waiters.wait_applied(grant.host_id, grant.generation, wait)
    stored = await ctx._stored_ack(grant.host_id)
    return stored is not None and stored >= grant.generation


def _request_answer(
    access: AccessRequest, grant: BrokerGrant | None, applied: bool, now: float, status: int
) -> JSONResponse:
    return JSONResponse(
        {
            "request": request_json(access),
            "grant": grant_json(grant, now) if grant is not None else None,
            "applied": applied,
        },
        status_code=status,
    )


async def create_request(ctx: ApiContext, request: Request, who: Identity) -> Response:
    body = Body(
        await read_body(request),
        {"host", "port", "protocol", "ttl", "reason", "sources", "request_id", "wait"},
    )
    host_id = _host_id(body.text("host", required=True), "host")
    port = body.text("port", required=True)
    ttl = _ttl_value(body)
    reason = _request_reason(body.text("reason", required=True))
    client_request_id = body.optional_text("request_id")
    if client_request_id is not None and not REQUEST_ID_PATTERN.fullmatch(client_request_id):
        raise _bad("request_id", "not 1-64 of [A-Za-z0-9._-]", "INVALID_REQUEST_ID")
    wait = _wait(body)
    explicit = body.obj.get("sources") is not None
    sources = body.texts("sources") if explicit else [requester_network(request)]
    if explicit and not sources:
        raise _bad("sources", "empty (leave it out for your own address)", "INVALID_SOURCES")
    grant_req = grant_request(
        host_id=host_id,
        subject=who.label,  # never free text: the verified identity's label
        sources=sources,
        port=port,
        ttl=ttl,
        protocol=body.optional_text("protocol"),
        reason=reason,
    )
    policy = _policy_in_force(ctx)
    now = ctx.clock()

    def lookup() -> tuple[Host | None, int]:
        return ctx.store.get_host(host_id), ctx.store.count_active_grants(who.key, now=now)

    host, active = await ctx.db(lookup)
    if host is None:
        raise ApiError(
            "NOT_FOUND", "NO_SUCH_HOST", f"host: {host_id!r} is not in the inventory", "host"
        )
    query = AccessQuery(
        identity=who,
        host_id=host_id,
        host_labels=host.labels,
        port=grant_req.port,
        ttl=grant_req.ttl,
        sources=grant_req.sources,
        source_is_requester=not explicit,
        active_grants=active,
        reason=reason,
        now=now,
    )
    decision = await ctx.work(policy.decide, query)
    if not decision.allowed:
        await ctx.db(
            ctx.store.record_refused_request,
            requester=who,
            host_id=host_id,
            detail={
                "rule": decision.rule,
                "reason": decision.reason,
                "message": decision.message,
                "port": str(grant_req.port),
                "ttl": grant_req.ttl,
                "sources": [str(n) for n in grant_req.sources],
                "request_reason": reason,
            },
            now=now,
        )
        ctx.metrics.access_requests.labels(outcome="refused").inc()
        ctx.log(
            "request_refused",
            requester=who.label,
            host_id=host_id,
            reason=decision.reason,
            rule=decision.rule,
        )
        # The error body of every route, plus the rule that decided (or "" when none
        # permitted it): the requester can tell an operator exactly what said no.
        return JSONResponse(
            {
                "error": {
                    "code": "PERMISSION_DENIED",
                    "reason": decision.reason or "POLICY_DENIED",
                    "field": None,
                    "message": decision.message,
                    "rule": decision.rule,
                }
            },
            status_code=HTTP_STATUS["PERMISSION_DENIED"],
        )
    access, grant, created = await ctx.db(
        ctx.store.create_access_request,
        requester=who,
        grant_request=grant_req,
        decision=decision,
        keyring=ctx.keyring(),
        client_request_id=client_request_id,
        pending_ttl=ctx.request_ttl,
        now=now,
        explicit_sources=explicit,
    )
    if created:
        if grant is not None:
            ctx.publish(host_id)
            ctx.metrics.grants_issued.labels(by="request").inc()
        ctx.log(
            "request_created",
            request_id=access.request_id,
            requester=who.label,
            host_id=host_id,
            state=access.state.value,
            rule=access.rule,
            grant_id=access.grant_id,
        )
        ctx.notify(
            "request.granted" if access.state is RequestState.GRANTED else "request.pending",
            access,
        )
    applied = await _applied(ctx, grant, wait)
    status = 202 if access.state is RequestState.PENDING else 201
    return _request_answer(access, grant, applied, ctx.clock(), status)


def _access_request_id(request: Request) -> str:
    request_id = str(request.path_params["request_id"])
    if not _ACCESS_REQUEST_ID.fullmatch(request_id):
        raise _bad(
            "request_id", f"{request_id[:80]!r} is not r- and 16 hex digits", "INVALID_REQUEST_ID"
        )
    return request_id


def _may_see(who: Identity, access: AccessRequest) -> bool:
    return (
        _is_admin(who)
        or who.key == access.requester.key
        or (
            who.kind is IdentityKind.PERSON
            and bool(access.approvers)
            and access.approvers in who.groups
        )
    )


async def _visible_request(ctx: ApiContext, who: Identity, request_id: str) -> AccessRequest:
    access = await ctx.db(ctx.store.get_access_request, request_id)
    # Another identity's request reads as absent (its id tells nothing).
    if access is None or not _may_see(who, access):
        raise ApiError(
            "NOT_FOUND",
            "REQUEST_NOT_FOUND",
            f"request_id: {request_id!r} not found",
            "request_id",
        )
    return access


async def get_request(ctx: ApiContext, request: Request, who: Identity) -> Response:
    _query(request, {"wait"})
    request_id = _access_request_id(request)
    wait = float(_int_query(request, "wait", 0, 0, int(MAX_WAIT)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    access = await _visible_request(ctx, who, request_id)
    # Bounded: one pass per wake-up or RECHECK (0.5 s) within at most MAX_WAIT.
    for _ in range(int(MAX_WAIT * 4) + 8):
        remaining = deadline - loop.time()
        if access.state is not RequestState.PENDING or remaining <= 0:
            break
        await ctx.waiters.wait_changed(request_id, remaining)
        access = await _visible_request(ctx, who, request_id)
    grant = await ctx.db(ctx.store.get_grant, access.grant_id) if access.grant_id else None
    applied = await _applied(ctx, grant, max(0.0, deadline - loop.time()))
    return _request_answer(access, grant, applied, ctx.clock(), 200)


async def list_requests(ctx: ApiContext, request: Request, who: Identity) -> Response:
    _query(request, {"state", "host", "limit", "after"})
    q = request.query_params
    state: RequestState | None = None
    if q.get("state") is not None:
        try:
            state = RequestState(q["state"])
        except ValueError:
            names = ", ".join(s.value for s in RequestState)
            raise _bad("state", f"{q['state'][:40]!r} is not one of {names}") from None
    host = _host_id(q["host"], "host") if q.get("host") is not None else None
    after = q.get("after")
    if after is not None and not _ACCESS_REQUEST_ID.fullmatch(after):
        raise _bad("after", f"{after[:80]!r} is not r- and 16 hex digits")
    limit = _int_query(request, "limit", 100, 1, MAX_LIST)
    if _is_admin(who):
        found = await ctx.db(
            ctx.store.list_access_requests, state=state, host_id=host, limit=limit, after=after
        )
    else:

        def mine_and_to_review() -> list[AccessRequest]:
            own = ctx.store.list_access_requests(
                state=state, host_id=host, requester_key=who.key, limit=limit, after=after
            )
            review: list[AccessRequest] = []
            if (
                who.kind is IdentityKind.PERSON
                and who.groups
                and state
                in (
                    None,
                    RequestState.PENDING,
                )
            ):
                review = ctx.store.list_access_requests(
                    state=RequestState.PENDING,
                    host_id=host,
                    approvers_in=list(who.groups),
                    limit=limit,
                    after=after,
                )
            merged = {a.request_id: a for a in [*own, *review]}
            ordered = sorted(merged.values(), key=lambda a: (a.created_at, a.request_id))
            return ordered[:limit]

        found = await ctx.db(mine_and_to_review)
    return JSONResponse(
        {
            "requests": [request_json(a) for a in found],
            "next_after": found[-1].request_id if len(found) == limit else None,
        }
    )


async def _still_allowed(ctx: ApiContext, request_id: str, now: float) -> None:
    """An approval counts only while the policy in force still allows the request (the
    same question it was asked when the request was made): a rule removed or narrowed
    by a reload since cannot be approved around. PERMISSION_DENIED POLICY_CHANGED."""
    access = await ctx.db(ctx.store.get_access_request, request_id)
    if access is None or access.state is not RequestState.PENDING:
        return  # the store gives the precise refusal (not found, not pending)
    policy = _policy_in_force(ctx)

    def ask() -> PolicyDecision | None:
        host = ctx.store.get_host(access.host_id)
        if host is None:
            return None  # the store refuses: the host left the inventory
        query = AccessQuery(
            identity=access.requester,
            host_id=access.host_id,
            host_labels=host.labels,
            port=GuardedPort(
                Protocol(access.protocol), PortRange(access.port_first, access.port_last)
            ),
            ttl=access.ttl,
            sources=tuple(parse_network(s) for s in access.sources),
            source_is_requester=not access.explicit_sources,
            # The request's own grant does not exist yet: the count is what it was
            # asked with, less whatever ended since (the store re-counts under lock).
            active_grants=ctx.store.count_active_grants(access.requester.key, now=now),
            reason=access.reason,
            now=now,
        )
        return policy.decide(query)

    decision = await ctx.db(ask)
    if decision is not None and not decision.allowed:
        raise ApiError(
            "PERMISSION_DENIED",
            "POLICY_CHANGED",
            f"the policy in force no longer allows request {request_id}: {decision.message} "
            "(deny it, or the requester asks again)",
        )


async def _decide(ctx: ApiContext, request: Request, who: Identity, approve: bool) -> Response:
    request_id = _access_request_id(request)
    body = Body(await read_body(request), {"comment"})
    comment = _request_reason(body.text("comment"), "comment", required=False)
    now = ctx.clock()
    if approve:
        await _still_allowed(ctx, request_id, now)
    access, grant = await ctx.db(
        ctx.store.decide_access_request,
        request_id,
        approver=who,
        approve=approve,
        comment=comment,
        keyring=ctx.keyring(),
        now=now,
    )
    ctx.log(
        "request_approved" if approve else "request_denied",
        request_id=request_id,
        approver=who.label,
        state=access.state.value,
        approved=access.approved_count,
        required=access.approvals_required,
    )
    if grant is not None:
        ctx.publish(grant.host_id)
        ctx.metrics.grants_issued.labels(by="request").inc()
        ctx.notify("request.granted", access)
    elif access.state is RequestState.DENIED:
        ctx.notify("request.denied", access)
    else:
        ctx.waiters.changed(request_id)  # one more approval, still pending
    return _request_answer(access, grant, False, now, 200)


async def approve_request(ctx: ApiContext, request: Request, who: Identity) -> Response:
    return await _decide(ctx, request, who, True)


async def deny_request(ctx: ApiContext, request: Request, who: Identity) -> Response:
    return await _decide(ctx, request, who, False)


async def close_request(ctx: ApiContext, request: Request, who: Identity) -> Response:
    request_id = _access_request_id(request)
    Body(await read_body(request), set())
    before = await _visible_request(ctx, who, request_id)
    now = ctx.clock()
    access, grant = await ctx.db(
        ctx.store.close_access_request, request_id, actor=who, now=now, keyring=ctx.keyring()
    )
    if access.state is not before.state:
        if access.state is RequestState.CLOSED:
            if grant is not None and grant.state is GrantState.REVOKED:
                ctx.publish(grant.host_id)
                ctx.metrics.grants_revoked.inc()
            ctx.notify("request.closed", access)
        elif access.state is RequestState.CANCELLED:
            ctx.notify("request.cancelled", access)
        ctx.log("request_closed", request_id=request_id, actor=who.label, state=access.state.value)
    return _request_answer(access, grant, False, now, 200)


async def whoami(ctx: ApiContext, request: Request, who: Identity) -> Response:
    return JSONResponse({"identity": who.to_json()})


async def get_policy(ctx: ApiContext, request: Request, who: Identity) -> Response:
    policy = _policy_in_force(ctx)
    return JSONResponse(
        {
            "digest": policy.digest,
            "source": policy.source,
            "rule_ids": list(policy.rule_ids),
            "rules": [limits_json(r) for r in policy.rules],
        }
    )


async def explain_policy(ctx: ApiContext, request: Request, who: Identity) -> Response:
    obj = await read_body(request)
    policy = _policy_in_force(ctx)
    if "token" in obj:
        token = obj.pop("token")
        if "identity" in obj:
            raise _bad("token", "give either identity or token, not both")
        if not isinstance(token, str) or not looks_like_jwt(token):
            raise _bad("token", "expected an OIDC ID token (a JWT)", "INVALID_TOKEN")
        try:
            identity = await ctx._verify(token)
        except ApiError as exc:
            # The caller (an admin) is authenticated: the token in the body is input.
            raise ApiError(
                "INVALID_ARGUMENT", exc.reason, f"token: {exc.message}", "token"
            ) from None
        obj["identity"] = identity.to_json()
    host_id = obj.get("host")
    if "labels" not in obj and isinstance(host_id, str) and _HOST_ID.fullmatch(host_id):
        host = await ctx.db(ctx.store.get_host, host_id)
        if host is not None:
            obj["labels"] = host.labels
    try:
        query = query_from_json(obj, now=ctx.clock())
    except ValueError as exc:
        message = str(exc)
        match = _FIELD_PREFIX.match(message)
        field = match.group(1) if match else None
        raise ApiError("INVALID_ARGUMENT", "INVALID_QUERY", message[:300], field) from None
    explanation = await ctx.work(policy.explain, query)
    return JSONResponse(explanation_json(explanation))


# (path, method, handler, who may call it): the routes openapi.json describes.
ROUTES: tuple[tuple[str, str, Handler, str], ...] = (
    ("/v1/healthz", "GET", healthz, PUBLIC),
    ("/v1/openapi.json", "GET", openapi, PUBLIC),
    ("/v1/grants", "POST", create_grant, ADMIN),
    ("/v1/grants", "GET", list_grants, ADMIN),
    ("/v1/grants/{grant_id}", "GET", get_grant, ANYONE),  # admins, or the grant's identity
    ("/v1/grants/{grant_id}/revoke", "POST", revoke_grant, ANYONE),  # the same
    ("/v1/hosts", "GET", list_hosts, ADMIN),
    ("/v1/hosts", "POST", add_host, ADMIN),
    ("/v1/hosts/{host_id}", "GET", get_host, ADMIN),
    ("/v1/hosts/{host_id}/labels", "PUT", set_labels, ADMIN),
    ("/v1/hosts/{host_id}", "DELETE", remove_host, ADMIN),
    ("/v1/audit", "GET", audit, ADMIN),
    ("/v1/requests", "POST", create_request, ANYONE),
    ("/v1/requests", "GET", list_requests, ANYONE),
    ("/v1/requests/{request_id}", "GET", get_request, ANYONE),
    ("/v1/requests/{request_id}/approve", "POST", approve_request, ANYONE),
    ("/v1/requests/{request_id}/deny", "POST", deny_request, ANYONE),
    ("/v1/requests/{request_id}/close", "POST", close_request, ANYONE),
    ("/v1/whoami", "GET", whoami, ANYONE),
    ("/v1/policy", "GET", get_policy, ADMIN),
    ("/v1/policy/explain", "POST", explain_policy, ADMIN),
)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def _measured(
    ctx: ApiContext, endpoint: Callable[[Request], Awaitable[Response]], method: str, route: str
) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint, counted and timed under its route template (never the path: ids
    in paths would make a label per grant)."""

    async def measured(request: Request) -> Response:
        start = time.monotonic()
        response = await endpoint(request)
        ctx.metrics.http_request(method, route, response.status_code, time.monotonic() - start)
        return response

    return measured


def _unmatched(
    ctx: ApiContext,
) -> Callable[[Request, Exception], Awaitable[Response]]:
    """404/405 answers, counted under one route label (the method only when it is a
    known one: it is the client's text)."""

    async def handler(request: Request, exc: Exception) -> Response:
        response = await _http_error(request, exc)
        method = request.method if request.method in _METHODS else "other"
        ctx.metrics.http_request(method, UNMATCHED_ROUTE, response.status_code, None)
        return response

    return handler


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 405:
        return error_response(
            ApiError(
                "INVALID_ARGUMENT",
                "METHOD_NOT_ALLOWED",
                f"{request.method} is not allowed on {request.url.path}",
                status=405,
            )
        )
    return error_response(
        ApiError(
            "NOT_FOUND", "NO_SUCH_ROUTE", f"no route {request.url.path[:200]!r}", status=status
        )
    )


def build_app(ctx: ApiContext) -> Starlette:
    routes = [
        Route(
            path,
            _measured(ctx, _endpoint(ctx, handler, access=access), method, path),
            methods=[method],
            name=f"{method} {path}",
        )
        for path, method, handler, access in ROUTES
    ]
    unmatched = _unmatched(ctx)
    return Starlette(routes=routes, exception_handlers={404: unmatched, 405: unmatched})


async def maintenance(ctx: ApiContext, stop: asyncio.Event) -> None:
    """Expire due grants and pending access requests every few seconds (audited once,
    whichever replica wins; that replica sends the request.expired webhooks) and prune
    the change log now and then."""
    last_prune = 0.0
    while not stop.is_set():
        now = ctx.clock()
        try:
            expired = await ctx.db(ctx.store.expire_due, now=now)
            if expired:
                ctx.metrics.grants_expired.inc(expired)
                ctx.log("grants_expired", count=expired)
            for access in await ctx.db(ctx.store.expire_access_requests, now=now):
                ctx.log("request_expired", request_id=access.request_id, host_id=access.host_id)
                ctx.notify("request.expired", access)
            if now - last_prune >= PRUNE_EVERY:
                pruned = await ctx.db(ctx.store.prune_changes, now - CHANGE_RETENTION)
                last_prune = now
                if pruned:
                    ctx.log("changes_pruned", count=pruned)
        except Exception as exc:  # the database may be down for a while: keep trying
            ctx.log("maintenance_failed", error=repr(exc)[:300])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), EXPIRE_EVERY)
