"""The broker database's tables (SQLAlchemy Core), as migration 0001 creates them.

A test compares this metadata with what the migrations build, so the two cannot
drift apart. Times are POSIX seconds (double precision); labels, key ids and audit
details are canonical JSON text, parsed and checked by the store when read.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

hosts = Table(
    "hosts",
    metadata,
    Column("host_id", String(253), primary_key=True),
    Column("broker_labels", Text, nullable=False),
    Column("agent_labels", Text, nullable=False),
    Column("agent_version", String(128), nullable=False),
    Column("trusted_key_ids", Text, nullable=False),
    Column("generation", BigInteger, nullable=False),
    Column("acked_generation", BigInteger, nullable=False),
    Column("connected_since", Float, nullable=True),
    Column("replica", String(128), nullable=False),
    Column("last_seen", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    # A removed host keeps its row (and generation): re-adding it must not start its
    # generations again at 1, which its agent would refuse as a replay.
    Column("removed_at", Float, nullable=True),
)

grants = Table(
    "grants",
    metadata,
    Column("grant_id", String(64), primary_key=True),
    Column("host_id", String(253), nullable=False),
    Column("subject", String(256), nullable=False),
    Column("sources", Text, nullable=False),
    Column("protocol", String(3), nullable=False),
    Column("port_first", BigInteger, nullable=False),
    Column("port_last", BigInteger, nullable=False),
    Column("not_before", Float, nullable=False),
    Column("expire_time", Float, nullable=False),
    Column("issue_time", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("key_id", String(128), nullable=False),
    Column("grant_bytes", LargeBinary, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("state", String(8), nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("generation", BigInteger, nullable=False),
    Column("request_id", String(128), nullable=True, unique=True),
    Column("request_hash", String(64), nullable=True),
    Column("revoked_at", Float, nullable=True),
    Column("revoked_by", String(256), nullable=True),
    Column("revoke_reason", Text, nullable=True),
    Column("usage_connections", BigInteger, nullable=False),
    Column("usage_packets", BigInteger, nullable=False),
    Column("usage_bytes", BigInteger, nullable=False),
    Column("usage_last_seen", Float, nullable=True),
    Index("ix_grants_host_state_expire", "host_id", "state", "expire_time"),
    Index("ix_grants_state_expire", "state", "expire_time"),
)

changes = Table(
    "changes",
    metadata,
    Column("host_id", String(253), primary_key=True),
    Column("generation", BigInteger, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("grant_id", String(64), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("key_id", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_changes_created_at", "created_at"),
)

audit = Table(
    "audit",
    metadata,
    # seq is assigned by the writer under the audit lock: it is part of the hash.
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time", Float, nullable=False),
    Column("actor", String(256), nullable=False),
    Column("action", String(32), nullable=False),
    Column("host_id", String(253), nullable=False),
    Column("grant_id", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
