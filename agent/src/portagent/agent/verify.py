"""Verification of signed grants and revocations: pure, no I/O.

Order matters: the size and the signature are checked over the exact bytes received
before anything is parsed, so an attacker's bytes never reach the protobuf parser
unless a trusted key signed them. Then the bytes are parsed once and must be the
*canonical* encoding of what was parsed (docs/adr/0005-canonical-grants.md): one
meaning has one byte string, so an overlong varint, a duplicated field, an unknown
field or an explicit default is refused instead of being read differently by
different parsers. Every field is range-checked after the parse.

`verify_stored_grant` (store reload) and `verify_grant` (the wire) share that one
path; `verify_grant` adds only the validity window and this agent's policy. The
envelope rules the broker applies too (limits, signature check, canonical decoding,
source parsing) live in portagent.wire.envelope and portagent.wire.sources.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.timestamp_pb2 import Timestamp

from portagent.agent.model import Grant, Source
from portagent.agent.settings import Policy, TrustedKey
from portagent.v1 import agent_pb2 as pb
from portagent.v1 import fleet_pb2
from portagent.wire.codec import PROTOCOL_FROM_PB
from portagent.wire.envelope import (
    GRANT_ID_PATTERN,
    MAX_CONNECTIONS_LIMIT,
    MAX_GRANT_BYTES,
    MAX_NONCE_BYTES,
    MAX_REASON_LENGTH,
    MAX_REVOCATION_BYTES,
    MAX_SOURCES,
    MAX_SUBJECT_LENGTH,
    check_signature,
    clip,
    decode_canonical,
)
from portagent.wire.errors import GrantDenied, GrantNotInWindow, InvalidGrant, PortagentError
from portagent.wire.hoststate import open_host_state
from portagent.wire.ports import GuardedPort, PortRange, Protocol
from portagent.wire.sources import parse_network_int
from portagent.wire.timestamps import seconds_of_parts

# Each (source, port) pair is one kernel element; keep a single grant bounded.
MAX_ELEMENTS_PER_GRANT = 4096
# Timestamps: protobuf's valid range (up to 9999-12-31T23:59:59Z), starting at the
# epoch because the model keeps POSIX seconds with 0 meaning "unset".
MAX_TIMESTAMP_SECONDS = 253_402_300_799
MAX_NANOS = 999_999_999


@dataclass(frozen=True)
class Revocation:
    grant_id: str
    host_id: str
    issue_time: float
    key_id: str
    reason: str


def parse_source(text: str, field: str = "source_prefixes") -> Source:
    """An IP address or CIDR network that can be a client; never a hostname
    (libnftables would resolve it). InvalidGrant(INVALID_SOURCE) names `field`."""
    try:
        return Source(*parse_network_int(text))
    except ValueError as exc:
        raise InvalidGrant(f"{field}: {exc}", reason="INVALID_SOURCE") from None


def is_guarded(guarded: Iterable[GuardedPort], protocol: object, ports: PortRange) -> bool:
    """True when every port of `ports` lies in some guarded range of that protocol."""
    for g in guarded:  # the common case: one guarded range holds them all
        if g.protocol is protocol and g.ports.first <= ports.first and ports.last <= g.ports.last:
            return True
    ranges = sorted(g.ports for g in guarded if g.protocol == protocol)
    next_needed = ports.first
    for port_range in ranges:
        if port_range.first <= next_needed <= port_range.last:
            next_needed = port_range.last + 1
            if next_needed > ports.last:
                return True
    return False


def _check_text(field: str, text: str, limit: int, reason: str, *, required: bool = False) -> None:
    if (required and not text) or len(text) > limit or not text.isprintable():
        need = "required, printable" if required else "printable"
        raise InvalidGrant(
            f"{field}: {clip(text)} must be {need}, at most {limit} characters", reason=reason
        )


def _time(msg: Any, field: str, reason: str) -> float:
    """Seconds of an optional Timestamp field (0.0 when absent: an absent Timestamp reads
    as 0 s 0 ns), range-checked."""
    ts: Timestamp = getattr(msg, field)
    # Each attribute read of a protobuf message builds a Python object: read each once.
    seconds, nanos = ts.seconds, ts.nanos
    if not 0 <= seconds <= MAX_TIMESTAMP_SECONDS or not 0 <= nanos <= MAX_NANOS:
        raise InvalidGrant(
            f"{field}: seconds={seconds} nanos={nanos} is outside "
            "1970-01-01T00:00:00Z..9999-12-31T23:59:59.999999999Z",
            reason=reason,
        )
    return seconds_of_parts(seconds, nanos)


def _check_common(msg: Any, key_id: str, host_id: str, what: str) -> None:
    """The fields a grant and a revocation share: signing key, grant id, host, nonce."""
    if msg.key_id != key_id:
        raise InvalidGrant(
            f"key_id: {what} names {clip(msg.key_id)} but was signed by {clip(key_id)}",
            reason="KEY_ID_MISMATCH",
        )
    if not GRANT_ID_PATTERN.fullmatch(msg.grant_id):
        raise InvalidGrant(
            f"grant_id: {clip(msg.grant_id)} is not 1-64 of [A-Za-z0-9._-]",
            reason="INVALID_GRANT_ID",
        )
    if msg.host_id != host_id:
        raise GrantDenied(
            f"host_id: {what} is for {clip(msg.host_id)}, this is {host_id!r}",
            reason="WRONG_HOST",
        )
    if len(msg.nonce) > MAX_NONCE_BYTES:
        raise InvalidGrant(
            f"nonce: {len(msg.nonce)} bytes, at most {MAX_NONCE_BYTES}", reason="INVALID_NONCE"
        )


def _sources(texts: Sequence[str]) -> tuple[Source, ...]:
    if not texts:
        raise InvalidGrant(
            "source_prefixes: at least one source is required", reason="INVALID_SOURCE"
        )
    if len(texts) > MAX_SOURCES:
        raise InvalidGrant(
            f"source_prefixes: {len(texts)} sources, at most {MAX_SOURCES}",
            reason="INVALID_SOURCE",
        )
    if len(texts) == 1:
        return (parse_source(texts[0], "source_prefixes[0]"),)
    seen: dict[Source, int] = {}
    for index, text in enumerate(texts):
        network = parse_source(text, f"source_prefixes[{index}]")
        if network in seen:
            # "10.1.2.3" and "10.1.2.3/32" are one source: a second spelling is not canonical.
            raise InvalidGrant(
                f"source_prefixes[{index}]: {network} repeats source_prefixes[{seen[network]}]",
                reason="INVALID_SOURCE",
            )
        seen[network] = index
    # One order for one set, whatever order it was signed in: by family, then address
    # (a Source sorts as that tuple).
    return tuple(sorted(seen))


# Hosts guard a handful of ports: 100k grants share a few PortRange objects (and their
# ints) instead of carrying 100k copies. Bounded: a cache of at most this many.
_PORT_RANGES: dict[tuple[int, int], PortRange] = {}
_PORT_RANGES_MAX = 1024


def _port_range(first: int, last: int) -> PortRange:
    key = (first, last)
    found = _PORT_RANGES.get(key)
    if found is None:
        found = PortRange(first, last)
        if len(_PORT_RANGES) < _PORT_RANGES_MAX:
            _PORT_RANGES[key] = found
    return found


def parse_grant(payload: bytes, key_id: str, host_id: str) -> Grant:
    """The one parse of signed grant bytes into a Grant: canonical encoding, every field
    in range, signed by `key_id`, for `host_id`. No clock, no policy, no signature check:
    callers (the Verifier) check the signature first."""
    msg = decode_canonical(payload, pb.Grant, "grant")
    _check_common(msg, key_id, host_id, "grant")
    _check_text("subject", msg.subject, MAX_SUBJECT_LENGTH, "INVALID_SUBJECT", required=True)
    _check_text("reason", msg.reason, MAX_REASON_LENGTH, "INVALID_REASON")
    sources = _sources(msg.source_prefixes)
    protocol: Protocol | None = PROTOCOL_FROM_PB.get(msg.protocol)
    if protocol is None:
        raise InvalidGrant(
            f"protocol: {msg.protocol} is not PROTOCOL_TCP or PROTOCOL_UDP",
            reason="INVALID_PROTOCOL",
        )
    # uint32 on the wire: a 64-bit varint cannot wrap into range (the canonical check
    # refuses it), and the range is checked on the parsed integers.
    last = msg.port_end or msg.port_start
    if not 1 <= msg.port_start <= last <= 65535:
        raise InvalidGrant(
            f"port_start/port_end: {msg.port_start}-{msg.port_end} is not a port range "
            "within 1-65535 (port_end 0 means one port)",
            reason="INVALID_PORT",
        )
    ports = _port_range(msg.port_start, last)
    if len(sources) * (last - msg.port_start + 1) > MAX_ELEMENTS_PER_GRANT:
        raise GrantDenied(
            f"grant: {len(sources)} sources x {len(ports.ports())} ports exceeds "
            f"{MAX_ELEMENTS_PER_GRANT} kernel elements",
            reason="GRANT_TOO_LARGE",
        )
    options = msg.options
    if options.max_connections > MAX_CONNECTIONS_LIMIT:
        raise InvalidGrant(
            f"options.max_connections: {options.max_connections} exceeds "
            f"{MAX_CONNECTIONS_LIMIT} (0 means no limit)",
            reason="INVALID_OPTIONS",
        )
    not_before = _time(msg, "not_before", "INVALID_VALIDITY")
    expire_time = _time(msg, "expire_time", "INVALID_VALIDITY")
    issue_time = _time(msg, "issue_time", "INVALID_VALIDITY")
    if expire_time <= 0:
        raise InvalidGrant("expire_time: required", reason="INVALID_VALIDITY")
    if expire_time <= max(not_before, issue_time):
        raise InvalidGrant(
            "expire_time: must be after not_before and issue_time (TTL must be positive)",
            reason="INVALID_VALIDITY",
        )
    return Grant(
        grant_id=msg.grant_id,
        # The caller's strings (equal, checked above) and interned subjects: 100k grants
        # share a handful of each instead of carrying 100k copies.
        host_id=host_id,
        subject=sys.intern(msg.subject),
        sources=sources,
        protocol=protocol,
        ports=ports,
        not_before=not_before,
        expire_time=expire_time,
        issue_time=issue_time,
        key_id=sys.intern(key_id),
        reason=msg.reason,
        keep_established=options.keep_established,
        max_connections=options.max_connections,
    )


def parse_revocation(payload: bytes, key_id: str, host_id: str) -> Revocation:
    """The one parse of signed revocation bytes (same rules as `parse_grant`)."""
    msg = decode_canonical(payload, pb.Revocation, "revocation")
    _check_common(msg, key_id, host_id, "revocation")
    _check_text("reason", msg.reason, MAX_REASON_LENGTH, "INVALID_REASON")
    issued = _time(msg, "issue_time", "INVALID_VALIDITY")
    return Revocation(msg.grant_id, msg.host_id, issued, msg.key_id, msg.reason)


def audit_fields(grant: Grant) -> dict[str, object]:
    """What a log record says about a grant (journald field names): who may reach what,
    and who signed it and why. GRANT_REASON is the grant's own free text (the ticket),
    present even when empty; codes go in REASON_CODE (docs/journal.md)."""
    return {
        "GRANT_ID": grant.grant_id,
        "SUBJECT": grant.subject,
        "SOURCE": [str(s) for s in grant.sources],
        "PORT": str(grant.ports),
        "PROTOCOL": grant.protocol.value,
        "KEY_ID": grant.key_id,
        "GRANT_REASON": grant.reason,
    }


class Verifier:
    """Checks signed grants and revocations against this host's trust and policy."""

    def __init__(self, host_id: str, keys: Iterable[TrustedKey], policy: Policy) -> None:
        self.host_id = host_id
        self.policy = policy
        self._keys = {k.key_id: Ed25519PublicKey.from_public_bytes(k.public_key) for k in keys}

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of the broker keys trusted now (the Hello tells the broker)."""
        return tuple(sorted(self._keys))

    def open_host_state(self, signed: fleet_pb2.SignedHostState) -> fleet_pb2.HostState:
        """A broker snapshot signed by a trusted key for this host, with a digest that
        matches its grants (portagent.wire.hoststate), or a refusal. The grants inside
        are still bytes: each goes through `verify_grant` when it is applied."""
        return open_host_state(signed, self._keys, self.host_id)

    def verify_stored_grant(self, grant_bytes: bytes, signature: bytes, key_id: str) -> Grant:
        """A grant as accepted earlier (store reload): signed by a key trusted *now*,
        canonical, every field in range, for this host. Not checked: the validity window
        and this agent's policy (TTL, guarded ports, prefix lengths), so an active grant
        stays as it was accepted when the policy changes."""
        check_signature(grant_bytes, signature, key_id, self._keys, "grant", MAX_GRANT_BYTES)
        return parse_grant(grant_bytes, key_id, self.host_id)

    def parse_covered_grant(self, grant_bytes: bytes, key_id: str) -> Grant:
        """A grant whose exact bytes a trusted key signed inside a snapshot that was
        opened (`open_host_state`): the grant's own signature is not checked again, but
        it must name a key trusted now, like any grant, and parse as one."""
        if not isinstance(key_id, str) or key_id not in self._keys:
            raise GrantDenied(
                f"key_id: {clip(key_id)} is not a trusted broker key", reason="UNKNOWN_KEY"
            )
        if not isinstance(grant_bytes, bytes) or len(grant_bytes) > MAX_GRANT_BYTES:
            raise InvalidGrant(
                f"grant: not bytes of at most {MAX_GRANT_BYTES}", reason="MALFORMED_GRANT"
            )
        return parse_grant(grant_bytes, key_id, self.host_id)

    def verify_covered_grant(self, grant_bytes: bytes, key_id: str, now: float) -> Grant:
        """`parse_covered_grant`, then policy and the window, as `verify_grant`."""
        return self._checked(self.parse_covered_grant(grant_bytes, key_id), now)

    def verify_grant(self, grant_bytes: bytes, signature: bytes, key_id: str, now: float) -> Grant:
        """A grant from the wire: `verify_stored_grant`, then policy, then the window."""
        self.check_grant_signature(grant_bytes, signature, key_id)
        return self.verify_signature_checked_grant(grant_bytes, key_id, now)

    def check_grant_signature(self, grant_bytes: bytes, signature: bytes, key_id: str) -> None:
        """The first step of `verify_grant` alone: size, a trusted key, the signature. A
        caller's thread runs it before queueing its grant: the Ed25519 check releases the
        GIL, so concurrent callers verify in parallel, and the writer, which every request
        waits for, no longer gives the GIL away (and waits to get it back) for each one."""
        check_signature(grant_bytes, signature, key_id, self._keys, "grant", MAX_GRANT_BYTES)

    def verify_signature_checked_grant(self, grant_bytes: bytes, key_id: str, now: float) -> Grant:
        """The rest of `verify_grant` once `check_grant_signature` passed with THIS
        verifier (callers must make sure): canonical parse, policy, window."""
        return self._checked(parse_grant(grant_bytes, key_id, self.host_id), now)

    def _checked(self, grant: Grant, now: float) -> Grant:
        try:
            self._check_policy(grant)
            self._check_window(grant, now)
        except PortagentError as exc:
            exc.verified_fields = audit_fields(grant)  # signed: fit for the audit record
            raise
        return grant

    def _check_policy(self, grant: Grant) -> None:
        policy = self.policy
        for index, network in enumerate(grant.sources):
            if network.prefixlen == 0:
                if not policy.allow_any_source:
                    raise GrantDenied(
                        f"source_prefixes[{index}]: {network} allows every address; "
                        "policy.allow_any_source is off",
                        reason="SOURCE_TOO_BROAD",
                    )
                continue
            minimum = policy.min_prefix_v4 if network.version == 4 else policy.min_prefix_v6
            if network.prefixlen < minimum:
                raise GrantDenied(
                    f"source_prefixes[{index}]: {network} is broader than /{minimum}",
                    reason="SOURCE_TOO_BROAD",
                )
        if not is_guarded(policy.guarded, grant.protocol, grant.ports):
            raise GrantDenied(
                f"port: {grant.ports}/{grant.protocol.value} is not guarded on this host",
                reason="PORT_NOT_GUARDED",
            )

    def _check_window(self, grant: Grant, now: float) -> None:
        start = grant.not_before or grant.issue_time or now
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
        self.check_revocation_signature(payload, signature, key_id)
        return self.verify_signature_checked_revocation(payload, key_id, now)

    def check_revocation_signature(self, payload: bytes, signature: bytes, key_id: str) -> None:
        """`check_grant_signature` for a revocation."""
        check_signature(
            payload, signature, key_id, self._keys, "revocation", MAX_REVOCATION_BYTES
        )

    def verify_signature_checked_revocation(
        self, payload: bytes, key_id: str, now: float
    ) -> Revocation:
        """The rest of `verify_revocation` once `check_revocation_signature` passed with
        THIS verifier: canonical parse, not issued in the future."""
        revocation = parse_revocation(payload, key_id, self.host_id)
        if revocation.issue_time > now + self.policy.clock_skew:
            raise GrantNotInWindow(
                "issue_time: revocation is issued in the future", reason="REVOCATION_NOT_YET_VALID"
            )
        return revocation
