"""Every refusal path of grant verification, with the reason a caller sees."""

from __future__ import annotations

import pytest

from portagent.agent.settings import Policy
from portagent.agent.verify import Verifier, is_guarded
from portagent.testing.grants import TestSigner
from portagent.v1 import agent_pb2 as pb
from portagent.wire.errors import (
    GrantDenied,
    GrantNotInWindow,
    InvalidGrant,
    PortagentError,
    Status,
)
from portagent.wire.ports import PortRange, Protocol, parse_port_spec

NOW = 1_800_000_000.0
POLICY = Policy(
    guarded=(
        parse_port_spec("5432/tcp"),
        parse_port_spec("53/udp"),
        parse_port_spec("8000-8010/tcp"),
    ),
    max_ttl=3600.0,
    clock_skew=30.0,
)


@pytest.fixture
def signer() -> TestSigner:
    return TestSigner()


@pytest.fixture
def verifier(signer: TestSigner) -> Verifier:
    return Verifier("host-a", [signer.trusted], POLICY)


def test_valid_grant_is_returned_with_parsed_fields(signer: TestSigner, verifier: Verifier) -> None:
    signed = signer.grant(
        NOW,
        source_prefixes=["10.1.2.0/24", "2001:db8::/64"],
        port_start=8000,
        port_end=8003,
        reason="INC-42",
    )
    grant = verifier.verify_grant(signed.payload, signed.signature, signed.key_id, NOW)
    assert grant.protocol is Protocol.TCP
    assert grant.ports == PortRange(8000, 8003)
    assert [str(s) for s in grant.sources] == ["10.1.2.0/24", "2001:db8::/64"]
    assert grant.expire_time == pytest.approx(NOW + 60)
    assert grant.reason == "INC-42"


def _refusal(verifier: Verifier, signed: object) -> PortagentError:
    with pytest.raises(PortagentError) as info:
        verifier.verify_grant(signed.payload, signed.signature, signed.key_id, NOW)  # type: ignore[attr-defined]
    return info.value


@pytest.mark.parametrize(
    ("fields", "error", "reason"),
    [
        ({"host_id": "host-b"}, GrantDenied, "WRONG_HOST"),
        ({"ttl": 0.0}, InvalidGrant, "INVALID_VALIDITY"),
        ({"ttl": -10.0}, InvalidGrant, "INVALID_VALIDITY"),
        ({"ttl": 7200.0}, GrantDenied, "TTL_EXCEEDS_LIMIT"),
        ({"port_start": 22}, GrantDenied, "PORT_NOT_GUARDED"),
        ({"port_start": 8005, "port_end": 8011}, GrantDenied, "PORT_NOT_GUARDED"),
        ({"protocol": pb.PROTOCOL_UDP}, GrantDenied, "PORT_NOT_GUARDED"),
        ({"protocol": pb.PROTOCOL_UNSPECIFIED}, InvalidGrant, "INVALID_PROTOCOL"),
        ({"port_start": 0}, InvalidGrant, "INVALID_PORT"),
        ({"port_start": 70000}, InvalidGrant, "INVALID_PORT"),
        ({"port_start": 8010, "port_end": 8000}, InvalidGrant, "INVALID_PORT"),
        ({"source_prefixes": ["10.0.0.0/8"]}, GrantDenied, "SOURCE_TOO_BROAD"),
        ({"source_prefixes": ["2001:db8::/32"]}, GrantDenied, "SOURCE_TOO_BROAD"),
        ({"source_prefixes": ["0.0.0.0/0"]}, GrantDenied, "SOURCE_TOO_BROAD"),
        ({"source_prefixes": ["10.0.0.300"]}, InvalidGrant, "INVALID_SOURCE"),
        ({"source_prefixes": ["db.example.com"]}, InvalidGrant, "INVALID_SOURCE"),
        ({"source_prefixes": ["10.1.2.3/24"]}, InvalidGrant, "INVALID_SOURCE"),  # host bits set
        ({"source_prefixes": ["10.1.2.3; flush ruleset"]}, InvalidGrant, "INVALID_SOURCE"),
        ({"source_prefixes": []}, InvalidGrant, "INVALID_SOURCE"),
        ({"source_prefixes": ["fe80::1%eth0"]}, InvalidGrant, "INVALID_SOURCE"),
        ({"grant_id": "bad id with spaces"}, InvalidGrant, "INVALID_GRANT_ID"),
        ({"grant_id": ""}, InvalidGrant, "INVALID_GRANT_ID"),
        ({"subject": ""}, InvalidGrant, "INVALID_SUBJECT"),
        ({"subject": "alice\n"}, InvalidGrant, "INVALID_SUBJECT"),
        ({"key_id": "other"}, InvalidGrant, "KEY_ID_MISMATCH"),
    ],
)
def test_refusals(
    signer: TestSigner,
    verifier: Verifier,
    fields: dict[str, object],
    error: type[PortagentError],
    reason: str,
) -> None:
    refusal = _refusal(verifier, signer.grant(NOW, **fields))
    assert isinstance(refusal, error)
    assert refusal.reason == reason
    assert refusal.message  # every refusal says what is wrong


def test_expired_and_not_yet_valid(signer: TestSigner, verifier: Verifier) -> None:
    expired = _refusal(verifier, signer.grant(NOW - 120, ttl=60))
    assert isinstance(expired, GrantNotInWindow) and expired.reason == "GRANT_EXPIRED"
    early = _refusal(verifier, signer.grant(NOW + 600, ttl=60))
    assert isinstance(early, GrantNotInWindow) and early.reason == "GRANT_NOT_YET_VALID"
    assert early.status is Status.FAILED_PRECONDITION


def test_clock_skew_tolerates_a_broker_slightly_ahead(
    signer: TestSigner, verifier: Verifier
) -> None:
    signed = signer.grant(NOW + 20, ttl=60)
    assert verifier.verify_grant(signed.payload, signed.signature, signed.key_id, NOW)


def test_bad_signature(signer: TestSigner, verifier: Verifier) -> None:
    signed = signer.grant(NOW)
    tampered = signed.payload.replace(b"alice", b"mallo")
    with pytest.raises(GrantDenied) as info:
        verifier.verify_grant(tampered, signed.signature, signed.key_id, NOW)
    assert info.value.reason == "BAD_SIGNATURE"


def test_unknown_key_and_foreign_signer(verifier: Verifier) -> None:
    stranger = TestSigner(key_id="stranger")
    refusal = _refusal(verifier, stranger.grant(NOW, key_id="stranger"))
    assert refusal.reason == "UNKNOWN_KEY"
    # Same key id as a trusted key, different private key: the signature fails.
    impostor = TestSigner(key_id="test-key")
    assert _refusal(verifier, impostor.grant(NOW)).reason == "BAD_SIGNATURE"


def test_garbage_bytes_signed_by_trusted_key_are_malformed(
    signer: TestSigner, verifier: Verifier
) -> None:
    signed = signer.sign(b"\xff\xff\xff\xff")
    assert _refusal(verifier, signed).reason == "MALFORMED_GRANT"


def test_rotation_two_trusted_keys(signer: TestSigner) -> None:
    new = TestSigner(key_id="new-key")
    verifier = Verifier("host-a", [signer.trusted, new.trusted], POLICY)
    for key in (signer, new):
        signed = key.grant(NOW, key_id=key.key_id)
        assert verifier.verify_grant(signed.payload, signed.signature, signed.key_id, NOW)


def test_any_source_only_when_allowed(signer: TestSigner) -> None:
    policy = Policy(guarded=POLICY.guarded, allow_any_source=True)
    verifier = Verifier("host-a", [signer.trusted], policy)
    signed = signer.grant(NOW, source_prefixes=["0.0.0.0/0"])
    assert verifier.verify_grant(signed.payload, signed.signature, signed.key_id, NOW)


def test_revocation_checks(signer: TestSigner, verifier: Verifier) -> None:
    ok = signer.revocation(NOW, "g-1")
    assert verifier.verify_revocation(ok.payload, ok.signature, ok.key_id, NOW).grant_id == "g-1"
    other = signer.revocation(NOW, "g-1", host_id="host-b")
    with pytest.raises(GrantDenied):
        verifier.verify_revocation(other.payload, other.signature, other.key_id, NOW)
    future = signer.revocation(NOW + 600, "g-1")
    with pytest.raises(GrantNotInWindow):
        verifier.verify_revocation(future.payload, future.signature, future.key_id, NOW)


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ((8000, 8010), True),
        ((8002, 8002), True),
        ((7999, 8000), False),
        ((8010, 8011), False),
    ],
)
def test_is_guarded_requires_every_port(ports: tuple[int, int], expected: bool) -> None:
    assert is_guarded(POLICY.guarded, Protocol.TCP, PortRange(*ports)) is expected


def test_is_guarded_joins_adjacent_ranges() -> None:
    guarded = (parse_port_spec("100-199/tcp"), parse_port_spec("200-299/tcp"))
    assert is_guarded(guarded, Protocol.TCP, PortRange(150, 250))
