"""Fixtures the broker store suites share: every test on SQLite and on a real
PostgreSQL cluster (Debian's postgresql, started in a temp dir, once per module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from portagent.broker.fleet.store import normalise_url
from portagent.testing.postgres import PostgresCluster, postgres_available, postgres_cluster


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresCluster]:
    reason = postgres_available()
    if reason is not None:
        pytest.skip(reason)
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/broker.db"
    cluster: PostgresCluster = request.getfixturevalue("pg")
    return cluster.create_database()


@pytest.fixture
def raw(url: str) -> Iterator[Engine]:
    """A plain engine on the same database: the intruder's (or the inspector's) view
    (future=True: 2.0-style on Debian's SQLAlchemy 1.4 too)."""
    engine = create_engine(normalise_url(url), future=True)
    try:
        yield engine
    finally:
        engine.dispose()
