"""Build signed grants and revocations with any field set to anything, including
invalid values: the refusal tests need exactly what a real broker would never send."""

from __future__ import annotations

import base64
import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from portagent.agent.engine import SignedInput
from portagent.agent.model import Grant, GrantRecord, GrantState, Source
from portagent.agent.settings import TrustedKey
from portagent.v1 import agent_pb2 as pb
from portagent.wire.ports import PortRange, Protocol
from portagent.wire.timestamps import canonical_bytes, timestamp


@dataclass
class TestSigner:
    __test__ = False  # a helper, not a pytest test class

    key_id: str = "test-key"
    private_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def public_raw(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def trusted(self) -> TrustedKey:
        return TrustedKey(self.key_id, self.public_raw)

    def toml(self) -> str:
        encoded = base64.b64encode(self.public_raw).decode()
        return f'[[trusted_keys]]\nkey_id = "{self.key_id}"\npublic_key = "{encoded}"\n'

    def grant_message(self, now: float, **fields: Any) -> pb.Grant:
        ttl = fields.pop("ttl", 60.0)
        values: dict[str, Any] = {
            "grant_id": "g-" + secrets.token_hex(8),
            "host_id": "host-a",
            "subject": "alice",
            "source_prefixes": ["10.1.2.3/32"],
            "protocol": pb.PROTOCOL_TCP,
            "port_start": 5432,
            "not_before": timestamp(now),
            "expire_time": timestamp(now + ttl),
            "issue_time": timestamp(now),
            "nonce": secrets.token_bytes(16),
            "key_id": self.key_id,
        }
        values.update(fields)
        return pb.Grant(**values)

    def sign(self, payload: bytes, key_id: str | None = None) -> SignedInput:
        return SignedInput(payload, self.private_key.sign(payload), key_id or self.key_id)

    def grant(self, now: float, **fields: Any) -> SignedInput:
        return self.sign(canonical_bytes(self.grant_message(now, **fields)))

    def signed_grant_pb(self, now: float, **fields: Any) -> pb.SignedGrant:
        signed = self.grant(now, **fields)
        return pb.SignedGrant(
            grant=signed.payload, signature=signed.signature, key_id=signed.key_id
        )

    def revocation(self, now: float, grant_id: str, host_id: str = "host-a") -> SignedInput:
        message = pb.Revocation(
            grant_id=grant_id,
            host_id=host_id,
            issue_time=timestamp(now),
            nonce=secrets.token_bytes(16),
            key_id=self.key_id,
        )
        return self.sign(canonical_bytes(message))


def grant_record(
    handle: int,
    sources: list[str],
    ports: tuple[int, int] = (22, 22),
    *,
    ttl: float = 60.0,
    now: float = 1_800_000_000.0,
    state: GrantState = GrantState.ACTIVE,
    protocol: Protocol = Protocol.TCP,
) -> GrantRecord:
    """A verified grant as the engine keeps it, for planner and table tests."""
    grant = Grant(
        f"g{handle}",
        "h",
        "alice",
        tuple(Source.of(ipaddress.ip_network(s)) for s in sources),
        protocol,
        PortRange(*ports),
        now,
        now + ttl,
        now,
        "k",
        "",
    )
    return GrantRecord(grant, handle, b"", b"", state, now)
