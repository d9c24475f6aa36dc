"""The soak suite (marker `soak`, run by make test-soak); the harness is in tests/support."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
