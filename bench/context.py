"""What every scenario gets: the run's settings, and where results and targets go."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from bench.stats import Table


@dataclass
class Target:
    """One of the issue's targets, with what was measured against it."""

    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run


@dataclass
class Context:
    quick: bool
    repeats: int
    trials: int
    peers: tuple[str, ...]
    seed: int = 0
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)

    def pause(self) -> float:
        """Random pause before a trial: de-phases trials from pollers (fwknopd's 100 ms loop)."""
        return self.rng.uniform(0.02, 0.22)

    def target(self, name: str, goal: str, measured: str, met: bool | None) -> None:
        self.targets.append(Target(name, goal, measured, met))
