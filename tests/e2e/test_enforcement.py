"""The daemon in a network namespace, real traffic from another: the access-control
promises of the enforcement core, end to end."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portagent.testing.grants import TestSigner
from portagent.testing.lab import Lab
from portagent.testing.netns import wait_until
from portagent.v1 import agent_pb2 as pb

pytestmark = pytest.mark.root

TCP, UDP, RANGE = 8080, 5353, 9000


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(
        tmp_path,
        ["8080/tcp", "5353/udp", "9000-9003/tcp"],
        tcp_ports=[TCP, RANGE, RANGE + 3, 9100],
        udp_ports=[UDP],
    ) as lab:
        yield lab


def test_refused_before_open_during_refused_after_expiry(lab: Lab) -> None:
    assert not lab.can_connect(TCP)
    grant_id = lab.grant(port=f"{TCP}/tcp", ttl="3s")
    assert grant_id.startswith("g-")
    assert lab.can_connect(TCP)
    listed = lab.list_json()
    assert [(g["grant_id"], g["state"], g["subject"]) for g in listed] == [
        (grant_id, "active", "alice")
    ]
    table = lab.cli("list").stdout
    assert grant_id in table and "alice" in table and f"{TCP}/tcp" in table
    # Every kernel element's time left is within the grant's.
    assert all(0 < left <= 3 for _, left in lab.element_timeouts())
    assert wait_until(lambda: not lab.can_connect(TCP, timeout=0.3), timeout=6)
    # The expired grant is garbage-collected from the daemon's state and logged.
    assert wait_until(lambda: lab.list_json() == [], timeout=3)
    assert "ACTION=expire" in lab.log()
    # The agent's own commits are never mistaken for tampering.
    assert "ACTION=tamper" not in lab.log()


def test_unguarded_port_is_untouched(lab: Lab) -> None:
    assert lab.can_connect(9100)


def test_revoke_closes_at_once_and_never_reopens(lab: Lab) -> None:
    grant_id = lab.grant(port=f"{TCP}/tcp", ttl="60s")
    assert lab.can_connect(TCP)
    lab.revoke(grant_id)
    assert not lab.can_connect(TCP)
    assert lab.kernel_elements() == []
    assert "ACTION=revoke" in lab.log()


def test_ipv6_and_udp_and_port_range(lab: Lab) -> None:
    assert not lab.can_connect(TCP, v6=True)
    lab.grant(source=lab.net.client_ip6, port=f"{TCP}/tcp")
    assert lab.can_connect(TCP, v6=True)
    assert not lab.can_connect(TCP)  # the v4 address was not granted

    assert not lab.can_connect(UDP, protocol="udp")
    lab.grant(port=f"{UDP}/udp")
    assert lab.can_connect(UDP, protocol="udp")

    assert not lab.can_connect(RANGE + 3)
    lab.grant(port=f"{RANGE}-{RANGE + 3}/tcp")
    assert lab.can_connect(RANGE) and lab.can_connect(RANGE + 3)


def test_overlapping_grants_revoking_either_leaves_the_other(lab: Lab) -> None:
    network = ".".join(lab.net.client_ip.split(".")[:3]) + ".0/24"
    wide = lab.grant(source=network, port=f"{TCP}/tcp")
    narrow = lab.grant(source=lab.net.client_ip, port=f"{TCP}/tcp")
    lab.revoke(narrow)
    assert lab.can_connect(TCP)
    narrow2 = lab.grant(source=lab.net.client_ip, port=f"{TCP}/tcp")
    lab.revoke(wide)
    assert lab.can_connect(TCP)
    lab.revoke(narrow2)
    assert not lab.can_connect(TCP)


def test_sigkill_leaves_expiry_to_the_kernel(lab: Lab) -> None:
    lab.grant(port=f"{TCP}/tcp", ttl="3s")
    lab.stop_agent(signal.SIGKILL)
    assert lab.can_connect(TCP)
    assert wait_until(lambda: not lab.can_connect(TCP, timeout=0.3), timeout=6)


def test_sigterm_leaves_grants_and_restart_adopts_them_without_a_gap(lab: Lab) -> None:
    lab.grant(port=f"{UDP}/udp", ttl="60s")
    before = lab.kernel_elements()
    # A granted flow keeps flowing while the daemon stops and starts again.
    probe = lab.net.popen(
        lab.net.client,
        [
            sys.executable,
            "-m",
            "portagent.testing.probe",
            "udp-stream",
            lab.net.server_ip,
            str(UDP),
            "--count",
            "300",
            "--interval",
            "0.01",
        ],
        stdout=subprocess.PIPE,
    )
    time.sleep(0.3)
    lab.stop_agent(signal.SIGTERM)
    assert lab.kernel_elements() == before  # stopping never flushes
    lab.start_agent()
    out, _ = probe.communicate(timeout=15)
    assert int(out) == 300
    assert lab.kernel_elements() == before
    assert "1 active grants adopted" in lab.log()


def test_external_flush_is_repaired_within_a_second(lab: Lab) -> None:
    lab.grant(port=f"{TCP}/tcp")
    before = lab.kernel_elements()
    lab.net.exec_server(["nft", "flush", "ruleset"])
    assert wait_until(
        lambda: "portagent" in lab.nft("list", "tables") and lab.kernel_elements() == before,
        timeout=1.5,
    )
    assert lab.can_connect(TCP)
    lab.net.exec_server(["nft", "delete", "table", "inet", "portagent"])
    assert wait_until(lambda: lab.kernel_elements() == before, timeout=1.5)
    assert "ACTION=tamper" in lab.log()


def _signer_for(lab: Lab) -> TestSigner:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key((lab.dir / "signing.key").read_bytes(), None)
    return TestSigner(key_id=lab.key_id, private_key=key)  # type: ignore[arg-type]


def _refusal_cases(lab: Lab, signer: TestSigner, now: float) -> list[tuple[str, bytes, str]]:
    stranger = TestSigner(key_id="stranger")

    def grant(**fields: object) -> bytes:
        fields.setdefault("source_prefixes", [lab.net.client_ip])
        fields.setdefault("port_start", TCP)
        return signer.signed_grant_pb(now, **fields).SerializeToString()

    good = signer.signed_grant_pb(now, source_prefixes=[lab.net.client_ip], port_start=TCP)
    bad_sig = pb.SignedGrant(grant=good.grant, signature=bytes(64), key_id=good.key_id)
    return [
        ("bad signature", bad_sig.SerializeToString(), "PERMISSION_DENIED BAD_SIGNATURE"),
        (
            "unknown key",
            stranger.signed_grant_pb(
                now, key_id="stranger", source_prefixes=[lab.net.client_ip], port_start=TCP
            ).SerializeToString(),
            "PERMISSION_DENIED UNKNOWN_KEY",
        ),
        ("other host", grant(host_id="host-b"), "PERMISSION_DENIED WRONG_HOST"),
        (
            "expired",
            signer.signed_grant_pb(
                now - 600, ttl=60, source_prefixes=[lab.net.client_ip], port_start=TCP
            ).SerializeToString(),
            "FAILED_PRECONDITION GRANT_EXPIRED",
        ),
        (
            "not yet valid",
            signer.signed_grant_pb(
                now + 3600, source_prefixes=[lab.net.client_ip], port_start=TCP
            ).SerializeToString(),
            "FAILED_PRECONDITION GRANT_NOT_YET_VALID",
        ),
        ("zero ttl", grant(ttl=0.0), "INVALID_ARGUMENT INVALID_VALIDITY"),
        ("negative ttl", grant(ttl=-5.0), "INVALID_ARGUMENT INVALID_VALIDITY"),
        ("ttl over limit", grant(ttl=9 * 3600.0), "PERMISSION_DENIED TTL_EXCEEDS_LIMIT"),
        ("unguarded port", grant(port_start=22), "PERMISSION_DENIED PORT_NOT_GUARDED"),
        ("too broad", grant(source_prefixes=["10.0.0.0/8"]), "PERMISSION_DENIED SOURCE_TOO_BROAD"),
        (
            "malformed address",
            grant(source_prefixes=["10.0.0.300"]),
            "INVALID_ARGUMENT INVALID_SOURCE",
        ),
        ("hostname", grant(source_prefixes=["localhost"]), "INVALID_ARGUMENT INVALID_SOURCE"),
        (
            "garbage",
            pb.SignedGrant(
                grant=b"\x08\x96\x01garbage", signature=bytes(64), key_id=signer.key_id
            ).SerializeToString(),
            "PERMISSION_DENIED BAD_SIGNATURE",
        ),
    ]


def test_every_refusal_has_its_status_and_leaves_the_kernel_unchanged(lab: Lab) -> None:
    signer = _signer_for(lab)
    existing = lab.grant(source=lab.net.client_ip6, port=f"{TCP}/tcp")
    before = lab.kernel_elements()
    for name, message, expected in _refusal_cases(lab, signer, time.time()):
        outcome = lab.deliver_raw("grant", message)
        assert outcome.startswith(expected), f"{name}: {outcome}"
        assert lab.kernel_elements() == before, name
    assert not lab.can_connect(TCP)
    assert [g["grant_id"] for g in lab.list_json()] == [existing]
    assert lab.agent is not None and lab.agent.poll() is None  # still up
    assert lab.log().count("ACTION=refuse") >= 13


def test_replay_is_idempotent_and_replay_after_revoke_is_refused(lab: Lab) -> None:
    signer = _signer_for(lab)
    message = signer.signed_grant_pb(
        time.time(), source_prefixes=[lab.net.client_ip], port_start=TCP
    ).SerializeToString()
    assert lab.deliver_raw("grant", message) == "OK GRANT_STATE_ACTIVE"
    elements = lab.kernel_elements()
    assert lab.deliver_raw("grant", message) == "OK GRANT_STATE_ACTIVE"
    assert lab.kernel_elements() == elements
    grant_id = pb.Grant.FromString(pb.SignedGrant.FromString(message).grant).grant_id
    lab.revoke(grant_id)
    assert lab.deliver_raw("grant", message).startswith("FAILED_PRECONDITION GRANT_REVOKED")
    assert not lab.can_connect(TCP)


def test_broker_cli_shows_the_agents_reason(lab: Lab) -> None:
    result = lab.broker(
        "grant",
        "--host",
        "host-a",
        "--source",
        lab.net.client_ip,
        "--port",
        "22/tcp",
        "--ttl",
        "1m",
        "--subject",
        "alice",
        check=False,
    )
    assert result.returncode == 1
    assert "PORT_NOT_GUARDED" in result.stderr
