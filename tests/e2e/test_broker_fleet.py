"""The real broker service and the real agent: the agent in one namespace dials out to
`portagent-broker serve` in another, grants are created and revoked through the
service's HTTPS API with the broker CLI, and real traffic proves what is open."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portagent.testing.lab import HOST_ID, Lab
from portagent.testing.netns import wait_until

pytestmark = pytest.mark.root

TCP, OTHER = 8080, 9000


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(
        tmp_path,
        ["8080/tcp", "9000/tcp"],
        prefix="pt-fleet",
        tcp_ports=[TCP, OTHER],
        service=True,
    ) as lab:
        yield lab


def _host(lab: Lab) -> dict[str, Any]:
    hosts = lab.broker_json("hosts")
    (host,) = [h for h in hosts if h["host_id"] == HOST_ID]
    assert isinstance(host, dict)
    return host


def _converged(lab: Lab) -> bool:
    host = _host(lab)
    return bool(host["connected"]) and host["acked_generation"] == host["generation"]


def _broker_grant(lab: Lab, grant_id: str) -> dict[str, Any]:
    grants = lab.broker_json("grants", "--host", HOST_ID)
    (grant,) = [g for g in grants if g["grant_id"] == grant_id]
    assert isinstance(grant, dict)
    return grant


def _usage_seen(lab: Lab, grant_id: str, *, held: bool = False) -> str:
    """Empty when the broker shows the agent's figures for the grant (and, with `held`, at
    least one live connection); else what each side shows."""
    keys = ("connections", "packets", "bytes")
    broker = _broker_grant(lab, grant_id)
    (agent,) = [g for g in lab.list_json() if g["grant_id"] == grant_id]
    seen = [broker[k] for k in keys], [agent[k] for k in keys]
    if seen[0] == seen[1] and (not held or broker["connections"] >= 1):
        return ""
    return f"broker shows {seen[0]}, agent {seen[1]} (connections, packets, bytes)"


def test_api_grant_opens_the_port_usage_reaches_the_broker_revoke_closes(lab: Lab) -> None:
    assert wait_until(lambda: _host(lab)["connected"], timeout=15)
    assert not lab.can_connect(TCP)
    grant_id = lab.grant(port=f"{TCP}/tcp", ttl="60s")
    # Through the API, the fleet stream and the agent's one kernel transaction.
    assert wait_until(lambda: lab.can_connect(TCP), timeout=10)
    assert [g["grant_id"] for g in lab.list_json()] == [grant_id]
    assert wait_until(lambda: _converged(lab), timeout=10)
    host = _host(lab)
    assert host["generation"] >= 1 and not host["drift"]

    # What went through the grant reaches the broker (CONNS/BYTES/LAST SEEN).
    held = lab.hold(TCP)
    try:
        # What the agent counts, the broker shows (the probes' own connections may still
        # be counted next to the held one while conntrack winds them down).
        reported = lambda: _usage_seen(lab, grant_id, held=True) == ""  # noqa: E731
        # Reports go out at most once a second, slower when reading usage is slow (load).
        assert wait_until(reported, timeout=30), _usage_seen(lab, grant_id)
        grant = _broker_grant(lab, grant_id)
        assert grant["bytes"] > 0 and grant["last_seen"] is not None
        table = lab.broker("grants", "--host", HOST_ID).stdout
        assert grant_id in table and "CONNS" in table
    finally:
        held.kill()
        held.wait(5)

    lab.broker("revoke", grant_id, "--reason", "done")
    assert wait_until(lambda: not lab.can_connect(TCP, timeout=0.3), timeout=10)
    assert wait_until(lambda: _converged(lab), timeout=10)
    assert _broker_grant(lab, grant_id)["state"] == "revoked"
    assert "ACTION=tamper" not in lab.log()


def test_agent_down_then_up_converges_to_what_changed_meanwhile(lab: Lab) -> None:
    first = lab.grant(port=f"{TCP}/tcp", ttl="60s")
    assert wait_until(lambda: lab.can_connect(TCP), timeout=10)
    lab.stop_agent()
    # While the agent is down: one grant revoked, another created.
    lab.broker("revoke", first, "--reason", "rotated")
    second = lab.grant(port=f"{OTHER}/tcp", ttl="60s")
    assert not _host(lab)["connected"]
    lab.start_agent()
    assert wait_until(lambda: lab.can_connect(OTHER), timeout=15)
    assert wait_until(lambda: not lab.can_connect(TCP, timeout=0.3), timeout=10)
    assert wait_until(lambda: _converged(lab), timeout=10)
    states = {g["grant_id"]: g["state"] for g in lab.list_json()}
    assert states.get(second) == "active"
    assert states.get(first, "revoked") == "revoked"


def test_broker_away_the_agent_enforces_and_expires_on_time_then_reconnects(lab: Lab) -> None:
    grant_id = lab.grant(port=f"{TCP}/tcp", ttl="5s")
    assert wait_until(lambda: lab.can_connect(TCP), timeout=10)
    lab.stop_broker(signal.SIGKILL)
    # The broker is gone: what the agent holds stays enforced, then closes on time.
    assert lab.can_connect(TCP)
    assert wait_until(lambda: not lab.can_connect(TCP, timeout=0.3), timeout=10)
    lab.start_broker()
    assert wait_until(lambda: _host(lab)["connected"], timeout=40)
    assert _broker_grant(lab, grant_id)["state"] == "expired"
    # And it takes new grants again through the new stream.
    lab.grant(port=f"{OTHER}/tcp", ttl="30s")
    assert wait_until(lambda: lab.can_connect(OTHER), timeout=10)
