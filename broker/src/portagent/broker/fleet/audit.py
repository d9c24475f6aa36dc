"""The broker's audit chain, pure: each record's hash covers the previous record's hash
and the record's own fields, so an edited, deleted or moved record breaks the chain
from that point on (docs/adr/0007-broker-service.md, "Audit chain").

`record_hash` is what the store writes and `verify_chain` what `audit verify` runs, on
the database's rows or on an `audit export` file (`record_json` / `record_from_json`:
one JSON object per line). No I/O here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from portagent.broker.fleet.model import AuditRecord

GENESIS = "0" * 64
HASH_FIELDS = ("seq", "time", "actor", "action", "host_id", "grant_id", "reason", "detail")
_JSON_KEYS = (*HASH_FIELDS, "prev_hash", "hash")
_HEX = frozenset("0123456789abcdef")


def canonical_json(value: object) -> str:
    """The one JSON text of a value: sorted keys, no blanks, UTF-8 kept, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(prev_hash: str, fields: Mapping[str, object]) -> str:
    """SHA-256 hex of `prev_hash` followed by the canonical JSON of the record's fields
    (exactly HASH_FIELDS; anything else is a programming error)."""
    if set(fields) != set(HASH_FIELDS):
        raise ValueError(f"audit fields must be exactly {', '.join(HASH_FIELDS)}")
    body = canonical_json({name: fields[name] for name in HASH_FIELDS})
    return hashlib.sha256(prev_hash.encode("ascii") + body.encode("utf-8")).hexdigest()


def hash_fields(record: AuditRecord) -> dict[str, object]:
    return {
        "seq": record.seq,
        "time": record.time,
        "actor": record.actor,
        "action": record.action,
        "host_id": record.host_id,
        "grant_id": record.grant_id,
        "reason": record.reason,
        "detail": record.detail,
    }


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    checked: int  # records whose hash was checked
    first_bad_seq: int | None
    problem: str  # "" when ok
    last_hash: str = GENESIS  # the head of the verified chain (anchor it elsewhere)


def verify_chain(
    records: Iterable[AuditRecord], *, start: tuple[int, str] = (0, GENESIS)
) -> ChainReport:
    """Check records in the order given: consecutive seq from start[0] + 1, each
    prev_hash the previous record's hash (start[1] for the first), each hash recomputed.

    Stops at the first problem and names that record: an edited record fails its hash,
    a deleted one leaves a seq gap (or, renumbered, a prev_hash that does not match), a
    moved one comes out of order. Deleting the *last* records is only visible against a
    head kept elsewhere (`last_hash`).
    """
    expected_seq, prev = start[0] + 1, start[1]
    checked = 0
    for record in records:
        seq = record.seq
        if seq != expected_seq:
            if seq > expected_seq:
                what = f"record {expected_seq}" + (f"..{seq - 1}" if seq - 1 > expected_seq else "")
                problem = f"{what} missing before record {seq} (deleted)"
            else:
                problem = (
                    f"record {seq} out of order: expected record {expected_seq} "
                    "(moved or duplicated)"
                )
            return ChainReport(False, checked, seq, problem, prev)
        if record.prev_hash != prev:
            return ChainReport(
                False,
                checked,
                seq,
                f"record {seq} does not follow record {seq - 1}: prev_hash differs "
                "(a record before it was deleted, replaced or moved)",
                prev,
            )
        try:
            computed = record_hash(prev, hash_fields(record))
        except (TypeError, ValueError) as exc:
            return ChainReport(False, checked, seq, f"record {seq} cannot be hashed: {exc}", prev)
        checked += 1
        if computed != record.hash:
            return ChainReport(
                False,
                checked,
                seq,
                f"record {seq} was edited: its hash does not match its fields",
                prev,
            )
        prev = record.hash
        expected_seq += 1
    return ChainReport(True, checked, None, "", prev)


def record_json(record: AuditRecord) -> dict[str, object]:
    """One line of `audit export` (json.dumps it; record_from_json reads it back)."""
    return {**hash_fields(record), "prev_hash": record.prev_hash, "hash": record.hash}


def _get(obj: Mapping[str, object], key: str, kind: type) -> object:
    value = obj[key]
    # bool is an int in Python; a true/false where a number belongs is a different record.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _hex_hash(obj: Mapping[str, object], key: str) -> str:
    value = _get(obj, key, str)
    assert isinstance(value, str)
    if len(value) != 64 or not set(value) <= _HEX:
        raise ValueError(f"{key}: expected 64 lowercase hex digits")
    return value


def _text(obj: Mapping[str, object], key: str) -> str:
    value = _get(obj, key, str)
    assert isinstance(value, str)
    return value


def record_from_json(obj: object) -> AuditRecord:
    """Strict: a JSON object with exactly the exported keys and their types, else
    ValueError naming the key."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _JSON_KEYS if k not in obj]
    if missing:
        raise ValueError(f"{missing[0]}: missing")
    unknown = sorted(str(k) for k in obj if k not in _JSON_KEYS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key")
    seq = _get(obj, "seq", int)
    assert isinstance(seq, int)
    if seq < 1:
        raise ValueError("seq: must be 1 or more")
    raw_time = obj["time"]
    if isinstance(raw_time, bool) or not isinstance(raw_time, int | float):
        raise ValueError(f"time: expected a number, got {type(raw_time).__name__}")
    if not math.isfinite(raw_time):
        raise ValueError("time: must be finite")
    detail = _get(obj, "detail", dict)
    assert isinstance(detail, dict)
    return AuditRecord(
        seq=seq,
        # An exported float stays a float; an integral time written as 5 stays 5 for
        # the hash (json keeps int/float apart, and so does the canonical text).
        time=raw_time,
        actor=_text(obj, "actor"),
        action=_text(obj, "action"),
        host_id=_text(obj, "host_id"),
        grant_id=_text(obj, "grant_id"),
        reason=_text(obj, "reason"),
        detail=detail,
        prev_hash=_hex_hash(obj, "prev_hash"),
        hash=_hex_hash(obj, "hash"),
    )
