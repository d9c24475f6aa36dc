"""Structured records in a real systemd-journald, and survival when journald dies."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from portagent.agent.connection_log import INDIVIDUAL_PER_WINDOW
from portagent.agent.events_catalog import MESSAGE_IDS
from portagent.testing.lab import Lab
from portagent.testing.netns import wait_until

pytestmark = pytest.mark.root
JOURNALD = Path("/lib/systemd/systemd-journald")
CATALOG = Path(__file__).parents[2] / "packaging" / "systemd" / "portagent.catalog"


@dataclass(frozen=True)
class Sandbox:
    pid: int  # the sandbox process: nsenter -t PID -m joins its mount namespace
    journald_pid: int


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
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
        yield Sandbox(proc.pid, int(line.split()[1]))
    finally:
        proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def journal(sandbox: Sandbox, *matches: str) -> list[dict[str, str]]:
    result = subprocess.run(["nsenter", "-t", str(sandbox.pid), "-m", "journalctl", "--no-pager",
                             "-o", "json", *matches], capture_output=True, text=True,
                            timeout=20, check=False)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_grant_lifecycle_and_refusals_are_queryable_journal_records(
        tmp_path: Path, sandbox: Sandbox) -> None:
    wrapper = ["nsenter", "-t", str(sandbox.pid), "-m"]
    with Lab(tmp_path, ["8080/tcp"], tcp_ports=[8080], wrapper=wrapper) as lab:
        grant_id = lab.grant(port="8080/tcp", ttl="2s", subject="alice@example.com",
                             options=("--reason", "INC-4711 db migration"))
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
        # Who opened it and why: the ticket as signed, and the key that signed it.
        for record in records:
            assert record["GRANT_REASON"] == "INC-4711 db migration"
            assert record["KEY_ID"] == lab.key_id
            assert record["MESSAGE_ID"] == MESSAGE_IDS[record["ACTION"]]
            # Sent with sendv: no CODE_* naming the logging helper (or anything else).
            assert not [k for k in record if k.startswith("CODE_")], record
        assert records[1]["KEEP_ESTABLISHED"] == "false"
        refusals = journal(sandbox, "ACTION=refuse")
        assert [(r["SUBJECT"], r["REASON_CODE"], r["PRIORITY"]) for r in refusals] == [
            ("mallory", "PORT_NOT_GUARDED", "4")]  # warning
        assert "REASON" not in refusals[0] and "GRANT_REASON" in refusals[0]
        assert refusals[0]["MESSAGE_ID"] == MESSAGE_IDS["refuse"]
        assert journal(sandbox, f"MESSAGE_ID={MESSAGE_IDS['apply']}")[0]["GRANT_ID"] == grant_id
        explained = explain(tmp_path, sandbox, MESSAGE_IDS["apply"])
        if explained is not None:  # this machine has a catalog directory to mount over
            assert f"grant {grant_id} applied for alice@example.com" in explained
            assert 'reason "INC-4711 db migration"' in explained
            assert "Documentation: man:portagentd(8)" in explained


def test_daemon_survives_journald_dying(tmp_path: Path, sandbox: Sandbox) -> None:
    wrapper = ["nsenter", "-t", str(sandbox.pid), "-m"]
    with Lab(tmp_path, ["8080/tcp"], tcp_ports=[8080], wrapper=wrapper) as lab:
        # Our own journald, by its pid (other journalds on this machine are not ours).
        subprocess.run(["kill", "-KILL", str(sandbox.journald_pid)], check=False, timeout=10)
        # The socket file is still there, nobody listens: every send is refused.
        grant_id = lab.grant(port="8080/tcp")
        assert lab.can_connect(8080)
        assert lab.agent is not None and lab.agent.poll() is None
        assert grant_id in lab.log()  # fell back to stderr


def explain(tmp_path: Path, sandbox: Sandbox, message_id: str) -> str | None:
    """`journalctl -x` in the sandbox with our catalog compiled the way the package's
    trigger does (`journalctl --update-catalog`, here under --root) and mounted over the
    catalog directory of the sandbox's mount namespace only. None when this machine has
    no /var/lib/systemd/catalog to mount over (never created here: not ours)."""
    target = Path("/var/lib/systemd/catalog")
    if not target.is_dir():
        return None
    root = tmp_path / "catalog-root"
    catalogs = root / "usr/lib/systemd/catalog"
    catalogs.mkdir(parents=True)
    shutil.copy(CATALOG, catalogs / "portagent.catalog")
    subprocess.run(["journalctl", f"--root={root}", "--update-catalog"], check=True, timeout=20)
    database = root / "var/lib/systemd/catalog"
    join = ["nsenter", "-t", str(sandbox.pid), "-m"]
    subprocess.run([*join, "mount", "--bind", str(database), str(target)], check=True,
                   timeout=10)
    result = subprocess.run([*join, "journalctl", "--no-pager", "-x", f"MESSAGE_ID={message_id}"],
                            capture_output=True, text=True, timeout=20, check=True)
    return result.stdout


def test_connection_burst_is_summarised_and_endpoints_are_spelled_right(
        tmp_path: Path, sandbox: Sandbox) -> None:
    wrapper = ["nsenter", "-t", str(sandbox.pid), "-m"]
    burst = 3 * INDIVIDUAL_PER_WINDOW + 2
    with Lab(tmp_path, ["8080/tcp"], tcp_ports=[8080], wrapper=wrapper,
             extra_config='[log]\nconnections = "summary"') as lab:
        grant_id = lab.grant(port="8080/tcp", ttl="6s")
        grant6 = lab.grant(source=lab.net.client_ip6, port="8080/tcp", ttl="6s")
        for _ in range(burst):
            assert lab.can_connect(8080)
        assert lab.can_connect(8080, v6=True)
        # Each grant ends, its connections (in TIME_WAIT) are cut, and a final summary
        # follows once their close events are in.
        def finals() -> list[dict[str, str]]:
            return journal(sandbox, "ACTION=connection_summary", "FINAL=true")
        assert wait_until(lambda: len(finals()) == 2, timeout=20), journal(sandbox)
        records = journal(sandbox, f"GRANT_ID={grant_id}")
        actions = [r["ACTION"] for r in records]
        assert actions.count("connection_opened") == INDIVIDUAL_PER_WINDOW
        assert actions.count("connection_closed") == INDIVIDUAL_PER_WINDOW
        summaries = [r for r in records if r["ACTION"] == "connection_summary"]
        assert sum(int(r["CONNECTIONS_OPENED"]) for r in summaries) == burst
        assert sum(int(r["CONNECTIONS_CLOSED"]) for r in summaries) == burst
        assert sum(int(r["CONNECTIONS_SUPPRESSED"]) for r in summaries) == (
            burst - INDIVIDUAL_PER_WINDOW)
        assert sum(int(r["RECORDS_SUPPRESSED"]) for r in summaries) == 2 * (
            burst - INDIVIDUAL_PER_WINDOW)
        assert [r["FINAL"] for r in summaries][-1] == "true"
        assert all(r["FINAL"] in ("true", "false") for r in summaries)
        assert all(r["MESSAGE_ID"] == MESSAGE_IDS["connection_summary"] for r in summaries)
        assert actions.index("expire") < actions.index("connection_summary")
        opened = next(r for r in records if r["ACTION"] == "connection_opened")
        assert re.fullmatch(rf"{re.escape(lab.net.client_ip)}:\d+", opened["PEER"]), opened
        assert opened["LOCAL"] == f"{lab.net.server_ip}:8080"
        assert f"{opened['PEER']} -> {lab.net.server_ip}:8080" in opened["MESSAGE"]
        (opened6,) = journal(sandbox, f"GRANT_ID={grant6}", "ACTION=connection_opened")
        assert re.fullmatch(rf"\[{re.escape(lab.net.client_ip6)}\]:\d+", opened6["PEER"])
        assert opened6["LOCAL"] == f"[{lab.net.server_ip6}]:8080"
        assert f"{opened6['PEER']} -> [{lab.net.server_ip6}]:8080" in opened6["MESSAGE"]
