"""gRPC server reflection as an operator uses it: the real `buf curl` (the buf CLI that
`make proto-lint` installs) against the real agent and the real broker service, with
the lab's generated certificates and no .proto file: list services and methods, and
make calls whose requests and answers buf encodes from the reflected schema only."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from portagent.testing.lab import API_PORT, FLEET_PORT, HOST_ID, Lab
from portagent.testing.netns import wait_until

pytestmark = pytest.mark.root

BUF = Path(__file__).resolve().parents[2] / ".cache/buf/node_modules/.bin/buf"
TCP = 8080


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if not BUF.exists():
        pytest.skip(f"{BUF} is missing: `make test` installs it (the Makefile's $(BUF) rule)")
    with Lab(tmp_path, [f"{TCP}/tcp"], prefix="pt-refl", service=True) as lab:
        yield lab


def buf_curl(
    lab: Lab, netns: str, identity: str, url: str, *args: str, cacert: str = "ca.pem"
) -> subprocess.CompletedProcess[str]:
    """`buf curl` over gRPC with mutual TLS (`identity`.pem/.key from the lab), schema
    by reflection only; runs in `netns`."""
    argv = [
        "ip", "netns", "exec", netns, str(BUF), "curl", "--protocol", "grpc",
        "--cacert", str(lab.dir / cacert),
        "--cert", str(lab.dir / f"{identity}.pem"),
        "--key", str(lab.dir / f"{identity}.key"),
        "--timeout", "20s",
        *args, url,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_agent_api_by_reflection_with_the_brokers_certificate(lab: Lab) -> None:
    base = f"https://{lab.net.server_ip}:{API_PORT}"
    client = lab.net.client

    services = buf_curl(lab, client, "broker", base, "--list-services")
    assert services.returncode == 0, services.stderr
    assert services.stdout.split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "portagent.v1.AgentService",
    ]
    methods = buf_curl(lab, client, "broker", base, "--list-methods")
    assert methods.returncode == 0, methods.stderr
    listed = methods.stdout.split()
    for method in ("ApplyGrant", "GetGrant", "ListGrants", "RevokeGrant", "WatchEvents"):
        assert f"portagent.v1.AgentService/{method}" in listed
    assert "grpc.health.v1.Health/Check" in listed

    health = buf_curl(lab, client, "broker", f"{base}/grpc.health.v1.Health/Check", "-d", "{}")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}

    # A grant made the usual way, read back by reflection: the response is decoded with
    # the reflected GrantStatus (JSON names, enum names) and matches what the CLI shows.
    grant_id = lab.grant(port=f"{TCP}/tcp", ttl="60s")
    got = buf_curl(
        lab, client, "broker", f"{base}/portagent.v1.AgentService/GetGrant",
        "-d", json.dumps({"grantId": grant_id}),
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    status = json.loads(got.stdout)
    assert status["grant"]["grantId"] == grant_id
    assert status["grant"]["hostId"] == HOST_ID
    assert status["state"] == "GRANT_STATE_ACTIVE"

    # A refusal comes back as the agent's status, not as a reflection failure.
    missing = buf_curl(
        lab, client, "broker", f"{base}/portagent.v1.AgentService/GetGrant",
        "-d", json.dumps({"grantId": "no-such-grant"}),
    )  # fmt: skip
    assert missing.returncode != 0
    assert "not_found" in missing.stderr and "GRANT_NOT_FOUND" in missing.stderr, missing.stderr


def test_reflection_sits_behind_the_same_mtls(lab: Lab, tmp_path: Path) -> None:
    base = f"https://{lab.net.server_ip}:{API_PORT}"
    # No client certificate: the handshake fails, nothing is listed.
    argv = [
        "ip", "netns", "exec", lab.net.client, str(BUF), "curl", "--protocol", "grpc",
        "--cacert", str(lab.dir / "ca.pem"), "--timeout", "20s", "--list-services", base,
    ]  # fmt: skip
    anonymous = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert anonymous.returncode != 0
    assert "portagent.v1.AgentService" not in anonymous.stdout


def test_broker_fleet_port_by_reflection_with_an_agents_certificate(lab: Lab) -> None:
    base = f"https://{lab.net.client_ip}:{FLEET_PORT}"
    server = lab.net.server  # where the agent (and its client certificate) lives
    services = buf_curl(lab, server, "agent-client", base, "--list-services")
    assert services.returncode == 0, services.stderr
    assert services.stdout.split() == [
        "grpc.reflection.v1alpha.ServerReflection",
        "portagent.v1.FleetService",
    ]
    methods = buf_curl(lab, server, "agent-client", base, "--list-methods")
    assert methods.returncode == 0, methods.stderr
    assert "portagent.v1.FleetService/Connect" in methods.stdout.split()

    # One real call on the stream, encoded from the reflected ConnectRequest: a Hello for
    # a host the certificate does not name. The hub parsed it (it names the field and the
    # value) and refused it; the real agent's own stream is untouched.
    assert wait_until(lambda: _connected(lab), timeout=15)
    hello = {"hello": {"hostId": "not-" + HOST_ID, "agentVersion": "buf-curl"}}
    refused = buf_curl(
        lab, server, "agent-client", f"{base}/portagent.v1.FleetService/Connect",
        "-d", json.dumps(hello),
    )  # fmt: skip
    assert refused.returncode != 0
    assert "permission_denied" in refused.stderr.lower()
    assert f"hello.host_id: 'not-{HOST_ID}' is not named by the client certificate" in (
        refused.stderr
    )
    assert _connected(lab)


def _connected(lab: Lab) -> bool:
    hosts = lab.broker_json("hosts")
    return any(h["host_id"] == HOST_ID and h["connected"] for h in hosts)
