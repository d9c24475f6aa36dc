"""The broker's metrics without a network: [service.metrics] parsing, the outcome and
status-class mappings, the per-stream delivery timer, and the scrape-time figures read
from a real SQLite store (see tests/integration/test_broker_metrics.py for /metrics
scraped from a running broker)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from portagent.broker.fleet.keyring import KeyRing, generate_key
from portagent.broker.fleet.metrics import (
    MAX_TIMED_PER_STREAM,
    OUTCOMES,
    BrokerMetrics,
    DeliveryTimer,
    StoreCollector,
    request_outcome,
    status_class,
)
from portagent.broker.fleet.model import AccessRequest, RequestState
from portagent.broker.fleet.service_settings import MetricsSettings, load_service_settings
from portagent.broker.fleet.store import FleetStore
from portagent.broker.identity.model import admin_identity
from portagent.broker.signing import grant_request
from portagent.wire.errors import ConfigError

SERVICE = """
[service]
[service.fleet]
listen = "[::]:7443"
cert = "f.pem"
key = "f.key"
client_ca = "ca.pem"
[service.api]
listen = "127.0.0.1:8443"
cert = "a.pem"
key = "a.key"
tokens_file = "tokens"
"""


def _problems(extra: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_service_settings(SERVICE + extra, base_dir=Path("/etc/pb"))
    return "\n".join(caught.value.problems)


def test_metrics_are_off_without_the_table_and_on_with_a_listen_address() -> None:
    assert load_service_settings(SERVICE, base_dir=Path("/etc/pb")).metrics is None
    settings = load_service_settings(
        SERVICE + '[service.metrics]\nlisten = "127.0.0.1:9478"\n', base_dir=Path("/etc/pb")
    )
    assert settings.metrics == MetricsSettings(listen="127.0.0.1:9478")
    v6 = load_service_settings(
        SERVICE + '[service.metrics]\nlisten = "[::1]:9478"\n', base_dir=Path("/etc/pb")
    )
    assert v6.metrics == MetricsSettings(listen="[::1]:9478")


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("[service.metrics]\n", "service.metrics.listen: required"),
        ('[service.metrics]\nlisten = "9478"\n', "service.metrics.listen: expected ADDRESS:PORT"),
        ('[service.metrics]\nlisten = "127.0.0.1:0"\n', "service.metrics.listen: expected"),
        ("[service.metrics]\nlisten = 9478\n", "service.metrics.listen: expected str"),
        (
            '[service.metrics]\nlisten = "127.0.0.1:9478"\npath = "/m"\n',
            "service.metrics.path: unknown setting",
        ),
        (
            '[service.metrics]\nlisten = "127.0.0.1:8443"\n',
            "service.metrics.listen: '127.0.0.1:8443' is already the api listener's address",
        ),
        (
            '[service.metrics]\nlisten = "[::]:7443"\n',
            "service.metrics.listen: '[::]:7443' is already the fleet listener's address",
        ),
    ],
)
def test_metrics_config_problems_name_the_key(extra: str, problem: str) -> None:
    assert problem in _problems(extra)


def test_metrics_must_be_a_table() -> None:
    text = SERVICE.replace("[service]\n", '[service]\nmetrics = "127.0.0.1:9478"\n', 1)
    with pytest.raises(ConfigError) as caught:
        load_service_settings(text, base_dir=Path("/etc/pb"))
    assert "service.metrics: expected dict" in "\n".join(caught.value.problems)


def _access(approvals_required: int) -> AccessRequest:
    return AccessRequest(
        request_id="r-0123456789abcdef",
        requester=admin_identity("ops"),
        host_id="web1",
        protocol="tcp",
        port_first=22,
        port_last=22,
        sources=("10.0.0.1/32",),
        ttl=60.0,
        reason="INC-1",
        rule="r",
        approvals_required=approvals_required,
        approvers="dba" if approvals_required else "",
        state=RequestState.GRANTED,
        created_at=1.0,
        expires_at=2.0,
    )


@pytest.mark.parametrize(
    ("event", "required", "outcome"),
    [
        ("request.granted", 0, "granted"),
        ("request.granted", 2, "approved"),
        ("request.pending", 1, "pending"),
        ("request.denied", 1, "denied"),
        ("request.expired", 1, "expired"),
        ("request.cancelled", 1, "cancelled"),
        ("request.closed", 0, "closed"),
        ("request.unheard-of", 0, None),
    ],
)
def test_request_events_map_to_one_outcome(event: str, required: int, outcome: str | None) -> None:
    assert request_outcome(event, _access(required)) == outcome
    assert outcome is None or outcome in OUTCOMES


@pytest.mark.parametrize(
    ("status", "label"), [(200, "2xx"), (201, "2xx"), (404, "4xx"), (503, "5xx"), (99, "other")]
)
def test_status_class(status: int, label: str) -> None:
    assert status_class(status) == label


def test_delivery_timer_observes_each_generation_once_up_to_the_ack() -> None:
    timer = DeliveryTimer()
    timer.sent(1, 100.0)
    timer.sent(2, 101.0)
    timer.sent(3, 102.5)
    timer.sent(4, 0.0)  # no creation time known: not timed
    assert timer.acked(2, 103.0) == [3.0, 2.0]
    assert timer.acked(2, 104.0) == []  # already observed
    # Another replica's clock a little ahead: never a negative latency.
    assert timer.acked(9, 102.0) == [0.0]
    assert timer.acked(9, 200.0) == []


def test_delivery_timer_is_bounded_for_an_agent_that_never_acks() -> None:
    timer = DeliveryTimer()
    for generation in range(1, MAX_TIMED_PER_STREAM + 11):
        timer.sent(generation, 1.0)
    observed = timer.acked(MAX_TIMED_PER_STREAM + 10, 2.0)
    assert len(observed) == MAX_TIMED_PER_STREAM  # the ten oldest were dropped


def _samples(metrics: BrokerMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
        for s in family.samples
    }


def test_two_brokers_in_one_process_keep_their_own_registries() -> None:
    first, second = BrokerMetrics(), BrokerMetrics(process=False)
    first.request_event("request.pending", _access(1))
    first.http_request("POST", "/v1/requests", 202, 0.01)
    first.http_request("GET", "unmatched", 404, None)
    one, two = _samples(first), _samples(second)
    pending = ("portagent_broker_access_requests_total", frozenset({("outcome", "pending")}))
    assert one[pending] == 1.0 and two[pending] == 0.0
    posted = frozenset({("method", "POST"), ("route", "/v1/requests"), ("code", "2xx")})
    assert one[("portagent_broker_http_requests_total", posted)] == 1.0
    unmatched = frozenset({("method", "GET"), ("route", "unmatched"), ("code", "4xx")})
    assert one[("portagent_broker_http_requests_total", unmatched)] == 1.0
    # Not timed: no duration series for the unmatched route.
    assert not any(
        name.startswith("portagent_broker_http_request_duration") and ("route", "unmatched") in ls
        for name, ls in one
    )
    assert any(name == "process_resident_memory_bytes" for name, _ in one)
    assert not any(name == "process_resident_memory_bytes" for name, _ in two)
    build = [v for (name, _), v in one.items() if name == "portagent_broker_build_info"]
    assert build == [1.0]


def test_store_figures_are_read_at_scrape_time_and_database_down_is_zero(tmp_path: Path) -> None:
    store = FleetStore.open(f"sqlite:///{tmp_path / 'b.db'}", replica="a")
    generate_key(tmp_path / "keys", now=0.0)
    keyring = KeyRing.load(tmp_path / "keys")
    logged: list[tuple[str, dict[str, object]]] = []
    metrics = BrokerMetrics(process=False)
    # Registering describes the figures without reading the database.
    metrics.registry.register(
        StoreCollector(store, clock=lambda: 1000.0, log=lambda e, **f: logged.append((e, f)))
    )
    try:
        for host in ("web1", "web2", "web3"):
            store.add_host(host, {}, actor="admin:ops", now=900.0)
        store.agent_connected(
            "web1",
            agent_version="t",
            agent_labels={},
            trusted_key_ids=list(keyring.key_ids),
            generation=0,
            now=900.0,
        )
        for ttl in (600.0, 600.0, 10.0):  # the last one has expired by "now" (1000)
            request = grant_request(
                host_id="web1", subject="alice", sources=["10.0.0.1"], port="22", ttl=ttl
            )
            store.create_grant(
                request, keyring=keyring, actor="admin:ops", request_id=None, now=950.0
            )
        store.record_ack("web1", 1, now=960.0)
        # web2's three generations behind do not count: its agent is not connected.
        for _ in range(3):
            request = grant_request(
                host_id="web2", subject="bob", sources=["10.0.0.2"], port="22", ttl=600.0
            )
            store.create_grant(
                request, keyring=keyring, actor="admin:ops", request_id=None, now=950.0
            )

        samples = {name: v for (name, _), v in _samples(metrics).items()}
        assert samples["portagent_broker_database_up"] == 1.0
        assert samples["portagent_broker_hosts"] == 3.0
        assert samples["portagent_broker_agents_behind"] == 1.0
        assert samples["portagent_broker_generations_behind"] == 2.0
        assert samples["portagent_broker_generations_behind_max"] == 2.0
        assert samples["portagent_broker_grants_active"] == 5.0
        assert samples["portagent_broker_audit_records"] == store.count("audit")
    finally:
        store.close()
    # The file is gone: the next scrape says so instead of failing the whole scrape.
    (tmp_path / "b.db").unlink()
    (tmp_path / "b.db").mkdir()
    samples = {name: v for (name, _), v in _samples(metrics).items()}
    assert samples["portagent_broker_database_up"] == 0.0
    assert "portagent_broker_hosts" not in samples
    assert [event for event, _ in logged] == ["metrics_store_error"]


ROOT = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"\bportagent_broker_[a-z_]+")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _base(name: str, known: set[str]) -> str:
    """A series name back to its family's (…_bucket -> …, …_total -> …)."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in known:
            return name.removesuffix(suffix)
    return name


def _families(tmp_path: Path) -> dict[str, str]:
    """Every portagent_broker_* family a broker exposes, with its type."""
    store = FleetStore.open(f"sqlite:///{tmp_path / 'b.db'}", replica="a")
    try:
        metrics = BrokerMetrics(process=False)
        metrics.registry.register(StoreCollector(store, log=lambda *a, **k: None))
        text = generate_latest(metrics.registry).decode()
    finally:
        store.close()
    found = {
        family.name: family.type
        for family in text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
        if family.name.startswith("portagent_broker_")
    }
    # The text format gives each counter's and histogram's _created series as a gauge
    # family of its own: the client's, documented once in the prose.
    return {
        n: t
        for n, t in found.items()
        if not (n.endswith("_created") and n.removesuffix("_created") in found)
    }


def test_every_metric_is_documented_with_its_type_and_the_docs_name_no_other(
    tmp_path: Path,
) -> None:
    families = _families(tmp_path)
    doc = (ROOT / "docs" / "metrics.md").read_text()
    section = doc[doc.index("## Broker") :]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[1].startswith("`portagent_broker_"):
            rows[cells[1].strip("`")] = cells[2]
    exposed = {
        name + ("_total" if kind == "counter" else ""): kind for name, kind in families.items()
    }
    assert set(rows) == set(exposed)
    assert all(rows[name] == kind for name, kind in exposed.items()), rows
    # Every name the prose and the alert examples use exists too.
    assert {_base(n, set(families)) for n in _NAME.findall(section)} <= set(families)


def test_the_example_dashboard_queries_only_metrics_the_broker_has(tmp_path: Path) -> None:
    families = set(_families(tmp_path))
    dashboard = json.loads((ROOT / "packaging" / "grafana" / "portagent-broker.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {_base(n, families) for e in exprs for n in _NAME.findall(e)}
    assert used <= families, used - families
    # The dashboard shows the figures the issue asks for.
    for wanted in (
        "portagent_broker_agents_connected",
        "portagent_broker_generations_behind_max",
        "portagent_broker_delivery_latency_seconds",
        "portagent_broker_access_requests",
    ):
        assert wanted in used
