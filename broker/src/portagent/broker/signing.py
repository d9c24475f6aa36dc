"""Building and signing grants and revocations.

A grant is serialized once and the signature covers exactly those bytes, which
travel unchanged to the agent: the agent verifies what it received and never
re-serializes (DESIGN §1). Inputs are checked here with the same limits the
agent applies, so a typo fails on the operator's terminal with the field named,
not as a refusal from a remote host.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from portagent.broker.pki import key_id_for
from portagent.v1 import agent_pb2 as pb
from portagent.wire.codec import PROTOCOL_TO_PB
from portagent.wire.durations import parse_duration
from portagent.wire.envelope import (
    GRANT_ID_PATTERN,
    MAX_CONNECTIONS_LIMIT,
    MAX_REASON_LENGTH,
    MAX_SOURCES,
    MAX_SUBJECT_LENGTH,
)
from portagent.wire.ports import GuardedPort, IPNetwork, Protocol, parse_port_spec
from portagent.wire.sources import parse_network
from portagent.wire.timestamps import canonical_bytes, timestamp

NONCE_BYTES = 16


class InputError(ValueError):
    """An operator input is invalid; `field` names it (source, port, ttl, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GrantRequest:
    """A validated request for access, before it gets ids, times and a signature."""

    host_id: str
    subject: str
    sources: tuple[IPNetwork, ...]
    port: GuardedPort
    ttl: float
    reason: str = ""
    keep_established: bool = False
    max_connections: int = 0


def parse_sources(texts: Iterable[str]) -> tuple[IPNetwork, ...]:
    """IP addresses or CIDR networks, never hostnames; duplicates dropped, order kept.

    Each text goes through the parse the agent uses (`portagent.wire.sources.parse_network`),
    so a source the agent would refuse (multicast, IPv4-mapped, ...) fails here, on the
    operator's terminal. Surrounding blanks of command-line input are forgiven here
    only: what is signed is the network's canonical text.
    """
    networks: list[IPNetwork] = []
    for text in texts:
        try:
            network = parse_network(text.strip())
        except ValueError as exc:
            raise InputError("source", str(exc)) from None
        if network not in networks:
            networks.append(network)
    if not networks:
        raise InputError("source", "at least one source is required")
    if len(networks) > MAX_SOURCES:
        raise InputError("source", f"at most {MAX_SOURCES} sources per grant")
    return tuple(networks)


def parse_port(text: str, protocol: str | None = None) -> GuardedPort:
    """ "22", "8000-8010", "53/udp"; `protocol` is the --protocol flag, if given."""
    try:
        port = parse_port_spec(text if "/" in text or not protocol else f"{text}/{protocol}")
    except ValueError as exc:
        raise InputError("port", str(exc)) from None
    if protocol is not None:
        try:
            wanted = Protocol(protocol.strip().lower())
        except ValueError:
            raise InputError("protocol", f"{protocol!r} is not tcp or udp") from None
        if wanted != port.protocol:
            raise InputError("protocol", f"{protocol!r} contradicts --port {text!r}")
    return port


def parse_ttl(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise InputError("ttl", str(exc)) from None
    if seconds <= 0:
        raise InputError("ttl", f"{text!r} must be longer than 0s")
    return seconds


def _positive_ttl(seconds: float) -> float:
    if not seconds > 0:  # also catches NaN
        raise InputError("ttl", f"{seconds}s must be longer than 0s")
    return seconds


def _check_text(field: str, text: str, limit: int, required: bool) -> str:
    if required and not text.strip():
        raise InputError(field, "required and must not be blank")
    if len(text) > limit or not text.isprintable():
        raise InputError(field, f"must be printable and at most {limit} characters")
    return text


def check_grant_id(grant_id: str) -> str:
    if not GRANT_ID_PATTERN.fullmatch(grant_id):
        raise InputError("grant_id", f"{grant_id!r} is not 1-64 of [A-Za-z0-9._-]")
    return grant_id


def grant_request(
    *,
    host_id: str,
    subject: str,
    sources: Iterable[str],
    port: str,
    ttl: str | float,
    protocol: str | None = None,
    reason: str = "",
    keep_established: bool = False,
    max_connections: int = 0,
) -> GrantRequest:
    """Validate operator input into a GrantRequest; InputError names the bad field."""
    if not 0 <= max_connections <= MAX_CONNECTIONS_LIMIT:
        raise InputError(
            "max-connections", f"{max_connections} is not 0 (no limit) to {MAX_CONNECTIONS_LIMIT}"
        )
    return GrantRequest(
        host_id=_check_text("host", host_id, 253, required=True),
        subject=_check_text("subject", subject, MAX_SUBJECT_LENGTH, required=True),
        sources=parse_sources(sources),
        port=parse_port(port, protocol),
        ttl=parse_ttl(ttl) if isinstance(ttl, str) else _positive_ttl(ttl),
        reason=_check_text("reason", reason, MAX_REASON_LENGTH, required=False),
        keep_established=keep_established,
        max_connections=max_connections,
    )


def new_grant_id() -> str:
    return "g-" + secrets.token_hex(8)


class Signer:
    """Signs grants and revocations with one Ed25519 broker key."""

    def __init__(self, private_key: Ed25519PrivateKey, key_id: str | None = None) -> None:
        self._key = private_key
        self.key_id = key_id or key_id_for(private_key.public_key())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    @classmethod
    def from_pem(cls, data: bytes, key_id: str | None = None) -> Signer:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            # TypeError: the key is encrypted; ValueError: not a PEM private key.
            raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"expected an Ed25519 key, got {type(key).__name__}")
        return cls(key, key_id)

    @classmethod
    def from_file(cls, path: Path, key_id: str | None = None) -> Signer:
        return cls.from_pem(path.read_bytes(), key_id)

    def sign_grant(
        self, request: GrantRequest, *, now: float, grant_id: str | None = None
    ) -> pb.SignedGrant:
        last = request.port.ports.last
        grant = pb.Grant(
            grant_id=check_grant_id(grant_id) if grant_id else new_grant_id(),
            host_id=request.host_id,
            subject=request.subject,
            source_prefixes=[str(n) for n in request.sources],
            protocol=PROTOCOL_TO_PB[request.port.protocol],
            port_start=request.port.ports.first,
            port_end=last,
            not_before=timestamp(now),
            expire_time=timestamp(now + request.ttl),
            issue_time=timestamp(now),
            nonce=secrets.token_bytes(NONCE_BYTES),
            key_id=self.key_id,
            reason=request.reason,
            options=pb.GrantOptions(
                keep_established=request.keep_established, max_connections=request.max_connections
            ),
        )
        payload = canonical_bytes(grant)
        return pb.SignedGrant(grant=payload, signature=self._key.sign(payload), key_id=self.key_id)

    def sign_revocation(
        self, *, grant_id: str, host_id: str, now: float, reason: str = ""
    ) -> pb.SignedRevocation:
        revocation = pb.Revocation(
            grant_id=check_grant_id(grant_id),
            host_id=_check_text("host", host_id, 253, required=True),
            issue_time=timestamp(now),
            nonce=secrets.token_bytes(NONCE_BYTES),
            key_id=self.key_id,
            reason=_check_text("reason", reason, MAX_REASON_LENGTH, required=False),
        )
        payload = canonical_bytes(revocation)
        return pb.SignedRevocation(
            revocation=payload, signature=self._key.sign(payload), key_id=self.key_id
        )
