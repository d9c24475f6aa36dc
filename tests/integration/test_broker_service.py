"""`portagent-broker serve` as a real subprocess: mTLS gRPC fleet streams from simulated
agents with their own certificates, the HTTPS API, SIGKILL and restart, and two
replicas sharing one real PostgreSQL cluster (no root needed)."""

from __future__ import annotations

import http.client
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from portagent.broker.fleet.service_settings import load_service_settings
from portagent.testing.broker_service import (
    BrokerPki,
    BrokerService,
    SimAgent,
    StreamEnded,
    broker_service,
    make_pki,
)
from portagent.testing.postgres import postgres_available, postgres_cluster
from portagent.v1 import agent_pb2, fleet_pb2
from portagent.wire.errors import ConfigError
from portagent.wire.hoststate import open_host_state

GRANT = {
    "host": "web1",
    "subject": "alice",
    "sources": ["10.1.2.3"],
    "port": "5432/tcp",
    "ttl": "15m",
    "reason": "INC-42",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> BrokerPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path, pki: BrokerPki) -> Iterator[BrokerService]:
    with broker_service(tmp_path / "broker", pki) as service:
        status, _ = service.request(
            "POST", "/v1/hosts", {"host_id": "web1", "labels": {"env": "prod"}}
        )
        assert status == 201
        yield service


@pytest.fixture
def agents() -> Iterator[list[SimAgent]]:
    opened: list[SimAgent] = []
    yield opened
    for agent in opened:
        agent.close()


def _connect(
    broker: BrokerService, pki: BrokerPki, agents: list[SimAgent], host: str = "web1", **hello: Any
) -> SimAgent:
    agent = SimAgent(broker.fleet_address, pki, host)
    agents.append(agent)
    agent.hello(**hello)
    return agent


def _grant(broker: BrokerService, **changes: Any) -> dict[str, Any]:
    status, body = broker.request("POST", "/v1/grants", {**GRANT, **changes})
    assert status == 201, body
    grant: dict[str, Any] = body["grant"]
    return grant


def _verify(
    keys: dict[str, Ed25519PublicKey], payload: bytes, signature: bytes, key_id: str
) -> None:
    keys[key_id].verify(signature, payload)  # raises InvalidSignature


def _grant_ids(state: fleet_pb2.HostState) -> set[str]:
    return {agent_pb2.Grant.FromString(g.grant).grant_id for g in state.grants}


def test_agent_gets_a_signed_snapshot_then_grants_and_revocations(
    broker: BrokerService, pki: BrokerPki, agents: list[SimAgent]
) -> None:
    keys = pki.public_keys()
    first = _grant(broker)
    agent = _connect(broker, pki, agents)

    snapshot = agent.recv()
    assert snapshot.WhichOneof("message") == "snapshot"
    state = open_host_state(snapshot.snapshot, keys, "web1")  # one signature over the set
    assert state.generation == 1
    assert _grant_ids(state) == {first["grant_id"]}
    agent.ack(state.generation)

    second = _grant(broker, sources=["192.0.2.0/24"], port="22")
    change = agent.recv().change
    assert change.generation == 2
    _verify(keys, change.grant.grant, change.grant.signature, change.grant.key_id)
    delivered = agent_pb2.Grant.FromString(change.grant.grant)
    assert delivered.grant_id == second["grant_id"]
    assert list(delivered.source_prefixes) == ["192.0.2.0/24"]
    assert delivered.host_id == "web1"

    status, body = broker.request(
        "POST", f"/v1/grants/{first['grant_id']}/revoke", {"reason": "done"}
    )
    assert status == 200 and body["grant"]["state"] == "revoked"
    change = agent.recv().change
    assert change.generation == 3 and change.WhichOneof("change") == "revocation"
    _verify(
        keys, change.revocation.revocation, change.revocation.signature, change.revocation.key_id
    )
    assert (
        agent_pb2.Revocation.FromString(change.revocation.revocation).grant_id == first["grant_id"]
    )

    # Revoking again changes nothing: the next message is generation 4, the next grant.
    status, _ = broker.request(
        "POST", f"/v1/grants/{first['grant_id']}/revoke", {"reason": "again"}
    )
    assert status == 200
    agent.ack(3)
    third = _grant(broker)
    change = agent.recv().change
    assert change.generation == 4
    assert agent_pb2.Grant.FromString(change.grant.grant).grant_id == third["grant_id"]

    status, body = broker.request("GET", "/v1/hosts/web1")
    assert status == 200
    assert body["host"]["connected"] is True
    assert body["host"]["agent_version"] == "sim-1"
    assert body["host"]["replica"] == "a"


def test_reconnect_with_held_generation_gets_only_the_missing_changes(
    broker: BrokerService, pki: BrokerPki, agents: list[SimAgent]
) -> None:
    _grant(broker)
    agent = _connect(broker, pki, agents)
    state = fleet_pb2.HostState.FromString(agent.recv().snapshot.state)
    agent.ack(state.generation)
    agent.close()

    missed = [_grant(broker)["grant_id"], _grant(broker)["grant_id"]]
    again = _connect(broker, pki, agents, generation=state.generation)
    received = [again.recv().change for _ in missed]
    assert [c.generation for c in received] == [state.generation + 1, state.generation + 2]
    assert [agent_pb2.Grant.FromString(c.grant.grant).grant_id for c in received] == missed
    # Nothing else was queued before this: the next message is the next change.
    later = _grant(broker)["grant_id"]
    change = again.recv().change
    assert change.generation == state.generation + 3
    assert agent_pb2.Grant.FromString(change.grant.grant).grant_id == later


def test_snapshot_request_and_a_newer_stream_replacing_the_older(
    broker: BrokerService, pki: BrokerPki, agents: list[SimAgent]
) -> None:
    grant = _grant(broker)
    agent = _connect(broker, pki, agents, generation=1)
    request = fleet_pb2.ConnectRequest()
    request.snapshot_request.reason = "GENERATION_GAP"
    agent.send(request)
    state = open_host_state(agent.recv().snapshot, pki.public_keys(), "web1")
    assert _grant_ids(state) == {grant["grant_id"]}

    newer = _connect(broker, pki, agents, generation=1)
    ended = agent.status()
    assert ended.code == grpc.StatusCode.ABORTED
    second = _grant(broker)
    change = newer.recv().change
    assert agent_pb2.Grant.FromString(change.grant.grant).grant_id == second["grant_id"]


def test_unknown_host_is_refused_and_audited(
    broker: BrokerService, pki: BrokerPki, agents: list[SimAgent]
) -> None:
    stranger = _connect(broker, pki, agents, host="db9")
    ended = stranger.status()
    assert ended.code == grpc.StatusCode.PERMISSION_DENIED
    assert "db9" in ended.details

    status, body = broker.request("GET", "/v1/audit?limit=10000")
    assert status == 200
    refusals = [r for r in body["records"] if r["action"] == "refuse"]
    assert [(r["host_id"], r["reason"]) for r in refusals] == [("db9", "UNKNOWN_HOST")]


def test_hello_naming_another_host_than_the_certificate_is_refused(
    broker: BrokerService, pki: BrokerPki, agents: list[SimAgent]
) -> None:
    status, _ = broker.request("POST", "/v1/hosts", {"host_id": "web2"})
    assert status == 201
    impostor = _connect(broker, pki, agents, host="web1", host_id="web2")
    ended = impostor.status()
    assert ended.code == grpc.StatusCode.PERMISSION_DENIED
    assert "certificate" in ended.details


@pytest.mark.parametrize(
    ("first", "detail"),
    [
        (b"\xff\xff\xff", "malformed"),
        (b"", "no known message"),
        (fleet_pb2.ConnectRequest(ack=fleet_pb2.Ack(generation=1)).SerializeToString(), "hello"),
    ],
)
def test_malformed_or_unexpected_messages_get_invalid_argument(
    broker: BrokerService, pki: BrokerPki, agents: list[SimAgent], first: bytes, detail: str
) -> None:
    agent = SimAgent(broker.fleet_address, pki, "web1")
    agents.append(agent)
    agent.send(first)
    ended = agent.status()
    assert ended.code == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in ended.details


def test_bad_usage_report_is_refused(
    broker: BrokerService, pki: BrokerPki, agents: list[SimAgent]
) -> None:
    agent = _connect(broker, pki, agents)
    report = fleet_pb2.ConnectRequest()
    report.usage_report.grants.add(grant_id="not a grant id!", connections=1)
    agent.send(report)
    ended = agent.status()
    assert ended.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "grant_id" in ended.details


def test_usage_reports_reach_the_grant(
    broker: BrokerService, pki: BrokerPki, agents: list[SimAgent]
) -> None:
    grant = _grant(broker)
    agent = _connect(broker, pki, agents)
    agent.recv()
    report = fleet_pb2.ConnectRequest()
    report.usage_report.grants.add(grant_id=grant["grant_id"], connections=2, packets=10, bytes=999)
    agent.send(report)
    # A stream's messages are handled in order: once the ack is recorded, so is the report.
    agent.ack(1)
    for _ in range(200):
        _status, body = broker.request("GET", "/v1/hosts/web1")
        if body["host"]["acked_generation"] == 1:
            break
        threading.Event().wait(0.05)
    _status, body = broker.request("GET", f"/v1/grants/{grant['grant_id']}")
    assert (body["grant"]["connections"], body["grant"]["packets"], body["grant"]["bytes"]) == (
        2,
        10,
        999,
    )


# --- the HTTPS API --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ttl": "0s"}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"ttl": 10**40}, "ttl"),
        ({"ttl": "9999999d"}, "ttl"),
        ({"sources": ["not-an-address"]}, "sources"),
        ({"sources": "10.0.0.1"}, "sources"),
        ({"port": "70000/tcp"}, "port"),
        ({"subject": ""}, "subject"),
        ({"host": "bad host"}, "host"),
        ({"max_connections": -1}, "max_connections"),
        ({"keep_established": "yes"}, "keep_established"),
        ({"request_id": "has space"}, "request_id"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_grant_requests_name_the_field(
    broker: BrokerService, change: dict[str, Any], field: str
) -> None:
    status, body = broker.request("POST", "/v1/grants", {**GRANT, **change})
    assert status == 400, body
    assert body["error"]["code"] == "INVALID_ARGUMENT"
    assert body["error"]["field"] == field
    assert body["error"]["message"].startswith(field)


@pytest.mark.parametrize("ttl", ["0s", 10**40, -5, 0, "9999999d"])
def test_a_ttl_out_of_range_is_invalid_ttl_in_either_spelling(
    broker: BrokerService, ttl: object
) -> None:
    status, body = broker.request("POST", "/v1/grants", {**GRANT, "ttl": ttl})
    assert status == 400 and body["error"]["reason"] == "INVALID_TTL", body


def test_api_refusals(broker: BrokerService) -> None:
    status, body = broker.request("GET", "/v1/grants", token=None)
    assert status == 401 and body["error"]["reason"] == "UNAUTHENTICATED"
    status, body = broker.request("GET", "/v1/grants", token="wrong-token")
    assert status == 401
    status, body = broker.request("GET", "/v1/grants", cert=True, token=None)
    assert status == 200  # the admin client certificate
    status, body = broker.request("POST", "/v1/grants", {**GRANT, "host": "nowhere"})
    assert status == 404 and body["error"]["field"] == "host"
    status, body = broker.request("POST", "/v1/grants", b'{"host": "a", "host": "b"}')
    assert status == 400 and body["error"]["reason"] == "INVALID_JSON"
    status, body = broker.request("POST", "/v1/grants", b"[1]")
    assert status == 400
    status, body = broker.request("POST", "/v1/grants", b'{"x": "' + b"a" * 70_000 + b'"}')
    assert status == 413
    status, body = broker.request("POST", "/v1/hosts", {"host_id": "web1"})
    assert status == 409 and body["error"]["code"] == "ALREADY_EXISTS"
    status, body = broker.request("GET", "/v1/grants/g-0000000000000000")
    assert status == 404 and body["error"]["reason"] == "GRANT_NOT_FOUND"
    status, body = broker.request("GET", "/v1/grants?state=sleeping")
    assert status == 400 and body["error"]["field"] == "state"
    status, body = broker.request("GET", "/v1/grants?colour=blue")
    assert status == 400 and body["error"]["field"] == "colour"
    status, body = broker.request("GET", "/v1/nothing")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"


def test_request_id_makes_creation_idempotent(broker: BrokerService) -> None:
    status, first = broker.request("POST", "/v1/grants", {**GRANT, "request_id": "req-1"})
    assert status == 201
    status, again = broker.request("POST", "/v1/grants", {**GRANT, "request_id": "req-1"})
    assert status == 200
    assert again["grant"]["grant_id"] == first["grant"]["grant_id"]
    status, body = broker.request(
        "POST", "/v1/grants", {**GRANT, "subject": "bob", "request_id": "req-1"}
    )
    assert status == 409 and body["error"]["field"] == "request_id"
    status, body = broker.request("GET", "/v1/grants?host=web1")
    assert [g["grant_id"] for g in body["grants"]] == [first["grant"]["grant_id"]]


def test_hosts_labels_filters_and_audit_pages(broker: BrokerService) -> None:
    assert (
        broker.request("POST", "/v1/hosts", {"host_id": "db1", "labels": {"env": "dev"}})[0] == 201
    )
    status, body = broker.request("GET", "/v1/hosts?label=env=prod")
    assert [h["host_id"] for h in body["hosts"]] == ["web1"]
    status, body = broker.request("PUT", "/v1/hosts/db1/labels", {"labels": {"env": "prod"}})
    assert status == 200 and body["host"]["labels"] == {"env": "prod"}
    granted = _grant(broker, host="db1")
    status, body = broker.request("GET", "/v1/grants?label=env=prod&limit=1")
    assert [g["grant_id"] for g in body["grants"]] == [granted["grant_id"]]
    status, body = broker.request("DELETE", "/v1/hosts/db1")
    assert status == 200 and body == {"host_id": "db1"}
    assert broker.request("GET", "/v1/hosts/db1")[0] == 404
    status, page = broker.request("GET", "/v1/audit?after=0&limit=2")
    assert status == 200 and len(page["records"]) == 2 and page["next_after"] == 2
    status, rest = broker.request("GET", "/v1/audit?after=2")
    assert rest["records"][0]["seq"] == 3 and rest["next_after"] is None
    assert {"create", "sign"} <= {r["action"] for r in rest["records"]}


def test_sigkill_mid_requests_then_retry_loses_and_duplicates_nothing(
    broker: BrokerService, pki: BrokerPki, agents: list[SimAgent]
) -> None:
    request_ids = [f"kill-{n}" for n in range(40)]
    results: queue.Queue[tuple[str, int]] = queue.Queue()

    def client(ids: list[str]) -> None:
        for request_id in ids:
            try:
                status, _ = broker.request(
                    "POST", "/v1/grants", {**GRANT, "request_id": request_id}, timeout=5.0
                )
            except (OSError, http.client.HTTPException):
                # The broker died under this request: before the answer (a reset) or
                # between its headers and its body (IncompleteRead).
                status = 0
            results.put((request_id, status))

    threads = [threading.Thread(target=client, args=(request_ids[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    # Kill as soon as some requests have completed, while others are in flight.
    for _ in range(5):
        results.get(timeout=30)
    broker.kill()
    for thread in threads:
        thread.join(30)
    broker.start()

    # The client retries every request with its request id (201 new, 200 seen before).
    grant_ids = {}
    for request_id in request_ids:
        status, body = broker.request("POST", "/v1/grants", {**GRANT, "request_id": request_id})
        assert status in (200, 201), body
        grant_ids[request_id] = body["grant"]["grant_id"]
    assert len(set(grant_ids.values())) == len(request_ids)
    status, body = broker.request("GET", "/v1/grants?host=web1&limit=1000")
    assert sorted(g["grant_id"] for g in body["grants"]) == sorted(grant_ids.values())

    agent = _connect(broker, pki, agents)
    state = open_host_state(agent.recv().snapshot, pki.public_keys(), "web1")
    assert _grant_ids(state) == set(grant_ids.values())
    assert len(state.grants) == len(request_ids)
    assert state.generation == len(request_ids)


def test_sigterm_stops_cleanly_and_check_validates(tmp_path: Path, pki: BrokerPki) -> None:
    service = BrokerService(tmp_path / "b", pki)
    service.start()
    assert service.terminate() == 0
    assert '"event": "stopped"' in service.log_text()

    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "portagent.broker.fleet.serve",
            "--config",
            str(service.config_path),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(
        service.config_path.read_text().replace("[service.fleet]", "colour = 1\n[service.fleet]")
    )
    result = subprocess.run(
        [sys.executable, "-m", "portagent.broker.fleet.serve", "--config", str(bad), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78
    assert "service.colour: unknown setting" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sighup_reloads_keys_for_a_rotation(tmp_path: Path, agents: list[SimAgent]) -> None:
    own = make_pki(tmp_path / "pki")
    with broker_service(tmp_path / "b", own) as service:
        assert service.request("POST", "/v1/hosts", {"host_id": "web1"})[0] == 201
        old_id = next(iter(own.public_keys()))
        _grant(service)
        new_path = own.new_signing_key()
        new_id = next(k for k in own.public_keys() if k != old_id)
        assert new_id in new_path.name
        service.hup()
        for _ in range(200):  # bounded wait for the reload to be logged
            if any(e["event"] == "reloaded" for e in service.log_events()):
                break
            threading.Event().wait(0.05)
        # An agent that trusts only the old key still gets state signed by it; one that
        # already trusts the new key gets the new key's signature.
        old_agent = _connect(service, own, agents, trusted_key_ids=(old_id,))
        assert old_agent.recv().snapshot.key_id == old_id
        old_agent.close()
        new_agent = _connect(service, own, agents, trusted_key_ids=(old_id, new_id))
        snapshot = new_agent.recv().snapshot
        assert snapshot.key_id == new_id
        open_host_state(snapshot, own.public_keys(), "web1")
        status, body = service.request("POST", "/v1/grants", GRANT)
        assert status == 201
        assert body["grant"]["key_id"] == new_id  # the host reported trusting it


def test_service_settings_defaults_and_problems() -> None:
    settings = load_service_settings(
        """
[service]
[service.fleet]
cert = "f.pem"
key = "f.key"
client_ca = "ca.pem"
[service.api]
cert = "a.pem"
key = "a.key"
tokens_file = "tokens"
""",
        base_dir=Path("/etc/pb"),
    )
    assert settings.database == "sqlite:////var/lib/portagent-broker/broker.db"
    assert settings.fleet.listen == "[::]:7443" and settings.api.listen == "127.0.0.1:8443"
    assert settings.fleet.cert == Path("/etc/pb/f.pem") and settings.api.client_ca is None
    assert settings.replica
    with pytest.raises(ConfigError) as caught:
        load_service_settings(
            '[service]\ndatabase = "mysql://x"\nreplica = "a b"\n'
            '[service.fleet]\nlisten = "nowhere"\ncert = "c"\nkey = "k"\nclient_ca = "ca"\n'
            '[service.api]\ncert = "c"\nkey = "k"\ntokenfile = "t"\n'
        )
    problems = "\n".join(caught.value.problems)
    for expected in (
        "service.database:",
        "service.replica:",
        "service.fleet.listen:",
        'service.api.tokenfile: unknown setting; did you mean "tokens_file"?',
        "service.api.tokens_file: required",
    ):
        assert expected in problems


# --- replicas on PostgreSQL -------------------------------------------------------------------


@pytest.mark.skipif(postgres_available() is not None, reason=str(postgres_available()))
def test_a_grant_created_on_one_replica_reaches_an_agent_on_another(
    tmp_path: Path, pki: BrokerPki, agents: list[SimAgent]
) -> None:
    with postgres_cluster() as cluster:
        url = cluster.create_database("replicas")
        with (
            broker_service(tmp_path / "a", pki, database=url, replica="a") as replica_a,
            broker_service(tmp_path / "b", pki, database=url, replica="b") as replica_b,
        ):
            assert replica_a.request("POST", "/v1/hosts", {"host_id": "web1"})[0] == 201
            agent = _connect(replica_b, pki, agents)
            # A sync point: the stream is open once the host shows it connected to b.
            for _ in range(200):
                host = replica_a.request("GET", "/v1/hosts/web1")[1]["host"]
                if host["connected"]:
                    break
                threading.Event().wait(0.05)
            assert host["replica"] == "b"
            created = _grant(replica_a)
            change = agent.recv(timeout=20).change
            assert agent_pb2.Grant.FromString(change.grant.grant).grant_id == created["grant_id"]
            _verify(
                pki.public_keys(), change.grant.grant, change.grant.signature, change.grant.key_id
            )
            status, _body = replica_b.request(
                "POST", f"/v1/grants/{created['grant_id']}/revoke", {}
            )
            assert status == 200
            assert agent.recv(timeout=20).change.WhichOneof("change") == "revocation"

            # PostgreSQL restarts: b's LISTEN connection is lost, b reconnects and, since
            # a notification may have been missed, re-checks every stream it holds.
            cluster.stop("fast")
            cluster.start()
            for _ in range(100):  # a's pool meets the restart too: retry (bounded)
                status, body = replica_a.request(
                    "POST", "/v1/grants", {**GRANT, "request_id": "pg-1"}
                )
                if status in (200, 201):
                    break
                assert status == 503, body
                threading.Event().wait(0.2)
            change = agent.recv(timeout=60).change
            assert (
                agent_pb2.Grant.FromString(change.grant.grant).grant_id == body["grant"]["grant_id"]
            )
            assert any(e["event"] == "bus_lost" for e in replica_b.log_events())
            agent.close()


def test_ready_is_notified_to_systemd(tmp_path: Path, pki: BrokerPki) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        service = BrokerService(tmp_path / "b", pki, env={"NOTIFY_SOCKET": str(path)})
        try:
            service.start()
            assert sock.recv(4096).startswith(b"READY=1\n")
            assert service.terminate() == 0
            assert sock.recv(4096) == b"STOPPING=1"
        finally:
            service.close()


def test_stream_ended_is_reported(broker: BrokerService, pki: BrokerPki) -> None:
    agent = SimAgent(broker.fleet_address, pki, "web1")
    try:
        agent.hello()
        broker.kill()
        with pytest.raises(StreamEnded):
            for _ in range(10):
                agent.recv(timeout=20)
    finally:
        agent.close()
