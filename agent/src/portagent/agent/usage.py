"""Per-grant usage: live connections (conntrack), accepted traffic (nft element
counters) and when the grant was last seen in use.

Runs on API threads, so it owns its own libnftables context (contexts are not
thread-safe) behind a lock, never the engine's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from portagent.agent.model import Flow
from portagent.agent.render import KernelState


class CounterSource(Protocol):
    def read_state(self, now: float, *, expected: int = 0) -> KernelState: ...


class FlowSource(Protocol):
    def count_by_mark(self) -> dict[int, int]: ...
    def flows(self, mark: int | None = None) -> list[Flow]: ...


@dataclass(frozen=True)
class GrantUsage:
    connections: int = 0
    packets: int = 0  # accepted from the client, by the grant's kernel elements
    bytes: int = 0
    first_seen: float | None = None
    last_seen: float | None = None
    flows: tuple[Flow, ...] = field(default_factory=tuple)


class UsageReader:
    def __init__(
        self,
        counters: CounterSource,
        flows: FlowSource | None,
        seen: Callable[[int], tuple[float, float] | None],
        clock: Callable[[], float] = time.time,
        expected_elements: Callable[[], int] = lambda: 0,
    ) -> None:
        self._counters = counters
        self._flows = flows
        self._seen = seen
        self._clock = clock
        # How many elements the engine believes the kernel holds: sizes the listing.
        self._expected_elements = expected_elements
        self._lock = threading.Lock()
        # Last byte count observed per handle, and when it last grew: "last seen".
        self._observed: dict[int, tuple[int, float]] = {}

    def usage(self, handles: Iterable[int], *, with_flows: bool = False) -> dict[int, GrantUsage]:
        wanted = set(handles)
        now = self._clock()
        with self._lock:
            state = self._counters.read_state(now, expected=self._expected_elements())
            traffic: dict[int, tuple[int, int]] = {}
            for key, element in state.elements.items():
                if element.handle in wanted:
                    packets, octets = state.counters.get(key, (0, 0))
                    old = traffic.get(element.handle, (0, 0))
                    traffic[element.handle] = (old[0] + packets, old[1] + octets)
            counts = self._flows.count_by_mark() if self._flows is not None else {}
            result: dict[int, GrantUsage] = {}
            for handle in wanted:
                packets, octets = traffic.get(handle, (0, 0))
                seen = self._seen(handle)
                last_traffic = self._note_traffic(handle, octets, now)
                last_times = [t for t in (seen[1] if seen else None, last_traffic) if t]
                flows: tuple[Flow, ...] = ()
                if with_flows and self._flows is not None and counts.get(handle):
                    flows = tuple(self._flows.flows(handle))
                result[handle] = GrantUsage(
                    connections=counts.get(handle, 0),
                    packets=packets,
                    bytes=octets,
                    first_seen=seen[0] if seen else None,
                    last_seen=max(last_times) if last_times else None,
                    flows=flows,
                )
            return result

    def flow_counts(self) -> dict[int, int] | None:
        """Live conntrack entries per mark (one dump), or None without conntrack. Under
        this reader's lock: its conntrack socket is not shared between threads."""
        if self._flows is None:
            return None
        with self._lock:
            return self._flows.count_by_mark()

    def _note_traffic(self, handle: int, octets: int, now: float) -> float | None:
        previous = self._observed.get(handle)
        if previous is None:
            when = None  # traffic before our first look: we cannot say when
        elif octets != previous[0]:
            when = now
        else:
            when = previous[1] or None
        self._observed[handle] = (octets, when or 0.0)
        return when
