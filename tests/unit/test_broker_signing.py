"""Signing: what the broker signs verifies with the agent's own Verifier, built from the
agent.toml that `init` wrote; bad input fails here, naming the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portagent.agent.settings import Settings, TrustedKey, load_settings_file
from portagent.agent.verify import Verifier
from portagent.broker import pki
from portagent.broker.signing import GrantRequest, InputError, Signer, grant_request
from portagent.v1 import agent_pb2 as pb
from portagent.wire.envelope import GRANT_ID_PATTERN
from portagent.wire.errors import GrantDenied
from portagent.wire.ports import PortRange, Protocol, parse_port_spec

NOW = 1_700_000_000.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    pki.init_dev_setup(
        tmp_path,
        host_id="web1",
        agent_address="192.0.2.5:50051",
        guarded=[parse_port_spec("22/tcp"), parse_port_spec("8000-8010/tcp")],
    )
    return load_settings_file(tmp_path / "agent.toml")


@pytest.fixture
def setup(tmp_path: Path, settings: Settings) -> tuple[Signer, Verifier]:
    """The broker's signer and the agent's verifier, both from what `init` wrote."""
    signer = Signer.from_file(tmp_path / "signing.key", settings.trusted_keys[0].key_id)
    return signer, Verifier(settings.host_id, settings.trusted_keys, settings.policy)


def _request(**overrides: object) -> GrantRequest:
    args: dict[str, object] = {
        "host_id": "web1",
        "subject": "alice",
        "sources": ["192.0.2.10", "2001:db8::/64"],
        "port": "8000-8010",
        "ttl": "15m",
        "reason": "CHG-1",
    }
    return grant_request(**{**args, **overrides})  # type: ignore[arg-type]


def test_grant_verifies_with_the_agents_verifier(setup: tuple[Signer, Verifier]) -> None:
    signer, verifier = setup
    signed = signer.sign_grant(_request(), now=NOW)
    grant = verifier.verify_grant(signed.grant, signed.signature, signed.key_id, NOW + 1)
    assert GRANT_ID_PATTERN.fullmatch(grant.grant_id) and grant.grant_id.startswith("g-")
    assert grant.host_id == "web1" and grant.subject == "alice" and grant.reason == "CHG-1"
    assert [str(s) for s in grant.sources] == ["192.0.2.10/32", "2001:db8::/64"]
    assert (grant.protocol, grant.ports) == (Protocol.TCP, PortRange(8000, 8010))
    assert (grant.not_before, grant.issue_time, grant.expire_time) == (NOW, NOW, NOW + 900)
    assert grant.key_id == signed.key_id == signer.key_id
    assert len(pb.Grant.FromString(signed.grant).nonce) == 16


def test_every_grant_is_unique(setup: tuple[Signer, Verifier]) -> None:
    signer, _ = setup
    a = pb.Grant.FromString(signer.sign_grant(_request(), now=NOW).grant)
    b = pb.Grant.FromString(signer.sign_grant(_request(), now=NOW).grant)
    assert a.grant_id != b.grant_id and a.nonce != b.nonce


def test_signature_covers_the_bytes(setup: tuple[Signer, Verifier]) -> None:
    signer, verifier = setup
    signed = signer.sign_grant(_request(), now=NOW)
    tampered = signed.grant.replace(b"alice", b"mallo")
    with pytest.raises(GrantDenied) as caught:
        verifier.verify_grant(tampered, signed.signature, signed.key_id, NOW)
    assert caught.value.reason == "BAD_SIGNATURE"


def test_revocation_verifies(setup: tuple[Signer, Verifier]) -> None:
    signer, verifier = setup
    signed = signer.sign_revocation(
        grant_id="g-0123456789abcdef", host_id="web1", now=NOW, reason="done"
    )
    revocation = verifier.verify_revocation(signed.revocation, signed.signature, signed.key_id, NOW)
    assert (revocation.grant_id, revocation.host_id, revocation.reason) == (
        "g-0123456789abcdef",
        "web1",
        "done",
    )
    assert revocation.issue_time == NOW
    assert len(pb.Revocation.FromString(signed.revocation).nonce) == 16


def test_rotation_agent_trusting_two_keys_accepts_both(
    setup: tuple[Signer, Verifier], settings: Settings
) -> None:
    old, verifier = setup
    new = Signer(Ed25519PrivateKey.generate())
    trusted = [*settings.trusted_keys, TrustedKey(new.key_id, pki.raw_public_key(new.public_key))]
    both = Verifier("web1", trusted, settings.policy)
    for signer in (old, new):
        signed = signer.sign_grant(_request(), now=NOW)
        assert (
            both.verify_grant(signed.grant, signed.signature, signed.key_id, NOW).key_id
            == signer.key_id
        )
    signed = new.sign_grant(_request(), now=NOW)
    with pytest.raises(GrantDenied) as caught:  # the original agent does not know it yet
        verifier.verify_grant(signed.grant, signed.signature, signed.key_id, NOW)
    assert caught.value.reason == "UNKNOWN_KEY"


def test_explicit_ttl_in_seconds_and_udp() -> None:
    request = _request(ttl=90.0, port="53", protocol="udp")
    assert request.ttl == 90.0
    assert str(request.port) == "53/udp"


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"sources": ["example.com"]}, "source", "'example.com' is not an IP address or network"),
        ({"sources": ["10.0.0.300"]}, "source", "not an IP address"),
        ({"sources": ["10.0.0.1/8"]}, "source", "host bits set (did you mean 10.0.0.0/8?)"),
        ({"sources": ["fe80::1%eth0"]}, "source", "zone index"),
        ({"sources": []}, "source", "at least one"),
        ({"sources": [f"10.0.{i // 256}.{i % 256}" for i in range(65)]}, "source", "at most 64"),
        ({"port": "0"}, "port", "invalid port range"),
        ({"port": "70000"}, "port", "invalid port range"),
        ({"port": "10-5"}, "port", "invalid port range"),
        ({"port": "ssh"}, "port", "not a port"),
        ({"port": "22/icmp"}, "port", "unknown protocol"),
        ({"port": "53/udp", "protocol": "tcp"}, "protocol", "contradicts"),
        ({"port": "53", "protocol": "sctp"}, "port", "unknown protocol"),
        ({"ttl": "0s"}, "ttl", "longer than 0s"),
        ({"ttl": "soon"}, "ttl", "not a duration"),
        ({"ttl": ""}, "ttl", "empty duration"),
        ({"ttl": 0.0}, "ttl", "longer than 0s"),
        ({"ttl": float("nan")}, "ttl", "longer than 0s"),
        ({"subject": "  "}, "subject", "required"),
        ({"subject": "x" * 257}, "subject", "at most 256"),
        ({"reason": "line\nbreak"}, "reason", "printable"),
        ({"host_id": ""}, "host", "required"),
    ],
)
def test_bad_input_names_the_field(overrides: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        _request(**overrides)
    assert caught.value.field == field
    assert message in caught.value.message


def test_revocation_grant_id_is_checked(setup: tuple[Signer, Verifier]) -> None:
    signer, _ = setup
    with pytest.raises(InputError) as caught:
        signer.sign_revocation(grant_id="../etc", host_id="web1", now=NOW)
    assert caught.value.field == "grant_id"


def test_sources_are_deduplicated_in_order() -> None:
    request = _request(sources=["192.0.2.10", "2001:db8::/64", "192.0.2.10/32"])
    assert [str(s) for s in request.sources] == ["192.0.2.10/32", "2001:db8::/64"]


def test_signer_refuses_other_keys() -> None:
    ec_pem = pki.private_key_pem(pki.new_tls_key())
    with pytest.raises(ValueError, match="expected an Ed25519 key"):
        Signer.from_pem(ec_pem)
    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        Signer.from_pem(encrypted)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        Signer.from_pem(b"garbage")
    assert isinstance(pki.new_tls_key(), ec.EllipticCurvePrivateKey)


def test_request_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        _request().ttl = 1.0  # type: ignore[misc]
