"""Signed full-state snapshots of one host (portagent.v1.HostState): the digest both
sides compute, the limits, signing (broker) and opening (agent).

One Ed25519 signature covers the host's whole set, its generation and its digest, so
an agent checks one signature for the set instead of one per grant, and a snapshot
that lost, gained or reordered a grant on the way does not verify. The grants inside
keep their own signatures: the agent stores them as it stores any grant, and its
restart re-verification stays the same whatever path a grant came by.

Opening follows the envelope's order (portagent.wire.envelope): size, signature over
the exact bytes, then one canonical parse; then host, key id, grant count and digest.
The grants inside are *not* parsed here: that is the agent's one grant parse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from portagent.v1 import agent_pb2, fleet_pb2
from portagent.wire.envelope import check_signature, clip, decode_canonical
from portagent.wire.errors import GrantDenied, InvalidGrant
from portagent.wire.timestamps import canonical_bytes, timestamp

DIGEST_DOMAIN = b"portagent-state-v1\0"
# A host's set is bounded (the agent's batch limit); 100,000 grants of ~300 bytes is
# ~30 MB, so 64 MiB leaves room for the largest grants without letting a stream
# message grow without bound.
MAX_STATE_GRANTS = 100_000
MAX_STATE_BYTES = 64 * 1024 * 1024
# gRPC message size the fleet stream allows on both ends (the snapshot and framing).
MAX_FLEET_MESSAGE_BYTES = MAX_STATE_BYTES + 1024 * 1024


def state_digest(grant_payloads: Iterable[bytes]) -> bytes:
    """SHA-256 over the domain tag and the sorted SHA-256 of each grant's bytes: one
    value for one set, whatever order it is held or sent in."""
    outer = hashlib.sha256(DIGEST_DOMAIN)
    for inner in sorted(hashlib.sha256(p).digest() for p in grant_payloads):
        outer.update(inner)
    return outer.digest()


def sign_host_state(
    key: Ed25519PrivateKey,
    key_id: str,
    *,
    host_id: str,
    generation: int,
    grants: Iterable[agent_pb2.SignedGrant],
    now: float,
) -> fleet_pb2.SignedHostState:
    """The broker's side: one canonical HostState and one signature over its bytes."""
    grant_list = list(grants)
    if len(grant_list) > MAX_STATE_GRANTS:
        raise ValueError(f"{len(grant_list)} grants for {host_id!r}, at most {MAX_STATE_GRANTS}")
    state = fleet_pb2.HostState(
        host_id=host_id,
        generation=generation,
        issue_time=timestamp(now),
        key_id=key_id,
        digest=state_digest(g.grant for g in grant_list),
        grants=grant_list,
    )
    payload = canonical_bytes(state)
    return fleet_pb2.SignedHostState(state=payload, signature=key.sign(payload), key_id=key_id)


def open_host_state(
    signed: fleet_pb2.SignedHostState,
    keys: Mapping[str, Ed25519PublicKey],
    host_id: str,
) -> fleet_pb2.HostState:
    """The agent's side: the HostState a trusted key signed for `host_id`, or a refusal
    (InvalidGrant / GrantDenied with a reason). The grants inside are still bytes."""
    check_signature(signed.state, signed.signature, signed.key_id, keys, "state", MAX_STATE_BYTES)
    state = decode_canonical(signed.state, fleet_pb2.HostState, "state")
    if state.key_id != signed.key_id:
        raise InvalidGrant(
            f"key_id: state names {clip(state.key_id)} but was signed by {clip(signed.key_id)}",
            reason="KEY_ID_MISMATCH",
        )
    if state.host_id != host_id:
        raise GrantDenied(
            f"host_id: state is for {clip(state.host_id)}, this is {host_id!r}",
            reason="WRONG_HOST",
        )
    if state.generation == 0:
        raise InvalidGrant("generation: a state starts at generation 1", reason="INVALID_STATE")
    if len(state.grants) > MAX_STATE_GRANTS:
        raise InvalidGrant(
            f"grants: {len(state.grants)} grants, at most {MAX_STATE_GRANTS}",
            reason="INVALID_STATE",
        )
    if state_digest(g.grant for g in state.grants) != state.digest:
        raise InvalidGrant(
            "digest: does not match the grants the state carries", reason="STATE_DIGEST_MISMATCH"
        )
    return state
