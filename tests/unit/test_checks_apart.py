"""The start's checks run in a forked child (daemon.check_runtime_apart), so the agent
itself never imports cryptography.x509: the same findings as check_runtime in-process,
and the in-process checks whenever the child cannot answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from portagent.agent import daemon
from portagent.agent.preflight import Finding, check_runtime
from portagent.agent.settings import Settings, load_settings_file
from portagent.broker.pki import init_dev_setup
from portagent.wire.ports import parse_port_spec

BROKEN_CERT = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    """A dev setup with a problem only the x509 parser finds (a certificate that does
    not parse) and a warning (a world-readable key)."""
    dev = tmp_path / "dev"
    init_dev_setup(
        dev, host_id="host-a", agent_address="127.0.0.1:7443", guarded=[parse_port_spec("8080/tcp")]
    )
    (dev / "state").mkdir()
    settings = load_settings_file(dev / "agent.toml")
    settings.api.ca_file.write_bytes(BROKEN_CERT)
    settings.api.key_file.chmod(0o644)
    return dev


def settings_of(dev: Path) -> Settings:
    return load_settings_file(dev / "agent.toml")


def test_the_child_finds_what_the_checks_find_here(dev: Path) -> None:
    settings = settings_of(dev)
    here = check_runtime(settings, starting=False)
    assert any("does not parse" in f.problem for f in here)
    assert any(f.warning for f in here)
    assert daemon.check_runtime_apart(settings, starting=False) == here


def test_the_agent_process_never_imports_x509(dev: Path) -> None:
    """In a fresh interpreter: the findings need the x509 parser, yet the process that
    asked for them has not imported it."""
    program = (
        "import json, sys\nfrom pathlib import Path\n"
        "from portagent.agent import daemon\n"
        "from portagent.agent.settings import load_settings_file\n"
        f"settings = load_settings_file(Path({str(dev / 'agent.toml')!r}))\n"
        "found = daemon.check_runtime_apart(settings, starting=False)\n"
        "print(json.dumps([[f.problem for f in found], "
        "sorted(m for m in sys.modules if m.startswith('cryptography.x509'))]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    problems, x509_modules = json.loads(out.stdout)
    assert any("does not parse" in p for p in problems)
    assert x509_modules == []


def test_without_fork_the_checks_run_here(dev: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of(dev)

    def no_fork() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    assert daemon.check_runtime_apart(settings, starting=False) == check_runtime(
        settings, starting=False
    )


def test_a_child_that_dies_means_the_checks_run_here(
    dev: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(dev)
    parent = os.getpid()
    calls: list[int] = []

    def dies_in_the_child(settings: Settings, *, starting: bool) -> list[Finding]:
        if os.getpid() != parent:
            os._exit(3)
        calls.append(os.getpid())
        return check_runtime(settings, starting=starting)

    monkeypatch.setattr(daemon, "check_runtime", dies_in_the_child)
    found = daemon.check_runtime_apart(settings, starting=False)
    assert calls == [parent]
    assert found == check_runtime(settings, starting=False)


def test_a_child_that_hangs_is_killed_and_the_checks_run_here(
    dev: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock another thread held at the fork can leave the child stuck forever: the
    agent does not wait for it past CHECKS_APART_TIMEOUT."""
    settings = settings_of(dev)
    parent = os.getpid()

    def hangs_in_the_child(settings: Settings, *, starting: bool) -> list[Finding]:
        if os.getpid() != parent:
            signal.pause()  # killed by the parent (SIGKILL), never returns
        return check_runtime(settings, starting=starting)

    monkeypatch.setattr(daemon, "check_runtime", hangs_in_the_child)
    monkeypatch.setattr(daemon, "CHECKS_APART_TIMEOUT", 0.5)
    found = daemon.check_runtime_apart(settings, starting=False)
    assert found == check_runtime(settings, starting=False)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"{}",
        b'[["where", "problem", "fix"]]',
        b'[["where", "problem", "fix", "yes"]]',
        b'[["where", 1, "fix", false]]',
        b"[" + b'["w", "p", "f", false],' * 50_000 + b'["w", "p", "f", false]]',
    ],
)
def test_anything_but_rows_of_findings_is_refused(data: bytes) -> None:
    assert daemon._parse_findings(data) is None


def test_rows_of_findings_are_read() -> None:
    rows = [["a", "b", "c", False], ["d", "e", "f", True]]
    assert daemon._parse_findings(json.dumps(rows).encode()) == [
        Finding("a", "b", "c"),
        Finding("d", "e", "f", warning=True),
    ]
    assert daemon._parse_findings(b"[]") == []
