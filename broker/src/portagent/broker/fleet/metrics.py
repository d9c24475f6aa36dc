"""The broker service's Prometheus metrics (docs/metrics.md, "Broker").

Every metric lives in a registry of our own (never prometheus_client's global one),
so one process can hold several brokers (the tests do). Only API that Debian
bookworm's python3-prometheus-client 0.16 has is used.

Two kinds of figures:
* events counted as they happen, by the API and the delivery hub (requests by outcome,
  grants issued, changes and snapshots sent, delivery latency, HTTP requests): these
  are this replica's own, so with several replicas sum them across replicas;
* state read from the database when scraped (`StoreCollector`): the lag of the agents
  whose stream this replica holds, and fleet-wide totals (hosts, active grants, audit
  records) that every replica reports alike (take one, or max, not the sum).

Labels are bounded: no host, grant or identity ever becomes a label (a fleet has 10k
hosts); outcomes, reasons and routes come from fixed sets.
"""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from portagent.broker.fleet.model import AccessRequest, StoreError

if TYPE_CHECKING:
    from portagent.broker.fleet.store import FleetStore

PREFIX = "portagent_broker"
# Commit -> ack is milliseconds on a healthy fleet and minutes for an agent that was
# away (its changes wait for it); the top buckets tell those apart.
DELIVERY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
# A request that waits (`wait`, up to 30 s) for approval or the agent lands in the top.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Access request outcomes: each request counts once as refused, granted (at once) or
# pending; each pending one later once as approved, denied, expired or cancelled; a
# granted or approved one once more as closed when its requester ends it.
OUTCOMES = ("refused", "granted", "pending", "approved", "denied", "expired", "cancelled", "closed")
_EVENT_OUTCOME = {
    "request.pending": "pending",
    "request.denied": "denied",
    "request.expired": "expired",
    "request.cancelled": "cancelled",
    "request.closed": "closed",
}
ISSUED_BY = ("admin", "request")  # POST /v1/grants (break-glass) | an access request
SNAPSHOT_REASONS = ("initial", "requested", "resync")
CHANGE_KINDS = ("grant", "revocation")
# The highest number of sent-but-unacknowledged changes timed per stream: an agent that
# never acks must not grow the broker's memory (the oldest timing is dropped).
MAX_TIMED_PER_STREAM = 1024
UNMATCHED_ROUTE = "unmatched"


def request_outcome(event: str, access: AccessRequest) -> str | None:
    """The outcome an access-request event counts as (None: not one we count).
    "request.granted" is `granted` for a rule that needs no approval and `approved`
    for one whose approvals arrived."""
    if event == "request.granted":
        return "approved" if access.approvals_required > 0 else "granted"
    return _EVENT_OUTCOME.get(event)


def status_class(status: int) -> str:
    """'2xx' ... '5xx' (anything else: 'other'): a bounded label for a status code."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


def _version() -> str:
    try:
        return metadata.version("portagent-broker")
    except metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


class BrokerMetrics:
    """The counters the API and the hub update; `registry` is what /metrics serves."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        p = PREFIX
        if process:
            # process_*: RSS, CPU, open files (every agent stream is a socket).
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.build_info = Gauge(
            f"{p}_build_info",
            "Always 1; the broker's version and Python's as labels.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(version=_version(), python=platform.python_version()).set(1)
        self.agents_connected = Gauge(
            f"{p}_agents_connected",
            "Agents whose fleet stream this replica holds now.",
            registry=r,
        )
        self.agent_connects = Counter(
            f"{p}_agent_connects",
            "Fleet streams opened by agents (each accepted hello).",
            registry=r,
        )
        self.streams_refused = Counter(
            f"{p}_streams_refused",
            "Fleet streams ended by the broker, by gRPC status code "
            "(PERMISSION_DENIED: unknown host or certificate mismatch).",
            ["code"],
            registry=r,
        )
        self.changes_sent = Counter(
            f"{p}_changes_sent",
            "Changes (a grant or a revocation) sent to agents, one by one.",
            ["kind"],
            registry=r,
        )
        self.snapshots_sent = Counter(
            f"{p}_snapshots_sent",
            "Signed full-state snapshots sent to agents, by why: initial (the agent "
            "held nothing), requested (the agent asked), resync (the change log could "
            "not bring it up to date).",
            ["reason"],
            registry=r,
        )
        self.acks = Counter(
            f"{p}_acks",
            "Acknowledgements received from agents.",
            registry=r,
        )
        self.agent_refusals = Counter(
            f"{p}_agent_refusals",
            "Refusals reported by agents (a grant or snapshot the agent would not apply).",
            registry=r,
        )
        self.delivery_latency = Histogram(
            f"{p}_delivery_latency_seconds",
            "From a change's creation (the API call that made it) to the agent's "
            "acknowledgement of its generation, for changes this replica sent one by one.",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.access_requests = Counter(
            f"{p}_access_requests",
            "Access requests by outcome: refused, granted or pending when made; "
            "approved, denied, expired or cancelled when a pending one ends; closed "
            "when the requester ends a granted one.",
            ["outcome"],
            registry=r,
        )
        self.grants_issued = Counter(
            f"{p}_grants_issued",
            "Grants issued, by how: admin (break-glass POST /v1/grants) or request.",
            ["by"],
            registry=r,
        )
        self.grants_revoked = Counter(
            f"{p}_grants_revoked",
            "Grants revoked (by an admin, by their identity, or a closed request).",
            registry=r,
        )
        self.grants_expired = Counter(
            f"{p}_grants_expired",
            "Grants this replica marked expired (each is marked by one replica).",
            registry=r,
        )
        self.http_requests = Counter(
            f"{p}_http_requests",
            "HTTPS API requests by method, route template and status class.",
            ["method", "route", "code"],
            registry=r,
        )
        self.http_duration = Histogram(
            f"{p}_http_request_duration_seconds",
            "HTTPS API request handling time by method and route template "
            "(requests with `wait` include the wait).",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        # Pre-create the fixed label sets: a rate() over a series that appears at its
        # first event misses that event, and dashboards show 0 rather than nothing.
        for outcome in OUTCOMES:
            self.access_requests.labels(outcome=outcome)
        for by in ISSUED_BY:
            self.grants_issued.labels(by=by)
        for reason in SNAPSHOT_REASONS:
            self.snapshots_sent.labels(reason=reason)
        for kind in CHANGE_KINDS:
            self.changes_sent.labels(kind=kind)

    def request_event(self, event: str, access: AccessRequest) -> None:
        outcome = request_outcome(event, access)
        if outcome is not None:
            self.access_requests.labels(outcome=outcome).inc()

    def http_request(self, method: str, route: str, status: int, seconds: float | None) -> None:
        """One answered API request (seconds None: not timed, e.g. no such route)."""
        self.http_requests.labels(method=method, route=route, code=status_class(status)).inc()
        if seconds is not None:
            self.http_duration.labels(method=method, route=route).observe(max(0.0, seconds))


class DeliveryTimer:
    """Per stream: when each generation sent one by one was created, until the agent
    acknowledges it (then its latency is observed). Generations are sent in order,
    so the oldest are first; bounded by MAX_TIMED_PER_STREAM."""

    __slots__ = ("_created",)

    def __init__(self) -> None:
        self._created: dict[int, float] = {}

    def sent(self, generation: int, created_at: float) -> None:
        if created_at <= 0:
            return  # unknown creation time: not timed
        self._created[generation] = created_at
        if len(self._created) > MAX_TIMED_PER_STREAM:
            del self._created[next(iter(self._created))]

    def acked(self, generation: int, now: float) -> list[float]:
        """Latencies of every timed generation up to `generation` (now acknowledged)."""
        done = [g for g in self._created if g <= generation]
        # Clocks of two replicas may disagree a little: never a negative latency.
        return [max(0.0, now - self._created.pop(g)) for g in done]


class StoreCollector(Collector):
    """Figures read from the database at scrape time (one short read transaction).
    When the database cannot be read, `portagent_broker_database_up` is 0 and the
    other figures are left out (absent, not stale)."""

    def __init__(
        self, store: FleetStore, *, clock: Callable[[], float] = time.time, log: Callable[..., None]
    ) -> None:
        self._store = store
        self._clock = clock
        self._log = log

    def describe(self) -> Iterable[Metric]:
        # Names only: registering must not query the database.
        return list(self._families())

    def _families(self) -> Iterator[GaugeMetricFamily]:
        p = PREFIX
        yield GaugeMetricFamily(
            f"{p}_database_up", "1 when the last scrape could read the database, else 0."
        )
        yield GaugeMetricFamily(
            f"{p}_agents_behind",
            "Agents connected to this replica that have not acknowledged their host's "
            "latest generation.",
        )
        yield GaugeMetricFamily(
            f"{p}_generations_behind",
            "Generations not yet acknowledged, summed over the agents connected to this replica.",
        )
        yield GaugeMetricFamily(
            f"{p}_generations_behind_max",
            "The most generations any agent connected to this replica is behind.",
        )
        yield GaugeMetricFamily(
            f"{p}_hosts", "Hosts in the inventory (fleet-wide: every replica reports it)."
        )
        yield GaugeMetricFamily(
            f"{p}_grants_active",
            "Grants active and not yet expired (fleet-wide: every replica reports it).",
        )
        yield GaugeMetricFamily(
            f"{p}_audit_records",
            "Records in the audit chain (its last sequence number; fleet-wide).",
        )

    def collect(self) -> Iterable[Metric]:
        up, behind, pending, worst, hosts, active, audit = self._families()
        try:
            figures = self._store.metrics_figures(now=self._clock())
        except StoreError as exc:
            self._log("metrics_store_error", error=str(exc)[:300])
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        behind.add_metric([], figures.agents_behind)
        pending.add_metric([], figures.generations_behind)
        worst.add_metric([], figures.generations_behind_max)
        hosts.add_metric([], figures.hosts)
        active.add_metric([], figures.grants_active)
        audit.add_metric([], figures.audit_records)
        return [up, behind, pending, worst, hosts, active, audit]


def build_metrics_app(registry: CollectorRegistry, executor: Executor) -> Starlette:
    """GET /metrics (Prometheus text, or OpenMetrics when the scraper asks for it);
    anything else 404. Collecting reads the database, so it runs in `executor` (one
    thread: concurrent scrapes queue there, never on the event loop)."""

    async def scrape(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(executor, encoder, registry)
        return Response(body, headers={"Content-Type": content_type})

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("only GET /metrics here\n", status_code=404)

    return Starlette(
        routes=[Route("/metrics", scrape, methods=["GET"])],
        exception_handlers={404: not_found, 405: not_found},
    )
