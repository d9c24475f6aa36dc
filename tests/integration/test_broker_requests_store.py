"""Access requests and approvals in the broker's store (ADR 0008), against real
databases: a SQLite file and a throwaway PostgreSQL 15 cluster started by this module,
never a mock. Every test runs on both.

What must hold whatever the interleaving: a denied or expired request never makes a
grant; the last approval needed makes exactly one; an identity never holds more
active grants than its rule allows; every step is in an intact audit chain, with the
approvers' identities.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from portagent.broker.fleet.audit import verify_chain
from portagent.broker.fleet.keyring import KeyRing, generate_key
from portagent.broker.fleet.model import (
    AccessRequest,
    BrokerGrant,
    ChangeKind,
    FleetError,
    GrantState,
    RequestState,
    StoreError,
)
from portagent.broker.fleet.store import FleetStore
from portagent.broker.identity.model import Identity, IdentityKind, admin_identity
from portagent.broker.policy.model import PolicyDecision, RuleLimits
from portagent.broker.signing import GrantRequest, grant_request

pytestmark = [pytest.mark.root]

T0 = 1_800_000_000.0
PENDING_TTL = 3600.0
SSO = "https://sso.example.com"


@pytest.fixture
def store(url: str) -> Iterator[FleetStore]:
    opened = FleetStore.open(url, replica="r1")
    try:
        opened.add_host("db-1", {"env": "prod"}, actor="admin:ops", now=T0 - 10)
        opened.add_host("db-2", {}, actor="admin:ops", now=T0 - 10)
        yield opened
    finally:
        opened.close()


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    generate_key(tmp_path / "keys", now=T0)
    return KeyRing.load(tmp_path / "keys")


def person(name: str, *groups: str) -> Identity:
    return Identity(
        kind=IdentityKind.PERSON,
        issuer=SSO,
        issuer_name="corp-sso",
        subject=f"sub-{name}",
        claims={"sub": f"sub-{name}", "email": f"{name}@example.com", "groups": groups},
        groups=groups,
        email=f"{name}@example.com",
    )


WORKFLOW = Identity(
    kind=IdentityKind.GITHUB,
    issuer="https://token.actions.githubusercontent.com",
    issuer_name="github",
    subject="repo:octo/app:ref:refs/heads/main",
    claims={"sub": "repo:octo/app:ref:refs/heads/main", "repository": "octo/app", "run_id": "7"},
)
ALICE = person("alice", "dev")
BOB = person("bob", "dba")
CAROL = person("carol", "dba", "dev")
DAVE = person("dave", "dba")
MALLORY = person("mallory", "dev")
ADMIN = admin_identity("ops")


def decision(approvals: int = 0, approvers: str = "", max_grants: int = 10) -> PolicyDecision:
    return PolicyDecision(
        allowed=True,
        rule="dba-db",
        message="allowed by dba-db",
        limits=RuleLimits(
            rule_id="dba-db", approvals=approvals, approvers=approvers, max_grants=max_grants
        ),
    )


def wanted(
    who: Identity = ALICE,
    host: str = "db-1",
    port: str = "5432",
    ttl: float = 900.0,
    reason: str = "INC-42",
) -> GrantRequest:
    return grant_request(
        host_id=host, subject=who.label, sources=["10.0.0.1"], port=port, ttl=ttl, reason=reason
    )


def ask(
    store: FleetStore,
    keyring: KeyRing,
    who: Identity = ALICE,
    *,
    approvals: int = 0,
    max_grants: int = 10,
    client_request_id: str | None = None,
    now: float = T0,
    host: str = "db-1",
    port: str = "5432",
    ttl: float = 900.0,
    reason: str = "INC-42",
) -> tuple[AccessRequest, BrokerGrant | None, bool]:
    return store.create_access_request(
        requester=who,
        grant_request=wanted(who, host, port, ttl, reason),
        decision=decision(approvals, "dba" if approvals else "", max_grants),
        keyring=keyring,
        client_request_id=client_request_id,
        pending_ttl=PENDING_TTL,
        now=now,
    )


def refused(call: Callable[[], object]) -> tuple[str, str, str | None]:
    with pytest.raises(FleetError) as info:
        call()
    return info.value.status, info.value.reason, info.value.field


def chain_ok(store: FleetStore) -> None:
    report = verify_chain(store.audit_records())
    assert report.ok, report.problem


# ------------------------------------------------------------------ creating


def test_a_request_needing_no_approval_is_granted_with_its_grant(
    store: FleetStore, keyring: KeyRing
) -> None:
    request, grant, created = store.create_access_request(
        requester=WORKFLOW,
        grant_request=wanted(WORKFLOW),
        decision=decision(),
        keyring=keyring,
        client_request_id=None,
        pending_ttl=PENDING_TTL,
        now=T0,
    )
    assert created and grant is not None
    assert request.state is RequestState.GRANTED and request.grant_id == grant.grant_id
    assert (request.rule, request.approvals_required, request.decided_at) == ("dba-db", 0, T0)
    assert request.request_id.startswith("r-") and len(request.request_id) == 18
    assert (grant.identity, grant.access_request_id, grant.subject) == (
        WORKFLOW,
        request.request_id,
        WORKFLOW.label,
    )
    assert (grant.state, grant.expire_time, grant.generation) == (GrantState.ACTIVE, T0 + 900, 1)
    assert store.get_grant(grant.grant_id) == grant  # identity read back from its column
    assert store.get_access_request(request.request_id) == request
    changes = store.changes_since("db-1", 0)
    assert changes is not None and [(c.kind, c.grant_id) for c in changes] == [
        (ChangeKind.GRANT, grant.grant_id)
    ]
    assert store.count_active_grants(WORKFLOW.key, now=T0) == 1
    assert store.count_active_grants(WORKFLOW.key, now=T0 + 900) == 0  # expired by then
    assert store.count_active_grants(ALICE.key, now=T0) == 0
    records = store.audit_records()
    assert [(r.action, r.actor) for r in records[-3:]] == [
        ("request", WORKFLOW.label),
        ("create", WORKFLOW.label),
        ("sign", "broker"),
    ]
    detail = records[-3].detail
    assert detail["identity"] == WORKFLOW.to_json() and detail["rule"] == "dba-db"
    assert (detail["port"], detail["sources"], detail["ttl"]) == (
        "5432/tcp",
        ["10.0.0.1/32"],
        900.0,
    )
    assert records[-2].detail["access_request_id"] == request.request_id
    chain_ok(store)


def test_a_request_needing_approval_waits_and_makes_nothing(
    store: FleetStore, keyring: KeyRing
) -> None:
    request, grant, created = ask(store, keyring, approvals=2)
    assert created and grant is None
    assert (request.state, request.expires_at, request.approvers, request.grant_id) == (
        RequestState.PENDING,
        T0 + PENDING_TTL,
        "dba",
        None,
    )
    assert store.count("grants") == 0 and store.get_host("db-1").generation == 0  # type: ignore[union-attr]


def test_bad_requests_are_refused_and_change_nothing(store: FleetStore, keyring: KeyRing) -> None:
    before = store.count("audit")
    assert refused(lambda: ask(store, keyring, host="ghost")) == (
        "NOT_FOUND",
        "UNKNOWN_HOST",
        "host",
    )
    assert refused(lambda: ask(store, keyring, reason="x" * 257))[2] == "reason"
    assert refused(lambda: ask(store, keyring, reason=" "))[2] == "reason"
    assert refused(lambda: ask(store, keyring, client_request_id="a b"))[2] == "request_id"
    assert refused(lambda: ask(store, keyring, client_request_id="x" * 65))[2] == "request_id"
    with pytest.raises(ValueError, match="allows"):
        store.create_access_request(
            requester=ALICE,
            grant_request=wanted(),
            decision=PolicyDecision(allowed=False, rule="", message="no", reason="POLICY_DENIED"),
            keyring=keyring,
            client_request_id=None,
            pending_ttl=PENDING_TTL,
            now=T0,
        )
    with pytest.raises(ValueError, match="label"):  # the subject is never free text
        store.create_access_request(
            requester=ALICE,
            grant_request=wanted(BOB),
            decision=decision(),
            keyring=keyring,
            client_request_id=None,
            pending_ttl=PENDING_TTL,
            now=T0,
        )
    assert store.count("access_requests") == 0 and store.count("audit") == before


def test_client_request_id_makes_create_idempotent(store: FleetStore, keyring: KeyRing) -> None:
    first, grant, created = ask(store, keyring, client_request_id="job-7.1")
    again, grant_again, created_again = ask(store, keyring, client_request_id="job-7.1", now=T0 + 5)
    assert (created, created_again) == (True, False)
    assert again == first and grant_again == grant
    pending, _, _ = ask(store, keyring, approvals=1, client_request_id="job-8")
    pending_again, no_grant, created_again = ask(
        store, keyring, approvals=1, client_request_id="job-8"
    )
    assert (pending_again, no_grant, created_again) == (pending, None, False)
    for changed in (
        wanted(port="5433"),
        wanted(host="db-2"),
        wanted(reason="INC-43"),
        wanted(ttl=60.0),
    ):
        with pytest.raises(FleetError) as info:
            store.create_access_request(
                requester=ALICE,
                grant_request=changed,
                decision=decision(),
                keyring=keyring,
                client_request_id="job-7.1",
                pending_ttl=PENDING_TTL,
                now=T0,
            )
        assert (info.value.status, info.value.reason, info.value.field) == (
            "ALREADY_EXISTS",
            "REQUEST_ID_REUSED",
            "request_id",
        )
    # another identity's key space: a new request
    _, _, created_other = ask(store, keyring, BOB, client_request_id="job-7.1")
    assert created_other
    assert store.count("access_requests") == 3 and store.count("grants") == 2
    chain_ok(store)


def test_the_grant_limit_counts_the_identitys_active_grants(
    store: FleetStore, keyring: KeyRing
) -> None:
    ask(store, keyring, max_grants=2, host="db-1")
    ask(store, keyring, max_grants=2, host="db-2")
    assert refused(lambda: ask(store, keyring, max_grants=2, port="22")) == (
        "FAILED_PRECONDITION",
        "TOO_MANY_GRANTS",
        None,
    )
    # an idempotent retry is answered, not counted again
    ask(store, keyring, BOB, max_grants=1, client_request_id="c1")
    _, _, created = ask(store, keyring, BOB, max_grants=1, client_request_id="c1")
    assert not created
    # other identities are not counted; expired grants are not active
    ask(store, keyring, CAROL, max_grants=1)
    ask(store, keyring, max_grants=2, now=T0 + 900)
    assert store.count_active_grants(ALICE.key, now=T0 + 900) == 1


def test_a_refused_request_is_audited_only(store: FleetStore) -> None:
    store.record_refused_request(
        requester=MALLORY,
        host_id="db-1",
        detail={"reason": "POLICY_DENIED", "rule": "", "port": "22/tcp"},
        now=T0,
    )
    store.record_refused_request(
        requester=MALLORY, host_id="bad host\n", detail={"reason": "POLICY_DENIED"}, now=T0
    )
    first, second = store.audit_records()[-2:]
    assert (first.action, first.actor, first.host_id) == ("request_refused", MALLORY.label, "db-1")
    assert first.detail["identity"] == MALLORY.to_json() and first.detail["rule"] == ""
    assert (second.host_id, second.detail["claimed_host_id"]) == ("", "bad host\n")
    assert store.count("access_requests") == 0
    chain_ok(store)


# ------------------------------------------------------------------ approvals


def test_two_approvals_of_two_make_the_grant(store: FleetStore, keyring: KeyRing) -> None:
    request, _, _ = store.create_access_request(
        requester=ALICE,
        grant_request=wanted(),
        decision=decision(2, "dba"),
        keyring=keyring,
        client_request_id=None,
        pending_ttl=PENDING_TTL,
        now=T0,
    )
    rid = request.request_id
    after_one, none = store.decide_access_request(
        rid, approver=BOB, approve=True, comment="ok by me", keyring=keyring, now=T0 + 10
    )
    assert none is None and after_one.state is RequestState.PENDING
    assert after_one.approved_count == 1 and store.count("grants") == 0
    done, grant = store.decide_access_request(
        rid, approver=CAROL, approve=True, comment="", keyring=keyring, now=T0 + 20
    )
    assert grant is not None and done.state is RequestState.GRANTED
    assert (done.grant_id, done.decided_at, done.approved_count) == (grant.grant_id, T0 + 20, 2)
    assert [(a.approver, a.approve, a.time, a.comment) for a in done.approvals] == [
        (BOB, True, T0 + 10, "ok by me"),
        (CAROL, True, T0 + 20, ""),
    ]
    # the TTL counts from the last approval; the grant is the requester's
    assert (grant.not_before, grant.expire_time) == (T0 + 20, T0 + 20 + 900)
    assert (grant.identity, grant.subject, grant.access_request_id) == (ALICE, ALICE.label, rid)
    assert (grant.sources, grant.port_first, grant.protocol, grant.reason) == (
        ("10.0.0.1/32",),
        5432,
        "tcp",
        "INC-42",
    )
    assert store.get_host("db-1").generation == 1  # type: ignore[union-attr]
    assert refused(
        lambda: store.decide_access_request(
            rid, approver=DAVE, approve=True, comment="", keyring=keyring, now=T0 + 30
        )
    ) == ("FAILED_PRECONDITION", "REQUEST_NOT_PENDING", "request_id")
    records = store.audit_records()
    votes = [r for r in records if r.action == "request_approve"]
    assert [(v.actor, v.detail["approver"], v.detail["approved_count"]) for v in votes] == [
        (BOB.label, BOB.to_json(), 1),
        (CAROL.label, CAROL.to_json(), 2),
    ]
    assert all(v.detail["threshold"] == 2 for v in votes)
    assert votes[0].detail["comment"] == "ok by me" and votes[1].grant_id == grant.grant_id
    assert [r.action for r in records[-3:]] == ["request_approve", "create", "sign"]
    assert store.get_access_request(rid) == done
    chain_ok(store)


def test_a_denied_request_never_makes_a_grant(store: FleetStore, keyring: KeyRing) -> None:
    request, _, _ = ask(store, keyring, approvals=2)
    rid = request.request_id
    store.decide_access_request(
        rid, approver=BOB, approve=True, comment="", keyring=keyring, now=T0
    )
    denied, grant = store.decide_access_request(
        rid, approver=CAROL, approve=False, comment="not now", keyring=keyring, now=T0 + 1
    )
    assert grant is None and (denied.state, denied.decided_at) == (RequestState.DENIED, T0 + 1)
    assert (
        refused(
            lambda: store.decide_access_request(
                rid, approver=DAVE, approve=True, comment="", keyring=keyring, now=T0 + 2
            )
        )[1]
        == "REQUEST_NOT_PENDING"
    )
    assert store.count("grants") == 0 and store.get_host("db-1").generation == 0  # type: ignore[union-attr]
    deny = store.audit_records()[-1]
    assert (deny.action, deny.detail["approver"], deny.detail["comment"]) == (
        "request_deny",
        CAROL.to_json(),
        "not now",
    )
    chain_ok(store)


def test_an_expired_request_never_makes_a_grant(store: FleetStore, keyring: KeyRing) -> None:
    one, _, _ = ask(store, keyring, approvals=1)
    two, _, _ = ask(store, keyring, approvals=1, port="5433")
    late = T0 + PENDING_TTL
    # a vote after the deadline: the request is expired (for good), the vote refused
    assert refused(
        lambda: store.decide_access_request(
            one.request_id, approver=BOB, approve=True, comment="", keyring=keyring, now=late
        )
    ) == ("FAILED_PRECONDITION", "REQUEST_NOT_PENDING", "request_id")
    expired_one = store.get_access_request(one.request_id)
    assert expired_one is not None and expired_one.state is RequestState.EXPIRED
    assert store.audit_records()[-1].action == "request_expire"
    # the expiry loop finds the other one, once
    assert store.expire_access_requests(now=late - 1) == []
    expired = store.expire_access_requests(now=late)
    assert [(q.request_id, q.state) for q in expired] == [(two.request_id, RequestState.EXPIRED)]
    assert store.expire_access_requests(now=late + 1) == []
    assert store.get_access_request(two.request_id) == expired[0]
    assert (
        refused(
            lambda: store.decide_access_request(
                two.request_id, approver=BOB, approve=True, comment="", keyring=keyring, now=late
            )
        )[1]
        == "REQUEST_NOT_PENDING"
    )
    # closing a request past its time: it expired, it is not "cancelled"
    three, _, _ = ask(store, keyring, approvals=1, port="5434", now=late)
    closed, _ = store.close_access_request(three.request_id, actor=ALICE, now=late + PENDING_TTL)
    assert closed.state is RequestState.EXPIRED
    assert store.count("grants") == 0 and store.count("request_approvals") == 0
    assert [r.action for r in store.audit_records()].count("request_expire") == 3
    chain_ok(store)


def test_who_may_vote(store: FleetStore, keyring: KeyRing) -> None:
    request, _, _ = ask(store, keyring, BOB, approvals=2)
    rid = request.request_id

    def vote(who: Identity, approve: bool = True) -> Callable[[], object]:
        return lambda: store.decide_access_request(
            rid, approver=who, approve=approve, comment="", keyring=keyring, now=T0 + 1
        )

    before = store.count("audit")
    # the requester is in the approver group, and still may not decide on their own
    assert refused(vote(BOB)) == ("PERMISSION_DENIED", "SELF_APPROVAL", None)
    assert refused(vote(BOB, False))[1] == "SELF_APPROVAL"
    # not in the group; a workflow has no groups; an admin denies but never approves
    assert refused(vote(MALLORY)) == ("PERMISSION_DENIED", "NOT_AN_APPROVER", None)
    assert refused(vote(MALLORY, False))[1] == "NOT_AN_APPROVER"
    assert refused(vote(WORKFLOW))[1] == "NOT_AN_APPROVER"
    assert refused(vote(ADMIN))[1] == "NOT_AN_APPROVER"
    # a different identity with the same subject at another issuer is someone else
    lookalike = Identity(
        kind=IdentityKind.PERSON, issuer="https://other.example", issuer_name="other",
        subject=BOB.subject, groups=("dba",),
    )  # fmt: skip
    store.decide_access_request(
        rid, approver=lookalike, approve=True, comment="", keyring=keyring, now=T0 + 1
    )
    assert refused(vote(lookalike)) == ("FAILED_PRECONDITION", "ALREADY_DECIDED", None)
    assert refused(vote(lookalike, False))[1] == "ALREADY_DECIDED"
    # refusals changed nothing: one vote, one audit record
    assert store.count("request_approvals") == 1
    assert store.count("audit") == before + 1
    denied, none = store.decide_access_request(
        rid, approver=ADMIN, approve=False, comment="break", keyring=keyring, now=T0 + 2
    )
    assert none is None and denied.state is RequestState.DENIED
    assert denied.approvals[-1].approver == ADMIN and not denied.approvals[-1].approve
    assert refused(
        lambda: store.decide_access_request(
            "r-0000000000000000", approver=CAROL, approve=True, comment="", keyring=keyring,
            now=T0,
        )
    ) == ("NOT_FOUND", "REQUEST_NOT_FOUND", "request_id")  # fmt: skip
    assert refused(vote(CAROL))[1] == "REQUEST_NOT_PENDING"
    assert store.count("grants") == 0
    chain_ok(store)


# ------------------------------------------------------------------ closing


def test_closing_requests(store: FleetStore, keyring: KeyRing) -> None:
    pending, _, _ = ask(store, keyring, approvals=1)
    granted, grant, _ = ask(store, keyring, port="5433")
    short, short_grant, _ = ask(store, keyring, port="5434", ttl=60.0)
    assert grant is not None and short_grant is not None
    pid, gid, sid = (q.request_id for q in (pending, granted, short))

    assert refused(lambda: store.close_access_request(pid, actor=BOB, now=T0 + 1)) == (
        "PERMISSION_DENIED",
        "NOT_YOURS",
        "request_id",
    )
    cancelled, none = store.close_access_request(pid, actor=ALICE, now=T0 + 1, keyring=keyring)
    assert none is None and (cancelled.state, cancelled.decided_at) == (
        RequestState.CANCELLED,
        T0 + 1,
    )
    assert (
        refused(
            lambda: store.decide_access_request(
                pid, approver=BOB, approve=True, comment="", keyring=keyring, now=T0 + 2
            )
        )[1]
        == "REQUEST_NOT_PENDING"
    )

    generation = store.get_host("db-1").generation  # type: ignore[union-attr]
    closed, revoked = store.close_access_request(gid, actor=ALICE, now=T0 + 2, keyring=keyring)
    assert closed.state is RequestState.CLOSED and revoked is not None
    assert (revoked.grant_id, revoked.state, revoked.revoked_by, revoked.revoke_reason) == (
        grant.grant_id,
        GrantState.REVOKED,
        ALICE.label,
        "closed by requester",
    )
    assert store.get_host("db-1").generation == generation + 1  # type: ignore[union-attr]
    changes = store.changes_since("db-1", generation)
    assert changes is not None and [(c.kind, c.grant_id) for c in changes] == [
        (ChangeKind.REVOCATION, revoked.grant_id)
    ]
    assert [r.action for r in store.audit_records()[-2:]] == ["request_close", "revoke"]

    # closing twice: nothing more happens
    audit_before = store.count("audit")
    assert store.close_access_request(gid, actor=ALICE, now=T0 + 3, keyring=keyring) == (
        closed,
        revoked,
    )
    assert store.close_access_request(pid, actor=ALICE, now=T0 + 3) == (cancelled, None)
    assert store.count("audit") == audit_before

    # a grant that already expired: closed, without a revocation; an admin may close
    generation = store.get_host("db-1").generation  # type: ignore[union-attr]
    late, still = store.close_access_request(sid, actor=ADMIN, now=T0 + 120)
    assert late.state is RequestState.CLOSED and still is not None
    assert still.state is GrantState.ACTIVE and still.state_at(T0 + 120) is GrantState.EXPIRED
    assert store.get_host("db-1").generation == generation  # type: ignore[union-attr]
    close = store.audit_records()[-1]
    assert (close.action, close.actor, close.detail["grant_revoked"]) == (
        "request_close",
        ADMIN.label,
        False,
    )
    assert (
        refused(lambda: store.close_access_request("r-0123456789abcdef", actor=ALICE, now=T0))[1]
        == "REQUEST_NOT_FOUND"
    )
    chain_ok(store)


def test_listing_requests(store: FleetStore, keyring: KeyRing) -> None:
    made = []
    for i in range(5):
        who = ALICE if i % 2 == 0 else WORKFLOW
        request, _, _ = ask(
            store, keyring, who, approvals=1 if i < 4 else 0, host="db-1" if i < 3 else "db-2",
            now=T0 + i,
        )  # fmt: skip
        made.append(request)
    ids = [q.request_id for q in made]
    assert [q.request_id for q in store.list_access_requests()] == ids
    assert [q.request_id for q in store.list_access_requests(host_id="db-2")] == ids[3:]
    assert [q.request_id for q in store.list_access_requests(requester_key=ALICE.key)] == [
        ids[0],
        ids[2],
        ids[4],
    ]
    pending = store.list_access_requests(state=RequestState.PENDING, approvers_in=["dba", "x"])
    assert [q.request_id for q in pending] == ids[:4]
    assert store.list_access_requests(approvers_in=["dev"]) == []
    assert store.list_access_requests(approvers_in=[]) == []
    assert store.list_access_requests(approvers_in=["g" * 600]) == []  # no rule names it
    page1 = store.list_access_requests(limit=2)
    page2 = store.list_access_requests(limit=2, after=page1[-1].request_id)
    page3 = store.list_access_requests(limit=2, after=page2[-1].request_id)
    assert [q.request_id for q in page1 + page2 + page3] == ids
    assert store.list_access_requests(after="r-0123456789abcdef") == []  # unknown: no restart
    assert store.get_access_request("nonsense") is None
    assert refused(lambda: store.list_access_requests(after="bad"))[2] == "request_id"


# ------------------------------------------------------------------ damaged rows


def test_a_damaged_identity_is_a_store_error(
    store: FleetStore, keyring: KeyRing, raw: Engine
) -> None:
    request, grant, _ = ask(store, keyring)
    rid = request.request_id
    assert grant is not None
    with raw.begin() as conn:
        conn.execute(text('UPDATE grants SET identity = \'{"kind": "robot"}\''))
        conn.execute(text("UPDATE access_requests SET requester = :j"), {"j": '{"kind": "person"}'})
    with pytest.raises(StoreError, match=rf"grants row '{grant.grant_id}': column identity"):
        store.get_grant(grant.grant_id)
    with pytest.raises(StoreError, match=rf"access_requests row '{rid}': column requester"):
        store.get_access_request(rid)
    with raw.begin() as conn:
        conn.execute(
            text("UPDATE access_requests SET requester = :j"),
            {"j": '{"kind": "person", "issuer": "x", "issuer_name": "y", "subject": "z"}'},
        )
    # a well-formed identity that is not the row's requester key
    with pytest.raises(StoreError, match="does not match"):
        store.list_access_requests()


# ------------------------------------------------------------------ concurrency


def test_racing_approvals_make_exactly_one_grant(url: str, keyring: KeyRing) -> None:
    """Threshold 2, three approvers at once from two replicas: one grant, made by the
    transaction that saw the other approval; the late third is told it is over."""
    stores = [FleetStore.open(url, replica="r1"), FleetStore.open(url, replica="r2")]
    try:
        stores[0].add_host("db-1", {}, actor="admin:ops", now=T0)
        for round_ in range(4):
            request, _, _ = ask(stores[0], keyring, approvals=2, port=str(5000 + round_))
            rid = request.request_id
            barrier = threading.Barrier(3, timeout=30)
            results: list[object] = []
            lock = threading.Lock()

            def vote(
                store: FleetStore,
                who: Identity,
                rid: str = rid,
                barrier: threading.Barrier = barrier,
                results: list[object] = results,
                lock: threading.Lock = lock,
            ) -> None:
                barrier.wait()
                try:
                    outcome: object = store.decide_access_request(
                        rid, approver=who, approve=True, comment="", keyring=keyring, now=T0 + 1
                    )[1]
                except (FleetError, StoreError) as exc:
                    outcome = exc
                with lock:
                    results.append(outcome)

            threads = [
                threading.Thread(target=vote, args=(stores[i % 2], who))
                for i, who in enumerate((BOB, CAROL, DAVE))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert len(results) == 3
            grants = [r for r in results if r is not None and not isinstance(r, Exception)]
            errors = [r for r in results if isinstance(r, Exception)]
            assert len(grants) == 1, results
            # the other two: one counted (no grant yet) and one too late, in either order
            assert sum(r is None for r in results) + len(errors) == 2
            assert all(
                isinstance(e, FleetError) and e.reason == "REQUEST_NOT_PENDING" for e in errors
            ), errors
            done = stores[1].get_access_request(rid)
            assert done is not None and done.state is RequestState.GRANTED
            assert isinstance(grants[0], BrokerGrant) and done.grant_id == grants[0].grant_id
            assert done.approved_count == 2
        assert stores[0].count("grants") == 4
        assert stores[0].get_host("db-1").generation == 4  # type: ignore[union-attr]
        chain_ok(stores[0])
    finally:
        for s in stores:
            s.close()


def test_the_grant_limit_holds_under_concurrent_requests(url: str, keyring: KeyRing) -> None:
    """One identity asking for 8 grants on 4 hosts at once through two replicas, its
    rule allowing 3: exactly 3 are granted, the others refused TOO_MANY_GRANTS."""
    stores = [FleetStore.open(url, replica="r1"), FleetStore.open(url, replica="r2")]
    try:
        for h in range(4):
            stores[0].add_host(f"h{h}", {}, actor="admin:ops", now=T0)
        barrier = threading.Barrier(8, timeout=30)
        results: list[object] = []
        lock = threading.Lock()

        def create(i: int) -> None:
            barrier.wait()
            try:
                outcome: object = ask(
                    stores[i % 2], keyring, WORKFLOW, max_grants=3, host=f"h{i % 4}",
                    port=str(1000 + i),
                )[1]  # fmt: skip
            except (FleetError, StoreError) as exc:
                outcome = exc
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(results) == 8
        refusals = [r for r in results if isinstance(r, Exception)]
        assert all(isinstance(r, FleetError) and r.reason == "TOO_MANY_GRANTS" for r in refusals)
        assert len(refusals) == 5, results
        assert stores[1].count_active_grants(WORKFLOW.key, now=T0) == 3
        assert stores[1].count("grants") == 3 and stores[1].count("access_requests") == 3
        chain_ok(stores[0])
    finally:
        for s in stores:
            s.close()


# ------------------------------------------------------------------ migration


def test_a_database_at_0002_is_upgraded_with_its_grants(
    url: str, raw: Engine, keyring: KeyRing
) -> None:
    from alembic import command

    from portagent.broker.fleet.store import _migrations_config

    with raw.connect() as conn:
        command.upgrade(_migrations_config(conn), "0002")
        conn.commit()
    # a grant made by the 0002 broker, through the 0002 schema
    with raw.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO hosts (host_id, broker_labels, agent_labels, agent_version,"
                " trusted_key_ids, generation, acked_generation, replica, created_at)"
                " VALUES ('old1', '{}', '{}', '', '[]', 1, 1, '', 1)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO grants (grant_id, host_id, subject, sources, protocol, port_first,"
                " port_last, not_before, expire_time, issue_time, reason, key_id, grant_bytes,"
                " signature, state, created_by, generation, usage_connections, usage_packets,"
                " usage_bytes) VALUES ('g-old', 'old1', 'alice', '[\"10.0.0.1/32\"]', 'tcp',"
                " 22, 22, 1, :exp, 1, 'old', 'k1', :b, :b, 'active', 'admin:a', 1, 0, 0, 0)"
            ),
            {"exp": T0 + 3600, "b": b"x"},
        )
    store = FleetStore.open(url)
    try:
        old = store.get_grant("g-old")
        assert old is not None and (old.identity, old.access_request_id) == (None, None)
        assert old.subject == "alice" and store.get_host("old1").generation == 1  # type: ignore[union-attr]
        assert store.count_active_grants(ALICE.key, now=T0) == 0  # not counted: no identity
        request, grant, _ = ask(store, keyring, host="old1")
        assert grant is not None and grant.generation == 2
        assert store.get_access_request(request.request_id) == request
    finally:
        store.close()
    with raw.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0003"


def test_approvals_cannot_take_an_identity_past_its_grant_limit(
    store: FleetStore, keyring: KeyRing
) -> None:
    """Pending requests are not counted when made; the last approval counts again."""
    first, _, _ = ask(store, keyring, ALICE, approvals=1, max_grants=1, port="5432")
    second, _, _ = ask(store, keyring, ALICE, approvals=1, max_grants=1, port="5433")
    done, grant = store.decide_access_request(
        first.request_id, approver=BOB, approve=True, comment="", keyring=keyring, now=T0 + 1
    )
    assert grant is not None and done.state is RequestState.GRANTED
    with pytest.raises(FleetError) as refused:
        store.decide_access_request(
            second.request_id, approver=BOB, approve=True, comment="", keyring=keyring, now=T0 + 2
        )
    assert refused.value.reason == "TOO_MANY_GRANTS"
    # The vote was not recorded; the request waits for the first grant to end.
    still = store.get_access_request(second.request_id)
    assert still is not None and still.state is RequestState.PENDING and not still.approvals
    assert store.count_active_grants(ALICE.key, now=T0 + 2) == 1
