"""Broker scenarios: the service (`portagent-broker serve`) delivering to a fleet.

7. fleet: 10,000 simulated agents (bench.fleet_sim: a few processes, one mTLS stream
   and one certificate per agent) on one broker with SQLite: API grant -> the right
   agent received it (p50/p99), broker RSS with every stream idle, and reconnect storms.
8. agents: real portagentd in a namespace dialing the broker: API grant -> port open,
   next to the direct AgentService path in the same run.
9. failover: two replicas on one PostgreSQL; the replica the agent is connected to is
   SIGKILLed; the agent reconnects to the other and converges; a grant created during
   the failover is enforced; nothing lost, nothing duplicated.

Times are CLOCK_MONOTONIC, shared by every process and namespace on the machine, so the
controller's t0 (just before the HTTP request is written) compares directly with the
receive time a simulated agent records, or the first accepted SYN a probe sees.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import secrets
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import env
from bench.context import Context
from bench.stats import Table, fmt, percentile

SOURCE = "10.1.2.3"
PORT = "5432/tcp"


# --- a keep-alive HTTPS JSON client (one per thread) ----------------------------------------


class ApiError(RuntimeError):
    pass


class Api:
    """The broker's HTTPS JSON API over one kept-alive connection, so a timed request pays
    no TLS handshake (as a long-lived caller would). Not thread-safe: one per thread."""

    def __init__(self, host: str, port: int, ca: Path, token: str, timeout: float = 30.0) -> None:
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.context = ssl.create_default_context(cafile=str(ca))
        self.conn: http.client.HTTPSConnection | None = None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                ok: Sequence[int] = (200, 201)) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                        context=self.context)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                payload = response.read()
                break
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        if response.status not in ok:
            raise ApiError(f"{method} {path}: HTTP {response.status}: {payload[:300]!r}")
        result: dict[str, Any] = json.loads(payload) if payload else {}
        return result

    def create_grant(self, host: str, *, ttl: int = 3600, subject: str = "bench",
                     source: str = SOURCE, port: str = PORT) -> dict[str, Any]:
        body = {"host": host, "subject": subject, "sources": [source], "port": port,
                "ttl": ttl, "reason": "bench", "request_id": "b-" + secrets.token_hex(8)}
        grant: dict[str, Any] = self.request("POST", "/v1/grants", body)["grant"]
        return grant

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def parallel(count: int, threads: int, api_factory: Callable[[], Api],
             work: Callable[[Api, int], None], deadline_s: float) -> float:
    """Run work(api, i) for i < count over `threads` kept-alive connections; seconds."""
    t0 = time.monotonic()
    deadline = t0 + deadline_s
    lock = threading.Lock()
    todo = iter(range(count))

    def loop() -> None:
        api = api_factory()
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                work(api, i)
        finally:
            api.close()

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(loop) for _ in range(threads)]:
            f.result()
    return time.monotonic() - t0


# --- process figures ------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_nofile() -> None:
    """10,000 streams are 10,000 descriptors in the broker (it inherits the limit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def profiled(pid: int, name: str) -> Iterator[None]:
    """With PORTAGENT_BENCH_PROFILE=DIR, sample `pid` with py-spy while the block runs."""
    target = os.environ.get("PORTAGENT_BENCH_PROFILE")
    spy = Path(env.PYTHON).parent / "py-spy"
    if not target or not spy.exists():
        yield
        return
    Path(target).mkdir(parents=True, exist_ok=True)
    out = Path(target) / f"{name}.txt"
    proc = env.spawn([str(spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                      "--nonblocking", "-o", str(out)], what=f"py-spy {name}")
    try:
        yield
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        with contextlib.suppress(Exception):
            proc.wait(30)
        print(f"  profile of the broker: {out}", flush=True)


def ms(values: Sequence[float]) -> list[float]:
    return [v * 1000 for v in values]


def pstats(values_ms: Sequence[float]) -> tuple[str, str, str]:
    return (fmt(percentile(values_ms, 50)), fmt(percentile(values_ms, 99)),
            fmt(max(values_ms)) if values_ms else "n/a")


# --- scenario 7: a simulated fleet on one broker --------------------------------------------


@dataclass
class FleetFigures:
    agents: int
    processes: int
    certs_s: float = 0.0
    hosts_s: float = 0.0
    prepopulate_s: float = 0.0
    cold: Any = None
    cold_broker_s: float | None = None
    idle_rss_mb: float = 0.0
    empty_rss_mb: float = 0.0
    idle_cpu_pct: float = 0.0
    sim_rss_mb: float = 0.0
    latencies: list[float] | None = None
    api_latencies: list[float] | None = None
    missed: int = 0
    storm_snapshot: Any = None
    storm_resume: Any = None
    storm_resume_broker_s: float | None = None
    # One host's snapshot query (the store's host_state statement) before/after ANALYZE.
    snapshot_query_ms: tuple[float, float | None] = (0.0, None)
    # The machine's 1-minute load average around the latency trials (shared machine).
    load_before: float = 0.0
    load_after: float = 0.0


SNAPSHOT_QUERY = (
    "SELECT hosts.generation, grants.grant_id, grants.grant_bytes FROM hosts LEFT OUTER JOIN "
    "grants ON grants.host_id = hosts.host_id AND grants.state = 'active' AND "
    "grants.expire_time > ? WHERE hosts.host_id = ? AND hosts.removed_at IS NULL "
    "ORDER BY grants.grant_id")


def analyze(broker: Broker, host: str) -> tuple[float, float | None]:
    """Time the store's snapshot statement for one host, then run ANALYZE (unless
    PORTAGENT_BENCH_NO_ANALYZE=1) and time it again. Without statistics SQLite's planner
    answers it from the (state, expire_time) index, a scan of every active grant of the
    fleet, instead of (host_id, state): each snapshot then costs O(fleet)."""
    import sqlite3

    path = str(broker.service.database).removeprefix("sqlite:///")

    def timed(conn: sqlite3.Connection) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            conn.execute(SNAPSHOT_QUERY, (time.time(), host)).fetchall()
            best = min(best, time.perf_counter() - t0)
        return best * 1000

    conn = sqlite3.connect(path, timeout=30)
    try:
        before = timed(conn)
        if os.environ.get("PORTAGENT_BENCH_NO_ANALYZE") == "1":
            return before, None
        conn.execute("ANALYZE")
        conn.commit()
        return before, timed(conn)
    finally:
        conn.close()


def connected_count(api: Api) -> tuple[int, int]:
    """(hosts connected, hosts connected whose acknowledged generation is current)."""
    hosts = api.request("GET", "/v1/hosts")["hosts"]
    connected = [h for h in hosts if h["connected"]]
    return len(connected), sum(1 for h in connected if h["acked_generation"] == h["generation"])


def wait_broker_connected(api: Api, count: int, t0: float, timeout: float) -> float | None:
    """Seconds from t0 until the broker lists `count` connected hosts, all acknowledged
    (polled about once a second: a 10,000-host listing is itself work for the broker)."""
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        connected, acked = connected_count(api)
        if connected >= count and acked >= count:
            return time.monotonic() - t0
        time.sleep(1.0)
    return None


def fleet(ctx: Context) -> None:
    from bench import fleet_sim

    agents = 1000 if ctx.quick else 10_000
    processes = 2 if ctx.quick else 4
    trials = 50 if ctx.quick else 500
    figures = FleetFigures(agents=agents, processes=processes)
    raise_nofile()
    pki = make_pki("fleet")
    broker = start_broker("fleet", pki)
    api = broker.api()
    figures.empty_rss_mb = rss_mb(broker.pid)
    hosts = fleet_sim.host_ids(agents)
    cert_dir = env.tempdir("fleet-certs")
    figures.certs_s = fleet_sim.make_agent_certs(pki.ca_key, pki.ca, hosts, cert_dir)
    print(f"  fleet: {agents} agent certificates in {figures.certs_s:.1f} s", flush=True)

    def add_host(a: Api, i: int) -> None:
        a.request("POST", "/v1/hosts", {"host_id": hosts[i], "labels": {"bench": "fleet"}})

    figures.hosts_s = parallel(agents, 8, broker.api, add_host, deadline_s=900)

    # Every host gets one grant before the agents connect, so every first Hello (generation
    # 0) is answered with a signed snapshot: the cold start is measured, not just dialing.
    def prepopulate(a: Api, i: int) -> None:
        a.create_grant(hosts[i])

    figures.prepopulate_s = parallel(agents, 8, broker.api, prepopulate, deadline_s=1800)
    print(f"  fleet: {agents} hosts in {figures.hosts_s:.1f} s, {agents} grants in "
          f"{figures.prepopulate_s:.1f} s", flush=True)
    figures.snapshot_query_ms = analyze(broker, hosts[0])
    sim = fleet_sim.FleetSim(hosts, processes, env.child_env())
    env.CLEANUP.push("fleet sim", sim.close)
    sim.setup(broker.fleet_address, "", pki.ca_pem, cert_dir)

    # First connection, paced (at most 100 dials in progress per worker): the steady state
    # to measure from. Every agent must receive its grant (a change or a snapshot).
    t_cold = time.monotonic()
    figures.cold = sim.connect(min_generation=1, timeout=600, max_dialing=100)
    print(f"  fleet: cold start: {figures.cold.describe()}", flush=True)
    figures.cold_broker_s = wait_broker_connected(api, agents, t_cold, timeout=120)
    # Only agents that converged take part in the latency trials (a missing one would
    # only measure the 10 s wait).
    ready = sim.converged(1) or hosts

    # Idle: every stream open, nothing to deliver (keepalive pings only).
    time.sleep(5)
    cpu0, w0 = cpu_seconds(broker.pid), time.monotonic()
    time.sleep(20)
    figures.idle_cpu_pct = 100 * (cpu_seconds(broker.pid) - cpu0) / (time.monotonic() - w0)
    figures.idle_rss_mb = rss_mb(broker.pid)
    figures.sim_rss_mb = sum(s["rss_mb"] for s in sim.stats())

    # Grant latency: API request written -> the right simulated agent received the change.
    latencies: list[float] = []
    api_latencies: list[float] = []
    figures.load_before = os.getloadavg()[0]
    with profiled(broker.pid, "broker-fleet-grants"):
        for _ in range(trials):
            host = ctx.rng.choice(ready)
            time.sleep(ctx.rng.uniform(0.005, 0.03))
            t0 = time.monotonic()
            grant = api.create_grant(host)
            t_api = time.monotonic()
            received = sim.wait_grant(host, grant["grant_id"], timeout=10)
            api_latencies.append(t_api - t0)
            if received is None:
                figures.missed += 1
            else:
                latencies.append(received - t0)
    figures.latencies, figures.api_latencies = latencies, api_latencies
    figures.load_after = os.getloadavg()[0]
    print(f"  fleet: {trials} grants, p50 {percentile(ms(latencies), 50):.1f} ms, p99 "
          f"{percentile(ms(latencies), 99):.1f} ms, {figures.missed} missed", flush=True)

    try:
        storms(sim, api, agents, broker, figures)
    finally:
        # What was measured is reported even if a storm fails.
        api.close()
        sim.close()
        report_fleet(ctx, figures)


def storms(sim: Any, api: Api, agents: int, broker: Broker, figures: FleetFigures) -> None:
    # Reconnect storm 1: every stream dropped; every agent comes back claiming generation 0
    # (it lost its state), so each needs a signed snapshot of its current set.
    sim.disconnect()
    time.sleep(3)
    with profiled(broker.pid, "broker-fleet-storm"):
        figures.storm_snapshot = sim.connect(forget=True, timeout=240)
    print(f"  fleet: storm (snapshots): {figures.storm_snapshot.describe()}", flush=True)
    # Reconnect storm 2: every agent resumes with the generation it holds (nothing to send);
    # converged = the broker lists every host connected and acknowledged.
    sim.disconnect()
    time.sleep(3)
    t_resume = time.monotonic()
    figures.storm_resume = sim.connect(timeout=240)
    figures.storm_resume_broker_s = wait_broker_connected(api, agents, t_resume, timeout=120)
    print(f"  fleet: storm (resume): {figures.storm_resume.describe()}", flush=True)


def report_fleet(ctx: Context, f: FleetFigures) -> None:
    lat = ms(f.latencies or [])
    api_lat = ms(f.api_latencies or [])
    table = Table(f"7. Broker fleet: {f.agents:,} simulated agents on one broker (SQLite)",
                  ["Measure", "p50", "p99", "max / total", "Note"])
    p50, p99, top = pstats(lat)
    table.add("API grant → right agent received it (ms)", p50, p99, top,
              f"{len(lat)} grants to random hosts, {f.missed} not received within 10 s; "
              f"load average {f.load_before:.1f} → {f.load_after:.1f}")
    p50, p99, top = pstats(api_lat)
    table.add("API call alone (POST /v1/grants returned, ms)", p50, p99, top,
              "kept-alive HTTPS connection")

    def storm(name: str, s: Any, broker_s: float | None) -> None:
        if s is None:
            return
        conn = s.connect_s
        snap = s.converged_s
        if snap or s.waiting:
            table.add(f"{name}: agent converged (s)", fmt(percentile(snap, 50)),
                      fmt(percentile(snap, 99)), fmt(max(snap, default=float("nan"))),
                      f"{len(snap)}/{s.agents} agents converged, {s.waiting} not within the "
                      f"bound; {s.attempts} dials, {s.errors} errors")
        if s.last_errors:
            table.notes.append(f"{name}: errors seen by the agents: "
                               + "; ".join(e[:160] for e in s.last_errors))
        table.add(f"{name}: stream open (s)", fmt(percentile(conn, 50)),
                  fmt(percentile(conn, 99)), fmt(max(conn, default=float('nan'))),
                  f"{s.connected}/{s.agents} open" + (
                      f"; broker lists all connected+acked after {broker_s:.1f} s"
                      if broker_s is not None else ""))

    storm("First connection (≤ 100 dials in flight per process)", f.cold, f.cold_broker_s)
    storm("Reconnect storm, agents lost state", f.storm_snapshot, None)
    storm("Reconnect storm, agents resume", f.storm_resume, f.storm_resume_broker_s)
    table.add("Broker RSS, no streams (MB)", fmt(f.empty_rss_mb), "", "", "after start")
    table.add(f"Broker RSS, {f.agents:,} idle streams (MB)", fmt(f.idle_rss_mb), "", "",
              f"{(f.idle_rss_mb - f.empty_rss_mb) * 1024 / max(1, f.agents):.0f} KB per "
              f"stream; idle CPU {f.idle_cpu_pct:.1f} % of one core")
    table.add("Set-up (s)", "", "", fmt(f.certs_s + f.hosts_s + f.prepopulate_s),
              f"{f.agents:,} certificates {f.certs_s:.1f} s; hosts via API {f.hosts_s:.1f} s; "
              f"{f.agents:,} grants via API (8 connections) {f.prepopulate_s:.1f} s = "
              f"{f.agents / max(f.prepopulate_s, 1e-9):.0f}/s")
    before, after = f.snapshot_query_ms
    table.notes.append(
        f"One host's snapshot query (the store's host_state statement) took {before:.1f} ms "
        f"with {f.agents:,} active grants in the fleet (before migration 0002, SQLite's "
        "planner, with no statistics, read them through the (state, expire_time) index: "
        "every active grant of the fleet). " + (
            f"The bench ran ANALYZE after populating (then {after:.2f} ms); with the store's "
            "migration 0002 (index host_id, state, expire_time) both should be fast."
            if after is not None else
            "PORTAGENT_BENCH_NO_ANALYZE=1: measured as is."))
    table.notes += [
        f"Simulated agents: bench.fleet_sim, {f.processes} processes × "
        f"{f.agents // f.processes:,} grpc.aio channels, each with its own ECDSA P-256 "
        "client certificate (DNS SAN = host id): one TLS handshake per agent. They speak the "
        "agent's protocol (Hello, Ack, SnapshotRequest on a gap) but open no ports and do "
        f"not verify signatures. Their RSS: {f.sim_rss_mb:.0f} MB in total.",
        "The simulators share the machine's 2 vCPUs with the broker: storm times include "
        "their own TLS handshakes (~1.7 ms of CPU per channel measured in one process).",
    ]
    ctx.tables.append(table)
    ctx.raw["broker_fleet"] = {k: (v.__dict__ if hasattr(v, "__dict__") else v)
                               for k, v in f.__dict__.items()}
    if lat:
        p99v = percentile(lat, 99)
        ctx.target(f"Broker: API grant → simulated agent received, p99 ({f.agents:,} agents)",
                   "≤ 50 ms", f"{p99v:.1f} ms", p99v <= 50 if f.agents >= 10_000 else None)
    if f.storm_snapshot is not None and f.storm_snapshot.converged_s:
        worst = max(f.storm_snapshot.converged_s)
        done = len(f.storm_snapshot.converged_s) == f.agents
        ctx.target(f"Broker: reconnect storm, {f.agents:,} agents → all converged",
                   "seconds", f"{worst:.1f} s" + ("" if done else " (not all)"),
                   None if not done or f.agents < 10_000 else True)


# --- starting the broker ----------------------------------------------------------------------


@dataclass
class Broker:
    """A `portagent-broker serve` subprocess (portagent.testing.broker_service) and what a
    client needs to reach it."""

    service: Any  # portagent.testing.broker_service.BrokerService
    pki: Any  # portagent.testing.broker_service.BrokerPki

    @property
    def pid(self) -> int:
        assert self.service.process is not None
        return int(self.service.process.pid)

    @property
    def fleet_address(self) -> str:
        return str(self.service.fleet_address)

    def api(self) -> Api:
        return Api("127.0.0.1", int(self.service.api_port), self.pki.ca_pem,
                   self.pki.admin_token)


def make_pki(name: str) -> Any:
    from portagent.testing.broker_service import make_pki as make

    return make(env.tempdir(f"{name}-pki"))


def start_broker(name: str, pki: Any, database: str | None = None,
                 replica: str = "a") -> Broker:
    """Start `serve` on free loopback ports (SQLite in a temp dir unless `database`);
    ended at the scenario's clean-up at the latest."""
    from portagent.testing.broker_service import BrokerService

    service = BrokerService(env.tempdir(f"{name}-{replica}"), pki, database=database,
                            replica=replica)
    env.CLEANUP.push(f"broker {name}/{replica}", service.close)
    service.start(timeout=60)
    return Broker(service, pki)



# --- the broker in the client namespace, the real agent in the server namespace -------------
#
# The broker replicas run in the client namespace ("another machine": the agent dials
# CLIENT_IP over the veth); their API listens on that namespace's loopback and is driven by
# an API worker there (`python -m bench.broker_fleet api-worker`), which also probes the
# guarded port, so t0 and the first accepted SYN are taken in one process.

FLEET_PORT = 7443
API_PORT = 8443


class Replicas:
    """`portagent-broker serve` replicas in the client namespace, one config each."""

    def __init__(self, topo: env.Topology, pki: Any, database: str, names: Sequence[str]) -> None:
        from portagent.testing.broker_service import service_toml

        self.topo, self.pki = topo, pki
        self.dir = env.tempdir("replicas")
        self.procs: dict[str, Any] = {}
        self.ports: dict[str, tuple[int, int]] = {}
        for index, name in enumerate(names):
            fleet_port, api_port = FLEET_PORT + index, API_PORT + index
            text = service_toml(pki, database=database, replica=name, fleet_port=fleet_port,
                                api_port=api_port, db_dir=self.dir)
            # The fleet port faces the agent across the veth; the API stays on loopback.
            text = text.replace(f'"127.0.0.1:{fleet_port}"', f'"{env.CLIENT_IP}:{fleet_port}"')
            (self.dir / f"{name}.toml").write_text(text)
            self.ports[name] = (fleet_port, api_port)
        self.starts = 0

    def fleet_address(self, name: str) -> str:
        return f"{env.CLIENT_IP}:{self.ports[name][0]}"

    def start(self, name: str) -> None:
        self.starts += 1
        self.procs[name] = self.topo.spawn(
            self.topo.client,
            [env.PYTHON, "-m", "portagent.broker.fleet.serve", "--config",
             str(self.dir / f"{name}.toml")],
            what=f"broker replica {name}", log=self.dir / f"{name}.{self.starts}.log",
            env=env.child_env())

    def kill(self, name: str) -> None:
        """SIGKILL (`ip netns exec` exec()s the interpreter: the pid is the broker's)."""
        import signal

        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def log_tail(self) -> str:
        logs = sorted(self.dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
        return "\n".join(f"{p.name}: {p.read_text(errors='replace')[-800:]}" for p in logs[-2:])


def api_worker(topo: env.Topology, replicas: Replicas) -> env.Worker:
    proc = env.spawn(["ip", "netns", "exec", topo.client, env.PYTHON, "-m", "bench.broker_fleet",
                      "api-worker"], what="broker API worker", env=env.child_env(),
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
    worker = env.Worker(proc)
    worker.call("init", ports={n: p[1] for n, p in replicas.ports.items()},
                ca=str(replicas.pki.ca_pem), token=replicas.pki.admin_token)
    return worker


def follow_broker(agent: Any, pki: Any, addresses: Sequence[str]) -> None:
    """Make the bench agent dial the broker service: a [broker] section (its client
    certificate from the service's CA, DNS SAN = host id) and trust in the service's
    signing key, added to the agent.toml `portagent-broker init` wrote."""
    from bench.peers.portagent import HOST_ID
    from portagent.broker.pki import trusted_key_toml

    cert, key = pki.agent_cert(HOST_ID)
    path = agent.dev / "agent.toml"
    lines = path.read_text().splitlines()
    # init may already write a [broker] section of its own: replaced, not doubled.
    kept: list[str] = []
    skipping = False
    for line in lines:
        if line.strip().startswith("["):
            skipping = line.strip() == "[broker]"
        if not skipping:
            kept.append(line)
    quoted = ", ".join(json.dumps(a) for a in addresses)
    kept += ["", "[broker]", f"addresses = [{quoted}]", f"ca = {json.dumps(str(pki.ca_pem))}",
             f"cert = {json.dumps(str(cert))}", f"key = {json.dumps(str(key))}",
             'server_name = "localhost"', 'reconnect_max = "2s"', ""]
    kept += [trusted_key_toml(public, key_id) for key_id, public in pki.public_keys().items()]
    path.write_text("\n".join(kept) + "\n")


def agents(ctx: Context) -> None:
    """Scenario 8: API grant -> port open through the broker and the agent's stream, and
    the direct AgentService path, interleaved trial by trial on the same agent."""
    from bench.open_latency import PORT, probe_closed
    from bench.peers.portagent import HOST_ID, Portagent

    trials = max(2, ctx.trials // 2) if not ctx.quick else 10
    fleet_lat: list[float] = []
    fleet_api: list[float] = []
    direct_lat: list[float] = []
    direct_rpc: list[float] = []
    connect_s: list[float] = []
    for _ in range(ctx.repeats):
        with env.topology() as topo:
            pki = make_pki("agents")
            replicas = Replicas(topo, pki, f"sqlite:///{env.tempdir('agents-db')}/broker.db",
                                ["a"])
            replicas.start("a")
            api = api_worker(topo, replicas)
            api.call("healthy", replica="a", timeout_s=60)
            api.call("request", replica="a", method="POST", path="/v1/hosts",
                     body={"host_id": HOST_ID})
            server = topo.worker(topo.server)
            client = topo.worker(topo.client)
            server.call("listen", address=env.SERVER_IP, tcp=[PORT])
            agent = Portagent(topo)
            agent.setup()
            follow_broker(agent, pki, [replicas.fleet_address("a")])
            t_start = time.monotonic()
            agent.start()
            host = api.call("wait_host", replica="a", host=HOST_ID, timeout_s=60)
            if not host["ok"]:
                raise RuntimeError(f"the agent never connected to the broker: {host}; "
                                   f"{agent.log_tail()}")
            connect_s.append(host["t"] - t_start)
            pa = agent.client_worker()
            try:
                probe_closed(client)
                for i in range(2 * trials):
                    time.sleep(ctx.pause())
                    if i % 2 == 0:
                        reply = api.call("grant_then_probe", timeout=30, replica="a",
                                         host=HOST_ID, source=env.CLIENT_IP, port=f"{PORT}/tcp",
                                         probe_host=env.SERVER_IP, probe_port=PORT,
                                         deadline_s=10)
                        if not reply.get("ok"):
                            raise RuntimeError(f"fleet path: port never opened: {reply}; "
                                               f"{agent.log_tail()}")
                        fleet_lat.append(reply["t"] - reply["t0"])
                        fleet_api.append(reply["api_done"] - reply["t0"])
                        api.call("request", replica="a", method="POST",
                                 path=f"/v1/grants/{reply['grant_id']}/revoke",
                                 body={"reason": "bench"})
                    else:
                        reply = pa.call("pa_grant_then_probe", timeout=30, source=env.CLIENT_IP,
                                        port=f"{PORT}/tcp", ttl=600.0, host=env.SERVER_IP,
                                        probe_port=PORT, deadline_s=10)
                        if not reply.get("ok"):
                            raise RuntimeError(f"direct path: port never opened; "
                                               f"{agent.log_tail()}")
                        direct_lat.append(reply["t"] - reply["t0"])
                        direct_rpc.append(reply["rpc_done"] - reply["t0"])
                        pa.call("pa_revoke", timeout=30, grant_id=reply["grant_id"])
                    probe_closed(client)
            finally:
                pa.close()
                agent.stop()
                api.close()
                client.close()
                server.close()
    table = Table("8. Broker service with a real agent: grant → port open",
                  ["Path", "Trials", "p50 (ms)", "p99 (ms)", "max (ms)", "Request done (p50 ms)",
                   "p50 vs direct"])
    ref = percentile(ms(direct_lat), 50)
    for name, lat, done in (
            ("broker service: POST /v1/grants → stream → agent", fleet_lat, fleet_api),
            ("direct: AgentService.ApplyGrant (open channel)", direct_lat, direct_rpc)):
        values = ms(lat)
        p50, p99, top = pstats(values)
        vs = f"{percentile(values, 50) / ref:.1f}×" if lat is not direct_lat and ref else "–"
        table.add(name, len(values), p50, p99, top, fmt(percentile(ms(done), 50)), vs)
    table.notes += [
        "portagentd in the server namespace follows `portagent-broker serve` (SQLite) running "
        "in the client namespace (the agent dials across the veth); the API is called over a "
        "kept-alive HTTPS connection from the client namespace, which also probes the port "
        "(a fresh connect every ~0.5 ms; t0 just before the request is written).",
        "Trials alternate between the two paths on the same agent; each grant is revoked "
        "(through the path that made it) and the port checked closed before the next.",
        f"Agent start → connected to the broker and acknowledged: "
        f"{', '.join(f'{x:.2f} s' for x in connect_s)}.",
    ]
    ctx.tables.append(table)
    ctx.raw["broker_agents"] = {"fleet": fleet_lat, "fleet_api": fleet_api,
                                "direct": direct_lat, "direct_rpc": direct_rpc,
                                "connect_s": connect_s}



def agent_grants(agent: Any) -> list[str]:
    """Ids of the grants the agent enforces (`portagent list`, over its admin socket)."""
    out = env.run([str(Path(env.PYTHON).parent / "portagent"), "--socket",
                   str(agent.dev / "admin.sock"), "list", "-o", "json"], env=env.child_env())
    return [g["grant_id"] for g in json.loads(out.stdout) if g.get("state") == "active"]


@dataclass
class FailoverRound:
    killed: str
    to: str
    converged_s: float | None  # SIGKILL -> agent connected to the other replica, acked
    grant_open_s: float | None  # SIGKILL -> the grant created on the other replica opens
    grant_request_s: float | None  # that grant's request -> port open
    agent_ids: int
    broker_ids: int
    same: bool
    duplicates: int


def failover(ctx: Context) -> None:
    """Scenario 9: two replicas on one PostgreSQL, the agent connected to one of them;
    SIGKILL that one, create a grant on the other at once; the agent must reconnect to
    the other, converge and enforce the new grant, with exactly the broker's active set."""
    from bench.open_latency import PORT
    from bench.peers.portagent import HOST_ID, Portagent
    from portagent.testing.postgres import postgres_available, postgres_cluster

    reason = postgres_available()
    if reason is not None:
        ctx.notes.append(f"Scenario broker-failover skipped: {reason}")
        return
    rounds_wanted = 1 if ctx.quick else 3
    rounds: list[FailoverRound] = []
    ports = [5024 + i for i in range(rounds_wanted)]
    with postgres_cluster() as pg, env.topology() as topo:
        name = "bench_failover"
        pg.create_database(name)
        # The replicas run in the client namespace; PostgreSQL listens in the root one:
        # they reach it through its Unix socket (a file, not a network address).
        url = f"postgresql+psycopg://postgres@/{name}?host={pg.root}&port={pg.port}"
        pki = make_pki("failover")
        replicas = Replicas(topo, pki, url, ["a", "b"])
        replicas.start("a")
        replicas.start("b")
        api = api_worker(topo, replicas)
        try:
            for replica in ("a", "b"):
                api.call("healthy", replica=replica, timeout_s=60)
            api.call("request", replica="a", method="POST", path="/v1/hosts",
                     body={"host_id": HOST_ID})
            server = topo.worker(topo.server)
            client = topo.worker(topo.client)
            server.call("listen", address=env.SERVER_IP, tcp=[PORT, *ports])
            agent = Portagent(topo)
            agent.setup()
            follow_broker(agent, pki, [replicas.fleet_address("a"), replicas.fleet_address("b")])
            agent.start()
            on = "a"
            if not api.call("wait_host", replica="a", host=HOST_ID, on_replica="a",
                            timeout_s=60)["ok"]:
                raise RuntimeError(f"the agent never connected to replica a: "
                                   f"{agent.log_tail()}")
            first = api.call("grant_then_probe", timeout=30, replica="a", host=HOST_ID,
                             source=env.CLIENT_IP, port=f"{PORT}/tcp", probe_host=env.SERVER_IP,
                             probe_port=PORT, deadline_s=10)
            if not first.get("ok"):
                raise RuntimeError("the first grant (replica a) never opened the port")
            for port in ports:
                other = "b" if on == "a" else "a"
                t_kill = time.monotonic()
                replicas.kill(on)
                reply = api.call("grant_then_probe", timeout=60, replica=other, host=HOST_ID,
                                 source=env.CLIENT_IP, port=f"{port}/tcp",
                                 probe_host=env.SERVER_IP, probe_port=port, deadline_s=45)
                opened = reply["t"] if reply.get("ok") else None
                conv = api.call("wait_host", timeout=90, replica=other, host=HOST_ID,
                                on_replica=other, timeout_s=60)
                time.sleep(0.5)  # let the last ack land before comparing sets
                on_agent = agent_grants(agent)
                listed = api.call("request", replica=other, method="GET",
                                  path=f"/v1/grants?host={HOST_ID}&state=active&limit=1000")
                on_broker = [g["grant_id"] for g in listed["body"]["grants"]]
                rounds.append(FailoverRound(
                    killed=on, to=other,
                    converged_s=conv["t"] - t_kill if conv["ok"] else None,
                    grant_open_s=opened - t_kill if opened else None,
                    grant_request_s=opened - reply["t0"] if opened else None,
                    agent_ids=len(on_agent), broker_ids=len(on_broker),
                    same=sorted(set(on_agent)) == sorted(set(on_broker)),
                    duplicates=len(on_agent) - len(set(on_agent))))
                print(f"  failover: {rounds[-1]}", flush=True)
                replicas.start(on)
                api.call("healthy", replica=on, timeout_s=60)
                on = other
            agent.stop()
            client.close()
            server.close()
        finally:
            api.close()
    table = Table("9. Broker replicas on PostgreSQL: SIGKILL the agent's replica",
                  ["Round", "Agent converged on the other (s)",
                   "Grant made during failover: open after kill (s)",
                   "… after its request (s)", "Agent = broker active set", "Duplicates"])
    for i, r in enumerate(rounds):
        table.add(f"{i + 1}: kill {r.killed} → {r.to}",
                  fmt(r.converged_s) if r.converged_s is not None else "never",
                  fmt(r.grant_open_s) if r.grant_open_s is not None else "never",
                  fmt(r.grant_request_s) if r.grant_request_s is not None else "never",
                  f"{'yes' if r.same else 'NO'} ({r.agent_ids} / {r.broker_ids})",
                  r.duplicates)
    table.notes += [
        "Two `portagent-broker serve` replicas in the client namespace share one PostgreSQL 15 "
        "(a throwaway cluster, fsync off; reached over its Unix socket); the real agent "
        "(`[broker] addresses` = both, reconnect_max 2 s) is connected to one. SIGKILL that "
        "replica, then at once POST a grant for the agent to the other; 'converged' = the "
        "surviving replica lists the agent connected to it and acknowledged at its current "
        "generation (polled every 20 ms). The killed replica is restarted before the next "
        "round, which kills the other one.",
        "Sets compared: the grant ids `portagent list` shows active vs the surviving "
        "replica's GET /v1/grants?state=active for the host.",
    ]
    ctx.tables.append(table)
    ctx.raw["broker_failover"] = [r.__dict__ for r in rounds]
    if rounds:
        ok = all(r.same and r.duplicates == 0 and r.grant_open_s is not None for r in rounds)
        worst = max((r.converged_s or float("inf")) for r in rounds)
        ctx.target("Broker failover: agent reconnects to the other replica, converges; grant "
                   "made during failover enforced; nothing lost or duplicated", "all rounds",
                   f"{sum(1 for r in rounds if r.same and not r.duplicates)}/{len(rounds)} "
                   f"consistent, converged ≤ {worst:.1f} s", ok)


SCENARIOS: dict[str, Callable[[Context], None]] = {
    "broker-fleet": fleet, "broker-agents": agents, "broker-failover": failover}


# --- the API worker (client namespace) ------------------------------------------------------


class _ApiWorker:
    """Ops of `python -m bench.broker_fleet api-worker`: one kept-alive API connection per
    replica, and the probe of bench.worker for grant → port open."""

    def __init__(self) -> None:
        self.apis: dict[str, Api] = {}

    def init(self, ports: dict[str, int], ca: str, token: str) -> dict[str, Any]:
        self.apis = {name: Api("127.0.0.1", port, Path(ca), token, timeout=10.0)
                     for name, port in ports.items()}
        return {"ok": True}

    def healthy(self, replica: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ApiError, http.client.HTTPException):
                self.apis[replica].request("GET", "/v1/healthz")
                return {"ok": True}
            self.apis[replica].close()
            time.sleep(0.1)
        raise RuntimeError(f"replica {replica} not healthy within {timeout_s} s")

    def request(self, replica: str, method: str, path: str,
                body: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"body": self.apis[replica].request(method, path, body)}

    def wait_host(self, replica: str, host: str, timeout_s: float,
                  on_replica: str = "") -> dict[str, Any]:
        """Until `host` is connected (to `on_replica` if given) and has acknowledged its
        current generation, as `replica` sees it (polled every 20 ms)."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ApiError, http.client.HTTPException):
                last = self.apis[replica].request("GET", f"/v1/hosts/{host}")["host"]
                if (last["connected"] and last["acked_generation"] == last["generation"]
                        and (not on_replica or last["replica"] == on_replica)):
                    return {"ok": True, "t": time.monotonic(), "host": last}
            time.sleep(0.02)
        return {"ok": False, "host": last}

    def grant_then_probe(self, replica: str, host: str, source: str, port: str,
                         probe_host: str, probe_port: int, deadline_s: float,
                         ttl: int = 600) -> dict[str, Any]:
        """t0, POST /v1/grants, and probe from t0 on in a second thread (a SYN accepted
        before the API answers counts)."""
        from bench import worker

        result: dict[str, Any] = {}
        start = threading.Event()

        def probing() -> None:
            start.wait()
            result.update(worker.probe(probe_host, probe_port, deadline_s))

        thread = threading.Thread(target=probing)
        thread.start()
        t0 = time.monotonic()
        start.set()
        try:
            grant = self.apis[replica].create_grant(host, ttl=ttl, source=source, port=port)
        finally:
            api_done = time.monotonic()
            thread.join(deadline_s + 5)
        return {**result, "t0": t0, "api_done": api_done, "grant_id": grant["grant_id"]}


def _api_worker_main() -> None:
    import sys

    ops = _ApiWorker()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            reply = getattr(ops, op)(**request)
        except Exception as exc:  # reported to the controller, which raises it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["api-worker"]:
        _api_worker_main()
    else:
        print("usage: python -m bench.broker_fleet api-worker (started by bench.run)",
              file=sys.stderr)
        sys.exit(2)
