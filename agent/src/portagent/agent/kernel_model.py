"""What the engine believes the kernel holds, so a change needs no listing.

Our table's elements and handle-set entries (with the expiry the kernel may really
give them), the maps and limit rules in the layout, how uncertain the last listing
was, and which keys a late commit left to re-assert. Pure bookkeeping: only the
engine's writer touches it (one writer at a time), the firewall adapter does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from portagent.agent.model import Element, ElementKey, MarkElement
from portagent.agent.plan import (
    REFRESH_TOLERANCE,
    MarkKey,
    Plan,
    apply_mark_plan,
    apply_plan,
)
from portagent.agent.render import KernelState, Layout
from portagent.agent.settings import Settings


def shifted(plan: Plan, late: float) -> Plan:
    """`plan` with every added element's expiry moved `late` seconds later: what the
    kernel may really hold after a late commit."""
    return replace(
        plan,
        add=tuple(e._replace(expire_time=e.expire_time + late) for e in plan.add),
        replace=tuple(
            (old, new._replace(expire_time=new.expire_time + late)) for old, new in plan.replace
        ),
        marks_add=tuple(replace(m, expire_time=m.expire_time + late) for m in plan.marks_add),
    )


@dataclass
class LateKeys:
    """Elements and handle-set entries a late commit may have left to outlive their grants."""

    elements: set[ElementKey]
    marks: set[MarkKey]

    def __bool__(self) -> bool:
        return bool(self.elements or self.marks)


class KernelModel:
    def __init__(self) -> None:
        self.elements: dict[ElementKey, Element] = {}
        self.marks: dict[MarkKey, MarkElement] = {}
        self.maps: frozenset[tuple[int, int]] = frozenset()
        self.limits: frozenset[int] = frozenset()
        # How much shorter than the truth an expiry read from the last listing may be.
        self.listing_uncertainty = 0.0
        # The table's structure must be re-asserted with the next batch (start, reload,
        # tampering, the periodic timer).
        self.layout_dirty = True
        self._late = LateKeys(set(), set())

    def __len__(self) -> int:
        return len(self.elements)

    def adopt(self, state: KernelState) -> None:
        """A listing replaces what we believed; the structure is re-asserted next."""
        self.elements = state.elements
        self.marks = state.marks
        self.listing_uncertainty = state.uncertainty
        self.maps = frozenset(state.maps) if state.present else frozenset()
        # Limit rules are rebuilt from what is wanted plus what the kernel still holds.
        self.limits = frozenset()
        self.layout_dirty = True

    @property
    def tolerance(self) -> float:
        """How much shorter than wanted an element may be before it is refreshed."""
        return max(REFRESH_TOLERANCE, self.listing_uncertainty)

    def elements_for(self, keys: Iterable[ElementKey]) -> dict[ElementKey, Element]:
        return {k: self.elements[k] for k in keys if k in self.elements}

    def marks_for(self, keys: Iterable[MarkKey]) -> dict[MarkKey, MarkElement]:
        return {k: self.marks[k] for k in keys if k in self.marks}

    def layout_for(self, plan: Plan, settings: Settings) -> Layout | None:
        """The layout to send with `plan`: None when the kernel's is already right."""
        maps = self.maps | plan.maps
        limits = self.limits | plan.limits
        if maps == self.maps and limits == self.limits and not self.layout_dirty:
            return None
        return Layout(settings.policy.guarded, settings.refuse_action, maps, limits)

    def committed(self, plan: Plan, layout: Layout | None, late: float, *, track: bool) -> None:
        """The kernel took `plan` (with `layout`, if any) `late` seconds after the time
        its timeouts were computed from. A late commit is recorded as the later expiry
        the kernel may really hold, and (with `track`) its keys are kept for re-assert."""
        if late > 0:
            plan = shifted(plan, late)
            if track:
                self._late.elements.update(e.key for e in plan.add)
                self._late.elements.update(new.key for _, new in plan.replace)
                self._late.marks.update((m.set_name, m.handle) for m in plan.marks_add)
        apply_plan(self.elements, plan)
        apply_mark_plan(self.marks, plan)
        if layout is not None:
            self.maps = layout.maps
            self.limits = layout.limits
        self.layout_dirty = False

    def take_late(self) -> LateKeys:
        late, self._late = self._late, LateKeys(set(), set())
        return late

    def forget_dropped(
        self, keys: Iterable[ElementKey], marks: Iterable[MarkKey], now: float
    ) -> None:
        """What the kernel dropped by itself (timed out by `now`) leaves the model too."""
        for key in keys:
            element = self.elements.get(key)
            if element is not None and element.expire_time <= now:
                del self.elements[key]
        for mark_key in marks:
            mark = self.marks.get(mark_key)
            if mark is not None and mark.expire_time <= now:
                del self.marks[mark_key]
