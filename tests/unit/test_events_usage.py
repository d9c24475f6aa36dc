"""The event ring, per-grant usage and the CLI's human units."""

from __future__ import annotations

import ipaddress
import threading

from portagent.agent.cli import ago, human_bytes
from portagent.agent.events import EventHub, EventKind
from portagent.agent.model import Element, ElementKey, Flow, Source
from portagent.agent.render import KernelState
from portagent.agent.usage import NO_USAGE, UsageReader
from portagent.testing.fakes import FakeClock, traffic_of
from portagent.wire.ports import Protocol


def test_sequences_increase_and_resume_after_a_given_one() -> None:
    hub = EventHub(capacity=5, clock=FakeClock())
    events = [hub.publish(EventKind.GRANT_APPLIED, grant_id=f"g{i}") for i in range(8)]
    assert [e.sequence - events[0].sequence for e in events] == list(range(8))
    # A reconnecting watcher gets what came after its last sequence...
    assert [e.grant_id for e in hub.since(events[5].sequence)] == ["g6", "g7"]
    # ...and what the ring still holds when it fell further behind.
    assert [e.grant_id for e in hub.since(0)] == ["g3", "g4", "g5", "g6", "g7"]
    assert hub.since(events[7].sequence) == []


def test_sequences_keep_increasing_across_restarts() -> None:
    clock = FakeClock()
    first = EventHub(clock=clock)
    last = [first.publish(EventKind.GRANT_APPLIED) for _ in range(100)][-1]
    clock.advance(1.0)
    assert EventHub(clock=clock).publish(EventKind.GRANT_APPLIED).sequence > last.sequence


def test_wait_returns_as_soon_as_an_event_arrives() -> None:
    hub = EventHub()
    after = hub.last_sequence
    timer = threading.Timer(0.05, lambda: hub.publish(EventKind.GRANT_EXPIRED, grant_id="g"))
    timer.start()
    assert [e.grant_id for e in hub.wait(after, timeout=5)] == ["g"]
    timer.join()
    assert hub.wait(hub.last_sequence, timeout=0.01) == []


class Counters:
    def __init__(self) -> None:
        key = ElementKey(Source.of(ipaddress.ip_network("10.0.0.1/32")), Protocol.TCP, 22)
        key2 = ElementKey(Source.of(ipaddress.ip_network("10.0.0.2/32")), Protocol.TCP, 22)
        self.state = KernelState(
            True,
            {(4, 32)},
            {key: Element(key, 7, 1e10), key2: Element(key2, 7, 1e10)},
            {key: (3, 300), key2: (1, 100)},
        )

    def read_traffic(self, now: float) -> dict[int, tuple[int, int]]:
        return traffic_of(self.state)


class Flows:
    flow = Flow("tcp", "10.0.0.1", 40000, "10.0.0.9", 22, "ESTABLISHED", 7, 3, 300, 2, 200, 60)

    def count_by_mark(self) -> dict[int, int]:
        return {7: 1, 99: 4}

    def flows(self, mark: int | None = None) -> list[Flow]:
        return [self.flow] if mark == 7 else []


def test_usage_sums_a_grants_elements_and_counts_its_flows() -> None:
    clock = FakeClock()
    counters = Counters()
    reader = UsageReader(counters, Flows(), lambda handle: (clock.now - 50, clock.now - 20), clock)
    usage = reader.usage([7, 8], with_flows=True)
    assert (usage[7].connections, usage[7].packets, usage[7].bytes) == (1, 4, 400)
    assert usage[7].flows == (Flows.flow,)
    assert usage[7].last_seen == clock.now - 20
    assert (usage[8].connections, usage[8].bytes, usage[8].flows) == (0, 0, ())
    # Traffic growing between two looks moves "last seen" to the second look.
    key = next(iter(counters.state.counters))
    counters.state.counters[key] = (5, 900)
    clock.advance(10)
    assert reader.usage([7])[7].last_seen == clock.now


def test_an_idle_grant_shares_one_value_and_its_first_traffic_is_seen() -> None:
    clock = FakeClock()
    counters = Counters()
    reader = UsageReader(counters, None, lambda handle: None, clock)
    assert reader.usage([8])[8] is NO_USAGE
    # Handle 8 gets an element that counted traffic: seen growing at the second look.
    key = next(iter(counters.state.counters))
    counters.state.elements[key] = Element(key, 8, 1e10)
    clock.advance(10)
    usage = reader.usage([8])[8]
    assert usage is not NO_USAGE
    assert (usage.packets, usage.bytes, usage.last_seen) == (3, 300, clock.now)


def test_human_units() -> None:
    assert [human_bytes(n) for n in (0, 999, 1536, 200_000, 5 * 1024**3)] == [
        "0B",
        "999B",
        "1.5K",
        "195K",
        "5.0G",
    ]
    assert ago(None, 100.0) == "-"
    assert ago(99.5, 100.0) == "now"
    assert ago(40.0, 100.0) == "1m ago"
