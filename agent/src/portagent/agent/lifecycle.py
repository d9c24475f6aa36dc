"""A grant's life as one transition table (the model: h11's `_state.py`).

Staging (apply, revoke), the expiry planner (expire, keep window over, forget) and the
grant table's due times all read this table, so "what may happen to a grant next, and
when" is written down once. Pure: no I/O, no clock (callers pass `now`).

    ACTIVE  --expire------------> EXPIRED  --keep window over--> GONE
       |                             |
       +--revoke--> REVOKED <--------+--revoke
                       |
                       +--forget (replay refused by the window anyway)--> GONE

A grant that does not keep its connections has a keep window of zero: it passes
EXPIRED and is GONE in the same step. GONE grants leave the table and the store.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from portagent.agent.model import GrantRecord, GrantState


class Gone(Enum):
    """The state after the last transition: the grant leaves the table and the store."""

    GONE = "gone"


GONE: Final = Gone.GONE
State = GrantState | Gone


class GrantEvent(Enum):
    APPLY = "apply"  # a verified grant is delivered (again)
    REVOKE = "revoke"  # the broker or an operator revokes it
    EXPIRE = "expire"  # its expire_time passed
    KEEP_WINDOW_OVER = "keep_window_over"  # its connections may no longer outlive it
    FORGET = "forget"  # a revoked id need not be remembered: the window refuses it now


class IllegalTransition(Exception):
    def __init__(self, state: State, event: GrantEvent) -> None:
        super().__init__(f"no transition from {state.value} on {event.value}")
        self.state = state
        self.event = event


# (state, event) -> next state. A pair that is not here cannot happen: staging turns
# (REVOKED, APPLY) into the GRANT_REVOKED refusal; anything else is a bug.
TRANSITIONS: Final[dict[tuple[GrantState, GrantEvent], State]] = {
    (GrantState.ACTIVE, GrantEvent.APPLY): GrantState.ACTIVE,  # idempotent re-delivery
    (GrantState.EXPIRED, GrantEvent.APPLY): GrantState.EXPIRED,  # idempotent re-delivery
    (GrantState.ACTIVE, GrantEvent.REVOKE): GrantState.REVOKED,
    (GrantState.EXPIRED, GrantEvent.REVOKE): GrantState.REVOKED,  # cuts kept connections
    (GrantState.REVOKED, GrantEvent.REVOKE): GrantState.REVOKED,  # idempotent
    (GrantState.ACTIVE, GrantEvent.EXPIRE): GrantState.EXPIRED,
    (GrantState.EXPIRED, GrantEvent.KEEP_WINDOW_OVER): GONE,
    (GrantState.REVOKED, GrantEvent.FORGET): GONE,
}

# The event each state waits for, by time: the only events expiry ever sends.
TIMED: Final[dict[GrantState, GrantEvent]] = {
    GrantState.ACTIVE: GrantEvent.EXPIRE,
    GrantState.EXPIRED: GrantEvent.KEEP_WINDOW_OVER,
    GrantState.REVOKED: GrantEvent.FORGET,
}


def can(state: GrantState, event: GrantEvent) -> bool:
    return (state, event) in TRANSITIONS


def next_state(state: GrantState, event: GrantEvent) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def keep_window(record: GrantRecord, keep_max: float) -> float:
    """How long a grant's connections may outlive it (its `keep` set entry)."""
    return keep_max if record.grant.keep_established else 0.0


def timed_event(record: GrantRecord, keep_max: float, skew: float) -> tuple[GrantEvent, float]:
    """The timed event this grant waits for, and when it happens."""
    event = TIMED[record.state]
    expire = record.grant.expire_time
    if event is GrantEvent.EXPIRE:
        return event, expire
    if event is GrantEvent.KEEP_WINDOW_OVER:
        return event, expire + keep_window(record, keep_max)
    return event, expire + skew  # revoked: remembered until a replay is refused anyway


def due_time(record: GrantRecord, keep_max: float, skew: float) -> float:
    """When the engine must next look at this grant."""
    return timed_event(record, keep_max, skew)[1]


def state_at(record: GrantRecord, now: float) -> GrantState:
    """The state a reader is shown: an active grant past its expire time is expired
    even before the engine's expiry step has run."""
    if record.state is GrantState.ACTIVE and record.grant.expire_time <= now:
        return GrantState.EXPIRED
    return record.state
