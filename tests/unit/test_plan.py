"""The planner: desired elements from grants, and the change against the kernel."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from portagent.agent.model import (
    Element,
    ElementKey,
    GrantRecord,
    GrantState,
    MarkElement,
    Source,
)
from portagent.agent.plan import apply_plan, desired_elements, desired_marks, plan_changes
from portagent.testing.grants import grant_record
from portagent.wire.ports import Protocol

NOW = 1_800_000_000.0


def record(
    handle: int,
    sources: list[str],
    ports: tuple[int, int] = (22, 22),
    ttl: float = 60.0,
    state: GrantState = GrantState.ACTIVE,
    protocol: Protocol = Protocol.TCP,
) -> GrantRecord:
    return grant_record(handle, sources, ports, ttl=ttl, now=NOW, state=state, protocol=protocol)


def key(net: str, port: int = 22, protocol: Protocol = Protocol.TCP) -> ElementKey:
    return ElementKey(Source.of(ipaddress.ip_network(net)), protocol, port)


def test_one_element_per_source_and_port() -> None:
    desired = desired_elements([record(1, ["10.0.0.1/32", "fd00::/64"], (8000, 8002))], NOW)
    assert set(desired) == {
        key(n, p) for n in ("10.0.0.1/32", "fd00::/64") for p in (8000, 8001, 8002)
    }
    assert {e.handle for e in desired.values()} == {1}
    assert all(e.expire_time == NOW + 60 for e in desired.values())


def test_overlap_on_one_key_longest_grant_wins() -> None:
    desired = desired_elements(
        [record(1, ["10.0.0.1/32"], ttl=60), record(2, ["10.0.0.1/32"], ttl=120)], NOW
    )
    assert desired[key("10.0.0.1/32")].handle == 2
    # Revoking the longer one hands the key back to the other.
    desired = desired_elements(
        [
            record(1, ["10.0.0.1/32"], ttl=60),
            record(2, ["10.0.0.1/32"], ttl=120, state=GrantState.REVOKED),
        ],
        NOW,
    )
    assert desired[key("10.0.0.1/32")] == Element(key("10.0.0.1/32"), 1, NOW + 60)


def test_revoked_and_expired_grants_have_no_elements() -> None:
    records = [
        record(1, ["10.0.0.1/32"], state=GrantState.REVOKED),
        record(2, ["10.0.0.2/32"], ttl=10),
    ]
    assert desired_elements(records, NOW + 10) == {}


def test_plan_adds_missing_and_deletes_unwanted() -> None:
    desired = desired_elements([record(1, ["10.0.0.1/32"])], NOW)
    stale = Element(key("10.0.0.9/32"), 7, NOW + 30)
    plan = plan_changes(desired, {stale.key: stale}, NOW)
    assert [e.key for e in plan.add] == [key("10.0.0.1/32")]
    assert plan.delete == (stale,)
    assert plan.maps == frozenset({(4, 32)})
    kernel = {stale.key: stale}
    apply_plan(kernel, plan)
    assert kernel == desired


def test_plan_is_empty_when_kernel_matches() -> None:
    desired = desired_elements([record(1, ["10.0.0.0/24"])], NOW)
    # Kernel listings give whole seconds remaining: a slightly shorter expiry is fine.
    actual = {k: Element(k, e.handle, e.expire_time - 0.9) for k, e in desired.items()}
    assert plan_changes(desired, actual, NOW).is_empty


def test_kernel_element_outliving_its_grant_is_replaced() -> None:
    desired = desired_elements([record(1, ["10.0.0.1/32"], ttl=60)], NOW)
    forever = Element(key("10.0.0.1/32"), 1, float("inf"))  # e.g. added by hand without timeout
    plan = plan_changes(desired, {forever.key: forever}, NOW)
    assert plan.replace == ((forever, desired[forever.key]),)


def test_wrong_handle_is_replaced_and_expired_kernel_element_readded() -> None:
    desired = desired_elements([record(1, ["10.0.0.1/32"])], NOW)
    wrong = Element(key("10.0.0.1/32"), 9, NOW + 60)
    assert plan_changes(desired, {wrong.key: wrong}, NOW).replace
    gone = Element(key("10.0.0.1/32"), 1, NOW - 1)
    assert plan_changes(desired, {gone.key: gone}, NOW).add


def test_elements_expiring_on_their_own_are_not_deleted() -> None:
    old = Element(key("10.0.0.1/32"), 1, NOW)
    assert plan_changes({}, {old.key: old}, NOW).is_empty


def test_every_planned_element_ends_no_later_than_its_grant() -> None:
    records = [
        record(h, [f"10.0.{h}.0/24", f"fd00:{h}::/64"], (1000, 1000 + h), ttl=5.0 * h)
        for h in range(1, 30)
    ]
    by_handle = {r.handle: r for r in records}
    plan = plan_changes(desired_elements(records, NOW), {}, NOW)
    for element in plan.add:
        assert element.expire_time <= by_handle[element.handle].grant.expire_time


def test_handle_sets_keep_outlives_the_grant_and_limits_follow_it() -> None:
    keep = record(1, ["10.0.0.1/32"], ttl=60)
    keep = replace(keep, grant=replace(keep.grant, keep_established=True, max_connections=3))
    marks = desired_marks([keep], NOW, keep_max=3600)
    assert marks == {
        ("keep", 1): MarkElement("keep", 1, NOW + 60 + 3600),
        ("limited_3", 1): MarkElement("limited_3", 1, NOW + 60),
    }
    # After expiry only the keep element is wanted; after revocation nothing.
    assert set(desired_marks([keep], NOW + 61, keep_max=3600)) == {("keep", 1)}
    assert desired_marks([replace(keep, state=GrantState.REVOKED)], NOW, keep_max=3600) == {}
    plan = plan_changes({}, {}, NOW, marks, {})
    assert plan.limits == frozenset({3}) and len(plan.marks_add) == 2
    stale = {("keep", 9): MarkElement("keep", 9, NOW + 5)}
    assert plan_changes({}, {}, NOW, {}, stale).marks_delete == (stale[("keep", 9)],)


def test_a_listing_read_over_seconds_is_not_mistaken_for_short_elements() -> None:
    desired = desired_elements([record(1, ["10.0.0.1/32"], ttl=600)], NOW)
    # Read 3 s into a long dump, counted from its start: looks 3 s short.
    listed = {k: Element(k, e.handle, e.expire_time - 3.0) for k, e in desired.items()}
    assert plan_changes(desired, listed, NOW).replace  # the default tolerance refreshes
    assert plan_changes(desired, listed, NOW, tolerance=4.0).is_empty
