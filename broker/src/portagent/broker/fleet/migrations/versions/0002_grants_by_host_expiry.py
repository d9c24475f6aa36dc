"""Grants by (host, state, expiry): the snapshot query's index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

`host_state` asks for one host's active, unexpired grants. Without statistics SQLite
chose the (state, expire_time) index for it, a scan of every active grant in the
fleet (5 ms per snapshot at 10,000 grants, and a 10,000-agent first connection stalled
at ~10 agents/s; docs/benchmarks.md, scenario 7). An index that serves all three terms
is the one any planner takes; it also covers what (host_id, state) served.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_grants_host_state_expire", "grants", ["host_id", "state", "expire_time"])
    op.drop_index("ix_grants_host_state", table_name="grants")


def downgrade() -> None:
    op.create_index("ix_grants_host_state", "grants", ["host_id", "state"])
    op.drop_index("ix_grants_host_state_expire", table_name="grants")
