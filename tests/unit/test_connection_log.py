"""Connection records summarised: the pure ConnectionLog with a fake clock, and the
engine writing what it decides (the hub still sees every event)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portagent.agent.connection_log import (
    INDIVIDUAL_PER_WINDOW,
    SUMMARY_INTERVAL,
    ConnectionLog,
    ConnectionSummary,
)
from portagent.agent.engine import Engine
from portagent.agent.events import EventKind
from portagent.agent.model import Flow, GrantRecord
from portagent.agent.settings import ApiSettings, Policy, Settings, load_settings
from portagent.agent.store import Store
from portagent.testing.fakes import FakeClock, FakeConnections, FakeFirewall, memory_log
from portagent.testing.grants import TestSigner, grant_record
from portagent.wire.errors import ConfigError
from portagent.wire.ports import parse_port_spec

T0 = 1_800_000_000.0
K = INDIVIDUAL_PER_WINDOW


def flow(sport: int, mark: int = 1, *, src: str = "10.0.0.2", bytes_in: int = 0) -> Flow:
    return Flow("tcp", src, sport, "10.0.0.1", 5432, None, mark, 1, bytes_in, 1, 0, None)


@pytest.fixture(scope="module")
def record() -> GrantRecord:
    return grant_record(1, ["10.0.0.2/32"], (5432, 5432), now=T0)


def totals(summaries: list[ConnectionSummary]) -> tuple[int, int, int, int]:
    return (
        sum(s.opened for s in summaries),
        sum(s.closed for s in summaries),
        sum(s.suppressed for s in summaries),
        sum(s.unlogged for s in summaries),
    )


def test_first_connections_are_logged_with_their_close_and_the_rest_counted(
    record: GrantRecord,
) -> None:
    log = ConnectionLog()
    opens = [log.note(record, True, flow(40000 + i), T0 + i) for i in range(K + 4)]
    assert [individual for individual, _ in opens] == [True] * K + [False] * 4
    # Closes: those logged opening are logged closing, whatever the order.
    closes = [log.note(record, False, flow(40000 + i), T0 + 20) for i in reversed(range(K + 4))]
    assert [individual for individual, _ in closes] == [False] * 4 + [True] * K
    assert all(not summaries for _, summaries in opens + closes)  # within the interval
    (final,) = log.end(record.handle, T0 + 30)
    assert (final.opened, final.closed, final.suppressed, final.unlogged) == (K + 4, K + 4, 4, 8)
    assert final.final and (final.since, final.until) == (T0, T0 + 30)
    assert len(log) == 0  # freed with the grant


def test_a_new_window_logs_a_few_again_and_summaries_come_at_most_once_an_interval(
    record: GrantRecord,
) -> None:
    log = ConnectionLog()
    seen: list[ConnectionSummary] = []
    logged = 0
    for second in range(0, 150, 2):  # one connection every 2 s for 150 s
        individual, summaries = log.note(record, True, flow(30000 + second), T0 + second)
        logged += individual
        seen += summaries
    # 3 windows started (0, 60, 120 s): K each.
    assert logged == 3 * K
    assert [s.until - T0 for s in seen] == [60.0, 120.0]
    assert all(not s.final for s in seen)
    assert seen[1].since == seen[0].until  # back to back: they add up
    assert log.due(T0 + 150) == []  # the rest is not due before the interval
    (later,) = log.due(T0 + 120 + SUMMARY_INTERVAL)
    assert totals([*seen, later])[0] == 75


def test_an_ended_grant_gets_its_final_summary_when_its_last_connection_closes(
    record: GrantRecord,
) -> None:
    log = ConnectionLog()
    for i in range(5):
        log.note(record, True, flow(50000 + i), T0)
    assert log.end(record.handle, T0 + 10) == []  # five still open (the cut follows)
    assert log.end(record.handle, T0 + 10) == []  # ending twice is a no-op
    for i in range(4):
        _, summaries = log.note(record, False, flow(50000 + i, bytes_in=100), T0 + 10, ended=True)
        assert summaries == []
    _, (final,) = log.note(record, False, flow(50004, bytes_in=100), T0 + 10.1, ended=True)
    assert final.final and (final.opened, final.closed, final.bytes_in) == (5, 5, 500)
    assert len(log) == 0


def test_closes_that_never_come_end_the_story_after_the_grace(record: GrantRecord) -> None:
    log = ConnectionLog(grace=2.0)
    log.note(record, True, flow(1), T0)
    log.end(record.handle, T0 + 5)
    assert log.due(T0 + 6) == [] and log.next_due() == T0 + 7
    (final,) = log.due(T0 + 7)
    assert final.final and (final.opened, final.closed) == (1, 0)
    assert len(log) == 0 and log.next_due() == float("inf")


def test_late_closes_after_the_final_summary_are_summarised_after_the_grace(
    record: GrantRecord,
) -> None:
    log = ConnectionLog(grace=2.0)
    for i in range(10):  # connections older than the agent: never seen opening
        log.note(record, False, flow(60000 + i), T0, ended=True)
    assert log.due(T0 + 1) == []
    (final,) = log.due(T0 + 2)
    assert final.final and (final.closed, final.unlogged) == (10, 10)


def test_tracked_grants_are_capped_oldest_summarised_first(record: GrantRecord) -> None:
    log = ConnectionLog(max_tracked=2)
    other = [replace(record, handle=h) for h in (2, 3)]
    log.note(record, True, flow(1), T0)
    log.note(other[0], True, flow(1, mark=2), T0)
    _, evicted = log.note(other[1], True, flow(1, mark=3), T0 + 1)
    assert [(s.record.handle, s.opened, s.final) for s in evicted] == [(1, 1, False)]
    assert len(log) == 2


EVENT = st.tuples(st.booleans(), st.integers(0, 7), st.floats(0, 200))


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENT, max_size=60), st.integers(1, 4))
def test_summaries_and_individual_records_add_up_to_every_event(
    record: GrantRecord, events: list[tuple[bool, int, float]], individual: int
) -> None:
    log = ConnectionLog(individual=individual)
    summaries: list[ConnectionSummary] = []
    logged = 0
    now = T0
    for opened, port, step in events:
        now += step
        shown, due = log.note(record, opened, flow(port), now)
        logged += shown
        summaries += due + log.due(now)
    summaries += log.end(record.handle, now + 1) + log.due(now + 1000)
    opens = sum(1 for opened, _, _ in events if opened)
    assert totals(summaries)[:2] == (opens, len(events) - opens)
    assert logged + totals(summaries)[3] == len(events)
    assert len(log) == 0
    assert sum(s.final for s in summaries) == (1 if events else 0)
    for earlier, later in itertools.pairwise(summaries):
        assert later.since >= earlier.until  # periods never overlap


# ---- the engine writes what the log decides --------------------------------------------


Make = Callable[[str], tuple[Engine, FakeClock, TestSigner, io.StringIO]]


@pytest.fixture
def engine_for(tmp_path: Path) -> Iterator[Make]:
    engines: list[tuple[Engine, Store]] = []

    def make(mode: str) -> tuple[Engine, FakeClock, TestSigner, io.StringIO]:
        signer, clock = TestSigner(), FakeClock(T0)
        settings_ = Settings(
            host_id="host-a",
            api=ApiSettings("127.0.0.1:0", Path("ca"), Path("c"), Path("k")),
            trusted_keys=(signer.trusted,),
            policy=Policy(guarded=(parse_port_spec("5432/tcp"),), max_ttl=3600.0),
            state_dir=tmp_path / mode,
            reconcile_interval=3600.0,
            log_connections=mode,
        )
        store = Store(settings_.store_path, now=clock())
        out, events = memory_log()
        engine = Engine(
            settings_, FakeFirewall(clock), store, events, clock=clock,
            connections=FakeConnections(),
        )  # fmt: skip
        engine.start()
        engines.append((engine, store))
        return engine, clock, signer, out

    yield make
    for engine, store in engines:
        engine.stop()
        store.close()


def actions(out: io.StringIO) -> list[str]:
    text = out.getvalue()
    return [part.split("=", 1)[1] for line in text.splitlines() for part in line.split()
            if part.startswith("ACTION=")]  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "opened_records", "summaries"),
    [("summary", K, 1), ("each", 10, 0), ("off", 0, 0)],
)
def test_the_journal_follows_the_setting_and_the_hub_sees_every_connection(
    engine_for: Make, mode: str, opened_records: int, summaries: int
) -> None:
    engine, clock, signer, out = engine_for(mode)
    record = engine.apply_grant(signer.grant(clock.now, grant_id="g-1", ttl=5))
    for i in range(10):
        engine.on_connection_event("new", flow(41000 + i, mark=record.handle))
    clock.advance(6)
    engine._expire()  # ends the grant: all its connections are cut
    for i in range(10):
        engine.on_connection_event("destroy", flow(41000 + i, mark=record.handle, bytes_in=7))
    written = actions(out)
    assert written.count("connection_opened") == opened_records
    assert written.count("connection_closed") == opened_records
    assert written.count("connection_summary") == summaries
    hub = [e.kind for e in engine.hub.since(0)]
    assert hub.count(EventKind.CONNECTION_OPENED) == hub.count(EventKind.CONNECTION_CLOSED) == 10
    if summaries:
        line = next(x for x in out.getvalue().splitlines() if "ACTION=connection_summary" in x)
        for field in (
            "CONNECTIONS_OPENED=10",
            "CONNECTIONS_CLOSED=10",
            "BYTES_IN=70",
            f"CONNECTIONS_SUPPRESSED={10 - K}",
            "FINAL=true",
            "GRANT_ID=g-1",
        ):
            assert field in line, line  # fmt: skip
        assert written.index("expire") < written.index("connection_summary")


def test_connection_records_spell_endpoints_with_brackets_for_ipv6(engine_for: Make) -> None:
    engine, clock, signer, out = engine_for("each")
    record = engine.apply_grant(
        signer.grant(clock.now, grant_id="g-6", source_prefixes=["fd95::/64"])
    )
    six = Flow("tcp", "fd95::2", 41538, "fd95::1", 5432, None, record.handle, 0, 0, 0, 0, None)
    engine.on_connection_event("new", six)
    engine.on_connection_event("new", flow(41712, mark=record.handle))
    lines = [x for x in out.getvalue().splitlines() if "ACTION=connection_opened" in x]
    assert "g-6 tcp [fd95::2]:41538 -> [fd95::1]:5432" in lines[0]
    assert "PEER=[fd95::2]:41538" in lines[0] and "LOCAL=[fd95::1]:5432" in lines[0]
    assert "g-6 tcp 10.0.0.2:41712 -> 10.0.0.1:5432" in lines[1]
    assert "PEER=10.0.0.2:41712" in lines[1]


# ---- agent.toml [log] ---------------------------------------------------------------------

CONFIG = """
host_id = "host-a"
[api]
listen = "10.0.0.1:7443"
ca_file = "ca.pem"
cert_file = "agent.pem"
key_file = "agent.key"
[policy]
guarded = ["22/tcp"]
"""


@pytest.mark.parametrize("mode", ["summary", "each", "off"])
def test_log_connections_setting(mode: str) -> None:
    text = CONFIG + f'[log]\nconnections = "{mode}"\n' + TestSigner().toml()
    assert load_settings(text).log_connections == mode
    assert load_settings(CONFIG + TestSigner().toml()).log_connections == "summary"


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ('[log]\nconnections = "some"\n', 'log.connections: expected "summary", "each" or "off"'),
        ("[log]\nconnections = 3\n", "log.connections"),
        ('[log]\nconection = "each"\n', "log.conection"),
    ],
)
def test_a_bad_log_setting_is_refused_naming_the_field(section: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(CONFIG + section + TestSigner().toml())
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems
