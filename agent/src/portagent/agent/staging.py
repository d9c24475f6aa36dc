"""Deciding a batch: verify each request, apply the agent's own rules, return decisions.

Pure (the verifier is pure; the table is only read): `stage()` turns a batch of
requests into `Decisions` — the grants the batch inserts or revokes, as the batch
leaves them, the revoked ids to remember, and one answer per request. The engine then
does it (store rows, one kernel batch, COMMIT): the store assigns handles to new grants
there, and the answers become records only after the commit.

The agent's rules on top of the signature and policy checks: a revoked id never
reopens (`GRANT_REVOKED`), the same id with the same bytes is an idempotent
re-delivery and with other bytes a conflict, and a grant issued before this state
began is refused (`GRANT_PREDATES_STATE`, ADR 0006).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from portagent.agent.lifecycle import GrantEvent, can, next_state
from portagent.agent.model import Grant, GrantRecord, GrantState
from portagent.agent.settings import Policy
from portagent.agent.verify import Revocation, Verifier, audit_fields
from portagent.wire.errors import (
    GrantConflict,
    GrantNotFound,
    GrantNotInWindow,
    PortagentError,
)


@dataclass(frozen=True, slots=True)
class SignedInput:
    payload: bytes
    signature: bytes
    key_id: str


class CommandKind(Enum):
    APPLY = "apply"
    REVOKE = "revoke"  # signed by the broker
    REVOKE_LOCAL = "revoke_local"  # an operator on this host


@dataclass(frozen=True, slots=True)
class Request:
    kind: CommandKind
    signed: SignedInput | None = None  # APPLY, REVOKE
    grant_id: str = ""  # REVOKE_LOCAL
    actor: str = ""  # REVOKE_LOCAL
    # APPLY from a signed snapshot issued after this state began: the broker vouches
    # that the grant is current, so GRANT_PREDATES_STATE does not apply to it.
    vouched: bool = False
    # APPLY whose exact bytes a trusted key signed as part of a snapshot the caller
    # opened (Verifier.open_host_state): that one signature covers them, so the
    # grant's own is not checked again (100k Ed25519 checks cost seconds).
    covered: bool = False
    # APPLY or REVOKE whose signature the caller's thread checked before queueing
    # (Verifier.check_grant_signature / check_revocation_signature) with the verifier
    # `signature_checked_by`, and what that check refused (None: it passed). The writer
    # relies on it only when its verifier is that same one (a reload checks again).
    signature_checked_by: object = None
    signature_error: PortagentError | None = None


@dataclass(frozen=True, slots=True)
class Draft:
    """A grant as a batch leaves it. `handle` is None for a grant new in this batch:
    the store assigns one when the batch is done (`record`)."""

    grant: Grant
    grant_bytes: bytes
    signature: bytes
    state: GrantState
    apply_time: float
    revoke_time: float | None = None
    handle: int | None = None

    @staticmethod
    def of(record: GrantRecord) -> Draft:
        return Draft(
            record.grant,
            record.grant_bytes,
            record.signature,
            record.state,
            record.apply_time,
            record.revoke_time,
            record.handle,
        )

    def record(self, handles: dict[str, int]) -> GrantRecord:
        handle = self.handle if self.handle is not None else handles[self.grant.grant_id]
        return GrantRecord(
            self.grant,
            handle,
            self.grant_bytes,
            self.signature,
            self.state,
            self.apply_time,
            self.revoke_time,
        )


@dataclass(frozen=True, slots=True)
class RevokeNote:
    """Who revoked a grant and why, for its log record."""

    grant_id: str
    revocation: Revocation | None
    actor: str


@dataclass(frozen=True, slots=True)
class Refused:
    error: PortagentError


@dataclass(frozen=True, slots=True)
class Unchanged:
    """The answer needs no commit: an idempotent request, or a revocation of an id this
    agent never saw (None)."""

    record: GrantRecord | None


@dataclass(frozen=True, slots=True)
class Changed:
    """The answer is this grant as this request left it, once the batch is committed."""

    draft: Draft


Answer = Refused | Unchanged | Changed


@dataclass
class Decisions:
    drafts: dict[str, Draft] = field(default_factory=dict)  # every grant the batch changes
    inserts: list[str] = field(default_factory=list)  # ids new in this batch, in order
    revokes: list[RevokeNote] = field(default_factory=list)
    revoked_ids: list[tuple[str, float]] = field(default_factory=list)  # (id, until)
    answers: list[Answer] = field(default_factory=list)  # one per request, in order

    @property
    def changes_anything(self) -> bool:
        return bool(self.inserts or self.revokes or self.revoked_ids)


def stage(
    requests: Sequence[Request],
    now: float,
    *,
    verifier: Verifier,
    known: Callable[[str], GrantRecord | None],
    revoked: Container[str],
    epoch: float,
    policy: Policy,
) -> Decisions:
    """Decide a batch. `known` looks a grant up in the committed table, `revoked` is
    the replay memory, `epoch` the time this agent's state began."""
    decisions = Decisions()

    def current(grant_id: str) -> Draft | None:
        draft = decisions.drafts.get(grant_id)
        if draft is not None:
            return draft
        record = known(grant_id)
        return Draft.of(record) if record is not None else None

    for request in requests:
        try:
            answer = _stage_one(request, now, verifier, current, revoked, epoch, policy, decisions)
        except PortagentError as exc:
            answer = Refused(exc)
        decisions.answers.append(answer)
    return decisions


def _stage_one(
    request: Request,
    now: float,
    verifier: Verifier,
    current: Callable[[str], Draft | None],
    revoked: Container[str],
    epoch: float,
    policy: Policy,
    decisions: Decisions,
) -> Answer:
    if request.kind is CommandKind.APPLY:
        assert request.signed is not None
        signed = request.signed
        if request.covered:
            grant = verifier.verify_covered_grant(signed.payload, signed.key_id, now)
        elif request.signature_checked_by is verifier:
            if request.signature_error is not None:
                raise request.signature_error
            grant = verifier.verify_signature_checked_grant(signed.payload, signed.key_id, now)
        else:
            grant = verifier.verify_grant(signed.payload, signed.signature, signed.key_id, now)
        try:
            since = 0.0 if request.vouched else epoch
            return _apply(grant, signed, now, current, revoked, since, decisions)
        except PortagentError as exc:
            # A refusal of a signed grant names what it was in its record.
            exc.verified_fields = audit_fields(grant)
            raise
    if request.kind is CommandKind.REVOKE:
        assert request.signed is not None
        signed = request.signed
        if request.signature_checked_by is verifier:
            if request.signature_error is not None:
                raise request.signature_error
            revocation = verifier.verify_signature_checked_revocation(
                signed.payload, signed.key_id, now
            )
        else:
            revocation = verifier.verify_revocation(
                signed.payload, signed.signature, signed.key_id, now
            )
        note = RevokeNote(revocation.grant_id, revocation, "broker")
        return _revoke(note, now, current, policy, decisions, must_exist=False)
    note = RevokeNote(request.grant_id, None, request.actor)
    return _revoke(note, now, current, policy, decisions, must_exist=True)


def _revoked_error(grant_id: str) -> GrantNotInWindow:
    return GrantNotInWindow(
        f"grant_id: {grant_id!r} was revoked; it never reopens", reason="GRANT_REVOKED"
    )


def _apply(
    grant: Grant,
    signed: SignedInput,
    now: float,
    current: Callable[[str], Draft | None],
    revoked: Container[str],
    epoch: float,
    decisions: Decisions,
) -> Answer:
    if grant.grant_id in revoked:
        raise _revoked_error(grant.grant_id)
    draft = current(grant.grant_id)
    if draft is not None:
        if draft.grant_bytes != signed.payload:
            raise GrantConflict(
                f"grant_id: {grant.grant_id!r} is already known with different content"
            )
        if not can(draft.state, GrantEvent.APPLY):
            raise _revoked_error(grant.grant_id)
        return _answer(draft)  # idempotent re-delivery
    issued = grant.issue_time or grant.not_before
    if issued < epoch:
        # It may have been revoked in a state that was lost: only a grant issued after
        # this state began can be told apart from a replay.
        raise GrantNotInWindow(
            f"issue_time: grant was issued at {issued:.3f}, before this agent's state "
            f"began at {epoch:.3f}; the broker must issue it again",
            reason="GRANT_PREDATES_STATE",
        )
    draft = Draft(grant, signed.payload, signed.signature, GrantState.ACTIVE, now)
    decisions.drafts[grant.grant_id] = draft
    decisions.inserts.append(grant.grant_id)
    return Changed(draft)


def _revoke(
    note: RevokeNote,
    now: float,
    current: Callable[[str], Draft | None],
    policy: Policy,
    decisions: Decisions,
    *,
    must_exist: bool,
) -> Answer:
    grant_id = note.grant_id
    draft = current(grant_id)
    if draft is None:
        if must_exist:
            raise GrantNotFound(f"grant_id: no grant {grant_id!r} on this host")
        # Revoked before delivery: remember the id until any grant with it would have
        # expired anyway.
        issued = note.revocation.issue_time if note.revocation else now
        until = max(issued, now) + policy.max_ttl + 2 * policy.clock_skew
        decisions.revoked_ids.append((grant_id, until))
        return Unchanged(None)
    state = next_state(draft.state, GrantEvent.REVOKE)
    if state is draft.state:
        return _answer(draft)  # already revoked
    assert isinstance(state, GrantState)
    revoked = replace(draft, state=state, revoke_time=now)
    decisions.drafts[grant_id] = revoked
    decisions.revokes.append(note)
    decisions.revoked_ids.append((grant_id, draft.grant.expire_time + policy.clock_skew))
    return Changed(revoked)


def _answer(draft: Draft) -> Answer:
    """A draft the batch did not change: a committed record needs no commit to answer."""
    if draft.handle is None:
        return Changed(draft)  # new in this batch: answered once it has a handle
    return Unchanged(draft.record({}))
