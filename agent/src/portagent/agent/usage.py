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


class CounterSource(Protocol):
    def read_traffic(self, now: float) -> dict[int, tuple[int, int]]:
        """Accepted (packets, bytes) per grant handle; handles at zero left out."""
        ...


class FlowSource(Protocol):
    def count_by_mark(self) -> dict[int, int]: ...
    def flows(self, mark: int | None = None) -> list[Flow]: ...


@dataclass(frozen=True, slots=True)
class GrantUsage:
    connections: int = 0
    packets: int = 0  # accepted from the client, by the grant's kernel elements
    bytes: int = 0
    first_seen: float | None = None
    last_seen: float | None = None
    flows: tuple[Flow, ...] = field(default_factory=tuple)


NO_USAGE = GrantUsage()
# An observation of no traffic yet (octets, when last grew).
_IDLE = (0, 0.0)


class UsageReader:
    def __init__(
        self,
        counters: CounterSource,
        flows: FlowSource | None,
        seen: Callable[[int], tuple[float, float] | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._counters = counters
        self._flows = flows
        self._seen = seen
        self._clock = clock
        self._lock = threading.Lock()
        # Last byte count observed per handle, and when it last grew: "last seen".
        self._observed: dict[int, tuple[int, float]] = {}

    def usage(self, handles: Iterable[int], *, with_flows: bool = False) -> dict[int, GrantUsage]:
        """Usage of each of `handles`. A grant with no connection, no traffic and never
        seen shares one NO_USAGE value: at 100k grants most are idle, and the fleet
        reporter asks for all of them every few seconds."""
        wanted = set(handles)
        now = self._clock()
        with self._lock:
            traffic = self._counters.read_traffic(now)
            counts = self._flows.count_by_mark() if self._flows is not None else {}
            result: dict[int, GrantUsage] = {}
            for handle in wanted:
                packets, octets = traffic.get(handle, (0, 0))
                seen = self._seen(handle)
                last_traffic = self._note_traffic(handle, octets, now)
                connections = counts.get(handle, 0)
                if not (connections or octets or packets or seen or last_traffic):
                    result[handle] = NO_USAGE
                    continue
                last_times = [t for t in (seen[1] if seen else None, last_traffic) if t]
                flows: tuple[Flow, ...] = ()
                if with_flows and self._flows is not None and connections:
                    flows = tuple(self._flows.flows(handle))
                result[handle] = GrantUsage(
                    connections=connections,
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
        # Idle grants share one value instead of a tuple each.
        self._observed[handle] = (octets, when or 0.0) if octets or when else _IDLE
        return when
