"""The agent's metrics without a kernel: [metrics] config validation, the counters fed by
event records, the collector over a real engine on fakes, the HTTP server on a Unix
socket, the textfile writer, and the lazy import of prometheus_client."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from portagent.agent.adapters.journal import Priority
from portagent.agent.engine import Engine
from portagent.agent.grant_table import GrantTable
from portagent.agent.metrics import (
    MAX_REASONS,
    MAX_REQUEST_BYTES,
    AgentCollector,
    ApplyLatency,
    EventCounters,
    Histogram,
    MetricsServer,
    TextfileWriter,
    build_registry,
)
from portagent.agent.model import GrantState
from portagent.agent.settings import ApiSettings, Policy, Settings, load_settings
from portagent.agent.store import Store, StoreError
from portagent.testing.fakes import FakeClock, FakeFirewall, memory_log
from portagent.testing.grants import TestSigner, grant_record
from portagent.testing.metrics_text import parse_samples as parse
from portagent.testing.metrics_text import sample_value as value
from portagent.wire.errors import ConfigError
from portagent.wire.ports import parse_port_spec

BASE = """
host_id = "host-a"
[api]
listen = "10.0.0.1:7443"
ca_file = "ca.pem"
cert_file = "agent.pem"
key_file = "agent.key"
[policy]
guarded = ["22/tcp"]
"""



def load(metrics: str) -> Settings:
    text = BASE + TestSigner().toml() + "[metrics]\n" + metrics
    return load_settings(text, base_dir=Path("/etc/portagent"))


def problems(metrics: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(metrics)
    return caught.value.problems


# ---- config -------------------------------------------------------------------------


def test_metrics_are_off_without_the_section() -> None:
    settings = load_settings(BASE + TestSigner().toml())
    assert not settings.metrics.enabled
    assert settings.metrics.listen is None and settings.metrics.textfile is None


@pytest.mark.parametrize("listen", ["127.0.0.1:9478", "[::1]:9478", "127.0.0.2:80"])
def test_loopback_addresses_are_accepted(listen: str) -> None:
    metrics = load(f'listen = "{listen}"\n').metrics
    assert metrics.enabled and metrics.listen == listen and metrics.unix_socket is None


def test_a_unix_socket_resolves_against_the_config_folder() -> None:
    metrics = load('listen = "unix:run/metrics.sock"\n').metrics
    assert metrics.listen == "unix:/etc/portagent/run/metrics.sock"
    assert metrics.unix_socket == Path("/etc/portagent/run/metrics.sock")


def test_a_remote_address_needs_allow_remote() -> None:
    (problem,) = problems('listen = "10.0.0.1:9478"\n')
    assert problem.startswith("metrics.listen: 10.0.0.1 is not a loopback address")
    assert "metrics.allow_remote = true" in problem
    (wildcard,) = problems('listen = "[::]:9478"\n')
    assert "not a loopback address" in wildcard
    metrics = load('listen = "0.0.0.0:9478"\nallow_remote = true\n').metrics
    assert metrics.listen == "0.0.0.0:9478" and metrics.allow_remote


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("localhost:9478", "give an IP address"),
        ("127.0.0.1", "expected ADDRESS:PORT"),
        ("127.0.0.1:0", "port must be 1..65535"),
        ("::1:9478", "an IPv6 address needs brackets"),
        ("unix:", 'expected "unix:/PATH"'),
        ("unix:/" + "x" * 120, "at most 107 bytes"),
        ("unix:/run/portagent/admin.sock", "is the admin socket"),
    ],
)
def test_bad_listen_values_are_named(listen: str, expected: str) -> None:
    (problem,) = problems(f'listen = "{listen}"\n')
    assert problem.startswith("metrics.listen: ") and expected in problem


def test_textfile_and_its_interval() -> None:
    metrics = load('textfile = "/var/lib/prometheus/node-exporter/portagent.prom"\n').metrics
    assert metrics.enabled and metrics.listen is None
    assert metrics.textfile == Path("/var/lib/prometheus/node-exporter/portagent.prom")
    assert metrics.textfile_interval == 15.0
    assert load('textfile = "x.prom"\ntextfile_interval = "1m"\n').metrics.textfile_interval == 60


def test_every_metrics_problem_at_once() -> None:
    found = problems(
        'listen = "10.1.1.1:1"\ntextfile = "portagent.txt"\ntextfile_interval = "0s"\n'
        'allow_remote = "yes"\ncolour = 1\n'
    )
    joined = "\n".join(found)
    for field in (
        "metrics.listen:",
        "metrics.textfile: must end in .prom",
        "metrics.textfile_interval: must be between",
        "metrics.allow_remote:",
        "metrics.colour",
    ):
        assert field in joined, field
    (alone,) = problems('textfile_interval = "5s"\n')
    assert alone == "metrics.textfile_interval: set without metrics.textfile"


# ---- counters from event records ----------------------------------------------------


def test_event_counters_count_actions_and_refusal_codes() -> None:
    counters = EventCounters()
    for action in ("apply", "apply", "revoke", "expire", "tamper", "connection_opened", "start"):
        counters(action, Priority.INFO, "m", {})
    counters("refuse", Priority.WARNING, "m", {"REASON": "BAD_SIGNATURE"})
    # The renamed field wins; REASON may then be the grant's free-text reason.
    counters("refuse", Priority.WARNING, "m", {"REASON_CODE": "GRANT_EXPIRED", "REASON": "x y"})
    counters("refuse", Priority.WARNING, "m", {"REASON": "ticket 42: please"})
    counters("refuse", Priority.WARNING, "m", {})
    counts, refusals = counters.counts()
    assert counts == {"apply": 2, "revoke": 1, "expire": 1, "tamper": 1, "quarantine": 0}
    assert refusals == {"BAD_SIGNATURE": 1, "GRANT_EXPIRED": 1, "OTHER": 2}


def test_refusal_codes_are_a_bounded_label_set() -> None:
    counters = EventCounters()
    for index in range(MAX_REASONS + 10):
        counters("refuse", Priority.WARNING, "m", {"REASON": f"CODE_{index}"})
    counters("refuse", Priority.WARNING, "m", {"REASON": "CODE_0"})
    _, refusals = counters.counts()
    assert len(refusals) == MAX_REASONS + 1  # the first codes, and OTHER
    assert refusals["CODE_0"] == 2 and refusals["OTHER"] == 10


def test_histogram_buckets_are_cumulative_and_bounds_inclusive() -> None:
    histogram = Histogram((0.0, 1.0, 5.0))
    for observed in (0.0, 1.0, 1.5, 5.0, 7.0):
        histogram.observe(observed)
    buckets, total = histogram.snapshot()
    assert buckets == [("0.0", 1.0), ("1.0", 2.0), ("5.0", 4.0), ("+Inf", 5.0)]
    assert total == 14.5


def test_grant_table_keeps_counts_by_state() -> None:
    table = GrantTable()
    table.put(grant_record(1, ["10.0.0.1"]), due=0)
    table.put(grant_record(2, ["10.0.0.2"]), due=0)
    assert table.counts == {GrantState.ACTIVE: 2, GrantState.EXPIRED: 0, GrantState.REVOKED: 0}
    table.put(grant_record(1, ["10.0.0.1"], state=GrantState.REVOKED), due=0)
    table.remove("g2")
    table.remove("g404")
    assert table.counts == {GrantState.ACTIVE: 0, GrantState.EXPIRED: 0, GrantState.REVOKED: 1}


# ---- the collector over a real engine ------------------------------------------------


class Flows:
    """Conntrack entries per mark, as UsageReader.flow_counts gives them."""

    def __init__(self, counts: dict[int, int]) -> None:
        self.counts = counts

    def flow_counts(self) -> dict[int, int] | None:
        return self.counts


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[tuple[Engine, TestSigner, FakeClock, EventCounters]]:
    signer, clock = TestSigner(), FakeClock()
    settings = Settings(
        host_id="host-a",
        api=ApiSettings("127.0.0.1:0", Path("ca"), Path("c"), Path("k")),
        trusted_keys=(signer.trusted,),
        policy=Policy(guarded=(parse_port_spec("5432/tcp"),), max_ttl=3600.0),
        state_dir=tmp_path,
        reconcile_interval=3600.0,
    )
    _, events = memory_log()
    counters = EventCounters()
    events.add_observer(counters)
    store = Store(settings.store_path, now=clock())
    engine = Engine(settings, FakeFirewall(clock), store, events, clock=clock)
    engine.start()
    yield engine, signer, clock, counters
    engine.stop()
    store.close()


def test_the_collector_reports_what_the_engine_did(
    engine: tuple[Engine, TestSigner, FakeClock, EventCounters], monkeypatch: pytest.MonkeyPatch
) -> None:
    eng, signer, clock, counters = engine
    now = clock.now
    one = eng.apply_grant(signer.grant(now, grant_id="g-1", source_prefixes=["10.0.0.1"]))
    two = eng.apply_grant(signer.grant(now, grant_id="g-2", source_prefixes=["10.0.0.2"]))
    eng.apply_grant(signer.grant(now, grant_id="g-3", source_prefixes=["10.0.0.3"], ttl=5))
    eng.revoke_local("g-2", actor="test")
    with pytest.raises(Exception, match="not guarded"):
        eng.apply_grant(signer.grant(now, port_start=22))
    clock.advance(6)
    eng._expire()

    # A failing state file: counted.
    @contextmanager
    def read_only() -> Iterator[None]:
        raise StoreError("state.db: read-only")
        yield  # pragma: no cover

    eng.apply_grant(signer.grant(clock.now, grant_id="g-4", source_prefixes=["10.0.0.4"], ttl=5))
    monkeypatch.setattr(eng._store, "transaction", read_only)
    clock.advance(6)
    eng._expire()
    monkeypatch.undo()
    # Tampering: the kernel lost everything; a full reconcile repairs it.
    eng._firewall.flush()  # type: ignore[attr-defined]
    eng.on_foreign_change(4242, "nft")
    eng._reconcile_full()

    latency = ApplyLatency()
    latency.observe(0.004, True)
    latency.observe(0.0001, False)
    eng.hub.watch_started("grpc")
    # Marks 1 (g-1, active) and 2 (g-2, revoked) have flows; 999 is no grant of ours.
    flows = Flows({one.handle: 3, two.handle: 1, 999: 7})
    collector = AgentCollector(
        eng, eng.hub, counters, latency, flows=flows, started=1.5e9, version="9.9"
    )
    from prometheus_client import generate_latest

    samples = parse(generate_latest(build_registry(collector, process=False)).decode())
    assert value(samples, "portagent_grants", state="active") == 1
    assert value(samples, "portagent_grants", state="revoked") == 1
    assert value(samples, "portagent_grants", state="expired") == 0  # forgotten at once
    assert value(samples, "portagent_grants_applied_total") == 4
    assert value(samples, "portagent_grants_revoked_total") == 1
    assert value(samples, "portagent_grants_expired_total") == 2
    assert value(samples, "portagent_refusals_total", reason="PORT_NOT_GUARDED") == 1
    assert value(samples, "portagent_tamper_events_total") == 1
    assert value(samples, "portagent_store_errors_total") == 1
    assert value(samples, "portagent_reconcile_repairs_total") >= 1
    assert value(samples, "portagent_reconcile_runs_total", kind="full") >= 2  # start, repair
    assert value(samples, "portagent_last_reconcile_timestamp_seconds") == eng.last_reconcile
    assert value(samples, "portagent_kernel_elements") == 1
    assert value(samples, "portagent_event_stream_clients", api="grpc") == 1
    assert value(samples, "portagent_event_stream_clients", api="admin") == 0
    assert value(samples, "portagent_build_info", version="9.9", python=sys.version.split()[0])
    assert value(samples, "portagent_start_time_seconds") == 1.5e9
    assert value(samples, "portagent_apply_duration_seconds_count", outcome="ok") == 1
    assert value(samples, "portagent_apply_duration_seconds_bucket", outcome="ok", le="0.0025") == 0
    assert value(samples, "portagent_apply_duration_seconds_bucket", outcome="ok", le="0.005") == 1
    assert value(samples, "portagent_apply_duration_seconds_count", outcome="error") == 1
    assert value(samples, "portagent_connections") == 4  # not the 7 of a foreign mark
    assert value(samples, "portagent_grant_connections_count") == 1  # one active grant
    assert value(samples, "portagent_grant_connections_sum") == 3
    assert value(samples, "portagent_grant_connections_bucket", le="2.0") == 0
    assert value(samples, "portagent_grant_connections_bucket", le="5.0") == 1
    assert not any(name.startswith("process_") for name, _ in samples)


# ---- serving -------------------------------------------------------------------------


def _registry() -> tuple[object, EventCounters]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily

    counters = EventCounters()

    class One:
        def collect(self) -> Iterator[CounterMetricFamily]:
            counts, _ = counters.counts()
            yield CounterMetricFamily("portagent_grants_applied", "t", value=counts["apply"])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    return registry, counters


def _request(path: Path, raw: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(raw)
        chunks = []
        for _ in range(1000):  # bounded: the server closes after one answer
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_server_answers_metrics_and_little_else(tmp_path: Path) -> None:
    registry, counters = _registry()
    counters("apply", Priority.INFO, "m", {})
    _, events = memory_log()
    path = tmp_path / "sub" / "metrics.sock"
    server = MetricsServer("unix:" + str(path), registry, events, unix_path=path)  # type: ignore[arg-type]
    server.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # no group given: root only
        answer = _request(path, b"GET /metrics HTTP/1.0\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200")
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        assert value(parse(body.decode()), "portagent_grants_applied_total") == 1
        assert _request(path, b"HEAD /metrics HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\n")
        assert _request(path, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404")
        assert _request(path, b"POST /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 501")
        # Cut off after MAX_REQUEST_BYTES: a 431, or a reset when the bytes the server
        # never read make the kernel reset the connection first. Never the metrics.
        huge = b"GET /metrics HTTP/1.0\r\n" + b"X-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
        try:
            status = _request(path, huge).split(b"\r\n")[0]
        except ConnectionResetError:
            status = b"reset"
        assert status in (b"HTTP/1.0 431 request too large", b"reset")
        # Exactly the budget and no end of headers: all read, then answered 431.
        start = b"GET /metrics HTTP/1.0\r\nX-Pad: "
        exact = start + b"a" * (MAX_REQUEST_BYTES - len(start))
        assert _request(path, exact).startswith(b"HTTP/1.0 431")
    finally:
        server.stop()
    assert not path.exists()


def test_the_server_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    registry, _ = _registry()
    _, events = memory_log()
    path = tmp_path / "metrics.sock"
    path.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        MetricsServer("unix:" + str(path), registry, events, unix_path=path)  # type: ignore[arg-type]
    assert path.read_text() == "keep me"


def test_the_textfile_is_replaced_whole_readable_and_removed_at_stop(tmp_path: Path) -> None:
    registry, counters = _registry()
    log, events = memory_log()
    target = tmp_path / "portagent.prom"
    writer = TextfileWriter(target, 3600.0, registry, events)  # type: ignore[arg-type]
    writer.start()
    try:
        assert value(parse(target.read_text()), "portagent_grants_applied_total") == 0
        counters("apply", Priority.INFO, "m", {})
        assert writer.write()
        assert value(parse(target.read_text()), "portagent_grants_applied_total") == 1
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert [p.name for p in tmp_path.iterdir()] == ["portagent.prom"]
    finally:
        writer.stop()
    assert not target.exists()
    assert log.getvalue() == ""


def test_a_textfile_that_cannot_be_written_is_logged_once(tmp_path: Path) -> None:
    registry, _ = _registry()
    log, events = memory_log()
    writer = TextfileWriter(tmp_path / "missing" / "p.prom", 1.0, registry, events)  # type: ignore[arg-type]
    assert not writer.write()
    assert not writer.write()
    assert log.getvalue().count("cannot write") == 1
    (tmp_path / "missing").mkdir()
    assert writer.write()
    assert "writing" in log.getvalue().splitlines()[-1]


# ---- lazy import -----------------------------------------------------------------------


def test_the_daemon_does_not_import_prometheus_client_until_asked() -> None:
    code = (
        "import sys\n"
        "import portagent.agent.daemon, portagent.agent.engine, portagent.agent.admin\n"
        "import portagent.agent.api.grpc_server\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
        "import portagent.agent.metrics\n"
        "assert 'prometheus_client' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- docs and the example dashboard ---------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_every_metric_is_documented_and_the_dashboard_uses_only_real_ones(
    engine: tuple[Engine, TestSigner, FakeClock, EventCounters],
) -> None:
    import json
    import re

    from prometheus_client import generate_latest

    eng, _, _, counters = engine
    counters("refuse", Priority.WARNING, "m", {"REASON": "BAD_SIGNATURE"})  # a labelled one
    collector = AgentCollector(
        eng, eng.hub, counters, ApplyLatency(), flows=Flows({}), started=0.0, version="0"
    )
    registry = build_registry(collector, process=False)
    exposed = {name for name, _ in parse(generate_latest(registry).decode())}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exposed}
    doc = (REPO / "docs" / "metrics.md").read_text()
    agent_section = doc.partition("\n## Agent\n")[2].partition("\n## Broker\n")[0]
    table = {
        re.sub(r"_total$", "", m) for m in re.findall(r"^\| `(portagent_\w+)`", agent_section, re.M)
    }
    assert families == table

    dashboard = json.loads((REPO / "packaging" / "grafana" / "portagent-agent.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"portagent_\w+", expr)}
    assert used and used <= exposed, used - exposed
    examples = (REPO / "packaging" / "debian" / "portagent.examples").read_text().split()
    assert examples == ["packaging/grafana/portagent-agent.json"]
