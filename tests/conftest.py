"""Shared fixtures. Real-kernel tests run only as root, each in namespaces of its own."""

from __future__ import annotations

import pytest

from portagent.testing.lab import environment_ok


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = environment_ok()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
