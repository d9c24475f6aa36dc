"""Fixtures of the fault suite (tests/support/hostile.py has the harness)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
