"""The broker's store: the fleet's desired state, its change log and the audit chain,
in SQLite (one file, the default) or PostgreSQL (several replicas), through
SQLAlchemy Core (docs/adr/0007-broker-service.md).

Every write is one short transaction that also appends its audit record(s), so a
broker killed mid-request loses all of a change or none of it. Writers serialise:
SQLite through `BEGIN IMMEDIATE` (its one write lock), PostgreSQL through the host
row (`FOR UPDATE`) for generations and an advisory transaction lock for the audit
chain, which every transaction takes *last* (after all its row locks) so it can never
be part of a lock cycle. Lock order everywhere: identity (advisory, request creation
only) -> host row -> access request row -> grant row -> audit. Values are checked on
the way in and parsed, typed, once on the way out: a damaged row is a StoreError
here, not a crash somewhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy
from sqlalchemy import (
    and_,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.pool import QueuePool

from portagent.broker.fleet import schema
from portagent.broker.fleet.audit import GENESIS, canonical_json, record_hash
from portagent.broker.fleet.keyring import KeyRing
from portagent.broker.fleet.model import (
    AccessRequest,
    Approval,
    AuditRecord,
    BrokerGrant,
    Change,
    ChangeKind,
    FleetError,
    FleetFigures,
    GrantState,
    Host,
    RequestState,
    StoreError,
    Usage,
    UsageRow,
)
from portagent.broker.identity.model import MAX_GROUPS, Identity, IdentityKind
from portagent.broker.policy.model import PolicyDecision
from portagent.broker.settings import HOST_ID_PATTERN
from portagent.broker.signing import GrantRequest
from portagent.v1 import agent_pb2 as pb
from portagent.wire.codec import PROTOCOL_FROM_PB
from portagent.wire.envelope import (
    GRANT_ID_PATTERN,
    MAX_CONNECTIONS_LIMIT,
    MAX_REASON_LENGTH,
    MAX_SOURCES,
    MAX_SUBJECT_LENGTH,
)
from portagent.wire.ports import GuardedPort, PortRange, Protocol
from portagent.wire.sources import parse_network
from portagent.wire.timestamps import seconds_of

T = TypeVar("T")
# Row is generic in 1.4 and variadic in 2.x: one alias for both.
_Row = Any

NOTIFY_CHANNEL = "portagent_changes"
# pg_advisory_xact_lock keys: arbitrary constants of this application ("port" in ASCII).
AUDIT_LOCK_KEY = 0x706F7274
MIGRATION_LOCK_KEY = 0x706F7275
# pg_advisory_xact_lock(int4, int4) class of the per-identity locks (the two-key form
# never collides with the one-key locks above).
IDENTITY_LOCK_CLASS = 0x70617269

MAX_LABELS = 64
LABEL_KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9._/-]{0,62}")
MAX_LABEL_VALUE = 253
MAX_LIST = 10_000
MAX_ACTOR = 256
MAX_ACTION = 32
MAX_VERSION = 128
MAX_KEY_IDS = 32
MAX_KEY_ID = 128
MAX_REPLICA = 128
MAX_REQUEST_ID = 128
MAX_DETAIL_BYTES = 64 * 1024
MAX_TEXT_IN_DETAIL = 1024
MAX_USAGE_ROWS = 10_000
MAX_INT64 = 2**63 - 1
EXPIRE_BATCH = 1000
# Access requests (ADR 0008).
REQUEST_ID_PATTERN = re.compile(r"r-[0-9a-f]{16}")
CLIENT_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_REQUEST_REASON = 256
MAX_COMMENT = 256
MAX_RULE = 256
MAX_GROUP = 256
MAX_IDENTITY_TEXT = 512  # an identity's issuer / subject (the columns' size)
MAX_IDENTITY_JSON = 64 * 1024
MAX_APPROVALS = 1000  # votes read back per request (a threshold is a handful)
MAX_PENDING_TTL = 30 * 86400.0
CLOSED_REASON = "closed by requester"
# Deadlocks and serialisation failures are retried; anything else is the caller's.
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})
_WRITE_ATTEMPTS = 3
WRITE_LOCK_TIMEOUT = 30.0


@dataclass(frozen=True)
class SignedGrantRow:
    """One grant of a host's desired set, as signed: what a snapshot carries."""

    grant_id: str
    grant_bytes: bytes
    signature: bytes
    key_id: str


# ---------------------------------------------------------------- input checks


def _invalid(reason: str, field: str, message: str) -> FleetError:
    return FleetError("INVALID_ARGUMENT", reason, f"{field}: {message}", field=field)


def check_host_id(host_id: str, field: str = "host_id") -> str:
    if not isinstance(host_id, str) or not HOST_ID_PATTERN.fullmatch(host_id):
        raise _invalid("INVALID_HOST", field, f"{host_id!r} is not 1-253 of [A-Za-z0-9._-]")
    return host_id


def check_labels(labels: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    """At most 64 labels; keys [a-z0-9][a-z0-9._/-]{0,62}; values printable, <= 253."""
    if not isinstance(labels, Mapping):
        raise _invalid("INVALID_LABELS", field, "expected a mapping of label names to values")
    if len(labels) > MAX_LABELS:
        raise _invalid("INVALID_LABELS", field, f"{len(labels)} labels, at most {MAX_LABELS}")
    checked: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY_PATTERN.fullmatch(key):
            raise _invalid(
                "INVALID_LABELS", field, f"label name {key!r} is not [a-z0-9][a-z0-9._/-]{{0,62}}"
            )
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or not value.isprintable():
            raise _invalid(
                "INVALID_LABELS",
                field,
                f"label {key!r}: value must be printable text "
                f"of at most {MAX_LABEL_VALUE} characters",
            )
        checked[key] = value
    return dict(sorted(checked.items()))


def _check_text(value: object, field: str, limit: int, *, required: bool = False) -> str:
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise _invalid(
            "INVALID_ARGUMENT", field, f"must be printable text of at most {limit} characters"
        )
    if required and not value.strip():
        raise _invalid("INVALID_ARGUMENT", field, "required and must not be blank")
    return value


def _check_time(value: object, field: str = "now") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid("INVALID_ARGUMENT", field, f"{value!r} is not a finite POSIX time")
    return float(value)


def _check_count(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT64:
        raise _invalid("INVALID_ARGUMENT", field, f"{value!r} is not an integer from 0 to 2^63-1")
    return value


def _check_key_ids(ids: Sequence[str]) -> tuple[str, ...]:
    if isinstance(ids, str) or len(ids) > MAX_KEY_IDS:
        raise _invalid("INVALID_ARGUMENT", "trusted_key_ids", f"at most {MAX_KEY_IDS} key ids")
    return tuple(_check_text(i, "trusted_key_ids", MAX_KEY_ID, required=True) for i in ids)


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
        raise _invalid("INVALID_ARGUMENT", "limit", f"{limit!r} is not 1 to {MAX_LIST}")
    return limit


def _clip(text: str) -> str:
    """Agent-supplied text in audit details: bounded, never refused (it is evidence)."""
    return text if len(text) <= MAX_TEXT_IN_DETAIL else text[:MAX_TEXT_IN_DETAIL] + "…"


def _detail_json(detail: Mapping[str, object] | None) -> tuple[str, dict[str, object]]:
    """The canonical text stored and the value hashed: the value is the text parsed
    back, so the hash is over exactly what a reader of the row will see."""
    try:
        body = canonical_json(dict(detail or {}))
    except (TypeError, ValueError) as exc:
        raise _invalid("INVALID_ARGUMENT", "detail", f"not JSON data: {exc}") from None
    if len(body.encode("utf-8")) > MAX_DETAIL_BYTES:
        raise _invalid("INVALID_ARGUMENT", "detail", f"larger than {MAX_DETAIL_BYTES} bytes")
    value = json.loads(body)
    assert isinstance(value, dict)
    return body, value


def request_fingerprint(request: GrantRequest, actor: str) -> str:
    """What makes two requests with one request_id "the same request"."""
    body = canonical_json(
        {
            "actor": actor,
            "host_id": request.host_id,
            "subject": request.subject,
            "sources": [str(n) for n in request.sources],
            "port": str(request.port),
            "ttl": request.ttl,
            "reason": request.reason,
            "keep_established": request.keep_established,
            "max_connections": request.max_connections,
        }
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _check_identity(identity: object, field: str) -> tuple[Identity, str]:
    """A verified Identity (built by a verifier, never from free text) and its JSON,
    bounded by the store's columns. A wrong type is the caller's bug: ValueError."""
    if not isinstance(identity, Identity):
        raise ValueError(f"{field} must be an Identity, not {type(identity).__name__}")
    for name, value in (("issuer", identity.issuer), ("subject", identity.subject)):
        if not value or len(value) > MAX_IDENTITY_TEXT:
            raise _invalid(
                "INVALID_ARGUMENT",
                field,
                f"the identity's {name} must be 1-{MAX_IDENTITY_TEXT} characters",
            )
    try:
        body = canonical_json(identity.to_json())
    except (TypeError, ValueError) as exc:
        raise _invalid("INVALID_ARGUMENT", field, f"the identity is not JSON data: {exc}") from None
    if len(body.encode("utf-8")) > MAX_IDENTITY_JSON:
        raise _invalid("INVALID_ARGUMENT", field, f"the identity is over {MAX_IDENTITY_JSON} bytes")
    return identity, body


def _check_client_request_id(value: object) -> str:
    if not isinstance(value, str) or not CLIENT_REQUEST_ID_PATTERN.fullmatch(value):
        raise _invalid("INVALID_ARGUMENT", "request_id", f"{value!r} is not 1-64 of [A-Za-z0-9._-]")
    return value


def _check_request_id(value: object) -> str:
    if not isinstance(value, str) or not REQUEST_ID_PATTERN.fullmatch(value):
        raise _invalid(
            "INVALID_ARGUMENT", "request_id", f"{value!r} is not r- and 16 hexadecimal digits"
        )
    return value


def access_request_fingerprint(requester: Identity, request: GrantRequest) -> str:
    """What makes two access requests with one client request id "the same request":
    the body, not the policy's answer (which a reload may change)."""
    body = canonical_json(
        {
            "requester": list(requester.key),
            "host_id": request.host_id,
            "sources": [str(n) for n in request.sources],
            "port": str(request.port),
            "ttl": request.ttl,
            "reason": request.reason,
            "keep_established": request.keep_established,
            "max_connections": request.max_connections,
        }
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _identity_lock_key(key: tuple[str, str]) -> int:
    """A signed 32-bit number for pg_advisory_xact_lock(int4, int4): two identities
    sharing one only wait for each other, never count each other's grants."""
    digest = hashlib.sha256(canonical_json(list(key)).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


# ---------------------------------------------------------------- row parsing


class _RowReader:
    """Typed access to one row; a wrong type names the table, key and column."""

    def __init__(self, row: _Row, table: str, key_column: str) -> None:
        self._m: Mapping[str, Any] = row if isinstance(row, Mapping) else row._mapping
        self.where = f"{table} row {self._m.get(key_column)!r}"

    def _bad(self, column: str, expected: str) -> StoreError:
        value = self._m.get(column)
        return StoreError(
            f"{self.where}: column {column} holds {type(value).__name__}, expected {expected}"
        )

    def text(self, column: str, limit: int = 1 << 20) -> str:
        value = self._m[column]
        if not isinstance(value, str) or len(value) > limit:
            raise self._bad(column, f"text of at most {limit} characters")
        return value

    def opt_text(self, column: str) -> str | None:
        return None if self._m[column] is None else self.text(column)

    def integer(self, column: str) -> int:
        value = self._m[column]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT64:
            raise self._bad(column, "a non-negative 64-bit integer")
        return value

    def number(self, column: str) -> float:
        value = self._m[column]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self._bad(column, "a finite number")
        return float(value)

    def opt_number(self, column: str) -> float | None:
        return None if self._m[column] is None else self.number(column)

    def bytes(self, column: str) -> bytes:
        value = self._m[column]
        if isinstance(value, memoryview):
            value = value.tobytes()
        if not isinstance(value, bytes):
            raise self._bad(column, "bytes")
        return value

    def json(self, column: str) -> object:
        try:
            return json.loads(self.text(column))
        except ValueError:
            raise self._bad(column, "JSON text") from None

    def labels(self, column: str) -> dict[str, str]:
        value = self.json(column)
        if not isinstance(value, dict):
            raise self._bad(column, "a JSON object of labels")
        try:
            return check_labels(value, column)
        except FleetError as exc:
            raise StoreError(f"{self.where}: {exc.message}") from None

    def boolean(self, column: str) -> bool:
        value = self._m[column]
        # SQLite hands back 0/1 where no type processing ran (raw rows).
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise self._bad(column, "a boolean")

    def identity(self, column: str) -> Identity:
        value = self.json(column)
        if not isinstance(value, dict):
            raise self._bad(column, "a JSON identity object")
        try:
            return Identity.from_json(value)
        except ValueError as exc:
            raise StoreError(f"{self.where}: column {column}: {exc}") from None

    def opt_identity(self, column: str) -> Identity | None:
        return None if self._m.get(column) is None else self.identity(column)

    def str_list(self, column: str, limit: int) -> tuple[str, ...]:
        value = self.json(column)
        if (
            not isinstance(value, list)
            or len(value) > limit
            or not all(isinstance(v, str) for v in value)
        ):
            raise self._bad(column, f"a JSON list of at most {limit} strings")
        return tuple(value)


def _host_from_row(row: _Row) -> Host:
    r = _RowReader(row, "hosts", "host_id")
    return Host(
        host_id=r.text("host_id", 253),
        broker_labels=r.labels("broker_labels"),
        agent_labels=r.labels("agent_labels"),
        agent_version=r.text("agent_version", MAX_VERSION),
        trusted_key_ids=r.str_list("trusted_key_ids", MAX_KEY_IDS),
        generation=r.integer("generation"),
        acked_generation=r.integer("acked_generation"),
        connected_since=r.opt_number("connected_since"),
        replica=r.text("replica", MAX_REPLICA),
        last_seen=r.opt_number("last_seen"),
        created_at=r.number("created_at"),
    )


_GRANT_STATES = {s.value: s for s in GrantState}


def _grant_from_row(row: _Row) -> BrokerGrant:
    r = _RowReader(row, "grants", "grant_id")
    state_text = r.text("state", 8)
    if state_text not in _GRANT_STATES:
        raise StoreError(f"{r.where}: unknown state {state_text!r}")
    protocol = r.text("protocol", 3)
    if protocol not in ("tcp", "udp"):
        raise StoreError(f"{r.where}: unknown protocol {protocol!r}")
    port_first, port_last = r.integer("port_first"), r.integer("port_last")
    if not 1 <= port_first <= port_last <= 65535:
        raise StoreError(f"{r.where}: bad port range {port_first}-{port_last}")
    return BrokerGrant(
        grant_id=r.text("grant_id", 64),
        host_id=r.text("host_id", 253),
        subject=r.text("subject", MAX_SUBJECT_LENGTH),
        sources=r.str_list("sources", 64),
        protocol=protocol,
        port_first=port_first,
        port_last=port_last,
        not_before=r.number("not_before"),
        expire_time=r.number("expire_time"),
        issue_time=r.number("issue_time"),
        reason=r.text("reason", MAX_REASON_LENGTH),
        key_id=r.text("key_id", MAX_KEY_ID),
        grant_bytes=r.bytes("grant_bytes"),
        signature=r.bytes("signature"),
        state=_GRANT_STATES[state_text],
        created_by=r.text("created_by", MAX_ACTOR),
        generation=r.integer("generation"),
        request_id=r.opt_text("request_id"),
        revoked_at=r.opt_number("revoked_at"),
        revoked_by=r.opt_text("revoked_by"),
        revoke_reason=r.opt_text("revoke_reason"),
        usage=Usage(
            connections=r.integer("usage_connections"),
            packets=r.integer("usage_packets"),
            bytes=r.integer("usage_bytes"),
            last_seen=r.opt_number("usage_last_seen"),
        ),
        identity=r.opt_identity("identity"),
        access_request_id=r.opt_text("access_request_id"),
    )


_REQUEST_STATES = {s.value: s for s in RequestState}


def _approval_from_row(row: _Row) -> Approval:
    r = _RowReader(row, "request_approvals", "request_id")
    return Approval(
        approver=r.identity("approver"),
        approve=r.boolean("approve"),
        time=r.number("time"),
        comment=r.text("comment", MAX_COMMENT),
    )


def _request_from_row(row: _Row, approvals: Sequence[Approval] = ()) -> AccessRequest:
    r = _RowReader(row, "access_requests", "request_id")
    state_text = r.text("state", 16)
    if state_text not in _REQUEST_STATES:
        raise StoreError(f"{r.where}: unknown state {state_text!r}")
    protocol = r.text("protocol", 3)
    if protocol not in ("tcp", "udp"):
        raise StoreError(f"{r.where}: unknown protocol {protocol!r}")
    port_first, port_last = r.integer("port_first"), r.integer("port_last")
    if not 1 <= port_first <= port_last <= 65535:
        raise StoreError(f"{r.where}: bad port range {port_first}-{port_last}")
    ttl = r.number("ttl")
    if not ttl > 0:
        raise StoreError(f"{r.where}: ttl {ttl} is not positive")
    requester = r.identity("requester")
    if requester.key != (r.text("requester_issuer"), r.text("requester_subject")):
        raise StoreError(f"{r.where}: requester does not match requester_issuer/_subject")
    return AccessRequest(
        request_id=r.text("request_id", 32),
        requester=requester,
        host_id=r.text("host_id", 253),
        protocol=protocol,
        port_first=port_first,
        port_last=port_last,
        sources=r.str_list("sources", MAX_SOURCES),
        ttl=ttl,
        reason=r.text("reason", MAX_REQUEST_REASON),
        rule=r.text("rule", MAX_RULE),
        approvals_required=r.integer("approvals_required"),
        approvers=r.text("approvers", MAX_GROUP),
        state=_REQUEST_STATES[state_text],
        created_at=r.number("created_at"),
        expires_at=r.number("expires_at"),
        decided_at=r.opt_number("decided_at"),
        approvals=tuple(approvals),
        grant_id=r.opt_text("grant_id"),
        client_request_id=r.opt_text("client_request_id"),
        explicit_sources=r.boolean("explicit_sources"),
    )


def _grant_request_of(row: _Row) -> GrantRequest:
    """The grant an approved request makes: the request's own values, read back
    through the same parses the API used (a damaged row is a StoreError)."""
    request = _request_from_row(row)
    r = _RowReader(row, "access_requests", "request_id")
    max_connections = r.integer("max_connections")
    if max_connections > MAX_CONNECTIONS_LIMIT:
        raise StoreError(f"{r.where}: max_connections {max_connections} is over the limit")
    try:
        sources = tuple(parse_network(text) for text in request.sources)
        port = GuardedPort(
            Protocol(request.protocol), PortRange(request.port_first, request.port_last)
        )
    except ValueError as exc:
        raise StoreError(f"{r.where}: {exc}") from None
    if not sources:
        raise StoreError(f"{r.where}: column sources is empty")
    return GrantRequest(
        host_id=request.host_id,
        subject=request.requester.label,
        sources=sources,
        port=port,
        ttl=request.ttl,
        reason=request.reason,
        keep_established=r.boolean("keep_established"),
        max_connections=max_connections,
    )


_CHANGE_KINDS = {k.value: k for k in ChangeKind}


def _change_from_row(row: _Row) -> Change:
    r = _RowReader(row, "changes", "generation")
    kind = r.text("kind", 16)
    if kind not in _CHANGE_KINDS:
        raise StoreError(f"{r.where}: unknown kind {kind!r}")
    return Change(
        host_id=r.text("host_id", 253),
        generation=r.integer("generation"),
        kind=_CHANGE_KINDS[kind],
        grant_id=r.text("grant_id", 64),
        payload=r.bytes("payload"),
        signature=r.bytes("signature"),
        key_id=r.text("key_id", MAX_KEY_ID),
        created_at=r.number("created_at"),
    )


def _audit_from_row(row: _Row) -> AuditRecord:
    r = _RowReader(row, "audit", "seq")
    detail = r.json("detail")
    if not isinstance(detail, dict):
        raise StoreError(f"{r.where}: detail is not a JSON object")
    return AuditRecord(
        seq=r.integer("seq"),
        time=r.number("time"),
        actor=r.text("actor", MAX_ACTOR),
        action=r.text("action", MAX_ACTION),
        host_id=r.text("host_id", 253),
        grant_id=r.text("grant_id", 64),
        reason=r.text("reason"),
        detail=detail,
        prev_hash=r.text("prev_hash", 64),
        hash=r.text("hash", 64),
    )


def _labels_match(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())


# ---------------------------------------------------------------- engine set-up


# SQLAlchemy has a psycopg 3 dialect from 2.0 on; Debian 12's SQLAlchemy 1.4 reaches
# PostgreSQL through psycopg2 (python3-psycopg2). The SQL is the same either way.
POSTGRESQL_DRIVER = (
    "postgresql+psycopg"
    if int(sqlalchemy.__version__.split(".")[0]) >= 2
    else "postgresql+psycopg2"
)


def normalise_url(url: str) -> URL:
    """sqlite:///file or postgresql[+psycopg|+psycopg2]://... (the driver this
    SQLAlchemy has: POSTGRESQL_DRIVER); StoreError for anything else."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StoreError(
            f"{url!r} is not a database URL (sqlite:///PATH or postgresql://...)"
        ) from None
    driver = parsed.drivername
    if driver in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"):
        return parsed.set(drivername=POSTGRESQL_DRIVER)
    if driver in ("sqlite", "sqlite+pysqlite"):
        database = parsed.database or ""
        if not database or database == ":memory:" or database.startswith("file:"):
            raise StoreError(f"{url!r}: the SQLite store needs a file path (sqlite:///PATH)")
        return parsed.set(drivername="sqlite+pysqlite")
    raise StoreError(f"{url!r}: unsupported database (sqlite:///PATH or postgresql://...)")


def _create_private(path: str | None) -> None:
    """A new database file is created 0600 whatever the umask: it holds every grant.
    SQLite gives its -wal and -shm files the database file's mode."""
    if not path:
        return
    with contextlib.suppress(OSError):
        # It exists, or its directory is missing or not writable: opening it next
        # reports that by name.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _sqlite_engine(url: URL, pool_size: int, max_overflow: int) -> Engine:
    _create_private(url.database)
    engine = create_engine(
        url,
        future=True,
        # SQLAlchemy 1.4 gives file databases a NullPool (a new connection and its
        # PRAGMAs per call); a pool keeps them, as 2.x does by default.
        poolclass=QueuePool,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=30,
        connect_args={"check_same_thread": False, "timeout": 5.0},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling begins deferred transactions lazily, which
        # fail to upgrade to writers under concurrency; take control (SQLAlchemy's
        # documented recipe) and begin every write with BEGIN IMMEDIATE below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in (
                "busy_timeout=5000",
                "journal_mode=WAL",
                "synchronous=NORMAL",
                "foreign_keys=ON",
            ):
                cursor.execute(f"PRAGMA {pragma}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get("portagent_sqlite_begin", "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _postgresql_engine(url: URL, pool_size: int, max_overflow: int, replica: str) -> Engine:
    return create_engine(
        url,
        future=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=30,
        # A restarted server leaves dead connections in the pool: test on checkout.
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": 5,
            "application_name": f"portagent-broker {replica}".strip()[:63],
            # Bounded waits: a stuck lock or statement fails the request, not the broker.
            "options": "-c lock_timeout=10000 -c statement_timeout=60000",
        },
    )


def _migrations_config(connection: Connection) -> Any:
    from alembic.config import Config

    from portagent.broker.fleet import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine, is_postgresql: bool) -> str:
    """Bring the schema to head; StoreError if the database holds a revision this code
    does not know (a newer broker migrated it). Returns the head revision."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.connect() as connection:
        if is_postgresql:
            # Two replicas starting at once: one migrates, the other waits and finds head.
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            connection.commit()
        try:
            config = _migrations_config(connection)
            script = ScriptDirectory.from_config(config)
            head = script.get_current_head()
            assert head is not None
            current = MigrationContext.configure(connection).get_current_revision()
            connection.commit()
            if current is not None:
                known = {rev.revision for rev in script.walk_revisions()}
                if current not in known:
                    raise StoreError(
                        f"schema revision {current!r} is newer than this broker knows "
                        f"(its head is {head!r}): upgrade the broker"
                    )
            if current != head:
                command.upgrade(config, "head")
                connection.commit()
            return head
        finally:
            if is_postgresql:
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
                connection.commit()


# ---------------------------------------------------------------- the store


# Hot-path statements built once: SQLAlchemy caches their compiled form, and building
# a statement per call (literal values, fresh bind parameters) cost more CPU than the
# database did. Bind names carry a p_ prefix: column names are reserved in SET/VALUES.
_H = schema.hosts.c
_SEL_HOST = select(schema.hosts).where(_H.host_id == bindparam("p_host"), _H.removed_at.is_(None))
_SEL_HOST_FOR_UPDATE = _SEL_HOST.with_for_update()
_SET_GENERATION = (
    update(schema.hosts)
    .where(_H.host_id == bindparam("p_host"))
    .values(generation=bindparam("p_generation"))
)
_CONNECT = (
    update(schema.hosts)
    .where(_H.host_id == bindparam("p_host"), _H.removed_at.is_(None))
    .values(
        agent_version=bindparam("p_version"),
        agent_labels=bindparam("p_labels"),
        trusted_key_ids=bindparam("p_key_ids"),
        acked_generation=bindparam("p_generation"),
        connected_since=bindparam("p_now"),
        replica=bindparam("p_replica"),
        last_seen=bindparam("p_now"),
    )
)
_ACK = (
    update(schema.hosts)
    .where(_H.host_id == bindparam("p_host"), _H.removed_at.is_(None))
    .values(acked_generation=bindparam("p_generation"), last_seen=bindparam("p_now"))
)
_SEEN = (
    update(schema.hosts)
    .where(_H.host_id == bindparam("p_host"))
    .values(last_seen=bindparam("p_now"))
)
_SEL_GRANT = select(schema.grants).where(schema.grants.c.grant_id == bindparam("p_grant"))
_SEL_GRANT_FOR_UPDATE = _SEL_GRANT.with_for_update()
_SEL_REQUEST = select(schema.grants).where(schema.grants.c.request_id == bindparam("p_request"))
_INSERT_GRANT = insert(schema.grants)
_INSERT_CHANGE = insert(schema.changes)
_INSERT_AUDIT = insert(schema.audit)
_AUDIT_HEAD = (
    select(schema.audit.c.seq, schema.audit.c.hash).order_by(schema.audit.c.seq.desc()).limit(1)
)
_AUDIT_LOCK = text("SELECT pg_advisory_xact_lock(:k)")
_NOTIFY = text("SELECT pg_notify(:c, :h)")
# psycopg 3 may send a small int as int8, and only (int4, int4) has this overload.
_IDENTITY_LOCK = text("SELECT pg_advisory_xact_lock(CAST(:c AS integer), CAST(:k AS integer))")


@dataclass
class _Audit:
    actor: str
    action: str
    host_id: str = ""
    grant_id: str = ""
    reason: str = ""
    detail: Mapping[str, object] | None = None


class FleetStore:
    """Thread-safe: every method takes a pooled connection for one transaction."""

    def __init__(self, engine: Engine, url: URL, *, replica: str) -> None:
        self._engine = engine
        self.is_postgresql = url.get_backend_name() == "postgresql"
        # Reads on SQLite begin deferred: WAL readers see one snapshot and never queue
        # behind the write lock.
        self._read_engine = (
            engine
            if self.is_postgresql
            else engine.execution_options(portagent_sqlite_begin="DEFERRED")
        )
        self.url = url.render_as_string(hide_password=True)
        self._url = url
        self.replica = replica
        # SQLite: writers of this process queue here (FIFO-ish, no polling) rather than
        # in SQLite's busy handler, which sleeps and retries and starves some waiters
        # past busy_timeout when many threads write at once. Other processes still
        # meet busy_timeout.
        self._write_lock = None if self.is_postgresql else threading.Lock()
        # PostgreSQL: this process's threads take the audit lock in turn here before
        # asking the server for it, and keep it to COMMIT. Without it, the thread
        # holding the server's lock competes for the GIL with every waiting thread
        # between its round trips, and the lock's hold time (so the whole broker's
        # write rate) grows with the number of threads.
        self._audit_mutex = threading.Lock()
        self._audit_held = threading.local()
        self._listeners: list[Callable[[str], None]] = []
        self._listeners_lock = threading.Lock()

    @classmethod
    def open(
        cls, url: str, *, replica: str = "", pool_size: int = 5, max_overflow: int = 20
    ) -> FleetStore:
        parsed = normalise_url(url)
        shown = parsed.render_as_string(hide_password=True)
        if len(replica) > MAX_REPLICA or not replica.isprintable():
            raise StoreError(f"replica name must be printable, at most {MAX_REPLICA} characters")
        is_pg = parsed.get_backend_name() == "postgresql"
        try:
            engine = (
                _postgresql_engine(parsed, pool_size, max_overflow, replica)
                if is_pg
                else _sqlite_engine(parsed, pool_size, max_overflow)
            )
        except (ArgumentError, ImportError, ValueError) as exc:
            raise StoreError(f"database {shown}: {exc}") from None
        try:
            migrate(engine, is_pg)
        except StoreError as exc:
            engine.dispose()
            raise StoreError(f"database {shown}: {exc}") from None
        except (SQLAlchemyError, OSError) as exc:
            engine.dispose()
            raise StoreError(f"database {shown}: {_one_line(exc)}") from None
        return cls(engine, parsed, replica=replica)

    def close(self) -> None:
        self._engine.dispose()

    @property
    def listen_conninfo(self) -> str:
        """A libpq connection string for psycopg.connect (the LISTEN connection)."""
        return self._url.set(drivername="postgresql").render_as_string(hide_password=False)

    def add_change_listener(self, callback: Callable[[str], None]) -> None:
        """Called with a host id after a commit that changed its generation, in the
        committing thread (the in-process bus; PostgreSQL also NOTIFYs other replicas)."""
        with self._listeners_lock:
            self._listeners.append(callback)

    def _changed(self, host_id: str) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for callback in listeners:
            callback(host_id)

    # ------------------------------------------------------------ transactions

    def _write(self, work: Callable[[Connection], T], *, retry_integrity: bool = False) -> T:
        if self._write_lock is None:
            return self._write_once(work, retry_integrity)
        if not self._write_lock.acquire(timeout=WRITE_LOCK_TIMEOUT):
            raise StoreError(
                f"database {self.url}: no write slot within {WRITE_LOCK_TIMEOUT:.0f}s (overloaded)"
            )
        try:
            return self._write_once(work, retry_integrity)
        finally:
            self._write_lock.release()

    def _write_once(self, work: Callable[[Connection], T], retry_integrity: bool) -> T:
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                try:
                    with self._engine.begin() as connection:
                        return work(connection)
                finally:
                    if getattr(self._audit_held, "held", False):
                        self._audit_held.held = False
                        self._audit_mutex.release()
            except IntegrityError as exc:
                if retry_integrity and attempt < _WRITE_ATTEMPTS:
                    continue  # a concurrent writer won a unique key: look again
                raise StoreError(f"database {self.url}: {_one_line(exc)}") from None
            except DBAPIError as exc:
                # psycopg 3 names it sqlstate, psycopg2 pgcode.
                code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
                if code in _RETRY_SQLSTATES and attempt < _WRITE_ATTEMPTS:
                    time.sleep(0.005 * attempt)
                    continue
                raise StoreError(f"database {self.url}: {_one_line(exc)}") from None
            except SQLAlchemyError as exc:
                raise StoreError(f"database {self.url}: {_one_line(exc)}") from None
        raise AssertionError("unreachable")

    def _read(self, work: Callable[[Connection], T]) -> T:
        try:
            with self._read_engine.begin() as connection:
                return work(connection)
        except SQLAlchemyError as exc:
            raise StoreError(f"database {self.url}: {_one_line(exc)}") from None

    def _append_audit(self, connection: Connection, entries: Sequence[_Audit], now: float) -> None:
        """Append to the chain; callers do this last in their transaction (lock order)."""
        if not entries:
            return
        if self.is_postgresql:
            if not getattr(self._audit_held, "held", False):
                if not self._audit_mutex.acquire(timeout=WRITE_LOCK_TIMEOUT):
                    raise StoreError(
                        f"database {self.url}: no audit slot within {WRITE_LOCK_TIMEOUT:.0f}s"
                    )
                self._audit_held.held = True  # released by _write_once after COMMIT
            connection.execute(_AUDIT_LOCK, {"k": AUDIT_LOCK_KEY})
        last = connection.execute(_AUDIT_HEAD).first()
        seq, prev = (int(last.seq), str(last.hash)) if last is not None else (0, GENESIS)
        rows = []
        for entry in entries:
            seq += 1
            body, detail = _detail_json(entry.detail)
            fields: dict[str, object] = {
                "seq": seq,
                "time": now,
                "actor": _check_text(entry.actor, "actor", MAX_ACTOR, required=True),
                "action": _check_text(entry.action, "action", MAX_ACTION, required=True),
                "host_id": entry.host_id,
                "grant_id": entry.grant_id,
                "reason": _check_text(entry.reason, "reason", MAX_REASON_LENGTH),
                "detail": detail,
            }
            digest = record_hash(prev, fields)
            rows.append({**fields, "detail": body, "prev_hash": prev, "hash": digest})
            prev = digest
        connection.execute(_INSERT_AUDIT, rows)

    def _notify(self, connection: Connection, host_id: str) -> None:
        if self.is_postgresql:
            # Inside the transaction: PostgreSQL delivers it exactly when this commits.
            connection.execute(_NOTIFY, {"c": NOTIFY_CHANNEL, "h": host_id})

    def _lock_host(self, connection: Connection, host_id: str, field: str = "host_id") -> Host:
        row = connection.execute(_SEL_HOST_FOR_UPDATE, {"p_host": host_id}).first()
        if row is None:
            raise FleetError(
                "NOT_FOUND", "UNKNOWN_HOST", f"host {host_id!r} is not in the inventory", field
            )
        return _host_from_row(row)

    def _get_host(self, connection: Connection, host_id: str) -> Host | None:
        row = connection.execute(_SEL_HOST, {"p_host": host_id}).first()
        return None if row is None else _host_from_row(row)

    # ------------------------------------------------------------ inventory

    def add_host(self, host_id: str, labels: Mapping[str, str], *, actor: str, now: float) -> Host:
        check_host_id(host_id)
        checked = check_labels(labels)
        _check_text(actor, "actor", MAX_ACTOR, required=True)
        now = _check_time(now)

        def work(connection: Connection) -> Host:
            existing = connection.execute(
                select(schema.hosts).where(schema.hosts.c.host_id == host_id).with_for_update()
            ).first()
            values = {
                "broker_labels": canonical_json(checked),
                "agent_labels": "{}",
                "agent_version": "",
                "trusted_key_ids": "[]",
                "acked_generation": 0,
                "connected_since": None,
                "replica": "",
                "last_seen": None,
                "created_at": now,
                "removed_at": None,
            }
            detail: dict[str, object] = {"labels": checked}
            if existing is None:
                connection.execute(
                    insert(schema.hosts).values(host_id=host_id, generation=0, **values)
                )
            else:
                old = _RowReader(existing, "hosts", "host_id")
                if existing.removed_at is None:
                    raise FleetError(
                        "ALREADY_EXISTS",
                        "HOST_EXISTS",
                        f"host {host_id!r} is already in the inventory",
                        "host_id",
                    )
                # Re-added: generations continue, so its agent accepts what comes next.
                connection.execute(
                    update(schema.hosts).where(schema.hosts.c.host_id == host_id).values(**values)
                )
                detail["generation"] = old.integer("generation")
            self._append_audit(
                connection, [_Audit(actor, "add_host", host_id=host_id, detail=detail)], now
            )
            host = self._get_host(connection, host_id)
            assert host is not None
            return host

        # Two admins adding one host at once: the loser's insert fails on the key and
        # its retry finds the row (HOST_EXISTS).
        return self._write(work, retry_integrity=True)

    def set_host_labels(
        self, host_id: str, labels: Mapping[str, str], *, actor: str, now: float
    ) -> Host:
        check_host_id(host_id)
        checked = check_labels(labels)
        _check_text(actor, "actor", MAX_ACTOR, required=True)
        now = _check_time(now)

        def work(connection: Connection) -> Host:
            host = self._lock_host(connection, host_id)
            connection.execute(
                update(schema.hosts)
                .where(schema.hosts.c.host_id == host_id)
                .values(broker_labels=canonical_json(checked))
            )
            self._append_audit(
                connection,
                [
                    _Audit(
                        actor,
                        "set_labels",
                        host_id=host_id,
                        detail={"before": host.broker_labels, "after": checked},
                    )
                ],
                now,
            )
            new = self._get_host(connection, host_id)
            assert new is not None
            return new

        return self._write(work)

    def remove_host(self, host_id: str, *, actor: str, now: float, reason: str = "") -> None:
        """Out of the inventory: its agent is refused from now on, its active grants are
        marked revoked (nothing can deliver a revocation to a host that is refused), and
        its change log goes. The row stays so a re-added host continues its generations;
        the generation moves on so its next delivery is a snapshot."""
        check_host_id(host_id)
        _check_text(actor, "actor", MAX_ACTOR, required=True)
        _check_text(reason, "reason", MAX_REASON_LENGTH)
        now = _check_time(now)

        def work(connection: Connection) -> None:
            host = self._lock_host(connection, host_id)
            revoked = connection.execute(
                update(schema.grants)
                .where(schema.grants.c.host_id == host_id, schema.grants.c.state == "active")
                .values(
                    state="revoked",
                    revoked_at=now,
                    revoked_by=actor,
                    revoke_reason=reason or "host removed",
                )
            ).rowcount
            connection.execute(schema.changes.delete().where(schema.changes.c.host_id == host_id))
            connection.execute(
                update(schema.hosts)
                .where(schema.hosts.c.host_id == host_id)
                .values(
                    removed_at=now,
                    generation=host.generation + 1,
                    connected_since=None,
                    replica="",
                )
            )
            # NOTIFY before the audit append: the audit lock is held until COMMIT.
            self._notify(connection, host_id)
            self._append_audit(
                connection,
                [
                    _Audit(
                        actor,
                        "remove_host",
                        host_id=host_id,
                        reason=reason,
                        detail={"grants_revoked": revoked, "generation": host.generation + 1},
                    )
                ],
                now,
            )

        self._write(work)
        self._changed(host_id)

    def get_host(self, host_id: str) -> Host | None:
        if not isinstance(host_id, str) or not HOST_ID_PATTERN.fullmatch(host_id):
            return None
        return self._read(lambda c: self._get_host(c, host_id))

    def list_hosts(self, *, labels: Mapping[str, str] | None = None) -> list[Host]:
        """Every host in the inventory by host id (an inventory is bounded by its
        admins; a label filter matches the effective labels)."""
        wanted = check_labels(labels or {})
        rows = self._read(
            lambda c: c.execute(
                select(schema.hosts)
                .where(schema.hosts.c.removed_at.is_(None))
                .order_by(schema.hosts.c.host_id)
            ).all()
        )
        hosts = [_host_from_row(r) for r in rows]
        return [h for h in hosts if _labels_match(h.labels, wanted)] if wanted else hosts

    def agent_connected(
        self,
        host_id: str,
        *,
        agent_version: str,
        agent_labels: Mapping[str, str],
        trusted_key_ids: Sequence[str],
        generation: int,
        now: float,
    ) -> Host:
        check_host_id(host_id)
        version = _check_text(agent_version, "agent_version", MAX_VERSION)
        checked = check_labels(agent_labels, "agent_labels")
        key_ids = _check_key_ids(trusted_key_ids)
        generation = _check_count(generation, "generation")
        now = _check_time(now)

        def work(connection: Connection) -> Host:
            # One UPDATE (the row lock) then the audit: the reconnect storm's hot path.
            result = connection.execute(
                _CONNECT,
                {
                    "p_host": host_id,
                    "p_version": version,
                    "p_labels": canonical_json(checked),
                    "p_key_ids": canonical_json(list(key_ids)),
                    "p_generation": generation,
                    "p_now": now,
                    "p_replica": self.replica,
                },
            )
            if result.rowcount != 1:
                raise FleetError(
                    "NOT_FOUND",
                    "UNKNOWN_HOST",
                    f"host {host_id!r} is not in the inventory",
                    "host_id",
                )
            # Read back before the audit append: the audit lock is held to COMMIT.
            host = self._get_host(connection, host_id)
            assert host is not None
            self._append_audit(
                connection,
                [
                    _Audit(
                        f"agent:{host_id}",
                        "connect",
                        host_id=host_id,
                        detail={
                            "agent_version": version,
                            "generation": generation,
                            "replica": self.replica,
                            "trusted_key_ids": list(key_ids),
                        },
                    )
                ],
                now,
            )
            return host

        return self._write(work)

    def agent_disconnected(self, host_id: str, *, now: float) -> None:
        """Only the replica holding the stream marks it gone: an agent that already
        reconnected to another replica stays connected."""
        check_host_id(host_id)
        now = _check_time(now)

        def work(connection: Connection) -> None:
            result = connection.execute(
                update(schema.hosts)
                .where(
                    schema.hosts.c.host_id == host_id,
                    schema.hosts.c.replica == self.replica,
                    schema.hosts.c.connected_since.is_not(None),
                )
                .values(connected_since=None, last_seen=now)
            )
            if result.rowcount == 1:
                self._append_audit(
                    connection,
                    [
                        _Audit(
                            f"agent:{host_id}",
                            "disconnect",
                            host_id=host_id,
                            detail={"replica": self.replica},
                        )
                    ],
                    now,
                )

        self._write(work)

    def record_ack(self, host_id: str, generation: int, *, now: float) -> None:
        check_host_id(host_id)
        generation = _check_count(generation, "generation")
        now = _check_time(now)

        def work(connection: Connection) -> None:
            result = connection.execute(
                _ACK, {"p_host": host_id, "p_generation": generation, "p_now": now}
            )
            if result.rowcount != 1:
                raise FleetError(
                    "NOT_FOUND",
                    "UNKNOWN_HOST",
                    f"host {host_id!r} is not in the inventory",
                    "host_id",
                )
            self._append_audit(
                connection,
                [
                    _Audit(
                        f"agent:{host_id}",
                        "acknowledge",
                        host_id=host_id,
                        detail={"generation": generation},
                    )
                ],
                now,
            )

        self._write(work)

    def record_refusal(
        self,
        host_id: str,
        *,
        generation: int,
        grant_id: str,
        code: str,
        reason: str,
        message: str,
        now: float,
    ) -> None:
        check_host_id(host_id)
        self.record_drift(
            host_id,
            reason="refused",
            detail={
                "generation": _check_count(generation, "generation"),
                "grant_id": _clip(str(grant_id)),
                "code": _clip(str(code)),
                "reason": _clip(str(reason)),
                "message": _clip(str(message)),
            },
            now=now,
            grant_id=grant_id if GRANT_ID_PATTERN.fullmatch(str(grant_id)) else "",
        )

    def record_drift(
        self,
        host_id: str,
        *,
        reason: str,
        detail: Mapping[str, object],
        now: float,
        grant_id: str = "",
    ) -> None:
        check_host_id(host_id)
        reason = _clip(str(reason))
        now = _check_time(now)

        def work(connection: Connection) -> None:
            connection.execute(
                update(schema.hosts).where(schema.hosts.c.host_id == host_id).values(last_seen=now)
            )
            self._append_audit(
                connection,
                [
                    _Audit(
                        f"agent:{host_id}",
                        "drift",
                        host_id=host_id,
                        grant_id=grant_id,
                        reason=reason,
                        detail=detail,
                    )
                ],
                now,
            )

        self._write(work)

    def record_usage(self, host_id: str, rows: Sequence[UsageRow], *, now: float) -> None:
        """Per-grant figures from the agent; rows naming another host's grant are
        ignored. No audit record: this is volume, not a decision."""
        check_host_id(host_id)
        now = _check_time(now)
        if len(rows) > MAX_USAGE_ROWS:
            raise _invalid(
                "INVALID_ARGUMENT", "usage", f"{len(rows)} rows, at most {MAX_USAGE_ROWS}"
            )
        params = []
        for row in rows:
            if not GRANT_ID_PATTERN.fullmatch(str(row.grant_id)):
                raise _invalid(
                    "INVALID_ARGUMENT", "usage.grant_id", f"{row.grant_id!r} is not a grant id"
                )
            params.append(
                {
                    "g": row.grant_id,
                    "h": host_id,
                    "c": _check_count(row.connections, "usage.connections"),
                    "p": _check_count(row.packets, "usage.packets"),
                    "b": _check_count(row.bytes, "usage.bytes"),
                    "s": None
                    if row.last_seen is None
                    else _check_time(row.last_seen, "usage.last_seen"),
                }
            )
        if not params:
            return
        g = schema.grants.c
        statement = (
            update(schema.grants)
            .where(g.grant_id == _bind("g"), g.host_id == _bind("h"))
            .values(
                usage_connections=_bind("c"),
                usage_packets=_bind("p"),
                usage_bytes=_bind("b"),
                usage_last_seen=_bind("s"),
            )
        )
        # executemany: one round trip for the batch, sorted so two writers lock alike.
        params.sort(key=lambda p: str(p["g"]))

        def work(connection: Connection) -> None:
            connection.execute(statement, params)
            connection.execute(
                update(schema.hosts).where(schema.hosts.c.host_id == host_id).values(last_seen=now)
            )

        self._write(work)

    def audit_event(
        self,
        *,
        actor: str,
        action: str,
        host_id: str = "",
        grant_id: str = "",
        reason: str = "",
        detail: Mapping[str, object] | None = None,
        now: float,
    ) -> None:
        """A decision without a row change (e.g. "refuse" of an unknown certificate).
        Host and grant ids are clipped rather than refused: they may be the very
        hostile input being recorded."""
        now = _check_time(now)
        entry = _Audit(
            _clip(actor)[:MAX_ACTOR],
            action,
            host_id=host_id if HOST_ID_PATTERN.fullmatch(host_id) else "",
            grant_id=grant_id if GRANT_ID_PATTERN.fullmatch(grant_id) else "",
            reason=_clip(reason),
            detail={
                **(detail or {}),
                **(
                    {"claimed_host_id": _clip(host_id)}
                    if host_id and not HOST_ID_PATTERN.fullmatch(host_id)
                    else {}
                ),
            },
        )
        self._write(lambda c: self._append_audit(c, [entry], now))

    # ------------------------------------------------------------ grants

    def create_grant(
        self,
        request: GrantRequest,
        *,
        keyring: KeyRing,
        actor: str,
        request_id: str | None,
        now: float,
        identity: Identity | None = None,
        access_request_id: str | None = None,
    ) -> tuple[BrokerGrant, bool]:
        """`identity`: who the grant is for, verified (an admin's break-glass grant
        carries the admin's); `access_request_id`: the request it answers."""
        check_host_id(request.host_id, "host")
        _check_text(actor, "actor", MAX_ACTOR, required=True)
        if request_id is not None:
            _check_text(request_id, "request_id", MAX_REQUEST_ID, required=True)
        if identity is not None:
            _check_identity(identity, "identity")
        if access_request_id is not None:
            _check_request_id(access_request_id)
        now = _check_time(now)
        fingerprint = request_fingerprint(request, actor) if request_id is not None else None

        def work(connection: Connection) -> tuple[BrokerGrant, bool]:
            # The host lock first: it also orders two requests carrying one request_id,
            # so the second sees the first's row.
            host = self._lock_host(connection, request.host_id, "host")
            if request_id is not None:
                row = connection.execute(_SEL_REQUEST, {"p_request": request_id}).first()
                if row is not None:
                    if row.request_hash != fingerprint:
                        raise FleetError(
                            "ALREADY_EXISTS",
                            "REQUEST_ID_REUSED",
                            f"request_id {request_id!r} was used for a different request",
                            "request_id",
                        )
                    return _grant_from_row(row), False
            grant, entries = self._insert_grant(
                connection,
                host,
                request,
                keyring=keyring,
                actor=actor,
                request_id=request_id,
                fingerprint=fingerprint,
                identity=identity,
                access_request_id=access_request_id,
                now=now,
            )
            self._append_audit(connection, entries, now)
            return grant, True

        result = self._write(work, retry_integrity=request_id is not None)
        if result[1]:
            self._changed(result[0].host_id)
        return result

    def _insert_grant(
        self,
        connection: Connection,
        host: Host,
        request: GrantRequest,
        *,
        keyring: KeyRing,
        actor: str,
        request_id: str | None,
        fingerprint: str | None,
        identity: Identity | None,
        access_request_id: str | None,
        now: float,
    ) -> tuple[BrokerGrant, list[_Audit]]:
        """Sign and insert a grant on a host locked by the caller, move the host's
        generation, log the change and NOTIFY; returns the grant and the audit records
        the caller appends (last, after any rows of its own)."""
        signer = keyring.signer_for(host.trusted_key_ids)
        signed = signer.sign_grant(request, now=now)
        grant = pb.Grant.FromString(signed.grant)
        generation = host.generation + 1
        identity_json = None if identity is None else _check_identity(identity, "identity")[1]
        values = {
            "grant_id": grant.grant_id,
            "host_id": host.host_id,
            "subject": grant.subject,
            "sources": canonical_json(list(grant.source_prefixes)),
            "protocol": PROTOCOL_FROM_PB[grant.protocol].value,
            "port_first": grant.port_start,
            "port_last": grant.port_end or grant.port_start,
            "not_before": seconds_of(grant.not_before),
            "expire_time": seconds_of(grant.expire_time),
            "issue_time": seconds_of(grant.issue_time),
            "reason": grant.reason,
            "key_id": signed.key_id,
            "grant_bytes": signed.grant,
            "signature": signed.signature,
            "state": GrantState.ACTIVE.value,
            "created_by": actor,
            "generation": generation,
            "request_id": request_id,
            "request_hash": fingerprint,
            "revoked_at": None,
            "revoked_by": None,
            "revoke_reason": None,
            "usage_connections": 0,
            "usage_packets": 0,
            "usage_bytes": 0,
            "usage_last_seen": None,
            "identity": identity_json,
            "identity_issuer": None if identity is None else identity.issuer,
            "identity_subject": None if identity is None else identity.subject,
            "access_request_id": access_request_id,
        }
        connection.execute(_INSERT_GRANT, values)
        connection.execute(_SET_GENERATION, {"p_host": host.host_id, "p_generation": generation})
        connection.execute(
            _INSERT_CHANGE,
            {
                "host_id": host.host_id,
                "generation": generation,
                "kind": ChangeKind.GRANT.value,
                "grant_id": grant.grant_id,
                "payload": signed.grant,
                "signature": signed.signature,
                "key_id": signed.key_id,
                "created_at": now,
            },
        )
        # NOTIFY before the audit append: the audit lock is held until COMMIT.
        self._notify(connection, host.host_id)
        detail: dict[str, object] = {
            "subject": request.subject,
            "sources": [str(n) for n in request.sources],
            "port": str(request.port),
            "ttl": request.ttl,
            "keep_established": request.keep_established,
            "max_connections": request.max_connections,
            "request_id": request_id,
            "generation": generation,
        }
        if identity is not None:
            detail["identity"] = identity.to_json()
        if access_request_id is not None:
            detail["access_request_id"] = access_request_id
        entries = [
            _Audit(
                actor,
                "create",
                host_id=host.host_id,
                grant_id=grant.grant_id,
                reason=request.reason,
                detail=detail,
            ),
            _Audit(
                "broker",
                "sign",
                host_id=host.host_id,
                grant_id=grant.grant_id,
                detail={"key_id": signed.key_id},
            ),
        ]
        # What was inserted, through the same typed parse as a row read back.
        return _grant_from_row(values), entries

    def revoke_grant(
        self, grant_id: str, *, keyring: KeyRing, actor: str, reason: str, now: float
    ) -> BrokerGrant:
        if not isinstance(grant_id, str) or not GRANT_ID_PATTERN.fullmatch(grant_id):
            raise _invalid(
                "INVALID_ARGUMENT", "grant_id", f"{grant_id!r} is not 1-64 of [A-Za-z0-9._-]"
            )
        _check_text(actor, "actor", MAX_ACTOR, required=True)
        _check_text(reason, "reason", MAX_REASON_LENGTH)
        now = _check_time(now)
        changed: list[str] = []

        def work(connection: Connection) -> BrokerGrant:
            changed.clear()
            found = connection.execute(
                select(schema.grants.c.host_id).where(schema.grants.c.grant_id == grant_id)
            ).first()
            if found is None:
                raise FleetError(
                    "NOT_FOUND", "GRANT_NOT_FOUND", f"grant {grant_id!r} does not exist", "grant_id"
                )
            row = connection.execute(
                select(schema.hosts)
                .where(schema.hosts.c.host_id == found.host_id)
                .with_for_update()
            ).first()
            grant_row = connection.execute(
                select(schema.grants).where(schema.grants.c.grant_id == grant_id).with_for_update()
            ).one()
            grant = _grant_from_row(grant_row)
            if grant.state is GrantState.REVOKED:
                return grant
            if grant.state_at(now) is GrantState.EXPIRED:
                raise FleetError(
                    "FAILED_PRECONDITION",
                    "GRANT_EXPIRED",
                    f"grant {grant_id!r} has expired",
                    "grant_id",
                )
            if row is None or row.removed_at is not None:
                raise StoreError(
                    f"grant {grant_id!r} is active on host {found.host_id!r}, "
                    "which is not in the inventory"
                )
            host = _host_from_row(row)
            entries = self._revoke_locked(
                connection, host, grant_id, keyring=keyring, actor=actor, reason=reason, now=now
            )
            self._append_audit(connection, entries, now)
            changed.append(host.host_id)
            updated = connection.execute(
                select(schema.grants).where(schema.grants.c.grant_id == grant_id)
            ).one()
            return _grant_from_row(updated)

        result = self._write(work)
        for host_id in changed:
            self._changed(host_id)
        return result

    def _revoke_locked(
        self,
        connection: Connection,
        host: Host,
        grant_id: str,
        *,
        keyring: KeyRing,
        actor: str,
        reason: str,
        now: float,
    ) -> list[_Audit]:
        """Revoke an active grant whose host and row the caller locked: sign the
        revocation, move the generation, log the change, NOTIFY. Returns the audit
        records the caller appends last."""
        signer = keyring.signer_for(host.trusted_key_ids)
        signed = signer.sign_revocation(
            grant_id=grant_id, host_id=host.host_id, now=now, reason=reason
        )
        generation = host.generation + 1
        connection.execute(
            update(schema.grants)
            .where(schema.grants.c.grant_id == grant_id)
            .values(
                state=GrantState.REVOKED.value,
                revoked_at=now,
                revoked_by=actor,
                revoke_reason=reason,
            )
        )
        connection.execute(_SET_GENERATION, {"p_host": host.host_id, "p_generation": generation})
        connection.execute(
            _INSERT_CHANGE,
            {
                "host_id": host.host_id,
                "generation": generation,
                "kind": ChangeKind.REVOCATION.value,
                "grant_id": grant_id,
                "payload": signed.revocation,
                "signature": signed.signature,
                "key_id": signed.key_id,
                "created_at": now,
            },
        )
        # NOTIFY before the audit append: the audit lock is held until COMMIT.
        self._notify(connection, host.host_id)
        return [
            _Audit(
                actor,
                "revoke",
                host_id=host.host_id,
                grant_id=grant_id,
                reason=reason,
                detail={"key_id": signed.key_id, "generation": generation},
            )
        ]

    def get_grant(self, grant_id: str) -> BrokerGrant | None:
        if not isinstance(grant_id, str) or not GRANT_ID_PATTERN.fullmatch(grant_id):
            return None
        row = self._read(
            lambda c: c.execute(
                select(schema.grants).where(schema.grants.c.grant_id == grant_id)
            ).first()
        )
        return None if row is None else _grant_from_row(row)

    def list_grants(
        self,
        *,
        host_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        subject: str | None = None,
        state: GrantState | None = None,
        now: float,
        limit: int = 1000,
        after: str | None = None,
    ) -> list[BrokerGrant]:
        """Ordered by grant id; `after` is the last id of the previous page."""
        limit = _check_limit(limit)
        now = _check_time(now)
        g = schema.grants.c
        conditions: list[Any] = []
        if host_id is not None:
            conditions.append(g.host_id == check_host_id(host_id, "host"))
        if subject is not None:
            conditions.append(g.subject == _check_text(subject, "subject", MAX_SUBJECT_LENGTH))
        if after is not None:
            if not GRANT_ID_PATTERN.fullmatch(after):
                raise _invalid("INVALID_ARGUMENT", "after", f"{after!r} is not a grant id")
            conditions.append(g.grant_id > after)
        if state is GrantState.ACTIVE:
            conditions.append(and_(g.state == "active", g.expire_time > now))
        elif state is GrantState.EXPIRED:
            conditions.append(
                or_(g.state == "expired", and_(g.state == "active", g.expire_time <= now))
            )
        elif state is GrantState.REVOKED:
            conditions.append(g.state == "revoked")
        elif state is not None:
            raise _invalid("INVALID_ARGUMENT", "state", f"{state!r} is not a grant state")
        wanted = check_labels(labels or {})
        if wanted:
            hosts = [h.host_id for h in self.list_hosts(labels=wanted)]
            if not hosts:
                return []
            # Inventories are bounded (thousands): an IN list of ids, in chunks the
            # databases' parameter limits allow.
            return self._list_grants_on_hosts(conditions, hosts, limit)
        rows = self._read(
            lambda c: c.execute(
                select(schema.grants).where(*conditions).order_by(g.grant_id).limit(limit)
            ).all()
        )
        return [_grant_from_row(r) for r in rows]

    def _list_grants_on_hosts(
        self, conditions: list[Any], hosts: list[str], limit: int
    ) -> list[BrokerGrant]:
        g = schema.grants.c
        chunk = 500
        rows: list[_Row] = []

        def work(connection: Connection) -> list[_Row]:
            found: list[_Row] = []
            for i in range(0, len(hosts), chunk):
                found.extend(
                    connection.execute(
                        select(schema.grants)
                        .where(*conditions, g.host_id.in_(hosts[i : i + chunk]))
                        .order_by(g.grant_id)
                        .limit(limit)
                    ).all()
                )
            return found

        rows = self._read(work)
        rows.sort(key=lambda r: str(r.grant_id))
        return [_grant_from_row(r) for r in rows[:limit]]

    def expire_due(self, *, now: float) -> int:
        """Active grants past their expiry become expired, one audit record each.
        Several replicas may run this at once: FOR UPDATE SKIP LOCKED and the
        state='active' condition make exactly one of them record each grant."""
        now = _check_time(now)
        g = schema.grants.c
        total = 0
        for _ in range(MAX_LIST // EXPIRE_BATCH + 1):

            def work(connection: Connection) -> int:
                due = connection.execute(
                    select(g.grant_id, g.host_id)
                    .where(g.state == "active", g.expire_time <= now)
                    .order_by(g.grant_id)
                    .limit(EXPIRE_BATCH)
                    .with_for_update(skip_locked=True)
                ).all()
                if not due:
                    return 0
                ids = [str(r.grant_id) for r in due]
                connection.execute(
                    update(schema.grants)
                    .where(g.grant_id.in_(ids), g.state == "active")
                    .values(state=GrantState.EXPIRED.value)
                )
                self._append_audit(
                    connection,
                    [
                        _Audit("broker", "expire", host_id=str(r.host_id), grant_id=str(r.grant_id))
                        for r in due
                    ],
                    now,
                )
                return len(due)

            done = self._write(work)
            total += done
            if done < EXPIRE_BATCH:
                break
        return total

    # ------------------------------------------------------------ access requests

    def _lock_identity(self, connection: Connection, key: tuple[str, str]) -> None:
        """Serialise one identity's request creations (its count of active grants spans
        hosts, so the host lock does not cover it). SQLite's writers are serial anyway.
        Taken before any row lock, like every lock here that is not the audit's."""
        if self.is_postgresql:
            connection.execute(
                _IDENTITY_LOCK, {"c": IDENTITY_LOCK_CLASS, "k": _identity_lock_key(key)}
            )

    def _count_active(self, connection: Connection, key: tuple[str, str], now: float) -> int:
        g = schema.grants.c
        return int(
            connection.execute(
                select(func.count())
                .select_from(schema.grants)
                .where(
                    g.identity_issuer == key[0],
                    g.identity_subject == key[1],
                    g.state == GrantState.ACTIVE.value,
                    g.expire_time > now,
                )
            ).scalar_one()
        )

    def _approvals_of(
        self, connection: Connection, request_ids: Sequence[str]
    ) -> dict[str, list[Approval]]:
        a = schema.request_approvals.c
        found: dict[str, list[Approval]] = {rid: [] for rid in request_ids}
        chunk = 500
        for i in range(0, len(request_ids), chunk):
            rows = connection.execute(
                select(schema.request_approvals)
                .where(a.request_id.in_(list(request_ids[i : i + chunk])))
                .order_by(a.request_id, a.time, a.approver_issuer, a.approver_subject)
            ).all()
            for row in rows:
                votes = found[str(row.request_id)]
                if len(votes) >= MAX_APPROVALS:
                    raise StoreError(
                        f"access_requests row {row.request_id!r}: more than "
                        f"{MAX_APPROVALS} approvals"
                    )
                votes.append(_approval_from_row(row))
        return found

    def _load_request(self, connection: Connection, row: _Row) -> AccessRequest:
        request_id = str(row.request_id)
        return _request_from_row(row, self._approvals_of(connection, [request_id])[request_id])

    def _lock_request(self, connection: Connection, request_id: str) -> tuple[_Row | None, _Row]:
        """Lock order host -> request -> grant -> audit, as everywhere: the host row
        (removed or not: a request outlives its host) then the request's."""
        r = schema.access_requests.c
        found = connection.execute(select(r.host_id).where(r.request_id == request_id)).first()
        if found is None:
            raise FleetError(
                "NOT_FOUND",
                "REQUEST_NOT_FOUND",
                f"access request {request_id!r} does not exist",
                "request_id",
            )
        host_row = connection.execute(
            select(schema.hosts).where(schema.hosts.c.host_id == found.host_id).with_for_update()
        ).first()
        row = connection.execute(
            select(schema.access_requests).where(r.request_id == request_id).with_for_update()
        ).one()
        return host_row, row

    def _set_request(self, connection: Connection, request_id: str, **values: object) -> None:
        connection.execute(
            update(schema.access_requests)
            .where(schema.access_requests.c.request_id == request_id)
            .values(**values)
        )

    def _reload_request(self, connection: Connection, request_id: str) -> AccessRequest:
        row = connection.execute(
            select(schema.access_requests).where(schema.access_requests.c.request_id == request_id)
        ).one()
        return self._load_request(connection, row)

    @staticmethod
    def _expire_entry(request: AccessRequest) -> _Audit:
        return _Audit(
            "broker",
            "request_expire",
            host_id=request.host_id,
            detail={
                "request_id": request.request_id,
                "requester": request.requester.label,
                "approved_count": request.approved_count,
                "threshold": request.approvals_required,
                "expires_at": request.expires_at,
            },
        )

    def create_access_request(
        self,
        *,
        requester: Identity,
        grant_request: GrantRequest,
        decision: PolicyDecision,
        keyring: KeyRing,
        client_request_id: str | None,
        pending_ttl: float,
        now: float,
        explicit_sources: bool = False,
    ) -> tuple[AccessRequest, BrokerGrant | None, bool]:
        """Store a request the policy allowed: granted at once (the grant made in the
        same transaction) when its rule needs no approval, else pending until
        `now + pending_ttl`. Idempotent on (requester, client_request_id): returns
        (request, its grant or None, created)."""
        requester, requester_json = _check_identity(requester, "requester")
        if not isinstance(decision, PolicyDecision) or not decision.allowed:
            raise ValueError("create_access_request needs a decision that allows the request")
        limits = decision.limits
        if limits is None:
            raise ValueError("an allowing decision carries its rule's limits")
        if not isinstance(grant_request, GrantRequest):
            raise ValueError("grant_request must be a GrantRequest")
        if grant_request.subject != requester.label:
            raise ValueError("the grant request's subject must be the requester's label")
        host_id = check_host_id(grant_request.host_id, "host")
        reason = _check_text(grant_request.reason, "reason", MAX_REQUEST_REASON, required=True)
        if client_request_id is not None:
            _check_client_request_id(client_request_id)
        now = _check_time(now)
        pending_ttl = _check_time(pending_ttl, "pending_ttl")
        if not 0 < pending_ttl <= MAX_PENDING_TTL:
            raise _invalid(
                "INVALID_ARGUMENT", "pending_ttl", f"{pending_ttl}s is not in (0, 30 days]"
            )
        ttl = _check_time(grant_request.ttl, "ttl")
        if not ttl > 0:
            raise _invalid("INVALID_TTL", "ttl", f"{ttl}s must be longer than 0s")
        sources = [str(n) for n in grant_request.sources]
        if not 1 <= len(sources) <= MAX_SOURCES:
            raise _invalid("INVALID_ARGUMENT", "sources", f"1 to {MAX_SOURCES} sources")
        rule = _check_text(limits.rule_id or decision.rule, "rule", MAX_RULE, required=True)
        approvals_required = _check_count(limits.approvals, "approvals")
        approvers = _check_text(limits.approvers, "approvers", MAX_GROUP)
        if approvals_required > 0 and not approvers.strip():
            raise ValueError(f"rule {rule!r} needs approvals but names no approver group")
        max_grants = _check_count(limits.max_grants, "max_grants")
        fingerprint = access_request_fingerprint(requester, grant_request)
        r = schema.access_requests.c
        changed: list[str] = []

        def work(connection: Connection) -> tuple[AccessRequest, BrokerGrant | None, bool]:
            changed.clear()
            self._lock_identity(connection, requester.key)
            host = self._lock_host(connection, host_id, "host")
            if client_request_id is not None:
                row = connection.execute(
                    select(schema.access_requests).where(
                        r.requester_issuer == requester.issuer,
                        r.requester_subject == requester.subject,
                        r.client_request_id == client_request_id,
                    )
                ).first()
                if row is not None:
                    if row.fingerprint != fingerprint:
                        raise FleetError(
                            "ALREADY_EXISTS",
                            "REQUEST_ID_REUSED",
                            f"request_id {client_request_id!r} was used for a different request",
                            "request_id",
                        )
                    first = self._load_request(connection, row)
                    first_grant = None
                    if first.grant_id is not None:
                        grant_row = connection.execute(
                            _SEL_GRANT, {"p_grant": first.grant_id}
                        ).first()
                        first_grant = None if grant_row is None else _grant_from_row(grant_row)
                    return first, first_grant, False
            # Counted under the identity's lock: two requests of one identity at once
            # cannot both see room for one more grant.
            active = self._count_active(connection, requester.key, now)
            if active >= max_grants:
                raise FleetError(
                    "FAILED_PRECONDITION",
                    "TOO_MANY_GRANTS",
                    f"{requester.label} has {active} active grants; rule {rule!r} "
                    f"allows at most {max_grants} at once",
                )
            request_id = "r-" + secrets.token_hex(8)
            granted = approvals_required == 0
            grant: BrokerGrant | None = None
            entries: list[_Audit] = []
            if granted:
                grant, entries = self._insert_grant(
                    connection,
                    host,
                    grant_request,
                    keyring=keyring,
                    actor=requester.actor,
                    request_id=None,
                    fingerprint=None,
                    identity=requester,
                    access_request_id=request_id,
                    now=now,
                )
                changed.append(host_id)
            connection.execute(
                insert(schema.access_requests).values(
                    request_id=request_id,
                    requester=requester_json,
                    requester_issuer=requester.issuer,
                    requester_subject=requester.subject,
                    host_id=host_id,
                    protocol=grant_request.port.protocol.value,
                    port_first=grant_request.port.ports.first,
                    port_last=grant_request.port.ports.last,
                    sources=canonical_json(sources),
                    ttl=ttl,
                    reason=reason,
                    keep_established=bool(grant_request.keep_established),
                    max_connections=grant_request.max_connections,
                    max_grants=max_grants,
                    explicit_sources=bool(explicit_sources),
                    rule=rule,
                    approvals_required=approvals_required,
                    approvers=approvers,
                    state=(RequestState.GRANTED if granted else RequestState.PENDING).value,
                    created_at=now,
                    # A granted request has no pending window.
                    expires_at=now if granted else now + pending_ttl,
                    decided_at=now if granted else None,
                    grant_id=None if grant is None else grant.grant_id,
                    client_request_id=client_request_id,
                    fingerprint=fingerprint,
                )
            )
            request_entry = _Audit(
                requester.actor,
                "request",
                host_id=host_id,
                grant_id="" if grant is None else grant.grant_id,
                reason=reason,
                detail={
                    "request_id": request_id,
                    "identity": requester.to_json(),
                    "rule": rule,
                    "approvals_required": approvals_required,
                    "approvers": approvers,
                    "port": str(grant_request.port),
                    "sources": sources,
                    "ttl": ttl,
                    "state": (RequestState.GRANTED if granted else RequestState.PENDING).value,
                    "client_request_id": client_request_id,
                },
            )
            self._append_audit(connection, [request_entry, *entries], now)
            return self._reload_request(connection, request_id), grant, True

        result = self._write(work, retry_integrity=True)
        for changed_host in changed:
            self._changed(changed_host)
        return result

    def record_refused_request(
        self,
        *,
        requester: Identity,
        host_id: str,
        detail: Mapping[str, object],
        now: float,
    ) -> None:
        """The policy said no: nothing is stored but this audit record."""
        requester, _ = _check_identity(requester, "requester")
        now = _check_time(now)
        # The host id may be the very input that was refused: clipped, never refused.
        known = isinstance(host_id, str) and bool(HOST_ID_PATTERN.fullmatch(host_id))
        entry = _Audit(
            requester.actor,
            "request_refused",
            host_id=host_id if known else "",
            detail={
                **dict(detail),
                "identity": requester.to_json(),
                **({} if known else {"claimed_host_id": _clip(str(host_id))}),
            },
        )
        self._write(lambda c: self._append_audit(c, [entry], now))

    def decide_access_request(
        self,
        request_id: str,
        *,
        approver: Identity,
        approve: bool,
        comment: str,
        keyring: KeyRing,
        now: float,
    ) -> tuple[AccessRequest, BrokerGrant | None]:
        """One approver's vote. The last approval needed makes the grant (its TTL
        counted from now) in this transaction; any denial ends the request."""
        request_id = _check_request_id(request_id)
        approver, approver_json = _check_identity(approver, "approver")
        if not isinstance(approve, bool):
            raise ValueError("approve must be a bool")
        comment = _check_text(comment, "comment", MAX_COMMENT)
        now = _check_time(now)
        changed: list[str] = []

        def work(connection: Connection) -> tuple[AccessRequest, BrokerGrant | None] | FleetError:
            changed.clear()
            # The requester's lock first (the lock order of request creation): the last
            # approval counts the requester's active grants against the rule's
            # @max_grants again, so approvals cannot take an identity past it. The
            # requester of a request never changes: reading it unlocked is safe.
            r = schema.access_requests.c
            owner = connection.execute(
                select(r.requester_issuer, r.requester_subject).where(r.request_id == request_id)
            ).first()
            if owner is not None:
                self._lock_identity(connection, (owner.requester_issuer, owner.requester_subject))
            host_row, row = self._lock_request(connection, request_id)
            request = self._load_request(connection, row)
            if request.state is RequestState.PENDING and request.expires_at <= now:
                # Expire it for good (committed, audited), then refuse the vote.
                self._set_request(
                    connection, request_id, state=RequestState.EXPIRED.value, decided_at=now
                )
                self._append_audit(connection, [self._expire_entry(request)], now)
                return FleetError(
                    "FAILED_PRECONDITION",
                    "REQUEST_NOT_PENDING",
                    f"access request {request_id} expired without enough approvals",
                    "request_id",
                )
            if request.state is not RequestState.PENDING:
                raise FleetError(
                    "FAILED_PRECONDITION",
                    "REQUEST_NOT_PENDING",
                    f"access request {request_id} is {request.state.value}, not pending",
                    "request_id",
                )
            if approver.key == request.requester.key:
                raise FleetError(
                    "PERMISSION_DENIED",
                    "SELF_APPROVAL",
                    f"{approver.label} cannot approve or deny their own request",
                )
            in_group = (
                approver.kind is IdentityKind.PERSON
                and bool(request.approvers)
                and request.approvers in approver.groups
            )
            if not (in_group or (not approve and approver.kind is IdentityKind.ADMIN)):
                raise FleetError(
                    "PERMISSION_DENIED",
                    "NOT_AN_APPROVER",
                    f"{approver.label} may not {'approve' if approve else 'deny'} this request: "
                    f"approvers are the people of group {request.approvers!r}"
                    + ("" if approve else " (or an admin)"),
                )
            if any(a.approver.key == approver.key for a in request.approvals):
                raise FleetError(
                    "FAILED_PRECONDITION",
                    "ALREADY_DECIDED",
                    f"{approver.label} has already decided on request {request_id}",
                )
            connection.execute(
                insert(schema.request_approvals).values(
                    request_id=request_id,
                    approver=approver_json,
                    approver_issuer=approver.issuer,
                    approver_subject=approver.subject,
                    approve=approve,
                    time=now,
                    comment=comment,
                )
            )
            approved = request.approved_count + (1 if approve else 0)
            grant: BrokerGrant | None = None
            grant_entries: list[_Audit] = []
            if not approve:
                self._set_request(
                    connection, request_id, state=RequestState.DENIED.value, decided_at=now
                )
            elif approved >= request.approvals_required:
                if host_row is None or host_row.removed_at is not None:
                    raise FleetError(
                        "NOT_FOUND",
                        "UNKNOWN_HOST",
                        f"host {request.host_id!r} is no longer in the inventory",
                        "host",
                    )
                max_grants = int(row.max_grants)
                if self._count_active(connection, request.requester.key, now) >= max_grants:
                    raise FleetError(
                        "FAILED_PRECONDITION",
                        "TOO_MANY_GRANTS",
                        f"{request.requester.label} already holds {max_grants} active grants, "
                        f"the most rule {request.rule!r} allows: approve again when one ends",
                    )
                grant, grant_entries = self._insert_grant(
                    connection,
                    _host_from_row(host_row),
                    _grant_request_of(row),
                    keyring=keyring,
                    actor=approver.actor,
                    request_id=None,
                    fingerprint=None,
                    identity=request.requester,
                    access_request_id=request_id,
                    now=now,
                )
                self._set_request(
                    connection,
                    request_id,
                    state=RequestState.GRANTED.value,
                    decided_at=now,
                    grant_id=grant.grant_id,
                )
                changed.append(request.host_id)
            entry = _Audit(
                approver.actor,
                "request_approve" if approve else "request_deny",
                host_id=request.host_id,
                grant_id="" if grant is None else grant.grant_id,
                detail={
                    "request_id": request_id,
                    "requester": request.requester.label,
                    "approver": approver.to_json(),
                    "approved_count": approved,
                    "threshold": request.approvals_required,
                    "comment": comment,
                },
            )
            self._append_audit(connection, [entry, *grant_entries], now)
            return self._reload_request(connection, request_id), grant

        result = self._write(work)
        if isinstance(result, FleetError):
            raise result
        for changed_host in changed:
            self._changed(changed_host)
        return result

    def close_access_request(
        self,
        request_id: str,
        *,
        actor: Identity,
        now: float,
        keyring: KeyRing | None = None,
    ) -> tuple[AccessRequest, BrokerGrant | None]:
        """The requester (or an admin) ends a request: pending -> cancelled; granted
        with an active grant -> the grant revoked as revoke_grant does, closed; granted
        whose grant already ended -> closed without a change; other states: unchanged
        (closing twice is fine). Revoking signs: `keyring` is needed then (a
        ValueError names the omission)."""
        request_id = _check_request_id(request_id)
        actor, _ = _check_identity(actor, "actor")
        now = _check_time(now)
        changed: list[str] = []

        def work(connection: Connection) -> tuple[AccessRequest, BrokerGrant | None]:
            changed.clear()
            host_row, row = self._lock_request(connection, request_id)
            request = self._load_request(connection, row)
            if actor.key != request.requester.key and actor.kind is not IdentityKind.ADMIN:
                raise FleetError(
                    "PERMISSION_DENIED",
                    "NOT_YOURS",
                    f"access request {request_id} is not {actor.label}'s to close",
                    "request_id",
                )
            grant: BrokerGrant | None = None
            if request.grant_id is not None:
                grant_row = connection.execute(
                    _SEL_GRANT_FOR_UPDATE, {"p_grant": request.grant_id}
                ).first()
                grant = None if grant_row is None else _grant_from_row(grant_row)
            entries: list[_Audit] = []
            detail: dict[str, object] = {"request_id": request_id, "identity": actor.to_json()}
            if request.state is RequestState.PENDING and request.expires_at <= now:
                # Past its time: it expired (what the expiry loop would have recorded).
                self._set_request(
                    connection, request_id, state=RequestState.EXPIRED.value, decided_at=now
                )
                entries.append(self._expire_entry(request))
            elif request.state is RequestState.PENDING:
                self._set_request(
                    connection, request_id, state=RequestState.CANCELLED.value, decided_at=now
                )
                entries.append(
                    _Audit(actor.actor, "request_cancel", host_id=request.host_id, detail=detail)
                )
            elif request.state is RequestState.GRANTED:
                revoked = False
                if grant is not None and grant.state_at(now) is GrantState.ACTIVE:
                    if host_row is None or host_row.removed_at is not None:
                        raise StoreError(
                            f"grant {grant.grant_id!r} is active on host {request.host_id!r}, "
                            "which is not in the inventory"
                        )
                    if keyring is None:
                        raise ValueError("closing a granted request revokes its grant: keyring")
                    reason = (
                        CLOSED_REASON
                        if actor.key == request.requester.key
                        else f"closed by {actor.label}"[:MAX_REASON_LENGTH]
                    )
                    entries.extend(
                        self._revoke_locked(
                            connection,
                            _host_from_row(host_row),
                            grant.grant_id,
                            keyring=keyring,
                            actor=actor.actor,
                            reason=reason,
                            now=now,
                        )
                    )
                    changed.append(request.host_id)
                    revoked = True
                self._set_request(connection, request_id, state=RequestState.CLOSED.value)
                entries.insert(
                    0,
                    _Audit(
                        actor.actor,
                        "request_close",
                        host_id=request.host_id,
                        grant_id="" if grant is None else grant.grant_id,
                        detail={**detail, "grant_revoked": revoked},
                    ),
                )
            else:
                return request, grant
            self._append_audit(connection, entries, now)
            if grant is not None:
                grant = _grant_from_row(
                    connection.execute(_SEL_GRANT, {"p_grant": grant.grant_id}).one()
                )
            return self._reload_request(connection, request_id), grant

        result = self._write(work)
        for changed_host in changed:
            self._changed(changed_host)
        return result

    def get_access_request(self, request_id: str) -> AccessRequest | None:
        if not isinstance(request_id, str) or not REQUEST_ID_PATTERN.fullmatch(request_id):
            return None

        def work(connection: Connection) -> AccessRequest | None:
            row = connection.execute(
                select(schema.access_requests).where(
                    schema.access_requests.c.request_id == request_id
                )
            ).first()
            return None if row is None else self._load_request(connection, row)

        return self._read(work)

    def list_access_requests(
        self,
        *,
        state: RequestState | None = None,
        host_id: str | None = None,
        requester_key: tuple[str, str] | None = None,
        approvers_in: Sequence[str] | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[AccessRequest]:
        """Ordered by (created_at, request_id); `after` is the last request id of the
        previous page. `approvers_in`: only requests whose approver group is one of
        these (a person's groups: what they may review)."""
        limit = _check_limit(limit)
        r = schema.access_requests.c
        conditions: list[Any] = []
        if state is not None:
            if not isinstance(state, RequestState):
                raise _invalid("INVALID_ARGUMENT", "state", f"{state!r} is not a request state")
            conditions.append(r.state == state.value)
        if host_id is not None:
            conditions.append(r.host_id == check_host_id(host_id, "host"))
        if requester_key is not None:
            issuer, subject = requester_key
            conditions.append(r.requester_issuer == _check_text(issuer, "requester", 512))
            conditions.append(r.requester_subject == _check_text(subject, "requester", 512))
        if approvers_in is not None:
            if isinstance(approvers_in, str) or len(approvers_in) > MAX_GROUPS:
                raise _invalid("INVALID_ARGUMENT", "approvers", f"at most {MAX_GROUPS} groups")
            if not all(isinstance(g, str) for g in approvers_in):
                raise _invalid("INVALID_ARGUMENT", "approvers", "groups are strings")
            # A person's groups come from their token: one longer than any rule's
            # @approvers matches no request, so it is left out rather than refused.
            groups = [g for g in approvers_in if 0 < len(g) <= MAX_GROUP]
            if not groups:
                return []
            conditions.append(r.approvers.in_(groups))
        if after is not None:
            after = _check_request_id(after)
            # Keyset paging on (created_at, request_id); an unknown `after` matches
            # nothing (NULL comparisons), an empty page rather than a restart.
            anchor = select(r.created_at).where(r.request_id == after).scalar_subquery()
            conditions.append(
                or_(r.created_at > anchor, and_(r.created_at == anchor, r.request_id > after))
            )

        def work(connection: Connection) -> list[AccessRequest]:
            rows = connection.execute(
                select(schema.access_requests)
                .where(*conditions)
                .order_by(r.created_at, r.request_id)
                .limit(limit)
            ).all()
            votes = self._approvals_of(connection, [str(row.request_id) for row in rows])
            return [_request_from_row(row, votes[str(row.request_id)]) for row in rows]

        return self._read(work)

    def expire_access_requests(self, *, now: float) -> list[AccessRequest]:
        """Pending requests past their time become expired, one audit record each;
        returns them (the webhooks' "request.expired"). Several replicas may run this
        at once: FOR UPDATE SKIP LOCKED and the state condition expire each once."""
        now = _check_time(now)
        r = schema.access_requests.c
        expired: list[AccessRequest] = []
        for _ in range(MAX_LIST // EXPIRE_BATCH + 1):

            def work(connection: Connection) -> list[AccessRequest]:
                rows = connection.execute(
                    select(schema.access_requests)
                    .where(r.state == RequestState.PENDING.value, r.expires_at <= now)
                    .order_by(r.request_id)
                    .limit(EXPIRE_BATCH)
                    .with_for_update(skip_locked=True)
                ).all()
                if not rows:
                    return []
                votes = self._approvals_of(connection, [str(row.request_id) for row in rows])
                due = [_request_from_row(row, votes[str(row.request_id)]) for row in rows]
                connection.execute(
                    update(schema.access_requests)
                    .where(
                        r.request_id.in_([q.request_id for q in due]),
                        r.state == RequestState.PENDING.value,
                    )
                    .values(state=RequestState.EXPIRED.value, decided_at=now)
                )
                self._append_audit(connection, [self._expire_entry(q) for q in due], now)
                return [
                    dataclasses.replace(q, state=RequestState.EXPIRED, decided_at=now) for q in due
                ]

            batch = self._write(work)
            expired.extend(batch)
            if len(batch) < EXPIRE_BATCH:
                break
        return expired

    def count_active_grants(self, identity_key: tuple[str, str], *, now: float) -> int:
        """The identity's active, unexpired grants on all hosts (policy's
        `active_grants`; the limit itself is re-checked when a request is stored)."""
        issuer, subject = identity_key
        _check_text(issuer, "identity", MAX_IDENTITY_TEXT)
        _check_text(subject, "identity", MAX_IDENTITY_TEXT)
        now = _check_time(now)
        return self._read(lambda c: self._count_active(c, (issuer, subject), now))

    # ------------------------------------------------------------ delivery

    def host_state(self, host_id: str, *, now: float) -> tuple[int, list[SignedGrantRow]]:
        """The host's generation and its active, unexpired grants, from one statement
        (one snapshot of the database on both backends)."""
        check_host_id(host_id)
        now = _check_time(now)
        h, g = schema.hosts.c, schema.grants.c
        statement = (
            select(h.generation, g.grant_id, g.grant_bytes, g.signature, g.key_id)
            .select_from(
                schema.hosts.outerjoin(
                    schema.grants,
                    and_(g.host_id == h.host_id, g.state == "active", g.expire_time > now),
                )
            )
            .where(h.host_id == host_id, h.removed_at.is_(None))
            .order_by(g.grant_id)
        )
        rows = self._read(lambda c: c.execute(statement).all())
        if not rows:
            raise FleetError(
                "NOT_FOUND", "UNKNOWN_HOST", f"host {host_id!r} is not in the inventory", "host_id"
            )
        generation = _RowReader(rows[0], "hosts", "generation").integer("generation")
        grants = []
        for row in rows:
            if row.grant_id is None:
                continue
            r = _RowReader(row, "grants", "grant_id")
            grants.append(
                SignedGrantRow(
                    r.text("grant_id", 64),
                    r.bytes("grant_bytes"),
                    r.bytes("signature"),
                    r.text("key_id", MAX_KEY_ID),
                )
            )
        return generation, grants

    def changes_since(
        self, host_id: str, after_generation: int, *, limit: int = 1000
    ) -> list[Change] | None:
        """Changes after_generation+1..current in order; None when the log does not
        hold every one of them (pruned, a host removed and re-added, an agent ahead
        of this database) or there are more than `limit`: send a snapshot then."""
        check_host_id(host_id)
        after_generation = _check_count(after_generation, "generation")
        limit = _check_limit(limit)
        h, c = schema.hosts.c, schema.changes.c
        statement = (
            select(h.generation.label("current"), schema.changes)
            .select_from(
                schema.hosts.outerjoin(
                    schema.changes, and_(c.host_id == h.host_id, c.generation > after_generation)
                )
            )
            .where(h.host_id == host_id, h.removed_at.is_(None))
            .order_by(c.generation)
            .limit(limit + 1)
        )
        rows = self._read(lambda conn: conn.execute(statement).all())
        if not rows:
            raise FleetError(
                "NOT_FOUND", "UNKNOWN_HOST", f"host {host_id!r} is not in the inventory", "host_id"
            )
        current = _RowReader(rows[0], "hosts", "current").integer("current")
        if after_generation > current or current - after_generation > limit:
            return None
        found = [_change_from_row(r) for r in rows if r.generation is not None]
        if [ch.generation for ch in found] != list(range(after_generation + 1, current + 1)):
            return None
        return found

    def prune_changes(self, before: float) -> int:
        """Drop change-log entries older than `before` (the service passes now minus
        the longest grant lifetime); agents further behind get a snapshot."""
        before = _check_time(before, "before")
        return self._write(
            lambda c: (
                c.execute(
                    schema.changes.delete().where(schema.changes.c.created_at < before)
                ).rowcount
            )
        )

    def record_delivery(self, host_id: str, *, generation: int, kind: str, now: float) -> None:
        check_host_id(host_id)
        generation = _check_count(generation, "generation")
        kind = _check_text(kind, "kind", 32, required=True)
        now = _check_time(now)
        self._write(
            lambda c: self._append_audit(
                c,
                [
                    _Audit(
                        "broker",
                        "deliver",
                        host_id=host_id,
                        detail={"generation": generation, "kind": kind, "replica": self.replica},
                    )
                ],
                now,
            )
        )

    # ------------------------------------------------------------ audit

    def audit_records(self, *, after_seq: int = 0, limit: int | None = None) -> list[AuditRecord]:
        """Records after `after_seq` in seq order; without a limit, all of them (the
        caller pages with `after_seq` when the chain is long)."""
        after_seq = _check_count(after_seq, "after_seq")
        a = schema.audit.c
        statement = select(schema.audit).where(a.seq > after_seq).order_by(a.seq)
        if limit is not None:
            statement = statement.limit(_check_limit(limit))
        rows = self._read(lambda c: c.execute(statement).all())
        return [_audit_from_row(r) for r in rows]

    def iter_audit(self, *, page: int = MAX_LIST) -> Iterable[AuditRecord]:
        """The whole chain, page by page (bounded memory for `audit verify`)."""
        after = 0
        while True:
            records = self.audit_records(after_seq=after, limit=page)
            yield from records
            if len(records) < page:
                return
            after = records[-1].seq

    def metrics_figures(self, *, now: float) -> FleetFigures:
        """The scrape-time figures of /metrics, from one read transaction: four
        aggregate statements, each bounded by an index or the inventory's size."""
        now = _check_time(now)
        h, g = schema.hosts.c, schema.grants.c
        lag = h.generation - h.acked_generation
        behind = select(
            func.count(), func.coalesce(func.sum(lag), 0), func.coalesce(func.max(lag), 0)
        ).where(
            h.removed_at.is_(None),
            h.replica == self.replica,
            h.connected_since.is_not(None),
            h.generation > h.acked_generation,
        )
        hosts = select(func.count()).select_from(schema.hosts).where(h.removed_at.is_(None))
        active = (
            select(func.count())
            .select_from(schema.grants)
            .where(g.state == GrantState.ACTIVE.value, g.expire_time > now)
        )
        audit = select(func.coalesce(func.max(schema.audit.c.seq), 0))

        def work(connection: Connection) -> FleetFigures:
            count, total, worst = connection.execute(behind).one()
            return FleetFigures(
                hosts=int(connection.execute(hosts).scalar_one()),
                agents_behind=int(count),
                generations_behind=int(total),
                generations_behind_max=int(worst),
                grants_active=int(connection.execute(active).scalar_one()),
                audit_records=int(connection.execute(audit).scalar_one()),
            )

        return self._read(work)

    def count(self, table: str) -> int:
        """Rows in one of the store's tables (tests and the bench)."""
        tables = {
            "hosts": schema.hosts,
            "grants": schema.grants,
            "changes": schema.changes,
            "audit": schema.audit,
            "access_requests": schema.access_requests,
            "request_approvals": schema.request_approvals,
        }
        selected = tables[table]
        return int(
            self._read(lambda c: c.execute(select(func.count()).select_from(selected)).scalar_one())
        )


def _bind(name: str) -> Any:
    from sqlalchemy import bindparam

    return bindparam(name)


def _one_line(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's statement dump and links."""
    orig = getattr(exc, "orig", None)
    message = str(orig if orig is not None else exc).strip()
    first = message.splitlines()[0] if message else type(exc).__name__
    return first[:500]
