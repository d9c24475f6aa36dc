"""The broker database's tables (SQLAlchemy Core), as migrations 0001-0003 build them.

A test compares this metadata with what the migrations build, so the two cannot
drift apart. Times are POSIX seconds (double precision); labels, key ids and audit
details are canonical JSON text, parsed and checked by the store when read.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
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
    # 0003: who the grant is for (Identity.to_json(); NULL for grants made before),
    # its (issuer, subject) apart for the per-identity count of active grants, and the
    # access request that produced it.
    Column("identity", Text, nullable=True),
    Column("identity_issuer", String(512), nullable=True),
    Column("identity_subject", String(512), nullable=True),
    Column("access_request_id", String(32), nullable=True),
    Index("ix_grants_host_state_expire", "host_id", "state", "expire_time"),
    Index("ix_grants_state_expire", "state", "expire_time"),
    Index(
        "ix_grants_identity_state",
        "identity_issuer",
        "identity_subject",
        "state",
        "expire_time",
    ),
)

access_requests = Table(
    "access_requests",
    metadata,
    Column("request_id", String(32), primary_key=True),
    Column("requester", Text, nullable=False),  # Identity.to_json()
    Column("requester_issuer", String(512), nullable=False),
    Column("requester_subject", String(512), nullable=False),
    Column("host_id", String(253), nullable=False),
    Column("protocol", String(3), nullable=False),
    Column("port_first", BigInteger, nullable=False),
    Column("port_last", BigInteger, nullable=False),
    Column("sources", Text, nullable=False),
    Column("ttl", Float, nullable=False),
    Column("reason", Text, nullable=False),
    # What the grant made on approval carries besides the above (the grant request's
    # own options), so it is the grant an immediate answer would have made.
    Column("keep_established", Boolean, nullable=False),
    Column("max_connections", BigInteger, nullable=False),
    # The rule's @max_grants, checked again when the last approval makes the grant.
    Column("max_grants", BigInteger, nullable=False),
    Column("explicit_sources", Boolean, nullable=False),
    Column("rule", String(256), nullable=False),
    Column("approvals_required", BigInteger, nullable=False),
    Column("approvers", String(256), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("decided_at", Float, nullable=True),
    Column("grant_id", String(64), nullable=True),
    Column("client_request_id", String(64), nullable=True),
    Column("fingerprint", String(64), nullable=False),
    UniqueConstraint(
        "requester_issuer",
        "requester_subject",
        "client_request_id",
        name="uq_access_requests_client_request_id",
    ),
    Index("ix_access_requests_state_expires", "state", "expires_at"),
    Index("ix_access_requests_host", "host_id"),
    Index("ix_access_requests_created", "created_at", "request_id"),
)

request_approvals = Table(
    "request_approvals",
    metadata,
    Column(
        "request_id",
        String(32),
        ForeignKey("access_requests.request_id", name="fk_request_approvals_request"),
        nullable=False,
    ),
    Column("approver", Text, nullable=False),  # Identity.to_json()
    Column("approver_issuer", String(512), nullable=False),
    Column("approver_subject", String(512), nullable=False),
    Column("approve", Boolean, nullable=False),
    Column("time", Float, nullable=False),
    Column("comment", Text, nullable=False),
    # One vote per identity and request: the key itself refuses a second one.
    PrimaryKeyConstraint(
        "request_id", "approver_issuer", "approver_subject", name="pk_request_approvals"
    ),
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
