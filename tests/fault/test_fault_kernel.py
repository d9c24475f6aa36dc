"""Faults around the kernel and the process: tampering in nftables, SIGSTOP and SIGKILL
during bursts of applies, a second daemon in the same namespace.

Promises: nothing is in the kernel that the store did not commit; no element outlives
its grant by more than EXPIRY_BOUND; tampering is repaired within about a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import Burst, after_fault_problems, sigkill_rounds
from hostile import (
    EXPIRY_BOUND,
    HEALTH,
    RANGE_PORT,
    TCP_PORT,
    Arena,
    lab_config_copy,
    open_arena,
    record_result,
)

from portagent.testing.lab import BIN
from portagent.testing.netns import wait_until

pytestmark = pytest.mark.root

KILL_ROUNDS = int(os.environ.get("PORTAGENT_FAULT_KILL_ROUNDS", "3"))


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    with open_arena(tmp_path, "pt-flt", legit=False) as arena:
        yield arena


def repair_seconds(arena: Arena, expected: set[tuple[str, str, int, int]], limit: float = 5.0
                   ) -> float | None:
    """Seconds until the kernel holds exactly `expected` again (None: not within limit)."""
    started = time.monotonic()
    if wait_until(lambda: arena.kernel_elements() == expected, limit, interval=0.02):
        return time.monotonic() - started
    return None


@pytest.mark.parametrize("tamper", ["foreign-element", "foreign-rule", "delete-table",
                                    "flush-table", "flush-ruleset"])
def test_tampering_is_repaired_within_a_second(arena: Arena, tamper: str) -> None:
    legit = arena.apply_legit([arena.legit_v4, arena.lab.net.client_ip6], port=RANGE_PORT)
    expected = arena.kernel_elements()
    assert expected and arena.lab.can_connect(RANGE_PORT, v6=True)
    handle = arena.store_handles()[legit.grant_id]
    client = arena.lab.net.client_ip
    commands = {
        "foreign-element": ["nft", "add", "element", "inet", "portagent", "g4_32",
                            f"{{ {client} . tcp . {TCP_PORT} : {handle} }}"],
        "foreign-rule": ["nft", "insert", "rule", "inet", "portagent", "input", "accept"],
        "delete-table": ["nft", "delete", "table", "inet", "portagent"],
        "flush-table": ["nft", "flush", "table", "inet", "portagent"],
        "flush-ruleset": ["nft", "flush", "ruleset"],
    }
    rules_before = arena.lab.nft("-j", "list", "chain", "inet", "portagent", "input").count(
        '"rule"')
    arena.lab.net.exec_server(commands[tamper])
    started = time.monotonic()

    def repaired() -> bool:
        listing = arena.lab.net.exec_server(
            ["nft", "-j", "list", "chain", "inet", "portagent", "input"], check=False)
        return (listing.returncode == 0 and listing.stdout.count('"rule"') == rules_before
                and arena.kernel_elements() == expected)

    ok = wait_until(repaired, 5.0, interval=0.02)
    seconds = time.monotonic() - started
    record_result(f"tamper_{tamper}", {"repaired": ok, "seconds": round(seconds, 3)})
    assert ok, f"{tamper}: not repaired within 5 s; kernel: {arena.kernel_elements()}"
    assert seconds <= 1.5, f"{tamper}: repaired only after {seconds:.2f}s"
    assert not arena.lab.can_connect(TCP_PORT)  # the foreign element is gone
    assert arena.lab.can_connect(RANGE_PORT, v6=True)  # ours is back
    arena.check(probe=False)  # the client's v6 address is granted here


def test_sigkill_during_bursts_keeps_kernel_within_the_store(arena: Arena) -> None:
    burst, problems, restarts = sigkill_rounds(arena, KILL_ROUNDS, seed=7, pause=(0.3, 1.5))
    problems += after_fault_problems(arena, burst)
    record_result("sigkill_loop", {"rounds": KILL_ROUNDS, "restart_seconds": restarts,
                                   "applies": burst.codes, "acked": len(burst.acked)})
    assert len(burst.acked) > 0, burst.codes
    assert not problems, "\n".join(problems[:40])
    assert not arena.ledger.violations, arena.ledger.violations[:10]


def test_sigstop_during_a_burst_closes_access_on_time(arena: Arena) -> None:
    client_grant = arena.apply_legit([arena.lab.net.client_ip], port=TCP_PORT, ttl=3.0)
    assert arena.worker.probe(arena.lab.net.server_ip, TCP_PORT)
    pid = arena.lab.agent_pid()
    with Burst(arena) as burst:
        time.sleep(0.5)
        os.kill(pid, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            closed_at = None
            while time.monotonic() - stopped < 5.0:
                if closed_at is None and not arena.worker.probe(arena.lab.net.server_ip,
                                                               TCP_PORT):
                    closed_at = time.time()
                time.sleep(0.05)
        finally:
            os.kill(pid, signal.SIGCONT)
    late = None if closed_at is None else closed_at - client_grant.expire_time
    record_result("sigstop", {"closed_after_expiry_seconds": late, "applies": burst.codes})
    assert closed_at is not None, "access stayed open while the daemon was stopped"
    # One probe interval (0.3 s timeout + 0.05 s) of slack on top of the bound.
    assert late is not None and late <= EXPIRY_BOUND + 0.4, f"closed {late:.2f}s after expiry"
    assert wait_until(lambda: arena.worker.call(HEALTH, b"", timeout=2.0)["code"] == "OK", 10)
    del arena.legit[client_grant.grant_id]
    problems = after_fault_problems(arena, burst)
    assert not problems, "\n".join(problems[:40])


@pytest.mark.parametrize("same_config", [True, False])
def test_a_second_daemon_in_the_namespace_refuses_to_start(arena: Arena,
                                                           same_config: bool) -> None:
    arena.apply_legit([arena.legit_v4])
    before = arena.kernel_elements()
    chain_before = arena.lab.nft("list", "table", "inet", "portagent")
    config = arena.lab.config if same_config else lab_config_copy(
        arena.lab, "agent2.toml", state="state2", socket="admin2.sock", port=7444)
    try:
        second = subprocess.run(
            ["ip", "netns", "exec", arena.lab.net.server, str(BIN / "portagentd"), "--config",
             str(config)], capture_output=True, text=True, timeout=15, check=False)
    except subprocess.TimeoutExpired:  # run() has killed it
        pytest.fail("a second portagentd kept running in the same namespace for 15 s")
    record_result(f"second_daemon_same_config_{same_config}",
                  {"exit": second.returncode, "stderr": second.stderr[-300:]})
    assert second.returncode != 0, "a second portagentd started in the same namespace"
    assert second.stderr.strip(), "the second daemon said nothing about why it stopped"
    # The first one is untouched and still serves, on its own socket.
    assert arena.lab.agent is not None and arena.lab.agent.poll() is None
    assert arena.lab.cli("status", check=False).returncode == 0
    assert arena.kernel_elements() == before
    assert arena.lab.nft("list", "table", "inet", "portagent") .count("\n") == \
        chain_before.count("\n")
    arena.check()
