"""OIDC ID tokens to identities: `[[service.issuers]]` parsing and TokenVerifier against
a real local issuer (keys generated here, JWKS over HTTPS on loopback).

Key fetching, rotation and outages are in tests/integration/test_oidc_jwks.py."""

from __future__ import annotations

import base64
import json
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portagent.broker.identity.model import (
    FIRST_CLASS_CLAIMS,
    MAX_GROUPS,
    Identity,
    IdentityError,
    IdentityKind,
)
from portagent.broker.identity.oidc import (
    MAX_TOKEN_BYTES,
    JwksError,
    TokenVerifier,
    looks_like_jwt,
    parse_jwks,
)
from portagent.broker.identity.settings import IssuerSettings, parse_issuers
from portagent.testing.oidc_issuer import TestIssuer, b64url
from portagent.wire.config import Reader

# --- settings ------------------------------------------------------------------------------


def _parse(text: str, base: Path = Path("/etc/pb")) -> tuple[tuple[IssuerSettings, ...], list[str]]:
    doc = tomllib.loads(text)
    problems: list[str] = []
    issuers = parse_issuers(Reader(problems), doc.get("service", {}), base)
    return issuers, problems


FULL = """
[[service.issuers]]
name = "github"
kind = "github"
issuer = "https://token.actions.githubusercontent.com"
audience = "portagent"
algorithms = ["RS256"]
leeway = "30s"
max_lifetime = "1h"

[[service.issuers]]
name = "corp-sso"
kind = "person"
issuer = "https://sso.example.com/realms/corp"
audience = ["portagent", "portagent-cli"]
jwks_file = "sso-jwks.json"
groups_claim = "roles"

[[service.issuers]]
name = "bk"
kind = "buildkite"
issuer = "https://agent.buildkite.com"
audience = "https://buildkite.com/acme"
jwks_uri = "https://agent.buildkite.com/.well-known/jwks"
ca = "/etc/ssl/bk.pem"
"""


def test_parse_issuers_reads_every_setting_and_defaults() -> None:
    issuers, problems = _parse(FULL)
    assert problems == []
    github, sso, bk = issuers
    assert github == IssuerSettings(
        name="github",
        kind=IdentityKind.GITHUB,
        issuer="https://token.actions.githubusercontent.com",
        audiences=("portagent",),
        jwks_uri=None,
        jwks_file=None,
        ca=None,
        algorithms=("RS256",),
        leeway=30.0,
        max_lifetime=3600.0,
        groups_claim="groups",
    )
    assert sso.kind is IdentityKind.PERSON
    assert sso.audiences == ("portagent", "portagent-cli")
    assert sso.jwks_file == Path("/etc/pb/sso-jwks.json")  # relative to the config's folder
    assert sso.groups_claim == "roles"
    assert sso.algorithms == ("RS256", "ES256")  # the default allow-list
    assert sso.leeway == 60.0 and sso.max_lifetime == 86400.0
    assert bk.jwks_uri == "https://agent.buildkite.com/.well-known/jwks"
    assert bk.ca == Path("/etc/ssl/bk.pem")


def test_no_issuers_is_an_empty_tuple() -> None:
    assert _parse("[service]\n") == ((), [])


def _one(**fields: Any) -> str:
    base: dict[str, Any] = {
        "name": "gh",
        "kind": "github",
        "issuer": "https://token.actions.githubusercontent.com",
        "audience": "portagent",
    }
    base.update(fields)
    lines = ["[[service.issuers]]"]
    for key, value in base.items():
        if value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"algorithms": ["none"]}, 'issuers[0].algorithms[0]: "none" is never accepted'),
        ({"algorithms": ["RS256", "HS256"]}, "issuers[0].algorithms[1]: 'HS256' is never accepted"),
        ({"algorithms": ["ES512"]}, "issuers[0].algorithms[0]: 'ES512' is not supported"),
        ({"algorithms": []}, "issuers[0].algorithms: expected a non-empty list"),
        ({"issuer": "http://127.0.0.1:8080"}, "issuers[0].issuer: must be an https:// URL"),
        ({"issuer": "http://localhost"}, "issuers[0].issuer: must be an https:// URL"),
        ({"issuer": "https://"}, "issuers[0].issuer: has no host"),
        ({"issuer": "https://x.example/?a=1"}, "issuers[0].issuer: must not have a ?query"),
        ({"jwks_uri": "http://x.example/jwks"}, "issuers[0].jwks_uri: must be an https:// URL"),
        (
            {"jwks_uri": "https://x.example/jwks", "jwks_file": "k.json"},
            "issuers[0].jwks_file: give either jwks_uri (fetched) or jwks_file (read), not both",
        ),
        ({"jwks_file": "k.json", "ca": "ca.pem"}, "issuers[0].ca: used only for fetching"),
        ({"audience": None}, "issuers[0].audience: required"),
        ({"audience": []}, "issuers[0].audience: expected a string or a non-empty list"),
        ({"audience": ["ok", ""]}, "issuers[0].audience[1]: expected a non-empty string"),
        ({"leeway": "6m"}, "issuers[0].leeway: must be between 0s and 300s"),
        ({"leeway": "soon"}, "issuers[0].leeway: not a duration"),
        ({"max_lifetime": "0s"}, "issuers[0].max_lifetime: must be between 1s"),
        ({"kind": "admin"}, "issuers[0].kind: 'admin' is not one of buildkite, github, person"),
        ({"kind": None}, "issuers[0].kind: required"),
        ({"name": "admin"}, "issuers[0].name: 'admin' is reserved"),
        ({"name": "git:hub"}, "issuers[0].name: 'git:hub' is not 1-32 of"),
        ({"groups_claim": "roles"}, 'issuers[0].groups_claim: only for kind = "person"'),
        ({"audiance": "x"}, 'issuers[0].audiance: unknown setting; did you mean "audience"?'),
        ({"leeway": 30}, "issuers[0].leeway: expected str"),
    ],
)
def test_parse_issuers_names_each_problem(fields: dict[str, Any], expected: str) -> None:
    issuers, problems = _parse(_one(**fields))
    assert any(p.startswith("service.") and expected in p for p in problems), problems
    assert issuers == ()  # an issuer with a problem is never returned


def test_parse_issuers_refuses_duplicates_and_non_tables() -> None:
    text = _one() + _one(name="GH", issuer="https://other.example") + _one(name="b")
    _, problems = _parse(text)
    assert "service.issuers[1].name: 'GH' is already service.issuers[0]'s name" in problems
    assert "service.issuers[2].issuer: already configured as service.issuers[0]" in problems
    _, problems = _parse('[service]\nissuers = "github"\n')
    assert problems == ["service.issuers: expected an array of tables ([[service.issuers]] blocks)"]


# --- the verifier --------------------------------------------------------------------------


def _settings(issuer: TestIssuer, **changes: Any) -> IssuerSettings:
    base = IssuerSettings(
        name="github",
        kind=IdentityKind.GITHUB,
        issuer=issuer.url,
        audiences=("portagent",),
        jwks_uri=None,
        jwks_file=None,
        ca=issuer.ca_path,
        algorithms=("RS256",),
        leeway=60.0,
        max_lifetime=86400.0,
        groups_claim="groups",
    )
    return replace(base, **changes)


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestIssuer]:
    with TestIssuer(tmp_path_factory.mktemp("issuer")) as running:
        yield running


@pytest.fixture(scope="module")
def verifier(issuer: TestIssuer) -> TokenVerifier:
    return TokenVerifier([_settings(issuer)])


def _refused(verifier: TokenVerifier, token: str, reason: str) -> IdentityError:
    with pytest.raises(IdentityError) as caught:
        verifier.verify(token)
    error = caught.value
    assert error.reason == reason, error.message
    # Never the token (nor its signature) in what goes to a caller or a log.
    assert token not in error.message
    if token.count(".") == 2 and len(token.rsplit(".", 1)[1]) > 8:
        assert token.rsplit(".", 1)[1] not in error.message
    return error


def test_looks_like_jwt() -> None:
    assert looks_like_jwt("eyJh.eyJi.c2ln")
    assert looks_like_jwt("eyJh.eyJi.")  # alg none: routed here to be refused as such
    assert not looks_like_jwt("0123abcd" * 6)  # an admin token
    assert not looks_like_jwt("a.b")
    assert not looks_like_jwt("a.b.c.d")
    assert not looks_like_jwt("a=.b.c")  # padding is not base64url in a JWT
    assert not looks_like_jwt(".b.c")
    assert not looks_like_jwt("a.b.c\n")
    assert not looks_like_jwt("a." + "b" * MAX_TOKEN_BYTES + ".c")


def test_github_token_keeps_only_first_class_claims(
    issuer: TestIssuer, verifier: TokenVerifier
) -> None:
    identity = verifier.verify(issuer.github(repository="octo-org/app", run_id="99"))
    assert identity.kind is IdentityKind.GITHUB
    assert identity.issuer == issuer.url and identity.issuer_name == "github"
    assert identity.subject == "repo:octo-org/app:environment:prod"
    assert identity.label == "github:repo:octo-org/app:environment:prod"
    assert dict(identity.claims) == {
        "sub": "repo:octo-org/app:environment:prod",
        "repository": "octo-org/app",
        "repository_owner": "octo-org",
        "ref": "refs/heads/main",
        "environment": "prod",
        "workflow": "deploy",
        "job_workflow_ref": "octo-org/app/.github/workflows/deploy.yml@refs/heads/main",
        "actor": "octocat",
        "run_id": "99",
    }
    assert identity.groups == () and identity.email == ""
    # A first-class claim the token lacks stays absent (no environment → no claim).
    bare = verifier.verify(issuer.github(environment=""))
    assert "environment" not in bare.claims
    assert bare.subject == "repo:octo-org/app:ref:refs/heads/main"
    assert Identity.from_json(identity.to_json()) == identity


def test_buildkite_token(issuer: TestIssuer) -> None:
    verifier = TokenVerifier([_settings(issuer, name="bk", kind=IdentityKind.BUILDKITE)])
    identity = verifier.verify(issuer.buildkite(pipeline_slug="deploy", build_number=17))
    assert identity.kind is IdentityKind.BUILDKITE
    assert set(identity.claims) == set(FIRST_CLASS_CLAIMS[IdentityKind.BUILDKITE])
    assert identity.claims["build_number"] == 17
    assert identity.claims["organization_slug"] == "acme"
    assert identity.label.startswith("bk:organization:acme:pipeline:deploy:ref:refs/heads/main")
    _refused(verifier, issuer.buildkite(build_number="17"), "TOKEN_CLAIMS")  # type: ignore[arg-type]
    _refused(verifier, issuer.buildkite(build_number=True), "TOKEN_CLAIMS")
    _refused(verifier, issuer.buildkite(build_number=-1), "TOKEN_CLAIMS")


def test_person_token_email_and_groups(issuer: TestIssuer) -> None:
    sso = _settings(issuer, name="corp-sso", kind=IdentityKind.PERSON, groups_claim="roles")
    verifier = TokenVerifier([sso])
    token = issuer.person(
        "u-1234", email="alice@example.com", roles=["dba", "ops", "dba"], groups=["ignored"]
    )
    identity = verifier.verify(token)
    assert identity.kind is IdentityKind.PERSON
    assert identity.email == "alice@example.com"
    assert identity.groups == ("dba", "ops")  # from groups_claim, de-duplicated
    assert identity.label == "corp-sso:alice@example.com"
    assert dict(identity.claims) == {
        "sub": "u-1234",
        "email": "alice@example.com",
        "groups": ("dba", "ops"),
    }
    # An address the provider has not verified is dropped: the label falls back to sub.
    unverified = verifier.verify(
        issuer.person("u-9", email="bob@example.com", email_verified=False)
    )
    assert unverified.email == "" and "email" not in unverified.claims
    assert unverified.label == "corp-sso:u-9"
    # email is a person's only: a GitHub token's email claim is dropped.
    github = TokenVerifier([_settings(issuer)]).verify(issuer.github(email="x@example.com"))
    assert github.email == "" and "email" not in github.claims
    _refused(verifier, issuer.person("u-1", roles="dba"), "TOKEN_CLAIMS")
    _refused(verifier, issuer.person("u-1", roles=[1]), "TOKEN_CLAIMS")
    too_many = [f"g{i}" for i in range(MAX_GROUPS + 1)]
    error = _refused(verifier, issuer.person("u-1", roles=too_many), "TOKEN_CLAIMS")
    assert "more than 64 groups" in error.message


@pytest.mark.parametrize(
    ("overrides", "what"),
    [
        ({"run_id": 4242}, "run_id claim is not a string"),
        ({"repository": ["a"]}, "repository claim is not a string"),
        ({"actor": "x" * 513}, "actor claim must be printable, at most 512"),
        ({"ref": "refs/heads/\x00main"}, "ref claim must be printable"),
        ({"sub": ""}, "sub claim must be non-empty"),
        ({"sub": 7}, "sub claim is not a string"),
        ({"exp": "9999999999"}, "exp is not a number"),
        ({"iat": [1]}, "iat is not a number"),
        ({"nbf": True}, "nbf is not a number"),
    ],
)
def test_wrong_claim_types_are_refused(
    issuer: TestIssuer, verifier: TokenVerifier, overrides: dict[str, Any], what: str
) -> None:
    token = issuer.mint(issuer.github_claims_for(**overrides))
    error = _refused(verifier, token, "TOKEN_CLAIMS")
    assert what in error.message


@pytest.mark.parametrize("claim", ["sub", "exp", "iat", "aud"])
def test_required_claims(issuer: TestIssuer, verifier: TokenVerifier, claim: str) -> None:
    token = issuer.mint(issuer.github_claims_for(), omit=[claim])
    error = _refused(verifier, token, "TOKEN_CLAIMS")
    assert repr(claim) in error.message


def test_times_against_the_verifiers_clock(issuer: TestIssuer) -> None:
    now = 2_000_000_000.0
    verifier = TokenVerifier([_settings(issuer, max_lifetime=3600.0)], clock=lambda: now)
    ok = issuer.github(iat=now - 100, lifetime=300)
    assert verifier.verify(ok).subject
    # exp is 59 s past, inside the 60 s leeway; then 61 s past.
    assert verifier.verify(issuer.github(iat=now - 359, lifetime=300)).subject
    _refused(verifier, issuer.github(iat=now - 361, lifetime=300), "TOKEN_EXPIRED")
    _refused(verifier, issuer.github(iat=now - 7200, lifetime=300), "TOKEN_EXPIRED")
    # nbf and iat in the future beyond the leeway.
    _refused(verifier, issuer.github(iat=now - 10, nbf=int(now + 120)), "TOKEN_NOT_YET_VALID")
    _refused(verifier, issuer.github(iat=now + 120, nbf=int(now)), "TOKEN_NOT_YET_VALID")
    assert verifier.verify(issuer.github(iat=now + 50)).subject  # skew within leeway
    # A token living longer than max_lifetime (1 h here), however fresh.
    error = _refused(verifier, issuer.github(iat=now, lifetime=7200), "TOKEN_CLAIMS")
    assert "longer than issuer 'github' allows" in error.message


def test_audience_and_issuer(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    error = _refused(verifier, issuer.github(audience="sts.amazonaws.com"), "TOKEN_AUDIENCE")
    assert "aud must include one of portagent" in error.message
    assert verifier.verify(issuer.github(audience=["sts.amazonaws.com", "portagent"])).subject
    error = _refused(verifier, issuer.github(iss="https://evil.example"), "TOKEN_ISSUER")
    assert "'https://evil.example' is not configured" in error.message
    _refused(verifier, issuer.mint(issuer.github_claims_for(), omit=["iss"]), "TOKEN_ISSUER")
    _refused(verifier, issuer.github(iss=["x"]), "TOKEN_ISSUER")


def test_wrong_iss_signed_by_another_issuers_key(issuer: TestIssuer, tmp_path: Path) -> None:
    """A token from issuer B claiming to be issuer A: A's keys do not know B's kid."""
    with TestIssuer(tmp_path / "other") as other:
        verifier = TokenVerifier([_settings(issuer), _settings(other, name="other")])
        forged = other.github(iss=issuer.url)
        _refused(verifier, forged, "TOKEN_KEY_UNKNOWN")
        # Even naming a kid A has: the signature is B's.
        forged = other.mint(other.github_claims_for(iss=issuer.url), headers={"kid": issuer.kid})
        _refused(verifier, forged, "TOKEN_SIGNATURE")


def test_alg_none_and_hmac_with_the_public_key(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    claims = issuer.github_claims_for()
    error = _refused(verifier, issuer.unsigned(claims), "TOKEN_ALGORITHM")
    assert '"none" is never accepted' in error.message
    # Header alg swapped to HS256, HMAC keyed with the issuer's RSA public key PEM.
    error = _refused(verifier, issuer.hs256_with_public_key(claims), "TOKEN_ALGORITHM")
    assert "never accepted" in error.message
    # The same with a symmetric key served in the JWKS itself.
    secret = issuer.public_pem()
    oct_kid = issuer.add_oct_key(secret)
    token = issuer.hs256_with_public_key(claims, kid=oct_kid, secret=secret)
    _refused(verifier, token, "TOKEN_ALGORITHM")
    # Even an issuer config listing HS256 (the settings refuse it) does not help.
    lenient = TokenVerifier([_settings(issuer, algorithms=("RS256", "HS256"))])
    _refused(lenient, token, "TOKEN_ALGORITHM")
    _refused(lenient, issuer.mint(claims, headers={"alg": "none"}), "TOKEN_ALGORITHM")


def test_parse_jwks_never_loads_symmetric_or_private_keys(issuer: TestIssuer) -> None:
    good = dict(issuer.jwks()["keys"][0])
    skipped: list[tuple[str | None, str]] = []
    doc = {
        "keys": [
            {"kty": "oct", "k": b64url(b"secret"), "kid": "o"},
            {**good, "kid": "p", "d": "AAAA"},
            {**good, "kid": "e", "use": "enc"},
            {**good, "kid": "h", "alg": "HS256"},
            {**good, "kid": "x", "alg": "ES256"},  # an RSA key claiming an EC algorithm
            {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA", "kid": "c"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "small"},
            "not a key",
            good,
        ]
    }
    keys = parse_jwks(json.dumps(doc), skipped=lambda kid, why: skipped.append((kid, why)))
    assert [k.kid for k in keys] == [good["kid"]]
    reasons = dict(skipped[:7])
    assert reasons["o"] == "symmetric (kty oct) keys are never used"
    assert reasons["p"] == "it carries private key material"
    assert reasons["e"] == "use 'enc' is not sig"
    assert reasons["h"] == "alg 'HS256' is not accepted"
    assert reasons["x"] == "alg ES256 does not fit a RSA key"
    assert reasons["c"] == "curve 'P-521' is not supported"
    assert "RSA key of" in reasons["small"] or "cannot load" in reasons["small"]
    with pytest.raises(JwksError, match="no usable signature key"):
        parse_jwks(json.dumps({"keys": doc["keys"][:7]}))
    for bad in ("[]", "{}", '{"keys": {}}', "nope", "[" * 50_000):
        with pytest.raises(JwksError):
            parse_jwks(bad)


def test_algorithm_allow_list_and_key_alg(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    es_kid = issuer.add_key("ES256")
    token = issuer.mint(issuer.github_claims_for(), kid=es_kid)
    error = _refused(verifier, token, "TOKEN_ALGORITHM")
    assert "accepts RS256, the token is signed with ES256" in error.message
    both = TokenVerifier([_settings(issuer, algorithms=("RS256", "ES256", "PS256"))])
    assert both.verify(token).subject  # allowed once listed
    # The RSA key is published with alg RS256: a PS256 token from the same key is refused.
    ps = issuer.mint(issuer.github_claims_for(), alg="PS256")
    error = _refused(both, ps, "TOKEN_ALGORITHM")
    assert "is for RS256, the token says PS256" in error.message
    # An EC key cannot verify an RSA algorithm whatever the header says.
    swapped = issuer.mint(issuer.github_claims_for(), headers={"kid": es_kid})
    _refused(both, swapped, "TOKEN_ALGORITHM")


def test_other_key_types_and_no_kid(tmp_path: Path) -> None:
    for alg in ("ES256", "EdDSA", "PS256"):
        with TestIssuer(tmp_path / alg, alg=alg) as other:
            verifier = TokenVerifier([_settings(other, algorithms=(alg,))])
            assert verifier.verify(other.github()).subject
            # No kid: the issuer's single fitting key is used.
            assert verifier.verify(other.mint(other.github_claims_for(), headers={"kid": None}))
            other.add_key()
            verifier = TokenVerifier([_settings(other, algorithms=(alg,))])  # a fresh cache
            error = _refused(
                verifier,
                other.mint(other.github_claims_for(), headers={"kid": None}),
                "TOKEN_KEY_UNKNOWN",
            )
            assert "names no key (kid)" in error.message


def test_tampered_tokens(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    token = issuer.github(repository="octo-org/app")
    head, _, sig = token.split(".")
    forged_claims = issuer.claims(issuer.github_claims_for(repository="octo-org/prod-secrets"))
    forged = b64url(json.dumps(forged_claims).encode())
    _refused(verifier, f"{head}.{forged}.{sig}", "TOKEN_SIGNATURE")
    _refused(verifier, f"{head}.{token.split('.')[1]}.", "TOKEN_SIGNATURE")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    _refused(verifier, f"{head}.{token.split('.')[1]}.{flipped}", "TOKEN_SIGNATURE")
    # A header that is not what it says.
    _refused(verifier, f"{b64url(b'[1]')}.{forged}.{sig}", "TOKEN_MALFORMED")
    _refused(verifier, f"{b64url(b'{}')}.{forged}.{sig}", "TOKEN_ALGORITHM")
    crit = issuer.mint(issuer.github_claims_for(), headers={"crit": ["exp"], "exp": 1})
    _refused(verifier, crit, "TOKEN_MALFORMED")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "...",
        "e30.e30.",  # {} . {}
        "e30.W10.c2ln",  # payload []
        b64url(b'{"alg":"RS256"}') + "." + b64url(b"\xff\xfe") + ".c2ln",
        b64url(b'{"alg":"RS256"}') + "." + b64url(b"[" * 10_000) + ".c2ln",
        b64url(b"[" * 10_000) + ".e30.c2ln",
        b64url(b'{"alg":"RS256"}') + "." + b64url(b'{"iss":"' + b"9" * 5000 + b'"}') + ".c",
        "x" * (MAX_TOKEN_BYTES + 1),
        "eyJ." * 5000,
    ],
)
def test_garbage_is_malformed_or_refused(verifier: TokenVerifier, token: str) -> None:
    with pytest.raises(IdentityError) as caught:
        verifier.verify(token)
    assert caught.value.reason in ("TOKEN_MALFORMED", "TOKEN_ALGORITHM", "TOKEN_ISSUER")


def test_oversize_token(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    token = issuer.github(padding="x" * MAX_TOKEN_BYTES)
    error = _refused(verifier, token, "TOKEN_MALFORMED")
    assert "longer than 16384 bytes" in error.message


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200) | st.from_regex(r"[A-Za-z0-9_.-]{0,120}", fullmatch=True))
def test_arbitrary_text_only_ever_raises_identity_error(verifier: TokenVerifier, text: str) -> None:
    with pytest.raises(IdentityError):
        verifier.verify(text)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    overrides=st.dictionaries(
        st.sampled_from(
            [
                "sub",
                "exp",
                "iat",
                "nbf",
                "aud",
                "run_id",
                "repository",
                "environment",
                "groups",
                "x",
            ]
        ),
        _json,
        max_size=4,
    ),
    header=st.dictionaries(st.sampled_from(["kid", "typ", "cty", "x"]), _json, max_size=2),
)
def test_signed_hostile_claims_only_ever_raise_identity_error(
    issuer: TestIssuer, verifier: TokenVerifier, overrides: dict[str, Any], header: dict[str, Any]
) -> None:
    """Correctly signed tokens with arbitrary claim and header values: an Identity or
    an IdentityError, nothing else."""
    token = issuer.mint(issuer.github_claims_for(**overrides), headers=header or None)
    try:
        identity = verifier.verify(token)
    except IdentityError as exc:
        assert token not in exc.message
    else:
        assert isinstance(identity.subject, str) and identity.subject
        for value in identity.claims.values():
            assert isinstance(value, str | int | tuple)


def test_payload_base64_is_decoded_strictly_enough(verifier: TokenVerifier) -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"RS256"}').decode().rstrip("=")
    # Valid base64url of a non-UTF-8 payload.
    _refused(verifier, f"{header}.{b64url(bytes(range(256)))}.c2ln", "TOKEN_MALFORMED")
