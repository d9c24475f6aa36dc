"""The agent's event stream: grant lifecycle and connection events with sequence numbers.

A bounded in-memory ring. Sequence numbers start from the microsecond clock at
start-up and grow by one per event, so they keep increasing across restarts
without writing to the store on the hot path. A watcher that reconnects passes the
last sequence it saw and gets every later event the ring still holds.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from portagent.agent.model import Flow

DEFAULT_CAPACITY = 10_000


class EventKind(Enum):
    GRANT_APPLIED = "grant_applied"
    GRANT_EXPIRED = "grant_expired"
    GRANT_REVOKED = "grant_revoked"
    GRANT_REFUSED = "grant_refused"
    CONNECTION_OPENED = "connection_opened"
    CONNECTION_CLOSED = "connection_closed"


@dataclass(frozen=True, slots=True)
class AgentEvent:
    sequence: int
    time: float
    kind: EventKind
    grant_id: str = ""
    subject: str = ""
    reason: str = ""
    flow: Flow | None = None


class EventHub:
    """Thread-safe publish/wait over a bounded ring of events."""

    def __init__(
        self, capacity: int = DEFAULT_CAPACITY, clock: Callable[[], float] = time.time
    ) -> None:
        self._events: deque[AgentEvent] = deque(maxlen=capacity)
        self._changed = threading.Condition()
        self._clock = clock
        self._next = int(clock() * 1_000_000)
        # Open event streams by API ("grpc", "admin"): the metrics' client gauge.
        self._watchers: dict[str, int] = {}

    def publish(
        self,
        kind: EventKind,
        *,
        grant_id: str = "",
        subject: str = "",
        reason: str = "",
        flow: Flow | None = None,
    ) -> AgentEvent:
        with self._changed:
            event = AgentEvent(self._next, self._clock(), kind, grant_id, subject, reason, flow)
            self._next += 1
            self._events.append(event)
            self._changed.notify_all()
        return event

    def watch_started(self, api: str) -> None:
        with self._changed:
            self._watchers[api] = self._watchers.get(api, 0) + 1

    def watch_ended(self, api: str) -> None:
        with self._changed:
            self._watchers[api] = self._watchers.get(api, 0) - 1

    def watchers(self) -> dict[str, int]:
        """Open event streams, by API."""
        with self._changed:
            return dict(self._watchers)

    @property
    def last_sequence(self) -> int:
        with self._changed:
            return self._next - 1

    def since(self, after: int) -> list[AgentEvent]:
        """Every held event with a sequence greater than `after`, oldest first."""
        with self._changed:
            return self._after(after)

    def wait(self, after: int, timeout: float) -> list[AgentEvent]:
        """Like `since`, but waits up to `timeout` seconds for at least one event."""
        with self._changed:
            events = self._after(after)
            if not events:
                self._changed.wait(timeout)
                events = self._after(after)
            return events

    def _after(self, after: int) -> list[AgentEvent]:
        if not self._events or self._events[-1].sequence <= after:
            return []
        first = self._events[0].sequence
        start = max(0, after - first + 1)  # sequences in the ring are consecutive
        return [self._events[i] for i in range(start, len(self._events))]
