"""Fixtures of the hostile-input suite: one daemon in a namespace per module, attacked
by a worker in the client namespace (tests/support/hostile.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from hostile import GUARDED, RANGE_PORT, TCP_PORT, UDP_PORT, Arena

from portagent.testing.lab import Lab


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    workdir = tmp_path_factory.mktemp("hostile")
    with Lab(workdir, GUARDED, prefix="pt-hst", tcp_ports=[TCP_PORT, RANGE_PORT],
             udp_ports=[UDP_PORT]) as lab:
        arena = Arena(lab)
        try:
            # Legitimate grants the attacks must leave exactly as they are.
            arena.apply_legit([arena.legit_v4])
            arena.apply_legit([arena.legit_v6], port=RANGE_PORT, port_end=RANGE_PORT + 1)
            arena.apply_legit([arena.legit_v4], port=UDP_PORT, protocol=2)
            arena.check()
            yield arena
        finally:
            arena.close()
