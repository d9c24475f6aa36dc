"""Alembic migrations of the broker database, run by the store at start
(portagent.broker.fleet.store.migrate); no alembic.ini is needed."""
