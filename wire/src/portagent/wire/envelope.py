"""The signed envelope both sides agree on: size and field limits, the Ed25519
signature check over the exact bytes received, and the canonical decoding.

Order matters: the size and the signature are checked over the exact bytes received
before anything is parsed, so an attacker's bytes never reach the protobuf parser
unless a trusted key signed them. Then the bytes are parsed once and must be the
*canonical* encoding of what was parsed (docs/adr/0005-canonical-grants.md).
The broker checks its inputs against the same limits, so a typo fails on the
operator's terminal, not as a refusal from a remote host.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import Message

from portagent.wire.errors import GrantDenied, InvalidGrant

GRANT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_SOURCES = 64
MAX_SUBJECT_LENGTH = 256
MAX_REASON_LENGTH = 1024
MAX_NONCE_BYTES = 64
MAX_CONNECTIONS_LIMIT = 65535
# The largest legitimate grant is ~9 KB (64 sources, 256-character subject and
# 1024-character reason in 4-byte UTF-8); anything bigger is refused before the
# signature check so a huge blob costs neither hashing nor parsing.
MAX_GRANT_BYTES = 16384
MAX_REVOCATION_BYTES = 8192
ED25519_SIGNATURE_BYTES = 64
# Clip attacker-chosen text quoted in error messages and logs.
CLIP = 64

_M = TypeVar("_M", bound=Message)


def clip(value: object, limit: int = CLIP) -> str:
    """repr() of a value for a message, at most about `limit` characters of it."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return repr(value[:limit]) + f"… ({len(value)} in all)"
    return repr(value)


def check_signature(
    payload: bytes,
    signature: bytes,
    key_id: str,
    keys: Mapping[str, Ed25519PublicKey],
    what: str,
    limit: int,
) -> None:
    """Refuse unless `signature` is `keys[key_id]`'s Ed25519 signature over exactly
    `payload` (at most `limit` bytes). `what` ("grant", "revocation") names the payload
    in messages and reasons. Checks the cheap things first: type, size, known key."""
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
    public_key = keys.get(key_id)
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
