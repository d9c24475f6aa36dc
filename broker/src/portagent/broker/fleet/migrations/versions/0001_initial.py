"""The broker's first schema: hosts, grants, the change log, the audit chain.

Revision ID: 0001
Revises:
Create Date: 2026-11-30

Written out in full rather than imported from schema.py: a migration describes the
schema as it was at this revision, whatever schema.py says later.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("host_id", sa.String(253), primary_key=True),
        sa.Column("broker_labels", sa.Text, nullable=False),
        sa.Column("agent_labels", sa.Text, nullable=False),
        sa.Column("agent_version", sa.String(128), nullable=False),
        sa.Column("trusted_key_ids", sa.Text, nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("acked_generation", sa.BigInteger, nullable=False),
        sa.Column("connected_since", sa.Float, nullable=True),
        sa.Column("replica", sa.String(128), nullable=False),
        sa.Column("last_seen", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("removed_at", sa.Float, nullable=True),
    )
    op.create_table(
        "grants",
        sa.Column("grant_id", sa.String(64), primary_key=True),
        sa.Column("host_id", sa.String(253), nullable=False),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("sources", sa.Text, nullable=False),
        sa.Column("protocol", sa.String(3), nullable=False),
        sa.Column("port_first", sa.BigInteger, nullable=False),
        sa.Column("port_last", sa.BigInteger, nullable=False),
        sa.Column("not_before", sa.Float, nullable=False),
        sa.Column("expire_time", sa.Float, nullable=False),
        sa.Column("issue_time", sa.Float, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("grant_bytes", sa.LargeBinary, nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("revoked_by", sa.String(256), nullable=True),
        sa.Column("revoke_reason", sa.Text, nullable=True),
        sa.Column("usage_connections", sa.BigInteger, nullable=False),
        sa.Column("usage_packets", sa.BigInteger, nullable=False),
        sa.Column("usage_bytes", sa.BigInteger, nullable=False),
        sa.Column("usage_last_seen", sa.Float, nullable=True),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("ix_grants_host_state", "grants", ["host_id", "state"])
    op.create_index("ix_grants_state_expire", "grants", ["state", "expire_time"])
    op.create_table(
        "changes",
        sa.Column("host_id", sa.String(253), primary_key=True),
        sa.Column("generation", sa.BigInteger, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("grant_id", sa.String(64), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_changes_created_at", "changes", ["created_at"])
    op.create_table(
        "audit",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("host_id", sa.String(253), nullable=False),
        sa.Column("grant_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    for table in ("audit", "changes", "grants", "hosts"):
        op.drop_table(table)
