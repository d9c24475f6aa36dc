"""Structured records in a real systemd-journald, and survival when journald dies."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from portagent.testing.lab import Lab
from portagent.testing.netns import wait_until

pytestmark = pytest.mark.root
JOURNALD = Path("/lib/systemd/systemd-journald")


@pytest.fixture
def sandbox() -> Iterator[int]:
    if not JOURNALD.exists():
        pytest.skip("systemd-journald is not installed")
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
         "portagent.testing.journal_sandbox"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def journal(sandbox: int, *matches: str) -> list[dict[str, str]]:
    result = subprocess.run(["nsenter", "-t", str(sandbox), "-m", "journalctl", "--no-pager",
                             "-o", "json", *matches], capture_output=True, text=True,
                            timeout=20, check=False)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_grant_lifecycle_and_refusals_are_queryable_journal_records(
        tmp_path: Path, sandbox: int) -> None:
    wrapper = ["nsenter", "-t", str(sandbox), "-m"]
    with Lab(tmp_path, ["8080/tcp"], tcp_ports=[8080], wrapper=wrapper) as lab:
        grant_id = lab.grant(port="8080/tcp", ttl="2s", subject="alice@example.com")
        refused = lab.broker("grant", "--host", "host-a", "--source", lab.net.client_ip,
                             "--port", "22/tcp", "--ttl", "1m", "--subject", "mallory",
                             check=False)
        assert refused.returncode == 1
        assert wait_until(lambda: any(r["ACTION"] == "expire" for r in
                                      journal(sandbox, f"GRANT_ID={grant_id}")), timeout=8)
        records = journal(sandbox, f"GRANT_ID={grant_id}")
        assert [r["ACTION"] for r in records] == ["apply", "expire"]
        applied = records[0]
        assert applied["SUBJECT"] == "alice@example.com"
        assert applied["SOURCE"] == f"{lab.net.client_ip}/32"
        assert (applied["PORT"], applied["PROTOCOL"]) == ("8080", "tcp")
        assert applied["SYSLOG_IDENTIFIER"] == "portagentd"
        refusals = journal(sandbox, "ACTION=refuse")
        assert [(r["SUBJECT"], r["REASON"], r["PRIORITY"]) for r in refusals] == [
            ("mallory", "PORT_NOT_GUARDED", "4")]  # warning


def test_daemon_survives_journald_dying(tmp_path: Path, sandbox: int) -> None:
    wrapper = ["nsenter", "-t", str(sandbox), "-m"]
    with Lab(tmp_path, ["8080/tcp"], tcp_ports=[8080], wrapper=wrapper) as lab:
        subprocess.run(["nsenter", "-t", str(sandbox), "-m", "pkill", "-f", "systemd-journald"],
                       check=False, timeout=10)
        # The socket file is still there, nobody listens: every send is refused.
        grant_id = lab.grant(port="8080/tcp")
        assert lab.can_connect(8080)
        assert lab.agent is not None and lab.agent.poll() is None
        assert grant_id in lab.log()  # fell back to stderr
