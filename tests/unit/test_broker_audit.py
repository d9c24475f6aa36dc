"""The audit chain, pure: a chain built with record_hash verifies; every kind of
tampering (edit, delete, reorder, renumber, forged link) is caught and named; the
export format round-trips and its reader is strict."""

from __future__ import annotations

import dataclasses
import json

import pytest

from portagent.broker.fleet.audit import (
    GENESIS,
    canonical_json,
    hash_fields,
    record_from_json,
    record_hash,
    record_json,
    verify_chain,
)
from portagent.broker.fleet.model import AuditRecord


def build_chain(n: int) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        draft = AuditRecord(
            seq=seq,
            time=1_700_000_000.0 + seq / 7,
            actor="admin:alice" if seq % 2 else "agent:web1",
            action="create" if seq % 3 else "revoke",
            host_id="web1",
            grant_id=f"g-{seq:04d}",
            reason="ticket ÉX-1",  # non-ASCII stays as UTF-8 in the hashed text
            detail={"generation": seq, "ports": [22, 80], "nested": {"b": 1, "a": None}},
            prev_hash=prev,
            hash="",
        )
        digest = record_hash(prev, hash_fields(draft))
        records.append(dataclasses.replace(draft, hash=digest))
        prev = digest
    return records


def test_a_built_chain_verifies() -> None:
    chain = build_chain(10)
    report = verify_chain(chain)
    assert report.ok, report.problem
    assert (report.checked, report.first_bad_seq, report.problem) == (10, None, "")
    assert report.last_hash == chain[-1].hash
    assert verify_chain([]).ok


def test_hash_is_sha256_of_prev_and_canonical_json() -> None:
    import hashlib

    record = build_chain(1)[0]
    body = json.dumps(
        hash_fields(record), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert record.hash == hashlib.sha256((GENESIS + body).encode("utf-8")).hexdigest()
    # key order of the input does not matter, the values do
    shuffled = dict(reversed(list(hash_fields(record).items())))
    assert record_hash(GENESIS, shuffled) == record.hash
    with pytest.raises(ValueError, match="exactly"):
        record_hash(GENESIS, {**hash_fields(record), "extra": 1})


@pytest.mark.parametrize(
    "field, value",
    [
        ("actor", "admin:mallory"),
        ("action", "deliver"),
        ("reason", "ticket ÉX-2"),
        ("time", 1_700_000_000.5),
        ("detail", {"generation": 99}),
        ("grant_id", "g-9999"),
        ("host_id", "web2"),
    ],
)
def test_an_edited_record_is_named(field: str, value: object) -> None:
    chain = build_chain(6)
    chain[3] = dataclasses.replace(chain[3], **{field: value})
    report = verify_chain(chain)
    assert not report.ok
    assert report.first_bad_seq == 4
    assert "record 4 was edited" in report.problem
    assert report.checked == 4


def test_a_deleted_record_leaves_a_gap() -> None:
    chain = build_chain(6)
    del chain[2]
    report = verify_chain(chain)
    assert (report.ok, report.first_bad_seq) == (False, 4)
    assert "record 3 missing before record 4" in report.problem


def test_deleted_and_renumbered_records_break_the_link() -> None:
    chain = build_chain(6)
    del chain[2]
    # the forger renumbers what follows so the seqs are consecutive again
    chain[2:] = [dataclasses.replace(r, seq=r.seq - 1) for r in chain[2:]]
    report = verify_chain(chain)
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert "prev_hash differs" in report.problem


def test_a_renumbered_record_with_a_fixed_link_fails_its_hash() -> None:
    chain = build_chain(6)
    del chain[2]
    moved = chain[2]
    chain[2] = dataclasses.replace(moved, seq=3, prev_hash=chain[1].hash)
    report = verify_chain(chain)
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert "was edited" in report.problem


def test_reordered_records_are_caught() -> None:
    chain = build_chain(6)
    chain[2], chain[3] = chain[3], chain[2]
    report = verify_chain(chain)
    assert (report.ok, report.first_bad_seq) == (False, 4)
    assert "missing" in report.problem  # 4 came where 3 was due

    chain = build_chain(6)
    chain.append(chain[1])  # a record replayed at the end
    report = verify_chain(chain)
    assert (report.ok, report.first_bad_seq) == (False, 2)
    assert "out of order" in report.problem


def test_a_rewritten_first_record_is_caught() -> None:
    chain = build_chain(3)
    chain[0] = dataclasses.replace(chain[0], prev_hash="1" * 64)
    report = verify_chain(chain)
    assert (report.ok, report.first_bad_seq) == (False, 1)


def test_a_tail_verifies_from_its_anchor() -> None:
    chain = build_chain(8)
    anchor = (chain[4].seq, chain[4].hash)
    assert verify_chain(chain[5:], start=anchor).ok
    assert not verify_chain(chain[5:]).ok
    assert not verify_chain(chain[6:], start=anchor).ok


def test_export_round_trip() -> None:
    chain = build_chain(5)
    lines = [json.dumps(record_json(r), ensure_ascii=False) for r in chain]
    back = [record_from_json(json.loads(line)) for line in lines]
    assert back == chain
    assert verify_chain(back).ok


def test_integral_times_keep_their_hash_through_export() -> None:
    draft = AuditRecord(1, 1_700_000_000, "a", "b", "", "", "", {}, GENESIS, "")
    record = dataclasses.replace(draft, hash=record_hash(GENESIS, hash_fields(draft)))
    back = record_from_json(json.loads(json.dumps(record_json(record))))
    assert verify_chain([back]).ok


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda o: o.pop("actor"), "actor"),
        (lambda o: o.update(extra=1), "extra"),
        (lambda o: o.update(seq="1"), "seq"),
        (lambda o: o.update(seq=True), "seq"),
        (lambda o: o.update(seq=0), "seq"),
        (lambda o: o.update(time="now"), "time"),
        (lambda o: o.update(time=True), "time"),
        (lambda o: o.update(detail=[]), "detail"),
        (lambda o: o.update(reason=None), "reason"),
        (lambda o: o.update(hash="AB" * 32), "hash"),
        (lambda o: o.update(prev_hash="0" * 63), "prev_hash"),
    ],
)
def test_export_reader_is_strict(mutate: object, key: str) -> None:
    obj = record_json(build_chain(1)[0])
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(ValueError, match=f"^{key}: "):
        record_from_json(obj)


def test_export_reader_refuses_non_objects_and_non_finite_times() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        record_from_json([1, 2])
    obj = record_json(build_chain(1)[0])
    obj["time"] = float("nan")
    with pytest.raises(ValueError, match=r"^time: "):
        record_from_json(obj)


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("inf")})
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'
