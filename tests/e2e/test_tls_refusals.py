"""What the real agent leaves behind when it refuses a client certificate: the TLS
handshake fails inside gRPC's core, which never hands the connection to Python, so
the one trace is gRPC's own line on portagentd's stderr (journald under systemd).
This pins that line for the grpcio the venv runs (docs/operations.md quotes it)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from portagent.broker import pki
from portagent.testing.lab import API_PORT, Lab
from portagent.testing.netns import wait_until

pytestmark = pytest.mark.root


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(tmp_path, ["8080/tcp"], prefix="pt-tlsr") as lab:
        yield lab


# Run in the client namespace (gRPC opens its sockets in threads of its own, so the
# test's process must be there as a whole): exit 0 answered, 1 refused.
_CHECK = """
import sys, grpc
from portagent.health.v1 import health_pb2, health_pb2_grpc
ca, cert, key, target = sys.argv[1:]
read = lambda p: open(p, "rb").read()
creds = grpc.ssl_channel_credentials(read(ca), private_key=read(key), certificate_chain=read(cert))
with grpc.secure_channel(target, creds) as channel:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.RpcError as error:
        print(error.code().name, error.details())
        sys.exit(1)
"""


def _check(lab: Lab, name: str) -> subprocess.CompletedProcess[str]:
    """Health.Check with NAME.pem/NAME.key as the client certificate (exit 0: answered;
    1 and the status on stdout: refused)."""
    argv = [sys.executable, "-c", _CHECK, str(lab.dir / "ca.pem"), str(lab.dir / f"{name}.pem"),
            str(lab.dir / f"{name}.key"), f"{lab.net.server_ip}:{API_PORT}"]
    return lab.net.exec_client(argv, check=False)


def test_an_expired_client_certificate_is_logged_by_the_agent(lab: Lab) -> None:
    now = dt.datetime.now(dt.UTC)
    ca = x509.load_pem_x509_certificate((lab.dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((lab.dir / "ca.key").read_bytes(), None)
    key = pki.new_tls_key()
    expired = pki.issue_leaf(
        ca_key, ca, key.public_key(), common_name="old-broker",  # type: ignore[arg-type]
        usage=ExtendedKeyUsageOID.CLIENT_AUTH, now=now - dt.timedelta(days=40), days=30,
    )  # fmt: skip
    (lab.dir / "expired.pem").write_bytes(pki.cert_pem(expired))
    (lab.dir / "expired.key").write_bytes(pki.private_key_pem(key))
    before = lab.log().count("Handshake failed")
    refused = _check(lab, "expired")
    assert refused.returncode == 1 and refused.stdout.startswith("UNAVAILABLE"), refused
    assert wait_until(lambda: lab.log().count("Handshake failed") > before, timeout=10), lab.log()
    line = [x for x in lab.log().splitlines() if "Handshake failed" in x][-1]
    assert "certificate has expired" in line
    # The good certificate still gets through, and the agent still serves.
    answered = _check(lab, "broker")
    assert answered.returncode == 0, answered
