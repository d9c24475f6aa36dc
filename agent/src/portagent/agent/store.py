"""Durable desired state: SQLite (WAL) under the state directory.

Holds every grant we enforce with the exact signed bytes and signature we verified,
and the revoked grant ids we must never reopen. Rows are dropped once their grant's
expire_time + clock skew has passed: the validity check refuses them after that.

Nothing read from here is trusted: the engine re-verifies every row's signature over
its bytes at load (docs/adr/0006-stored-state-integrity.md), and a row that does not
verify or parse is moved to the `quarantine` table, never enforced. Every SQLite or
OS error is mapped to `StoreError` here, where it enters, with a message naming the
file and what to do.

The store *epoch* is when this state began (the first start on an empty state
directory, or after the file was lost). A grant issued before it may have been
revoked in the state that was lost, so the engine refuses individually delivered
grants issued before the epoch (GRANT_PREDATES_STATE).
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

SCHEMA_VERSION = 2
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
    revoke_time REAL,
    key_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS revoked_ids (
    grant_id TEXT PRIMARY KEY,
    forget_after REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS broker_snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state BLOB NOT NULL,
    signature BLOB NOT NULL,
    key_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    grant_id TEXT,
    grant_bytes BLOB,
    signature BLOB,
    key_id TEXT,
    reason TEXT NOT NULL,
    quarantine_time REAL NOT NULL
);
"""

_WHAT_TO_DO = (
    "stop the agent and move the file aside (or restore a backup), then start again; with "
    "an empty state the agent enforces nothing until the broker re-sends, and access "
    "granted so far closes on its kernel timeouts"
)
_STATES = ("active", "expired", "revoked")


class StoreError(Exception):
    """The state file cannot be opened, read or written. The message names the file."""


class NewRow(NamedTuple):
    """A grant row as the engine inserts it (state active)."""

    grant_id: str
    handle: int
    grant_bytes: bytes
    signature: bytes
    key_id: str
    expire_time: float
    apply_time: float


class StoredGrant(NamedTuple):
    """A grant row as read from disk: untrusted until the engine verifies it. (A tuple:
    100k of them are made at every start straight from SQLite's rows.)"""

    grant_id: str
    handle: int
    grant_bytes: bytes
    signature: bytes
    key_id: str
    state: str
    apply_time: float
    revoke_time: float | None


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row whose columns are not even of the right types (garbled file)."""

    grant_id: str
    grant_bytes: bytes
    signature: bytes
    key_id: str
    problem: str


def _row(raw: tuple[object, ...]) -> StoredGrant | BadRow:
    grant_id, handle, blob, signature, key_id, state, applied, revoked = raw
    text_id = grant_id if isinstance(grant_id, str) else repr(grant_id)[:80]
    blob_b = blob if isinstance(blob, bytes) else b""
    sig_b = signature if isinstance(signature, bytes) else b""
    key_s = key_id if isinstance(key_id, str) else ""
    problem = None
    if not isinstance(grant_id, str):
        problem = "grant_id is not text"
    elif not isinstance(handle, int) or isinstance(handle, bool) or not 0 < handle <= MAX_HANDLE:
        problem = f"handle {handle!r} is not 1..{MAX_HANDLE}"
    elif not isinstance(blob, bytes) or not isinstance(signature, bytes):
        problem = "grant bytes or signature is not a blob"
    elif not isinstance(key_id, str):
        problem = "key_id is not text"
    elif state not in _STATES:
        problem = f"state {state!r} is not one of {', '.join(_STATES)}"
    elif not _is_time(applied) or not (revoked is None or _is_time(revoked)):
        problem = "apply_time/revoke_time is not a time"
    if problem is not None:
        return BadRow(text_id, blob_b, sig_b, key_s, problem)
    assert isinstance(grant_id, str) and isinstance(handle, int) and isinstance(state, str)
    assert isinstance(blob, bytes) and isinstance(signature, bytes) and isinstance(key_id, str)
    return StoredGrant(
        grant_id,
        handle,
        blob,
        signature,
        key_id,
        state,
        float(applied),  # type: ignore[arg-type]
        None if revoked is None else float(revoked),  # type: ignore[arg-type]
    )


_STATE_SET = frozenset(_STATES)
_new_tuple = tuple.__new__
_GRANT_QUERY = (
    "SELECT grant_id, handle, grant_bytes, signature, key_id, state, apply_time, "
    "revoke_time FROM grants"
)


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Store:
    """SQLite store. Used by one writer at a time (the engine's writer lock)."""

    def __init__(self, path: Path, *, now: float | None = None) -> None:
        self.path = path
        # (last handle given out, highest handle any row may hold), once read: while no
        # row holds a handle above the last one given out, the next ones are free without
        # a query. Only ever too high (a rolled-back claim), which costs a query, never
        # a handle in use.
        self._handles: tuple[int, int] | None = None
        try:
            self._db = self._open(path, time.time() if now is None else now)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: {_describe(exc)}; {_WHAT_TO_DO}") from None
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}; {_WHAT_TO_DO}") from None

    def _open(self, path: Path, now: float) -> sqlite3.Connection:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists() and not path.is_file():
            raise StoreError(f"{path}: is not a regular file; {_WHAT_TO_DO}")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise StoreError(
                f"{path}: not readable and writable by this process; fix its owner/mode "
                "(root, 0600) or " + _WHAT_TO_DO
            )
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise StoreError(
                f"{path}: its directory is not writable (SQLite needs it for the -wal and -shm "
                "files); fix the state directory's owner/mode"
            )
        fresh = not path.exists() or path.stat().st_size == 0
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # A garbled or half-truncated file fails here, not half-way through a load.
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise StoreError(
                    f"{path}: failed SQLite's integrity check ({str(check and check[0])[:200]}); "
                    + _WHAT_TO_DO
                )
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            fresh = fresh or "grants" not in tables
            db.execute("BEGIN IMMEDIATE")
            # One statement at a time: executescript() would commit the open transaction.
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            if fresh:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (repr(now),))
            else:
                self._migrate(db, path)
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
            raise
        path.chmod(0o600)
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection, path: Path) -> None:
        """Bring an older state file up to SCHEMA_VERSION (inside the open transaction)."""
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        text = str(row[0]) if row else "1"
        version = int(text) if text.isdigit() and len(text) < 6 else -1
        if version < 1 or version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema version {text[:20]!r} is not one this portagent reads "
                f"(1..{SCHEMA_VERSION}); if a newer portagent wrote it, upgrade the package, "
                "or " + _WHAT_TO_DO
            )
        if version < 2:
            # 0.1.0 kept no key id beside the signature: the loader tries every trusted key.
            columns = {r[1] for r in db.execute("PRAGMA table_info(grants)")}
            if "key_id" not in columns:
                db.execute("ALTER TABLE grants ADD COLUMN key_id TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        self._db.close()

    @property
    def epoch(self) -> float:
        """When this state began (0 for a state created before epochs existed)."""
        row = self._read("SELECT value FROM meta WHERE key='epoch'").fetchone()
        try:
            value = float(row[0]) if row else 0.0
        except (TypeError, ValueError):
            value = math.inf  # garbled: refuse every older grant rather than none
        return value if math.isfinite(value) or value == math.inf else math.inf

    def broker_state(self) -> tuple[int, bytes]:
        """(generation, digest) of the broker state this agent last enforced; (0, b"")
        when it holds nothing from a broker. A garbled value reads as 0: the agent then
        asks for everything again, and the broker's snapshot is still verified."""
        rows = dict(
            self._read(
                "SELECT key, value FROM meta WHERE key IN ('broker_generation', 'broker_digest')"
            ).fetchall()
        )
        text = rows.get("broker_generation")
        digest_hex = rows.get("broker_digest")
        if not isinstance(text, str) or not text.isdigit() or len(text) > 20:
            return 0, b""
        try:
            digest = bytes.fromhex(digest_hex) if isinstance(digest_hex, str) else b""
        except ValueError:
            digest = b""
        generation = int(text)
        return (generation, digest) if generation < 2**64 else (0, b"")

    def set_broker_state(self, generation: int, digest: bytes) -> None:
        """Record the broker generation now enforced (its own small transaction, after the
        kernel commit: what is stored may lag what is enforced, never lead it)."""
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('broker_generation', ?)", (str(generation),)
            )
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('broker_digest', ?)", (digest.hex(),)
            )

    def set_broker_snapshot(self, state: bytes, signature: bytes, key_id: str) -> None:
        """Keep the last broker snapshot enforced, exactly as signed: at the next start
        its one signature vouches for the stored grants it carries (instead of one
        signature check per row). Its own small transaction, like set_broker_state."""
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO broker_snapshot VALUES (1, ?, ?, ?)",
                (state, signature, key_id),
            )

    def broker_snapshot(self) -> tuple[bytes, bytes, str] | None:
        """(state, signature, key id) of the stored snapshot, or None (also when a column
        has the wrong type: the engine then checks every row on its own)."""
        row = self._read("SELECT state, signature, key_id FROM broker_snapshot").fetchone()
        if row is None:
            return None
        state, signature, key_id = row
        if isinstance(state, bytes) and isinstance(signature, bytes) and isinstance(key_id, str):
            return state, signature, key_id
        return None

    def forget_broker_state(self) -> bool:
        """Drop the broker generation (its database was wiped and counts from 1 again):
        the next snapshot is accepted whatever its generation. True if one was held."""
        with self.transaction():
            cursor = self._db.execute(
                "DELETE FROM meta WHERE key IN ('broker_generation', 'broker_digest')"
            )
        return cursor.rowcount > 0

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {_describe(exc)}") from None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all. A failed COMMIT (disk full,
        read-only) rolls back and raises StoreError: nothing of it is on disk."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot write: {_describe(exc)}") from None
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as exc:
            if self._db.in_transaction:
                # If even that fails, the connection drops what it could not commit.
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"{self.path}: cannot write: {_describe(exc)}") from None
            raise

    def load(self) -> list[StoredGrant | BadRow]:
        """Every grant row, typed but not verified (the engine verifies)."""
        try:
            rows = self._db.execute(_GRANT_QUERY).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {_describe(exc)}") from None
        loaded: list[StoredGrant | BadRow] = []
        append, isfinite, states = loaded.append, math.isfinite, _STATE_SET
        for raw in rows:
            # The usual row, checked inline and kept as the tuple SQLite made (100k rows
            # at every start); anything else (an integer time, a garbled column) goes
            # through _row, which converts it or says what is wrong.
            grant_id, handle, blob, signature, key_id, state, applied, revoked = raw
            if (
                type(grant_id) is str
                and type(handle) is int
                and 0 < handle <= MAX_HANDLE
                and type(blob) is bytes
                and type(signature) is bytes
                and type(key_id) is str
                and state in states
                and type(applied) is float
                and isfinite(applied)
                and (revoked is None or (type(revoked) is float and isfinite(revoked)))
            ):
                append(_new_tuple(StoredGrant, raw))
            else:
                append(_row(raw))
        return loaded

    def quarantine(self, rows: list[tuple[str, bytes, bytes, str, str]], now: float) -> None:
        """Move rows (grant_id, bytes, signature, key id, reason) out of `grants`: they are
        kept for inspection and never loaded again."""
        self._db.executemany(
            "INSERT INTO quarantine VALUES (?, ?, ?, ?, ?, ?)",
            [(g, b, s, k, r, now) for g, b, s, k, r in rows],
        )
        self._db.executemany("DELETE FROM grants WHERE grant_id=?", [(r[0],) for r in rows])

    def revoked_ids(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for grant_id, forget_after in self._read("SELECT grant_id, forget_after FROM revoked_ids"):
            if isinstance(grant_id, str) and _is_time(forget_after):
                found[grant_id] = float(forget_after)
            elif isinstance(grant_id, str):
                # A garbled time: remember it as long as any grant could live.
                found[grant_id] = math.inf
        return found

    def next_handle(self) -> int:
        return self.next_handles(1)[0]

    def next_handles(self, count: int) -> list[int]:
        """`count` free handles after the last one given out, recorded as given out (in
        the caller's transaction)."""
        found = self.free_handles(count)
        self.claim_handles(found)
        return found

    def free_handles(self, count: int) -> list[int]:
        """`count` free handles after the last one given out (wrapping at MAX_HANDLE), each
        window of candidates checked against the table with one query. Reads only: the
        engine picks handles before its kernel batch and writes the rows (and
        `claim_handles`) after it, in one transaction; it is the store's only writer, so
        nothing takes them in between."""
        if count <= 0:
            return []
        if self._handles is None:
            row = self._db.execute("SELECT value FROM meta WHERE key='last_handle'").fetchone()
            try:
                last = int(row[0]) if row else 0
            except (TypeError, ValueError):
                last = 0
            top = self._db.execute("SELECT max(handle) FROM grants").fetchone()[0]
            # No rows: 0. A value that is not an integer (a damaged file): always query.
            highest = 0 if top is None else top if isinstance(top, int) else MAX_HANDLE
            self._handles = (last, highest)
        last, highest = self._handles
        last = last if 0 <= last <= MAX_HANDLE else 0
        if highest <= last and last + count <= MAX_HANDLE:
            return list(range(last + 1, last + count + 1))
        found: list[int] = []
        # Bounded: each window holds at least `count` candidates; wrapping around the whole
        # 32-bit space would need billions of live grants.
        for _ in range(10_000):
            high = min(last + 2 * (count - len(found)) + 16, MAX_HANDLE)
            used = {
                r[0]
                for r in self._db.execute(
                    "SELECT handle FROM grants WHERE handle > ? AND handle <= ?", (last, high)
                )
            }
            for handle in range(last + 1, high + 1):
                if handle not in used:
                    found.append(handle)
                    if len(found) == count:
                        break
            if len(found) == count:
                break
            last = high if high < MAX_HANDLE else 0
        else:  # pragma: no cover - needs billions of live grants
            raise StoreError(f"{self.path}: no free grant handle")
        return found

    def claim_handles(self, handles: list[int]) -> None:
        """Record the last of `handles` (from `free_handles`) as the last one given out."""
        if handles:
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('last_handle', ?)", (str(handles[-1]),)
            )
            highest = self._handles[1] if self._handles is not None else MAX_HANDLE
            self._handles = (handles[-1], max(highest, *handles))

    def insert_many(self, rows: Iterable[NewRow]) -> None:
        """New active grants, one statement for the batch."""
        top = 0

        def noting_handles() -> Iterator[NewRow]:
            # These handles need not come from claim_handles: the highest one counts.
            nonlocal top
            for row in rows:
                top = max(top, row.handle)
                yield row

        self._db.executemany(
            "INSERT INTO grants (grant_id, handle, grant_bytes, signature, key_id, expire_time, "
            "apply_time, state, revoke_time) VALUES (?, ?, ?, ?, ?, ?, ?, 'active', NULL)",
            noting_handles(),
        )
        if self._handles is not None and top > self._handles[1]:
            self._handles = (self._handles[0], top)

    def insert(
        self,
        *,
        grant_id: str,
        handle: int,
        grant_bytes: bytes,
        signature: bytes,
        key_id: str,
        expire_time: float,
        state: str,
        apply_time: float,
    ) -> None:
        self._handles = None  # read again: `handle` need not come from claim_handles
        self._db.execute(
            "INSERT INTO grants (grant_id, handle, grant_bytes, signature, expire_time, state, "
            "apply_time, revoke_time, key_id) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)",
            (grant_id, handle, grant_bytes, signature, expire_time, state, apply_time, key_id),
        )

    def mark_revoked(self, grant_id: str, when: float) -> None:
        self.mark_revoked_many([grant_id], when)

    def mark_revoked_many(self, grant_ids: list[str], when: float) -> None:
        """One statement for a batch's revocations (each call gives the GIL away)."""
        if grant_ids:
            self._db.executemany(
                "UPDATE grants SET state='revoked', revoke_time=? WHERE grant_id=?",
                [(when, grant_id) for grant_id in grant_ids],
            )

    def mark_expired(self, grant_ids: list[str]) -> None:
        self._db.executemany(
            "UPDATE grants SET state='expired' WHERE grant_id=?", [(g,) for g in grant_ids]
        )

    def remember_revoked(self, grant_id: str, forget_after: float) -> None:
        self.remember_revoked_many([(grant_id, forget_after)])

    def remember_revoked_many(self, ids: list[tuple[str, float]]) -> None:
        """(grant id, forget after) pairs, one statement for a batch."""
        if ids:
            self._db.executemany("INSERT OR REPLACE INTO revoked_ids VALUES (?, ?)", ids)

    def delete(self, grant_ids: list[str]) -> None:
        self._db.executemany("DELETE FROM grants WHERE grant_id=?", [(g,) for g in grant_ids])

    def forget_revoked_before(self, now: float) -> int:
        cursor = self._db.execute("DELETE FROM revoked_ids WHERE forget_after < ?", (now,))
        return cursor.rowcount


def _describe(exc: sqlite3.Error) -> str:
    text = str(exc) or type(exc).__name__
    if "not a database" in text or "malformed" in text:
        return f"not a valid portagent state file ({text})"
    if "readonly" in text or "read-only" in text:
        return f"the file or its file system is read-only ({text})"
    if "disk is full" in text or "disk I/O" in text:
        return f"{text} (check free space on the state directory's file system)"
    return text
