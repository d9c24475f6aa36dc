"""Deciding what time ends: the pure expiry planner.

`plan_expiry(due, now, keep_max, skew)` takes the grants the table says are due and
returns what happens to each, following the lifecycle table: which grants expired now
(logged), which stay as EXPIRED while their connections are kept, which are forgotten
(leave the table and the store, their connections cut unless a revocation cut them
already), and which were due early and go back. The engine performs the plan: kernel
converge for the touched keys, connection cuts, logs, and the store writes last (owed
when the disk fails; ADR 0006).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from portagent.agent.grant_table import element_keys, mark_keys
from portagent.agent.lifecycle import GrantEvent, State, next_state, timed_event
from portagent.agent.model import ElementKey, GrantRecord, GrantState
from portagent.agent.plan import MarkKey


@dataclass(frozen=True)
class ExpiryPlan:
    expired: tuple[GrantRecord, ...] = ()  # expired now (as EXPIRED records): logged
    kept: tuple[GrantRecord, ...] = ()  # stay in the table as EXPIRED: store marks them
    forgotten: tuple[GrantRecord, ...] = ()  # leave the table: store deletes them
    cut: tuple[int, ...] = ()  # handles whose connections are flushed
    requeued: tuple[GrantRecord, ...] = ()  # due early (their state moved their time)
    forgotten_revoked_ids: tuple[str, ...] = ()  # the replay memory lets these go

    @property
    def changes_grants(self) -> bool:
        return bool(self.expired or self.kept or self.forgotten)

    @property
    def touched_elements(self) -> set[ElementKey]:
        return {key for record in self.forgotten + self.kept for key in element_keys(record)}

    @property
    def touched_marks(self) -> set[MarkKey]:
        return {key for record in self.forgotten + self.kept for key in mark_keys(record)}


def plan_expiry(
    due: Iterable[GrantRecord],
    now: float,
    keep_max: float,
    skew: float,
    stale_revoked_ids: Iterable[str] = (),
) -> ExpiryPlan:
    """What happens to each due grant: its timed transitions up to `now`."""
    expired: list[GrantRecord] = []
    kept: list[GrantRecord] = []
    forgotten: list[GrantRecord] = []
    cut: list[int] = []
    requeued: list[GrantRecord] = []
    for record in due:
        state, events = run_timed(record, now, keep_max, skew)
        if GrantEvent.EXPIRE in events:
            expired.append(replace(record, state=GrantState.EXPIRED))
        if isinstance(state, GrantState):
            (kept if events else requeued).append(replace(record, state=state))
            continue
        forgotten.append(record)
        if GrantEvent.FORGET not in events:
            # A revocation cut its connections already; a grant that ends by time has
            # them cut now.
            cut.append(record.handle)
    return ExpiryPlan(
        tuple(expired),
        tuple(kept),
        tuple(forgotten),
        tuple(cut),
        tuple(requeued),
        tuple(stale_revoked_ids),
    )


def run_timed(
    record: GrantRecord, now: float, keep_max: float, skew: float
) -> tuple[State, list[GrantEvent]]:
    """Send the grant every timed event that is due by `now`, in order (a grant that
    keeps no connections expires and is gone in one step)."""
    state: State = record.state
    events: list[GrantEvent] = []
    while isinstance(state, GrantState):
        event, at = timed_event(replace(record, state=state), keep_max, skew)
        if at > now:
            break
        events.append(event)
        state = next_state(state, event)
    return state, events
