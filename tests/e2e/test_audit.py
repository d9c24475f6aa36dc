"""The local audit chain with the real daemon: decisions recorded, tampering found."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from portagent.testing.lab import BIN, Lab
from portagent.testing.netns import run, wait_until

pytestmark = pytest.mark.root
TCP = 8080


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(tmp_path, [f"{TCP}/tcp"], tcp_ports=[TCP]) as lab:
        yield lab


def audit(lab: Lab, *args: str) -> tuple[int, str]:
    # The file's path comes from the config ([audit] unset: audit.log in state.dir).
    result = run([str(BIN / "portagent"), "--config", str(lab.config), "audit", *args], check=False)
    return result.returncode, result.stdout + result.stderr


def test_grant_decisions_are_chained_and_an_edited_byte_is_found(lab: Lab) -> None:
    log = lab.dir / "state" / "audit.log"
    grant_id = lab.grant(port=f"{TCP}/tcp", ttl="60s", subject="alice")
    lab.revoke(grant_id)
    assert wait_until(lambda: b'"action":"revoke"' in log.read_bytes(), timeout=5)
    status, out = audit(lab, "verify")
    assert status == 0 and "records, chain intact, head" in out, out
    status, out = audit(lab, "show", "-o", "json")
    records = [json.loads(line) for line in out.splitlines()]
    # (a "config" record too where the lab host has no group portagent)
    decisions = [r for r in records if r["action"] != "config"]
    assert [r["action"] for r in decisions] == ["start", "apply", "revoke"]
    assert all(r["fields"].get("GRANT_ID") == grant_id for r in decisions[1:])
    status, table = audit(lab, "show")
    assert status == 0 and grant_id in table and "revoke" in table

    # A restart resumes the chain: stop and start are recorded, and it still verifies.
    lab.stop_agent()
    lab.start_agent()
    assert wait_until(lambda: log.read_bytes().count(b'"action":"start"') == 2, timeout=5)
    status, out = audit(lab, "verify")
    assert status == 0, out
    actions = [json.loads(line)["action"] for line in log.read_bytes().splitlines()]
    assert [a for a in actions if a != "config"] == ["start", "apply", "revoke", "stop", "start"]

    # One byte of the apply record changed: verify names its seq.
    raw = log.read_bytes()
    at = raw.index(b"alice")
    log.write_bytes(raw[:at] + b"A" + raw[at + 1 :])
    status, out = audit(lab, "verify")
    assert status == 1
    apply_seq = next(json.loads(line)["seq"] for line in raw.splitlines() if b"alice" in line)
    assert f"seq {apply_seq} " in out and "record edited" in out, out
