"""The grant table's incremental planning agrees with planning everything at once."""

from __future__ import annotations

import random
from dataclasses import replace

from portagent.agent.grant_table import GrantTable, element_keys
from portagent.agent.lifecycle import due_time
from portagent.agent.model import GrantRecord, GrantState
from portagent.agent.plan import desired_elements
from portagent.testing.grants import grant_record

NOW = 1_800_000_000.0


def record(
    handle: int,
    source: str,
    first: int,
    last: int,
    ttl: float,
    state: GrantState = GrantState.ACTIVE,
) -> GrantRecord:
    return grant_record(handle, [source], (first, last), ttl=ttl, now=NOW, state=state)


def random_records(rng: random.Random, count: int) -> list[GrantRecord]:
    sources = ["10.0.0.1/32", "10.0.0.0/24", "10.0.1.7/32", "fd00::/64"]
    records = []
    for handle in range(1, count + 1):
        first = rng.randint(20, 25)
        state = rng.choice([GrantState.ACTIVE] * 4 + [GrantState.REVOKED, GrantState.EXPIRED])
        records.append(
            record(
                handle,
                rng.choice(sources),
                first,
                first + rng.randint(0, 3),
                rng.choice([-5.0, 30.0, 60.0, 90.0]),
                state,
            )
        )
    return records


def test_desired_for_every_key_equals_planning_everything() -> None:
    rng = random.Random(7)
    for _ in range(50):
        records = random_records(rng, 12)
        table = GrantTable()
        for r in records:
            table.put(r, due_time(r, 60, 5))
        keys = {k for r in records for k in element_keys(r)}
        assert table.desired_for(keys, NOW, {}) == desired_elements(records, NOW)


def test_overlay_stands_in_for_a_batch_not_yet_committed() -> None:
    table = GrantTable()
    short = record(1, "10.0.0.1/32", 22, 22, 30)
    table.put(short, NOW + 30)
    longer = record(2, "10.0.0.1/32", 22, 22, 90)
    keys = set(element_keys(longer))
    assert {e.handle for e in table.desired_for(keys, NOW, {2: longer}).values()} == {2}
    revoked = replace(longer, state=GrantState.REVOKED)
    table.put(longer, NOW + 90)
    assert {e.handle for e in table.desired_for(keys, NOW, {2: revoked}).values()} == {1}


def test_remove_drops_the_grant_from_every_key_and_due_times_pop_once() -> None:
    table = GrantTable()
    a, b = record(1, "10.0.0.0/24", 22, 23, 30), record(2, "10.0.0.0/24", 22, 22, 60)
    table.put(a, NOW + 30)
    table.put(b, NOW + 60)
    table.put(replace(a, state=GrantState.REVOKED), NOW + 35)  # a second due entry for a
    assert [r.handle for r in table.pop_due(NOW + 40)] == [1]
    assert table.pop_due(NOW + 40) == []
    table.remove("g1")
    keys = set(element_keys(a))
    assert {k.port: e.handle for k, e in table.desired_for(keys, NOW, {}).items()} == {22: 2}
    assert len(table) == 1 and 1 not in table.by_handle


def test_only_active_grants_cover_keys_so_revoked_ones_do_not_pile_up() -> None:
    # Sustained grant + revoke on one source and port: revoked grants stay in the table
    # until their replay window ends, but planning that key walks only the active one.
    table = GrantTable()
    key = element_keys(record(1, "10.0.0.1/32", 22, 22, 60.0))[0]
    for handle in range(1, 1001):
        granted = record(handle, "10.0.0.1/32", 22, 22, 60.0)
        table.put(granted, NOW + 60)
        table.put(replace(granted, state=GrantState.REVOKED), NOW + 60)
    kept = record(1001, "10.0.0.1/32", 22, 22, 30.0)
    table.put(kept, NOW + 30)
    assert len(table) == 1001
    assert table._covering == {key: (1001,)}
    assert table.desired_for([key], NOW, {}) == desired_elements(table.by_id.values(), NOW)
    table.remove(kept.grant.grant_id)
    assert table._covering == {}
