"""Prometheus metrics of the agent ([metrics] in agent.toml; docs/metrics.md).

Imported only when [metrics] is configured: an agent without it never loads
prometheus_client (idle RSS, issue 13). Only API present in Debian 12's
python3-prometheus-client 0.16 is used (custom collector, CollectorRegistry,
generate_latest, the *MetricFamily classes), so the .deb and the venv's PyPI release
both work.

Two cheap hooks are all the grant path sees:
- EventCounters, an EventLog observer: it sees every record exactly as journald does
  and counts the ones that matter (one dict lookup per record, an increment under a
  lock for the counted ones);
- ApplyLatency.observe, called by the gRPC ApplyGrant handler (a bisect under a lock).
Everything else (grants by state, kernel elements, flows, stream clients) is read at
scrape time by AgentCollector from counts the engine keeps: a scrape never walks the
100k-grant table, and takes the engine's lock only to copy a few numbers.

Serving: MetricsServer (HTTP on a TCP address or a Unix socket: our own small
socketserver, as prometheus_client's servers take neither a Unix socket nor limits)
and TextfileWriter (node_exporter's textfile collector: temp file + rename).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import ipaddress
import os
import platform
import re
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from portagent.agent.adapters.journal import EventLog, Priority
from portagent.agent.adapters.unix_socket import bind_private, open_to_group
from portagent.agent.model import GrantState
from portagent.agent.settings import MetricsSettings, parse_listen
from portagent.wire.errors import PortagentError

# What generate_latest writes (in 0.16 and in later releases alike).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Refusal codes are ours (UPPER_SNAKE); anything else, or more distinct codes than
# this, is counted as OTHER: the label set stays bounded whatever a record carries.
REASON_PATTERN = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
MAX_REASONS = 64
OTHER_REASON = "OTHER"
# ApplyGrant: ~4 ms is typical (DESIGN.md 7); the engine answers within 30 s or not.
APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONNECTION_BUCKETS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0, 1000.0)
STREAM_APIS = ("grpc", "admin")
# HTTP: a scrape is one small GET. Anything bigger or slower is cut off.
MAX_REQUEST_BYTES = 8 * 1024
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 4


# ---- the hooks on the grant path --------------------------------------------------------


class EventCounters:
    """Counts event records by ACTION (an EventLog observer; any thread)."""

    COUNTED = ("apply", "revoke", "expire", "tamper", "quarantine")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(self.COUNTED, 0)
        self._refusals: dict[str, int] = {}

    def __call__(
        self, action: str, priority: Priority, message: str, fields: Mapping[str, str]
    ) -> None:
        if action == "refuse":
            # The journald fields name the code REASON_CODE; REASON in records written
            # before that change (and may be free text elsewhere: the pattern guards).
            reason = fields.get("REASON_CODE") or fields.get("REASON") or ""
            with self._lock:
                if reason not in self._refusals and (
                    not REASON_PATTERN.fullmatch(reason) or len(self._refusals) >= MAX_REASONS
                ):
                    reason = OTHER_REASON
                self._refusals[reason] = self._refusals.get(reason, 0) + 1
        elif action in self._counts:
            with self._lock:
                self._counts[action] += 1

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(count by action, refusals by reason)."""
        with self._lock:
            return dict(self._counts), dict(self._refusals)


class Histogram:
    """Cumulative observations in fixed buckets (what a Prometheus histogram holds)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._lock = threading.Lock()
        self._counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)  # first bound >= value
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """(cumulative buckets as HistogramMetricFamily takes them, sum)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        return _cumulative(self.bounds, counts), total


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
    return buckets


class ApplyLatency:
    """ApplyGrant durations by outcome ("ok", "error"): the gRPC server calls observe."""

    def __init__(self) -> None:
        self.by_outcome = {"ok": Histogram(APPLY_BUCKETS), "error": Histogram(APPLY_BUCKETS)}

    def observe(self, seconds: float, ok: bool) -> None:
        self.by_outcome["ok" if ok else "error"].observe(seconds)


# ---- read at scrape time ----------------------------------------------------------------


class EngineView(Protocol):
    """What the collector reads of the engine (portagent.agent.engine.Engine)."""

    reconcile_runs: dict[str, int]
    repairs: int
    store_errors: int
    last_reconcile: float

    def grant_counts(self) -> dict[GrantState, int]: ...
    def grant_states(self, handles: list[int]) -> dict[int, GrantState]: ...
    def kernel_element_count(self) -> int: ...


class Watchers(Protocol):
    def watchers(self) -> dict[str, int]: ...


class FlowCounts(Protocol):
    def flow_counts(self) -> dict[int, int] | None: ...


class AgentCollector:
    """Every portagent_* metric, built at each scrape."""

    def __init__(
        self,
        engine: EngineView,
        hub: Watchers,
        counters: EventCounters,
        latency: ApplyLatency,
        *,
        flows: FlowCounts | None,
        started: float,
        version: str,
    ) -> None:
        self._engine = engine
        self._hub = hub
        self._counters = counters
        self._latency = latency
        self._flows = flows
        self._started = started
        self._version = version

    def collect(self) -> Iterable[Metric]:
        engine = self._engine
        info = GaugeMetricFamily(
            "portagent_build_info",
            "The agent's version and Python; always 1.",
            labels=["version", "python"],
        )
        info.add_metric([self._version, platform.python_version()], 1.0)
        yield info
        yield GaugeMetricFamily(
            "portagent_start_time_seconds",
            "When portagentd started, in seconds since the Unix epoch.",
            value=self._started,
        )

        states = engine.grant_counts()
        grants = GaugeMetricFamily(
            "portagent_grants", "Grants the agent holds, by state.", labels=["state"]
        )
        for state in GrantState:
            grants.add_metric([state.value], float(states.get(state, 0)))
        yield grants

        counts, refusals = self._counters.counts()
        for action, name, text in (
            ("apply", "portagent_grants_applied", "Grants applied (new grants enforced)."),
            ("revoke", "portagent_grants_revoked", "Grants revoked (by the broker or locally)."),
            ("expire", "portagent_grants_expired", "Grants that reached their expire time."),
            ("tamper", "portagent_tamper_events", "Ruleset changes made by another process."),
            (
                "quarantine",
                "portagent_grants_quarantined",
                "Stored grants that did not verify at start and were quarantined.",
            ),
        ):
            yield CounterMetricFamily(name, text, value=float(counts.get(action, 0)))
        refused = CounterMetricFamily(
            "portagent_refusals",
            "Grants and revocations refused, by refusal code.",
            labels=["reason"],
        )
        for reason, count in sorted(refusals.items()):
            refused.add_metric([reason], float(count))
        yield refused

        runs = CounterMetricFamily(
            "portagent_reconcile_runs",
            "Reconciles with the kernel: full (listing and converging every grant) or "
            "structure (re-asserting the table's layout).",
            labels=["kind"],
        )
        for kind, count in sorted(engine.reconcile_runs.items()):
            runs.add_metric([kind], float(count))
        yield runs
        yield CounterMetricFamily(
            "portagent_reconcile_repairs",
            "Full reconciles that found the kernel different from the grants and changed it.",
            value=float(engine.repairs),
        )
        yield GaugeMetricFamily(
            "portagent_last_reconcile_timestamp_seconds",
            "When the last reconcile ended, in seconds since the Unix epoch.",
            value=engine.last_reconcile,
        )
        yield CounterMetricFamily(
            "portagent_store_errors",
            "Writes to the state file that failed.",
            value=float(engine.store_errors),
        )
        yield GaugeMetricFamily(
            "portagent_kernel_elements",
            "Elements the agent's table holds in the kernel's grant maps.",
            value=float(engine.kernel_element_count()),
        )

        latency = HistogramMetricFamily(
            "portagent_apply_duration_seconds",
            "gRPC ApplyGrant, from the handler receiving the request to its answer.",
            labels=["outcome"],
        )
        for outcome, histogram in self._latency.by_outcome.items():
            buckets, total = histogram.snapshot()
            latency.add_metric([outcome], buckets, total)
        yield latency

        watchers = self._hub.watchers()
        streams = GaugeMetricFamily(
            "portagent_event_stream_clients",
            "Open event streams, by API (grpc: WatchEvents; admin: portagent events).",
            labels=["api"],
        )
        for api in STREAM_APIS:
            streams.add_metric([api], float(watchers.get(api, 0)))
        yield streams

        yield from self._connections(states.get(GrantState.ACTIVE, 0))

    def _connections(self, active: int) -> Iterable[Metric]:
        if self._flows is None:
            return
        try:
            by_mark = self._flows.flow_counts()
        except (PortagentError, OSError):
            return  # conntrack did not answer this time: these two are left out
        if by_mark is None:
            return
        states = self._engine.grant_states(list(by_mark))
        yield GaugeMetricFamily(
            "portagent_connections",
            "Live conntrack entries of the agent's grants.",
            value=float(sum(n for mark, n in by_mark.items() if mark in states)),
        )
        per_grant = [n for mark, n in by_mark.items() if states.get(mark) is GrantState.ACTIVE]
        counts = [0] * (len(CONNECTION_BUCKETS) + 1)
        counts[0] = max(active - len(per_grant), 0)  # active grants without a connection
        for n in per_grant:
            counts[bisect.bisect_left(CONNECTION_BUCKETS, n)] += 1
        histogram = HistogramMetricFamily(
            "portagent_grant_connections",
            "Live connections per active grant, at scrape time (the buckets are gauges).",
        )
        histogram.add_metric([], _cumulative(CONNECTION_BUCKETS, counts), float(sum(per_grant)))
        yield histogram


def build_registry(collector: AgentCollector, *, process: bool) -> CollectorRegistry:
    """A registry of the agent's metrics; with `process`, also process_* (CPU, memory,
    descriptors). Not for the textfile: node_exporter has process_* metrics of its own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    return registry


# ---- HTTP -------------------------------------------------------------------------------


class _Capped(io.RawIOBase):
    """A read-only stream that ends after `budget` bytes (and says it did)."""

    def __init__(self, inner: Any, budget: int) -> None:
        self._inner = inner
        self._left = budget
        self.exhausted = False

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> bytes:
        limit = self._left if size is None or size < 0 else min(size, self._left)
        if limit <= 0:
            self.exhausted = True
            return b""
        line: bytes = self._inner.readline(limit)
        self._left -= len(line)
        return line

    def read(self, size: int = -1) -> bytes:
        limit = self._left if size < 0 else min(size, self._left)
        data: bytes = self._inner.read(limit) if limit > 0 else b""
        self._left -= len(data)
        return data


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = REQUEST_TIMEOUT  # applied to the connection before anything is read
    server_version = "portagentd"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.rfile = _Capped(self.rfile, MAX_REQUEST_BYTES)  # type: ignore[assignment]

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        if self.rfile.exhausted:  # type: ignore[attr-defined]
            self.send_error(431, "request too large")
            return
        if self.path.partition("?")[0] != "/metrics":
            self.send_error(404, "the metrics are at /metrics")
            return
        try:
            data = self.server.render()
        except Exception as exc:  # a collector bug: answer, and say so once in the log
            self.server.failed(exc)
            self.send_error(500, "could not collect the metrics")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not worth a journal record


class _HTTPServer(socketserver.ThreadingMixIn, socketserver.BaseServer):
    """A thread per connection, at most MAX_CONNECTIONS at once: one more is closed at
    once by the accepting thread."""

    daemon_threads = True
    render: Callable[[], bytes]
    failed: Callable[[BaseException], None]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer; nothing to tell anyone


class _TCPServer(_HTTPServer, socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = 16


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(_HTTPServer, socketserver.UnixStreamServer):
    request_queue_size = 16


class MetricsServer:
    """Serves GET /metrics on [metrics] listen. Binds in the constructor (OSError when it
    cannot); serves from start() on a thread of its own."""

    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        events: EventLog,
        *,
        group: str | None = None,
        unix_path: Path | None = None,
    ) -> None:
        self._registry = registry
        self._events = events
        self._failed_once = False
        self.path = unix_path
        server: _HTTPServer
        if unix_path is not None:
            server = self._bind_unix(unix_path, group)
        else:
            host, port = parse_listen(listen)
            family = _TCP6Server if ipaddress.ip_address(host).version == 6 else _TCPServer
            server = family((host, port), _Handler)
        server.render = self.render
        server.failed = self._failed
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)

    @property
    def address(self) -> Any:
        return self._server.server_address

    def _bind_unix(self, path: Path, group: str | None) -> _HTTPServer:
        server: _HTTPServer = bind_private(path, lambda address: _UnixServer(address, _Handler))
        if group is not None:
            open_to_group(path, group)  # no such group: root only
        return server

    def render(self) -> bytes:
        return generate_latest(self._registry)

    def _failed(self, exc: BaseException) -> None:
        if not self._failed_once:
            self._failed_once = True
            self._events.emit(
                "error", f"metrics: collecting failed: {type(exc).__name__}: {exc}", Priority.ERR
            )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


# ---- node_exporter textfile -------------------------------------------------------------


class TextfileWriter:
    """Rewrites [metrics] textfile every interval: a temporary file in the same folder
    (a name node_exporter ignores: not *.prom), then rename, so a reader sees the old
    or the new file, never half of one. No fsync: after a crash the file is stale
    anyway (node_textfile_mtime_seconds says how stale). Removed on a clean stop."""

    def __init__(
        self, path: Path, interval: float, registry: CollectorRegistry, events: EventLog
    ) -> None:
        self.path = path
        self._temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._interval = interval
        self._registry = registry
        self._events = events
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="metrics-textfile", daemon=True)

    def write(self) -> bool:
        """One rewrite; False (logged when it starts failing) when it failed."""
        try:
            data = generate_latest(self._registry)
            # The service's UMask= is 0077: node_exporter (another user) must read it.
            fd = os.open(
                self._temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            )
            try:
                os.fchmod(fd, 0o644)
                with os.fdopen(fd, "wb", closefd=False) as out:
                    out.write(data)
            finally:
                os.close(fd)
            self._temp.replace(self.path)
        except Exception as exc:
            with contextlib.suppress(OSError):
                self._temp.unlink()
            if not self._failing:
                self._failing = True
                self._events.emit(
                    "error",
                    f"metrics: cannot write {self.path} ({exc}); retrying every "
                    f"{self._interval:g}s",
                    Priority.ERR,
                    FILE=str(self.path),
                )
            return False
        if self._failing:
            self._failing = False
            self._events.emit("error", f"metrics: writing {self.path} again", Priority.NOTICE)
        return True

    def start(self) -> None:
        self.write()  # there from the start, not one interval later
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.write()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        # A stopped agent has no metrics: absent, rather than frozen at their last values.
        with contextlib.suppress(OSError):
            self.path.unlink()


# ---- the daemon's one entry point ------------------------------------------------------


class Metrics:
    """Everything [metrics] turns on, wired to a running agent."""

    def __init__(
        self,
        settings: MetricsSettings,
        events: EventLog,
        *,
        group: str | None,
        started: float,
        version: str,
    ) -> None:
        self.settings = settings
        self.counters = EventCounters()
        self.latency = ApplyLatency()
        self._events = events
        self._group = group
        self._started = started
        self._version = version
        self.server: MetricsServer | None = None
        self.textfile: TextfileWriter | None = None
        events.add_observer(self.counters)

    def attach(self, engine: Any, flows: FlowCounts | None) -> None:
        """Bind the listener (OSError when it cannot) and prepare the textfile, reading
        `engine` (an Engine) and `flows` (a UsageReader) at each scrape."""
        collector = AgentCollector(
            engine,
            engine.hub,
            self.counters,
            self.latency,
            flows=flows,
            started=self._started,
            version=self._version,
        )
        listen = self.settings.listen
        if listen is not None:
            try:
                self.server = MetricsServer(
                    listen,
                    build_registry(collector, process=sys.platform == "linux"),
                    self._events,
                    group=self._group,
                    unix_path=self.settings.unix_socket,
                )
            except OSError as exc:
                raise OSError(
                    f"metrics.listen: cannot serve on {listen} ({exc.strerror or exc})"
                ) from exc
        if self.settings.textfile is not None:
            self.textfile = TextfileWriter(
                self.settings.textfile,
                self.settings.textfile_interval,
                build_registry(collector, process=False),
                self._events,
            )

    def start(self) -> None:
        if self.server is not None:
            self.server.start()
        if self.textfile is not None:
            self.textfile.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.textfile is not None:
            self.textfile.stop()
        self._events.remove_observer(self.counters)


__all__ = [
    "AgentCollector",
    "ApplyLatency",
    "EventCounters",
    "Histogram",
    "Metrics",
    "MetricsServer",
    "TextfileWriter",
    "build_registry",
]
