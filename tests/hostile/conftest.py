"""Fixtures of the hostile-input suite: one daemon in a namespace per module, attacked
by a worker in the client namespace (tests/support/hostile.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from hostile import Arena, open_arena


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    with open_arena(tmp_path_factory.mktemp("hostile"), "pt-hst") as arena:
        arena.check()
        yield arena
