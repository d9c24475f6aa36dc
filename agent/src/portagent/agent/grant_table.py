"""The engine's in-memory table of grants, indexed for incremental planning.

Pure data structures (no I/O, no locking: the engine guards them). Besides records by
grant id and by handle the table keeps, for every kernel element key, the handles of
the grants that cover it, so a change to one grant re-plans only that grant's keys;
and a heap of due times (lifecycle.due_time), so expiry costs nothing until something
is due. `RevokedIds` is the replay memory: revoked ids until they may be forgotten.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence

from portagent.agent.model import (
    KEEP_SET,
    Element,
    ElementKey,
    GrantRecord,
    GrantState,
    limit_set,
)
from portagent.agent.plan import MarkKey


def element_keys(record: GrantRecord) -> list[ElementKey]:
    grant = record.grant
    protocol, ports = grant.protocol, grant.ports
    if ports.first == ports.last:  # the common case: one port
        return [ElementKey(network, protocol, ports.first) for network in grant.sources]
    return [ElementKey(n, protocol, port) for n in grant.sources for port in ports.ports()]


def mark_keys(record: GrantRecord) -> list[MarkKey]:
    keys: list[MarkKey] = [(KEEP_SET, record.handle)]
    if record.grant.max_connections:
        keys.append((limit_set(record.grant.max_connections), record.handle))
    return keys


class GrantTable:
    def __init__(self) -> None:
        self.by_id: dict[str, GrantRecord] = {}
        self.by_handle: dict[int, GrantRecord] = {}
        # Handles covering each key: a tuple (mostly of one), smaller than a list.
        self._covering: dict[ElementKey, tuple[int, ...]] = {}
        self._due: list[tuple[float, str]] = []
        # Grants held in each state (active, expired, revoked), kept as they change: a
        # scrape reads three numbers instead of walking 100k records. A list and `is`
        # tests, not a dict keyed by the enum: Enum.__hash__ is Python code (~0.4 us a
        # lookup, paid twice per grant in a 100k start).
        self._counts = [0, 0, 0]

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, grant_id: str) -> GrantRecord | None:
        return self.by_id.get(grant_id)

    def put(
        self, record: GrantRecord, due: float, keys: Sequence[ElementKey] | None = None
    ) -> None:
        """Add a grant or replace one (same id, same handle: a state change). Only active
        grants cover keys: a revoked or expired one stays in the table (for its records
        and the replay memory) without growing the handles every plan of its keys walks
        (thousands on one key under sustained grant + revoke). `keys`: the record's
        element_keys when the caller has them already (a batch computes them once)."""
        previous = self.by_id.get(record.grant.grant_id)
        if previous is not None:
            self._count(previous.state, -1)
        self._count(record.state, 1)
        self.by_id[record.grant.grant_id] = record
        self.by_handle[record.handle] = record
        was_active = previous is not None and previous.state is GrantState.ACTIVE
        if record.state is GrantState.ACTIVE:
            if not was_active:
                covering = self._covering
                for key in element_keys(record) if keys is None else keys:
                    covering[key] = (*covering.get(key, ()), record.handle)
        elif was_active:
            self._uncover(record)
        heapq.heappush(self._due, (due, record.grant.grant_id))

    def _count(self, state: GrantState, delta: int) -> None:
        counts = self._counts
        if state is GrantState.ACTIVE:
            counts[0] += delta
        elif state is GrantState.EXPIRED:
            counts[1] += delta
        elif state is GrantState.REVOKED:
            counts[2] += delta
        else:  # a state added to GrantState must be counted here too
            raise ValueError(f"no count for grant state {state!r}")

    @property
    def counts(self) -> dict[GrantState, int]:
        """How many grants the table holds in each state."""
        active, expired, revoked = self._counts
        return {
            GrantState.ACTIVE: active,
            GrantState.EXPIRED: expired,
            GrantState.REVOKED: revoked,
        }

    def remove(self, grant_id: str) -> GrantRecord | None:
        record = self.by_id.pop(grant_id, None)
        if record is None:
            return None
        self._count(record.state, -1)
        self.by_handle.pop(record.handle, None)
        self._uncover(record)
        return record

    def _uncover(self, record: GrantRecord) -> None:
        for key in element_keys(record):
            handles = self._covering.get(key)
            if handles is not None:
                left = tuple(h for h in handles if h != record.handle)
                if left:
                    self._covering[key] = left
                else:
                    del self._covering[key]

    def pop_due(self, now: float) -> list[GrantRecord]:
        """Grants with a due time at or before `now` (each once; stale entries dropped)."""
        found: dict[str, GrantRecord] = {}
        while self._due and self._due[0][0] <= now:
            _, grant_id = heapq.heappop(self._due)
            record = self.by_id.get(grant_id)
            if record is not None:
                found[grant_id] = record
        return list(found.values())

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None

    def desired_for(
        self,
        keys: Iterable[ElementKey],
        now: float,
        overlay: Mapping[int, GrantRecord],
        overlay_keys: Mapping[int, Sequence[ElementKey]] | None = None,
    ) -> dict[ElementKey, Element]:
        """The element each key should hold, from every grant covering it, with `overlay`
        (handle -> record) standing in for grants a batch adds or changes (their
        element_keys in `overlay_keys`, when the caller has them)."""
        by_handle, covering = self.by_handle, self._covering
        extra: dict[ElementKey, tuple[int, ...]] = {}
        known = overlay_keys or {}
        for handle, record in overlay.items():
            if handle not in by_handle:
                found = known.get(handle)
                for key in element_keys(record) if found is None else found:
                    extra[key] = (*extra.get(key, ()), handle)
        active = GrantState.ACTIVE
        wanted: dict[ElementKey, Element] = {}
        for key in keys:
            handles = covering.get(key, ())
            more = extra.get(key)
            if more is not None:
                handles = (*handles, *more) if handles else more
            if len(handles) == 1:  # the common case: one grant holds the key
                handle = handles[0]
                record = overlay.get(handle) or by_handle[handle]
                expire_time = record.grant.expire_time
                if record.state is active and expire_time > now:
                    wanted[key] = Element(key, handle, expire_time)
                continue
            best: Element | None = None
            for handle in handles:
                record = overlay.get(handle) or self.by_handle[handle]
                grant = record.grant
                if record.state is not GrantState.ACTIVE or grant.expire_time <= now:
                    continue
                if best is None or (grant.expire_time, -handle) > (best.expire_time, -best.handle):
                    best = Element(key, handle, grant.expire_time)
            if best is not None:
                wanted[key] = best
        return wanted


class RevokedIds:
    """Revoked grant ids, each until the time after which the validity window refuses a
    replay anyway; a heap of those times, so expiry finds the stale ones without a scan."""

    def __init__(self, remembered: Mapping[str, float] | None = None) -> None:
        self._until: dict[str, float] = dict(remembered or {})
        self._due: list[tuple[float, str]] = [(t, g) for g, t in self._until.items()]
        heapq.heapify(self._due)

    def __contains__(self, grant_id: object) -> bool:
        return grant_id in self._until

    def __len__(self) -> int:
        return len(self._until)

    def remember(self, grant_id: str, until: float) -> None:
        self._until[grant_id] = until
        heapq.heappush(self._due, (until, grant_id))

    def pop_due(self, now: float) -> list[str]:
        """Ids remembered until before `now` (each once; those remembered again for
        longer stay)."""
        stale = []
        while self._due and self._due[0][0] < now:
            _, grant_id = heapq.heappop(self._due)
            if self._until.get(grant_id, now) < now:
                stale.append(grant_id)
                del self._until[grant_id]
        return stale
