"""Long runs (`make test-soak`): the hostile and fault suites at full size.

Figures go to $PORTAGENT_RELIABILITY_OUT (JSON lines) for docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from attacks import Forge, catalogue, run_generated
from faults import sigkill_rounds
from hostile import (
    APPLY,
    BATCH,
    TCP_PORT,
    Arena,
    Case,
    open_arena,
    record_result,
    reset_hwm,
    vm_hwm_kib,
)

from portagent.testing.netns import wait_until
from portagent.v1 import agent_pb2 as pb

# Long runs by design: the suite-wide 120 s timeout is for the fast tests.
pytestmark = [pytest.mark.root, pytest.mark.soak, pytest.mark.timeout(3600)]

REQUESTS = int(os.environ.get("PORTAGENT_SOAK_REQUESTS", "12000"))
KILL_ROUNDS = int(os.environ.get("PORTAGENT_SOAK_KILL_ROUNDS", "30"))
TAMPER_ROUNDS = int(os.environ.get("PORTAGENT_SOAK_TAMPER_ROUNDS", "30"))


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    with open_arena(tmp_path, "pt-sok") as arena:
        yield arena


def test_soak_over_ten_thousand_hostile_requests(arena: Arena) -> None:
    started = time.monotonic()
    forge = Forge(arena)
    for case in catalogue(forge):
        arena.fire(case)
        arena.sweep(f"{case.category}/{case.name}")
    per_batch = 30
    failures = run_generated(arena, max(1, REQUESTS // per_batch), per_batch)
    seconds = time.monotonic() - started
    violations = Counter(v.split(":")[0] + ": " + v.split(":", 2)[1][:60]
                         for v in arena.ledger.violations)
    record_result("soak_hostile", {
        "fired": dict(arena.ledger.fired), "total": arena.ledger.total,
        "codes": {f"{c}/{k}": n for (c, k), n in arena.ledger.codes.items()},
        "checks": arena.checks, "unintended_opens": arena.unintended_opens,
        "failures": failures, "violations": dict(violations.most_common(50)),
        "seconds": round(seconds, 1)})
    print("\n" + arena.ledger.summary())
    assert arena.ledger.total >= REQUESTS
    assert not failures, "\n".join(failures)
    assert arena.unintended_opens == 0
    assert not arena.ledger.violations, "\n".join(
        f"{n} x {v}" for v, n in violations.most_common(40))


def test_soak_peak_memory_per_hostile_request(arena: Arena) -> None:
    pid = arena.lab.agent_pid()
    forge = Forge(arena)
    raw = forge.legit_bytes()
    figures = {}
    requests = {
        # The largest batch the agent accepts (10,000 entries), then one it must refuse.
        "batch-10000-bad-signatures": (BATCH, pb.BatchApplyGrantsRequest(signed_grants=[
            pb.SignedGrant(grant=raw, signature=bytes(64), key_id=arena.signer.key_id)
        ] * 10_000).SerializeToString()),
        "batch-100000-bad-signatures": (BATCH, pb.BatchApplyGrantsRequest(signed_grants=[
            pb.SignedGrant(grant=raw, signature=bytes(64), key_id=arena.signer.key_id)
        ] * 100_000).SerializeToString()),
        "apply-63MiB": (APPLY, pb.ApplyGrantRequest(signed_grant=pb.SignedGrant(
            grant=secrets.token_bytes(63 << 20), signature=bytes(64),
            key_id=arena.signer.key_id)).SerializeToString()),
        "apply-70MiB": (APPLY, pb.ApplyGrantRequest(signed_grant=pb.SignedGrant(
            grant=secrets.token_bytes(70 << 20), signature=bytes(64),
            key_id=arena.signer.key_id)).SerializeToString()),
        "garbage-1MiB": (APPLY, secrets.token_bytes(1 << 20)),
    }
    for name, (method, payload) in requests.items():
        reset_hwm(pid)
        before = vm_hwm_kib(pid)
        reply = arena.fire(Case("memory", name, method, payload, timeout=300.0,
                                may_succeed=method == BATCH))
        after = vm_hwm_kib(pid)
        figures[name] = {"bytes": len(payload), "code": reply["code"],
                         "hwm_before_kib": before, "hwm_after_kib": after,
                         "peak_growth_kib": after - before}
    record_result("soak_memory", figures)
    arena.check()
    assert not arena.ledger.violations, arena.ledger.violations[:10]


def test_soak_sigkill_loop(arena: Arena) -> None:
    burst, problems, restarts = sigkill_rounds(arena, KILL_ROUNDS, seed=11, pause=(0.2, 1.0))
    record_result("soak_sigkill_loop", {"rounds": KILL_ROUNDS, "restart_seconds": restarts,
                                        "applies": burst.codes, "acked": len(burst.acked),
                                        "problems": problems[:20]})
    assert not problems, "\n".join(problems[:40])


def test_soak_tamper_loop(arena: Arena) -> None:
    rng = random.Random(5)
    expected = arena.kernel_elements()
    net = arena.lab.net
    tampers = [
        ["nft", "flush", "ruleset"],
        ["nft", "delete", "table", "inet", "portagent"],
        ["nft", "flush", "table", "inet", "portagent"],
        ["nft", "add", "element", "inet", "portagent", "g4_32",
         f"{{ {net.client_ip} . tcp . {TCP_PORT} : 1 }}"],
        ["nft", "insert", "rule", "inet", "portagent", "input", "accept"],
    ]
    times: dict[str, list[float]] = {}
    failures = []
    for _ in range(TAMPER_ROUNDS):
        command = rng.choice(tampers)
        net.exec_server(command, check=False)
        started = time.monotonic()
        ok = wait_until(lambda: arena.kernel_elements() == expected
                        and not arena.worker.probe(net.server_ip, TCP_PORT), 5.0, 0.02)
        seconds = time.monotonic() - started
        times.setdefault(" ".join(command[1:3]), []).append(round(seconds, 3))
        if not ok or seconds > 1.5:
            failures.append(f"{' '.join(command)}: repaired={ok} after {seconds:.2f}s")
        time.sleep(0.2)
    record_result("soak_tamper", {"rounds": TAMPER_ROUNDS, "seconds": times})
    arena.check()
    assert not failures, "\n".join(failures)
