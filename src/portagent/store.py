"""Durable desired state: SQLite (WAL) under the state directory.

Holds every grant we enforce with the exact signed bytes we verified, and the
revoked grant ids we must never reopen. Rows are dropped once their grant's
expire_time + clock skew has passed: the validity check refuses them after that.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from portagent.codec import grant_from_pb
from portagent.model import GrantRecord, GrantState
from portagent.v1 import agent_pb2 as pb

SCHEMA_VERSION = 1
MAX_HANDLE = 0xFFFFFFFF  # ct mark is 32 bits; 0 means "no grant"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS grants (
    grant_id TEXT PRIMARY KEY,
    handle INTEGER NOT NULL UNIQUE,
    grant_bytes BLOB NOT NULL,
    signature BLOB NOT NULL,
    expire_time REAL NOT NULL,
    state TEXT NOT NULL,
    apply_time REAL NOT NULL,
    revoke_time REAL
);
CREATE TABLE IF NOT EXISTS revoked_ids (
    grant_id TEXT PRIMARY KEY,
    forget_after REAL NOT NULL
);
"""


class StoreError(Exception):
    pass


class Store:
    """SQLite store. Used from the daemon's single writer thread only."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"{path}: schema version {row[0]}, this agent reads {SCHEMA_VERSION}")
        path.chmod(0o600)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def load(self) -> list[GrantRecord]:
        # The signature stays on disk: memory holds only what is served.
        rows = self._db.execute(
            "SELECT handle, grant_bytes, state, apply_time, revoke_time FROM grants"
        )
        return [
            GrantRecord(
                grant=grant_from_pb(pb.Grant.FromString(blob)),
                handle=handle,
                grant_bytes=blob,
                signature=b"",
                state=GrantState(state),
                apply_time=applied,
                revoke_time=revoked,
            )
            for handle, blob, state, applied, revoked in rows
        ]

    def revoked_ids(self) -> dict[str, float]:
        return dict(self._db.execute("SELECT grant_id, forget_after FROM revoked_ids"))

    def next_handle(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='last_handle'").fetchone()
        last = int(row[0]) if row else 0
        for _ in range(1000):
            last = last % MAX_HANDLE + 1
            if self._db.execute("SELECT 1 FROM grants WHERE handle=?", (last,)).fetchone() is None:
                break
        else:  # pragma: no cover - needs a billion live grants
            raise StoreError("no free grant handle")
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('last_handle', ?)", (str(last),))
        return last

    def insert(self, record: GrantRecord) -> None:
        self._db.execute(
            "INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.grant.grant_id,
                record.handle,
                record.grant_bytes,
                record.signature,
                record.grant.expire_time,
                record.state.value,
                record.apply_time,
                record.revoke_time,
            ),
        )

    def mark_revoked(self, grant_id: str, when: float) -> None:
        self._db.execute(
            "UPDATE grants SET state=?, revoke_time=? WHERE grant_id=?",
            (GrantState.REVOKED.value, when, grant_id),
        )

    def mark_expired(self, grant_id: str) -> None:
        self._db.execute(
            "UPDATE grants SET state=? WHERE grant_id=?", (GrantState.EXPIRED.value, grant_id)
        )

    def remember_revoked(self, grant_id: str, forget_after: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO revoked_ids VALUES (?, ?)", (grant_id, forget_after)
        )

    def delete(self, grant_ids: list[str]) -> None:
        self._db.executemany("DELETE FROM grants WHERE grant_id=?", [(g,) for g in grant_ids])

    def forget_revoked_before(self, now: float) -> int:
        cursor = self._db.execute("DELETE FROM revoked_ids WHERE forget_after < ?", (now,))
        return cursor.rowcount
