"""Access requests through the real `portagent-broker serve` (a subprocess): OIDC tokens
from local HTTPS test issuers (JWKS fetched over HTTPS), a Cedar policy file, a
simulated agent acknowledging what it is sent, and a webhook receiver on loopback.

Covers ADR 0008's request paths: allowed and applied, refused with the rule, pending
then approved by a member of the approver group, self-approval and non-members
refused, forged and expired tokens, admin-only routes, SIGHUP with a bad policy."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from portagent.testing.broker_service import AckingAgent, BrokerService, make_pki
from portagent.testing.oidc_issuer import TestIssuer

HOST = "db-1"
WAIT = 15.0
SECRET = b"webhook-secret-for-tests"

POLICY = f"""
// CI: octo-org/app may reach the database port of db-1, at once.
@id("ci-db")
@max_ttl("10m")
permit(principal is GithubWorkflow, action == Action::"request", resource in Host::"{HOST}")
when {{ principal.repository == "octo-org/app" && resource.port == 5432 }};

// On-call people may reach role=db hosts with one approval from the dba group.
@id("oncall-db")
@max_ttl("10m")
@approvals("1")
@approvers("dba")
permit(principal in Group::"oncall", action == Action::"request", resource)
when {{ resource.labels.contains("role=db") }};
"""


class Receiver:
    """A webhook receiver on loopback (a thread): every POST body, with its headers."""

    def __init__(self) -> None:
        self.got: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.got.put(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.seen: list[dict[str, Any]] = []

    def wait_for(self, event: str, request_id: str) -> dict[str, Any]:
        """The webhook body for (event, request id); checks every signature on the way."""
        for body in self.seen:
            if body["event"] == event and body["request"]["id"] == request_id:
                return body
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                headers, raw = self.got.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            expected = "sha256=" + hmac.new(SECRET, raw, hashlib.sha256).hexdigest()
            assert headers["x-portagent-signature"] == expected
            value: dict[str, Any] = json.loads(raw)
            self.seen.append(value)
            if value["event"] == event and value["request"]["id"] == request_id:
                return value
        raise AssertionError(f"no {event} webhook for {request_id}; got {self.seen}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Env:
    broker: BrokerService
    github: TestIssuer
    people: TestIssuer
    receiver: Receiver
    policy_path: Path
    agent: AckingAgent


def _service_extra(
    github: TestIssuer, people: TestIssuer, policy: Path, receiver: Receiver, secret: Path
) -> str:
    def q(value: object) -> str:
        return json.dumps(str(value))

    return f"""
[service.policy]
file = {q(policy)}
request_ttl = "10m"

[[service.issuers]]
name = "gh"
kind = "github"
issuer = {q(github.url)}
audience = "portagent"
ca = {q(github.ca_path)}

[[service.issuers]]
name = "corp"
kind = "person"
issuer = {q(people.url)}
audience = "portagent"
ca = {q(people.ca_path)}

[[service.webhooks]]
url = {q(receiver.url)}
secret_file = {q(secret)}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("requests-api")
    pki = make_pki(tmp / "pki")
    receiver = Receiver()
    policy = tmp / "policy.cedar"
    policy.write_text(POLICY)
    secret = tmp / "webhook.secret"
    secret.write_bytes(SECRET + b"\n")
    with TestIssuer(tmp / "gh") as github, TestIssuer(tmp / "corp") as people:
        broker = BrokerService(tmp / "broker", pki)
        with broker.config_path.open("a") as config:
            config.write(_service_extra(github, people, policy, receiver, secret))
        agent: AckingAgent | None = None
        try:
            broker.start()
            status, body = broker.request(
                "POST", "/v1/hosts", {"host_id": HOST, "labels": {"role": "db"}}
            )
            assert status == 201, body
            agent = AckingAgent(broker, pki, HOST)
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                _, host = broker.request("GET", f"/v1/hosts/{HOST}")
                if host["host"]["connected"]:
                    break
                time.sleep(0.05)
            yield Env(broker, github, people, receiver, policy, agent)
        finally:
            if agent is not None:
                agent.close()
            broker.close()
            receiver.close()


def _ask(env: Env, token: str, **body: Any) -> tuple[int, Any]:
    request = {"host": HOST, "port": "5432/tcp", "ttl": "5m", "reason": "INC-42", **body}
    return env.broker.request("POST", "/v1/requests", request, token=token)


def _person(env: Env, name: str, groups: list[str]) -> str:
    return env.people.person(f"u-{name}", email=f"{name}@example.com", groups=groups)


def test_a_ci_job_is_granted_at_once_and_the_answer_waits_for_the_agent(env: Env) -> None:
    token = env.github.github()
    status, body = _ask(env, token, wait=10)
    assert status == 201, body
    request, grant = body["request"], body["grant"]
    assert request["state"] == "granted" and request["rule"] == "ci-db"
    assert body["applied"] is True  # the agent acknowledged the grant's generation
    assert env.agent.acked >= grant["generation"]
    assert request["requester"]["kind"] == "github"
    assert request["requester"]["claims"]["repository"] == "octo-org/app"
    # The grant's subject is the verified identity; its source the caller's address.
    assert grant["subject"] == request["requester"]["label"]
    assert grant["subject"].startswith("gh:repo:octo-org/app")
    assert grant["sources"] == ["127.0.0.1/32"]
    assert grant["identity"]["issuer"] == env.github.url
    assert grant["access_request_id"] == request["id"]
    assert grant["reason"].startswith("INC-42")

    # The job may read and revoke its own grant, not list the fleet's.
    status, own = env.broker.request("GET", f"/v1/grants/{grant['grant_id']}", token=token)
    assert status == 200 and own["grant"]["grant_id"] == grant["grant_id"]
    status, refused = env.broker.request("GET", "/v1/grants", token=token)
    assert status == 403 and refused["error"]["reason"] == "ADMIN_ONLY"
    other = env.github.github(repository="octo-org/other")
    status, hidden = env.broker.request("GET", f"/v1/grants/{grant['grant_id']}", token=other)
    assert status == 404 and hidden["error"]["reason"] == "GRANT_NOT_FOUND"

    env.receiver.wait_for("request.granted", request["id"])
    status, closed = env.broker.request(
        "POST", f"/v1/requests/{request['id']}/close", {}, token=token
    )
    assert status == 200, closed
    assert closed["request"]["state"] == "closed" and closed["grant"]["state"] == "revoked"
    assert env.receiver.wait_for("request.closed", request["id"])["request"]["state"] == "closed"
    status, again = env.broker.request(
        "POST", f"/v1/requests/{request['id']}/close", {}, token=token
    )
    assert status == 200 and again["request"]["state"] == "closed"


def test_the_same_request_id_is_one_request(env: Env) -> None:
    token = env.github.github(run_id="777")
    first_status, first = _ask(env, token, request_id="job-777")
    second_status, second = _ask(env, token, request_id="job-777")
    assert first_status == second_status == 201
    assert first["request"]["id"] == second["request"]["id"]
    assert first["grant"]["grant_id"] == second["grant"]["grant_id"]
    status, reused = _ask(env, token, request_id="job-777", ttl="6m")
    assert status == 409 and reused["error"]["reason"] == "REQUEST_ID_REUSED"
    env.broker.request("POST", f"/v1/requests/{first['request']['id']}/close", {}, token=token)


def test_policy_refusals_name_the_rule_and_make_nothing(env: Env) -> None:
    token = env.github.github()
    _, before = env.broker.request("GET", f"/v1/grants?host={HOST}")
    status, body = _ask(env, token, port="22/tcp")
    assert status == 403, body
    assert body["error"]["code"] == "PERMISSION_DENIED"
    assert body["error"]["reason"] == "POLICY_DENIED" and body["error"]["rule"] == ""
    status, body = _ask(env, token, ttl="1h")
    assert status == 403 and body["error"]["reason"] == "TTL_TOO_LONG"
    assert body["error"]["rule"] == "ci-db"
    status, body = _ask(env, token, sources=["192.0.2.0/24"])
    assert status == 403 and body["error"]["reason"] == "SOURCES_NOT_ALLOWED"
    _, after = env.broker.request("GET", f"/v1/grants?host={HOST}")
    assert after["grants"] == before["grants"]
    _, audit = env.broker.request("GET", "/v1/audit")
    refused = [r for r in audit["records"] if r["action"] == "request_refused"]
    assert len(refused) >= 3

    # Input is checked before the policy is asked, each error naming its field.
    for bad, field in (
        ({"reason": ""}, "reason"),
        ({"reason": "x" * 257}, "reason"),
        ({"wait": 31}, "wait"),
        ({"host": "no such/host"}, "host"),
        ({"port": "http"}, "port"),
        ({"colour": "red"}, "colour"),
    ):
        status, body = _ask(env, token, **bad)
        assert status == 400 and body["error"]["field"] == field, (bad, body)
    status, body = _ask(env, token, host="db-9")
    assert status == 404 and body["error"]["reason"] == "NO_SUCH_HOST"


def test_pending_until_a_group_member_approves_never_the_requester(env: Env) -> None:
    carol = _person(env, "carol", ["oncall", "dba"])
    dave = _person(env, "dave", ["dba"])
    erin = _person(env, "erin", ["oncall"])
    status, body = _ask(env, carol, ttl="2m", reason="INC-7 restore")
    assert status == 202, body
    request_id = body["request"]["id"]
    assert body["request"]["state"] == "pending" and body["grant"] is None
    assert body["request"]["approvals_required"] == 1 and body["request"]["approvers"] == "dba"
    assert env.receiver.wait_for("request.pending", request_id)["request"]["reason"] == (
        "INC-7 restore"
    )

    status, refused = env.broker.request(
        "POST", f"/v1/requests/{request_id}/approve", {}, token=carol
    )
    assert status == 403 and refused["error"]["reason"] == "SELF_APPROVAL"
    status, refused = env.broker.request(
        "POST", f"/v1/requests/{request_id}/approve", {}, token=erin
    )
    assert status == 403 and refused["error"]["reason"] == "NOT_AN_APPROVER"
    # erin may not see it at all; dave (dba) sees it among those he may review.
    status, hidden = env.broker.request("GET", f"/v1/requests/{request_id}", token=erin)
    assert status == 404 and hidden["error"]["reason"] == "REQUEST_NOT_FOUND"
    _, listed = env.broker.request("GET", "/v1/requests?state=pending", token=dave)
    assert request_id in [r["id"] for r in listed["requests"]]
    _, listed = env.broker.request("GET", "/v1/requests", token=erin)
    assert request_id not in [r["id"] for r in listed["requests"]]

    # The requester long-polls while dave approves.
    answer: dict[str, Any] = {}

    def poll() -> None:
        answer["value"] = env.broker.request(
            "GET", f"/v1/requests/{request_id}?wait=20", token=carol
        )

    poller = threading.Thread(target=poll)
    poller.start()
    status, approved = env.broker.request(
        "POST", f"/v1/requests/{request_id}/approve", {"comment": "ok for INC-7"}, token=dave
    )
    poller.join(30)
    assert status == 200, approved
    assert approved["request"]["state"] == "granted" and approved["grant"] is not None
    assert [a["approver"]["label"] for a in approved["request"]["approvals"]] == [
        "corp:dave@example.com"
    ]
    status, polled = answer["value"]
    assert status == 200 and polled["request"]["state"] == "granted"
    assert polled["applied"] is True
    assert polled["grant"]["subject"] == "corp:carol@example.com"
    env.receiver.wait_for("request.granted", request_id)

    status, again = env.broker.request("POST", f"/v1/requests/{request_id}/approve", {}, token=dave)
    assert status == 409 and again["error"]["reason"] == "REQUEST_NOT_PENDING"
    env.broker.request("POST", f"/v1/requests/{request_id}/close", {}, token=carol)


def test_a_denied_request_never_makes_a_grant(env: Env) -> None:
    carol = _person(env, "carol", ["oncall"])
    status, body = _ask(env, carol, ttl="2m", reason="INC-8")
    assert status == 202
    request_id = body["request"]["id"]
    # An admin may deny (not approve).
    status, refused = env.broker.request("POST", f"/v1/requests/{request_id}/approve", {})
    assert status == 403 and refused["error"]["reason"] == "NOT_AN_APPROVER"
    status, denied = env.broker.request(
        "POST", f"/v1/requests/{request_id}/deny", {"comment": "not now"}
    )
    assert status == 200 and denied["request"]["state"] == "denied" and denied["grant"] is None
    assert env.receiver.wait_for("request.denied", request_id)["request"]["state"] == "denied"
    status, shown = env.broker.request("GET", f"/v1/requests/{request_id}?wait=1", token=carol)
    assert status == 200 and shown["request"]["state"] == "denied" and shown["grant"] is None


def test_tokens_that_do_not_verify_are_401_with_the_reason(env: Env) -> None:
    gh = env.github
    claims = gh.github_claims_for()
    cases = {
        "TOKEN_EXPIRED": gh.mint(claims, iat=time.time() - 3600, lifetime=600),
        "TOKEN_AUDIENCE": gh.mint(claims, audience="someone-else"),
    }
    for reason, token in cases.items():
        status, body = _ask(env, token)
        assert status == 401 and body["error"]["reason"] == reason, body
    for token in (gh.unsigned(claims), gh.hs256_with_public_key(claims)):
        status, body = _ask(env, token)
        assert status == 401, body
        assert body["error"]["code"] == "UNAUTHENTICATED"
        assert body["error"]["reason"].startswith("TOKEN_")
    status, body = _ask(env, "not-a-token")
    assert status == 401 and body["error"]["reason"] == "UNAUTHENTICATED"


def test_admin_routes_refuse_oidc_identities_and_whoami_says_who(env: Env) -> None:
    token = env.github.github()
    for method, path, payload in (
        ("GET", "/v1/hosts", None),
        ("POST", "/v1/hosts", {"host_id": "x1"}),
        (
            "POST",
            "/v1/grants",
            {"host": HOST, "subject": "me", "sources": ["10.0.0.1"], "port": "22", "ttl": 60},
        ),
        ("GET", "/v1/audit", None),
        ("GET", "/v1/policy", None),
        ("POST", "/v1/policy/explain", {"host": HOST, "port": "22", "ttl": 60}),
    ):
        status, body = env.broker.request(method, path, payload, token=token)
        assert status == 403 and body["error"]["reason"] == "ADMIN_ONLY", (path, body)
    status, me = env.broker.request("GET", "/v1/whoami", token=token)
    assert status == 200 and me["identity"]["kind"] == "github"
    status, admin = env.broker.request("GET", "/v1/whoami")
    assert status == 200 and admin["identity"]["label"] == "admin:tests"
    status, cert = env.broker.request("GET", "/v1/whoami", token=None, cert=True)
    assert status == 200 and cert["identity"]["issuer"] == "portagent:admin-cert"


def test_policy_show_and_explain_for_admins(env: Env) -> None:
    status, shown = env.broker.request("GET", "/v1/policy")
    assert status == 200 and shown["rule_ids"] == ["ci-db", "oncall-db"]
    assert len(shown["digest"]) >= 32
    token = env.github.github()
    status, explained = env.broker.request(
        "POST",
        "/v1/policy/explain",
        {"token": token, "host": HOST, "port": "5432/tcp", "ttl": "5m"},
    )
    assert status == 200, explained
    assert explained["decision"]["allowed"] is True and explained["decision"]["rule"] == "ci-db"
    status, explained = env.broker.request(
        "POST",
        "/v1/policy/explain",
        {"token": token, "host": HOST, "port": "5432/tcp", "ttl": "1h"},
    )
    assert status == 200 and explained["decision"]["reason"] == "TTL_TOO_LONG"
    status, bad = env.broker.request(
        "POST", "/v1/policy/explain", {"token": "x.y.z", "host": HOST, "port": "22", "ttl": 9}
    )
    assert status == 400 and bad["error"]["field"] == "token"


def test_sighup_with_a_bad_policy_keeps_the_old_one(env: Env) -> None:
    def loaded_events(name: str) -> list[dict[str, Any]]:
        return [e for e in env.broker.log_events() if e["event"] == name]

    good = len(loaded_events("policy_loaded"))
    env.policy_path.write_text('permit(principal, action, resource) when { nonsense };\n@id("x")')
    try:
        env.broker.hup()
        deadline = time.monotonic() + WAIT
        while not loaded_events("policy_reload_failed") and time.monotonic() < deadline:
            time.sleep(0.05)
        (failed,) = loaded_events("policy_reload_failed")
        assert failed["problems"] and all(isinstance(p, str) for p in failed["problems"])
        # The old policy still decides.
        token = env.github.github()
        status, body = _ask(env, token)
        assert status == 201 and body["request"]["rule"] == "ci-db"
        env.broker.request("POST", f"/v1/requests/{body['request']['id']}/close", {}, token=token)
    finally:
        env.policy_path.write_text(POLICY)
        env.broker.hup()
        deadline = time.monotonic() + WAIT
        while len(loaded_events("policy_loaded")) <= good and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(loaded_events("policy_loaded")) == good + 1


def test_serve_check_refuses_a_bad_policy_with_its_problems(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.cedar"
    bad.write_text('@approvals("2")\npermit(principal, action, resource);\n')
    config = tmp_path / "service.toml"
    config.write_text(
        env.broker.config_path.read_text().replace(
            json.dumps(str(env.policy_path)), json.dumps(str(bad))
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "portagent.broker.fleet.serve", "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 78, done.stderr
    assert "policy" in done.stderr and "approvers" in done.stderr


def test_without_a_policy_every_request_is_refused_and_unreachable_keys_are_503(
    env: Env, tmp_path: Path
) -> None:
    with TestIssuer(tmp_path / "gone") as gone:
        pass  # closed: its JWKS can no longer be fetched
    broker = BrokerService(tmp_path / "broker", env.broker.pki)
    with broker.config_path.open("a") as config:
        config.write(
            f"""
[[service.issuers]]
name = "gh"
kind = "github"
issuer = {json.dumps(env.github.url)}
audience = "portagent"
ca = {json.dumps(str(env.github.ca_path))}

[[service.issuers]]
name = "gone"
kind = "person"
issuer = {json.dumps(gone.url)}
audience = "portagent"
ca = {json.dumps(str(gone.ca_path))}
"""
        )
    try:
        broker.start()
        assert broker.request("POST", "/v1/hosts", {"host_id": HOST})[0] == 201
        status, body = broker.request(
            "POST",
            "/v1/requests",
            {"host": HOST, "port": "5432/tcp", "ttl": "5m", "reason": "INC-1"},
            token=env.github.github(),
        )
        assert status == 409 and body["error"]["reason"] == "NO_POLICY", body
        status, body = broker.request("GET", "/v1/policy")
        assert status == 409 and body["error"]["reason"] == "NO_POLICY"
        status, body = broker.request(
            "GET", "/v1/whoami", token=gone.person("u-1", email="a@example.com")
        )
        assert status == 503, body
        assert body["error"]["code"] == "UNAVAILABLE"
        assert body["error"]["reason"] == "JWKS_UNAVAILABLE"
    finally:
        broker.close()


def test_an_approval_counts_only_while_the_policy_still_allows_the_request(env: Env) -> None:
    """A reload that removes the rule a pending request was allowed by: approving it
    now is refused (POLICY_CHANGED) and no grant is made."""

    def loaded() -> int:
        return len([e for e in env.broker.log_events() if e["event"] == "policy_loaded"])

    def reload(text: str) -> None:
        before = loaded()
        env.policy_path.write_text(text)
        env.broker.hup()
        deadline = time.monotonic() + WAIT
        while loaded() <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loaded() == before + 1

    carol = _person(env, "carol", ["oncall"])
    dave = _person(env, "dave", ["dba"])
    status, body = _ask(env, carol, ttl="2m", reason="INC-9")
    assert status == 202, body
    request_id = body["request"]["id"]
    try:
        reload(POLICY.split("// On-call people")[0])  # only the CI rule is left
        status, refused = env.broker.request(
            "POST", f"/v1/requests/{request_id}/approve", {}, token=dave
        )
        assert status == 403 and refused["error"]["reason"] == "POLICY_CHANGED", refused
        status, shown = env.broker.request("GET", f"/v1/requests/{request_id}", token=carol)
        assert shown["request"]["state"] == "pending" and shown["request"]["approvals"] == []
        # Denying stays possible whatever the policy says.
        status, denied = env.broker.request(
            "POST", f"/v1/requests/{request_id}/deny", {"comment": "rule gone"}, token=dave
        )
        assert status == 200 and denied["request"]["state"] == "denied"
        assert denied["grant"] is None
    finally:
        reload(POLICY)
