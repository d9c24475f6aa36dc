"""Planning: from the grants we want enforced and what the kernel holds, the change.

Pure functions over the model; the nftables adapter renders and applies the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from portagent.agent.model import (
    KEEP_SET,
    Element,
    ElementKey,
    GrantRecord,
    GrantState,
    MarkElement,
    limit_set,
)

# An element already in the kernel whose expiry is this much shorter than wanted is
# refreshed; listings report whole seconds, so anything finer would churn.
REFRESH_TOLERANCE = 2.0


def desired_elements(records: Iterable[GrantRecord], now: float) -> dict[ElementKey, Element]:
    """One element per (source network, protocol, port) of every active grant.

    Where grants overlap on the same key, the one that lasts longest wins (ties: the
    lower handle), so revoking it hands the key back to the other on the next plan.
    """
    wanted: dict[ElementKey, Element] = {}
    for record in records:
        grant = record.grant
        if record.state is not GrantState.ACTIVE or grant.expire_time <= now:
            continue
        for network in grant.sources:
            for port in grant.ports.ports():
                key = ElementKey(network, grant.protocol, port)
                candidate = Element(key, record.handle, grant.expire_time)
                current = wanted.get(key)
                if current is None or (candidate.expire_time, -candidate.handle) > (
                    current.expire_time,
                    -current.handle,
                ):
                    wanted[key] = candidate
    return wanted


MarkKey = tuple[str, int]  # (set name, handle)


def desired_marks(
    records: Iterable[GrantRecord], now: float, keep_max: float
) -> dict[MarkKey, MarkElement]:
    """Handle-set elements: `keep` for grants whose connections outlive them (until
    expire_time + keep_max, unless revoked), `limited_N` for grants capped at N."""
    wanted: dict[MarkKey, MarkElement] = {}
    for record in records:
        grant = record.grant
        if record.state is GrantState.REVOKED:
            continue
        if grant.keep_established and grant.expire_time + keep_max > now:
            wanted[(KEEP_SET, record.handle)] = MarkElement(
                KEEP_SET, record.handle, grant.expire_time + keep_max
            )
        if grant.max_connections and grant.expire_time > now:
            name = limit_set(grant.max_connections)
            wanted[(name, record.handle)] = MarkElement(name, record.handle, grant.expire_time)
    return wanted


@dataclass(frozen=True)
class Plan:
    """Element changes for one atomic kernel transaction."""

    add: tuple[Element, ...] = ()
    # (what the kernel holds, what it should hold instead)
    replace: tuple[tuple[Element, Element], ...] = ()
    delete: tuple[Element, ...] = ()
    maps: frozenset[tuple[int, int]] = field(default_factory=frozenset)
    marks_add: tuple[MarkElement, ...] = ()
    marks_delete: tuple[MarkElement, ...] = ()
    limits: frozenset[int] = field(default_factory=frozenset)

    @property
    def is_empty(self) -> bool:
        return not (self.add or self.replace or self.delete or self.marks_add or self.marks_delete)


def plan_changes(
    desired: Mapping[ElementKey, Element],
    actual: Mapping[ElementKey, Element],
    now: float,
    desired_mark_elements: Mapping[MarkKey, MarkElement] | None = None,
    actual_mark_elements: Mapping[MarkKey, MarkElement] | None = None,
    tolerance: float = REFRESH_TOLERANCE,
) -> Plan:
    """What to add, replace and delete so the kernel holds exactly `desired` (and the
    desired handle-set elements).

    An element whose kernel expiry is later than its grant's is replaced: no element
    may outlive its grant. One that expires in the kernel before we would delete it
    is left to the kernel.
    """
    add: list[Element] = []
    replace: list[tuple[Element, Element]] = []
    for key, want in desired.items():
        have = actual.get(key)
        if have is None or have.expire_time <= now:
            add.append(want)
        elif (
            have.handle != want.handle
            or have.expire_time > want.expire_time
            or have.expire_time < want.expire_time - tolerance
        ):
            replace.append((have, want))
    delete = [have for key, have in actual.items() if key not in desired and have.expire_time > now]
    maps = {(k.network.version, k.network.prefixlen) for k in desired}
    maps |= {(e.key.network.version, e.key.network.prefixlen) for e in delete}
    maps |= {(old.key.network.version, old.key.network.prefixlen) for old, _ in replace}

    want_marks = desired_mark_elements or {}
    have_marks = actual_mark_elements or {}
    marks_add: list[MarkElement] = []
    marks_delete: list[MarkElement] = []
    for mark_key, want_mark in want_marks.items():
        have_mark = have_marks.get(mark_key)
        if have_mark is None or have_mark.expire_time <= now:
            marks_add.append(want_mark)
        elif (
            have_mark.expire_time > want_mark.expire_time
            or have_mark.expire_time < want_mark.expire_time - tolerance
        ):
            marks_delete.append(have_mark)  # re-added with the right timeout
            marks_add.append(want_mark)
    marks_delete += [
        m for k, m in have_marks.items() if k not in want_marks and m.expire_time > now
    ]
    limits = {
        int(name.rsplit("_", 1)[1]) for name, _ in [*want_marks, *have_marks] if name != KEEP_SET
    }
    # Sorted for deterministic batches; elements are tuples ordered by their key (family,
    # address, prefix, protocol, port), compared in C.
    return Plan(
        tuple(sorted(add)),
        tuple(sorted(replace)),
        tuple(sorted(delete)),
        frozenset(maps),
        tuple(sorted(marks_add, key=_mark_order)),
        tuple(sorted(marks_delete, key=_mark_order)),
        frozenset(limits),
    )


def apply_mark_plan(actual: dict[MarkKey, MarkElement], plan: Plan) -> None:
    """Update `actual` (in place) to the handle sets after `plan` was committed."""
    for mark in plan.marks_delete:
        actual.pop((mark.set_name, mark.handle), None)
    for mark in plan.marks_add:
        actual[(mark.set_name, mark.handle)] = mark


def _mark_order(mark: MarkElement) -> tuple[str, int]:
    return (mark.set_name, mark.handle)


def apply_plan(actual: dict[ElementKey, Element], plan: Plan) -> None:
    """Update `actual` (in place: it can hold 100k elements) to the kernel state after
    `plan` was committed."""
    for element in plan.delete:
        actual.pop(element.key, None)
    for _, new in plan.replace:
        actual[new.key] = new
    for element in plan.add:
        actual[element.key] = element
