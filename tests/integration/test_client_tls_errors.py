"""TLS certificate errors in the operator's words: `portagent-broker grant --direct`
against a real mutual-TLS gRPC server on 127.0.0.1 (the agent's health and API
services), with certificates the test generates: our client certificate expired, not
yet valid, or issued by another CA; the agent's certificate expired or not signed by
our CA. No root needed."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from portagent.agent.api.grpc_server import HealthServicer
from portagent.broker import cli, pki
from portagent.broker.client import (
    AgentClient,
    AgentRefusedError,
    AgentUnreachableError,
    ClientCertificateError,
    TlsFiles,
    certificate_problem,
)
from portagent.health.v1 import health_pb2_grpc
from portagent.v1 import agent_pb2_grpc
from portagent.wire.ports import parse_port_spec

HOST = "web1"
NOW = dt.datetime.now(dt.UTC)
CLIENT, SERVER = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH


def _ca(directory: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())


def _ca_key(directory: Path) -> object:
    return serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)


def reissue(
    directory: Path,
    name: str,
    usage: x509.ObjectIdentifier,
    *,
    start: dt.datetime = NOW,
    days: int = 30,
    other_ca: bool = False,
) -> None:
    """Replace NAME.pem/NAME.key with a certificate valid from `start` (backdated a little)
    for `days`,
    issued by the set-up's CA (or by a CA of its own)."""
    if other_ca:
        ca_key = pki.new_tls_key()
        ca = pki.make_ca(ca_key, NOW, "some other CA")
    else:
        ca_key = _ca_key(directory)  # type: ignore[assignment]
        ca = _ca(directory)
    key = pki.new_tls_key()
    cert = pki.issue_leaf(
        ca_key, ca, key.public_key(), common_name=name, usage=usage,
        sans=pki.agent_sans("127.0.0.1") if usage == SERVER else (), now=start, days=days,
    )  # fmt: skip
    (directory / f"{name}.pem").write_bytes(pki.cert_pem(cert))
    (directory / f"{name}.key").write_bytes(pki.private_key_pem(key))


class Agent:
    """The agent's gRPC services behind mutual TLS with the set-up's files (read when
    started, so a test can replace them first)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.server: grpc.Server | None = None
        self.address = ""

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            agent_pb2_grpc.AgentServiceServicer(), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(lambda: True), server)
        credentials = grpc.ssl_server_credentials(
            [((self.dir / "agent.key").read_bytes(), (self.dir / "agent.pem").read_bytes())],
            root_certificates=(self.dir / "ca.pem").read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        self.server = server
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None).wait(5)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    pki.init_dev_setup(tmp_path, host_id=HOST, agent_address="127.0.0.1:50051",
                       guarded=[parse_port_spec("22/tcp")])
    a = Agent(tmp_path)
    yield a
    a.stop()


def grant(agent: Agent, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    agent.start()
    status = cli.main(["--config", str(agent.dir / "broker.toml"), "grant", "--host", HOST,
                       "--agent", agent.address, "--source", "192.0.2.10", "--port", "22",
                       "--ttl", "5m", "--subject", "alice"])
    return status, capsys.readouterr().err


def test_an_expired_client_certificate_is_named_before_dialing(
    agent: Agent, capsys: pytest.CaptureFixture[str]
) -> None:
    reissue(agent.dir, "broker", CLIENT, start=NOW - dt.timedelta(days=40), days=30)
    status, err = grant(agent, capsys)
    assert status == 2
    cert = x509.load_pem_x509_certificate((agent.dir / "broker.pem").read_bytes())
    expired = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert err.startswith(
        f"portagent-broker: cannot reach agent at {agent.address}: client certificate "
        f"{agent.dir / 'broker.pem'} expired on {expired}"
    ), err
    assert "renew it" in err


def test_a_client_certificate_not_yet_valid_is_named(
    agent: Agent, capsys: pytest.CaptureFixture[str]
) -> None:
    reissue(agent.dir, "broker", CLIENT, start=NOW + dt.timedelta(days=2))
    status, err = grant(agent, capsys)
    assert status == 2
    assert f"client certificate {agent.dir / 'broker.pem'} is not yet valid: from " in err
    assert "clock" in err


def test_a_client_certificate_of_another_ca_is_refused_by_the_agent(
    agent: Agent, capsys: pytest.CaptureFixture[str]
) -> None:
    reissue(agent.dir, "broker", CLIENT, other_ca=True)
    status, err = grant(agent, capsys)
    assert status == 2
    assert (
        f"the agent at {agent.address} refused our client certificate "
        f"{agent.dir / 'broker.pem'}" in err
    ), err
    assert "not issued by the CA it trusts" in err


def test_the_agents_certificate_not_signed_by_our_ca(
    agent: Agent, capsys: pytest.CaptureFixture[str]
) -> None:
    reissue(agent.dir, "agent", SERVER, other_ca=True)
    status, err = grant(agent, capsys)
    assert status == 2
    assert f"the agent's certificate is not signed by CA {agent.dir / 'ca.pem'}" in err, err


def test_the_agents_certificate_expired(
    agent: Agent, capsys: pytest.CaptureFixture[str]
) -> None:
    reissue(agent.dir, "agent", SERVER, start=NOW - dt.timedelta(days=40), days=30)
    status, err = grant(agent, capsys)
    assert status == 2
    assert "the agent's certificate has expired (TLS handshake with " in err, err


def test_the_agents_certificate_names_another_host(agent: Agent) -> None:
    agent.start()
    tls = TlsFiles.load(agent.dir / "ca.pem", agent.dir / "broker.pem", agent.dir / "broker.key")
    with AgentClient(agent.address, tls, server_name="other.example", timeout=5) as client, \
            pytest.raises(AgentUnreachableError) as caught:
        client.get("g-1")
    assert "the agent's certificate does not name the server name we expect" in str(caught.value)


def test_good_certificates_still_reach_the_agent(agent: Agent) -> None:
    # The control: the same set-up without a replaced file answers (UNIMPLEMENTED from
    # the bare servicer is an answer: the handshake succeeded).
    agent.start()
    tls = TlsFiles.load(agent.dir / "ca.pem", agent.dir / "broker.pem", agent.dir / "broker.key")
    with AgentClient(agent.address, tls, timeout=5) as client, \
            pytest.raises(AgentRefusedError) as caught:
        client.get("g-1")
    assert caught.value.code == "UNIMPLEMENTED"


def test_certificate_problem_at_the_edges(agent: Agent) -> None:
    tls = TlsFiles.load(agent.dir / "ca.pem", agent.dir / "broker.pem", agent.dir / "broker.key")
    cert = x509.load_pem_x509_certificate(tls.cert)
    after = cert.not_valid_after_utc
    before = cert.not_valid_before_utc
    assert certificate_problem(tls, after) is None
    assert certificate_problem(tls, before) is None
    late = certificate_problem(tls, after + dt.timedelta(seconds=1))
    assert late is not None and "expired on" in late
    early = certificate_problem(tls, before - dt.timedelta(seconds=1))
    assert early is not None and "not yet valid" in early
    garbage = TlsFiles(tls.ca, b"not a certificate", tls.key, cert_name="x.pem")
    assert certificate_problem(garbage, NOW) == "client certificate x.pem: not a PEM certificate"
    with pytest.raises(ClientCertificateError):
        AgentClient("127.0.0.1:1", garbage)
