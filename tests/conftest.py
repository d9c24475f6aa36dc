"""Shared fixtures. Real-kernel tests run only as root, each in namespaces of its own."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

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


@pytest.fixture
def local_zone() -> Iterator[Callable[[str], None]]:
    """Set this process's local time zone (TZ, e.g. "UTC0", "CET-1") for one test;
    the CLIs print wall-clock times in it, with their offset."""
    before = os.environ.get("TZ")

    def set_zone(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()

    try:
        yield set_zone
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()
