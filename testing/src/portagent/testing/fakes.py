"""Fakes for the engine's collaborators (firewall, conntrack, clock, audit sink): unit
tests pass them to the constructor in place of the kernel and the clock. Real-kernel
tests (tests/integration, tests/e2e) prove the behaviour."""

from __future__ import annotations

import io
from dataclasses import replace

from portagent.agent.adapters.journal import EventLog
from portagent.agent.model import Element, ElementKey
from portagent.agent.plan import Plan, apply_plan
from portagent.agent.render import KernelState, Layout
from portagent.wire.errors import EnforcementError


def traffic_of(state: KernelState) -> dict[int, tuple[int, int]]:
    """`CounterSource.read_traffic` (portagent.agent.usage) computed from a listing: what
    the streaming read must equal, and what fakes that hold a listing answer."""
    traffic: dict[int, tuple[int, int]] = {}
    for key, element in state.elements.items():
        packets, octets = state.counters.get(key, (0, 0))
        if packets or octets:
            before = traffic.get(element.handle, (0, 0))
            traffic[element.handle] = (before[0] + packets, before[1] + octets)
    return traffic


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeFirewall:
    """Holds elements like the kernel does (expired ones vanish) and can be told to fail."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.state = KernelState()
        self.layout: Layout | None = None
        self.batches: list[Plan] = []
        self.fail_next = False
        # Seconds the process "stalls" between rendering and the kernel's insert, one
        # per coming batch (SIGSTOP): timeouts then run from the later insert.
        self.stalls: list[float] = []

    def apply_plan(self, plan: Plan, now: float, layout: Layout | None) -> None:
        # Timeouts are rendered as expire_time - now: a `now` behind the clock would let
        # an element outlive its grant.
        if now < self.clock.now:
            raise AssertionError(f"timeouts rendered from a stale clock: {now} < {self.clock.now}")
        if self.fail_next:
            self.fail_next = False
            raise EnforcementError("nftables refused the change: injected failure")
        for element in plan.add + tuple(new for _, new in plan.replace):
            # The kernel would read a zero timeout as "forever" on newer kernels.
            if element.expire_time <= now:
                raise AssertionError(f"element with no time left: {element}")
        if self.stalls:
            self.clock.advance(self.stalls.pop(0))
        late = self.clock.now - now
        if late > 0:
            # A timeout of (expire - now) inserted `late` seconds after `now`.
            plan = replace(
                plan,
                add=tuple(e._replace(expire_time=e.expire_time + late) for e in plan.add),
                replace=tuple(
                    (o, n._replace(expire_time=n.expire_time + late)) for o, n in plan.replace
                ),
            )
        self.state.elements = self._live(self.clock.now)
        apply_plan(self.state.elements, plan)
        if layout is not None:
            self.layout = layout
            self.state.maps |= set(layout.maps)
        self.state.present = True
        self.batches.append(plan)

    def _live(self, now: float) -> dict[ElementKey, Element]:
        return {k: e for k, e in self.state.elements.items() if e.expire_time > now}

    def read_state(self, now: float, *, expected: int = 0) -> KernelState:
        return KernelState(self.state.present, set(self.state.maps), self._live(now), {})

    def flush(self) -> None:
        """What `nft flush ruleset` does to us."""
        self.state = KernelState()
        self.layout = None


class FakeConnections:
    """Conntrack as the engine sees it: live connection counts per grant handle (ct
    mark), and the flushes the engine asked for."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.flushed: list[int] = []

    def count_by_mark(self) -> dict[int, int]:
        return {mark: n for mark, n in self.live.items() if n}

    def flush_mark(self, mark: int, *, count: bool = True) -> int:
        self.flushed.append(mark)
        cut = self.live.pop(mark, 0)
        return cut if count else 0


def memory_log() -> tuple[io.StringIO, EventLog]:
    stream = io.StringIO()
    return stream, EventLog(stream=stream, use_journal=False)
