"""The state file: every failure named with the file, a migration from 0.1.0, the epoch."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from portagent.agent.store import (
    MAX_HANDLE,
    SCHEMA_VERSION,
    BadRow,
    NewRow,
    Store,
    StoredGrant,
    StoreError,
)

V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE grants (
    grant_id TEXT PRIMARY KEY, handle INTEGER NOT NULL UNIQUE, grant_bytes BLOB NOT NULL,
    signature BLOB NOT NULL, expire_time REAL NOT NULL, state TEXT NOT NULL,
    apply_time REAL NOT NULL, revoke_time REAL);
CREATE TABLE revoked_ids (grant_id TEXT PRIMARY KEY, forget_after REAL NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO grants VALUES ('g-1', 7, x'0a03672d31', x'00', 2e9, 'active', 1.7e9, NULL);
INSERT INTO revoked_ids VALUES ('g-0', 2e9);
"""


def _insert(store: Store, grant_id: str, handle: int, *, apply_time: float = 1.0) -> None:
    """One active row through Store.insert (its bytes are not a grant: the store does
    not parse them)."""
    store.insert(
        grant_id=grant_id,
        handle=handle,
        grant_bytes=b"x",
        signature=b"s",
        key_id="k",
        expire_time=2e9,
        state="active",
        apply_time=apply_time,
    )


def test_a_new_store_starts_an_epoch(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", now=1234.5)
    assert store.epoch == 1234.5
    store.close()
    assert Store(tmp_path / "state.db", now=9999.0).epoch == 1234.5  # kept across opens


def test_a_zero_byte_file_is_a_new_state(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"")
    assert Store(path, now=42.0).epoch == 42.0


def test_a_state_from_0_1_0_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.close()
    store = Store(path, now=5000.0)
    assert store.epoch == 0.0  # it existed before epochs: no grant is refused for its age
    (row,) = store.load()
    assert isinstance(row, StoredGrant)
    assert (row.grant_id, row.handle, row.key_id, row.state) == ("g-1", 7, "", "active")
    assert store.revoked_ids() == {"g-0": 2e9}
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    db.close()


def test_a_newer_schema_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=r"state\.db: schema version '99'"):
        Store(path)


@pytest.mark.parametrize(
    "damage",
    ["garbage", "half", "directory", "read-only"],
)
def test_a_damaged_file_is_one_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    for i in range(200):  # enough pages that half a file is a broken database
        with store.transaction():
            store.insert(
                grant_id=f"g-{i}",
                handle=i + 1,
                grant_bytes=os.urandom(300),
                signature=b"s" * 64,
                key_id="k",
                expire_time=2e9,
                state="active",
                apply_time=1.0,
            )
    store.close()
    if damage == "garbage":
        path.write_bytes(os.urandom(path.stat().st_size))
    elif damage == "half":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.chmod(0o400)
        if os.geteuid() == 0:
            pytest.skip("root writes read-only files; the directory case covers root")
    with pytest.raises(StoreError) as info:
        Store(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "move the file aside" in message or "owner/mode" in message


def test_a_read_only_state_directory_is_named(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory modes")
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o500)
    with pytest.raises(StoreError, match="directory is not writable"):
        Store(state / "state.db")


def test_rows_of_the_wrong_types_come_back_as_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    with store.transaction():
        _insert(store, "g-1", 1)
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE grants SET handle='one', apply_time='never'")
    db.commit()
    db.close()
    (row,) = Store(path).load()
    assert isinstance(row, BadRow) and "handle" in row.problem


def test_a_failed_commit_leaves_nothing_and_the_store_usable(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    with pytest.raises(StoreError, match="cannot write"), store.transaction():
        _insert(store, "g-1", 1)
        _insert(store, "g-2", 1)  # same handle: the transaction fails as a whole
    assert store.load() == []
    with store.transaction():
        store.remember_revoked("g-9", 3e9)
    assert store.revoked_ids() == {"g-9": 3e9}


def test_load_checks_every_column_and_reads_integer_times_as_floats(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    with store.transaction():
        for i in range(1, 9):
            _insert(store, f"g-{i}", i, apply_time=1.5)
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE grants SET apply_time=7, revoke_time=8, state='revoked' WHERE handle=1")
    garble = {
        2: "handle=4294967296",
        3: "apply_time=9e999",  # SQLite keeps infinity as a REAL
        4: "revoke_time='soon'",
        5: "grant_bytes='text, not a blob'",
        6: "state='gone'",
        7: "grant_id=x'00'",
    }
    for handle, change in garble.items():
        db.execute(f"UPDATE grants SET {change} WHERE handle={handle}")
    db.commit()
    db.close()
    rows = Store(path).load()
    good = [r for r in rows if isinstance(r, StoredGrant)]
    bad = sorted(r.problem for r in rows if isinstance(r, BadRow))
    assert [(r.grant_id, r.state, r.apply_time, r.revoke_time) for r in good] == [
        ("g-1", "revoked", 7.0, 8.0),
        ("g-8", "active", 1.5, None),
    ]
    assert all(type(r.apply_time) is float for r in good)
    assert len(bad) == len(garble)
    assert any("handle 4294967296" in p for p in bad)
    assert any("state 'gone'" in p for p in bad)
    assert sum("apply_time/revoke_time" in p for p in bad) == 2


def _row(grant_id: str, handle: int) -> NewRow:
    return NewRow(grant_id, handle, b"x", b"s", "k", 2e9, 1e9)


def test_handles_are_never_given_out_twice_whatever_the_rows_hold(tmp_path: Path) -> None:
    """The engine reads free handles before its kernel batch and claims them in the
    transaction after it; rows written any other way (insert, a wrap of the 32-bit
    space, a damaged file) are never handed out again."""
    store = Store(tmp_path / "state.db")
    first = store.free_handles(3)
    assert first == [1, 2, 3]
    with store.transaction():
        store.claim_handles(first)
        store.insert_many(_row(f"g-{h}", h) for h in first)
    assert store.free_handles(1) == [4]
    with store.transaction():  # a row whose handle the engine did not pick
        _insert(store, "x-6", 6, apply_time=1e9)
    assert store.free_handles(4) == [4, 5, 7, 8]
    with pytest.raises(StoreError), store.transaction():  # a claim that rolls back
        store.claim_handles([4, 5])
        store.insert_many([_row("g-4", 4), _row("g-5", 5), _row("g-dup", 6)])
    used = {r.handle for r in store.load() if isinstance(r, StoredGrant)}
    assert used == {1, 2, 3, 6}
    after = store.free_handles(2)
    assert after == [7, 8], "a gap where the claim rolled back, and 6 is taken"
    store.close()

    # Near the top of the 32-bit space the allocation wraps and skips every used handle.
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('last_handle', ?)", (str(MAX_HANDLE - 1),))
    db.commit()
    db.close()
    store = Store(tmp_path / "state.db")
    used = {r.handle for r in store.load() if isinstance(r, StoredGrant)}
    wrapped = store.free_handles(4)
    assert wrapped[0] == MAX_HANDLE and not used & set(wrapped) and len(set(wrapped)) == 4
    store.close()

    # A handle that is not an integer (a damaged row): every allocation asks the file.
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("UPDATE grants SET handle='one' WHERE grant_id='g-1'")
    db.commit()
    db.close()
    store = Store(tmp_path / "state.db")
    assert 6 not in store.free_handles(10)
    store.close()
