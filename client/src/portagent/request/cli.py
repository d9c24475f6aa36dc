"""Placeholder replaced by the client's real command line in this issue's work."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("portagent-request: not built yet")
