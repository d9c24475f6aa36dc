"""Pure staging: a batch of requests in, decisions out; nothing is done here."""

from __future__ import annotations

from pathlib import Path

import pytest

from portagent.agent.model import GrantRecord, GrantState
from portagent.agent.settings import ApiSettings, Policy, Settings
from portagent.agent.staging import (
    Changed,
    CommandKind,
    Decisions,
    Refused,
    Request,
    SignedInput,
    Unchanged,
    stage,
)
from portagent.agent.verify import Verifier
from portagent.testing.grants import TestSigner
from portagent.wire.errors import PortagentError
from portagent.wire.ports import parse_port_spec

NOW = 1_800_000_000.0
POLICY = Policy(guarded=(), max_ttl=3600.0)


@pytest.fixture
def signer() -> TestSigner:
    return TestSigner()


def settings(signer: TestSigner) -> Settings:
    return Settings(
        host_id="host-a",
        api=ApiSettings("127.0.0.1:0", Path("ca"), Path("c"), Path("k")),
        trusted_keys=(signer.trusted,),
        policy=Policy(guarded=(parse_port_spec("5432/tcp"),), max_ttl=3600.0),
        state_dir=Path("/nonexistent"),
    )


def run(
    signer: TestSigner,
    requests: list[Request],
    known: dict[str, GrantRecord] | None = None,
    revoked: frozenset[str] = frozenset(),
    epoch: float = 0.0,
) -> Decisions:
    s = settings(signer)
    return stage(
        requests,
        NOW,
        verifier=Verifier(s.host_id, s.trusted_keys, s.policy),
        known=(known or {}).get,
        revoked=revoked,
        epoch=epoch,
        policy=s.policy,
    )


def apply(signed: SignedInput) -> Request:
    return Request(CommandKind.APPLY, signed=signed)


def committed(signer: TestSigner, grant_id: str, handle: int) -> GrantRecord:
    """A grant as the table holds it after an earlier batch."""
    decisions = run(signer, [apply(signer.grant(NOW, grant_id=grant_id))])
    (answer,) = decisions.answers
    assert isinstance(answer, Changed)
    return answer.draft.record({grant_id: handle})


def test_a_new_grant_is_an_insert_without_a_handle(signer: TestSigner) -> None:
    decisions = run(signer, [apply(signer.grant(NOW, grant_id="g-1"))])
    assert decisions.inserts == ["g-1"] and decisions.changes_anything
    (answer,) = decisions.answers
    assert isinstance(answer, Changed) and answer.draft.handle is None
    assert answer.draft.record({"g-1": 7}).handle == 7


def test_redelivery_of_a_committed_grant_needs_no_commit(signer: TestSigner) -> None:
    signed = signer.grant(NOW, grant_id="g-1")
    known = committed(signer, "g-1", 5)
    known = GrantRecord(known.grant, 5, signed.payload, b"", GrantState.ACTIVE, NOW)
    decisions = run(signer, [apply(signed)], known={"g-1": known})
    assert decisions.answers == [Unchanged(known)] and not decisions.changes_anything


def test_apply_then_revoke_in_one_batch_leaves_the_grant_revoked(signer: TestSigner) -> None:
    decisions = run(
        signer,
        [
            apply(signer.grant(NOW, grant_id="g-1")),
            Request(CommandKind.REVOKE, signed=signer.revocation(NOW, "g-1")),
        ],
    )
    assert decisions.inserts == ["g-1"]
    assert decisions.drafts["g-1"].state is GrantState.REVOKED
    applied, revoked = decisions.answers
    assert isinstance(applied, Changed) and applied.draft.state is GrantState.ACTIVE
    assert isinstance(revoked, Changed) and revoked.draft.state is GrantState.REVOKED
    assert [note.grant_id for note in decisions.revokes] == ["g-1"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("revoked id", "GRANT_REVOKED"),
        ("before the epoch", "GRANT_PREDATES_STATE"),
        ("other bytes", "GRANT_ID_CONFLICT"),
        ("unknown local revoke", "GRANT_NOT_FOUND"),
        ("bad signature", "BAD_SIGNATURE"),
    ],
)
def test_refusals_decide_nothing(signer: TestSigner, case: str, reason: str) -> None:
    signed = signer.grant(NOW, grant_id="g-1")
    known: dict[str, GrantRecord] = {}
    revoked: frozenset[str] = frozenset()
    epoch = 0.0
    request = apply(signed)
    if case == "revoked id":
        revoked = frozenset({"g-1"})
    elif case == "before the epoch":
        epoch = NOW + 1
    elif case == "other bytes":
        known = {"g-1": committed(signer, "g-1", 3)}
        request = apply(signer.grant(NOW, grant_id="g-1", subject="mallory"))
    elif case == "unknown local revoke":
        request = Request(CommandKind.REVOKE_LOCAL, grant_id="g-1", actor="root")
    else:
        request = apply(SignedInput(signed.payload, b"\0" * 64, signed.key_id))
    decisions = run(signer, [request], known=known, revoked=revoked, epoch=epoch)
    (answer,) = decisions.answers
    assert isinstance(answer, Refused) and answer.error.reason == reason
    assert not decisions.changes_anything and decisions.drafts == {}


def test_a_revocation_before_delivery_remembers_the_id(signer: TestSigner) -> None:
    decisions = run(signer, [Request(CommandKind.REVOKE, signed=signer.revocation(NOW, "g-9"))])
    assert decisions.answers == [Unchanged(None)]
    ((grant_id, until),) = decisions.revoked_ids
    assert grant_id == "g-9" and until >= NOW + POLICY.max_ttl


def _stage_with(signer: TestSigner, request: Request, verifier: Verifier) -> Decisions:
    s = settings(signer)
    return stage(
        [request],
        NOW,
        verifier=verifier,
        known={}.get,
        revoked=frozenset(),
        epoch=0.0,
        policy=s.policy,
    )


def test_a_signature_checked_on_the_callers_thread_is_not_checked_again(
    signer: TestSigner,
) -> None:
    """The writer trusts the caller's signature check (made with this very verifier) and
    still parses and checks everything else: a tampered payload whose signature someone
    claims was checked is still only what it parses to, and the window is the writer's."""
    s = settings(signer)
    verifier = Verifier(s.host_id, s.trusted_keys, s.policy)
    signed = signer.grant(NOW, grant_id="g-1", ttl=60)
    verifier.check_grant_signature(signed.payload, signed.signature, signed.key_id)
    checked = Request(CommandKind.APPLY, signed=signed, signature_checked_by=verifier)
    (answer,) = _stage_with(signer, checked, verifier).answers
    assert isinstance(answer, Changed) and answer.draft.grant.grant_id == "g-1"
    late = stage(
        [checked],
        NOW + 61,
        verifier=verifier,
        known={}.get,
        revoked=frozenset(),
        epoch=0.0,
        policy=s.policy,
    )
    (answer,) = late.answers
    assert isinstance(answer, Refused) and answer.error.reason == "GRANT_EXPIRED"
    # The caller's refusal is the answer, as the writer's own check would have given it.
    bad = SignedInput(signed.payload, b"\0" * 64, signed.key_id)
    with pytest.raises(PortagentError) as info:
        verifier.check_grant_signature(bad.payload, bad.signature, bad.key_id)
    refused = Request(
        CommandKind.APPLY, signed=bad, signature_checked_by=verifier, signature_error=info.value
    )
    (answer,) = _stage_with(signer, refused, verifier).answers
    assert isinstance(answer, Refused) and answer.error.reason == "BAD_SIGNATURE"
    # Without the mark (or with another verifier's), the writer checks the signature.
    unmarked = Request(CommandKind.APPLY, signed=bad)
    (answer,) = _stage_with(signer, unmarked, verifier).answers
    assert isinstance(answer, Refused) and answer.error.reason == "BAD_SIGNATURE"


def test_a_signature_checked_before_a_reload_is_checked_again_by_the_new_trust(
    signer: TestSigner,
) -> None:
    """A key withdrawn (or a policy tightened) between the caller's check and the
    writer: the caller's verdict was the old verifier's, so the writer checks again."""
    s = settings(signer)
    old = Verifier(s.host_id, s.trusted_keys, s.policy)
    signed = signer.grant(NOW, grant_id="g-1")
    old.check_grant_signature(signed.payload, signed.signature, signed.key_id)
    request = Request(CommandKind.APPLY, signed=signed, signature_checked_by=old)
    without_key = Verifier(s.host_id, (), s.policy)
    (answer,) = _stage_with(signer, request, without_key).answers
    assert isinstance(answer, Refused) and answer.error.reason == "UNKNOWN_KEY"
    stricter = Verifier(s.host_id, s.trusted_keys, Policy(guarded=(), max_ttl=3600.0))
    (answer,) = _stage_with(signer, request, stricter).answers
    assert isinstance(answer, Refused) and answer.error.reason == "PORT_NOT_GUARDED"


def test_a_revocation_whose_signature_the_caller_checked_keeps_its_time_check(
    signer: TestSigner,
) -> None:
    s = settings(signer)
    verifier = Verifier(s.host_id, s.trusted_keys, s.policy)
    signed = signer.revocation(NOW + 3600, "g-1")  # issued an hour ahead of the writer
    verifier.check_revocation_signature(signed.payload, signed.signature, signed.key_id)
    request = Request(CommandKind.REVOKE, signed=signed, signature_checked_by=verifier)
    (answer,) = _stage_with(signer, request, verifier).answers
    assert isinstance(answer, Refused) and answer.error.reason == "REVOCATION_NOT_YET_VALID"
    other = Verifier(s.host_id, (), s.policy)  # a reload withdrew the key meanwhile
    on_time = signer.revocation(NOW, "g-1")
    verifier.check_revocation_signature(on_time.payload, on_time.signature, on_time.key_id)
    request = Request(CommandKind.REVOKE, signed=on_time, signature_checked_by=verifier)
    (answer,) = _stage_with(signer, request, other).answers
    assert isinstance(answer, Refused) and answer.error.reason == "UNKNOWN_KEY"
