"""The verifier's keys over real HTTPS: discovery, the 10-minute cache, key rotation
(unknown kid → one refetch, at most once per 30 s), outages (cached keys keep working;
none at all → JWKS_UNAVAILABLE), jwks_file, wrong CA, concurrency; the test issuer's CI
token endpoints; and the verifier on Debian's PyJWT 2.6 (what the broker's .deb runs).

Time is the verifier's injected clock: nothing here sleeps."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from portagent.broker.identity.model import IdentityError, IdentityKind
from portagent.broker.identity.oidc import JwksError, TokenVerifier, fetch_https
from portagent.broker.identity.settings import IssuerSettings
from portagent.testing.oidc_issuer import TestIssuer

DEBIAN_JWT = Path("/usr/lib/python3/dist-packages/jwt")


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        with self._lock:
            self.items.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.items if name == event]


def _settings(source: TestIssuer, **changes: Any) -> IssuerSettings:
    base = IssuerSettings(
        name="github",
        kind=IdentityKind.GITHUB,
        issuer=source.url,
        audiences=("portagent",),
        jwks_uri=None,
        jwks_file=None,
        ca=source.ca_path,
        algorithms=("RS256",),
        leeway=60.0,
        max_lifetime=86400.0,
        groups_claim="groups",
    )
    return replace(base, **changes)


@pytest.fixture
def issuer(tmp_path: Path) -> Iterator[TestIssuer]:
    with TestIssuer(tmp_path / "issuer") as running:
        yield running


def _reason(verifier: TokenVerifier, token: str) -> str:
    try:
        verifier.verify(token)
    except IdentityError as exc:
        return exc.reason
    return "OK"


def test_discovery_once_then_the_cache(issuer: TestIssuer) -> None:
    clock, events = Clock(), Events()
    verifier = TokenVerifier([_settings(issuer)], clock=clock, log=events)
    for _ in range(3):
        assert _reason(verifier, issuer.github(iat=clock.now)) == "OK"
    assert (issuer.discovery_fetches, issuer.jwks_fetches) == (1, 1)
    assert events.named("jwks_fetched")[0]["source"] == issuer.jwks_uri
    # A configured jwks_uri skips discovery.
    direct = TokenVerifier([_settings(issuer, jwks_uri=issuer.jwks_uri)], clock=clock)
    assert _reason(direct, issuer.github(iat=clock.now)) == "OK"
    assert (issuer.discovery_fetches, issuer.jwks_fetches) == (1, 2)


def test_unknown_kid_refetches_then_accepts(issuer: TestIssuer) -> None:
    clock = Clock()
    verifier = TokenVerifier([_settings(issuer)], clock=clock)
    assert _reason(verifier, issuer.github(iat=clock.now)) == "OK"
    extra = issuer.add_key()
    assert _reason(verifier, issuer.github(iat=clock.now, kid=extra)) == "OK"
    assert issuer.jwks_fetches == 2
    # A rotation right after: the refetch is rate-limited (30 s), then allowed.
    clock.now += 10
    new = issuer.rotate()
    assert _reason(verifier, issuer.github(iat=clock.now, kid=new)) == "TOKEN_KEY_UNKNOWN"
    assert issuer.jwks_fetches == 2
    clock.now += 21
    assert _reason(verifier, issuer.github(iat=clock.now, kid=new)) == "OK"
    assert issuer.jwks_fetches == 3


def test_unknown_kids_cost_one_fetch_per_30s(issuer: TestIssuer) -> None:
    clock, events = Clock(), Events()
    verifier = TokenVerifier([_settings(issuer)], clock=clock, log=events)
    assert _reason(verifier, issuer.github(iat=clock.now)) == "OK"
    for i in range(5):
        forged = issuer.mint(issuer.github_claims_for(), iat=clock.now, headers={"kid": f"k{i}"})
        with pytest.raises(IdentityError) as caught:
            verifier.verify(forged)
        error = caught.value
        assert error.reason == "TOKEN_KEY_UNKNOWN"
        assert f"key 'k{i}' is not among issuer 'github'" in error.message
        clock.now += 5
    assert issuer.jwks_fetches == 2  # the first fetch and one refetch
    assert [e["why"] for e in events.named("jwks_fetched")] == ["first use", "unknown kid"]
    clock.now += 10  # 35 s after the refetch
    forged = issuer.mint(issuer.github_claims_for(), iat=clock.now, headers={"kid": "again"})
    assert _reason(verifier, forged) == "TOKEN_KEY_UNKNOWN"
    assert issuer.jwks_fetches == 3


def test_rotated_key_is_refused_after_the_cache_refresh(issuer: TestIssuer) -> None:
    clock, events = Clock(), Events()
    verifier = TokenVerifier([_settings(issuer)], clock=clock, log=events)
    old = issuer.kid
    assert _reason(verifier, issuer.github(iat=clock.now)) == "OK"
    new = issuer.rotate()
    # Until the cache (10 minutes) runs out, the old key is still trusted.
    clock.now += 599
    assert _reason(verifier, issuer.github(iat=clock.now, kid=old)) == "OK"
    assert issuer.jwks_fetches == 1
    clock.now += 2
    assert _reason(verifier, issuer.github(iat=clock.now, kid=old)) == "TOKEN_KEY_UNKNOWN"
    assert _reason(verifier, issuer.github(iat=clock.now, kid=new)) == "OK"
    assert issuer.jwks_fetches == 2
    assert events.named("jwks_fetched")[-1] == {
        "issuer": "github",
        "why": "stale",
        "source": issuer.jwks_uri,
        "kids": [new],
    }


def test_an_issuer_outage_keeps_the_cached_keys(issuer: TestIssuer) -> None:
    clock, events = Clock(), Events()
    verifier = TokenVerifier([_settings(issuer)], clock=clock, log=events)
    assert _reason(verifier, issuer.github(iat=clock.now)) == "OK"
    issuer.available = False  # 503
    clock.now += 700
    assert _reason(verifier, issuer.github(iat=clock.now)) == "OK"
    failed = events.named("jwks_fetch_failed")
    assert len(failed) == 1 and failed[0]["kept_keys"] == 1 and failed[0]["why"] == "stale"
    assert "HTTP 503" in failed[0]["error"]
    issuer.close()  # connection refused from now on
    clock.now += 31
    assert _reason(verifier, issuer.github(iat=clock.now)) == "OK"
    assert len(events.named("jwks_fetch_failed")) == 2
    # The issuer back (same port): the next refresh (30 s later) replaces the keys.
    issuer.available = True
    issuer.start()
    clock.now += 31
    assert _reason(verifier, issuer.github(iat=clock.now)) == "OK"
    assert events.named("jwks_fetched")[-1]["why"] == "stale"


def test_no_keys_at_all_is_jwks_unavailable(issuer: TestIssuer) -> None:
    clock, events = Clock(), Events()
    verifier = TokenVerifier([_settings(issuer)], clock=clock, log=events)
    issuer.available = False
    with pytest.raises(IdentityError) as caught:
        verifier.verify(issuer.github(iat=clock.now))
    error = caught.value
    assert error.reason == "JWKS_UNAVAILABLE"
    assert error.message == "the keys of issuer 'github' could not be fetched"
    issuer.available = True
    clock.now += 10  # within 30 s of the failed attempt: no new fetch
    assert _reason(verifier, issuer.github(iat=clock.now)) == "JWKS_UNAVAILABLE"
    assert issuer.discovery_fetches == 1
    clock.now += 21
    assert _reason(verifier, issuer.github(iat=clock.now)) == "OK"
    # A stopped issuer (connection refused) is the same answer, from a fresh verifier.
    issuer.close()
    cold = TokenVerifier([_settings(issuer)], clock=clock, log=events)
    assert _reason(cold, issuer.github(iat=clock.now)) == "JWKS_UNAVAILABLE"


def test_keys_are_fetched_only_with_the_issuers_ca(issuer: TestIssuer, tmp_path: Path) -> None:
    with TestIssuer(tmp_path / "other") as other:
        events = Events()
        wrong_ca = TokenVerifier([_settings(issuer, ca=other.ca_path)], log=events)
        assert _reason(wrong_ca, issuer.github()) == "JWKS_UNAVAILABLE"
        assert "CERTIFICATE_VERIFY_FAILED" in events.named("jwks_fetch_failed")[0]["error"]
        system_cas = TokenVerifier([_settings(issuer, ca=None)], log=events)
        assert _reason(system_cas, issuer.github()) == "JWKS_UNAVAILABLE"
        missing = TokenVerifier([_settings(issuer, ca=tmp_path / "nope.pem")], log=events)
        assert _reason(missing, issuer.github()) == "JWKS_UNAVAILABLE"
        assert "cannot load the CA file" in events.named("jwks_fetch_failed")[-1]["error"]
    assert issuer.jwks_fetches == 0
    with pytest.raises(JwksError, match="only https"):
        fetch_https(issuer.jwks_uri.replace("https:", "http:"), ca=issuer.ca_path)


def test_discovery_must_name_the_same_issuer(issuer: TestIssuer) -> None:
    events = Events()
    slash = issuer.url + "/"  # fetches the same document, whose issuer has no slash
    verifier = TokenVerifier([_settings(issuer, issuer=slash)], log=events)
    assert _reason(verifier, issuer.github(iss=slash)) == "JWKS_UNAVAILABLE"
    assert "its issuer is not" in events.named("jwks_fetch_failed")[0]["error"]


def test_jwks_file(issuer: TestIssuer, tmp_path: Path) -> None:
    clock, events = Clock(), Events()
    keys = tmp_path / "keys.json"
    shutil.copy(issuer.jwks_path, keys)
    settings = _settings(issuer, jwks_file=keys, ca=None)
    verifier = TokenVerifier([settings], clock=clock, log=events)
    assert _reason(verifier, issuer.github(iat=clock.now)) == "OK"
    assert events.named("jwks_fetched")[0]["source"] == str(keys)
    new = issuer.rotate()
    shutil.copy(issuer.jwks_path, keys)
    assert _reason(verifier, issuer.github(iat=clock.now, kid=new)) == "OK"  # re-read
    assert issuer.jwks_fetches == 0 and issuer.discovery_fetches == 0
    # An oversized or broken file keeps the keys read before.
    keys.write_text(json.dumps({"keys": [], "pad": "x" * (1 << 20)}))
    clock.now += 601
    assert _reason(verifier, issuer.github(iat=clock.now, kid=new)) == "OK"
    assert "larger than" in events.named("jwks_fetch_failed")[-1]["error"]
    keys.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    fresh = TokenVerifier([settings], clock=clock, log=events)
    assert _reason(fresh, issuer.github(iat=clock.now, kid=new)) == "JWKS_UNAVAILABLE"
    assert events.named("jwks_key_skipped")[-1]["why"] == "symmetric (kty oct) keys are never used"


def test_prefetch_logs_failures_and_fills_the_cache(issuer: TestIssuer, tmp_path: Path) -> None:
    down = TestIssuer(tmp_path / "down")  # never started: connection refused
    down.close()
    events = Events()
    verifier = TokenVerifier([_settings(issuer), _settings(down, name="down")], log=events)
    assert [s.name for s in verifier.issuers] == ["github", "down"]
    verifier.prefetch()
    assert [e["issuer"] for e in events.named("jwks_fetched")] == ["github"]
    assert [e["issuer"] for e in events.named("jwks_fetch_failed")] == ["down"]
    assert _reason(verifier, issuer.github()) == "OK"
    assert issuer.jwks_fetches == 1


def test_concurrent_verifications_share_one_refetch(issuer: TestIssuer) -> None:
    clock = Clock()
    verifier = TokenVerifier([_settings(issuer)], clock=clock)
    assert _reason(verifier, issuer.github(iat=clock.now)) == "OK"
    extra = issuer.add_key()
    tokens = [issuer.github(iat=clock.now, kid=extra, run_id=str(i)) for i in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(verifier.verify, tokens))
    assert sorted(r.claims["run_id"] for r in results) == sorted(str(i) for i in range(16))
    assert issuer.jwks_fetches == 2


# --- the CI token endpoints ----------------------------------------------------------------


def _get(url: str, issuer: TestIssuer, auth: str) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(issuer.ca_path))
    request = urllib.request.Request(url, headers={"Authorization": auth})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_github_token_endpoint(issuer: TestIssuer) -> None:
    issuer.github_claims = {"environment": "staging", "run_id": "777"}
    url = issuer.github_request_url + "&audience=portagent"
    status, body = _get(url, issuer, f"bearer {issuer.github_request_token}")
    assert status == 200
    identity = TokenVerifier([_settings(issuer)]).verify(body["value"])
    assert identity.claims["environment"] == "staging" and identity.claims["run_id"] == "777"
    status, body = _get(issuer.github_request_url, issuer, f"Bearer {issuer.github_request_token}")
    assert status == 200  # no audience: GitHub's default, the owner's URL
    default = TokenVerifier([_settings(issuer, audiences=("https://github.com/octo-org",))])
    assert default.verify(body["value"]).subject
    assert _get(url, issuer, "bearer wrong")[0] == 401
    assert issuer.token_requests == [("github", "portagent"), ("github", None)]


def test_fake_buildkite_agent(issuer: TestIssuer, tmp_path: Path) -> None:
    agent = issuer.write_fake_buildkite_agent(tmp_path / "bin")
    issuer.buildkite_claims = {"pipeline_slug": "db-migrate"}
    env = {"PATH": f"{agent.parent}:/usr/bin:/bin"}
    run = subprocess.run(
        ["buildkite-agent", "oidc", "request-token", "--audience", "portagent"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    settings = _settings(issuer, name="bk", kind=IdentityKind.BUILDKITE)
    identity = TokenVerifier([settings]).verify(run.stdout.strip())
    assert identity.claims["pipeline_slug"] == "db-migrate"
    assert identity.claims["build_number"] == 17
    bad = subprocess.run(
        [str(agent), "meta-data", "get", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert bad.returncode == 1 and "only `oidc request-token`" in bad.stderr
    assert issuer.token_requests == [("buildkite", "portagent")]


# --- Debian's PyJWT 2.6 ---------------------------------------------------------------------

_COMPAT_SCRIPT = """
import json, sys
from pathlib import Path
import jwt
from portagent.broker.identity.model import IdentityError, IdentityKind
from portagent.broker.identity.oidc import TokenVerifier
from portagent.broker.identity.settings import IssuerSettings
from portagent.testing.oidc_issuer import TestIssuer

out = {"version": jwt.__version__}
with TestIssuer(Path(sys.argv[1])) as iss:
    s = IssuerSettings(name="github", kind=IdentityKind.GITHUB, issuer=iss.url,
        audiences=("portagent",), jwks_uri=None, jwks_file=None, ca=iss.ca_path,
        algorithms=("RS256", "ES256"), leeway=60.0, max_lifetime=86400.0, groups_claim="groups")
    v = TokenVerifier([s])
    claims = iss.github_claims_for()
    es = iss.add_key("ES256")
    head, payload, sig = iss.github().split(".")
    cases = {
        "ok": iss.github(),
        "es256": iss.mint(claims, kid=es),
        "expired": iss.github(iat=1_000_000_000),
        "audience": iss.github(audience="other"),
        "none": iss.unsigned(claims),
        "hs256": iss.hs256_with_public_key(claims),
        "tampered": head + "." + iss.github(repository="x/y").split(".")[1] + "." + sig,
        "iat_list": iss.mint({**claims, "iat": [1]}),
        "iat_text": iss.mint({**claims, "iat": "1"}),
        "jti_int": iss.mint({**claims, "jti": 5}),
        "no_sub": iss.mint(claims, omit=["sub"]),
        "kid": iss.mint(claims, headers={"kid": "nope"}),
    }
    for name, token in cases.items():
        try:
            out[name] = v.verify(token).label
        except IdentityError as exc:
            out[name] = exc.reason
print(json.dumps(out))
"""


@pytest.mark.skipif(
    not (DEBIAN_JWT / "__init__.py").exists(), reason="Debian's python3-jwt is not installed"
)
def test_the_verifier_on_debian_pyjwt_2_6(tmp_path: Path) -> None:
    """The broker's .deb runs on bookworm's python3-jwt 2.6.0: the same answers there."""
    shim = tmp_path / "jwt26"
    shim.mkdir()
    (shim / "jwt").symlink_to(DEBIAN_JWT)
    env = {**os.environ, "PYTHONPATH": str(shim)}
    run = subprocess.run(
        [sys.executable, "-c", _COMPAT_SCRIPT, str(tmp_path / "issuer")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result.pop("version").startswith("2.6")
    assert result == {
        "ok": "github:repo:octo-org/app:environment:prod",
        "es256": "github:repo:octo-org/app:environment:prod",
        "expired": "TOKEN_EXPIRED",
        "audience": "TOKEN_AUDIENCE",
        "none": "TOKEN_ALGORITHM",
        "hs256": "TOKEN_ALGORITHM",
        "tampered": "TOKEN_SIGNATURE",
        "iat_list": "TOKEN_CLAIMS",
        "iat_text": "TOKEN_CLAIMS",
        "jti_int": "github:repo:octo-org/app:environment:prod",
        "no_sub": "TOKEN_CLAIMS",
        "kid": "TOKEN_KEY_UNKNOWN",
    }
