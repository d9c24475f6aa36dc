"""The broker's store against real databases: a SQLite file and a throwaway PostgreSQL 15
cluster started by this module (portagent.testing.postgres), never a mock.

Every behaviour runs on both. PostgreSQL-only: NOTIFY reaches a real LISTEN connection
when (and only when) the change commits, and the store survives a server restart.
Tampering is done the way an intruder would: plain SQL on the audit table.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from portagent.broker.fleet import schema
from portagent.broker.fleet.audit import verify_chain
from portagent.broker.fleet.keyring import KeyRing, generate_key
from portagent.broker.fleet.model import (
    ChangeKind,
    FleetError,
    GrantState,
    StoreError,
    UsageRow,
)
from portagent.broker.fleet.store import (
    NOTIFY_CHANNEL,
    POSTGRESQL_DRIVER,
    FleetStore,
)
from portagent.broker.signing import GrantRequest, grant_request
from portagent.testing.postgres import (
    PostgresCluster,
    free_port,
    postgres_available,
    postgres_cluster,
)
from portagent.v1 import agent_pb2 as pb

pytestmark = [pytest.mark.root]

T0 = 1_800_000_000.0


@pytest.fixture
def store(url: str) -> Iterator[FleetStore]:
    opened = FleetStore.open(url, replica="r1")
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    generate_key(tmp_path / "keys", now=T0 - 86400)
    generate_key(tmp_path / "keys", now=T0)
    return KeyRing.load(tmp_path / "keys")


def request_for(
    host: str = "web1", port: str = "22", ttl: float = 3600.0, **kw: Any
) -> GrantRequest:
    return grant_request(
        host_id=host,
        subject=kw.pop("subject", "alice"),
        sources=["10.0.0.1"],
        port=port,
        ttl=ttl,
        **kw,
    )


def fleet_error(info: pytest.ExceptionInfo[FleetError]) -> tuple[str, str, str | None]:
    return info.value.status, info.value.reason, info.value.field


def chain_ok(store: FleetStore) -> None:
    report = verify_chain(store.audit_records())
    assert report.ok, report.problem


# ------------------------------------------------------------------ opening, migrations


def test_open_migrates_an_empty_database_and_reopens_at_head(url: str, raw: Engine) -> None:
    FleetStore.open(url).close()
    with raw.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0003"
    # already at head: opens again, nothing to do, data kept
    store = FleetStore.open(url)
    store.add_host("web1", {}, actor="admin:a", now=T0)
    store.close()
    store = FleetStore.open(url)
    assert store.get_host("web1") is not None
    store.close()


def test_migrations_build_exactly_the_schema(store: FleetStore, raw: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with raw.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diff == []


def test_a_database_at_0001_is_upgraded_with_its_rows(url: str, raw: Engine) -> None:
    from alembic import command

    from portagent.broker.fleet.store import _migrations_config

    with raw.connect() as conn:
        command.upgrade(_migrations_config(conn), "0001")
        conn.commit()
        conn.execute(
            text(
                "INSERT INTO hosts (host_id, broker_labels, agent_labels, agent_version,"
                " trusted_key_ids, generation, acked_generation, replica, created_at)"
                " VALUES ('old1', '{}', '{}', '', '[]', 7, 7, '', 1)"
            )
        )
        conn.commit()
    store = FleetStore.open(url)
    try:
        host = store.get_host("old1")
        assert host is not None and host.generation == 7
    finally:
        store.close()
    with raw.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0003"


def test_the_snapshot_query_uses_the_host_index_on_sqlite(tmp_path: Path) -> None:
    """Without statistics SQLite once planned host_state through (state, expire_time),
    a scan of the whole fleet's active grants (docs/benchmarks.md, scenario 7)."""
    url = f"sqlite:///{tmp_path}/broker.db"
    FleetStore.open(url).close()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            plan = " ".join(
                str(row[-1])
                for row in conn.execute(
                    text(
                        "EXPLAIN QUERY PLAN SELECT g.grant_id FROM hosts h LEFT OUTER JOIN"
                        " grants g ON g.host_id = h.host_id AND g.state = 'active'"
                        " AND g.expire_time > 5 WHERE h.host_id = 'web1'"
                    )
                )
            )
    finally:
        engine.dispose()
    assert "ix_grants_host_state_expire" in plan, plan


def test_a_newer_schema_is_refused(url: str, raw: Engine) -> None:
    FleetStore.open(url).close()
    with raw.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(StoreError, match=r"'0099' is newer than this broker"):
        FleetStore.open(url)


def test_unusable_databases_are_named(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database file at all" * 100)
    with pytest.raises(StoreError, match=r"garbage\.db"):
        FleetStore.open(f"sqlite:///{garbage}")
    with pytest.raises(StoreError, match="missing"):
        FleetStore.open(f"sqlite:///{tmp_path}/missing/dir/broker.db")
    with pytest.raises(StoreError, match="needs a file path"):
        FleetStore.open("sqlite:///:memory:")
    with pytest.raises(StoreError, match="unsupported database"):
        FleetStore.open("mysql://u@h/db")
    with pytest.raises(StoreError, match="not a database URL"):
        FleetStore.open("not a url")


def test_an_unreachable_postgresql_is_named(pg: PostgresCluster) -> None:
    port = free_port()  # nothing listens there: connection refused
    with pytest.raises(StoreError, match=rf"127\.0\.0\.1:{port}"):
        FleetStore.open(f"postgresql://postgres@127.0.0.1:{port}/portagent")


def test_postgresql_url_is_rewritten_to_the_driver_at_hand(pg: PostgresCluster) -> None:
    url = pg.create_database().replace("postgresql+psycopg://", "postgresql://")
    store = FleetStore.open(url)
    try:
        assert store.is_postgresql and store.url.startswith(f"{POSTGRESQL_DRIVER}://")
    finally:
        store.close()


# ------------------------------------------------------------------ inventory


def test_inventory(store: FleetStore) -> None:
    host = store.add_host("web1", {"env": "prod", "team": "a"}, actor="admin:a", now=T0)
    assert (host.host_id, host.broker_labels, host.generation, host.created_at) == (
        "web1",
        {"env": "prod", "team": "a"},
        0,
        T0,
    )
    store.add_host("web2", {"env": "dev"}, actor="admin:a", now=T0)
    with pytest.raises(FleetError) as info:
        store.add_host("web1", {}, actor="admin:a", now=T0)
    assert fleet_error(info) == ("ALREADY_EXISTS", "HOST_EXISTS", "host_id")

    store.agent_connected(
        "web2", agent_version="0.2", agent_labels={"team": "a", "env": "agent-says"},
        trusted_key_ids=[], generation=0, now=T0,
    )  # fmt: skip
    # effective labels: the agent's, overridden by the broker's
    assert [h.host_id for h in store.list_hosts(labels={"team": "a"})] == ["web1", "web2"]
    assert [h.host_id for h in store.list_hosts(labels={"env": "dev"})] == ["web2"]
    assert store.list_hosts(labels={"env": "agent-says"}) == []

    updated = store.set_host_labels("web1", {"env": "staging"}, actor="admin:b", now=T0 + 1)
    assert updated.broker_labels == {"env": "staging"}
    assert [h.host_id for h in store.list_hosts()] == ["web1", "web2"]

    store.remove_host("web2", actor="admin:a", now=T0 + 2)
    assert store.get_host("web2") is None
    assert [h.host_id for h in store.list_hosts()] == ["web1"]
    for call in (
        lambda: store.remove_host("web2", actor="admin:a", now=T0),
        lambda: store.set_host_labels("web2", {}, actor="admin:a", now=T0),
    ):
        with pytest.raises(FleetError) as info:
            call()
        assert fleet_error(info) == ("NOT_FOUND", "UNKNOWN_HOST", "host_id")
    actions = [(r.action, r.actor, r.host_id) for r in store.audit_records()]
    assert actions == [
        ("add_host", "admin:a", "web1"),
        ("add_host", "admin:a", "web2"),
        ("connect", "agent:web2", "web2"),
        ("set_labels", "admin:b", "web1"),
        ("remove_host", "admin:a", "web2"),
    ]
    chain_ok(store)


@pytest.mark.parametrize(
    "host_id, labels, reason, field",
    [
        ("-bad", {}, "INVALID_HOST", "host_id"),
        ("a" * 254, {}, "INVALID_HOST", "host_id"),
        ("web 1", {}, "INVALID_HOST", "host_id"),
        ("web1", {"Env": "x"}, "INVALID_LABELS", "labels"),
        ("web1", {"env": "x\n"}, "INVALID_LABELS", "labels"),
        ("web1", {"env": "x" * 254}, "INVALID_LABELS", "labels"),
        ("web1", {f"k{i}": "v" for i in range(65)}, "INVALID_LABELS", "labels"),
    ],
)
def test_bad_inventory_input_is_refused_and_changes_nothing(
    store: FleetStore, host_id: str, labels: dict[str, str], reason: str, field: str
) -> None:
    with pytest.raises(FleetError) as info:
        store.add_host(host_id, labels, actor="admin:a", now=T0)
    assert fleet_error(info) == ("INVALID_ARGUMENT", reason, field)
    assert store.list_hosts() == [] and store.audit_records() == []


def test_a_removed_host_comes_back_with_its_generation(store: FleetStore, keyring: KeyRing) -> None:
    store.add_host("web1", {}, actor="admin:a", now=T0)
    grant, _ = store.create_grant(
        request_for(), keyring=keyring, actor="admin:a", request_id=None, now=T0
    )
    store.remove_host("web1", actor="admin:a", now=T0 + 1, reason="decommissioned")
    removed = store.get_grant(grant.grant_id)
    assert removed is not None and removed.state is GrantState.REVOKED
    assert removed.revoke_reason == "decommissioned"
    with pytest.raises(FleetError) as info:
        store.create_grant(request_for(), keyring=keyring, actor="admin:a", request_id=None, now=T0)
    assert fleet_error(info) == ("NOT_FOUND", "UNKNOWN_HOST", "host")
    back = store.add_host("web1", {}, actor="admin:a", now=T0 + 2)
    # generations go on (an agent holding 1 would refuse a new 1), and its next delivery
    # is a snapshot: the log does not hold the step taken on removal
    assert back.generation == 2
    assert store.changes_since("web1", 1) is None
    assert store.host_state("web1", now=T0 + 2) == (2, [])
    chain_ok(store)


def test_agent_connect_ack_disconnect(url: str, store: FleetStore) -> None:
    with pytest.raises(FleetError) as info:
        store.agent_connected(
            "ghost", agent_version="0.1", agent_labels={}, trusted_key_ids=[], generation=0, now=T0
        )
    assert fleet_error(info) == ("NOT_FOUND", "UNKNOWN_HOST", "host_id")
    store.add_host("web1", {}, actor="admin:a", now=T0)
    host = store.agent_connected(
        "web1", agent_version="0.2.0", agent_labels={"role": "web"},
        trusted_key_ids=["k1", "k2"], generation=7, now=T0 + 1,
    )  # fmt: skip
    assert (host.connected_since, host.replica, host.acked_generation, host.trusted_key_ids) == (
        T0 + 1,
        "r1",
        7,
        ("k1", "k2"),
    )
    assert (host.agent_version, host.agent_labels) == ("0.2.0", {"role": "web"})
    with pytest.raises(FleetError) as info:
        store.agent_connected(
            "web1", agent_version="0.2", agent_labels={}, trusted_key_ids=["x" * 129],
            generation=0, now=T0,
        )  # fmt: skip
    assert fleet_error(info)[2] == "trusted_key_ids"
    with pytest.raises(FleetError) as info:
        store.agent_connected(
            "web1", agent_version="0.2", agent_labels={}, trusted_key_ids=[], generation=-1, now=T0
        )
    assert fleet_error(info)[2] == "generation"

    # the agent moved to replica r2 before r1 noticed its stream was gone
    other = FleetStore.open(url, replica="r2")
    try:
        other.agent_connected(
            "web1", agent_version="0.2.0", agent_labels={}, trusted_key_ids=[], generation=7,
            now=T0 + 2,
        )  # fmt: skip
        store.agent_disconnected("web1", now=T0 + 3)  # r1: not its stream any more
        host = store.get_host("web1")
        assert host is not None and (host.connected_since, host.replica) == (T0 + 2, "r2")
        other.record_ack("web1", 9, now=T0 + 4)
        other.agent_disconnected("web1", now=T0 + 5)
    finally:
        other.close()
    host = store.get_host("web1")
    assert host is not None
    assert (host.connected_since, host.acked_generation, host.last_seen) == (None, 9, T0 + 5)
    actions = [r.action for r in store.audit_records()]
    assert actions == ["add_host", "connect", "connect", "acknowledge", "disconnect"]
    chain_ok(store)


def test_drift_refusal_delivery_and_events_are_audited(store: FleetStore) -> None:
    store.add_host("web1", {}, actor="admin:a", now=T0)
    store.record_refusal(
        "web1", generation=3, grant_id="g-1", code="PERMISSION_DENIED", reason="BAD_SIGNATURE",
        message="m" * 5000, now=T0,
    )  # fmt: skip
    store.record_drift("web1", reason="digest mismatch", detail={"held": 4, "want": 5}, now=T0)
    store.record_delivery("web1", generation=5, kind="snapshot", now=T0)
    store.audit_event(
        actor="broker", action="refuse", host_id="bad host\n", reason="not in inventory", now=T0
    )
    records = store.audit_records(after_seq=1)
    assert [(r.action, r.host_id, r.grant_id) for r in records] == [
        ("drift", "web1", "g-1"),
        ("drift", "web1", ""),
        ("deliver", "web1", ""),
        ("refuse", "", ""),
    ]
    refusal = records[0].detail
    assert refusal["reason"] == "BAD_SIGNATURE" and len(str(refusal["message"])) <= 1025
    assert records[1].detail == {"held": 4, "want": 5}
    assert records[2].detail == {"generation": 5, "kind": "snapshot", "replica": "r1"}
    assert records[3].detail == {"claimed_host_id": "bad host\n"}
    assert store.audit_records(after_seq=2, limit=1)[0].seq == 3
    with pytest.raises(FleetError):
        store.audit_event(actor="x", action="y", detail={"big": "x" * 70000}, now=T0)
    chain_ok(store)


# ------------------------------------------------------------------ grants


def test_create_grant(store: FleetStore, keyring: KeyRing) -> None:
    store.add_host("web1", {}, actor="admin:a", now=T0)
    old_key = keyring.key_ids[1]
    store.agent_connected(
        "web1", agent_version="0.2", agent_labels={}, trusted_key_ids=[old_key], generation=0,
        now=T0,
    )  # fmt: skip
    request = request_for(port="8000-8010", ttl=600.0, reason="INC-1", max_connections=3)
    grant, created = store.create_grant(
        request, keyring=keyring, actor="admin:alice", request_id=None, now=T0
    )
    assert created and grant.generation == 1 and grant.state is GrantState.ACTIVE
    # the host trusts only the older key: the broker signs with that one
    assert grant.key_id == old_key
    keyring.public_keys[old_key].verify(grant.signature, grant.grant_bytes)
    parsed = pb.Grant.FromString(grant.grant_bytes)
    assert (parsed.grant_id, parsed.host_id, parsed.port_start, parsed.port_end) == (
        grant.grant_id,
        "web1",
        8000,
        8010,
    )
    assert (grant.port_first, grant.port_last, grant.protocol, grant.sources) == (
        8000,
        8010,
        "tcp",
        ("10.0.0.1/32",),
    )
    assert (grant.expire_time, grant.created_by, grant.reason) == (T0 + 600, "admin:alice", "INC-1")
    assert store.get_grant(grant.grant_id) == grant
    host = store.get_host("web1")
    assert host is not None and (host.generation, host.behind) == (1, 1)
    generation, rows = store.host_state("web1", now=T0)
    assert generation == 1
    assert [(r.grant_id, r.grant_bytes, r.signature, r.key_id) for r in rows] == [
        (grant.grant_id, grant.grant_bytes, grant.signature, old_key)
    ]
    changes = store.changes_since("web1", 0)
    assert changes is not None and len(changes) == 1
    assert (changes[0].kind, changes[0].payload, changes[0].generation) == (
        ChangeKind.GRANT,
        grant.grant_bytes,
        1,
    )
    records = store.audit_records()
    assert [(r.action, r.actor, r.grant_id) for r in records[-2:]] == [
        ("create", "admin:alice", grant.grant_id),
        ("sign", "broker", grant.grant_id),
    ]
    assert records[-1].detail == {"key_id": old_key}
    assert records[-2].detail["port"] == "8000-8010/tcp"
    with pytest.raises(FleetError) as info:
        store.create_grant(
            request_for("ghost"), keyring=keyring, actor="a", request_id=None, now=T0
        )
    assert fleet_error(info) == ("NOT_FOUND", "UNKNOWN_HOST", "host")
    chain_ok(store)


def test_request_id_makes_create_idempotent(store: FleetStore, keyring: KeyRing) -> None:
    store.add_host("web1", {}, actor="admin:a", now=T0)
    store.add_host("web2", {}, actor="admin:a", now=T0)
    first, created = store.create_grant(
        request_for(), keyring=keyring, actor="admin:a", request_id="req-1", now=T0
    )
    again, created_again = store.create_grant(
        request_for(), keyring=keyring, actor="admin:a", request_id="req-1", now=T0 + 5
    )
    assert (created, created_again) == (True, False)
    assert again == first and again.request_id == "req-1"
    for changed in (
        request_for(port="23"),
        request_for("web2"),
        request_for(subject="bob"),
    ):
        with pytest.raises(FleetError) as info:
            store.create_grant(
                changed, keyring=keyring, actor="admin:a", request_id="req-1", now=T0
            )
        assert fleet_error(info) == ("ALREADY_EXISTS", "REQUEST_ID_REUSED", "request_id")
    with pytest.raises(FleetError) as info:  # another admin's request id is not yours
        store.create_grant(
            request_for(), keyring=keyring, actor="admin:b", request_id="req-1", now=T0
        )
    assert fleet_error(info)[1] == "REQUEST_ID_REUSED"
    assert store.count("grants") == 1 and store.count("changes") == 1
    assert store.get_host("web1").generation == 1  # type: ignore[union-attr]
    with pytest.raises(FleetError) as info:
        store.create_grant(request_for(), keyring=keyring, actor="a", request_id="x\n", now=T0)
    assert fleet_error(info)[2] == "request_id"
    chain_ok(store)


def test_revoke_grant(store: FleetStore, keyring: KeyRing) -> None:
    store.add_host("web1", {}, actor="admin:a", now=T0)
    grant, _ = store.create_grant(
        request_for(ttl=60), keyring=keyring, actor="a", request_id=None, now=T0
    )
    short, _ = store.create_grant(
        request_for(ttl=1), keyring=keyring, actor="a", request_id=None, now=T0
    )
    revoked = store.revoke_grant(
        grant.grant_id, keyring=keyring, actor="admin:b", reason="done", now=T0 + 1
    )
    assert (revoked.state, revoked.revoked_by, revoked.revoke_reason, revoked.revoked_at) == (
        GrantState.REVOKED,
        "admin:b",
        "done",
        T0 + 1,
    )
    assert store.get_host("web1").generation == 3  # type: ignore[union-attr]
    changes = store.changes_since("web1", 2)
    assert changes is not None and [(c.kind, c.grant_id) for c in changes] == [
        (ChangeKind.REVOCATION, grant.grant_id)
    ]
    revocation = pb.Revocation.FromString(changes[0].payload)
    assert (revocation.grant_id, revocation.host_id, revocation.reason) == (
        grant.grant_id,
        "web1",
        "done",
    )
    keyring.public_keys[changes[0].key_id].verify(changes[0].signature, changes[0].payload)
    # again: unchanged, no new generation, no new audit record
    before = store.count("audit")
    assert (
        store.revoke_grant(grant.grant_id, keyring=keyring, actor="x", reason="", now=T0 + 2)
        == revoked
    )
    assert store.count("audit") == before and store.get_host("web1").generation == 3  # type: ignore[union-attr]
    with pytest.raises(FleetError) as info:
        store.revoke_grant(short.grant_id, keyring=keyring, actor="x", reason="", now=T0 + 1)
    assert fleet_error(info) == ("FAILED_PRECONDITION", "GRANT_EXPIRED", "grant_id")
    with pytest.raises(FleetError) as info:
        store.revoke_grant("g-nope", keyring=keyring, actor="x", reason="", now=T0)
    assert fleet_error(info) == ("NOT_FOUND", "GRANT_NOT_FOUND", "grant_id")
    with pytest.raises(FleetError) as info:
        store.revoke_grant("bad id", keyring=keyring, actor="x", reason="", now=T0)
    assert fleet_error(info)[0] == "INVALID_ARGUMENT"
    assert store.host_state("web1", now=T0 + 1) == (3, [])
    chain_ok(store)


def test_list_grants_filters_and_pages(store: FleetStore, keyring: KeyRing) -> None:
    store.add_host("web1", {"env": "prod"}, actor="a", now=T0)
    store.add_host("db1", {"env": "dev"}, actor="a", now=T0)
    made = {}
    for i, (host, subject, ttl) in enumerate(
        [("web1", "alice", 100), ("web1", "bob", 10), ("db1", "alice", 100), ("db1", "carol", 100)]
    ):
        grant, _ = store.create_grant(
            request_for(host, subject=subject, ttl=ttl), keyring=keyring, actor="a",
            request_id=f"r{i}", now=T0,
        )  # fmt: skip
        made[(host, subject)] = grant.grant_id
    store.revoke_grant(made[("db1", "carol")], keyring=keyring, actor="a", reason="", now=T0)
    now = T0 + 50  # bob's grant has expired by then (not yet marked)

    def ids(**kw: Any) -> list[str]:
        return [g.grant_id for g in store.list_grants(now=now, **kw)]

    assert ids() == sorted(made.values())
    assert ids(host_id="web1") == sorted([made[("web1", "alice")], made[("web1", "bob")]])
    assert ids(subject="alice") == sorted([made[("web1", "alice")], made[("db1", "alice")]])
    assert ids(labels={"env": "dev"}) == sorted([made[("db1", "alice")], made[("db1", "carol")]])
    assert ids(labels={"env": "none"}) == []
    assert ids(state=GrantState.ACTIVE) == sorted([made[("web1", "alice")], made[("db1", "alice")]])
    assert ids(state=GrantState.EXPIRED) == [made[("web1", "bob")]]
    assert ids(state=GrantState.REVOKED) == [made[("db1", "carol")]]
    assert ids(state=GrantState.ACTIVE, labels={"env": "prod"}) == [made[("web1", "alice")]]
    everything = ids()
    page1 = ids(limit=3)
    page2 = ids(limit=3, after=page1[-1])
    assert page1 + page2 == everything
    for bad in ({"limit": 0}, {"limit": 10_001}, {"after": "no such/id"}, {"host_id": "bad host"}):
        with pytest.raises(FleetError) as info:
            store.list_grants(now=now, **bad)  # type: ignore[arg-type]
        assert info.value.status == "INVALID_ARGUMENT"


def test_expire_due(url: str, store: FleetStore, keyring: KeyRing) -> None:
    store.add_host("web1", {}, actor="a", now=T0)
    short = [
        store.create_grant(
            request_for(ttl=10), keyring=keyring, actor="a", request_id=None, now=T0
        )[0]
        for _ in range(5)
    ]
    long, _ = store.create_grant(
        request_for(ttl=1000), keyring=keyring, actor="a", request_id=None, now=T0
    )
    assert store.expire_due(now=T0 + 5) == 0
    # two replicas at once: each due grant is expired (and audited) exactly once
    other = FleetStore.open(url, replica="r2")
    counts: list[int] = []
    try:
        threads = [
            threading.Thread(target=lambda s=s: counts.append(s.expire_due(now=T0 + 10)))
            for s in (store, other)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        other.close()
    assert sorted(counts)[1] >= 0 and sum(counts) == 5
    assert store.expire_due(now=T0 + 10) == 0
    for grant in short:
        assert store.get_grant(grant.grant_id).state is GrantState.EXPIRED  # type: ignore[union-attr]
    assert store.get_grant(long.grant_id).state is GrantState.ACTIVE  # type: ignore[union-attr]
    expired = [r.grant_id for r in store.audit_records() if r.action == "expire"]
    assert sorted(expired) == sorted(g.grant_id for g in short)
    # expiry is not a change: the generation stays
    assert store.get_host("web1").generation == 6  # type: ignore[union-attr]
    assert [r.grant_id for r in store.host_state("web1", now=T0 + 10)[1]] == [long.grant_id]
    chain_ok(store)


def test_usage(store: FleetStore, keyring: KeyRing) -> None:
    store.add_host("web1", {}, actor="a", now=T0)
    store.add_host("web2", {}, actor="a", now=T0)
    mine, _ = store.create_grant(request_for(), keyring=keyring, actor="a", request_id=None, now=T0)
    theirs, _ = store.create_grant(
        request_for("web2"), keyring=keyring, actor="a", request_id=None, now=T0
    )
    before = store.count("audit")
    store.record_usage(
        "web1",
        [UsageRow(mine.grant_id, 2, 30, 4000, T0 + 3), UsageRow(theirs.grant_id, 9, 9, 9, T0)],
        now=T0 + 4,
    )
    got = store.get_grant(mine.grant_id)
    assert got is not None and (got.usage.connections, got.usage.packets, got.usage.bytes) == (
        2,
        30,
        4000,
    )
    assert got.usage.last_seen == T0 + 3
    assert store.get_grant(theirs.grant_id).usage.bytes == 0  # type: ignore[union-attr]
    assert store.count("audit") == before
    with pytest.raises(FleetError) as info:
        store.record_usage("web1", [UsageRow(mine.grant_id, -1, 0, 0, None)], now=T0)
    assert info.value.field == "usage.connections"


# ------------------------------------------------------------------ delivery


def test_changes_since(store: FleetStore, keyring: KeyRing) -> None:
    store.add_host("web1", {}, actor="a", now=T0)
    assert store.changes_since("web1", 0) == []
    grants = []
    for i in range(4):
        grant, _ = store.create_grant(
            request_for(), keyring=keyring, actor="a", request_id=None, now=T0 + i
        )
        grants.append(grant)
    store.revoke_grant(grants[0].grant_id, keyring=keyring, actor="a", reason="", now=T0 + 10)
    all_changes = store.changes_since("web1", 0)
    assert all_changes is not None
    assert [(c.generation, c.kind, c.grant_id) for c in all_changes] == [
        (1, ChangeKind.GRANT, grants[0].grant_id),
        (2, ChangeKind.GRANT, grants[1].grant_id),
        (3, ChangeKind.GRANT, grants[2].grant_id),
        (4, ChangeKind.GRANT, grants[3].grant_id),
        (5, ChangeKind.REVOCATION, grants[0].grant_id),
    ]
    assert [c.generation for c in store.changes_since("web1", 3) or []] == [4, 5]
    assert store.changes_since("web1", 5) == []
    assert store.changes_since("web1", 6) is None  # the agent is ahead of this database
    assert store.changes_since("web1", 0, limit=4) is None  # too many: snapshot
    assert store.changes_since("web1", 1, limit=4) is not None
    with pytest.raises(FleetError):
        store.changes_since("ghost", 0)
    # prune what is older than T0 + 2: generations 1 and 2 are gone
    assert store.prune_changes(T0 + 2) == 2
    assert store.changes_since("web1", 0) is None
    assert store.changes_since("web1", 1) is None
    assert [c.generation for c in store.changes_since("web1", 2) or []] == [3, 4, 5]
    generation, rows = store.host_state("web1", now=T0 + 10)
    assert generation == 5 and {r.grant_id for r in rows} == {g.grant_id for g in grants[1:]}


# ------------------------------------------------------------------ concurrency


def test_concurrent_creates_on_one_host(url: str, keyring: KeyRing) -> None:
    """Two store instances (two replicas), two threads each, all creating grants for one
    host: generations are exactly 1..N, each change once, the chain intact."""
    stores = [FleetStore.open(url, replica="r1"), FleetStore.open(url, replica="r2")]
    per_thread = 12
    errors: list[BaseException] = []
    created: list[tuple[str, int]] = []
    lock = threading.Lock()
    try:
        stores[0].add_host("web1", {}, actor="a", now=T0)
        stores[0].add_host("web2", {}, actor="a", now=T0)

        def worker(store: FleetStore, tag: str) -> None:
            try:
                for i in range(per_thread):
                    grant, _ = store.create_grant(
                        request_for(), keyring=keyring, actor="a", request_id=f"{tag}-{i}", now=T0
                    )
                    # traffic on another host and on the audit chain in between
                    store.record_ack("web2", i, now=T0)
                    with lock:
                        created.append((grant.grant_id, grant.generation))
            except BaseException as exc:  # reported below, in the test thread
                errors.append(exc)

        threads = [
            threading.Thread(target=worker, args=(s, f"{s.replica}-{t}"))
            for s in stores
            for t in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        n = 4 * per_thread
        assert sorted(g for _, g in created) == list(range(1, n + 1))
        assert len({gid for gid, _ in created}) == n
        host = stores[1].get_host("web1")
        assert host is not None and host.generation == n
        changes = stores[1].changes_since("web1", 0, limit=n)
        assert changes is not None and [c.generation for c in changes] == list(range(1, n + 1))
        records = stores[0].audit_records()
        assert len(records) == 2 + n * 3
        chain_ok(stores[0])
    finally:
        for s in stores:
            s.close()


def test_one_request_id_raced_from_two_replicas(url: str, keyring: KeyRing) -> None:
    """The same request (a CLI retry) reaching two replicas at once: one grant, both
    answers name it, exactly one says created; the same for a host added twice."""
    stores = [FleetStore.open(url, replica="r1"), FleetStore.open(url, replica="r2")]
    try:
        stores[0].add_host("web1", {}, actor="a", now=T0)
        for round_ in range(5):
            barrier = threading.Barrier(2, timeout=30)
            results: list[tuple[str, bool] | BaseException] = []

            def create(
                store: FleetStore,
                rid: str = f"race-{round_}",
                barrier: threading.Barrier = barrier,
                results: list[tuple[str, bool] | BaseException] = results,
            ) -> None:
                barrier.wait()
                try:
                    grant, created = store.create_grant(
                        request_for(), keyring=keyring, actor="a", request_id=rid, now=T0
                    )
                    results.append((grant.grant_id, created))
                except BaseException as exc:
                    results.append(exc)

            threads = [threading.Thread(target=create, args=(s,)) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert all(isinstance(r, tuple) for r in results), results
            ids = {r[0] for r in results if isinstance(r, tuple)}
            assert len(ids) == 1 and sorted(r[1] for r in results if isinstance(r, tuple)) == [
                False,
                True,
            ]
        assert stores[1].count("grants") == 5 and stores[1].get_host("web1").generation == 5  # type: ignore[union-attr]

        errors: list[FleetError] = []
        barrier = threading.Barrier(2, timeout=30)

        def add(store: FleetStore) -> None:
            barrier.wait()
            try:
                store.add_host("web2", {}, actor="a", now=T0)
            except FleetError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=add, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [(e.status, e.reason) for e in errors] == [("ALREADY_EXISTS", "HOST_EXISTS")]
        chain_ok(stores[0])
    finally:
        for s in stores:
            s.close()


# ------------------------------------------------------------------ audit tampering


@pytest.mark.parametrize(
    "tamper, bad_seq, problem",
    [
        ("UPDATE audit SET reason = 'nothing to see' WHERE seq = 3", 3, "was edited"),
        ("UPDATE audit SET actor = 'admin:mallory' WHERE seq = 1", 1, "was edited"),
        ('UPDATE audit SET detail = \'{"key_id":"other"}\' WHERE seq = 4', 4, "was edited"),
        ("DELETE FROM audit WHERE seq = 2", 3, "record 2 missing"),
        # delete and renumber what follows: the next record's link names the lost one
        (
            "DELETE FROM audit WHERE seq = 2; UPDATE audit SET seq = seq - 1 WHERE seq > 2",
            2,
            "prev_hash",
        ),
        # swap records 3 and 4
        (
            "UPDATE audit SET seq = -3 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 4; "
            "UPDATE audit SET seq = 4 WHERE seq = -3",
            3,
            "",
        ),
    ],
)
def test_tampering_with_the_audit_table_is_detected(
    store: FleetStore, keyring: KeyRing, raw: Engine, tamper: str, bad_seq: int, problem: str
) -> None:
    store.add_host("web1", {}, actor="admin:a", now=T0)  # 1
    store.create_grant(
        request_for(), keyring=keyring, actor="admin:a", request_id=None, now=T0
    )  # 2, 3
    store.create_grant(
        request_for(), keyring=keyring, actor="admin:a", request_id=None, now=T0
    )  # 4, 5
    store.record_ack("web1", 2, now=T0)  # 6
    chain_ok(store)
    with raw.begin() as conn:
        for statement in tamper.split(";"):
            conn.execute(text(statement))
    report = verify_chain(store.audit_records())
    assert not report.ok
    assert report.first_bad_seq == bad_seq, report.problem
    assert problem in report.problem


def test_a_damaged_row_is_a_store_error(store: FleetStore, raw: Engine) -> None:
    store.add_host("web1", {}, actor="admin:a", now=T0)
    with raw.begin() as conn:
        conn.execute(text("UPDATE hosts SET broker_labels = '{\"Bad Key\": 1}'"))
    with pytest.raises(StoreError, match=r"hosts row 'web1'.*broker_labels"):
        store.get_host("web1")
    with raw.begin() as conn:
        conn.execute(text("UPDATE hosts SET broker_labels = 'not json'"))
    with pytest.raises(StoreError, match="broker_labels holds str, expected JSON text"):
        store.list_hosts()
    with raw.begin() as conn:
        conn.execute(text("UPDATE hosts SET broker_labels = '{}', trusted_key_ids = '[1]'"))
    with pytest.raises(StoreError, match="trusted_key_ids"):
        store.get_host("web1")


def test_sqlite_column_of_the_wrong_type_is_a_store_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/b.db"
    store = FleetStore.open(url)
    try:
        store.add_host("web1", {}, actor="admin:a", now=T0)
        engine = create_engine(url)
        with engine.begin() as conn:  # SQLite keeps whatever it is given
            conn.execute(text("UPDATE hosts SET generation = 'eleven'"))
        engine.dispose()
        with pytest.raises(StoreError, match="column generation holds str"):
            store.get_host("web1")
    finally:
        store.close()


# ------------------------------------------------------------------ PostgreSQL only


def _notifications(conn: psycopg.Connection[Any], expected: int) -> list[str]:
    """Payloads on our channel, waiting (at most 10 s) until `expected` have come, plus
    any that arrived with them. Works on psycopg 3.1 (Debian) and later: a notify
    handler, fed whenever the connection reads."""
    found: list[str] = []

    def handler(note: psycopg.Notify) -> None:
        if note.channel == NOTIFY_CHANNEL:
            found.append(note.payload)

    conn.add_notify_handler(handler)
    try:
        deadline = time.monotonic() + 10
        conn.execute("SELECT 1")
        while len(found) < expected and time.monotonic() < deadline:
            readable, _, _ = select.select([conn.fileno()], [], [], deadline - time.monotonic())
            if readable:
                conn.execute("SELECT 1")
        conn.execute("SELECT 1")
    finally:
        conn.remove_notify_handler(handler)
    return found


def test_notify_is_delivered_on_commit_only(
    pg: PostgresCluster, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg.create_database()
    store = FleetStore.open(url, replica="r1")
    dbname = url.rsplit("/", 1)[1]
    try:
        with psycopg.connect(pg.conninfo(dbname), autocommit=True) as listener:
            listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            store.add_host("web1", {}, actor="a", now=T0)
            store.add_host("web2", {}, actor="a", now=T0)
            grant, _ = store.create_grant(
                request_for(), keyring=keyring, actor="a", request_id=None, now=T0
            )
            store.revoke_grant(grant.grant_id, keyring=keyring, actor="a", reason="", now=T0)
            store.create_grant(
                request_for("web2"), keyring=keyring, actor="a", request_id=None, now=T0
            )
            assert _notifications(listener, 3) == ["web1", "web1", "web2"]

            # the transaction fails after its NOTIFY: nothing is delivered, nothing kept
            original = FleetStore._notify

            def notify_then_fail(self: FleetStore, connection: Any, host_id: str) -> None:
                original(self, connection, host_id)
                raise RuntimeError("crash after NOTIFY, before COMMIT")

            monkeypatch.setattr(FleetStore, "_notify", notify_then_fail)
            with pytest.raises(RuntimeError):
                store.create_grant(
                    request_for(), keyring=keyring, actor="a", request_id=None, now=T0
                )
            monkeypatch.undo()
            store.create_grant(
                request_for("web2"), keyring=keyring, actor="a", request_id=None, now=T0
            )
            # Commit order is delivery order: a NOTIFY of the failed create would come first.
            assert _notifications(listener, 1) == ["web2"]
            assert store.get_host("web1").generation == 2  # type: ignore[union-attr]
            assert store.count("grants") == 3
            chain_ok(store)
    finally:
        store.close()


def test_change_listeners_run_after_commit(store: FleetStore, keyring: KeyRing) -> None:
    seen: list[tuple[str, int]] = []
    store.add_change_listener(lambda host: seen.append((host, store.get_host(host).generation)))  # type: ignore[union-attr]
    store.add_host("web1", {}, actor="a", now=T0)
    grant, _ = store.create_grant(request_for(), keyring=keyring, actor="a", request_id="r", now=T0)
    store.create_grant(
        request_for(), keyring=keyring, actor="a", request_id="r", now=T0
    )  # no change
    store.revoke_grant(grant.grant_id, keyring=keyring, actor="a", reason="", now=T0)
    assert seen == [("web1", 1), ("web1", 2)]


def test_the_store_survives_a_postgresql_restart(tmp_path: Path, keyring: KeyRing) -> None:
    reason = postgres_available()
    if reason is not None:
        pytest.skip(reason)
    with postgres_cluster() as cluster:
        store = FleetStore.open(cluster.url)
        try:
            store.add_host("web1", {}, actor="a", now=T0)
            cluster.stop("immediate")
            with pytest.raises(StoreError, match=r"127\.0\.0\.1"):
                store.create_grant(
                    request_for(), keyring=keyring, actor="a", request_id="r", now=T0
                )
            cluster.start()
            grant, created = store.create_grant(
                request_for(), keyring=keyring, actor="a", request_id="r", now=T0
            )
            assert created and grant.generation == 1
            chain_ok(store)
        finally:
            store.close()


def test_a_new_sqlite_database_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        FleetStore.open(f"sqlite:///{tmp_path}/broker.db").close()
    finally:
        os.umask(old)
    for path in tmp_path.glob("broker.db*"):
        assert path.stat().st_mode & 0o077 == 0, path
