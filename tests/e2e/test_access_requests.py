"""Who may open what, end to end: OIDC tokens from a local test issuer, a Cedar policy,
approvals, and the requester's job-bound client (`portagent-request -- CMD`), with the
real broker service, the real agent in its namespace and real traffic.

The requester runs in the client namespace and talks to the broker's API at the
client's own address, so the broker sees the address the agent will see the traffic
come from: the grant opens to exactly that address (policy's default)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from portagent.testing.lab import BIN, HOST_ID, SERVICE_API_PORT, Lab
from portagent.testing.netns import wait_until
from portagent.testing.oidc_issuer import TestIssuer

pytestmark = pytest.mark.root

DB, WEB = 8080, 9000

POLICY = f"""
// GitHub Actions: octo-org/app's prod environment may reach the database port.
@id("ci-prod-db")
@max_ttl("10m")
permit(principal is GithubWorkflow, action == Action::"request", resource in Host::"{HOST_ID}")
when {{
  principal.repository == "octo-org/app" &&
  principal.environment == "prod" &&
  resource.port == {DB}
}};

// On-call people may reach role=db hosts, with one approval from the dba group.
@id("oncall-db")
@max_ttl("10m")
@approvals("1")
@approvers("dba")
permit(principal in Group::"oncall", action == Action::"request", resource)
when {{ resource.labels.contains("role=db") }};
"""


@dataclass
class Issuers:
    github: TestIssuer
    people: TestIssuer


@pytest.fixture
def issuers(tmp_path: Path) -> Iterator[Issuers]:
    with (
        TestIssuer(tmp_path / "gh-issuer") as github,
        TestIssuer(tmp_path / "corp-issuer") as people,
    ):
        yield Issuers(github, people)


def _service_extra(issuers: Issuers, policy: Path) -> str:
    # Keys from files: the broker runs in the client namespace, which cannot reach the
    # issuers' HTTPS servers on the host's loopback (JWKS over HTTPS is proved in
    # tests/integration/test_oidc_jwks.py and test_broker_requests_api.py).
    return f"""
[service.policy]
file = "{policy}"
request_ttl = "2m"

[[service.issuers]]
name = "gh"
kind = "github"
issuer = "{issuers.github.url}"
audience = "portagent"
jwks_file = "{issuers.github.jwks_path}"
algorithms = ["RS256"]

[[service.issuers]]
name = "corp"
kind = "person"
issuer = "{issuers.people.url}"
audience = "portagent"
jwks_file = "{issuers.people.jwks_path}"
algorithms = ["RS256"]
"""


@pytest.fixture
def lab(tmp_path: Path, issuers: Issuers) -> Iterator[Lab]:
    policy = tmp_path / "policy.cedar"
    policy.write_text(POLICY)
    with Lab(
        tmp_path,
        [f"{DB}/tcp", f"{WEB}/tcp"],
        prefix="pt-access",
        tcp_ports=[DB, WEB],
        service=True,
        service_extra=_service_extra(issuers, policy),
    ) as lab:
        lab.broker("hosts", "label", HOST_ID, "role=db")
        assert wait_until(lambda: _connected(lab), timeout=15)
        yield lab


def _connected(lab: Lab) -> bool:
    (host,) = [h for h in lab.broker_json("hosts") if h["host_id"] == HOST_ID]
    return bool(host["connected"])


def _token(tmp_path: Path, name: str, token: str) -> Path:
    path = tmp_path / f"{name}.jwt"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def _request_argv(
    lab: Lab, token: Path, *, port: int = DB, ttl: str = "60s", reason: str = "INC-42"
) -> list[str]:
    return [
        str(BIN / "portagent-request"),
        "--broker",
        f"https://{lab.net.client_ip}:{SERVICE_API_PORT}",
        "--ca",
        str(lab.dir / "ca.pem"),
        "--token-file",
        str(token),
        "--host",
        HOST_ID,
        "--port",
        f"{port}/tcp",
        "--ttl",
        ttl,
        "--reason",
        reason,
    ]


def _probe_cmd(lab: Lab, port: int) -> list[str]:
    """A CMD that succeeds only if the port is open to it."""
    return [
        str(BIN / "python"),
        "-m",
        "portagent.testing.probe",
        "tcp",
        lab.net.server_ip,
        str(port),
    ]


def _run(lab: Lab, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return lab.net.exec_client(argv, check=False, timeout=timeout)


def _agent_grants(lab: Lab) -> list[dict[str, Any]]:
    return [g for g in lab.list_json() if g["state"] == "active"]


def test_allowed_ci_job_runs_its_command_with_access_then_access_closes(
    lab: Lab, issuers: Issuers, tmp_path: Path
) -> None:
    token = _token(tmp_path, "gh", issuers.github.github())
    assert not lab.can_connect(DB)
    done = _run(lab, [*_request_argv(lab, token), "--", *_probe_cmd(lab, DB)])
    # The probe (CMD) connected: access was open when the command ran.
    assert done.returncode == 0, done.stderr
    # ... and closed when it exited.
    assert wait_until(lambda: not lab.can_connect(DB, timeout=0.3), timeout=10)
    grants = lab.broker_json("grants", "--host", HOST_ID)
    assert len(grants) == 1
    grant = grants[0]
    # The grant is for the verified identity, never a free-text name.
    assert grant["subject"].startswith("gh:repo:octo-org/app")
    assert grant["state"] == "revoked"
    # The agent's journal record names the same subject.
    assert "gh:repo:octo-org/app" in lab.log()


def test_policy_denies_what_no_rule_permits_and_nothing_opens(
    lab: Lab, issuers: Issuers, tmp_path: Path
) -> None:
    # The right repository but the wrong port; another repository on the right port.
    wrong_port = _token(tmp_path, "gh", issuers.github.github())
    other_repo = _token(tmp_path, "gh-other", issuers.github.github(repository="octo-org/other"))
    for token, port in ((wrong_port, WEB), (other_repo, DB)):
        done = _run(lab, [*_request_argv(lab, token, port=port), "--", "true"])
        assert done.returncode == 77, done.stderr
        assert "POLICY_DENIED" in done.stderr or "denied" in done.stderr.lower()
    assert not lab.can_connect(DB, timeout=0.3) and not lab.can_connect(WEB, timeout=0.3)
    assert lab.broker_json("grants", "--host", HOST_ID) == []
    audit = lab.broker("audit", "export").stdout
    assert audit.count('"request_refused"') == 2


def test_expired_or_forged_tokens_are_refused(lab: Lab, issuers: Issuers, tmp_path: Path) -> None:
    claims = {
        "sub": "repo:octo-org/app:environment:prod",
        "repository": "octo-org/app",
        "environment": "prod",
    }
    expired = issuers.github.mint(claims, iat=time.time() - 3600, lifetime=600)
    unsigned = issuers.github.unsigned(
        {
            **claims,
            "iss": issuers.github.url,
            "aud": "portagent",
            "exp": int(time.time()) + 300,
            "iat": int(time.time()),
        }
    )
    for name, token in (("expired", expired), ("none", unsigned)):
        path = _token(tmp_path, name, token)
        done = _run(lab, [*_request_argv(lab, path), "--", "true"])
        assert done.returncode == 77, (name, done.stderr)
        assert "TOKEN_" in done.stderr, (name, done.stderr)
    assert lab.broker_json("grants", "--host", HOST_ID) == []


def test_approval_required_self_approval_refused_then_approved_by_a_dba(
    lab: Lab, issuers: Issuers, tmp_path: Path
) -> None:
    carol = _token(
        tmp_path,
        "carol",
        issuers.people.person("u-carol", email="carol@example.com", groups=["oncall", "dba"]),
    )
    dave = _token(
        tmp_path, "dave", issuers.people.person("u-dave", email="dave@example.com", groups=["dba"])
    )
    marker = tmp_path / "cmd-ran"
    cmd = ["sh", "-c", f"{' '.join(_probe_cmd(lab, WEB))} && touch {marker}"]
    wrapper = lab.net.popen(
        lab.net.client,
        [*_request_argv(lab, carol, port=WEB), "--wait-approval", "60s", "--", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def pending() -> list[dict[str, Any]]:
            listed = lab.broker_json("requests", "list", "--state", "pending")
            assert isinstance(listed, list)
            return listed

        assert wait_until(lambda: len(pending()) == 1, timeout=15)
        (request,) = pending()
        request_id = request["id"]
        assert request["requester"]["label"] == "corp:carol@example.com"
        assert not lab.can_connect(WEB, timeout=0.3)

        # Carol is in dba, but approving her own request is refused.
        refused = lab.broker(
            "requests", "approve", request_id, "--token-file", str(carol), check=False
        )
        assert refused.returncode != 0 and "SELF_APPROVAL" in refused.stderr
        assert lab.broker_json("requests", "show", request_id)["state"] == "pending"

        approved = lab.broker(
            "requests",
            "approve",
            request_id,
            "--token-file",
            str(dave),
            "--comment",
            "ok for INC-42",
        )
        assert approved.returncode == 0
        _, err = wrapper.communicate(timeout=30)
        assert wrapper.returncode == 0, err
        assert marker.exists()
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait(5)
    shown = lab.broker_json("requests", "show", request_id)
    assert shown["state"] == "closed"
    assert [a["approver"]["label"] for a in shown["approvals"]] == ["corp:dave@example.com"]
    audit = [json.loads(line) for line in lab.broker("audit", "export").stdout.splitlines()]
    approvals = [r for r in audit if r["action"] == "request_approve"]
    assert len(approvals) == 1
    assert approvals[0]["detail"]["threshold"] == 1
    assert "dave@example.com" in json.dumps(approvals[0]["detail"])
    assert lab.broker("audit", "verify").returncode == 0


def test_a_denied_request_never_opens(lab: Lab, issuers: Issuers, tmp_path: Path) -> None:
    carol = _token(
        tmp_path,
        "carol",
        issuers.people.person("u-carol", email="carol@example.com", groups=["oncall"]),
    )
    dave = _token(
        tmp_path, "dave", issuers.people.person("u-dave", email="dave@example.com", groups=["dba"])
    )
    wrapper = lab.net.popen(
        lab.net.client,
        [*_request_argv(lab, carol, port=WEB), "--wait-approval", "60s", "--", "true"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_until(
            lambda: len(lab.broker_json("requests", "list", "--state", "pending")) == 1, timeout=15
        )
        (request,) = lab.broker_json("requests", "list", "--state", "pending")
        lab.broker(
            "requests",
            "deny",
            request["id"],
            "--token-file",
            str(dave),
            "--comment",
            "not during the freeze",
        )
        _, err = wrapper.communicate(timeout=30)
        assert wrapper.returncode == 77, err
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait(5)
    assert lab.broker_json("grants", "--host", HOST_ID) == []
    assert not lab.can_connect(WEB, timeout=0.3)


def _start_holding_wrapper(
    lab: Lab, token: Path, ttl: str, marker: Path
) -> subprocess.Popen[bytes]:
    """A wrapper whose CMD signals it has access (marker) and then waits."""
    cmd = ["sh", "-c", f"{' '.join(_probe_cmd(lab, DB))} && touch {marker} && exec sleep 60"]
    return lab.net.popen(
        lab.net.client,
        [*_request_argv(lab, token, ttl=ttl), "--", *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its CMD outlives a SIGKILLed wrapper: killed at the end
    )


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(5)
    if proc.stderr is not None:
        proc.stderr.close()


def test_sigterm_to_the_wrapper_revokes(lab: Lab, issuers: Issuers, tmp_path: Path) -> None:
    token = _token(tmp_path, "gh", issuers.github.github())
    marker = tmp_path / "has-access"
    wrapper = _start_holding_wrapper(lab, token, "5m", marker)
    try:
        assert wait_until(marker.exists, timeout=20)
        assert lab.can_connect(DB)
        wrapper.send_signal(signal.SIGTERM)
        _, err = wrapper.communicate(timeout=20)
        # The command got the signal too; the wrapper exits as it did (128 + 15).
        assert wrapper.returncode == 128 + signal.SIGTERM, err
    finally:
        _kill_session(wrapper)
    # Revoked at once, long before the 5-minute TTL.
    assert wait_until(lambda: not lab.can_connect(DB, timeout=0.3), timeout=10)
    (grant,) = lab.broker_json("grants", "--host", HOST_ID)
    assert grant["state"] == "revoked"


def test_sigkill_of_the_wrapper_leaves_the_ttl_as_the_hard_stop(
    lab: Lab, issuers: Issuers, tmp_path: Path
) -> None:
    token = _token(tmp_path, "gh", issuers.github.github())
    marker = tmp_path / "has-access"
    wrapper = _start_holding_wrapper(lab, token, "4s", marker)
    try:
        assert wait_until(marker.exists, timeout=20)
        opened = time.monotonic()
        # Only the wrapper dies: nothing is left to close the request.
        wrapper.kill()
        wrapper.wait(5)
        assert lab.can_connect(DB)
        # The kernel timeout closes it on time (4 s TTL, counted from the grant).
        assert wait_until(lambda: not lab.can_connect(DB, timeout=0.3), timeout=15)
        assert time.monotonic() - opened < 10
    finally:
        _kill_session(wrapper)
