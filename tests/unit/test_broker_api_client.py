"""The CLI's HTTPS client of the broker service, against a real TLS socket.

The server here is the standard library's http.server behind real TLS with
certificates made in the test; it answers recorded shapes of the API only so the
client's handling of errors can be tested: connection refused, TLS failures (wrong
CA, expired or missing client certificate), error bodies, 503 and dropped
connections with retries. The CLI against the real service is in
tests/unit/test_broker_cli.py.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from portagent.broker import cli, pki
from portagent.broker.api_client import (
    ApiClient,
    ApiConfigError,
    ApiRefusedError,
    ApiUnreachableError,
    read_token,
    ssl_context,
)
from portagent.broker.settings import ApiSettings

NOW = dt.datetime.now(dt.UTC)
TTL_ERROR = {
    "error": {
        "code": "INVALID_ARGUMENT",
        "reason": "INVALID_TTL",
        "field": "ttl",
        "message": "ttl: '0s' must be longer than 0s",
    }
}


@dataclass
class Tls:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    expired_cert: Path
    expired_key: Path
    other_ca: Path


def _write_leaf(
    directory: Path, stem: str, ca_key: Any, ca: x509.Certificate, usage: Any, **kw: Any
) -> tuple[Path, Path]:
    key = pki.new_tls_key()
    cert = pki.issue_leaf(ca_key, ca, key.public_key(), usage=usage, **kw)
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    pki.write_atomic(cert_path, pki.cert_pem(cert), 0o644)
    pki.write_atomic(key_path, pki.private_key_pem(key), 0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    directory = tmp_path_factory.mktemp("tls")
    ca_key = pki.new_tls_key()
    ca = pki.make_ca(ca_key, NOW)
    pki.write_atomic(directory / "ca.pem", pki.cert_pem(ca), 0o644)
    other_key = pki.new_tls_key()
    pki.write_atomic(directory / "other.pem", pki.cert_pem(pki.make_ca(other_key, NOW)), 0o644)
    server = _write_leaf(
        directory, "server", ca_key, ca, ExtendedKeyUsageOID.SERVER_AUTH,
        common_name="broker", sans=pki.service_sans(["127.0.0.1"]), now=NOW,
    )  # fmt: skip
    client = _write_leaf(
        directory, "client", ca_key, ca, ExtendedKeyUsageOID.CLIENT_AUTH,
        common_name="ops", now=NOW,
    )  # fmt: skip
    expired = _write_leaf(
        directory, "expired", ca_key, ca, ExtendedKeyUsageOID.CLIENT_AUTH,
        common_name="ops", now=NOW - dt.timedelta(days=30), days=2,
    )  # fmt: skip
    return Tls(directory, directory / "ca.pem", *server, *client, *expired, directory / "other.pem")


Answer = tuple[int, Any]  # (status, JSON value | bytes | None = drop the connection)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class ApiStub:
    """Answers requests from a script, keyed by "METHOD /path" (query string included)."""

    url: str
    requests: list[Recorded] = field(default_factory=list)
    script: dict[str, list[Answer]] = field(default_factory=dict)

    def on(self, route: str, *answers: Answer) -> None:
        self.script.setdefault(route, []).extend(answers)


def _handler(stub: ApiStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            stub.requests.append(
                Recorded(
                    self.command,
                    self.path,
                    dict(self.headers.items()),
                    json.loads(raw) if raw else None,
                )
            )
            answers = stub.script.get(f"{self.command} {self.path}") or [(404, {"error": {
                "code": "NOT_FOUND", "reason": "NO_ROUTE", "message": self.path}})]  # fmt: skip
            status, value = answers.pop(0) if len(answers) > 1 else answers[0]
            if value is None:  # drop the connection without an answer
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            data = value if isinstance(value, bytes) else json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815

    return Handler


@pytest.fixture
def serve(tls: Tls) -> Iterator[Callable[..., ApiStub]]:
    servers: list[ThreadingHTTPServer] = []

    def start(*, require_client_cert: bool = False, tls12: bool = False) -> ApiStub:
        stub = ApiStub("")
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.server_cert, tls.server_key)
        if tls12:
            # The client certificate is checked inside the handshake, so the server's
            # alert always reaches the client (TLS 1.3 may lose it to the close).
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(tls.ca)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()  # fmt: skip
        servers.append(server)
        stub.url = f"https://127.0.0.1:{server.server_address[1]}"
        return stub

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _client(stub_url: str, tls: Tls, **kw: Any) -> ApiClient:
    cert = kw.pop("cert", None)
    key = kw.pop("key", None)
    ca = kw.pop("ca", tls.ca)
    return ApiClient(
        stub_url, context=ssl_context(ca, cert, key), token=kw.pop("token", "t0ken"),
        client_cert=cert, ca_file=ca, timeout=5, **kw,
    )  # fmt: skip


def test_error_body_becomes_a_refusal_naming_field_code_and_reason(
    serve: Callable[..., ApiStub], tls: Tls
) -> None:
    stub = serve()
    stub.on("POST /v1/grants", (400, TTL_ERROR))
    with _client(stub.url, tls) as api, pytest.raises(ApiRefusedError) as caught:
        api.create_grant({"ttl": "0s", "request_id": "r-1"})
    assert str(caught.value) == "ttl: '0s' must be longer than 0s (INVALID_ARGUMENT INVALID_TTL)"
    assert (caught.value.status, caught.value.field) == (400, "ttl")
    assert len(stub.requests) == 1  # a refusal is an answer: never retried
    assert stub.requests[0].headers["Authorization"] == "Bearer t0ken"


def test_cli_prints_the_refusal_and_exits_2(
    serve: Callable[..., ApiStub], tls: Tls, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    stub = serve()
    stub.on("POST /v1/grants", (400, TTL_ERROR))
    exists = {"code": "ALREADY_EXISTS", "reason": "HOST_EXISTS", "field": "host_id",
              "message": "web1 exists"}  # fmt: skip
    stub.on("POST /v1/hosts", (409, {"error": exists}))
    token = tmp_path / "token"
    pki.write_atomic(token, b"t0ken\n", 0o600)
    config = tmp_path / "broker.toml"
    config.write_text(f'[api]\nurl = "{stub.url}"\nca = "{tls.ca}"\ntoken_file = "{token}"\n')
    monkeypatch.setenv(cli.CONFIG_ENV, str(config))
    args = ["grant", "--host", "web1", "--source", "192.0.2.1", "--port", "22", "--ttl", "0s",
            "--subject", "alice", "--reason", "X"]  # fmt: skip
    assert cli.main(args) == 2
    assert capsys.readouterr().err == (
        "portagent-broker: ttl: '0s' must be longer than 0s (INVALID_ARGUMENT INVALID_TTL)\n"
    )
    body = stub.requests[-1].body
    assert body["ttl"] == "0s" and body["port"] == "22" and body["sources"] == ["192.0.2.1"]
    assert body["request_id"].startswith("cli-") and body["reason"] == "X"
    # A refusal that is not about the input: exit 1.
    assert cli.main(["hosts", "add", "web1"]) == 1
    assert capsys.readouterr().err == (
        "portagent-broker: host_id: web1 exists (ALREADY_EXISTS HOST_EXISTS)\n"
    )


def test_post_retried_with_the_same_request_id_after_a_drop_and_a_503(
    serve: Callable[..., ApiStub], tls: Tls
) -> None:
    stub = serve()
    grant = {"grant_id": "g-0123456789abcdef", "state": "active"}
    unavailable = {"error": {"code": "UNAVAILABLE", "reason": "DATABASE", "message": "db down"}}
    stub.on("POST /v1/grants", (0, None), (503, unavailable), (201, {"grant": grant}))
    with _client(stub.url, tls) as api:
        assert api.create_grant({"request_id": "r-42"}) == grant
    assert [r.body["request_id"] for r in stub.requests] == ["r-42"] * 3


def test_retries_are_bounded_and_non_idempotent_posts_are_not_retried(
    serve: Callable[..., ApiStub], tls: Tls
) -> None:
    stub = serve()
    unavailable = {"error": {"code": "UNAVAILABLE", "reason": "DATABASE", "message": "db down"}}
    stub.on("POST /v1/grants", (503, unavailable))
    stub.on("POST /v1/hosts", (503, unavailable))
    with _client(stub.url, tls, tries=3) as api:
        with pytest.raises(ApiRefusedError, match=r"db down \(UNAVAILABLE DATABASE\)"):
            api.create_grant({"request_id": "r-1"})
        assert len(stub.requests) == 3
        with pytest.raises(ApiRefusedError):
            api.add_host("web1", {})
    assert len(stub.requests) == 4


def test_connection_refused_names_the_url(tls: Tls) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connect is refused
        with (
            _client(f"https://127.0.0.1:{port}", tls, tries=2) as api,
            pytest.raises(ApiUnreachableError) as caught,
        ):
            api.health()
    assert str(caught.value).startswith(f"broker service at https://127.0.0.1:{port}: ")
    assert "connection refused" in str(caught.value)


def test_server_certificate_from_another_ca(serve: Callable[..., ApiStub], tls: Tls) -> None:
    stub = serve()
    with (
        _client(stub.url, tls, ca=tls.other_ca) as api,
        pytest.raises(ApiUnreachableError) as caught,
    ):
        api.health()
    message = str(caught.value)
    assert f"TLS: the service's certificate failed verification against {tls.other_ca}" in message
    assert stub.requests == []


def test_expired_and_missing_client_certificate(serve: Callable[..., ApiStub], tls: Tls) -> None:
    stub = serve(require_client_cert=True, tls12=True)
    stub.on("GET /v1/healthz", (200, {"status": "ok"}))
    with _client(stub.url, tls, cert=tls.client_cert, key=tls.client_key) as api:
        assert api.health() == {"status": "ok"}
    with (
        _client(stub.url, tls, cert=tls.expired_cert, key=tls.expired_key) as api,
        pytest.raises(ApiUnreachableError) as caught,
    ):
        api.health()
    assert f"refused our client certificate ({tls.expired_cert}): certificate expired" in str(
        caught.value
    )
    with _client(stub.url, tls) as api, pytest.raises(ApiUnreachableError) as caught:
        api.health()
    assert "client certificate (none configured: set api.cert and api.key)" in str(caught.value)
    assert len(stub.requests) == 1


def test_answer_without_the_api_error_body(serve: Callable[..., ApiStub], tls: Tls) -> None:
    stub = serve()
    stub.on("GET /v1/hosts", (502, b"<html>bad gateway</html>"))
    with _client(stub.url, tls) as api, pytest.raises(ApiUnreachableError) as caught:
        api.list_hosts()
    assert "HTTP 502 without the API's error body: '<html>bad gateway</html>'" in str(caught.value)
    assert len(stub.requests) == 1  # not a 503: not retried


def test_grants_follow_next_after_and_quote_filters(
    serve: Callable[..., ApiStub], tls: Tls
) -> None:
    stub = serve()
    first = "GET /v1/grants?label=env%3Dprod&host=web1&limit=2"
    stub.on(first, (200, {"grants": [{"grant_id": "g-1"}, {"grant_id": "g-2"}],
                          "next_after": "g-2"}))  # fmt: skip
    stub.on(first + "&after=g-2", (200, {"grants": [{"grant_id": "g-3"}], "next_after": None}))
    with _client(stub.url, tls) as api:
        grants = list(api.iter_grants(host="web1", labels=["env=prod"], page_size=2))
        assert [g["grant_id"] for g in grants] == ["g-1", "g-2", "g-3"]
        with pytest.raises(ApiRefusedError, match="NOT_FOUND"):  # the id stays one segment
            api.get_grant("../hosts")
    assert stub.requests[-1].path == "/v1/grants/..%2Fhosts"


def test_token_sources(tmp_path: Path, tls: Tls, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    pki.write_atomic(token, b"  s3cret \n", 0o600)
    assert read_token(token) == "s3cret"
    token.chmod(0o640)
    with pytest.raises(ApiConfigError, match=r"readable by others \(mode 0640\); chmod 600"):
        read_token(token)
    token.chmod(0o600)
    settings = ApiSettings(url="https://127.0.0.1:1", ca_file=tls.ca, token_file=token)
    monkeypatch.setenv("PORTAGENT_BROKER_TOKEN", "from env")
    with pytest.raises(ApiConfigError, match="printable ASCII"):
        ApiClient.from_settings(settings)
    monkeypatch.delenv("PORTAGENT_BROKER_TOKEN")
    with pytest.raises(ApiConfigError, match=r"api: no credentials"):
        ApiClient.from_settings(ApiSettings(url="https://127.0.0.1:1", ca_file=tls.ca))
    with pytest.raises(ApiConfigError, match=r"api.ca: cannot load"):
        ApiClient.from_settings(ApiSettings(url="https://x:1", ca_file=tmp_path / "no.pem",
                                            token_file=token))  # fmt: skip


def test_the_service_commands_import_no_grpc_protobuf_or_cryptography() -> None:
    """What keeps `portagent-broker grants` fast: nothing heavy on its path."""
    code = (
        "import sys\n"
        "from portagent.broker import cli\n"
        "try:\n    cli.main(['grants', '--help'])\nexcept SystemExit:\n    pass\n"
        "cli.build_parser().parse_args(['hosts', 'add', 'web1'])\n"
        "heavy = ('grpc', 'google', 'cryptography', 'sqlalchemy', 'starlette', 'uvicorn',"
        " 'psycopg', 'alembic')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    assert result.stdout.splitlines()[-1] == "[]"


# --- access requests, whoami, policy (ADR 0008): the CLI against the recorded API --------

BOB = {"approver": {"label": "corp:bob@example.com"}, "approve": True,
       "time": "2026-11-30T12:00:05Z", "comment": "ok"}  # fmt: skip
PENDING: dict[str, Any] = {
    "id": "r-0123456789abcdef",
    "state": "pending",
    "requester": {"kind": "github", "label": "gh:repo:octo/app:environment:prod"},
    "host_id": "db-1",
    "protocol": "tcp",
    "ports": "5432",
    "sources": ["192.0.2.7/32"],
    "ttl_seconds": 900.0,
    "reason": "INC-42",
    "rule": "dba-db",
    "approvals_required": 2,
    "approvers": "dba",
    "approved": 1,
    "approvals": [BOB],
    "created_at": "2026-11-30T12:00:00Z",
    "expires_at": "2026-11-30T13:00:00Z",
    "decided_at": None,
    "grant_id": None,
    "client_request_id": None,
}  # fmt: skip
CAROL = {"approver": {"label": "corp:carol@example.com"}, "approve": True,
         "time": "2026-11-30T12:01:00Z"}  # fmt: skip
GRANTED = {**PENDING, "state": "granted", "grant_id": "g-00000000000000aa",
           "approved": 2, "approvals": [BOB, CAROL]}  # fmt: skip
GRANT = {"grant_id": "g-00000000000000aa", "state": "active", "host_id": "db-1"}


@pytest.fixture
def broker_toml(
    tmp_path: Path, tls: Tls, monkeypatch: pytest.MonkeyPatch, serve: Callable[..., ApiStub]
) -> ApiStub:
    """A recorded API and a broker.toml whose [api] holds the admin token "t0ken"."""
    stub = serve()
    token = tmp_path / "admin.token"
    pki.write_atomic(token, b"t0ken\n", 0o600)
    config = tmp_path / "broker.toml"
    config.write_text(f'[api]\nurl = "{stub.url}"\nca = "{tls.ca}"\ntoken_file = "{token}"\n')
    monkeypatch.setenv(cli.CONFIG_ENV, str(config))
    monkeypatch.delenv("PORTAGENT_TOKEN", raising=False)
    monkeypatch.delenv("PORTAGENT_BROKER_TOKEN", raising=False)
    return stub


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _jwt_file(path: Path, claims: dict[str, Any], mode: int = 0o600) -> Path:
    """A JWT-shaped token (unsigned: the recorded API and offline explain do not verify)."""
    import base64

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    pki.write_atomic(path, f"{part({'alg': 'RS256', 'kid': 'k1'})}.{part(claims)}.c2ln\n"
                     .encode(), mode)  # fmt: skip
    return path


def test_requests_list_pages_filters_and_prints_the_table(
    broker_toml: ApiStub, capsys: pytest.CaptureFixture[str]
) -> None:
    stub = broker_toml
    first = "GET /v1/requests?state=pending&host=db-1&limit=1000"
    other = {**PENDING, "id": "r-00000000000000bb", "approvals_required": 0, "approved": 0,
             "approvals": [], "ports": "5432-5440", "protocol": "udp", "reason": ""}  # fmt: skip
    stub.on(first, (200, {"requests": [PENDING], "next_after": "r-0123456789abcdef"}))
    stub.on(first + "&after=r-0123456789abcdef", (200, {"requests": [other], "next_after": None}))
    status, out, err = _cli(capsys, "requests", "--state", "pending", "--host", "db-1")
    assert (status, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATE", "REQUESTER", "HOST", "PORT", "TTL", "APPROVALS",
                              "REASON", "AGE"]  # fmt: skip
    first_row, second_row = (row.split() for row in rows)
    assert first_row[:8] == ["r-0123456789abcdef", "pending", "gh:repo:octo/app:environment:prod",
                             "db-1", "5432/tcp", "15m", "1/2", "INC-42"]  # fmt: skip
    assert second_row[4:8] == ["5432-5440/udp", "15m", "-", "-"]
    assert stub.requests[0].headers["Authorization"] == "Bearer t0ken"  # the admin's
    # `requests list` is the same command; -o json is the API's objects as they came.
    status, out, _ = _cli(capsys, "requests", "list", "--state", "pending", "--host", "db-1",
                          "-o", "json")  # fmt: skip
    assert (status, json.loads(out)) == (0, [PENDING, other])


def test_requests_state_choice_is_checked_before_sending(
    broker_toml: ApiStub, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["requests", "--state", "approved"])
    assert caught.value.code == 2
    assert "invalid choice: 'approved'" in capsys.readouterr().err
    assert broker_toml.requests == []


def test_approve_acts_with_the_person_token_and_prints_the_outcome(
    broker_toml: ApiStub, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    stub = broker_toml
    route = "POST /v1/requests/r-0123456789abcdef/approve"
    stub.on(route, (200, {"request": GRANTED, "grant": GRANT, "applied": False}))
    alice = _jwt_file(tmp_path / "alice.jwt", {"iss": "https://sso", "sub": "alice"})
    status, out, err = _cli(capsys, "requests", "approve", "r-0123456789abcdef",
                            "--token-file", str(alice), "--comment", "INC-42 ok")  # fmt: skip
    assert (status, err) == (0, "")
    assert out == "r-0123456789abcdef: granted (2/2 approvals), grant g-00000000000000aa active\n"
    (sent,) = stub.requests
    assert sent.headers["Authorization"] == f"Bearer {alice.read_text().strip()}"
    assert sent.body == {"comment": "INC-42 ok"}
    # $PORTAGENT_TOKEN stands in for --token-file; -o json prints the answer.
    monkeypatch.setenv("PORTAGENT_TOKEN", "eyJh.eyJi.c2ln")
    status, out, _ = _cli(capsys, "requests", "approve", "r-0123456789abcdef", "-o", "json")
    # -o json: the request object (as `requests list` prints it), its grant and applied.
    assert json.loads(out) == {**GRANTED, "grant": GRANT, "applied": False}
    assert stub.requests[-1].headers["Authorization"] == "Bearer eyJh.eyJi.c2ln"
    assert stub.requests[-1].body == {}
    # --token-file before the action counts too (the action's default does not reset it),
    # and takes precedence over $PORTAGENT_TOKEN.
    assert (
        _cli(capsys, "requests", "--token-file", str(alice), "approve", "r-0123456789abcdef")[0]
        == 0
    )
    assert stub.requests[-1].headers["Authorization"] == f"Bearer {alice.read_text().strip()}"


def test_vote_refusals_print_code_reason_and_exit_status(
    broker_toml: ApiStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stub = broker_toml
    self_approval = {"code": "PERMISSION_DENIED", "reason": "SELF_APPROVAL",
                     "message": "the requester cannot approve its own request"}  # fmt: skip
    stub.on("POST /v1/requests/r-0123456789abcdef/approve", (403, {"error": self_approval}))
    expired = {"code": "UNAUTHENTICATED", "reason": "TOKEN_EXPIRED", "field": "authorization",
               "message": "the token expired 5m ago"}  # fmt: skip
    stub.on("POST /v1/requests/r-0123456789abcdef/deny", (401, {"error": expired}))
    status, out, err = _cli(capsys, "requests", "approve", "r-0123456789abcdef")
    assert (status, out) == (1, "")
    assert err == ("portagent-broker: the requester cannot approve its own request "
                   "(PERMISSION_DENIED SELF_APPROVAL)\n")  # fmt: skip
    status, _, err = _cli(capsys, "requests", "deny", "r-0123456789abcdef", "--comment", "no")
    assert status == 2 and err == (
        "portagent-broker: authorization: the token expired 5m ago "
        "(UNAUTHENTICATED TOKEN_EXPIRED)\n"
    )
    assert len(stub.requests) == 2  # a refused vote is never sent again
    # A token file others can read is refused before anything is sent.
    loose = _jwt_file(tmp_path / "loose.jwt", {"iss": "x", "sub": "y"}, mode=0o644)
    status, _, err = _cli(capsys, "requests", "deny", "r-1", "--token-file", str(loose))
    assert status == 2 and err.startswith(f"portagent-broker: --token-file: {loose} is readable")
    assert len(stub.requests) == 2


def test_show_close_and_whoami(
    broker_toml: ApiStub, capsys: pytest.CaptureFixture[str], local_zone: Callable[[str], None]
) -> None:
    local_zone("CET-1")  # times print as local time with their offset
    stub = broker_toml
    stub.on("GET /v1/requests/r-0123456789abcdef",
            (200, {"request": GRANTED, "grant": GRANT, "applied": True}))  # fmt: skip
    closed = {**GRANTED, "state": "closed"}
    revoked = {**GRANT, "state": "revoked"}
    stub.on("POST /v1/requests/r-0123456789abcdef/close",
            (200, {"request": closed, "grant": revoked, "applied": False}))  # fmt: skip
    identity = {"kind": "admin", "issuer": "portagent:admin-token", "issuer_name": "admin",
                "subject": "tests", "label": "admin:tests", "email": "", "groups": [],
                "claims": {}}  # fmt: skip
    stub.on("GET /v1/whoami", (200, {"identity": identity}))
    status, out, _ = _cli(capsys, "requests", "show", "r-0123456789abcdef")
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert status == 0 and fields["state:"] == "granted" and fields["approvals:"] == "2/2"
    assert fields["grant:"] == "g-00000000000000aa active" and fields["applied:"] == "yes"
    assert fields["rule:"] == "dba-db" and fields["sources:"] == "192.0.2.7/32"
    assert "vote:       corp:bob@example.com approved at 2026-11-30 13:00:05 +01:00: ok" in out
    assert fields["created:"] == "2026-11-30 13:00:00 +01:00"
    status, out, _ = _cli(capsys, "requests", "close", "r-0123456789abcdef")
    assert (status, out) == (0, "r-0123456789abcdef: closed (2/2 approvals), "
                                "grant g-00000000000000aa revoked\n")  # fmt: skip
    assert stub.requests[-1].body == {}
    status, out, _ = _cli(capsys, "whoami")
    assert status == 0 and out.splitlines()[0].split() == ["label:", "admin:tests"]
    assert json.loads(_cli(capsys, "whoami", "-o", "json")[1]) == {"identity": identity}
    shown = json.loads(_cli(capsys, "requests", "show", "r-0123456789abcdef", "-o", "json")[1])
    assert shown == {**GRANTED, "grant": GRANT, "applied": True}
    # An id is one path segment, whatever it holds.
    assert _cli(capsys, "requests", "show", "../grants")[0] == 1
    assert stub.requests[-1].path == "/v1/requests/..%2Fgrants"


def test_policy_show_and_online_explain(
    broker_toml: ApiStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stub = broker_toml
    rules = [{"rule": "dba-db", "max_ttl": 900, "approvals": 1, "approvers": "dba",
              "sources": "requester", "max_grants": 3},
             {"rule": "ci-prod", "max_ttl": 3600, "approvals": 0, "approvers": "",
              "sources": "explicit", "max_grants": 10}]  # fmt: skip
    stub.on("GET /v1/policy", (200, {"digest": "ab" * 32, "source": "/etc/p.cedar",
                                     "rules": rules}))  # fmt: skip
    status, out, _ = _cli(capsys, "policy", "show")
    lines = out.splitlines()
    assert status == 0 and lines[:2] == ["policy: /etc/p.cedar", f"digest: {'ab' * 32}"]
    assert lines[3].split() == ["RULE", "MAX", "TTL", "APPROVALS", "APPROVERS", "SOURCES", "MAX",
                                "GRANTS"]  # fmt: skip
    assert lines[4].split() == ["dba-db", "15m", "1", "dba", "requester", "3"]
    assert lines[5].split() == ["ci-prod", "1h", "0", "-", "explicit", "10"]

    denied = {"decision": {"allowed": False, "rule": "", "reason": "POLICY_DENIED",
                           "message": "no permit rule matches"},
              "rules": [{"rule": "dba-db", "effect": "permit", "applies": False, "line": 3,
                         "note": "scope: principal not in Group::\"dba\""}]}  # fmt: skip
    stub.on("POST /v1/policy/explain", (200, denied))
    status, out, _ = _cli(capsys, "policy", "explain", "--kind", "person", "--subject", "alice",
                          "--issuer-name", "corp", "--email", "alice@example.com",
                          "--host", "db-1", "--port", "5432/tcp", "--ttl", "15m")  # fmt: skip
    assert status == 1
    assert out.splitlines()[:2] == ["DENIED (POLICY_DENIED)", "  no permit rule matches"]
    last = '  - permit dba-db  line 3    scope: principal not in Group::"dba"'
    assert out.splitlines()[-1] == last
    body = stub.requests[-1].body
    assert body["identity"]["kind"] == "person" and body["identity"]["subject"] == "alice"
    assert body["identity"]["email"] == "alice@example.com"
    assert "labels" not in body  # the service takes the host's labels from its inventory
    assert (body["host"], body["port"], body["ttl"]) == ("db-1", "5432/tcp", "15m")
    # With a token: the service verifies it (it is sent, not decoded here).
    token = _jwt_file(tmp_path / "job.jwt", {"iss": "https://gh", "sub": "repo:x"})
    allowed = {"decision": {"allowed": True, "rule": "ci-prod", "message": "allowed"},
               "rules": []}  # fmt: skip
    stub.script["POST /v1/policy/explain"] = [(200, allowed)]
    status, out, _ = _cli(capsys, "policy", "explain", "--token-file", str(token),
                          "--host", "db-1", "--label", "role=db", "--port", "5432",
                          "--ttl", "1h", "-o", "json")  # fmt: skip
    assert (status, json.loads(out)) == (0, allowed)
    body = stub.requests[-1].body
    assert body["token"] == token.read_text().strip() and "identity" not in body
    assert body["labels"] == {"role": "db"}
    assert stub.requests[-1].headers["Authorization"] == "Bearer t0ken"  # an admin call
    status, _, err = _cli(capsys, "policy", "explain", "--host", "h", "--port", "1", "--ttl", "1m")
    assert status == 2 and err.startswith("portagent-broker: --subject: required")


def test_the_request_commands_import_nothing_heavy() -> None:
    """`requests`, `whoami` and `policy show` stay on the standard-library path too:
    no Cedar engine, no PyJWT, no grpc."""
    code = (
        "import sys\n"
        "from portagent.broker import cli\n"
        "for argv in (['requests', '--help'], ['policy', 'explain', '--help']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "p = cli.build_parser()\n"
        "p.parse_args(['requests', 'approve', 'r-1'])\n"
        "p.parse_args(['whoami'])\n"
        "p.parse_args(['policy', 'show'])\n"
        "heavy = ('grpc', 'google', 'cryptography', 'sqlalchemy', 'starlette', 'uvicorn',"
        " 'psycopg', 'alembic', 'cedarpy', 'jwt')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    assert result.stdout.splitlines()[-1] == "[]"
