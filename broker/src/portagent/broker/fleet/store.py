"""The broker's store: the fleet's desired state, its change log and the audit chain,
in SQLite (one file, the default) or PostgreSQL (several replicas), through
SQLAlchemy Core (docs/adr/0007-broker-service.md).

Every write is one short transaction that also appends its audit record(s), so a
broker killed mid-request loses all of a change or none of it. Writers serialise:
SQLite through `BEGIN IMMEDIATE` (its one write lock), PostgreSQL through the host
row (`FOR UPDATE`) for generations and an advisory transaction lock for the audit
chain, which every transaction takes *last* (after all its row locks) so it can never
be part of a lock cycle. Values are checked on the way in and parsed, typed, once on
the way out: a damaged row is a StoreError here, not a crash somewhere else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
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
    AuditRecord,
    BrokerGrant,
    Change,
    ChangeKind,
    FleetError,
    GrantState,
    Host,
    StoreError,
    Usage,
    UsageRow,
)
from portagent.broker.settings import HOST_ID_PATTERN
from portagent.broker.signing import GrantRequest
from portagent.v1 import agent_pb2 as pb
from portagent.wire.codec import PROTOCOL_FROM_PB
from portagent.wire.envelope import GRANT_ID_PATTERN, MAX_REASON_LENGTH, MAX_SUBJECT_LENGTH
from portagent.wire.timestamps import seconds_of

T = TypeVar("T")
# Row is generic in 1.4 and variadic in 2.x: one alias for both.
_Row = Any

NOTIFY_CHANNEL = "portagent_changes"
# pg_advisory_xact_lock keys: arbitrary constants of this application ("port" in ASCII).
AUDIT_LOCK_KEY = 0x706F7274
MIGRATION_LOCK_KEY = 0x706F7275

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
    ) -> tuple[BrokerGrant, bool]:
        check_host_id(request.host_id, "host")
        _check_text(actor, "actor", MAX_ACTOR, required=True)
        if request_id is not None:
            _check_text(request_id, "request_id", MAX_REQUEST_ID, required=True)
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
            signer = keyring.signer_for(host.trusted_key_ids)
            signed = signer.sign_grant(request, now=now)
            grant = pb.Grant.FromString(signed.grant)
            generation = host.generation + 1
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
            }
            connection.execute(_INSERT_GRANT, values)
            connection.execute(
                _SET_GENERATION, {"p_host": host.host_id, "p_generation": generation}
            )
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
            self._append_audit(
                connection,
                [
                    _Audit(
                        actor,
                        "create",
                        host_id=host.host_id,
                        grant_id=grant.grant_id,
                        reason=request.reason,
                        detail={
                            "subject": request.subject,
                            "sources": [str(n) for n in request.sources],
                            "port": str(request.port),
                            "ttl": request.ttl,
                            "keep_established": request.keep_established,
                            "max_connections": request.max_connections,
                            "request_id": request_id,
                            "generation": generation,
                        },
                    ),
                    _Audit(
                        "broker",
                        "sign",
                        host_id=host.host_id,
                        grant_id=grant.grant_id,
                        detail={"key_id": signed.key_id},
                    ),
                ],
                now,
            )
            # What was inserted, through the same typed parse as a row read back.
            return _grant_from_row(values), True

        result = self._write(work, retry_integrity=request_id is not None)
        if result[1]:
            self._changed(result[0].host_id)
        return result

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
            connection.execute(
                update(schema.hosts)
                .where(schema.hosts.c.host_id == host.host_id)
                .values(generation=generation)
            )
            connection.execute(
                insert(schema.changes).values(
                    host_id=host.host_id,
                    generation=generation,
                    kind=ChangeKind.REVOCATION.value,
                    grant_id=grant_id,
                    payload=signed.revocation,
                    signature=signed.signature,
                    key_id=signed.key_id,
                    created_at=now,
                )
            )
            # NOTIFY before the audit append: the audit lock is held until COMMIT.
            self._notify(connection, host.host_id)
            self._append_audit(
                connection,
                [
                    _Audit(
                        actor,
                        "revoke",
                        host_id=host.host_id,
                        grant_id=grant_id,
                        reason=reason,
                        detail={"key_id": signed.key_id, "generation": generation},
                    )
                ],
                now,
            )
            changed.append(host.host_id)
            updated = connection.execute(
                select(schema.grants).where(schema.grants.c.grant_id == grant_id)
            ).one()
            return _grant_from_row(updated)

        result = self._write(work)
        for host_id in changed:
            self._changed(host_id)
        return result

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

    def count(self, table: str) -> int:
        """Rows in one of the store's tables (tests and the bench)."""
        tables = {
            "hosts": schema.hosts,
            "grants": schema.grants,
            "changes": schema.changes,
            "audit": schema.audit,
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
