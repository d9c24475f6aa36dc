"""Verification of signed grants and revocations: pure, no I/O.

Order matters: the signature is checked over the exact bytes received before
anything is parsed, so an attacker's bytes never reach the protobuf parser
unless a trusted key signed them, and nothing is re-serialized to verify.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from portagent.codec import PROTOCOL_FROM_PB, seconds_of
from portagent.errors import GrantDenied, GrantNotInWindow, InvalidGrant
from portagent.model import Grant, GuardedPort, IPNetwork, PortRange
from portagent.settings import Policy, TrustedKey
from portagent.v1 import agent_pb2 as pb

GRANT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_SOURCES = 64
MAX_SUBJECT_LENGTH = 256
MAX_REASON_LENGTH = 1024
MAX_CONNECTIONS_LIMIT = 65535
# Each (source, port) pair is one kernel element; keep a single grant bounded.
MAX_ELEMENTS_PER_GRANT = 4096


@dataclass(frozen=True)
class Revocation:
    grant_id: str
    host_id: str
    issue_time: float
    key_id: str
    reason: str


def parse_source(text: str, field: str = "source_prefixes") -> IPNetwork:
    """An IP address or CIDR network; never a hostname (libnftables would resolve it)."""
    if "%" in text:
        # ipaddress keeps an IPv6 zone id ("fe80::1%eth0") in the text form; nft would not
        # parse it as an address.
        raise InvalidGrant(f"{field}: {text!r}: zone ids are not allowed", reason="INVALID_SOURCE")
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise InvalidGrant(
            f"{field}: {text!r} is not an IP address or network: {exc}", reason="INVALID_SOURCE"
        ) from None


def is_guarded(guarded: Iterable[GuardedPort], protocol: object, ports: PortRange) -> bool:
    """True when every port of `ports` lies in some guarded range of that protocol."""
    ranges = sorted(g.ports for g in guarded if g.protocol == protocol)
    next_needed = ports.first
    for port_range in ranges:
        if port_range.first <= next_needed <= port_range.last:
            next_needed = port_range.last + 1
            if next_needed > ports.last:
                return True
    return False


class Verifier:
    """Checks signed grants and revocations against this host's trust and policy."""

    def __init__(self, host_id: str, keys: Iterable[TrustedKey], policy: Policy) -> None:
        self.host_id = host_id
        self.policy = policy
        self._keys = {k.key_id: Ed25519PublicKey.from_public_bytes(k.public_key) for k in keys}

    def _check_signature(self, payload: bytes, signature: bytes, key_id: str) -> None:
        public_key = self._keys.get(key_id)
        if public_key is None:
            raise GrantDenied(
                f"key_id: {key_id!r} is not a trusted broker key", reason="UNKNOWN_KEY"
            )
        try:
            public_key.verify(signature, payload)
        except InvalidSignature:
            raise GrantDenied(
                f"signature: does not verify with key {key_id!r}", reason="BAD_SIGNATURE"
            ) from None

    def _open(self, payload: bytes, signature: bytes, key_id: str, message: Any, what: str) -> Any:
        """Check the signature over the exact bytes, then parse them, then the fields a
        grant and a revocation share: the signing key, the grant id and the host."""
        self._check_signature(payload, signature, key_id)
        try:
            msg = message.FromString(payload)
        except DecodeError:
            raise InvalidGrant(
                f"{what}: bytes are not a portagent.v1.{message.__name__}",
                reason=f"MALFORMED_{what.upper()}",
            ) from None
        if msg.key_id != key_id:
            raise InvalidGrant(
                f"key_id: {what} names {msg.key_id!r} but was signed by {key_id!r}",
                reason="KEY_ID_MISMATCH",
            )
        if not GRANT_ID_PATTERN.fullmatch(msg.grant_id):
            raise InvalidGrant(
                f"grant_id: {msg.grant_id!r} is not 1-64 of [A-Za-z0-9._-]",
                reason="INVALID_GRANT_ID",
            )
        if msg.host_id != self.host_id:
            raise GrantDenied(
                f"host_id: {what} is for {msg.host_id!r}, this is {self.host_id!r}",
                reason="WRONG_HOST",
            )
        return msg

    def verify_grant(self, grant_bytes: bytes, signature: bytes, key_id: str, now: float) -> Grant:
        msg = self._open(grant_bytes, signature, key_id, pb.Grant, "grant")
        if (
            not msg.subject
            or len(msg.subject) > MAX_SUBJECT_LENGTH
            or not msg.subject.isprintable()
        ):
            raise InvalidGrant(
                "subject: required, printable, at most 256 characters", reason="INVALID_SUBJECT"
            )
        if len(msg.reason) > MAX_REASON_LENGTH or not msg.reason.isprintable():
            raise InvalidGrant(
                "reason: printable, at most 1024 characters", reason="INVALID_REASON"
            )
        sources = self._sources(msg.source_prefixes)
        protocol = PROTOCOL_FROM_PB.get(msg.protocol)
        if protocol is None:
            raise InvalidGrant(
                "protocol: must be PROTOCOL_TCP or PROTOCOL_UDP", reason="INVALID_PROTOCOL"
            )
        last = msg.port_end or msg.port_start
        try:
            ports = PortRange(msg.port_start, last)
        except ValueError:
            raise InvalidGrant(
                f"port_start/port_end: {msg.port_start}-{last} is not a port range within 1-65535",
                reason="INVALID_PORT",
            ) from None
        if len(sources) * len(ports.ports()) > MAX_ELEMENTS_PER_GRANT:
            raise GrantDenied(
                f"grant: {len(sources)} sources x {len(ports.ports())} ports exceeds "
                f"{MAX_ELEMENTS_PER_GRANT} kernel elements",
                reason="GRANT_TOO_LARGE",
            )
        if not is_guarded(self.policy.guarded, protocol, ports):
            raise GrantDenied(
                f"port: {ports}/{protocol.value} is not guarded on this host",
                reason="PORT_NOT_GUARDED",
            )
        grant = Grant(
            grant_id=msg.grant_id,
            host_id=msg.host_id,
            subject=msg.subject,
            sources=sources,
            protocol=protocol,
            ports=ports,
            not_before=seconds_of(msg.not_before) if msg.HasField("not_before") else 0.0,
            expire_time=seconds_of(msg.expire_time) if msg.HasField("expire_time") else 0.0,
            issue_time=seconds_of(msg.issue_time) if msg.HasField("issue_time") else 0.0,
            key_id=msg.key_id,
            reason=msg.reason,
            keep_established=msg.options.keep_established,
            max_connections=msg.options.max_connections,
        )
        if grant.max_connections > MAX_CONNECTIONS_LIMIT:
            raise InvalidGrant(
                f"options.max_connections: {grant.max_connections} exceeds "
                f"{MAX_CONNECTIONS_LIMIT} (0 means no limit)",
                reason="INVALID_OPTIONS",
            )
        self._check_window(grant, now)
        return grant

    def _sources(self, texts: Iterable[str]) -> tuple[IPNetwork, ...]:
        texts = list(texts)
        if not texts:
            raise InvalidGrant(
                "source_prefixes: at least one source is required", reason="INVALID_SOURCE"
            )
        if len(texts) > MAX_SOURCES:
            raise InvalidGrant(
                f"source_prefixes: at most {MAX_SOURCES} sources", reason="INVALID_SOURCE"
            )
        networks = []
        for text in texts:
            network = parse_source(text)
            minimum = (
                self.policy.min_prefix_v4 if network.version == 4 else self.policy.min_prefix_v6
            )
            if network.prefixlen == 0 and not self.policy.allow_any_source:
                raise GrantDenied(
                    f"source_prefixes: {network} allows every address; "
                    "policy.allow_any_source is off",
                    reason="SOURCE_TOO_BROAD",
                )
            if network.prefixlen < minimum and network.prefixlen != 0:
                raise GrantDenied(
                    f"source_prefixes: {network} is broader than /{minimum}",
                    reason="SOURCE_TOO_BROAD",
                )
            networks.append(network)
        return tuple(sorted(set(networks), key=lambda n: (n.version, str(n))))

    def _check_window(self, grant: Grant, now: float) -> None:
        if grant.expire_time <= 0:
            raise InvalidGrant("expire_time: required", reason="INVALID_VALIDITY")
        start = grant.not_before or grant.issue_time or now
        if grant.expire_time <= start:
            raise InvalidGrant(
                "expire_time: must be after not_before (TTL must be positive)",
                reason="INVALID_VALIDITY",
            )
        skew = self.policy.clock_skew
        # Both the lifetime the broker issued and what is left of it from now count.
        lifetime = max(grant.expire_time - start, grant.expire_time - now)
        if lifetime > self.policy.max_ttl + skew:
            raise GrantDenied(
                f"expire_time: lifetime {lifetime:.0f}s exceeds policy.max_ttl "
                f"{self.policy.max_ttl:.0f}s",
                reason="TTL_EXCEEDS_LIMIT",
            )
        if grant.not_before > now + skew:
            raise GrantNotInWindow(
                f"not_before: grant is valid only from {grant.not_before:.0f}",
                reason="GRANT_NOT_YET_VALID",
            )
        if grant.expire_time <= now:
            raise GrantNotInWindow(
                f"expire_time: grant expired {now - grant.expire_time:.0f}s ago",
                reason="GRANT_EXPIRED",
            )

    def verify_revocation(
        self, payload: bytes, signature: bytes, key_id: str, now: float
    ) -> Revocation:
        msg = self._open(payload, signature, key_id, pb.Revocation, "revocation")
        issued = seconds_of(msg.issue_time)
        if issued > now + self.policy.clock_skew:
            raise GrantNotInWindow(
                "issue_time: revocation is issued in the future", reason="REVOCATION_NOT_YET_VALID"
            )
        return Revocation(msg.grant_id, msg.host_id, issued, msg.key_id, msg.reason)
