"""The Cedar policy engine (portagent.broker.policy.cedar) with the real cedarpy.

Every test parses real policy text, validates it against the shipped schema and asks
real Cedar; nothing here is stubbed.
"""

from __future__ import annotations

import calendar
import ipaddress
import math
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portagent.broker.identity.model import Identity, IdentityKind, admin_identity
from portagent.broker.policy.cedar import (
    PLACEHOLDER_SOURCE,
    Policy,
    decision_json,
    explanation_json,
    explanation_text,
    query_from_json,
)
from portagent.broker.policy.model import AccessQuery, PolicyError
from portagent.wire.ports import parse_port_spec

ROOT = Path(__file__).resolve().parents[2]

# Wednesday 2026-11-25 10:00 UTC, and Saturday 2026-11-28 10:00 UTC.
WEDNESDAY_10 = float(calendar.timegm((2026, 11, 25, 10, 0, 0)))
SATURDAY_10 = float(calendar.timegm((2026, 11, 28, 10, 0, 0)))
WEDNESDAY_22 = float(calendar.timegm((2026, 11, 25, 22, 0, 0)))

ALICE = Identity(
    kind=IdentityKind.PERSON,
    issuer="https://sso.example.com",
    issuer_name="corp",
    subject="alice",
    claims={"sub": "alice", "email": "alice@example.com", "groups": ("oncall", "eng")},
    groups=("oncall", "eng"),
    email="alice@example.com",
)
BOB = Identity(
    kind=IdentityKind.PERSON,
    issuer="https://sso.example.com",
    issuer_name="corp",
    subject="bob",
    claims={"sub": "bob", "email": "bob@example.com"},
    groups=("eng",),
    email="bob@example.com",
)
GITHUB_PROD = Identity(
    kind=IdentityKind.GITHUB,
    issuer="https://token.actions.githubusercontent.com",
    issuer_name="github",
    subject="repo:octo/app:environment:prod",
    claims={
        "sub": "repo:octo/app:environment:prod",
        "repository": "octo/app",
        "repository_owner": "octo",
        "ref": "refs/heads/main",
        "environment": "prod",
        "workflow": "deploy",
        "job_workflow_ref": "octo/app/.github/workflows/deploy.yml@refs/heads/main",
        "actor": "octocat",
        "run_id": "4242",
    },
)
BUILDKITE_MAIN = Identity(
    kind=IdentityKind.BUILDKITE,
    issuer="https://agent.buildkite.com",
    issuer_name="buildkite",
    subject="organization:acme:pipeline:deploy:ref:refs/heads/main:commit:abc:step:",
    claims={
        "sub": "organization:acme:pipeline:deploy:ref:refs/heads/main:commit:abc:step:",
        "organization_slug": "acme",
        "pipeline_slug": "deploy",
        "build_branch": "main",
        "build_number": 77,
        "job_id": "0190-abc",
    },
)

DB_LABELS = {"role": "db", "env": "prod"}


def query(
    identity: Identity = ALICE,
    *,
    host: str = "db-1",
    labels: dict[str, str] | None = None,
    port: str = "5432/tcp",
    ttl: float = 900,
    sources: tuple[str, ...] | None = None,
    active: int = 0,
    now: float = WEDNESDAY_10,
) -> AccessQuery:
    nets = tuple(ipaddress.ip_network(s) for s in (sources or (PLACEHOLDER_SOURCE,)))
    return AccessQuery(
        identity=identity,
        host_id=host,
        host_labels=DB_LABELS if labels is None else labels,
        port=parse_port_spec(port),
        ttl=ttl,
        sources=nets,
        source_is_requester=sources is None,
        active_grants=active,
        reason="INC-1",
        now=now,
    )


def problems_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        Policy.parse(text, source="test.cedar")
    return caught.value.problems


# ------------------------------------------------------------------- deciding


def test_allow_with_the_rules_limits() -> None:
    policy = Policy.parse(
        """
        @id("oncall-db") @max_ttl("30m")
        permit(principal in Group::"oncall", action == Action::"request", resource)
        when { resource.labels.contains("role=db") };
        """
    )
    decision = policy.decide(query())
    assert decision.allowed
    assert decision.rule == "oncall-db"
    assert decision.reason == ""
    assert decision.limits is not None and decision.limits.max_ttl == 1800
    assert decision.approvals == 0
    assert decision.matched == ("oncall-db",)
    assert decision_json(decision)["limits"]["max_ttl"] == 1800


def test_deny_by_default() -> None:
    policy = Policy.parse(
        'permit(principal in Group::"oncall", action, resource) '
        'when { resource.labels.contains("role=db") };'
    )
    decision = policy.decide(query(BOB))
    assert not decision.allowed
    assert decision.reason == "POLICY_DENIED"
    assert decision.rule == ""
    assert "denied by default" in decision.message
    assert "corp:bob@example.com" in decision.message
    # An empty policy denies everything.
    assert not Policy.parse("// nothing yet\n").decide(query()).allowed


def test_forbid_overrides_permit() -> None:
    policy = Policy.parse(
        """
        @id("oncall") permit(principal in Group::"oncall", action, resource);
        @id("no-weekends") forbid(principal, action, resource)
        when { context.weekday >= 5 };
        """
    )
    assert policy.decide(query(now=WEDNESDAY_10)).allowed
    decision = policy.decide(query(now=SATURDAY_10))
    assert not decision.allowed
    assert decision.reason == "POLICY_DENIED"
    assert decision.rule == "no-weekends"
    assert decision.forbids == ("no-weekends",)
    assert "forbidden by rule no-weekends" in decision.message


def test_ttl_too_long() -> None:
    policy = Policy.parse('@id("short") @max_ttl("15m") permit(principal, action, resource);')
    assert policy.decide(query(ttl=900)).allowed
    decision = policy.decide(query(ttl=7200))
    assert not decision.allowed
    assert decision.reason == "TTL_TOO_LONG"
    assert decision.rule == "short"
    assert "ttl 7200s over @max_ttl 15m" in decision.message


def test_default_max_ttl_is_an_hour() -> None:
    policy = Policy.parse("permit(principal, action, resource);")
    assert policy.decide(query(ttl=3600)).allowed
    assert policy.decide(query(ttl=3601)).reason == "TTL_TOO_LONG"


def test_explicit_sources_need_the_annotation() -> None:
    policy = Policy.parse('@id("mine") permit(principal, action, resource);')
    assert policy.decide(query()).allowed  # the requester's own address
    decision = policy.decide(query(sources=("10.0.0.0/24",)))
    assert not decision.allowed
    assert decision.reason == "SOURCES_NOT_ALLOWED"
    assert decision.rule == "mine"
    explicit = Policy.parse('@sources("explicit") permit(principal, action, resource);')
    assert explicit.decide(query(sources=("10.0.0.0/24",))).allowed
    # ... and the policy can look at the sources themselves.
    narrow = Policy.parse(
        '@sources("explicit") permit(principal, action, resource) '
        'when { context.source_is_requester || context.sources.containsAll(["10.0.0.0/24"]) };'
    )
    assert narrow.decide(query(sources=("10.0.0.0/24",))).allowed
    assert not narrow.decide(query(sources=("10.9.0.0/24",))).allowed


def test_too_many_grants() -> None:
    policy = Policy.parse('@id("few") @max_grants("2") permit(principal, action, resource);')
    assert policy.decide(query(active=1)).allowed
    decision = policy.decide(query(active=2))
    assert not decision.allowed
    assert decision.reason == "TOO_MANY_GRANTS"
    assert "2 active grants, @max_grants 2" in decision.message
    # default 10
    default = Policy.parse("permit(principal, action, resource);")
    assert default.decide(query(active=9)).allowed
    assert default.decide(query(active=10)).reason == "TOO_MANY_GRANTS"


def test_first_matching_rule_names_the_refusal() -> None:
    policy = Policy.parse(
        """
        @id("a") @max_ttl("10m") permit(principal, action, resource);
        @id("b") @max_grants("1") permit(principal, action, resource);
        """
    )
    decision = policy.decide(query(ttl=1200, active=1))
    assert decision.reason == "TTL_TOO_LONG"
    assert decision.rule == "a"
    assert "rule a: ttl 1200s" in decision.message
    assert "rule b: 1 active grants" in decision.message


def test_fewest_approvals_is_chosen_first_in_file_on_a_tie() -> None:
    policy = Policy.parse(
        """
        @id("two") @approvals("2") @approvers("dba") permit(principal, action, resource);
        @id("one-a") @approvals("1") @approvers("dba") permit(principal, action, resource);
        @id("one-b") @approvals("1") @approvers("sre") permit(principal, action, resource);
        @id("none-short") @max_ttl("5m") permit(principal, action, resource);
        """
    )
    decision = policy.decide(query(ttl=900))  # none-short does not fit its TTL
    assert decision.allowed
    assert decision.rule == "one-a"
    assert decision.approvals == 1
    assert decision.limits is not None and decision.limits.approvers == "dba"
    assert "needs 1 approval from group dba" in decision.message
    assert decision.matched == ("two", "one-a", "one-b", "none-short")
    assert policy.decide(query(ttl=120)).rule == "none-short"  # no approval needed


def test_labels_select_hosts() -> None:
    policy = Policy.parse(
        'permit(principal, action, resource) when { resource.labels.contains("role=db") '
        '&& resource.labels.contains("env=prod") };'
    )
    assert policy.decide(query(labels={"role": "db", "env": "prod"})).allowed
    assert not policy.decide(query(labels={"role": "db", "env": "staging"})).allowed
    assert not policy.decide(query(labels={})).allowed


def test_hosts_and_port_ranges() -> None:
    policy = Policy.parse(
        """
        permit(principal, action, resource in Host::"web-1")
        when { resource.protocol == "tcp" && resource.port >= 8000 && resource.port_last <= 8010 };
        """
    )
    assert policy.decide(query(host="web-1", port="8000-8010/tcp")).allowed
    assert policy.decide(query(host="web-1", port="8005/tcp")).allowed
    assert not policy.decide(query(host="web-1", port="8000-8011/tcp")).allowed
    assert not policy.decide(query(host="web-1", port="8005/udp")).allowed
    assert not policy.decide(query(host="web-2", port="8005/tcp")).allowed
    # The Target id is "<host>:<first port>/<protocol>".
    exact = Policy.parse('permit(principal, action, resource == Target::"db-1:5432/tcp");')
    assert exact.decide(query()).allowed
    assert not exact.decide(query(port="5433/tcp")).allowed


def test_groups_are_parents_of_a_person() -> None:
    policy = Policy.parse('permit(principal in Group::"oncall", action, resource);')
    assert policy.decide(query(ALICE)).allowed
    assert not policy.decide(query(BOB)).allowed
    by_id = Policy.parse('permit(principal == Person::"corp:bob", action, resource);')
    assert by_id.decide(query(BOB)).allowed
    by_email = Policy.parse(
        "permit(principal is Person, action, resource) when "
        '{ principal.email like "*@example.com" && principal.issuer == "https://sso.example.com" };'
    )
    assert by_email.decide(query(BOB)).allowed


def test_github_workflow() -> None:
    policy = Policy.parse(
        """
        @id("deploy-db")
        permit(principal is GithubWorkflow, action, resource)
        when { principal.repository == "octo/app" && principal.environment == "prod"
               && principal.ref == "refs/heads/main" && resource.labels.contains("role=db") };
        """
    )
    assert policy.decide(query(GITHUB_PROD)).rule == "deploy-db"
    staging = Identity(
        kind=IdentityKind.GITHUB,
        issuer=GITHUB_PROD.issuer,
        issuer_name="github",
        subject="repo:octo/app:environment:staging",
        claims={**GITHUB_PROD.claims, "environment": "staging"},
    )
    assert not policy.decide(query(staging)).allowed
    # A token without most claims still evaluates: absent claims are "".
    bare = Identity(
        kind=IdentityKind.GITHUB,
        issuer=GITHUB_PROD.issuer,
        issuer_name="github",
        subject="repo:octo/app:ref:refs/heads/main",
        claims={"repository": "octo/app"},
    )
    decision = policy.decide(query(bare))
    assert not decision.allowed
    assert decision.reason == "POLICY_DENIED"


def test_buildkite_job() -> None:
    policy = Policy.parse(
        """
        permit(principal is BuildkiteJob, action, resource)
        when { principal.organization_slug == "acme" && principal.pipeline_slug == "deploy"
               && principal.build_branch == "main" && principal.build_number > 10 };
        """
    )
    assert policy.decide(query(BUILDKITE_MAIN)).allowed
    branch = Identity(
        kind=IdentityKind.BUILDKITE,
        issuer=BUILDKITE_MAIN.issuer,
        issuer_name="buildkite",
        subject="x",
        claims={**BUILDKITE_MAIN.claims, "build_branch": "feature"},
    )
    assert not policy.decide(query(branch)).allowed
    as_text = Identity(
        kind=IdentityKind.BUILDKITE,
        issuer=BUILDKITE_MAIN.issuer,
        issuer_name="buildkite",
        subject="y",
        claims={**BUILDKITE_MAIN.claims, "build_number": "77"},
    )
    assert policy.decide(query(as_text)).allowed


def test_admin() -> None:
    policy = Policy.parse('permit(principal == Admin::"admin:ops", action, resource);')
    assert policy.decide(query(admin_identity("ops"))).allowed
    assert policy.decide(query(admin_identity("ops", certificate=True))).allowed
    assert not policy.decide(query(admin_identity("dev"))).allowed
    by_name = Policy.parse(
        'permit(principal is Admin, action, resource) when { principal.name == "dev" };'
    )
    assert by_name.decide(query(admin_identity("dev"))).allowed


def test_context_time_and_reason() -> None:
    policy = Policy.parse(
        """
        permit(principal, action, resource)
        when { context.hour_utc >= 8 && context.hour_utc < 18 && context.reason like "INC-*"
               && context.ttl <= 900 && context.active_grants == 0 };
        """
    )
    assert policy.decide(query(now=WEDNESDAY_10)).allowed
    assert not policy.decide(query(now=WEDNESDAY_22)).allowed
    assert not policy.decide(query(ttl=901)).allowed
    assert not policy.decide(query(active=1)).allowed
    # TTL seconds are rounded up: 900.5 s is not <= 900.
    assert not policy.decide(query(ttl=900.5)).allowed


def test_an_erroring_forbid_denies() -> None:
    # Long overflow is a Cedar evaluation error the validator cannot see.
    policy = Policy.parse(
        """
        @id("all") permit(principal, action, resource);
        @id("overflow") forbid(principal, action, resource)
        when { context.ttl * 9223372036854775807 > 0 };
        """
    )
    decision = policy.decide(query(ttl=900))
    assert not decision.allowed
    assert decision.rule == "overflow"
    assert "could not be evaluated" in decision.message
    explained = {r.rule_id: r for r in policy.explain(query(ttl=900)).rules}
    assert "error" in explained["overflow"].note
    assert "overflow" in explained["overflow"].note


def test_an_erroring_permit_does_not_apply() -> None:
    policy = Policy.parse(
        """
        @id("overflow") permit(principal, action, resource)
        when { context.ttl * 9223372036854775807 > 0 };
        """
    )
    decision = policy.decide(query())
    assert not decision.allowed
    assert decision.reason == "POLICY_DENIED"
    [rule] = policy.explain(query()).rules
    assert not rule.applies
    assert rule.note.startswith("error, does not apply")


# ------------------------------------------------------------------- validation


def test_syntax_error_names_the_line() -> None:
    problems = problems_of(
        "// first\npermit(principal, action, resource);\n\npermit(principal, acton, resource);\n"
    )
    assert len(problems) == 1
    assert problems[0].startswith("test.cedar:4: ")
    assert "acton" in problems[0]
    unterminated = problems_of('permit(principal, action, resource);\n@id("x")\npermit(principal')
    assert unterminated[0].startswith("test.cedar:2: ")


def test_semicolons_in_strings_and_comments_do_not_confuse_lines() -> None:
    problems = problems_of(
        'permit(principal, action, resource) when { context.reason == "a;b // c" };\n'
        "// a comment; with a semicolon\n"
        "permit(principal, action, resource) when { context.tll == 1 };\n"
    )
    assert problems == [
        'test.cedar:3: rule policy1: attribute `tll` in context for Action::"request" not found'
    ]


def test_schema_errors_name_the_rule_and_line() -> None:
    problems = problems_of(
        '@id("gh")\npermit(principal is GithubWorkflow, action, resource)\n'
        'when { principal.repo == "octo/app" };\n'
        '@id("typed")\npermit(principal, action, resource) when { context.ttl == "15m" };\n'
    )
    assert any(p.startswith("test.cedar:1: rule gh: ") and "`repo`" in p for p in problems)
    assert any(p.startswith("test.cedar:4: rule typed: ") for p in problems)
    unknown_type = problems_of('permit(principal in Team::"x", action, resource);')
    assert "Team" in unknown_type[0]


def test_annotation_errors() -> None:
    cases = {
        '@foo("x") permit(principal, action, resource);': "unknown annotation @foo",
        '@approvals("1") permit(principal, action, resource);': 'needs @approvers("GROUP")',
        '@approvals("11") @approvers("g") permit(principal, action, resource);': "0 to 10",
        '@approvals("-1") @approvers("g") permit(principal, action, resource);': "0 to 10",
        '@approvers("dba") permit(principal, action, resource);': "approves nothing",
        '@max_ttl("8d") permit(principal, action, resource);': "at most 7d",
        '@max_ttl("0s") permit(principal, action, resource);': "longer than 0s",
        '@max_ttl("soon") permit(principal, action, resource);': "not a duration",
        '@sources("anywhere") permit(principal, action, resource);': '"requester" or "explicit"',
        '@max_grants("0") permit(principal, action, resource);': "1 to 1000",
        "@max_ttl permit(principal, action, resource);": "max_ttl",
        '@id("bad id!") permit(principal, action, resource);': "1-64 of",
        '@id("f") @max_ttl("1h") forbid(principal, action, resource);': "rule f: @max_ttl has no",
    }
    for text, wanted in cases.items():
        problems = problems_of(text)
        assert any(wanted in p for p in problems), (text, problems)
        assert all(p.startswith("test.cedar:1: rule ") for p in problems), problems


def test_duplicate_ids() -> None:
    problems = problems_of(
        '@id("a") permit(principal, action, resource);\n'
        '@id("a") forbid(principal, action, resource);\n'
    )
    assert problems == ["test.cedar:2: rule a: duplicate id (also the rule at line 1)"]
    # An @id may not take another rule's generated id either.
    clash = problems_of(
        'permit(principal, action, resource);\n@id("policy0") permit(principal, action, resource);'
    )
    assert "duplicate id" in clash[0]


def test_every_problem_is_listed() -> None:
    problems = problems_of(
        '@foo("1") permit(principal, action, resource);\n'
        '@approvals("2") permit(principal, action, resource);\n'
        "permit(principal, action, resource) when { context.nope };\n"
    )
    assert len(problems) == 3
    assert sorted(p.split(":")[1] for p in problems) == ["1", "2", "3"]


def test_templates_are_refused() -> None:
    problems = problems_of("permit(principal == ?principal, action, resource);")
    assert any("templates" in p for p in problems)


def test_load(tmp_path: Path) -> None:
    good = tmp_path / "policy.cedar"
    good.write_text('@id("x") permit(principal, action, resource);\n', encoding="utf-8")
    policy = Policy.load(good)
    assert policy.source == str(good)
    assert re.fullmatch(r"[0-9a-f]{64}", policy.digest)
    assert policy.rule_ids == ("x",)
    assert Policy.parse(good.read_text()).digest == policy.digest
    big = tmp_path / "big.cedar"
    big.write_bytes(b"//" + b"x" * (1024 * 1024) + b"\n")
    with pytest.raises(PolicyError, match=r"big\.cedar: larger than"):
        Policy.load(big)
    latin = tmp_path / "latin.cedar"
    latin.write_bytes(b"// caf\xe9\npermit(principal, action, resource);\n")
    with pytest.raises(PolicyError, match=r"latin\.cedar: not UTF-8"):
        Policy.load(latin)
    with pytest.raises(PolicyError, match=r"missing\.cedar: cannot read"):
        Policy.load(tmp_path / "missing.cedar")
    bad = tmp_path / "bad.cedar"
    bad.write_text("permit(principal, action, resource) when { context.tll };\n")
    with pytest.raises(PolicyError, match=re.escape(f"{bad}:1: rule policy0:")):
        Policy.load(bad)


def test_packaged_example_policy_validates() -> None:
    policy = Policy.load(ROOT / "packaging" / "policy.cedar")
    assert policy.rule_ids == (
        "github-prod-db",
        "buildkite-deploy-main",
        "oncall-db",
        "sre-office-monitoring",
        "office-hours",
    )
    example_prod = Identity(
        kind=IdentityKind.GITHUB,
        issuer=GITHUB_PROD.issuer,
        issuer_name="github",
        subject="repo:example-org/example-app:environment:prod",
        claims={"repository": "example-org/example-app", "environment": "prod"},
    )
    weekday = policy.decide(query(example_prod, now=WEDNESDAY_10))
    assert weekday.allowed and weekday.rule == "github-prod-db"
    # Its forbid rule refuses requests outside office hours, except by people on call.
    assert policy.decide(query(example_prod, now=SATURDAY_10)).rule == "office-hours"
    assert policy.decide(query(example_prod, now=WEDNESDAY_22)).rule == "office-hours"
    oncall = policy.decide(query(ALICE, now=SATURDAY_10))
    assert oncall.allowed and oncall.rule == "oncall-db" and oncall.approvals == 1
    # The names of the examples match nothing real: octo/app gets nothing.
    assert not policy.decide(query(GITHUB_PROD, now=WEDNESDAY_10)).allowed


def test_docs_examples_validate() -> None:
    """Every ```cedar block of docs/policy.md is a valid policy."""
    text = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```cedar\n(.*?)```", text, re.DOTALL)
    assert blocks
    for block in blocks:
        Policy.parse(block, source="docs/policy.md")


# ------------------------------------------------------------------- explain

EXPLAINED = """\
@id("oncall-db") @max_ttl("15m") @approvals("1") @approvers("dba")
permit(principal in Group::"oncall", action == Action::"request", resource)
when { resource.labels.contains("role=db") };

@id("gh-deploy")
permit(principal is GithubWorkflow, action, resource in Host::"db-1");

@id("weekends")
forbid(principal, action, resource)
when { context.weekday >= 5 };

@id("db-only")
permit(principal, action, resource) unless { resource.labels.contains("role=db") };
"""


def test_explain_says_why_for_every_rule() -> None:
    policy = Policy.parse(EXPLAINED, source="explain.cedar")
    explanation = policy.explain(query(ALICE, ttl=7200))
    assert not explanation.decision.allowed
    assert explanation.decision.reason == "TTL_TOO_LONG"
    rules = {r.rule_id: r for r in explanation.rules}
    assert [r.rule_id for r in explanation.rules] == [
        "oncall-db",
        "gh-deploy",
        "weekends",
        "db-only",
    ]
    assert rules["oncall-db"].applies
    assert rules["oncall-db"].note == "applies, but ttl 7200s over @max_ttl 15m"
    assert rules["oncall-db"].line == 1
    assert not rules["gh-deploy"].applies
    assert rules["gh-deploy"].note == (
        'scope: principal Person::"corp:alice" does not match `principal is GithubWorkflow`'
    )
    assert rules["weekends"].note.startswith("when #1 {")
    assert rules["weekends"].note.endswith("is false")
    assert rules["weekends"].line == 8
    assert rules["db-only"].note.startswith("unless #1 {")
    assert rules["db-only"].note.endswith("is true")
    assert explanation.context["ttl"] == 7200
    assert explanation.context["weekday"] == 2
    assert explanation.entities[0]["uid"] == {"type": "Person", "id": "corp:alice"}

    ok = policy.explain(query(ALICE, ttl=600))
    assert ok.decision.allowed and ok.decision.rule == "oncall-db"
    assert {r.rule_id: r for r in ok.rules}["oncall-db"].note.endswith(": chosen")

    text = explanation_text(explanation)
    assert text.splitlines()[0] == "DENIED (TTL_TOO_LONG) by rule oncall-db"
    assert "oncall-db" in text and "line 8" in text
    assert 'in Group::"eng", Group::"oncall"' in text

    as_json = explanation_json(explanation)
    assert as_json["decision"]["reason"] == "TTL_TOO_LONG"
    assert as_json["rules"][0] == {
        "rule": "oncall-db",
        "effect": "permit",
        "line": 1,
        "applies": True,
        "note": "applies, but ttl 7200s over @max_ttl 15m",
    }


def test_explain_a_forbid_and_a_resource_scope() -> None:
    policy = Policy.parse(EXPLAINED)
    weekend = policy.explain(query(GITHUB_PROD, host="db-2", now=SATURDAY_10))
    rules = {r.rule_id: r for r in weekend.rules}
    assert rules["weekends"].applies and rules["weekends"].note == "applies: forbids this request"
    assert rules["gh-deploy"].note == (
        'scope: resource Target::"db-2:5432/tcp" does not match `resource in Host::"db-1"`'
    )
    forbidden = policy.explain(query(GITHUB_PROD, now=SATURDAY_10))
    assert forbidden.decision.forbids == ("weekends",)
    gh = {r.rule_id: r for r in forbidden.rules}["gh-deploy"]
    assert gh.applies and "forbidden by weekends" in gh.note


# --------------------------------------------------------- queries from JSON


def test_query_from_json() -> None:
    obj: dict[str, Any] = {
        "identity": ALICE.to_json(),
        "host": "db-1",
        "labels": {"role": "db"},
        "port": "5432/tcp",
        "ttl": "15m",
        "active_grants": 2,
        "reason": "INC-1",
    }
    q = query_from_json(obj, now=WEDNESDAY_10)
    assert q.identity == ALICE
    assert q.ttl == 900
    assert q.source_is_requester and [str(s) for s in q.sources] == ["192.0.2.1/32"]
    assert q.active_grants == 2 and q.now == WEDNESDAY_10
    q2 = query_from_json({**obj, "ttl": 60, "sources": ["10.0.0.0/24"]}, now=WEDNESDAY_10)
    assert q2.ttl == 60 and not q2.source_is_requester
    q3 = query_from_json({**obj, "port": 5432, "protocol": "udp"}, now=WEDNESDAY_10)
    assert str(q3.port) == "5432/udp"
    gh = query_from_json({**obj, "identity": GITHUB_PROD.to_json()}, now=WEDNESDAY_10)
    assert gh.identity == GITHUB_PROD


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"identity": None}, "identity"),
        ({"identity": {**ALICE.to_json(), "kind": "robot"}}, "identity.kind"),
        ({"identity": {**ALICE.to_json(), "subject": ""}}, "identity.subject"),
        (
            {"identity": {**ALICE.to_json(), "claims": {"repository": "x"}}},
            "identity.claims.repository",
        ),
        ({"identity": {**ALICE.to_json(), "groups": ["g"] * 65}}, "identity.groups"),
        ({"identity": {**ALICE.to_json(), "nickname": "al"}}, "identity.nickname"),
        ({"host": "db 1"}, "host"),
        ({"host": None}, "host"),
        ({"labels": {"Role": "db"}}, "labels"),
        ({"labels": {"role": "x" * 300}}, "labels.role"),
        ({"port": "99999/tcp"}, "port"),
        ({"port": "5432/sctp"}, "port"),
        ({"port": "5432/tcp", "protocol": "udp"}, "protocol"),
        ({"ttl": "soon"}, "ttl"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"sources": []}, "sources"),
        ({"sources": ["10.0.0.0/8 "]}, "sources"),
        ({"sources": ["x"] * 65}, "sources"),
        ({"active_grants": -1}, "active_grants"),
        ({"active_grants": "1"}, "active_grants"),
        ({"reason": "x" * 257}, "reason"),
        ({"colour": "blue"}, "'colour'"),
    ],
)
def test_query_from_json_refuses(change: dict[str, Any], field: str) -> None:
    obj: dict[str, Any] = {
        "identity": ALICE.to_json(),
        "host": "db-1",
        "port": "5432/tcp",
        "ttl": 900,
        **change,
    }
    with pytest.raises(ValueError) as caught:
        query_from_json(obj, now=WEDNESDAY_10)
    assert str(caught.value).startswith(field), str(caught.value)


# ------------------------------------------------------------ robustness


def test_decide_from_many_threads() -> None:
    policy = Policy.parse(EXPLAINED)
    queries = [query(ALICE, ttl=600), query(BOB), query(GITHUB_PROD), query(ALICE, ttl=7200)]
    expected = [policy.decide(q) for q in queries]
    failures: list[str] = []

    def worker() -> None:
        for _ in range(50):
            for q, want in zip(queries, expected, strict=True):
                if policy.decide(q) != want:
                    failures.append(q.identity.label)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


_CLAIM_TEXT = st.text(max_size=40)  # any code points, lone surrogates included
_PROPERTY_POLICY = Policy.parse(
    EXPLAINED
    + """
permit(principal is GithubWorkflow, action, resource)
when { principal.repository like "octo/*" && principal.run_id != "" };
permit(principal is BuildkiteJob, action, resource) when { principal.build_number > 5 };
"""
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from([k for k in IdentityKind]),
    issuer_name=st.text(min_size=1, max_size=20),
    subject=st.text(min_size=1, max_size=40),
    claims=st.dictionaries(
        st.sampled_from(
            [
                "repository",
                "ref",
                "environment",
                "run_id",
                "pipeline_slug",
                "build_number",
                "email",
                "actor",
                "job_id",
                "unknown",
            ]
        ),
        st.one_of(_CLAIM_TEXT, st.integers(), st.tuples(_CLAIM_TEXT)),
        max_size=6,
    ),
    groups=st.lists(_CLAIM_TEXT, max_size=4),
    labels=st.dictionaries(_CLAIM_TEXT, _CLAIM_TEXT, max_size=5),
    host=st.text(min_size=1, max_size=30),
    ttl=st.floats(allow_nan=True, allow_infinity=True),
    active=st.integers(),
    now=st.floats(allow_nan=True, allow_infinity=True),
)
def test_decide_never_raises(
    kind: IdentityKind,
    issuer_name: str,
    subject: str,
    claims: dict[str, Any],
    groups: list[str],
    labels: dict[str, str],
    host: str,
    ttl: float,
    active: int,
    now: float,
) -> None:
    identity = Identity(
        kind=kind,
        issuer="https://issuer.example",
        issuer_name=issuer_name,
        subject=subject,
        claims=claims,
        groups=tuple(groups),
        email=str(claims.get("email", "")),
    )
    q = AccessQuery(
        identity=identity,
        host_id=host,
        host_labels=labels,
        port=parse_port_spec("5432/tcp"),
        ttl=ttl,
        sources=(ipaddress.ip_network("10.0.0.0/24"),),
        source_is_requester=True,
        active_grants=active,
        reason=subject,
        now=now,
    )
    decision = _PROPERTY_POLICY.decide(q)
    assert isinstance(decision.allowed, bool)
    if math.isfinite(now) and abs(now) < 1e11:
        # Any text at all is evaluated by Cedar, not refused by the catch-all.
        assert "could not evaluate" not in decision.message, decision.message
    assert decision.allowed == (decision.reason == "")
    explanation = _PROPERTY_POLICY.explain(q)
    assert explanation.decision == decision
    explanation_text(explanation)


def test_explain_quotes_conditions_as_written() -> None:
    policy = Policy.parse(
        '@id("c") permit(principal, action, resource)\n'
        'when { context.reason == "}{ when;" // a comment }\n'
        "  && context.ttl < 10 }\n"
        "unless { context.weekday == 1 };\n"
    )
    [rule] = policy.explain(query()).rules
    assert rule.note == 'when #1 { context.reason == "}{ when;" && context.ttl < 10 } is false'


def test_text_that_is_no_file_is_refused() -> None:
    assert problems_of("permit(principal, action, resource);\x00") == [
        "test.cedar: contains a NUL character"
    ]
    assert problems_of("// \ud800\npermit(principal, action, resource);") == [
        "test.cedar: not valid Unicode text"
    ]
    assert problems_of("// " + "é" * (512 * 1024)) == ["test.cedar: larger than 1048576 bytes"]
