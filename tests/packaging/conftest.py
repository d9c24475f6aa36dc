"""Fixtures of the packaging test (tests/packaging/pkglab.py has the harness).

Opt-in: these tests run only when the `packaging` marker is selected
(`make test-packaging`), as root, with the Debian build and container tools.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from pkglab import (
    CACHE,
    PACKAGES,
    REPO,
    BrokerServiceLab,
    Container,
    PackagingLab,
    Timings,
    record_owner,
    sweep_stale_runs,
)

L = TypeVar("L", bound=PackagingLab)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "packaging: builds the .debs and boots them under systemd-nspawn "
        "(root, minutes; run by make test-packaging)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Opt-in: deselected unless the packaging marker is selected (make test-packaging);
    skipped, with the reason, when selected where they cannot run."""
    markexpr = config.getoption("markexpr") or ""
    if "packaging" not in markexpr or "not packaging" in markexpr:
        ours = [item for item in items if item.get_closest_marker("packaging")]
        if ours:
            config.hook.pytest_deselected(items=ours)
            items[:] = [item for item in items if not item.get_closest_marker("packaging")]
        return
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (debootstrap, systemd-nspawn, network namespaces)"
    else:
        missing = [t for t in ("systemd-nspawn", "debootstrap", "dpkg-buildpackage", "lintian",
                               "nsenter", "ip", "nft", "scdoc") if shutil.which(t) is None]
        if missing:
            reason = f"missing tools: {', '.join(missing)} (make test-packaging installs them)"
    if reason is not None:
        for item in items:
            if item.get_closest_marker("packaging"):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def timings() -> Iterator[Timings]:
    t = Timings()
    yield t
    print("\npackaging test timings:\n" + t.report())


@pytest.fixture(scope="session")
def built_debs(timings: Timings) -> Iterator[tuple[dict[str, Path], str]]:
    """Build the source and binary packages (lintian must pass); yield
    ({package name: .deb}, lintian log)."""
    out = Path(tempfile.mkdtemp(prefix="portagent-deb-"))
    try:
        with timings.phase("build .debs + lintian"):
            result = subprocess.run(["bash", str(REPO / "packaging" / "build-deb.sh"), str(out)],
                                    capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, f"build-deb.sh failed:\n{result.stderr[-5000:]}"
        # build-deb.sh ends with one .deb path a line: NAME_VERSION_ARCH.deb.
        debs = {Path(line).name.split("_", 1)[0]: Path(line)
                for line in result.stdout.split() if line.endswith(".deb")}
        assert set(debs) == set(PACKAGES), result.stdout
        lintian_log = (REPO / "build" / "deb" / "lintian.log").read_text()
        yield debs, lintian_log
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def base_rootfs(timings: Timings) -> Path:
    with timings.phase("rootfs (cached)"):
        result = subprocess.run(["bash", str(REPO / "tests" / "packaging" / "rootfs.sh"),
                                 str(CACHE)], capture_output=True, text=True, timeout=900,
                                check=False)
    assert result.returncode == 0, f"rootfs.sh failed:\n{result.stderr[-5000:]}"
    return Path(result.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _booted(lab_class: type[L], built_debs: dict[str, Path], base_rootfs: Path,
            timings: Timings, teardown: str) -> Iterator[L]:
    """A lab of `lab_class` in its own run-* directory (stale ones swept first), set
    up, and closed and removed on every path."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sweep_stale_runs()
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    booted = lab_class(built_debs, base_rootfs, workdir, timings)
    try:
        booted.setup()
        yield booted
    finally:
        try:
            with timings.phase(teardown):
                booted.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def lab(built_debs: tuple[dict[str, Path], str], base_rootfs: Path,
        timings: Timings) -> Iterator[PackagingLab]:
    with _booted(PackagingLab, built_debs[0], base_rootfs, timings, "teardown") as booted:
        yield booted


@pytest.fixture(scope="module")
def broker_lab(built_debs: tuple[dict[str, Path], str], base_rootfs: Path,
               timings: Timings) -> Iterator[BrokerServiceLab]:
    """A booted container with all four packages (broker and agent units)."""
    with _booted(BrokerServiceLab, built_debs[0], base_rootfs, timings,
                 "teardown (broker)") as booted:
        yield booted


@pytest.fixture(scope="module")
def offline_root(base_rootfs: Path, timings: Timings) -> Iterator[Container]:
    """A fresh overlay of the cached rootfs, never booted: for apt and one-off commands
    (the broker's package needs no systemd). Its own run-* directory, swept like the lab's."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sweep_stale_runs()
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    container = Container(base_rootfs, None, workdir)
    try:
        record_owner(workdir, [], None)
        with timings.phase("overlay (broker)"):
            container.mount()
        yield container
    finally:
        try:
            container.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
