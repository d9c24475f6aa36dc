"""What the agent does with each message of the broker's stream: pure decisions, no I/O.

The fleet client (fleet_client.py) holds the stream and does what is decided here:

- a snapshot (already opened: signature, host and digest checked) at a generation
  *below* the one held is a replay and is refused; at the *same* generation it is the
  state the agent already enforces (converge again: that repairs local drift), unless
  its digest differs *and* it carries a grant the agent never held — then two
  different histories claim one generation (the broker's database was replaced) and
  it is refused. A same-generation snapshot that only lacks grants differs by expiry,
  which is not a change (ADR 0007). Above the held generation: converge.
- a change is applied when it is exactly held + 1; at or below the held generation
  it is a duplicate (ignored); above held + 1 some change was missed: ask for a
  snapshot once and ignore changes until one arrives.
- reconnecting backs off with jitter, over the configured addresses in turn;
- usage is reported at most once a second, only for grants whose figures changed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

GENERATION_GAP = "GENERATION_GAP"
GENERATION_REPLAY = "GENERATION_REPLAY"
GENERATION_CONFLICT = "GENERATION_CONFLICT"
# First reconnect delay; it doubles up to [broker] reconnect_max.
FIRST_BACKOFF = 0.2
# A stream that lasted this long (or delivered a message) was a real connection: the
# backoff starts again from FIRST_BACKOFF.
STABLE_AFTER = 5.0
MIN_USAGE_INTERVAL = 1.0


class Action(Enum):
    CONVERGE = "converge"  # snapshot: make the enforced set exactly this one
    APPLY = "apply"  # change: apply it, then acknowledge
    IGNORE = "ignore"  # duplicate change, or waiting for a snapshot
    REQUEST_SNAPSHOT = "request_snapshot"  # a gap: ask for the whole state
    REFUSE = "refuse"  # report a Refusal, change nothing


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""  # UPPER_SNAKE, for REFUSE and REQUEST_SNAPSHOT
    message: str = ""


class FleetSync:
    """Which broker generation the agent enforces, and what each message does to it.

    One per stream (the fleet client builds it from the store at every connect), used
    by the one thread that reads the stream."""

    def __init__(self, generation: int, digest: bytes) -> None:
        self.generation = generation
        self.digest = digest
        self.awaiting_snapshot = False

    def on_snapshot(
        self, generation: int, digest: bytes, adds_unknown: Callable[[], bool]
    ) -> Decision:
        """`adds_unknown()`: does the snapshot carry a grant the agent does not hold
        (asked only when it matters: it walks the snapshot)."""
        if generation < self.generation:
            return Decision(
                Action.REFUSE,
                GENERATION_REPLAY,
                f"generation: snapshot generation {generation} is below the held "
                f"{self.generation} (a replay, or the broker's generations restarted: "
                "see portagentd --forget-broker-generation)",
            )
        if generation == self.generation and digest != self.digest and adds_unknown():
            return Decision(
                Action.REFUSE,
                GENERATION_CONFLICT,
                f"digest: snapshot generation {generation} is the held one but adds grants "
                "the agent never held at it (the broker's history differs)",
            )
        return Decision(Action.CONVERGE)

    def on_change(self, generation: int) -> Decision:
        if generation <= self.generation:
            return Decision(
                Action.IGNORE,
                message=f"change {generation}: already at generation {self.generation}",
            )
        if self.awaiting_snapshot:
            return Decision(Action.IGNORE, message=f"change {generation}: awaiting a snapshot")
        if generation == self.generation + 1:
            return Decision(Action.APPLY)
        self.awaiting_snapshot = True
        return Decision(
            Action.REQUEST_SNAPSHOT,
            GENERATION_GAP,
            f"change {generation} after generation {self.generation}: "
            f"{generation - self.generation - 1} change(s) missed",
        )

    def enforced(self, generation: int, digest: bytes, *, snapshot: bool) -> None:
        """The engine now enforces `generation` (acknowledge and persist it)."""
        self.generation = generation
        self.digest = digest
        if snapshot:
            self.awaiting_snapshot = False


class Dialer:
    """Which address to dial next, and after how long.

    Addresses are tried in order, then round-robin. After a failed attempt the next
    address is tried at once while some address has not failed since the last good
    connection; once all have, each attempt waits the backoff (0.2 s doubling to
    `reconnect_max`, with jitter so a fleet does not reconnect in step)."""

    def __init__(
        self,
        addresses: Sequence[str],
        reconnect_max: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not addresses:
            raise ValueError("at least one broker address is needed")
        self._addresses = tuple(addresses)
        self._max = max(reconnect_max, FIRST_BACKOFF)
        self._rand = rand
        self._index = -1
        self._failures = 0

    def next(self) -> tuple[str, float]:
        """(address, seconds to wait before dialing it)."""
        self._index = (self._index + 1) % len(self._addresses)
        address = self._addresses[self._index]
        if self._failures < len(self._addresses):
            return address, 0.0
        rounds = self._failures - len(self._addresses)
        ceiling = min(self._max, FIRST_BACKOFF * 2 ** min(rounds, 32))
        # "Equal jitter": at least half the ceiling, so the delay still grows.
        return address, ceiling / 2 + ceiling / 2 * self._rand()

    def failed(self) -> None:
        self._failures += 1

    def connected(self) -> None:
        """A stream worked: the next failure starts the schedule again."""
        self._failures = 0


@dataclass(frozen=True)
class UsageFigures:
    connections: int
    packets: int
    bytes: int
    last_seen: float | None


def usage_changes(
    sent: Mapping[str, UsageFigures], now: Mapping[str, UsageFigures]
) -> dict[str, UsageFigures]:
    """The grants whose connections, packets or bytes differ from what was last sent
    (a grant seen for the first time counts when it has any figure)."""
    changed: dict[str, UsageFigures] = {}
    for grant_id, figures in now.items():
        before = sent.get(grant_id)
        if before is None:
            if figures.connections or figures.packets or figures.bytes:
                changed[grant_id] = figures
        elif (figures.connections, figures.packets, figures.bytes) != (
            before.connections,
            before.packets,
            before.bytes,
        ):
            changed[grant_id] = figures
    return changed


def usage_interval(last_read_seconds: float) -> float:
    """How long to wait between usage reads: once a second, but a read that lists a
    large table (seconds at 100k grants) never takes more than a fifth of the time."""
    return max(MIN_USAGE_INTERVAL, 5 * last_read_seconds)
