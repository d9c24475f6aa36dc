"""Which connection events become journal records: pure bookkeeping, clock passed in.

One record per connection opened and closed drowns a grant's story (a 20 s grant with
a busy client wrote 400+). With `[log] connections = "summary"` (the default), per
grant the first few connections of each window are still logged one by one (their
open *and* their close), the rest are only counted, and a `connection_summary` record
carries the counts: at most once per interval while the grant is in use, and a final
one when it ends (expire, revoke: once its connections are gone). Every grant that
had a connection gets exactly one final summary (FINAL=true), even if it counts nothing
new since the last one. The engine's event
hub (`portagent events`) still gets every event; only the journal is summarised.

Memory is bounded: one small tally per grant with connections, freed at its final
summary, at most MAX_TRACKED of them (the oldest is summarised and dropped first).
Called from the conntrack events thread (note) and the engine thread (end, due):
one lock around the tallies.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from portagent.agent.model import Flow, GrantRecord

# Connections per grant logged one by one in each window; the rest are counted.
INDIVIDUAL_PER_WINDOW = 3
WINDOW = 60.0
# A grant in use gets a summary at most this often.
SUMMARY_INTERVAL = 60.0
# After a grant ends, its connections are cut and their close events follow at once;
# the final summary waits for them (or for this long, if some never come).
END_GRACE = 2.0
MAX_TRACKED = 4096
# Open connections remembered per grant so their close is logged too (bounded).
MAX_LOGGED_FLOWS = 4 * INDIVIDUAL_PER_WINDOW

FlowKey = tuple[str, str, int, str, int]


@dataclass(frozen=True, slots=True)
class ConnectionSummary:
    """What one connection_summary record says: the period [since, until] of a grant."""

    record: GrantRecord
    since: float
    until: float
    opened: int
    closed: int
    suppressed: int  # connections opened in this period without a record of their own
    unlogged: int  # connection_opened/closed records not written in this period
    packets_in: int  # of the connections closed in this period
    bytes_in: int
    packets_out: int
    bytes_out: int
    final: bool


@dataclass(slots=True)
class _Tally:
    record: GrantRecord
    since: float
    window_start: float
    logged_in_window: int = 0
    opened: int = 0
    closed: int = 0
    suppressed: int = 0
    unlogged: int = 0
    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    open_now: int = 0  # opened minus closed, of those seen opening
    ended_at: float | None = None
    # Started by events after the grant ended (none seen opening): only the grace ends it.
    late_only: bool = False
    logged: dict[FlowKey, None] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.opened or self.closed)

    def take(self, now: float, *, final: bool) -> ConnectionSummary:
        summary = ConnectionSummary(
            self.record,
            self.since,
            now,
            self.opened,
            self.closed,
            self.suppressed,
            self.unlogged,
            self.packets_in,
            self.bytes_in,
            self.packets_out,
            self.bytes_out,
            final,
        )
        self.since = now
        self.opened = self.closed = self.suppressed = self.unlogged = 0
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        return summary


def _key(flow: Flow) -> FlowKey:
    return (flow.protocol, flow.src, flow.sport, flow.dst, flow.dport)


class ConnectionLog:
    def __init__(
        self,
        *,
        individual: int = INDIVIDUAL_PER_WINDOW,
        window: float = WINDOW,
        interval: float = SUMMARY_INTERVAL,
        grace: float = END_GRACE,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self._individual = individual
        self._window = window
        self._interval = interval
        self._grace = grace
        self._max_tracked = max_tracked
        self._lock = threading.Lock()
        self._tallies: dict[int, _Tally] = {}  # by grant handle, oldest first
        # No tally is due before this (a lower bound: due() skips the scan until then).
        self._next_due = float("inf")

    def __len__(self) -> int:
        return len(self._tallies)

    def note(
        self, record: GrantRecord, opened: bool, flow: Flow, now: float, *, ended: bool = False
    ) -> tuple[bool, list[ConnectionSummary]]:
        """Count one event of `record`'s grant (`ended`: the grant is gone already, a
        late close). Returns whether to log the event by itself, and the summaries due."""
        summaries: list[ConnectionSummary] = []
        with self._lock:
            tally = self._tallies.get(record.handle)
            if tally is None:
                if len(self._tallies) >= self._max_tracked:
                    oldest = self._tallies.pop(next(iter(self._tallies)))
                    if oldest.active or oldest.ended_at is not None:
                        summaries.append(oldest.take(now, final=oldest.ended_at is not None))
                tally = _Tally(record, since=now, window_start=now)
                if ended:
                    tally.ended_at, tally.late_only = now, True
                    self._next_due = min(self._next_due, now + self._grace)
                self._tallies[record.handle] = tally
            if now - tally.window_start >= self._window:
                tally.window_start, tally.logged_in_window = now, 0
            key = _key(flow)
            if opened:
                tally.opened += 1
                tally.open_now += 1
                individual = tally.logged_in_window < self._individual
                if individual:
                    tally.logged_in_window += 1
                    tally.logged[key] = None
                    if len(tally.logged) > MAX_LOGGED_FLOWS:
                        del tally.logged[next(iter(tally.logged))]
                else:
                    tally.suppressed += 1
            else:
                tally.closed += 1
                tally.open_now = max(0, tally.open_now - 1)
                tally.packets_in += flow.packets_orig
                tally.bytes_in += flow.bytes_orig
                tally.packets_out += flow.packets_reply
                tally.bytes_out += flow.bytes_reply
                individual = key in tally.logged
                if individual:
                    del tally.logged[key]
            if not individual:
                tally.unlogged += 1
                self._next_due = min(self._next_due, tally.since + self._interval)
            if tally.ended_at is not None and tally.open_now == 0 and not tally.late_only:
                # The last connection of an ended grant closed: its story is complete.
                del self._tallies[record.handle]
                summaries.append(tally.take(now, final=True))
            elif tally.unlogged and now - tally.since >= self._interval:
                summaries.append(tally.take(now, final=False))
        return individual, summaries

    def end(self, handle: int, now: float) -> list[ConnectionSummary]:
        """The grant ended (expired and forgotten, or revoked): its final summary now if
        none of its connections is open, else once they close (or after the grace)."""
        with self._lock:
            tally = self._tallies.get(handle)
            if tally is None or tally.ended_at is not None:
                return []
            if tally.open_now == 0:
                del self._tallies[handle]
                return [tally.take(now, final=True)]
            tally.ended_at = now
            self._next_due = min(self._next_due, now + self._grace)
            return []

    def due(self, now: float) -> list[ConnectionSummary]:
        """Summaries whose time has come: periodic ones of grants in use, final ones of
        ended grants past the grace."""
        if now < self._next_due:
            return []
        summaries: list[ConnectionSummary] = []
        with self._lock:
            next_due = float("inf")
            for handle, tally in list(self._tallies.items()):
                if tally.ended_at is not None:
                    if now - tally.ended_at >= self._grace:
                        del self._tallies[handle]
                        summaries.append(tally.take(now, final=True))
                        continue
                    next_due = min(next_due, tally.ended_at + self._grace)
                if tally.unlogged:
                    if now - tally.since >= self._interval:
                        summaries.append(tally.take(now, final=False))
                    else:
                        next_due = min(next_due, tally.since + self._interval)
            self._next_due = next_due
        return summaries

    def next_due(self) -> float:
        """When due() may next have something (infinity: nothing pending)."""
        return self._next_due


__all__ = ["INDIVIDUAL_PER_WINDOW", "SUMMARY_INTERVAL", "ConnectionLog", "ConnectionSummary"]
