"""Alembic's environment for the broker: always online, on the connection the store
passes in `config.attributes["connection"]` (the store holds the migration lock)."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from portagent.broker.fleet.schema import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("the broker's migrations run through FleetStore.open, not the alembic CLI")
context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
