"""Verification of signed grants and revocations: pure, no I/O.

Order matters: the size and the signature are checked over the exact bytes received
before anything is parsed, so an attacker's bytes never reach the protobuf parser
unless a trusted key signed them. Then the bytes are parsed once and must be the
*canonical* encoding of what was parsed (docs/adr/0005-canonical-grants.md): one
meaning has one byte string, so an overlong varint, a duplicated field, an unknown
field or an explicit default is refused instead of being read differently by
different parsers. Every field is range-checked after the parse.

`verify_stored_grant` (store reload) and `verify_grant` (the wire) share that one
path; `verify_grant` adds only the validity window and this agent's policy.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from portagent.codec import PROTOCOL_FROM_PB, seconds_of
from portagent.errors import GrantDenied, GrantNotInWindow, InvalidGrant, PortagentError
from portagent.model import Grant, GuardedPort, IPNetwork, PortRange, Protocol
from portagent.settings import Policy, TrustedKey
from portagent.v1 import agent_pb2 as pb

GRANT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_SOURCES = 64
MAX_SUBJECT_LENGTH = 256
MAX_REASON_LENGTH = 1024
MAX_NONCE_BYTES = 64
MAX_CONNECTIONS_LIMIT = 65535
# Each (source, port) pair is one kernel element; keep a single grant bounded.
MAX_ELEMENTS_PER_GRANT = 4096
# The largest legitimate grant is ~9 KB (64 sources, 256-character subject and
# 1024-character reason in 4-byte UTF-8); anything bigger is refused before the
# signature check so a huge blob costs neither hashing nor parsing.
MAX_GRANT_BYTES = 16384
MAX_REVOCATION_BYTES = 8192
ED25519_SIGNATURE_BYTES = 64
# Longest legitimate source text: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128".
MAX_SOURCE_LENGTH = 64
# Timestamps: protobuf's valid range (up to 9999-12-31T23:59:59Z), starting at the
# epoch because the model keeps POSIX seconds with 0 meaning "unset".
MAX_TIMESTAMP_SECONDS = 253_402_300_799
MAX_NANOS = 999_999_999
# Clip attacker-chosen text quoted in error messages and logs.
CLIP = 64

# An address or CIDR network in its plain form only: hex digits, dots, colons and a
# decimal prefix length without leading zeros. This refuses, before `ipaddress` sees
# the text, whitespace (which `strip()` once hid from the verifier but not the store),
# zone ids, netmask forms ("/255.0.0.0"), "/024", signs and non-ASCII digits.
_SOURCE_SYNTAX = re.compile(r"[0-9A-Fa-f.:]+(?:/(?:0|[1-9][0-9]{0,2}))?")

# Networks that can never be a legitimate client. A source overlapping one of them is
# refused (INVALID_SOURCE); /0 is the one exception: "every address" is a policy
# question (policy.allow_any_source), answered by SOURCE_TOO_BROAD.
_SPECIAL_V4 = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "'this network' (0.0.0.0/8, incl. unspecified)"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "reserved or broadcast (240.0.0.0/4)"),
)
_SPECIAL_V6 = (
    (ipaddress.IPv6Network("::/128"), "the unspecified address (::)"),
    (ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped (::ffff:0:0/96)"),
    (ipaddress.IPv6Network("::/96"), "IPv4-compatible (::/96, deprecated)"),
    (ipaddress.IPv6Network("ff00::/8"), "multicast (ff00::/8)"),
)
# ::1 lies in ::/96 but is loopback, a legitimate (local) client.
_LOOPBACK_V6 = ipaddress.IPv6Network("::1/128")


def _int_ranges(
    blocks: tuple[tuple[IPNetwork, str], ...],
) -> tuple[tuple[int, int, int, str], ...]:
    # Integer bounds: an overlap test on ints costs a fraction of Network.overlaps().
    return tuple(
        (int(b.network_address), int(b.broadcast_address), b.prefixlen, what) for b, what in blocks
    )


_SPECIAL_RANGES = {4: _int_ranges(_SPECIAL_V4), 6: _int_ranges(_SPECIAL_V6)}

_M = TypeVar("_M", bound=Message)


@dataclass(frozen=True)
class Revocation:
    grant_id: str
    host_id: str
    issue_time: float
    key_id: str
    reason: str


def clip(value: object, limit: int = CLIP) -> str:
    """repr() of a value for a message, at most about `limit` characters of it."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return repr(value[:limit]) + f"… ({len(value)} in all)"
    return repr(value)


# Pure and deterministic, so cached: a restart re-parses the same few client networks
# in thousands of stored grants. Failures are not cached (they raise).
@functools.lru_cache(maxsize=4096)
def parse_network(text: str) -> IPNetwork:
    """The one parse of a source text into a network, for the agent and the broker.

    Raises ValueError with a message that quotes the (clipped) text. No stripping:
    every caller sees the same bytes mean the same thing or nothing.
    """
    if not isinstance(text, str):
        raise ValueError(f"{clip(text)} is not a string")
    if len(text) > MAX_SOURCE_LENGTH:
        raise ValueError(f"{clip(text)} is longer than {MAX_SOURCE_LENGTH} characters")
    if not _SOURCE_SYNTAX.fullmatch(text):
        if "%" in text:
            # "fe80::1%eth0": a zone means nothing to a firewall, nft would not parse it.
            raise ValueError(f"{clip(text)}: a zone index (%...) is not allowed")
        if any(c.isspace() for c in text):
            raise ValueError(f"{clip(text)} contains whitespace")
        raise ValueError(f"{clip(text)} is not an IP address or network")
    # The family is known from the text: skip ip_network()'s failed IPv4 attempt on IPv6.
    family = ipaddress.IPv6Network if ":" in text else ipaddress.IPv4Network
    try:
        network: IPNetwork = family(text, strict=True)
    except ValueError:
        try:
            loose = family(text, strict=False)
        except ValueError:
            raise ValueError(f"{clip(text)} is not an IP address or network") from None
        raise ValueError(f"{clip(text)} has host bits set (did you mean {loose}?)") from None
    problem = special_source(network)
    if problem is not None:
        raise ValueError(f"{clip(text)} is {problem}: never a client address")
    return network


def special_source(network: IPNetwork) -> str | None:
    """What makes `network` unfit as a grant source, or None when it is fit."""
    if network.prefixlen == 0 or network == _LOOPBACK_V6:
        return None
    first = int(network.network_address)
    last = first | int(network.hostmask)
    for block_first, block_last, block_prefix, what in _SPECIAL_RANGES[network.version]:
        if first <= block_last and block_first <= last:
            if network.version == 6 and block_prefix == 96 and network.prefixlen >= 96:
                embedded = ipaddress.IPv4Network((first & 0xFFFFFFFF, network.prefixlen - 96))
                return f"{what}; send the IPv4 network {embedded} instead"
            return what
    return None


def parse_source(text: str, field: str = "source_prefixes") -> IPNetwork:
    """An IP address or CIDR network that can be a client; never a hostname
    (libnftables would resolve it). InvalidGrant(INVALID_SOURCE) names `field`."""
    try:
        return parse_network(text)
    except ValueError as exc:
        raise InvalidGrant(f"{field}: {exc}", reason="INVALID_SOURCE") from None


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


def decode_canonical(payload: bytes, message: type[_M], what: str) -> _M:
    """Parse `payload`, which must be the canonical (deterministic, no unknown fields)
    encoding of the parsed message. Only ever call this on bytes a trusted key signed."""
    try:
        msg = message.FromString(payload)
    except Exception:
        # DecodeError from upb/cpp; the pure-Python parser raises UnicodeDecodeError
        # and others: any parser failure is the same refusal.
        raise InvalidGrant(
            f"{what}: bytes are not a portagent.v1.{message.__name__}",
            reason=f"MALFORMED_{what.upper()}",
        ) from None
    # Unknown fields are dropped from the comparison, so they make the bytes differ:
    # a restriction from a newer broker this agent does not understand is refused,
    # never silently ignored.
    msg.DiscardUnknownFields()
    if msg.SerializeToString(deterministic=True) != payload:
        raise InvalidGrant(
            f"{what}: bytes are not the canonical encoding of a portagent.v1."
            f"{message.__name__} (unknown, duplicated, out-of-order or explicitly "
            "default fields, or overlong varints)",
            reason="NON_CANONICAL",
        )
    return msg


def _check_text(field: str, text: str, limit: int, reason: str, *, required: bool = False) -> None:
    if (required and not text) or len(text) > limit or not text.isprintable():
        need = "required, printable" if required else "printable"
        raise InvalidGrant(
            f"{field}: {clip(text)} must be {need}, at most {limit} characters", reason=reason
        )


def _time(msg: Any, field: str, reason: str) -> float:
    """Seconds of an optional Timestamp field (0.0 when absent), range-checked."""
    if not msg.HasField(field):
        return 0.0
    ts: Timestamp = getattr(msg, field)
    if not 0 <= ts.seconds <= MAX_TIMESTAMP_SECONDS or not 0 <= ts.nanos <= MAX_NANOS:
        raise InvalidGrant(
            f"{field}: seconds={ts.seconds} nanos={ts.nanos} is outside "
            "1970-01-01T00:00:00Z..9999-12-31T23:59:59.999999999Z",
            reason=reason,
        )
    return seconds_of(ts)


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


def _sources(texts: Sequence[str]) -> tuple[IPNetwork, ...]:
    if not texts:
        raise InvalidGrant(
            "source_prefixes: at least one source is required", reason="INVALID_SOURCE"
        )
    if len(texts) > MAX_SOURCES:
        raise InvalidGrant(
            f"source_prefixes: {len(texts)} sources, at most {MAX_SOURCES}",
            reason="INVALID_SOURCE",
        )
    seen: dict[IPNetwork, int] = {}
    for index, text in enumerate(texts):
        network = parse_source(text, f"source_prefixes[{index}]")
        if network in seen:
            # "10.1.2.3" and "10.1.2.3/32" are one source: a second spelling is not canonical.
            raise InvalidGrant(
                f"source_prefixes[{index}]: {network} repeats source_prefixes[{seen[network]}]",
                reason="INVALID_SOURCE",
            )
        seen[network] = index
    if len(seen) == 1:
        return tuple(seen)
    # One order for one set, whatever order it was signed in: by family, then address.
    return tuple(sorted(seen, key=lambda n: (n.version, int(n.network_address), n.prefixlen)))


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
    ports = PortRange(msg.port_start, last)
    if len(sources) * len(ports.ports()) > MAX_ELEMENTS_PER_GRANT:
        raise GrantDenied(
            f"grant: {len(sources)} sources x {len(ports.ports())} ports exceeds "
            f"{MAX_ELEMENTS_PER_GRANT} kernel elements",
            reason="GRANT_TOO_LARGE",
        )
    if msg.options.max_connections > MAX_CONNECTIONS_LIMIT:
        raise InvalidGrant(
            f"options.max_connections: {msg.options.max_connections} exceeds "
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
        host_id=msg.host_id,
        subject=msg.subject,
        sources=sources,
        protocol=protocol,
        ports=ports,
        not_before=not_before,
        expire_time=expire_time,
        issue_time=issue_time,
        key_id=msg.key_id,
        reason=msg.reason,
        keep_established=msg.options.keep_established,
        max_connections=msg.options.max_connections,
    )


def parse_revocation(payload: bytes, key_id: str, host_id: str) -> Revocation:
    """The one parse of signed revocation bytes (same rules as `parse_grant`)."""
    msg = decode_canonical(payload, pb.Revocation, "revocation")
    _check_common(msg, key_id, host_id, "revocation")
    _check_text("reason", msg.reason, MAX_REASON_LENGTH, "INVALID_REASON")
    issued = _time(msg, "issue_time", "INVALID_VALIDITY")
    return Revocation(msg.grant_id, msg.host_id, issued, msg.key_id, msg.reason)


def audit_fields(grant: Grant) -> dict[str, object]:
    """What a log record says about a grant (journald field names)."""
    return {
        "GRANT_ID": grant.grant_id,
        "SUBJECT": grant.subject,
        "SOURCE": [str(s) for s in grant.sources],
        "PORT": str(grant.ports),
        "PROTOCOL": grant.protocol.value,
    }


class Verifier:
    """Checks signed grants and revocations against this host's trust and policy."""

    def __init__(self, host_id: str, keys: Iterable[TrustedKey], policy: Policy) -> None:
        self.host_id = host_id
        self.policy = policy
        self._keys = {k.key_id: Ed25519PublicKey.from_public_bytes(k.public_key) for k in keys}

    def _check_signature(
        self, payload: bytes, signature: bytes, key_id: str, what: str, limit: int
    ) -> None:
        # Callers hand over store columns too: a wrong type is a refusal, not a TypeError.
        if not isinstance(payload, bytes):
            raise InvalidGrant(
                f"{what}: {type(payload).__name__}, not bytes", reason=f"MALFORMED_{what.upper()}"
            )
        if not isinstance(key_id, str):
            raise GrantDenied(f"key_id: {type(key_id).__name__}, not text", reason="UNKNOWN_KEY")
        if not isinstance(signature, bytes):
            raise GrantDenied(
                f"signature: {type(signature).__name__}, not bytes", reason="BAD_SIGNATURE"
            )
        if len(payload) > limit:
            raise InvalidGrant(
                f"{what}: {len(payload)} bytes, at most {limit}",
                reason=f"MALFORMED_{what.upper()}",
            )
        public_key = self._keys.get(key_id)
        if public_key is None:
            raise GrantDenied(
                f"key_id: {clip(key_id)} is not a trusted broker key", reason="UNKNOWN_KEY"
            )
        if len(signature) != ED25519_SIGNATURE_BYTES:
            raise GrantDenied(
                f"signature: {len(signature)} bytes, an Ed25519 signature has 64",
                reason="BAD_SIGNATURE",
            )
        try:
            public_key.verify(signature, payload)
        except InvalidSignature:
            raise GrantDenied(
                f"signature: does not verify with key {key_id!r}", reason="BAD_SIGNATURE"
            ) from None

    def verify_stored_grant(self, grant_bytes: bytes, signature: bytes, key_id: str) -> Grant:
        """A grant as accepted earlier (store reload): signed by a key trusted *now*,
        canonical, every field in range, for this host. Not checked: the validity window
        and this agent's policy (TTL, guarded ports, prefix lengths), so an active grant
        stays as it was accepted when the policy changes."""
        self._check_signature(grant_bytes, signature, key_id, "grant", MAX_GRANT_BYTES)
        return parse_grant(grant_bytes, key_id, self.host_id)

    def verify_grant(self, grant_bytes: bytes, signature: bytes, key_id: str, now: float) -> Grant:
        """A grant from the wire: `verify_stored_grant`, then policy, then the window."""
        grant = self.verify_stored_grant(grant_bytes, signature, key_id)
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
        self._check_signature(payload, signature, key_id, "revocation", MAX_REVOCATION_BYTES)
        revocation = parse_revocation(payload, key_id, self.host_id)
        if revocation.issue_time > now + self.policy.clock_skew:
            raise GrantNotInWindow(
                "issue_time: revocation is issued in the future", reason="REVOCATION_NOT_YET_VALID"
            )
        return revocation
