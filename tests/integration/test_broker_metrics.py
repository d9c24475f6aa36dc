"""/metrics of a real `portagent-broker serve` (a subprocess), scraped over plain HTTP
and checked against what the test did: simulated agents with their own certificates
connecting, acknowledging (or not), asking for snapshots; grants made and revoked
through the HTTPS API; access requests with every outcome the API has, from OIDC
tokens of a local test issuer and a Cedar policy."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from portagent.testing.broker_service import (
    AckingAgent,
    BrokerPki,
    BrokerService,
    Scrape,
    SimAgent,
    broker_service,
    make_pki,
)
from portagent.testing.oidc_issuer import TestIssuer
from portagent.v1 import fleet_pb2

WAIT = 15.0
HOST = "db-1"
GRANT = {"host": "web1", "subject": "alice", "sources": ["10.1.2.3"], "port": "22", "ttl": "15m"}
POLICY = f"""
@id("ci-db")
@max_ttl("10m")
permit(principal is GithubWorkflow, action == Action::"request", resource in Host::"{HOST}")
when {{ principal.repository == "octo-org/app" && resource.port == 5432 }};

@id("oncall-db")
@max_ttl("10m")
@approvals("1")
@approvers("dba")
permit(principal in Group::"oncall", action == Action::"request", resource)
when {{ resource.labels.contains("role=db") }};
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> BrokerPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path, pki: BrokerPki) -> Iterator[BrokerService]:
    with broker_service(tmp_path / "broker", pki, metrics=True) as service:
        status, body = service.request("POST", "/v1/hosts", {"host_id": "web1"})
        assert status == 201, body
        yield service


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    """Agents to close at the end, also on failure."""
    opened: list[Any] = []
    yield opened
    for agent in reversed(opened):
        agent.close()


def _until(broker: BrokerService, check: Callable[[Scrape], bool]) -> Scrape:
    """Scrape until `check` holds (bounded): acks and disconnects land asynchronously."""
    deadline = time.monotonic() + WAIT
    while True:
        scrape = broker.scrape()
        if check(scrape) or time.monotonic() >= deadline:
            return scrape
        time.sleep(0.05)


def _grant(broker: BrokerService, **changes: Any) -> dict[str, Any]:
    status, body = broker.request("POST", "/v1/grants", {**GRANT, **changes})
    assert status == 201, body
    grant: dict[str, Any] = body["grant"]
    return grant


def test_agents_grants_and_delivery_latency_match_what_happened(
    broker: BrokerService, pki: BrokerPki, closing: list[Any]
) -> None:
    first = broker.scrape()
    assert first.content_type.startswith("text/plain")
    assert first.value("portagent_broker_agents_connected") == 0
    assert first.value("portagent_broker_database_up") == 1
    assert first.value("portagent_broker_hosts") == 1
    assert first.total("portagent_broker_build_info") == 1
    assert first.value("portagent_broker_delivery_latency_seconds_count") == 0
    assert first.value("process_open_fds") is not None

    agent = AckingAgent(broker, pki, "web1")
    closing.append(agent)
    assert (
        _until(broker, lambda s: s.value("portagent_broker_agents_connected") == 1).value(
            "portagent_broker_agents_connected"
        )
        == 1
    )

    grants = [_grant(broker) for _ in range(3)]
    status, _ = broker.request(
        "POST", f"/v1/grants/{grants[0]['grant_id']}/revoke", {"reason": "done"}
    )
    assert status == 200
    scrape = _until(
        broker, lambda s: s.value("portagent_broker_delivery_latency_seconds_count") == 4
    )
    # Three grants and one revocation, each sent on its own and acknowledged.
    assert scrape.value("portagent_broker_delivery_latency_seconds_count") == 4
    assert scrape.value("portagent_broker_changes_sent_total", kind="grant") == 3
    assert scrape.value("portagent_broker_changes_sent_total", kind="revocation") == 1
    assert scrape.value("portagent_broker_acks_total") == 4
    assert scrape.value("portagent_broker_grants_issued_total", by="admin") == 3
    assert scrape.value("portagent_broker_grants_revoked_total") == 1
    assert scrape.value("portagent_broker_grants_active") == 2
    assert scrape.value("portagent_broker_agents_behind") == 0
    assert scrape.value("portagent_broker_generations_behind_max") == 0
    assert scrape.total("portagent_broker_snapshots_sent_total") == 0  # it held nothing
    assert scrape.value("portagent_broker_agent_connects_total") == 1
    assert (
        scrape.value(
            "portagent_broker_http_requests_total", method="POST", route="/v1/grants", code="2xx"
        )
        == 3
    )
    assert (
        scrape.value(
            "portagent_broker_http_request_duration_seconds_count",
            method="POST",
            route="/v1/grants/{grant_id}/revoke",
        )
        == 1
    )
    audit_records = scrape.value("portagent_broker_audit_records")
    status, audit = broker.request("GET", "/v1/audit?limit=10000")
    assert status == 200 and audit_records == audit["records"][-1]["seq"]

    # A path with an id is counted under its route template; no route at all, apart.
    status, _ = broker.request("GET", "/v1/grants/g-nope")
    assert status == 404
    status, _ = broker.request("GET", "/v1/nowhere")
    assert status == 404
    scrape = broker.scrape()
    assert (
        scrape.value(
            "portagent_broker_http_requests_total",
            method="GET",
            route="/v1/grants/{grant_id}",
            code="4xx",
        )
        == 1
    )
    assert (
        scrape.value(
            "portagent_broker_http_requests_total", method="GET", route="unmatched", code="4xx"
        )
        == 1
    )
    assert "g-nope" not in scrape.text and "/v1/nowhere" not in scrape.text

    agent.close()
    closing.remove(agent)
    scrape = _until(broker, lambda s: s.value("portagent_broker_agents_connected") == 0)
    assert scrape.value("portagent_broker_agents_connected") == 0


def test_lag_snapshots_and_refused_streams(
    broker: BrokerService, pki: BrokerPki, closing: list[Any]
) -> None:
    _grant(broker)
    agent = SimAgent(broker.fleet_address, pki, "web1")
    closing.append(agent)
    agent.hello(generation=0)
    snapshot = agent.recv(WAIT)  # it held nothing: the whole set
    assert snapshot.WhichOneof("message") == "snapshot"
    # Not acknowledged, and two more changes sent and not acknowledged either.
    _grant(broker)
    _grant(broker)
    assert agent.recv(WAIT).change.generation == 2
    assert agent.recv(WAIT).change.generation == 3
    scrape = broker.scrape()
    assert scrape.value("portagent_broker_agents_behind") == 1
    assert scrape.value("portagent_broker_generations_behind") == 3
    assert scrape.value("portagent_broker_generations_behind_max") == 3
    assert scrape.value("portagent_broker_snapshots_sent_total", reason="initial") == 1

    agent.ack(3)
    # The ack is recorded in the database, then timed: wait for both.
    scrape = _until(
        broker,
        lambda s: (
            s.value("portagent_broker_agents_behind") == 0
            and s.value("portagent_broker_delivery_latency_seconds_count") == 2
        ),
    )
    assert scrape.value("portagent_broker_agents_behind") == 0
    assert scrape.value("portagent_broker_generations_behind_max") == 0
    # Generations 2 and 3 were sent one by one; the snapshot is counted, not timed.
    assert scrape.value("portagent_broker_delivery_latency_seconds_count") == 2

    request = fleet_pb2.ConnectRequest()
    request.snapshot_request.reason = "GENERATION_GAP"
    agent.send(request)
    assert agent.recv(WAIT).WhichOneof("message") == "snapshot"
    refusal = fleet_pb2.ConnectRequest()
    refusal.refusal.generation = 3
    refusal.refusal.code = "FAILED_PRECONDITION"
    refusal.refusal.reason = "NOT_THIS_HOST"
    agent.send(refusal)
    scrape = _until(broker, lambda s: s.value("portagent_broker_agent_refusals_total") == 1)
    assert scrape.value("portagent_broker_snapshots_sent_total", reason="requested") == 1
    assert scrape.value("portagent_broker_agent_refusals_total") == 1

    stranger = SimAgent(broker.fleet_address, pki, "db9")  # not in the inventory
    closing.append(stranger)
    stranger.hello()
    assert stranger.status(WAIT).code == grpc.StatusCode.PERMISSION_DENIED
    scrape = broker.scrape()
    assert scrape.value("portagent_broker_streams_refused_total", code="PERMISSION_DENIED") == 1
    assert scrape.value("portagent_broker_agents_connected") == 1


def test_only_get_metrics_is_served_and_openmetrics_when_asked(broker: BrokerService) -> None:
    assert broker.metrics_url is not None
    base = broker.metrics_url.removesuffix("/metrics")
    for path in ("/", "/v1/healthz", "/metrics/x"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(base + path, timeout=WAIT)
        assert caught.value.code == 404
        caught.value.close()
    post = urllib.request.Request(broker.metrics_url, data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(post, timeout=WAIT)
    assert caught.value.code == 404
    caught.value.close()
    ask = urllib.request.Request(
        broker.metrics_url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(ask, timeout=WAIT) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.read().decode().rstrip().endswith("# EOF")
    ready = [e for e in broker.log_events() if e.get("event") == "ready"]
    assert ready and ready[-1]["metrics"] == broker.metrics_url.split("/")[2]


def test_a_metrics_address_in_use_stops_the_service(tmp_path: Path, pki: BrokerPki) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        service = BrokerService(tmp_path / "busy", pki)
        with service.config_path.open("a") as config:
            config.write(f'\n[service.metrics]\nlisten = "127.0.0.1:{port}"\n')
        try:
            # The API may answer /v1/healthz before the metrics bind fails: either
            # start() sees the exit, or the process exits just after.
            with contextlib.suppress(RuntimeError):
                service.start()
            assert service.process is not None
            assert service.process.wait(WAIT) == 1
        finally:
            service.close()
    events = [e["event"] for e in service.log_events()]
    assert "ready" not in events
    failed = [e for e in service.log_events() if e.get("event") == "listen_failed"]
    assert failed and failed[0]["listener"] == "metrics"


def test_access_requests_by_outcome(tmp_path: Path, pki: BrokerPki, closing: list[Any]) -> None:
    policy = tmp_path / "policy.cedar"
    policy.write_text(POLICY)
    with TestIssuer(tmp_path / "gh") as github, TestIssuer(tmp_path / "corp") as people:
        broker = BrokerService(tmp_path / "broker", pki, metrics=True)
        with broker.config_path.open("a") as config:
            config.write(
                f"""
[service.policy]
file = {json.dumps(str(policy))}

[[service.issuers]]
name = "gh"
kind = "github"
issuer = {json.dumps(github.url)}
audience = "portagent"
ca = {json.dumps(str(github.ca_path))}

[[service.issuers]]
name = "corp"
kind = "person"
issuer = {json.dumps(people.url)}
audience = "portagent"
ca = {json.dumps(str(people.ca_path))}
"""
            )
        closing.append(broker)
        broker.start()
        status, _ = broker.request("POST", "/v1/hosts", {"host_id": HOST, "labels": {"role": "db"}})
        assert status == 201
        closing.append(AckingAgent(broker, pki, HOST))

        def ask(token: str, **body: Any) -> tuple[int, Any]:
            request = {"host": HOST, "port": "5432/tcp", "ttl": "5m", "reason": "INC-1", **body}
            return broker.request("POST", "/v1/requests", request, token=token)

        ci = github.github()
        carol = people.person("u-carol", email="carol@example.com", groups=["oncall"])
        dave = people.person("u-dave", email="dave@example.com", groups=["dba"])

        assert ask(ci, port="22/tcp")[0] == 403  # refused
        assert ask(ci, ttl="1h")[0] == 403  # refused
        status, granted = ask(ci)  # granted at once ...
        assert status == 201
        status, _ = broker.request(
            "POST", f"/v1/requests/{granted['request']['id']}/close", {}, token=ci
        )
        assert status == 200  # ... then closed
        pending = []
        for _ in range(3):
            status, body = ask(carol)
            assert status == 202
            pending.append(body["request"]["id"])
        status, _ = broker.request(
            "POST", f"/v1/requests/{pending[0]}/approve", {}, token=dave
        )  # approved
        assert status == 200
        status, _ = broker.request("POST", f"/v1/requests/{pending[1]}/deny", {})  # denied
        assert status == 200
        status, _ = broker.request(
            "POST", f"/v1/requests/{pending[2]}/close", {}, token=carol
        )  # cancelled while pending
        assert status == 200
        assert ask(ci, reason="INC-2")[0] == 201  # a second one granted at once

        scrape = broker.scrape()
        outcomes = {
            outcome: scrape.value("portagent_broker_access_requests_total", outcome=outcome)
            for outcome in (
                "refused",
                "granted",
                "pending",
                "approved",
                "denied",
                "expired",
                "cancelled",
                "closed",
            )
        }
        assert outcomes == {
            "refused": 2,
            "granted": 2,
            "pending": 3,
            "approved": 1,
            "denied": 1,
            "expired": 0,
            "cancelled": 1,
            "closed": 1,
        }
        assert scrape.value("portagent_broker_grants_issued_total", by="request") == 3
        assert scrape.value("portagent_broker_grants_issued_total", by="admin") == 0
        assert scrape.value("portagent_broker_grants_revoked_total") == 1  # the closed one
        assert (
            scrape.value(
                "portagent_broker_http_requests_total",
                method="POST",
                route="/v1/requests",
                code="4xx",
            )
            == 2
        )
