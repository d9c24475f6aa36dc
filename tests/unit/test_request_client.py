"""portagent-request against a local HTTPS server that speaks the broker's request API.

The client runs as a real process (`python -m portagent.request`): real TLS with a CA made
in the test, real signals, a real child command. The server is a small fake of the
contract in ADR 0008 (POST /v1/requests, GET /v1/requests/{id}?wait=, POST .../close),
scripted per test; it records every call so the tests can see what the client sent —
and what it did not (no close after SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from portagent.request import api, cli, tokens
from portagent.testing.broker_service import BrokerPki, free_port, make_pki

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl"
GH_BEARER = "gh-runtime-bearer-0123"
RUN_TIMEOUT = 60


class FakeBroker:
    """Scripted: `mode` picks what POST /v1/requests answers; `decide` releases pending."""

    def __init__(self, pki: BrokerPki) -> None:
        self.mode = "granted"  # granted | pending | denied | unapplied
        self.calls: list[dict[str, Any]] = []
        self.decide = threading.Event()
        self.decision = "granted"  # what a pending request becomes once `decide` is set
        self.lock = threading.Lock()
        self.counter = 0
        self.requests: dict[str, dict[str, Any]] = {}
        self.gh_status = 200
        self.poll_status = 200  # what GET /v1/requests/{id} answers (503: unavailable)
        broker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                broker.handle(self, "GET")

            def do_POST(self) -> None:
                broker.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeBroker:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.decide.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def closes(self) -> list[str]:
        return [c["path"].split("/")[3] for c in self.calls
                if c["method"] == "POST" and c["path"].endswith("/close")]

    def creates(self) -> list[dict[str, Any]]:
        return [c["body"] for c in self.calls
                if c["method"] == "POST" and c["path"] == "/v1/requests"]

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, obj: dict[str, Any]) -> None:
        raw = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, reason: str,
               message: str, field: str = "") -> None:
        self._send(h, status, {"error": {"code": code, "reason": reason, "field": field,
                                         "message": message}})

    def _answer(self, h: BaseHTTPRequestHandler, status: int, rid: str) -> None:
        request = self.requests[rid]
        applied = request["state"] == "granted" and self.mode != "unapplied"
        grant = {"grant_id": "g-1"} if request["state"] == "granted" else None
        self._send(h, status, {"request": request, "grant": grant, "applied": applied})

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        auth = h.headers.get("Authorization", "")
        with self.lock:
            self.calls.append({"method": method, "path": parts.path, "query": parts.query,
                               "body": body, "auth": auth})
        if parts.path == "/gh-token":  # GitHub Actions' token endpoint
            audience = parse_qs(parts.query).get("audience", [""])[0]
            if self.gh_status != 200 or auth != f"bearer {GH_BEARER}":
                self._send(h, self.gh_status if self.gh_status != 200 else 401, {})
                return
            self._send(h, 200, {"value": f"gh.{audience}.jwt"})
            return
        if not auth.startswith("Bearer ") or auth == "Bearer refused":
            self._error(h, 401, "UNAUTHENTICATED", "TOKEN_EXPIRED", "the token expired")
            return
        if method == "GET" and parts.path == "/v1/whoami":
            self._send(h, 200, {"identity": {"label": "github:repo:octo/app"}})
            return
        if method == "POST" and parts.path == "/v1/requests":
            assert isinstance(body, dict)
            if self.mode == "denied":
                self._error(h, 403, "PERMISSION_DENIED", "TTL_TOO_LONG",
                            "rule ci-db allows at most 15m", "ttl")
                return
            with self.lock:
                self.counter += 1
                rid = f"r-{self.counter:016x}"
                state = "pending" if self.mode == "pending" else "granted"
                self.requests[rid] = {"id": rid, "state": state, "approvals_required": 1,
                                      "approvers": "dba", "approvals": []}
            self._answer(h, 201 if state == "granted" else 202, rid)
            return
        segments = parts.path.split("/")
        if len(segments) >= 4 and segments[:3] == ["", "v1", "requests"]:
            rid = segments[3]
            if rid not in self.requests:
                self._error(h, 404, "NOT_FOUND", "NO_SUCH_REQUEST", f"no request {rid}")
                return
            if method == "POST" and segments[4:] == ["close"]:
                request = self.requests[rid]
                request["state"] = "cancelled" if request["state"] == "pending" else "closed"
                self._answer(h, 200, rid)
                return
            if method == "GET" and len(segments) == 4 and self.poll_status != 200:
                self._error(h, self.poll_status, "UNAVAILABLE", "STORE_UNAVAILABLE",
                            "database unavailable")
                return
            if method == "GET" and len(segments) == 4:
                wait = int(parse_qs(parts.query).get("wait", ["0"])[0])
                if self.requests[rid]["state"] == "pending" and self.decide.wait(wait):
                    request = self.requests[rid]
                    if request["state"] == "pending":
                        request["state"] = self.decision
                        if self.decision == "denied":
                            request["approvals"] = [{"approver": {"label": "corp:dave"},
                                                     "approve": False, "comment": "not now"}]
                self._answer(h, 200, rid)
                return
        self._error(h, 404, "NOT_FOUND", "NO_ROUTE", parts.path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> BrokerPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(pki: BrokerPki) -> Iterator[FakeBroker]:
    fake = FakeBroker(pki).start()
    try:
        yield fake
    finally:
        fake.stop()


def _env(pki: BrokerPki, broker: FakeBroker, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PORTAGENT_", "ACTIONS_ID_TOKEN", "BUILDKITE"))}
    env.update(PORTAGENT_BROKER_URL=broker.url, PORTAGENT_BROKER_CA=str(pki.ca_pem),
               PORTAGENT_TOKEN=TOKEN)
    env.update(extra)
    return env


def _argv(*extra: str, command: list[str] | None = None) -> list[str]:
    argv = [sys.executable, "-m", "portagent.request", "--host", "db-1", "--port",
            "5432/tcp", "--ttl", "15m", "--reason", "INC-42", *extra]
    return [*argv, "--", *command] if command else argv


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          check=False)
    assert TOKEN not in done.stdout + done.stderr  # the token is never printed
    return done


def _wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; /proc tells.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


# -- the wrapper -------------------------------------------------------------------------


def test_runs_cmd_once_applied_passes_its_status_through_and_closes(
        pki: BrokerPki, broker: FakeBroker) -> None:
    done = _run(_argv(command=["sh", "-c", "exit 7"]), _env(pki, broker))
    assert done.returncode == 7, done.stderr
    (create,) = broker.creates()
    assert create["host"] == "db-1" and create["port"] == "5432"
    assert create["protocol"] == "tcp" and create["ttl"] == "15m"
    assert create["reason"] == "INC-42" and 0 < create["wait"] <= 30
    assert "sources" not in create  # the broker uses the requester's address
    assert broker.closes() == ["r-0000000000000001"]
    assert all(c["auth"] == f"Bearer {TOKEN}" for c in broker.calls)


def test_cmd_killed_by_a_signal_gives_128_plus_n(pki: BrokerPki, broker: FakeBroker) -> None:
    done = _run(_argv(command=["sh", "-c", "kill -USR1 $$"]), _env(pki, broker))
    assert done.returncode == 128 + signal.SIGUSR1
    assert broker.closes() == ["r-0000000000000001"]


def test_a_command_that_does_not_exist_is_127_and_the_request_is_closed(
        pki: BrokerPki, broker: FakeBroker, tmp_path: Path) -> None:
    done = _run(_argv(command=[str(tmp_path / "nope")]), _env(pki, broker))
    assert done.returncode == 127 and "command not found" in done.stderr
    assert broker.closes() == ["r-0000000000000001"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_to_the_wrapper_reaches_cmd_closes_and_exits_128_plus_n(
        pki: BrokerPki, broker: FakeBroker, tmp_path: Path, signum: int) -> None:
    pidfile = tmp_path / "pid"
    wrapper = subprocess.Popen(_argv(command=["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]),
                               env=_env(pki, broker), stderr=subprocess.PIPE, text=True)
    try:
        child = int(_wait_for(pidfile))
        assert broker.closes() == []
        wrapper.send_signal(signum)
        _, err = wrapper.communicate(timeout=RUN_TIMEOUT)
        assert wrapper.returncode == 128 + signum, err  # 143, 130, 129: sleep died of it
        assert not _alive(child)
        assert broker.closes() == ["r-0000000000000001"]
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait(10)


def test_sigterm_while_waiting_for_approval_cancels_the_request(
        pki: BrokerPki, broker: FakeBroker) -> None:
    broker.mode = "pending"
    wrapper = subprocess.Popen(_argv(command=["true"]), env=_env(pki, broker),
                               stderr=subprocess.PIPE, text=True)
    try:
        assert wrapper.stderr is not None
        line = wrapper.stderr.readline()
        assert "waiting for approval (request r-0000000000000001, needs 1 of group dba)" in line
        wrapper.send_signal(signal.SIGTERM)
        _, err = wrapper.communicate(timeout=RUN_TIMEOUT)
        assert wrapper.returncode == 128 + signal.SIGTERM, err
        assert broker.closes() == ["r-0000000000000001"]
        assert broker.requests["r-0000000000000001"]["state"] == "cancelled"
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait(10)


def test_sigkill_of_the_wrapper_closes_nothing(
        pki: BrokerPki, broker: FakeBroker, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    wrapper = subprocess.Popen(_argv(command=["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]),
                               env=_env(pki, broker), stderr=subprocess.DEVNULL)
    child = 0
    try:
        child = int(_wait_for(pidfile))
        wrapper.kill()
        wrapper.wait(RUN_TIMEOUT)
        # Give a close the chance it would have had: the CMD is still running, the
        # wrapper is gone, and the broker saw no close (the TTL is the hard stop).
        time.sleep(0.5)
        assert broker.closes() == []
        assert broker.requests["r-0000000000000001"]["state"] == "granted"
    finally:
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait(10)


def test_pending_then_granted_runs_cmd(pki: BrokerPki, broker: FakeBroker,
                                       tmp_path: Path) -> None:
    broker.mode = "pending"
    marker = tmp_path / "ran"
    wrapper = subprocess.Popen(_argv(command=["touch", str(marker)]), env=_env(pki, broker),
                               stderr=subprocess.PIPE, text=True)
    try:
        assert wrapper.stderr is not None
        line = wrapper.stderr.readline()
        assert "waiting for approval (request r-0000000000000001, needs 1 of group dba)" in line
        assert not marker.exists()
        broker.decide.set()
        _, err = wrapper.communicate(timeout=RUN_TIMEOUT)
        assert wrapper.returncode == 0, err
        assert marker.exists()
        assert broker.closes() == ["r-0000000000000001"]
        polls = [c for c in broker.calls if c["method"] == "GET"]
        assert polls and all(c["query"].startswith("wait=") for c in polls)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait(10)


def test_pending_then_denied_is_77_with_who_and_why(pki: BrokerPki, broker: FakeBroker,
                                                     tmp_path: Path) -> None:
    broker.mode, broker.decision = "pending", "denied"
    broker.decide.set()
    marker = tmp_path / "ran"
    done = _run(_argv(command=["touch", str(marker)]), _env(pki, broker))
    assert done.returncode == 77
    assert "request r-0000000000000001 denied by corp:dave: not now" in done.stderr
    assert not marker.exists()


def test_policy_denial_is_77_with_the_brokers_reason(pki: BrokerPki, broker: FakeBroker,
                                                     tmp_path: Path) -> None:
    broker.mode = "denied"
    marker = tmp_path / "ran"
    done = _run(_argv(command=["touch", str(marker)]), _env(pki, broker))
    assert done.returncode == 77
    assert "TTL_TOO_LONG (ttl): rule ci-db allows at most 15m" in done.stderr
    assert not marker.exists() and broker.closes() == []


def test_wait_approval_exceeded_closes_and_is_75(pki: BrokerPki, broker: FakeBroker) -> None:
    broker.mode = "pending"
    done = _run(_argv("--wait-approval", "2s", command=["true"]), _env(pki, broker))
    assert done.returncode == 75, done.stderr
    assert "gave up waiting for approval" in done.stderr
    assert broker.closes() == ["r-0000000000000001"]
    assert broker.requests["r-0000000000000001"]["state"] == "cancelled"


def test_broker_failing_while_waiting_is_69_and_the_request_is_withdrawn(
        pki: BrokerPki, broker: FakeBroker) -> None:
    broker.mode, broker.poll_status = "pending", 503
    done = _run(_argv(command=["true"]), _env(pki, broker))
    assert done.returncode == 69
    assert "STORE_UNAVAILABLE: database unavailable" in done.stderr
    assert broker.closes() == ["r-0000000000000001"]
    assert broker.requests["r-0000000000000001"]["state"] == "cancelled"


def test_granted_but_never_applied_times_out_too(pki: BrokerPki, broker: FakeBroker) -> None:
    broker.mode = "unapplied"
    done = _run(_argv("--wait-approval", "1s", command=["true"]), _env(pki, broker))
    assert done.returncode == 75, done.stderr
    assert "the host to apply it" in done.stderr
    assert broker.closes() == ["r-0000000000000001"]


def test_unauthenticated_is_77(pki: BrokerPki, broker: FakeBroker) -> None:
    done = _run(_argv(command=["true"]), _env(pki, broker, PORTAGENT_TOKEN="refused"))
    assert done.returncode == 77
    assert "TOKEN_EXPIRED: the token expired" in done.stderr


# -- without a command -------------------------------------------------------------------


def test_without_cmd_prints_the_id_and_leaves_access_open(pki: BrokerPki,
                                                          broker: FakeBroker) -> None:
    done = _run(_argv(), _env(pki, broker))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "r-0000000000000001"
    assert broker.closes() == []
    as_json = _run(_argv("--json"), _env(pki, broker))
    answer = json.loads(as_json.stdout)
    assert answer["request"]["id"] == "r-0000000000000002" and answer["applied"] is True


def test_close_by_id(pki: BrokerPki, broker: FakeBroker) -> None:
    opened = _run(_argv(), _env(pki, broker))
    rid = opened.stdout.strip()
    base = [sys.executable, "-m", "portagent.request"]
    done = _run([*base, "--close", rid], _env(pki, broker))
    assert done.returncode == 0, done.stderr
    assert broker.closes() == [rid]
    missing = _run([*base, "--close", "r-00000000000000ff"], _env(pki, broker))
    assert missing.returncode == 64 and "NO_SUCH_REQUEST" in missing.stderr


def test_whoami(pki: BrokerPki, broker: FakeBroker) -> None:
    done = _run([sys.executable, "-m", "portagent.request", "--whoami"], _env(pki, broker))
    assert json.loads(done.stdout)["identity"]["label"] == "github:repo:octo/app"


# -- broker trouble and usage ---------------------------------------------------------------


def test_unreachable_broker_is_69(pki: BrokerPki, broker: FakeBroker) -> None:
    env = _env(pki, broker, PORTAGENT_BROKER_URL=f"https://127.0.0.1:{free_port()}")
    done = _run(_argv(command=["true"]), env)
    assert done.returncode == 69 and "broker https://127.0.0.1:" in done.stderr


def test_untrusted_broker_certificate_is_69_and_names_the_ca_option(
        pki: BrokerPki, broker: FakeBroker, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    done = _run(_argv(), _env(pki, broker, PORTAGENT_BROKER_CA=str(other.ca_pem)))
    assert done.returncode == 69 and "--ca" in done.stderr
    assert broker.creates() == []


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--port", "5432/sctp"], {}, "--port"),
    (["--port", "70000"], {}, "--port"),
    (["--ttl", "soon"], {}, "--ttl"),
    (["--reason", ""], {}, "--reason"),
    (["--request-id", "a b"], {}, "--request-id"),
    (["--wait-approval", "x"], {}, "--wait-approval"),
    (["--broker", "http://broker.example"], {}, "--broker"),
    ([], {"PORTAGENT_BROKER_URL": "ftp://x"}, "PORTAGENT_BROKER_URL"),
    ([], {"PORTAGENT_BROKER_URL": ""}, "PORTAGENT_BROKER_URL"),
    (["--ca", "/nonexistent/ca.pem"], {}, "--ca"),
    (["--token-file", "/nonexistent/token"], {}, "--token-file /nonexistent/token"),
    ([], {"PORTAGENT_TOKEN": "two\nlines"}, "PORTAGENT_TOKEN"),
    ([], {"PORTAGENT_TOKEN": ""}, "PORTAGENT_TOKEN"),
    (["--oidc", "github"], {}, "ACTIONS_ID_TOKEN_REQUEST_URL"),
    (["--oidc", "gitlab"], {}, "--oidc"),
])
def test_usage_errors_are_64_name_the_option_and_send_nothing(
        pki: BrokerPki, broker: FakeBroker, args: list[str], env: dict[str, str],
        expected: str) -> None:
    argv = [*_argv(), *args]
    done = _run(argv, _env(pki, broker, **env))
    assert done.returncode == 64, done.stderr
    assert expected in done.stderr
    assert broker.calls == []


# -- where the token comes from -------------------------------------------------------------


def test_token_from_a_file(pki: BrokerPki, broker: FakeBroker, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-123\n")
    done = _run(_argv("--token-file", str(path)), _env(pki, broker))
    assert done.returncode == 0, done.stderr
    assert broker.calls[0]["auth"] == "Bearer file-token-123"


def test_token_from_the_github_actions_endpoint(pki: BrokerPki, broker: FakeBroker) -> None:
    env = _env(pki, broker, ACTIONS_ID_TOKEN_REQUEST_URL=f"{broker.url}/gh-token?api-version=2.0",
               ACTIONS_ID_TOKEN_REQUEST_TOKEN=GH_BEARER, SSL_CERT_FILE=str(pki.ca_pem))
    del env["PORTAGENT_TOKEN"]
    done = _run(_argv("--audience", "portagent-prod"), env)  # --oidc auto
    assert done.returncode == 0, done.stderr
    gh, create = broker.calls[0], broker.calls[1]
    assert gh["path"] == "/gh-token" and gh["auth"] == f"bearer {GH_BEARER}"
    assert parse_qs(gh["query"]) == {"api-version": ["2.0"], "audience": ["portagent-prod"]}
    assert create["auth"] == "Bearer gh.portagent-prod.jwt"
    assert GH_BEARER not in done.stderr + done.stdout


def test_github_endpoint_refusing_is_reported(pki: BrokerPki, broker: FakeBroker) -> None:
    broker.gh_status = 403
    env = _env(pki, broker, ACTIONS_ID_TOKEN_REQUEST_URL=f"{broker.url}/gh-token?x=1",
               ACTIONS_ID_TOKEN_REQUEST_TOKEN=GH_BEARER, SSL_CERT_FILE=str(pki.ca_pem))
    done = _run(_argv("--oidc", "github"), env)
    assert done.returncode == 64
    assert "ACTIONS_ID_TOKEN_REQUEST_URL answered HTTP 403" in done.stderr
    assert "id-token: write" in done.stderr


def _fake_buildkite_agent(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    agent = bin_dir / "buildkite-agent"
    agent.write_text("#!/bin/sh\n" + script)
    agent.chmod(0o755)


def test_token_from_buildkite_agent(pki: BrokerPki, broker: FakeBroker, tmp_path: Path) -> None:
    _fake_buildkite_agent(tmp_path / "bin", 'echo "$*" > "$(dirname "$0")/args"; echo bk.jwt\n')
    env = _env(pki, broker, BUILDKITE_JOB_ID="0190-job",
               PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    del env["PORTAGENT_TOKEN"]
    done = _run(_argv(), env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bin" / "args").read_text().split() == [
        "oidc", "request-token", "--audience", "portagent"]
    assert broker.calls[0]["auth"] == "Bearer bk.jwt"


def test_buildkite_agent_failing_is_69_with_its_message(pki: BrokerPki, broker: FakeBroker,
                                                        tmp_path: Path) -> None:
    _fake_buildkite_agent(tmp_path / "bin", "echo 'no OIDC for this job' >&2; exit 3\n")
    env = _env(pki, broker, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    done = _run(_argv("--oidc", "buildkite"), env)
    assert done.returncode == 69
    assert "exited 3: no OIDC for this job" in done.stderr
    assert broker.calls == []


def test_no_token_anywhere_names_every_source(pki: BrokerPki, broker: FakeBroker) -> None:
    env = _env(pki, broker)
    del env["PORTAGENT_TOKEN"]
    done = _run(_argv(), env)
    assert done.returncode == 64
    for name in ("--token-file", "PORTAGENT_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_URL",
                 "BUILDKITE_JOB_ID"):
        assert name in done.stderr


# -- the pure parts, in process ------------------------------------------------------------------


def test_durations() -> None:
    assert cli.parse_duration("90", "--ttl") == 90
    assert cli.parse_duration("1h30m", "--ttl") == 5400
    assert cli.parse_duration("250ms", "--ttl") == 0.25
    for bad in ("", "m", "1x", "1h 30m", "-5s", "1" * 40 + "s"):
        with pytest.raises(cli.UsageError, match="--ttl"):
            cli.parse_duration(bad, "--ttl")


def test_broker_urls() -> None:
    assert api.parse_broker_url("https://b.example/api/") == api.Endpoint(
        "https", "b.example", 443, "/api")
    assert api.parse_broker_url("http://127.0.0.1:8080").port == 8080
    assert api.parse_broker_url("http://[::1]:8080").host == "::1"
    for bad in ("b.example", "http://b.example", "https://u:p@b.example", "https://b/?q=1",
                "https://b.example:99999", "https://"):
        with pytest.raises(ValueError, match=r"\S"):
            api.parse_broker_url(bad)


def test_token_shape() -> None:
    assert tokens.check_token(" a.b.c\n", "X") == "a.b.c"
    for bad in ("", "a b", "a\nb", "é", "x" * (tokens.MAX_TOKEN + 1)):
        with pytest.raises(tokens.TokenError, match=r"^X: "):
            tokens.check_token(bad, "X")


def test_a_broker_error_body_is_parsed_once_and_bounded() -> None:
    with pytest.raises(api.BrokerError) as caught:
        api._answer(403, json.dumps({"error": {"code": "PERMISSION_DENIED", "reason": "R",
                                               "field": "ttl", "message": "m" * 900}}).encode())
    assert (caught.value.status, caught.value.reason, caught.value.field) == (403, "R", "ttl")
    assert len(caught.value.message) == 500
    with pytest.raises(api.BrokerError, match="not a JSON object"):
        api._answer(200, b"[1]")
    with pytest.raises(api.BrokerError, match="HTTP 502: <html>"):
        api._answer(502, b"<html>bad gateway</html>")
    with pytest.raises(api.BrokerError, match="no request"):
        api.request_view({"request": {"id": 1, "state": "granted"}, "grant": None,
                          "applied": True})


def test_the_client_loads_nothing_heavy() -> None:
    # What the imports add to a bare interpreter (a venv's site may load some already).
    code = ("import sys; base = set(sys.modules); import json, portagent.request.cli, "
            "portagent.request.run, portagent.request.api, portagent.request.tokens; "
            "print(json.dumps(sorted(set(sys.modules) - base)))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         check=True, timeout=60)
    loaded = set(json.loads(out.stdout))
    heavy = ("grpc", "cryptography", "google", "portagent.wire", "portagent.agent",
             "portagent.broker", "portagent.testing", "jwt", "cedarpy", "sqlalchemy",
             # not even these: each costs milliseconds of the 50 ms budget
             "http.client", "email", "argparse", "urllib", "ssl", "subprocess")
    assert not {n for n in loaded if any(n == h or n.startswith(h + ".") for h in heavy)}


def test_trace_names_each_phase_in_order(pki: BrokerPki, broker: FakeBroker) -> None:
    done = _run(_argv(command=["true"]), _env(pki, broker, PORTAGENT_REQUEST_TRACE="1"))
    assert done.returncode == 0, done.stderr
    traced = [line.split()[2:] for line in done.stderr.splitlines() if " trace " in line]
    assert [p for p, _ in traced] == ["main", "token", "connected", "created", "applied",
                                      "closing", "closed"]
    times = [float(t) for _, t in traced]
    assert times == sorted(times)


# -- the small HTTP/1.1 client, against scripted answers -----------------------------------


class RawServer:
    """TLS on loopback; each connection answers each request with the next scripted bytes
    (None: close the connection without answering)."""

    def __init__(self, pki: BrokerPki, answers: list[bytes | None]) -> None:
        self.answers = list(answers)
        self.connections = 0
        self.requests: list[bytes] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with self.context.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(10)
                while self.answers:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if not data:
                        break
                    self.requests.append(data)
                    answer = self.answers.pop(0)
                    if answer is None:
                        break
                    conn.sendall(answer)
                    if b"Connection: close" in answer:
                        break

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)


def _raw(pki: BrokerPki, answers: list[bytes | None]) -> tuple[RawServer, api.Broker]:
    server = RawServer(pki, answers)
    return server, api.Broker(server.url, TOKEN, str(pki.ca_pem))


OK_JSON = b'{"identity": {"label": "x"}}'


def test_http_content_length_keep_alive_and_chunked(pki: BrokerPki) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n" + OK_JSON[:5] + b"\r\n" + f"{len(OK_JSON) - 5:x}".encode() + b"\r\n"
               + OK_JSON[5:] + b"\r\n0\r\n\r\n")
    server, broker = _raw(pki, [
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(OK_JSON), OK_JSON),
        chunked])
    try:
        assert broker.whoami() == {"identity": {"label": "x"}}
        assert broker.whoami() == {"identity": {"label": "x"}}
        assert server.connections == 1  # kept alive
        first = server.requests[0].decode()
        assert first.startswith("GET /v1/whoami HTTP/1.1\r\n")
        assert f"Authorization: Bearer {TOKEN}\r\n" in first
        assert f"Host: 127.0.0.1:{server.url.rsplit(':', 1)[1]}\r\n" in first
    finally:
        broker.drop()
        server.close()


def test_http_body_until_close_and_a_dropped_kept_alive_connection(pki: BrokerPki) -> None:
    # The first connection answers, then is closed by the server without saying so; the
    # second call notices (no byte of an answer) and retries once on a fresh connection.
    server, broker = _raw(pki, [
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(OK_JSON), OK_JSON),
        None,
        b"HTTP/1.0 200 OK\r\n\r\n" + OK_JSON])
    try:
        assert broker.whoami()["identity"]["label"] == "x"
        assert broker.whoami()["identity"]["label"] == "x"
        assert server.connections == 2
    finally:
        broker.drop()
        server.close()


@pytest.mark.parametrize(("answer", "message"), [
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n", "larger than"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "longer than"),
    (b"HTTP/1.1 200 OK\r\n bad\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\n{}", "middle of"),
])
def test_http_answers_that_are_refused(pki: BrokerPki, answer: bytes, message: str) -> None:
    server, broker = _raw(pki, [answer])
    try:
        with pytest.raises(api.BrokerError, match=message) as caught:
            broker.whoami()
        assert caught.value.status == 0 and run_exit(caught.value) == 69
    finally:
        broker.drop()
        server.close()


def run_exit(err: api.BrokerError) -> int:
    from portagent.request.run import exit_code

    return exit_code(err)


def test_parse_args() -> None:
    opts = cli.parse_args(["--host=db-1", "--source", "10.0.0.0/8", "--source=10.1.0.0/16",
                           "--json", "--ttl", "5m"])
    assert (opts.host, opts.source, opts.json, opts.ttl) == (
        "db-1", ["10.0.0.0/8", "10.1.0.0/16"], True, "5m")
    for bad, name in ((["--hots", "x"], "--hots"), (["--host"], "--host"),
                      (["--json=1"], "--json"), (["--ttl", "1m", "--ttl", "2m"], "--ttl"),
                      (["sh"], "'sh'")):
        with pytest.raises(cli.UsageError, match=name):
            cli.parse_args(bad)
    assert cli.parse_port("8000-8010/udp") == ("8000-8010", "udp")
    for bad_port in ("0", "65536", "10-5", "5/icmp", "٣", "1-", "-1", ""):
        with pytest.raises(cli.UsageError, match="--port"):
            cli.parse_port(bad_port)


def test_help_prints_every_option() -> None:
    done = subprocess.run([sys.executable, "-m", "portagent.request", "--help"],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 0
    for name in cli.OPTIONS:
        assert name in done.stdout
    assert "TTL is the hard stop" in done.stdout
