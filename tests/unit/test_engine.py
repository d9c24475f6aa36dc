"""The engine with a fake kernel and clock: fail-closed, idempotent, never reopening."""

from __future__ import annotations

import gc
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from portagent.agent import engine as engine_module
from portagent.agent.engine import Engine, SignedInput, default_verifier
from portagent.agent.model import Grant, GrantState
from portagent.agent.settings import ApiSettings, Policy, Settings
from portagent.agent.store import Store, StoreError
from portagent.agent.verify import Verifier
from portagent.testing.fakes import FakeClock, FakeConnections, FakeFirewall, memory_log
from portagent.testing.grants import TestSigner
from portagent.v1 import agent_pb2
from portagent.wire.errors import EnforcementError, GrantConflict, GrantNotFound, GrantNotInWindow
from portagent.wire.hoststate import sign_host_state
from portagent.wire.ports import parse_port_spec


@pytest.fixture
def signer() -> TestSigner:
    return TestSigner()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def firewall(clock: FakeClock) -> FakeFirewall:
    return FakeFirewall(clock)


def make_settings(signer: TestSigner, state_dir: Path) -> Settings:
    return Settings(
        host_id="host-a",
        api=ApiSettings("127.0.0.1:0", Path("ca"), Path("c"), Path("k")),
        trusted_keys=(signer.trusted,),
        policy=Policy(
            guarded=(parse_port_spec("5432/tcp"), parse_port_spec("53/udp")), max_ttl=3600.0
        ),
        state_dir=state_dir,
        reconcile_interval=3600.0,
    )


class Harness:
    def __init__(
        self,
        signer: TestSigner,
        clock: FakeClock,
        firewall: FakeFirewall,
        state_dir: Path,
        verifier_for: Callable[[Settings], Verifier] = default_verifier,
    ) -> None:
        self.signer, self.clock, self.firewall = signer, clock, firewall
        self.settings = make_settings(signer, state_dir)
        self.verifier_for = verifier_for
        self.connections = FakeConnections()
        self.store = Store(self.settings.store_path, now=self.clock())
        self.engine = self._engine()
        self.engine.start()
        firewall.batches.clear()  # start-up lays out the table; tests count what follows

    def _engine(self) -> Engine:
        self.log, events = memory_log()
        return Engine(
            self.settings,
            self.firewall,
            self.store,
            events,
            clock=self.clock,
            verifier_for=self.verifier_for,
            connections=self.connections,
        )

    def restart(self) -> None:
        self.engine.stop()
        self.store.close()
        self.store = Store(self.settings.store_path, now=self.clock())
        self.engine = self._engine()
        self.engine.start()

    def kernel_handles(self) -> set[int]:
        return {e.handle for e in self.firewall.read_state(self.clock.now).elements.values()}


@pytest.fixture
def harness(
    signer: TestSigner, clock: FakeClock, firewall: FakeFirewall, tmp_path: Path
) -> Iterator[Harness]:
    h = Harness(signer, clock, firewall, tmp_path)
    yield h
    h.engine.stop()
    h.store.close()


def test_apply_enforces_and_persists(harness: Harness) -> None:
    record = harness.engine.apply_grant(harness.signer.grant(harness.clock.now, grant_id="g-1"))
    assert record.handle > 0 and record.state is GrantState.ACTIVE
    assert harness.kernel_handles() == {record.handle}
    assert [r.grant_id for r in harness.store.load()] == ["g-1"]
    assert "ACTION=apply" in harness.log.getvalue()


def test_redelivery_is_idempotent_and_a_conflicting_reuse_is_refused(harness: Harness) -> None:
    signed = harness.signer.grant(harness.clock.now, grant_id="g-1")
    first = harness.engine.apply_grant(signed)
    again = harness.engine.apply_grant(signed)
    assert again.handle == first.handle
    assert len(harness.firewall.batches) == 1  # nothing re-applied
    with pytest.raises(GrantConflict):
        harness.engine.apply_grant(
            harness.signer.grant(harness.clock.now, grant_id="g-1", subject="mallory")
        )


def test_refusal_changes_nothing_and_is_logged(harness: Harness) -> None:
    with pytest.raises(Exception, match="not guarded"):
        harness.engine.apply_grant(harness.signer.grant(harness.clock.now, port_start=22))
    assert harness.firewall.batches == []
    assert harness.store.load() == []
    assert (
        "ACTION=refuse" in harness.log.getvalue() and "PORT_NOT_GUARDED" in harness.log.getvalue()
    )


def test_kernel_failure_leaves_store_unchanged(harness: Harness) -> None:
    harness.firewall.fail_next = True
    with pytest.raises(EnforcementError):
        harness.engine.apply_grant(harness.signer.grant(harness.clock.now, grant_id="g-1"))
    assert harness.store.load() == []
    assert harness.engine.list_grants() == []
    # The agent still works afterwards.
    harness.engine.apply_grant(harness.signer.grant(harness.clock.now, grant_id="g-2"))
    assert [r.grant_id for r in harness.store.load()] == ["g-2"]


def test_revoked_grant_never_reopens_even_after_restart(harness: Harness) -> None:
    signed = harness.signer.grant(harness.clock.now, grant_id="g-1")
    harness.engine.apply_grant(signed)
    harness.engine.revoke_grant(harness.signer.revocation(harness.clock.now, "g-1"))
    assert harness.kernel_handles() == set()
    with pytest.raises(GrantNotInWindow) as info:
        harness.engine.apply_grant(signed)
    assert info.value.reason == "GRANT_REVOKED"
    harness.restart()
    with pytest.raises(GrantNotInWindow):
        harness.engine.apply_grant(signed)


def test_revocation_before_delivery_blocks_the_grant(harness: Harness) -> None:
    assert harness.engine.revoke_grant(harness.signer.revocation(harness.clock.now, "g-9")) is None
    with pytest.raises(GrantNotInWindow):
        harness.engine.apply_grant(harness.signer.grant(harness.clock.now, grant_id="g-9"))


def test_local_revoke_of_unknown_grant_is_not_found(harness: Harness) -> None:
    with pytest.raises(GrantNotFound):
        harness.engine.revoke_local("nope", actor="root")


def test_overlapping_grants_revoking_either_leaves_the_other(harness: Harness) -> None:
    now = harness.clock.now
    wide = harness.engine.apply_grant(
        harness.signer.grant(now, grant_id="wide", source_prefixes=["10.1.2.0/24"])
    )
    narrow = harness.engine.apply_grant(
        harness.signer.grant(now, grant_id="narrow", source_prefixes=["10.1.2.3/32"])
    )
    assert harness.kernel_handles() == {wide.handle, narrow.handle}
    harness.engine.revoke_local("narrow", actor="root")
    assert harness.kernel_handles() == {wide.handle}


def test_same_key_two_grants_revoking_the_longer_restores_the_shorter(harness: Harness) -> None:
    now = harness.clock.now
    short = harness.engine.apply_grant(harness.signer.grant(now, grant_id="short", ttl=60))
    harness.engine.apply_grant(harness.signer.grant(now, grant_id="long", ttl=600))
    harness.engine.revoke_local("long", actor="root")
    elements = list(harness.firewall.read_state(now).elements.values())
    assert [(e.handle, e.expire_time) for e in elements] == [(short.handle, now + 60)]


def test_expiry_garbage_collects_and_logs(harness: Harness) -> None:
    harness.engine.apply_grant(harness.signer.grant(harness.clock.now, grant_id="g-1", ttl=5))
    harness.clock.advance(6)
    harness.engine._expire()  # the loop calls this when the grant's time is up
    assert harness.engine.list_grants() == []
    assert harness.store.load() == []
    assert "ACTION=expire" in harness.log.getvalue()


def test_restart_adopts_the_kernel_without_changing_it(harness: Harness) -> None:
    harness.engine.apply_grant(harness.signer.grant(harness.clock.now, grant_id="g-1"))
    batches = len(harness.firewall.batches)
    harness.restart()
    assert [r.grant.grant_id for r in harness.engine.list_grants()] == ["g-1"]
    new_batches = harness.firewall.batches[batches:]
    assert all(plan.is_empty for plan in new_batches)  # only the layout is re-asserted


def test_flushed_ruleset_is_repaired_by_full_reconcile(harness: Harness) -> None:
    record = harness.engine.apply_grant(harness.signer.grant(harness.clock.now))
    harness.firewall.flush()
    harness.engine.on_foreign_change(4242, "nft")
    done = threading.Event()
    for _ in range(100):
        if harness.kernel_handles() == {record.handle}:
            done.set()
            break
        threading.Event().wait(0.02)
    assert done.is_set()
    assert "ACTION=tamper" in harness.log.getvalue()


def test_many_concurrent_applies_are_coalesced(harness: Harness) -> None:
    signed = [
        harness.signer.grant(harness.clock.now, source_prefixes=[f"10.9.{i // 250}.{i % 250}"])
        for i in range(200)
    ]
    threads = [threading.Thread(target=harness.engine.apply_grant, args=(s,)) for s in signed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(harness.engine.list_grants()) == 200
    assert len(harness.firewall.batches) < 200


def test_own_commits_are_not_tampering_but_any_other_is(harness: Harness) -> None:
    harness.engine.apply_grant(harness.signer.grant(harness.clock.now))
    commits = len(harness.firewall.batches) + 1  # + the start-up layout
    for _ in range(commits):
        harness.engine.on_ruleset_commit(999, "portagentd")
    assert "ACTION=tamper" not in harness.log.getvalue()
    harness.engine.on_ruleset_commit(4242, "nft")
    assert "ACTION=tamper" in harness.log.getvalue()


def test_a_refused_batch_is_not_counted_as_an_own_commit(harness: Harness) -> None:
    harness.firewall.fail_next = True
    with pytest.raises(EnforcementError):
        harness.engine.apply_grant(harness.signer.grant(harness.clock.now))
    harness.engine._own_commits.reset()  # forget the start-up commit
    harness.engine.on_ruleset_commit(4242, "nft")
    assert "ACTION=tamper" in harness.log.getvalue()


def test_timeouts_are_computed_when_applied_not_when_the_batch_started(
    signer: TestSigner, clock: FakeClock, firewall: FakeFirewall, tmp_path: Path
) -> None:
    class SlowVerifier(Verifier):
        def verify_grant(self, *args: Any) -> Grant:
            clock.advance(1.0)  # a batch that takes long to verify
            return super().verify_grant(*args)

    # The fake refuses a stale clock.
    h = Harness(
        signer,
        clock,
        firewall,
        tmp_path,
        verifier_for=lambda s: SlowVerifier(s.host_id, s.trusted_keys, s.policy),
    )
    try:
        batch = [
            h.signer.grant(clock.now, ttl=600, source_prefixes=[f"10.3.0.{i}"])
            for i in range(1, 20)
        ]
        results = h.engine.apply_grants(batch)
        assert all(not isinstance(r, Exception) for r in results)
        grant_end = {r.handle: r.grant.expire_time for r in results}  # type: ignore[union-attr]
        for element in firewall.state.elements.values():
            assert element.expire_time <= grant_end[element.handle]
    finally:
        h.engine.stop()
        h.store.close()


# ---- fail-closed under store faults, tampering and stalls --------------------------------


def _sql(harness: Harness, statement: str, *args: object) -> list[tuple[object, ...]]:
    db = sqlite3.connect(harness.settings.store_path)
    try:
        rows = db.execute(statement, args).fetchall()
        db.commit()
        return rows
    finally:
        db.close()


def _stop(harness: Harness) -> None:
    harness.engine.stop()
    harness.store.close()


def test_a_stored_grant_changed_on_disk_is_quarantined_not_enforced(harness: Harness) -> None:
    now = harness.clock.now
    harness.engine.apply_grant(
        harness.signer.grant(now, grant_id="g-1", source_prefixes=["10.97.0.67"])
    )
    kept = harness.engine.apply_grant(
        harness.signer.grant(now, grant_id="g-2", source_prefixes=["10.97.0.70"])
    )
    _stop(harness)
    ((blob,),) = _sql(harness, "SELECT grant_bytes FROM grants WHERE grant_id='g-1'")
    assert isinstance(blob, bytes) and b"10.97.0.67" in blob
    _sql(
        harness,
        "UPDATE grants SET grant_bytes=? WHERE grant_id='g-1'",
        blob.replace(b"10.97.0.67", b"10.97.0.68"),
    )
    harness.restart()
    assert [r.grant.grant_id for r in harness.engine.list_grants()] == ["g-2"]
    assert harness.kernel_handles() == {kept.handle}  # the old element was removed too
    log = harness.log.getvalue()
    assert "ACTION=quarantine" in log and "BAD_SIGNATURE" in log
    assert _sql(harness, "SELECT grant_id FROM quarantine") == [("g-1",)]
    assert _sql(harness, "SELECT grant_id FROM grants") == [("g-2",)]
    harness.restart()  # quarantined rows stay out
    assert [r.grant.grant_id for r in harness.engine.list_grants()] == ["g-2"]


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("handle", "x"),
        ("handle", 0),
        ("state", "open"),
        ("apply_time", "soon"),
        ("grant_bytes", "text, not a blob"),
        ("signature", None),
        ("grant_id", "g-other"),
        ("key_id", "some-other-key"),
    ],
)
def test_a_garbled_row_is_quarantined_and_the_rest_loads(
    harness: Harness, column: str, value: object
) -> None:
    now = harness.clock.now
    harness.engine.apply_grant(harness.signer.grant(now, grant_id="g-1"))
    harness.engine.apply_grant(
        harness.signer.grant(now, grant_id="g-2", source_prefixes=["10.5.0.2"])
    )
    _stop(harness)
    _sql(harness, "PRAGMA ignore_check_constraints=ON")
    if column == "signature" and value is None:
        # NOT NULL: rebuild the row with an empty signature instead.
        _sql(harness, "UPDATE grants SET signature=x'' WHERE grant_id='g-1'")
    else:
        _sql(harness, f"UPDATE grants SET {column}=? WHERE grant_id='g-1'", value)
    harness.restart()
    assert [r.grant.grant_id for r in harness.engine.list_grants()] == ["g-2"]
    assert "ACTION=quarantine" in harness.log.getvalue()


def test_after_the_store_is_lost_a_revoked_grant_never_reopens(harness: Harness) -> None:
    signed = harness.signer.grant(harness.clock.now, grant_id="g-1", ttl=3600)
    harness.engine.apply_grant(signed)
    harness.engine.revoke_grant(harness.signer.revocation(harness.clock.now, "g-1"))
    _stop(harness)
    harness.settings.store_path.write_bytes(b"")  # truncated to 0 bytes
    harness.clock.advance(1)
    harness.restart()
    assert harness.engine.list_grants() == []
    with pytest.raises(GrantNotInWindow) as info:
        harness.engine.apply_grant(signed)
    assert info.value.reason == "GRANT_PREDATES_STATE"
    assert harness.kernel_handles() == set()
    # A grant the broker issues now is accepted.
    fresh = harness.engine.apply_grant(harness.signer.grant(harness.clock.now, grant_id="g-2"))
    assert harness.kernel_handles() == {fresh.handle}


def _failing_commits(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    real = harness.store.transaction

    @contextmanager
    def full_disk() -> Iterator[None]:
        with real():
            yield
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(harness.store, "transaction", full_disk)


def test_a_failed_commit_takes_the_kernel_change_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = harness.clock.now
    existing = harness.engine.apply_grant(harness.signer.grant(now, grant_id="g-0"))
    _failing_commits(harness, monkeypatch)
    with pytest.raises(EnforcementError) as info:
        harness.engine.apply_grant(
            harness.signer.grant(now, grant_id="g-1", source_prefixes=["10.97.0.81"])
        )
    assert info.value.reason == "ENFORCEMENT_FAILED"
    assert harness.kernel_handles() == {existing.handle}
    with pytest.raises(EnforcementError):  # a revocation that cannot persist changes nothing
        harness.engine.revoke_local("g-0", actor="root")
    assert harness.kernel_handles() == {existing.handle}
    assert [(r.grant.grant_id, r.state) for r in harness.engine.list_grants()] == [
        ("g-0", GrantState.ACTIVE)
    ]
    log = harness.log.getvalue()
    assert "ACTION=refuse" in log and "REASON_CODE=ENFORCEMENT_FAILED" in log
    monkeypatch.undo()
    assert [r.grant_id for r in harness.store.load()] == ["g-0"]


def test_a_store_that_cannot_begin_after_the_kernel_batch_leaves_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel batch goes first (the port opens without waiting for the disk); a
    store that then cannot even BEGIN takes the kernel change back: no element, no
    record, no row, and the handle it would have used is given out later."""
    now = harness.clock.now
    existing = harness.engine.apply_grant(harness.signer.grant(now, grant_id="g-0"))
    applied: list[int] = []
    real_apply = harness.firewall.apply_plan

    def counting_apply(*args: object, **kwargs: object) -> None:
        applied.append(1)
        real_apply(*args, **kwargs)  # type: ignore[arg-type]

    @contextmanager
    def cannot_begin() -> Iterator[None]:
        raise StoreError("state.db: cannot write: database is locked")
        yield  # pragma: no cover

    monkeypatch.setattr(harness.firewall, "apply_plan", counting_apply)
    monkeypatch.setattr(harness.store, "transaction", cannot_begin)
    with pytest.raises(EnforcementError) as info:
        harness.engine.apply_grant(
            harness.signer.grant(now, grant_id="g-1", source_prefixes=["10.97.0.82"])
        )
    assert info.value.reason == "ENFORCEMENT_FAILED"
    assert len(applied) == 2, "the kernel batch, then the one taking it back"
    assert harness.kernel_handles() == {existing.handle}
    assert [r.grant.grant_id for r in harness.engine.list_grants()] == ["g-0"]
    assert harness.engine.store_errors == 1
    monkeypatch.undo()
    assert [r.grant_id for r in harness.store.load()] == ["g-0"]
    again = harness.engine.apply_grant(
        harness.signer.grant(now, grant_id="g-1", source_prefixes=["10.97.0.82"])
    )
    assert harness.kernel_handles() == {existing.handle, again.handle}


def test_expiry_and_repair_go_on_while_the_store_cannot_write(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = harness.clock.now
    harness.engine.apply_grant(harness.signer.grant(now, grant_id="short", ttl=5))
    long = harness.engine.apply_grant(
        harness.signer.grant(now, grant_id="long", ttl=600, source_prefixes=["10.5.0.9"])
    )

    @contextmanager
    def read_only() -> Iterator[None]:
        raise StoreError("state.db: cannot write: attempt to write a readonly database")
        yield  # pragma: no cover

    monkeypatch.setattr(harness.store, "transaction", read_only)
    harness.clock.advance(6)
    harness.engine._expire()
    assert [r.grant.grant_id for r in harness.engine.list_grants()] == ["long"]
    harness.firewall.flush()
    harness.engine._reconcile_full()
    assert harness.kernel_handles() == {long.handle}
    assert "cannot record expiries" in harness.log.getvalue()
    monkeypatch.undo()
    harness.engine._flush_store_debt()
    assert [r.grant_id for r in harness.store.load()] == ["long"]


def test_an_element_inserted_after_a_stall_never_outlives_its_grant(harness: Harness) -> None:
    now = harness.clock.now
    harness.firewall.stalls = [5.0]  # SIGSTOP between rendering and the insert
    record = harness.engine.apply_grant(harness.signer.grant(now, grant_id="g-1", ttl=60))
    (element,) = harness.firewall.state.elements.values()
    assert element.handle == record.handle
    assert element.expire_time <= record.grant.expire_time  # re-asserted at once


def test_after_two_stalls_expiry_deletes_the_element_explicitly(harness: Harness) -> None:
    now = harness.clock.now
    harness.firewall.stalls = [5.0, 5.0]  # the re-assert stalls as well
    record = harness.engine.apply_grant(harness.signer.grant(now, grant_id="g-1", ttl=60))
    (element,) = harness.firewall.state.elements.values()
    assert element.expire_time > record.grant.expire_time  # the kernel would hold it late
    harness.clock.now = record.grant.expire_time
    harness.engine._expire()
    assert harness.firewall.state.elements == {}


# ---- decisions done: cuts, one batch that applies and revokes -----------------------------


def test_expiry_cuts_connections_once_and_a_revocation_cuts_at_once(harness: Harness) -> None:
    now = harness.clock.now
    ends = harness.engine.apply_grant(harness.signer.grant(now, grant_id="ends", ttl=5))
    revoked = harness.engine.apply_grant(
        harness.signer.grant(now, grant_id="revoked", ttl=5, source_prefixes=["10.5.0.3"])
    )
    harness.connections.live = {ends.handle: 1, revoked.handle: 1}
    harness.engine.revoke_local("revoked", actor="root")
    assert harness.connections.flushed == [revoked.handle]
    harness.clock.advance(6)
    harness.engine._expire()
    assert harness.connections.flushed == [revoked.handle, ends.handle]
    harness.clock.advance(harness.settings.policy.clock_skew)
    harness.engine._expire()  # the revoked grant is forgotten now: no second cut
    assert harness.connections.flushed == [revoked.handle, ends.handle]
    assert harness.engine.list_grants() == [] and harness.store.load() == []


def test_a_batch_that_applies_and_revokes_one_grant_leaves_it_revoked_everywhere(
    harness: Harness,
) -> None:
    now = harness.clock.now
    signed = harness.signer.grant(now, grant_id="g-1")
    revocation = harness.signer.revocation(now, "g-1")
    engine = harness.engine
    applied: list[object] = []
    with engine._writer._lock:  # hold the writer so both land in one batch
        threads = [
            threading.Thread(target=lambda: applied.append(engine.apply_grant(signed))),
            threading.Thread(target=engine.revoke_grant, args=(revocation,)),
        ]
        threads[0].start()
        for _ in range(200):  # the apply is queued before the revocation
            if not engine._writer._queue.empty():
                break
            threading.Event().wait(0.005)
        threads[1].start()
        for _ in range(200):
            if engine._writer._queue.qsize() == 2:
                break
            threading.Event().wait(0.005)
    # Released: the engine thread (woken by the callers) drains both as one batch.
    for t in threads:
        t.join(timeout=10)
    (record,) = engine.list_grants()
    assert record.state is GrantState.REVOKED and record.handle > 0
    assert [(r.grant_id, r.state) for r in harness.store.load()] == [("g-1", "revoked")]
    assert harness.kernel_handles() == set()
    assert len(applied) == 1
    with pytest.raises(GrantNotInWindow):
        engine.apply_grant(signed)


def _snapshot_of(harness: Harness, grants: list[Any]) -> Any:
    now = harness.clock.now
    signed = [
        agent_pb2.SignedGrant(grant=g.payload, signature=g.signature, key_id=g.key_id)
        for g in grants
    ]
    return sign_host_state(
        harness.signer.private_key,
        harness.signer.key_id,
        host_id="host-a",
        generation=1,
        grants=signed,
        now=now,
    )


def test_a_snapshot_signature_covers_its_grants_now_and_after_a_restart(
    harness: Harness,
) -> None:
    # The grants' own signatures are garbage: only the snapshot's one signature covers
    # their bytes. Enforced, kept across a restart while that snapshot verifies, and
    # quarantined (fail closed) once the stored snapshot no longer does.
    now = harness.clock.now
    grants = [
        SignedInput(harness.signer.grant(now, grant_id=f"g-{i}").payload, b"\0" * 64, "test-key")
        for i in range(3)
    ]
    signed = _snapshot_of(harness, grants)
    opened = harness.engine.open_host_state(signed)
    result = harness.engine.converge_to(
        [SignedInput(g.grant, g.signature, g.key_id) for g in opened.grants], issue_time=now
    )
    assert all(not isinstance(r, Exception) for r in result.applied)
    harness.engine.set_broker_state(1, opened.digest, snapshot=signed)
    harness.restart()
    assert [r.grant.grant_id for r in harness.engine.list_grants()] == ["g-0", "g-1", "g-2"]
    assert "quarantine" not in harness.log.getvalue()
    _stop(harness)
    ((state,),) = _sql(harness, "SELECT state FROM broker_snapshot")
    assert isinstance(state, bytes)
    _sql(harness, "UPDATE broker_snapshot SET state=?", state[:-1] + bytes([state[-1] ^ 1]))
    harness.restart()
    assert harness.engine.list_grants() == []
    log = harness.log.getvalue()
    assert "stored broker snapshot does not verify" in log and "BAD_SIGNATURE" in log
    assert sorted(_sql(harness, "SELECT grant_id FROM quarantine")) == [
        ("g-0",),
        ("g-1",),
        ("g-2",),
    ]


def test_a_grant_not_in_the_snapshot_still_needs_its_own_signature(harness: Harness) -> None:
    now = harness.clock.now
    good = harness.signer.grant(now, grant_id="g-own")
    signed = _snapshot_of(harness, [harness.signer.grant(now, grant_id="g-snap")])
    harness.engine.apply_grant(good)
    harness.engine.set_broker_state(1, b"", snapshot=signed)
    _stop(harness)
    _sql(harness, "UPDATE grants SET signature=? WHERE grant_id='g-own'", b"\0" * 64)
    harness.restart()
    assert harness.engine.list_grants() == []
    assert _sql(harness, "SELECT grant_id FROM quarantine") == [("g-own",)]


def test_work_after_the_answer_still_runs_once_the_engine_stopped(harness: Harness) -> None:
    # A large batch that ends while stop() shuts the audit thread down writes its
    # records inline instead of losing them.
    ran: list[str] = []
    harness.engine._after_answer(lambda: ran.append(threading.current_thread().name))
    harness.engine.stop()
    harness.engine._after_answer(lambda: ran.append(threading.current_thread().name))
    assert len(ran) == 2
    assert ran[0].startswith("audit") and ran[1] == threading.current_thread().name


def test_a_large_batch_runs_with_the_cyclic_collector_paused_and_restores_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of at least GC_PAUSE_BATCH commands runs with the cyclic collector off
    (it would walk the growing heap again and again); a smaller one does not, and the
    collector is on again afterwards, also when the batch fails in the kernel."""
    monkeypatch.setattr(engine_module, "GC_PAUSE_BATCH", 3)
    seen: list[bool] = []
    real_apply = harness.firewall.apply_plan

    def recording_apply(*args: object, **kwargs: object) -> None:
        seen.append(gc.isenabled())
        real_apply(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(harness.firewall, "apply_plan", recording_apply)
    now = harness.clock.now
    assert gc.isenabled()
    small = [_distinct(harness, now, "s", i) for i in range(2)]
    assert all(not isinstance(r, Exception) for r in harness.engine.apply_grants(small))
    large = [_distinct(harness, now, "l", i) for i in range(3)]
    assert all(not isinstance(r, Exception) for r in harness.engine.apply_grants(large))
    assert seen == [True, False]
    assert gc.isenabled()

    def failing_apply(*args: object, **kwargs: object) -> None:
        seen.append(gc.isenabled())
        raise EnforcementError("kernel refused the batch", reason="ENFORCEMENT_FAILED")

    monkeypatch.setattr(harness.firewall, "apply_plan", failing_apply)
    failed = [_distinct(harness, now, "f", i) for i in range(3)]
    results = harness.engine.apply_grants(failed)
    assert all(isinstance(r, EnforcementError) for r in results)
    assert seen[-1] is False
    assert gc.isenabled()


def _distinct(harness: Harness, now: float, prefix: str, index: int) -> SignedInput:
    """A grant of its own source: each one changes the kernel."""
    octet = {"s": 1, "l": 2, "f": 3}[prefix]
    return harness.signer.grant(
        now, grant_id=f"{prefix}-{index}", source_prefixes=[f"10.{octet}.0.{index + 1}"]
    )
