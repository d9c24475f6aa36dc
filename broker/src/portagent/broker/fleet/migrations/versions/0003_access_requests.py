"""Identity on grants; access requests and their approvals (ADR 0008).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

Grants gain the verified identity they are for (NULL on grants made before: they
were made by an admin's free-text subject) and the access request that produced them.
Written out in full rather than imported from schema.py, as 0001 is.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns only: ALTER TABLE ADD COLUMN on both SQLite and PostgreSQL,
    # no table rebuild, existing rows read back with identity None.
    op.add_column("grants", sa.Column("identity", sa.Text, nullable=True))
    op.add_column("grants", sa.Column("identity_issuer", sa.String(512), nullable=True))
    op.add_column("grants", sa.Column("identity_subject", sa.String(512), nullable=True))
    op.add_column("grants", sa.Column("access_request_id", sa.String(32), nullable=True))
    op.create_index(
        "ix_grants_identity_state",
        "grants",
        ["identity_issuer", "identity_subject", "state", "expire_time"],
    )
    op.create_table(
        "access_requests",
        sa.Column("request_id", sa.String(32), primary_key=True),
        sa.Column("requester", sa.Text, nullable=False),
        sa.Column("requester_issuer", sa.String(512), nullable=False),
        sa.Column("requester_subject", sa.String(512), nullable=False),
        sa.Column("host_id", sa.String(253), nullable=False),
        sa.Column("protocol", sa.String(3), nullable=False),
        sa.Column("port_first", sa.BigInteger, nullable=False),
        sa.Column("port_last", sa.BigInteger, nullable=False),
        sa.Column("sources", sa.Text, nullable=False),
        sa.Column("ttl", sa.Float, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("keep_established", sa.Boolean, nullable=False),
        sa.Column("max_connections", sa.BigInteger, nullable=False),
        sa.Column("max_grants", sa.BigInteger, nullable=False),
        sa.Column("explicit_sources", sa.Boolean, nullable=False),
        sa.Column("rule", sa.String(256), nullable=False),
        sa.Column("approvals_required", sa.BigInteger, nullable=False),
        sa.Column("approvers", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("decided_at", sa.Float, nullable=True),
        sa.Column("grant_id", sa.String(64), nullable=True),
        sa.Column("client_request_id", sa.String(64), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.UniqueConstraint(
            "requester_issuer",
            "requester_subject",
            "client_request_id",
            name="uq_access_requests_client_request_id",
        ),
    )
    op.create_index("ix_access_requests_state_expires", "access_requests", ["state", "expires_at"])
    op.create_index("ix_access_requests_host", "access_requests", ["host_id"])
    op.create_index("ix_access_requests_created", "access_requests", ["created_at", "request_id"])
    op.create_table(
        "request_approvals",
        sa.Column(
            "request_id",
            sa.String(32),
            sa.ForeignKey("access_requests.request_id", name="fk_request_approvals_request"),
            nullable=False,
        ),
        sa.Column("approver", sa.Text, nullable=False),
        sa.Column("approver_issuer", sa.String(512), nullable=False),
        sa.Column("approver_subject", sa.String(512), nullable=False),
        sa.Column("approve", sa.Boolean, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint(
            "request_id", "approver_issuer", "approver_subject", name="pk_request_approvals"
        ),
    )


def downgrade() -> None:
    op.drop_table("request_approvals")
    op.drop_index("ix_access_requests_created", table_name="access_requests")
    op.drop_index("ix_access_requests_host", table_name="access_requests")
    op.drop_index("ix_access_requests_state_expires", table_name="access_requests")
    op.drop_table("access_requests")
    op.drop_index("ix_grants_identity_state", table_name="grants")
    # SQLite drops columns from 3.35 on (bookworm has 3.40).
    for column in ("access_request_id", "identity_subject", "identity_issuer", "identity"):
        op.drop_column("grants", column)
