"""The grant state machine as a table, and the pure expiry planner, with plain values."""

from __future__ import annotations

from dataclasses import replace

import pytest

from portagent.agent.expiry import plan_expiry
from portagent.agent.grant_table import RevokedIds
from portagent.agent.lifecycle import (
    GONE,
    TIMED,
    TRANSITIONS,
    GrantEvent,
    IllegalTransition,
    State,
    can,
    due_time,
    next_state,
    state_at,
)
from portagent.agent.model import GrantRecord, GrantState
from portagent.testing.grants import grant_record

NOW = 1_800_000_000.0
KEEP_MAX = 3600.0
SKEW = 30.0
ACTIVE, EXPIRED, REVOKED = GrantState.ACTIVE, GrantState.EXPIRED, GrantState.REVOKED
E = GrantEvent


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (ACTIVE, E.APPLY, ACTIVE),
        (ACTIVE, E.REVOKE, REVOKED),
        (ACTIVE, E.EXPIRE, EXPIRED),
        (ACTIVE, E.KEEP_WINDOW_OVER, None),
        (ACTIVE, E.FORGET, None),
        (EXPIRED, E.APPLY, EXPIRED),
        (EXPIRED, E.REVOKE, REVOKED),
        (EXPIRED, E.EXPIRE, None),
        (EXPIRED, E.KEEP_WINDOW_OVER, GONE),
        (EXPIRED, E.FORGET, None),
        (REVOKED, E.APPLY, None),  # never reopens
        (REVOKED, E.REVOKE, REVOKED),
        (REVOKED, E.EXPIRE, None),
        (REVOKED, E.KEEP_WINDOW_OVER, None),
        (REVOKED, E.FORGET, GONE),
    ],
)
def test_transition_table(state: GrantState, event: GrantEvent, expected: State | None) -> None:
    if expected is None:
        assert not can(state, event)
        with pytest.raises(IllegalTransition):
            next_state(state, event)
    else:
        assert can(state, event)
        assert next_state(state, event) is expected


def test_every_pair_is_decided_above_and_every_timed_event_is_a_transition() -> None:
    assert len(TRANSITIONS) == 8
    for state, event in TIMED.items():
        assert can(state, event)
    assert set(TIMED) == set(GrantState)


def record(
    state: GrantState = ACTIVE, *, ttl: float = 60.0, keep: bool = False, handle: int = 1
) -> GrantRecord:
    base = grant_record(handle, ["10.0.0.1/32"], ttl=ttl, now=NOW, state=state)
    return replace(base, grant=replace(base.grant, keep_established=keep))


@pytest.mark.parametrize(
    ("state", "keep", "due"),
    [
        (ACTIVE, False, NOW + 60),
        (ACTIVE, True, NOW + 60),
        (EXPIRED, True, NOW + 60 + KEEP_MAX),
        (EXPIRED, False, NOW + 60),  # no keep window: gone when it expires
        (REVOKED, False, NOW + 60 + SKEW),
        (REVOKED, True, NOW + 60 + SKEW),  # revoking ends the keep window too
    ],
)
def test_due_time_follows_the_timed_event(state: GrantState, keep: bool, due: float) -> None:
    assert due_time(record(state, keep=keep), KEEP_MAX, SKEW) == due


def test_a_reader_sees_an_active_grant_past_its_time_as_expired() -> None:
    assert state_at(record(ACTIVE), NOW + 59) is ACTIVE
    assert state_at(record(ACTIVE), NOW + 60) is EXPIRED
    assert state_at(record(REVOKED), NOW + 60) is REVOKED


def ids(records: tuple[GrantRecord, ...]) -> list[str]:
    return [r.grant.grant_id for r in records]


def test_an_active_grant_without_keep_expires_and_is_gone_in_one_step() -> None:
    plan = plan_expiry([record()], NOW + 60, KEEP_MAX, SKEW)
    assert ids(plan.expired) == ["g1"] and plan.expired[0].state is EXPIRED
    assert ids(plan.forgotten) == ["g1"] and plan.kept == ()
    assert plan.cut == (1,)
    assert plan.touched_elements and plan.touched_marks


def test_a_grant_that_keeps_connections_stays_expired_until_its_window_is_over() -> None:
    active = record(keep=True)
    plan = plan_expiry([active], NOW + 60, KEEP_MAX, SKEW)
    assert ids(plan.expired) == ["g1"] and ids(plan.kept) == ["g1"]
    assert plan.kept[0].state is EXPIRED and plan.forgotten == () and plan.cut == ()
    later = plan_expiry([plan.kept[0]], NOW + 60 + KEEP_MAX, KEEP_MAX, SKEW)
    assert later.expired == () and ids(later.forgotten) == ["g1"] and later.cut == (1,)


def test_a_kept_grant_found_long_after_its_window_goes_at_once() -> None:
    plan = plan_expiry([record(keep=True)], NOW + 60 + KEEP_MAX, KEEP_MAX, SKEW)
    assert ids(plan.expired) == ["g1"] and ids(plan.forgotten) == ["g1"] and plan.kept == ()


def test_a_revoked_grant_is_forgotten_without_a_second_cut() -> None:
    plan = plan_expiry([record(REVOKED)], NOW + 60 + SKEW, KEEP_MAX, SKEW)
    assert ids(plan.forgotten) == ["g1"] and plan.expired == () and plan.cut == ()


def test_a_grant_due_early_goes_back_unchanged() -> None:
    revoked = record(REVOKED)  # popped at its old expire time, due at expire + skew
    plan = plan_expiry([revoked], NOW + 60, KEEP_MAX, SKEW)
    assert plan.requeued == (revoked,)
    assert not plan.changes_grants and plan.cut == ()


def test_nothing_due_plans_nothing() -> None:
    plan = plan_expiry([], NOW, KEEP_MAX, SKEW)
    assert not plan.changes_grants and plan.touched_elements == set()


def test_revoked_ids_are_forgotten_once_their_time_passed_and_not_if_remembered_again() -> None:
    revoked = RevokedIds({"a": NOW + 10, "b": NOW + 20})
    assert "a" in revoked and len(revoked) == 2
    revoked.remember("a", NOW + 30)  # revoked again: remembered longer
    assert revoked.pop_due(NOW + 15) == []
    assert revoked.pop_due(NOW + 25) == ["b"]
    assert "b" not in revoked and "a" in revoked
    assert revoked.pop_due(NOW + 31) == ["a"] and len(revoked) == 0
    plan = plan_expiry([], NOW + 31, KEEP_MAX, SKEW, ["a"])
    assert plan.forgotten_revoked_ids == ("a",)
