"""Hostile requests over real mTLS gRPC against the real daemon in a namespace.

After every batch the oracle (`Arena.check`) holds: the daemon is up and Health answers,
the store and the kernel hold exactly what the legitimate grants imply, and real probes
from never-granted sources fail. Every refusal carries a specific status (never UNKNOWN
or INTERNAL, never a hang) and, for portagent's own refusals, a REASON: prefix.

`make test` runs the fast subset; tests/soak runs the same generators with >10,000
requests (PORTAGENT_HOSTILE_BATCHES sets the number of generated batches here).
"""

from __future__ import annotations

import base64
import os
import secrets
from collections import Counter

import pytest
from attacks import Forge, catalogue, run_generated
from hostile import (
    APPLY,
    BATCH,
    HEALTH,
    Arena,
    Case,
    record_result,
    reset_hwm,
    vm_hwm_kib,
    vm_rss_kib,
)

from portagent.broker.pki import init_dev_setup
from portagent.v1 import agent_pb2 as pb
from portagent.wire.ports import parse_port_spec

pytestmark = pytest.mark.root

BATCHES = int(os.environ.get("PORTAGENT_HOSTILE_BATCHES", "40"))
PER_BATCH = 30
CHECK_EACH = os.environ.get("PORTAGENT_HOSTILE_CHECK_EACH") == "1"


def assert_clean(arena: Arena, since: int = 0) -> None:
    """No broken promise recorded since violation number `since`."""
    violations = Counter(arena.ledger.violations[since:])
    assert not violations, (
        f"{sum(violations.values())} broken promises:\n"
        + "\n".join(f"{n:4d} x {text}" for text, n in violations.most_common(80))
        + "\n" + arena.ledger.summary()
    )


def test_every_named_attack_is_refused_specifically(arena: Arena) -> None:
    forge = Forge(arena)
    since = len(arena.ledger.violations)
    cases = catalogue(forge)
    for case in cases:
        arena.fire(case)
        arena.sweep(f"{case.category}/{case.name}")
    arena.check()
    record_result("catalogue", {"cases": len(cases),
                                "violations": arena.ledger.violations[since:]})
    assert_clean(arena, since)


def test_generated_hostile_requests_change_nothing(arena: Arena) -> None:
    """BATCHES x PER_BATCH generated requests; the oracle after every batch."""
    since = len(arena.ledger.violations)
    failures = run_generated(arena, BATCHES, PER_BATCH, check_each=CHECK_EACH)
    record_result("hostile_generated", {"fired": dict(arena.ledger.fired),
                                        "total": arena.ledger.total, "failures": failures})
    assert not failures, "\n".join(failures) + "\n" + arena.ledger.summary()
    assert_clean(arena, since)


def test_generated_run_totals(arena: Arena) -> None:
    """Reports the counts of the module's run (docs/reliability.md) and re-checks."""
    arena.check()
    record_result("hostile_grpc", {"fired": dict(arena.ledger.fired), "total": arena.ledger.total,
                                   "checks": arena.checks,
                                   "unintended_opens": arena.unintended_opens,
                                   "legit_grants": len(arena.legit)})
    print("\n" + arena.ledger.summary())
    assert arena.unintended_opens == 0


@pytest.mark.parametrize("size_mib", [5, 70])
def test_oversized_payload_is_refused_with_bounded_memory(arena: Arena, size_mib: int) -> None:
    since = len(arena.ledger.violations)
    pid = arena.lab.agent_pid()
    reset_hwm(pid)
    before = vm_hwm_kib(pid)
    blob = pb.ApplyGrantRequest(signed_grant=pb.SignedGrant(
        grant=secrets.token_bytes(size_mib << 20), signature=bytes(64),
        key_id=arena.signer.key_id)).SerializeToString()
    case = Case("oversized", f"{size_mib}MiB", APPLY, blob, timeout=30.0)
    reply = arena.fire(case)
    after = vm_hwm_kib(pid)
    record_result(f"oversized_{size_mib}MiB", {"code": reply["code"],
                                               "hwm_before_kib": before, "hwm_after_kib": after,
                                               "rss_after_kib": vm_rss_kib(pid)})
    arena.check()
    assert_clean(arena, since)
    # One hostile request may cost at most a few times its own size, and never more than
    # the agent's message limit allows: a 70 MiB request must be refused before it is read.
    assert after - before < 3 * (size_mib << 10) + 64 * 1024, (before, after)
    if size_mib >= 64:
        assert reply["code"] in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"), reply


def test_largest_batch_of_bad_signatures_is_refused_entry_by_entry(arena: Arena) -> None:
    size = int(os.environ.get("PORTAGENT_HOSTILE_BIG_BATCH", "2000"))
    forge = Forge(arena)
    raw = forge.legit_bytes()
    request = pb.BatchApplyGrantsRequest(signed_grants=[
        pb.SignedGrant(grant=raw, signature=bytes(64), key_id=arena.signer.key_id)] * size)
    pid = arena.lab.agent_pid()
    reset_hwm(pid)
    before = vm_hwm_kib(pid)
    reply = arena.worker.call(BATCH, request.SerializeToString(), timeout=120.0)
    after = vm_hwm_kib(pid)
    arena.ledger.note("big-batch", reply["code"])
    record_result("big_batch", {"entries": size, "bytes": request.ByteSize(),
                                "code": reply["code"], "hwm_before_kib": before,
                                "hwm_after_kib": after})
    assert reply["code"] in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"), reply
    if reply["code"] == "OK":
        response = pb.BatchApplyGrantsResponse.FromString(base64.b64decode(reply["response"]))
        assert len(response.results) == size
        assert all(r.error_code == "PERMISSION_DENIED" for r in response.results)
    arena.check()


def test_tls_misuse_is_refused_and_the_agent_keeps_serving(arena: Arena,
                                                         tmp_path_factory: pytest.TempPathFactory
                                                         ) -> None:
    other = tmp_path_factory.mktemp("other-ca")
    init_dev_setup(other, host_id="host-a", agent_address=f"{arena.lab.net.server_ip}:7443",
                   guarded=[parse_port_spec("8080/tcp")])
    lab_dir = arena.lab.dir
    health = b""
    attempts = [
        {"mode": "nocert"},
        {"mode": "othercert", "other_cert": str(other / "broker.pem"),
         "other_key": str(other / "broker.key")},
        # The agent's own server certificate is not a client certificate.
        {"mode": "othercert", "other_cert": str(lab_dir / "agent.pem"),
         "other_key": str(lab_dir / "agent.key")},
        {"mode": "plaintext"},
        {"mode": "garbage_tcp", "payload": "R0VUIC8gSFRUUC8xLjENCg0K"},  # GET / HTTP/1.1
        {"mode": "garbage_tcp", "payload": "FgMBAgAB" + "A" * 400},  # a bogus ClientHello
        {"mode": "garbage_tcp", "payload": ""},
    ]
    for attempt in attempts:
        attempt = {"op": "tls", "payload": attempt.get("payload", base64.b64encode(
            health).decode()), **attempt}
        reply = arena.worker.ask(attempt)
        arena.ledger.note("tls-" + attempt["mode"], reply["code"])
        # The handshake fails: the client never gets an answer from the service.
        assert reply["code"] in ("UNAVAILABLE", "CLOSED"), (attempt["mode"], reply)
        arena.check(probe=False)
    # Many half-done handshakes in parallel must not wedge the listener either.
    for _ in range(20):
        arena.worker.ask({"op": "tls", "mode": "garbage_tcp", "payload": "FgMB"})
    arena.check()


def test_stream_flood_does_not_starve_the_agent(arena: Arena) -> None:
    streams = int(os.environ.get("PORTAGENT_HOSTILE_STREAMS", "64"))
    forge = Forge(arena)
    refused = forge.signed_apply(forge.legit_bytes(), signature=bytes(64))
    reply = arena.worker.ask({"op": "flood", "streams": streams, "hold": 2.0,
                              "probe_payload": base64.b64encode(refused).decode()},
                             timeout=120.0)
    arena.ledger.fired["stream-flood"] += streams
    record_result("stream_flood", reply)
    # Every stream either stayed open or was refused for a reason; none broke.
    assert set(reply["streams"]) <= {"OPEN", "OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                                     "CANCELLED", "DEADLINE_EXCEEDED"}, reply
    assert reply["health"]["code"] == "OK", f"Health starved by {streams} streams: {reply}"
    assert reply["apply"]["code"] == "PERMISSION_DENIED", f"ApplyGrant starved: {reply}"
    arena.check()


def test_health_and_legit_apply_still_work(arena: Arena) -> None:
    """After all the abuse, the agent still does its job."""
    reply = arena.worker.call(HEALTH, b"")
    assert reply["code"] == "OK"
    legit = arena.apply_legit([f"198.51.{arena.lab.net.subnet}.99"])
    assert arena.worker.call(APPLY, legit.message)["code"] == "OK"  # idempotent re-send
    arena.check()
