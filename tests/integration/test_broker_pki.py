"""The broker's trust set-up against a real gRPC server on 127.0.0.1 (no root needed),
and `init --service`'s set-up running the real broker service.

A small AgentService stands in for the agent: it serves the certificates `init`
wrote with client authentication required, and verifies grants with the
Verifier built from the agent.toml `init` wrote, which is the real contract.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from portagent.agent.api.grpc_server import abort
from portagent.agent.settings import load_settings_file
from portagent.agent.verify import Verifier
from portagent.broker import cli, pki
from portagent.broker.api_client import ApiClient, ApiUnreachableError
from portagent.broker.client import (
    AgentClient,
    AgentRefusedError,
    AgentUnreachableError,
    TlsFiles,
)
from portagent.broker.settings import load_broker_settings_file
from portagent.broker.signing import Signer, grant_request
from portagent.testing.broker_service import SimAgent
from portagent.v1 import agent_pb2 as pb
from portagent.v1 import agent_pb2_grpc
from portagent.wire.errors import PortagentError
from portagent.wire.hoststate import open_host_state
from portagent.wire.ports import parse_port_spec

HOST = "web1"


class FakeAgent(agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
    """Verifies like the agent, keeps grants in a dict, pages ListGrants by one."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self.grants: dict[str, Any] = {}
        self.abort_with: tuple[grpc.StatusCode, str, str] | None = None

    def _refuse(self, context: grpc.ServicerContext, exc: PortagentError) -> None:
        abort(context, getattr(grpc.StatusCode, exc.status.value), exc.reason, exc.message)

    def ApplyGrant(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.abort_with:
            abort(context, *self.abort_with)
        signed = request.signed_grant
        try:
            self.verifier.verify_grant(signed.grant, signed.signature, signed.key_id, time.time())
        except PortagentError as exc:
            self._refuse(context, exc)
        status = pb.GrantStatus(grant=pb.Grant.FromString(signed.grant),
                                state=pb.GRANT_STATE_ACTIVE)
        status.apply_time.GetCurrentTime()
        self.grants[status.grant.grant_id] = status
        return pb.ApplyGrantResponse(status=status)

    def RevokeGrant(self, request: Any, context: grpc.ServicerContext) -> Any:
        signed = request.signed_revocation
        try:
            revocation = self.verifier.verify_revocation(
                signed.revocation, signed.signature, signed.key_id, time.time())
        except PortagentError as exc:
            self._refuse(context, exc)
        status = self.grants.get(revocation.grant_id)
        if status is None:
            return pb.RevokeGrantResponse()
        status.state = pb.GRANT_STATE_REVOKED
        status.revoke_time.GetCurrentTime()
        return pb.RevokeGrantResponse(status=status)

    def GetGrant(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.grant_id not in self.grants:
            abort(context, grpc.StatusCode.NOT_FOUND, "GRANT_NOT_FOUND", request.grant_id)
        return self.grants[request.grant_id]

    def ListGrants(self, request: Any, context: grpc.ServicerContext) -> Any:
        ids = sorted(self.grants)
        start = ids.index(request.page_token) if request.page_token else 0
        page = ids[start:start + 1]
        token = ids[start + 1] if start + 1 < len(ids) else ""
        return pb.ListGrantsResponse(grants=[self.grants[i] for i in page], next_page_token=token)


class Env:
    def __init__(self, directory: Path, port: int, agent: FakeAgent) -> None:
        self.dir = directory
        self.port = port
        self.agent = agent
        self.address = f"127.0.0.1:{port}"
        self.tls = TlsFiles.load(directory / "ca.pem", directory / "broker.pem",
                                 directory / "broker.key")

    def cli(self, *args: str) -> list[str]:
        return ["--config", str(self.dir / "broker.toml"), *args]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    directory = tmp_path / "dev"
    # The certificate names the address, not the port: any free port will do.
    pki.init_dev_setup(directory, host_id=HOST, agent_address="127.0.0.1:50051",
                       guarded=[parse_port_spec("22/tcp"), parse_port_spec("8000-8010/tcp")])
    settings = load_settings_file(directory / "agent.toml")
    agent = FakeAgent(Verifier(settings.host_id, settings.trusted_keys, settings.policy))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(agent, server)
    credentials = grpc.ssl_server_credentials(
        [(settings.api.key_file.read_bytes(), settings.api.cert_file.read_bytes())],
        root_certificates=settings.api.ca_file.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield Env(directory, port, agent)
    finally:
        server.stop(None).wait()


def _signed_grant(env: Env, port: str = "22/tcp") -> Any:
    signer = Signer.from_file(env.dir / "signing.key")
    request = grant_request(host_id=HOST, subject="alice", sources=["192.0.2.10"], port=port,
                            ttl="5m")
    return signer.sign_grant(request, now=time.time())


def test_client_with_broker_certificate_is_served(env: Env) -> None:
    with AgentClient(env.address, env.tls, timeout=5) as client:
        status = client.apply(_signed_grant(env))
    assert status.state == pb.GRANT_STATE_ACTIVE
    assert status.grant.host_id == HOST


def test_server_certificate_matches_by_ip_and_by_localhost(env: Env) -> None:
    for address in (env.address, f"localhost:{env.port}"):
        with AgentClient(address, env.tls, timeout=5) as client:
            assert list(client.list()) == []


def test_server_name_is_checked(env: Env) -> None:
    """A name the agent certificate does not carry fails the handshake: the SAN check is on."""
    with AgentClient(env.address, env.tls, server_name="other.example", timeout=5) as client, \
            pytest.raises(AgentUnreachableError):
        list(client.list())


def _raw_call(env: Env, credentials: grpc.ChannelCredentials) -> None:
    with grpc.secure_channel(env.address, credentials) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        stub.ListGrants(pb.ListGrantsRequest(), timeout=5)


def test_client_without_certificate_is_refused(env: Env) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=env.tls.ca)
    with pytest.raises(grpc.RpcError) as caught:
        _raw_call(env, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_is_refused(env: Env, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    other_ca_key, key = pki.new_tls_key(), pki.new_tls_key()
    other_ca = pki.make_ca(other_ca_key, now)
    cert = pki.issue_leaf(other_ca_key, other_ca, key.public_key(), common_name=pki.BROKER_CN,
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH, now=now)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=env.tls.ca, private_key=pki.private_key_pem(key),
        certificate_chain=cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(grpc.RpcError) as caught:
        _raw_call(env, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_agent_certificate_cannot_act_as_broker(env: Env) -> None:
    """The agent's certificate is serverAuth only: a compromised agent cannot call others."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=env.tls.ca, private_key=(env.dir / "agent.key").read_bytes(),
        certificate_chain=(env.dir / "agent.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as caught:
        _raw_call(env, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_grant_list_get_revoke(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    agent = ["--host", HOST, "--agent", env.address]
    ids = []
    for _ in range(2):
        assert cli.main(env.cli("grant", *agent, "--source", "192.0.2.10", "--source",
                                "2001:db8::/64", "--port", "8000-8010", "--ttl", "10m",
                                "--subject", "alice", "--reason", "CHG-1")) == 0
        ids.append(capsys.readouterr().out.strip())
    assert sorted(ids) == sorted(env.agent.grants)  # stdout is only the id
    grant = env.agent.grants[ids[0]].grant
    assert list(grant.source_prefixes) == ["192.0.2.10/32", "2001:db8::/64"]
    assert (grant.port_start, grant.port_end, grant.reason) == (8000, 8010, "CHG-1")

    assert cli.main(env.cli("list", *agent)) == 0  # two pages of one: paging is followed
    out = capsys.readouterr().out
    assert all(i in out for i in ids) and "8000-8010/tcp" in out

    assert cli.main(env.cli("get", *agent, ids[0], "-o", "json")) == 0
    assert f'"grant_id": "{ids[0]}"' in capsys.readouterr().out

    assert cli.main(env.cli("revoke", *agent, ids[0], "--reason", "done")) == 0
    assert capsys.readouterr().out.strip() == f"{ids[0]}: revoked"
    assert env.agent.grants[ids[0]].state == pb.GRANT_STATE_REVOKED


def test_cli_reports_agent_refusal(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """The real Verifier refuses an unguarded port; the CLI shows code and reason, exits 1."""
    assert cli.main(env.cli("grant", "--host", HOST, "--agent", env.address, "--source",
                            "192.0.2.10", "--port", "23/tcp", "--ttl", "5m",
                            "--subject", "alice")) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("portagent-broker: refused by agent: PERMISSION_DENIED "
                            "PORT_NOT_GUARDED: port: 23/tcp is not guarded on this host\n")


def test_agent_unavailable_with_reason_is_a_refusal(env: Env) -> None:
    env.agent.abort_with = (grpc.StatusCode.UNAVAILABLE, "ENFORCEMENT_FAILED", "nft said no")
    with AgentClient(env.address, env.tls, timeout=5) as client, \
            pytest.raises(AgentRefusedError) as caught:
        client.apply(_signed_grant(env))
    assert (caught.value.code, caught.value.reason) == ("UNAVAILABLE", "ENFORCEMENT_FAILED")


def test_cli_unreachable_agent_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki.init_dev_setup(tmp_path, host_id=HOST, agent_address="127.0.0.1:50051",
                       guarded=[parse_port_spec("22/tcp")])
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    assert cli.main(["--config", str(tmp_path / "broker.toml"), "grant", "--host", HOST,
                     "--agent", address, "--source", "192.0.2.10", "--port", "22",
                     "--ttl", "5m", "--subject", "alice"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"portagent-broker: cannot reach agent at {address}: ")


# --- `init --service`: the set-up runs the real broker service --------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def service_setup(tmp_path: Path) -> Iterator[Path]:
    """`init --service` on free ports, then `portagent-broker serve` on its service.toml."""
    directory = tmp_path / "dev"
    fleet, api = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    assert cli.main(["init", "--dir", str(directory), "--host-id", HOST, "--agent-address",
                     "127.0.0.1:50051", "--guard", "22/tcp", "--service",
                     "--fleet-listen", fleet, "--api-listen", api]) == 0  # fmt: skip
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from portagent.broker.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "serve", "--config", str(directory / "service.toml")],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        settings = load_broker_settings_file(directory / "broker.toml")
        assert settings.api is not None
        with ApiClient.from_settings(settings.api, timeout=2, tries=1) as api:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    assert api.health()["status"] == "ok"
                    break
                except ApiUnreachableError:
                    assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                    time.sleep(0.1)
        yield directory
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def test_init_service_setup_serves_the_cli_and_the_agent_stream(
    service_setup: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = service_setup
    monkeypatch.setenv(cli.CONFIG_ENV, str(directory / "broker.toml"))
    assert cli.main(["hosts", "add", HOST, "--label", "env=dev"]) == 0
    capsys.readouterr()
    agent_settings = load_settings_file(directory / "agent.toml")
    assert agent_settings.broker is not None
    (address,) = agent_settings.broker.addresses
    assert (agent_settings.broker.cert_file, agent_settings.broker.key_file) == (
        directory / "agent-client.pem", directory / "agent-client.key"
    )  # fmt: skip
    trusted = {k.key_id: Ed25519PublicKey.from_public_bytes(k.public_key)
               for k in agent_settings.trusted_keys}  # fmt: skip
    # The agent's client certificate from `init` is accepted as host web1's identity.
    broker = agent_settings.broker
    agent = SimAgent(address, SimpleNamespace(ca_pem=broker.ca_file), HOST,
                     cert=(broker.cert_file, broker.key_file))  # fmt: skip
    try:
        agent.hello(generation=0, trusted_key_ids=tuple(trusted))
        assert cli.main(["grant", "--host", HOST, "--source", "192.0.2.10", "--port", "22/tcp",
                         "--ttl", "5m", "--subject", "alice"]) == 0  # fmt: skip
        grant_id = capsys.readouterr().out.strip()
        deadline = time.monotonic() + 20
        delivered = None
        while delivered is None and time.monotonic() < deadline:
            message = agent.recv(timeout=max(0.1, deadline - time.monotonic()))
            if message.WhichOneof("message") == "change":
                delivered = message.change.grant
            elif message.WhichOneof("message") == "snapshot":
                state = open_host_state(message.snapshot, trusted, HOST)
                if state.grants:
                    delivered = state.grants[0]
        assert delivered is not None
        # Signed by the key ring's key, which the agent.toml of the same set-up trusts.
        verifier = Verifier(HOST, agent_settings.trusted_keys, agent_settings.policy)
        grant = verifier.verify_grant(delivered.grant, delivered.signature, delivered.key_id,
                                      time.time())  # fmt: skip
        assert grant.grant_id == grant_id
    finally:
        agent.close()
    assert cli.main(["hosts", "-o", "json"]) == 0
    (host,) = json.loads(capsys.readouterr().out)
    assert (host["host_id"], host["labels"]["env"], host["generation"]) == (HOST, "dev", 1)
