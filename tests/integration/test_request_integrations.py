"""The CI integrations, executed: the GitHub Actions composite actions' `run:` steps and
the Buildkite plugin's hooks run with bash, as the CI services would run them, against a
real `portagent-broker serve` (issuers and a Cedar policy configured, a simulated agent
acknowledging every generation) and a local test OIDC issuer standing in for GitHub's
token endpoint and `buildkite-agent oidc request-token`.

action.yml is read with a small reader for the subset of YAML it uses (PyYAML is not a
dependency); every `${{ ... }}` expression must be one the test knows how to substitute,
so an action that starts using another fails here rather than in CI.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from portagent.testing.broker_service import (
    BrokerPki,
    BrokerService,
    SimAgent,
    StreamEnded,
    make_pki,
)
from portagent.testing.oidc_issuer import TestIssuer
from portagent.wire.hoststate import open_host_state

ROOT = Path(__file__).resolve().parents[2]
GITHUB = ROOT / "integrations" / "github-actions"
BUILDKITE = ROOT / "integrations" / "buildkite"
HOST = "db-1"
STEP_TIMEOUT = 90

POLICY = f"""
@id("ci-github-db")
@max_ttl("10m")
permit(principal is GithubWorkflow, action == Action::"request", resource in Host::"{HOST}")
when {{ principal.repository == "octo-org/app" && resource.port == 5432 }};

@id("ci-buildkite-db")
@max_ttl("10m")
permit(principal is BuildkiteJob, action == Action::"request", resource in Host::"{HOST}")
when {{ principal.pipeline_slug == "deploy" && resource.port == 5432 }};
"""


# -- a reader for the YAML subset of action.yml ------------------------------------------


def _scalar(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def read_yaml(text: str) -> Any:
    """Mappings, lists of mappings, plain/quoted scalars, `|` and `>-` blocks, comments."""
    lines = [(len(raw) - len(raw.lstrip(" ")), raw.strip(), raw) for raw in text.splitlines()]
    pos = 0

    def block(indent: int) -> Any:
        nonlocal pos
        result: Any = None
        while pos < len(lines):
            ind, stripped, raw = lines[pos]
            if not stripped or stripped.startswith("#"):
                pos += 1
                continue
            if ind < indent:
                break
            if stripped.startswith("- "):
                result = [] if result is None else result
                assert isinstance(result, list), raw
                # A list item: re-read its first line as a mapping key at the item's indent.
                lines[pos] = (ind + 2, stripped[2:], raw)
                result.append(block(ind + 2))
                continue
            result = {} if result is None else result
            assert isinstance(result, dict), raw
            key, sep, rest = stripped.partition(":")
            assert sep, f"not a mapping line: {raw!r}"
            rest = rest.strip()
            pos += 1
            if rest in ("|", ">-", ">"):
                body: list[str] = []
                while pos < len(lines) and (not lines[pos][1] or lines[pos][0] > ind):
                    body.append(lines[pos][2])
                    pos += 1
                common = min((len(b) - len(b.lstrip(" ")) for b in body if b.strip()), default=0)
                chunk = [b[common:] for b in body]
                joined = "\n".join(chunk).rstrip("\n")
                result[key] = joined + "\n" if rest == "|" else " ".join(joined.split())
            elif rest and not rest.startswith("#"):
                result[key] = _scalar(rest)
            else:
                result[key] = block(ind + 1)
        return result

    return block(0)


_EXPR = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")


@dataclass
class ActionRun:
    returncode: int
    stdout: str
    stderr: str
    outputs: dict[str, str] = field(default_factory=dict)


def run_action(action_dir: Path, inputs: dict[str, str], env: dict[str, str],
               work: Path) -> ActionRun:
    """Run a composite action's steps as the runner would (bash -e per step)."""
    spec = read_yaml((action_dir / "action.yml").read_text())
    assert spec["runs"]["using"] == "composite"
    declared = spec["inputs"]
    unknown = set(inputs) - set(declared)
    assert not unknown, f"inputs the action does not declare: {unknown}"
    values = {name: inputs.get(name, (d or {}).get("default", "")) for name, d in declared.items()}
    missing = [n for n, d in declared.items() if (d or {}).get("required") == "true"
               and not values[n]]
    assert not missing, f"required inputs missing: {missing}"
    step_outputs: dict[str, dict[str, str]] = {}

    def substitute(text: str) -> str:
        def one(match: re.Match[str]) -> str:
            expr = match.group(1)
            if expr.startswith("inputs."):
                return str(values[expr.removeprefix("inputs.")])
            if expr == "github.action_path":
                return str(action_dir)
            found = re.fullmatch(r"steps\.([\w-]+)\.outputs\.([\w-]+)", expr)
            if found:
                return step_outputs.get(found.group(1), {}).get(found.group(2), "")
            raise AssertionError(f"an expression the test does not know: {expr}")

        return _EXPR.sub(one, text)

    out, err = [], []
    for index, step in enumerate(spec["runs"]["steps"]):
        assert step["shell"] == "bash"
        output_file = work / f"github-output-{index}"
        output_file.write_text("")
        step_env = {**env, "GITHUB_OUTPUT": str(output_file), "RUNNER_TEMP": str(work)}
        step_env.update({k: substitute(v) for k, v in (step.get("env") or {}).items()})
        # The runner's bash for `shell: bash`: --noprofile --norc -eo pipefail {0}
        script = work / f"step-{index}.sh"
        script.write_text(substitute(step["run"]))
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                              env=step_env, capture_output=True, text=True,
                              timeout=STEP_TIMEOUT, check=False, cwd=work)
        out.append(done.stdout)
        err.append(done.stderr)
        produced = dict(line.split("=", 1) for line in output_file.read_text().splitlines()
                        if "=" in line)
        step_outputs[step.get("id", str(index))] = produced
        if done.returncode != 0:
            return ActionRun(done.returncode, "".join(out), "".join(err))
    outputs = {name: substitute(o["value"]) for name, o in (spec.get("outputs") or {}).items()}
    return ActionRun(0, "".join(out), "".join(err), outputs)


def test_the_yaml_reader_reads_what_the_actions_use() -> None:
    spec = read_yaml((GITHUB / "request" / "action.yml").read_text())
    assert spec["inputs"]["ttl"]["default"] == "15m"
    assert spec["inputs"]["broker"]["required"] == "true"
    (step,) = spec["runs"]["steps"]
    assert step["id"] == "request" and step["env"]["PA_HOST"] == "${{ inputs.host }}"
    assert step["run"].startswith("set -euo pipefail\n") and step["run"].endswith("\n")
    assert spec["outputs"]["request-id"]["value"] == "${{ steps.request.outputs.request-id }}"
    assert "OIDC token" in spec["description"]


# -- a real broker and an agent that acknowledges ------------------------------------------


class AckingAgent:
    """A simulated agent on the broker's fleet stream that acknowledges every generation."""

    def __init__(self, broker: BrokerService, pki: BrokerPki) -> None:
        self.keys = pki.public_keys()
        self.agent = SimAgent(broker.fleet_address, pki, HOST)
        self.generations: queue.Queue[int] = queue.Queue()
        self._stop = threading.Event()
        self.agent.hello(generation=0)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.agent.recv(timeout=0.2)
            except queue.Empty:
                continue
            except StreamEnded:
                return
            kind = message.WhichOneof("message")
            if kind == "snapshot":
                generation = open_host_state(message.snapshot, self.keys, HOST).generation
            elif kind == "change":
                generation = message.change.generation
            else:
                continue
            self.agent.ack(generation)
            self.generations.put(generation)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.agent.close()


@dataclass
class World:
    broker: BrokerService
    issuer: TestIssuer  # GitHub's token endpoint
    bk_issuer: TestIssuer  # behind the fake buildkite-agent
    bin_dir: Path
    work: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PORTAGENT_", "ACTIONS_ID_TOKEN", "BUILDKITE", "GITHUB"))}
        env["PATH"] = f"{self.bin_dir}:{env['PATH']}"
        env["SSL_CERT_FILE"] = str(self.issuer.ca_path)  # the runner's CAs trust the issuer
        env.update(extra)
        return env

    def github_env(self) -> dict[str, str]:
        return self.env(ACTIONS_ID_TOKEN_REQUEST_URL=self.issuer.github_request_url,
                        ACTIONS_ID_TOKEN_REQUEST_TOKEN=self.issuer.github_request_token,
                        GITHUB_REPOSITORY="octo-org/app", GITHUB_WORKFLOW="deploy",
                        GITHUB_RUN_ID="4242")

    def request(self, request_id: str) -> dict[str, Any]:
        status, body = self.broker.request("GET", f"/v1/requests/{request_id}")
        assert status == 200, body
        shown: dict[str, Any] = body
        return shown

    def requests(self) -> list[dict[str, Any]]:
        status, body = self.broker.request("GET", "/v1/requests")
        assert status == 200, body
        listed: list[dict[str, Any]] = body["requests"]
        return listed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> BrokerPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def world(tmp_path: Path, pki: BrokerPki) -> Iterator[World]:
    policy = tmp_path / "policy.cedar"
    policy.write_text(POLICY)
    with TestIssuer(tmp_path / "issuer") as issuer, TestIssuer(tmp_path / "bk") as bk_issuer:
        broker = BrokerService(tmp_path / "broker", pki)
        with broker.config_path.open("a") as config:
            config.write(f"""
[service.policy]
file = "{policy}"

[[service.issuers]]
name = "gh"
kind = "github"
issuer = "{issuer.url}"
audience = "portagent"
jwks_file = "{issuer.jwks_path}"

[[service.issuers]]
name = "bk"
kind = "buildkite"
issuer = "{bk_issuer.url}"
audience = "portagent"
jwks_file = "{bk_issuer.jwks_path}"
""")
        agent: AckingAgent | None = None
        try:
            broker.start()
            status, body = broker.request("POST", "/v1/hosts", {"host_id": HOST})
            assert status == 201, body
            agent = AckingAgent(broker, pki)
            bin_dir = tmp_path / "bin"
            bk_issuer.write_fake_buildkite_agent(bin_dir)
            work = tmp_path / "work"
            work.mkdir()
            yield World(broker, issuer, bk_issuer, bin_dir, work)
        finally:
            if agent is not None:
                agent.close()
            broker.close()


INPUTS = {"broker": "", "ca": "", "host": HOST, "port": "5432/tcp", "ttl": "5m",
          "reason": "INC-42"}


def _inputs(world: World, **changes: str) -> dict[str, str]:
    return {**INPUTS, "broker": world.broker.api_url, "ca": str(world.broker.pki.ca_pem),
            **changes}


# -- GitHub Actions -------------------------------------------------------------------------


def test_github_request_then_close(world: World) -> None:
    opened = run_action(GITHUB / "request", _inputs(world), world.github_env(), world.work)
    assert opened.returncode == 0, opened.stderr
    request_id = opened.outputs["request-id"]
    assert re.fullmatch(r"r-[0-9a-f]{16}", request_id), opened.outputs
    shown = world.request(request_id)
    assert shown["request"]["state"] == "granted" and shown["applied"] is True
    assert shown["request"]["requester"]["claims"]["repository"] == "octo-org/app"
    assert shown["grant"]["sources"] == ["127.0.0.1/32"]  # the runner's address
    assert ("github", "portagent") in world.issuer.token_requests

    closed = run_action(GITHUB / "close",
                        {"broker": world.broker.api_url, "ca": str(world.broker.pki.ca_pem),
                         "request-id": request_id}, world.github_env(), world.work)
    assert closed.returncode == 0, closed.stderr
    shown = world.request(request_id)
    assert shown["request"]["state"] == "closed" and shown["grant"]["state"] == "revoked"


def test_github_close_without_a_request_does_nothing(world: World) -> None:
    done = run_action(GITHUB / "close", {"broker": world.broker.api_url}, world.github_env(),
                      world.work)
    assert done.returncode == 0 and "no request to close" in done.stdout
    assert world.requests() == []


def test_github_run_is_job_bound(world: World) -> None:
    marker = world.work / "ran"
    ca_pem = world.broker.pki.ca_pem.read_text()  # the CA as PEM text, as from a variable
    done = run_action(GITHUB / "request",
                      _inputs(world, ca=ca_pem, reason="",
                              run=f'echo "inside $PORTAGENT_BROKER_URL" > {marker}; exit 3'),
                      world.github_env(), world.work)
    assert done.returncode == 3, done.stderr  # the command's status
    assert marker.read_text().startswith("inside https://")
    (request,) = world.requests()
    assert request["state"] == "closed"
    assert request["reason"] == "octo-org/app deploy run 4242"


def test_github_denied_by_policy_fails_the_step_with_the_reason(world: World) -> None:
    done = run_action(GITHUB / "request", _inputs(world, port="22/tcp"), world.github_env(),
                      world.work)
    assert done.returncode == 77
    assert "portagent-request:" in done.stderr and not done.outputs
    assert world.requests() == []
    assert world.issuer.github_request_token not in done.stdout + done.stderr


def test_github_without_id_token_permission_says_so(world: World) -> None:
    done = run_action(GITHUB / "request", _inputs(world), world.env(), world.work)
    assert done.returncode == 64
    assert "id-token: write" in done.stderr


# -- Buildkite --------------------------------------------------------------------------------


def _plugin_env(world: World, **changes: str) -> dict[str, str]:
    settings = {
        "BUILDKITE_JOB_ID": "0190b2f4-5d2e-4c1a-9a53-6e2f8b1c0d42",
        "BUILDKITE_PIPELINE_SLUG": "deploy", "BUILDKITE_BUILD_NUMBER": "17",
        "BUILDKITE_PLUGIN_PORTAGENT_BROKER": world.broker.api_url,
        "BUILDKITE_PLUGIN_PORTAGENT_CA": str(world.broker.pki.ca_pem),
        "BUILDKITE_PLUGIN_PORTAGENT_HOST": HOST, "BUILDKITE_PLUGIN_PORTAGENT_PORT": "5432/tcp",
        "BUILDKITE_PLUGIN_PORTAGENT_TTL": "5m", "TMPDIR": str(world.work)}
    return world.env(**{**settings, **changes})


def _hook(name: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(BUILDKITE / "hooks" / name)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False)


def test_buildkite_pre_command_opens_and_pre_exit_closes(world: World) -> None:
    env = _plugin_env(world)
    opened = _hook("pre-command", env, world.work)
    assert opened.returncode == 0, opened.stderr
    id_file = world.work / "portagent-request-0190b2f4-5d2e-4c1a-9a53-6e2f8b1c0d42"
    request_id = id_file.read_text().strip()
    assert (id_file.stat().st_mode & 0o777) == 0o600
    shown = world.request(request_id)
    assert shown["request"]["state"] == "granted" and shown["applied"] is True
    assert shown["request"]["requester"]["claims"]["pipeline_slug"] == "deploy"
    assert shown["request"]["reason"] == (
        "buildkite deploy #17 job 0190b2f4-5d2e-4c1a-9a53-6e2f8b1c0d42")
    assert ("buildkite", "portagent") in world.bk_issuer.token_requests

    closed = _hook("pre-exit", env, world.work)
    assert closed.returncode == 0, closed.stderr
    assert not id_file.exists()
    assert world.request(request_id)["request"]["state"] == "closed"
    again = _hook("pre-exit", env, world.work)
    assert again.returncode == 0 and "no request to close" in again.stdout


def test_buildkite_denied_fails_pre_command_and_keeps_nothing(world: World) -> None:
    env = _plugin_env(world, BUILDKITE_PLUGIN_PORTAGENT_PORT="22/tcp",
                      BUILDKITE_PLUGIN_PORTAGENT_REASON="INC-9")
    done = _hook("pre-command", env, world.work)
    assert done.returncode == 77
    assert not list(world.work.glob("portagent-request-*"))
    assert world.requests() == []


def test_buildkite_missing_option_is_named(world: World) -> None:
    env = _plugin_env(world)
    del env["BUILDKITE_PLUGIN_PORTAGENT_HOST"]
    done = _hook("pre-command", env, world.work)
    assert done.returncode != 0 and "host is required" in done.stderr
