"""Simulated agents for the broker benchmarks: many FleetService.Connect streams in a few
worker processes, each stream with its own client certificate.

Identity is not simulated away: every simulated agent has its own ECDSA P-256 key and a
certificate (DNS SAN = host id, clientAuth) from the CA the broker trusts for agents, and
its own grpc.aio channel, so the broker does one TLS handshake and one certificate check
per agent, exactly as with real agents. What the simulation leaves out is the kernel:
a simulated agent behaves like portagentd on the stream (Hello with the generation it
holds, a Change applied only when it is exactly held + 1, a gap answered with
SnapshotRequest, an Ack for every generation it takes) but records the receive time
(CLOCK_MONOTONIC, shared by every process on the machine) of each grant and snapshot
instead of opening ports. It does not verify signatures: that CPU would be taken from
the broker it shares two cores with; the integration tests check the signatures.

Layout: `FleetSim` (controller side) starts `python -m bench.fleet_sim worker`
processes and talks JSON lines with them (request {"id", "op", ...} -> reply {"id", ...});
a worker serves several requests at once (a `wait_grant` does not block a `stats`).
`make_agent_certs` writes the certificates (cached in a directory for the run).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from bench.stats import percentile

AGENT_VERSION = "fleet-sim"
# The fleet stream's message limit on both ends (portagent.wire.hoststate).
MAX_MESSAGE = 65 * 1024 * 1024
# At most this many Connect attempts per agent per `connect` (bounded reconnects).
MAX_ATTEMPTS = 50
MAX_WORKER_RSS_MB = 2000


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- certificates ---------------------------------------------------------------------------


def make_agent_certs(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     host_ids: Sequence[str], directory: Path) -> float:
    """Write `<host>.key` / `<host>.pem` for every host id missing from `directory`
    (ECDSA P-256, DNS SAN = host id, clientAuth, from the CA the broker trusts for
    agents). Returns the seconds it took (~0.6 ms per certificate here)."""
    from portagent.broker.pki import cert_pem, issue_agent_client, private_key_pem

    t0 = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    for host in host_ids:
        cert_path = directory / f"{host}.pem"
        if cert_path.exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_agent_client(ca_key, ca_cert, key.public_key(), host, now)
        key_path = directory / f"{host}.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_key_pem(key))
        cert_path.write_bytes(cert_pem(cert))
    return time.monotonic() - t0


def host_ids(count: int, prefix: str = "sim") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(count)]


# --- the worker process (simulated agents) --------------------------------------------------


@dataclass
class _Agent:
    host: str
    held: int = 0  # generation the agent "enforces"
    expect: int = 0  # a storm waits until the agent holds at least this generation
    grants: dict[str, float] = field(default_factory=dict)  # grant id -> receive time
    converged_at: float | None = None
    connected_at: float | None = None
    attempts: int = 0
    errors: int = 0
    last_error: str = ""
    task: asyncio.Task[None] | None = None
    waiters: list[tuple[str, asyncio.Future[float]]] = field(default_factory=list)
    converged: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)


class _Worker:
    def __init__(self) -> None:
        self.agents: dict[str, _Agent] = {}
        self.creds: dict[str, Any] = {}
        self.address = ""
        self.server_name = ""
        self.write_lock = threading.Lock()
        self.stopping = False
        self.dialing: asyncio.Semaphore | None = None

    # -- requests --

    async def op_setup(self, address: str, server_name: str, ca: str, cert_dir: str,
                       hosts: list[str]) -> dict[str, Any]:
        import grpc

        self.address, self.server_name = address, server_name
        root = Path(ca).read_bytes()
        for host in hosts:
            self.creds[host] = grpc.ssl_channel_credentials(
                root_certificates=root,
                private_key=(Path(cert_dir) / f"{host}.key").read_bytes(),
                certificate_chain=(Path(cert_dir) / f"{host}.pem").read_bytes())
            self.agents.setdefault(host, _Agent(host))
        return {"agents": len(self.agents)}

    async def op_connect(self, start_at: float = 0.0, forget: bool = False,
                         min_generation: int = 0, timeout: float = 120.0,
                         max_dialing: int = 0) -> dict[str, Any]:
        """Open every agent's stream (at `start_at`, monotonic). forget: the agents say
        they hold generation 0 (they lost their state), so the broker must bring each
        back to at least the generation it held (changes or a signed snapshot).
        min_generation: wait until every agent holds at least that. Replies once every
        stream is open and every agent converged, or at the deadline. max_dialing: at
        most that many dials in progress at once (0: all at once, a storm)."""
        self.dialing = asyncio.Semaphore(max_dialing) if max_dialing else None
        for agent in self.agents.values():
            agent.connected = asyncio.Event()
            agent.converged = asyncio.Event()
            agent.connected_at = None
            agent.converged_at = None
            agent.attempts = agent.errors = 0
            agent.last_error = ""
            agent.expect = max(agent.held if forget else 0, min_generation)
            if forget:
                agent.held = 0
            if agent.held >= agent.expect:
                agent.converged.set()
        delay = start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = time.monotonic()
        for agent in self.agents.values():
            agent.task = asyncio.create_task(self._run(agent))
        waits = [a.connected.wait() for a in self.agents.values()]
        waits += [a.converged.wait() for a in self.agents.values()]
        everything = asyncio.ensure_future(asyncio.gather(*waits))
        # A guard, not a measurement: in a 10,000-agent storm two workers once grew to
        # ~10 GB each and the kernel's OOM killer ended them (a shared machine). Past
        # MAX_WORKER_RSS_MB the worker ends its streams and says so.
        deadline = t0 + timeout
        over = False
        while not everything.done() and time.monotonic() < deadline:
            await asyncio.wait([everything], timeout=0.5)
            if _rss_mb() > MAX_WORKER_RSS_MB:
                over = True
                break
        everything.cancel()
        summary = self._summary(t0)
        if over:
            await self.op_disconnect()
            summary["last_errors"] = [f"worker RSS over {MAX_WORKER_RSS_MB} MB: storm cut "
                                      "short", *summary["last_errors"]][:5]
        return summary

    def _summary(self, t0: float) -> dict[str, Any]:
        agents = list(self.agents.values())
        connected = [a.connected_at - t0 for a in agents if a.connected_at is not None]
        converged = [a.converged_at - t0 for a in agents
                     if a.expect and a.converged_at is not None]
        return {"t0": t0, "agents": len(agents), "connected": len(connected),
                "connect_s": sorted(connected), "converged_s": sorted(converged),
                "waiting": sum(1 for a in agents if not a.converged.is_set()),
                "attempts": sum(a.attempts for a in agents),
                "errors": sum(a.errors for a in agents),
                "last_errors": sorted({a.last_error for a in agents if a.last_error})[:5]}

    async def op_disconnect(self) -> dict[str, Any]:
        """End every stream at once (cancel: the broker sees the connections close)."""
        tasks = [a.task for a in self.agents.values() if a.task is not None]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        for agent in self.agents.values():
            agent.task = None
        return {"ended": len(tasks)}

    async def op_wait_grant(self, host: str, grant_id: str, timeout: float) -> dict[str, Any]:
        """The receive time of `grant_id` on `host` (already recorded or awaited)."""
        agent = self.agents[host]
        if grant_id in agent.grants:
            return {"t": agent.grants[grant_id]}
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        agent.waiters.append((grant_id, future))
        try:
            return {"t": await asyncio.wait_for(future, timeout)}
        except TimeoutError:
            return {"t": None, "held": agent.held, "error": agent.last_error}
        finally:
            agent.waiters = [(g, f) for g, f in agent.waiters if f is not future]

    async def op_held(self) -> dict[str, Any]:
        return {"held": {h: a.held for h, a in self.agents.items()},
                "grants": {h: sorted(a.grants) for h, a in self.agents.items() if a.grants}}

    async def op_stats(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"rss_mb": _rss_mb(), "cpu_s": usage.ru_utime + usage.ru_stime,
                "streams": sum(1 for a in self.agents.values() if a.connected_at is not None
                               and a.task is not None and not a.task.done())}

    # -- one simulated agent --

    async def _run(self, agent: _Agent) -> None:
        import grpc
        from grpc.aio import EOF  # type: ignore[attr-defined]  # not in grpc-stubs

        from portagent.v1 import fleet_pb2, fleet_pb2_grpc

        # A 60 s connection attempt (gRPC's default is 20 s): in a storm the simulators'
        # own handshakes compete with the broker for the same two cores, and an attempt
        # timed out only to be retried wastes the work already done.
        options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1),
                   ("grpc.min_reconnect_backoff_ms", 60_000),
                   ("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE)]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        backoff = 0.2
        for _ in range(MAX_ATTEMPTS):
            agent.attempts += 1
            # Pacing gates the whole dial: the channel connects and the call starts as soon
            # as the call object exists, so the permit is taken before either.
            gate = self.dialing
            if gate is not None:
                await gate.acquire()
            channel = grpc.aio.secure_channel(self.address, self.creds[agent.host], options)
            try:
                call = fleet_pb2_grpc.FleetServiceStub(channel).Connect()
                try:
                    await call.write(fleet_pb2.ConnectRequest(hello=fleet_pb2.Hello(
                        host_id=agent.host, generation=agent.held,
                        agent_version=AGENT_VERSION)))
                    if gate is not None and agent.expect > agent.held:
                        # Something will be sent: hold the permit until the broker
                        # answers, so pacing bounds the broker's work in progress.
                        await call.initial_metadata()
                finally:
                    if gate is not None:
                        gate.release()
                        gate = None
                if agent.connected_at is None:
                    agent.connected_at = time.monotonic()
                agent.connected.set()
                backoff = 0.2
                while True:
                    message = await call.read()
                    if message is EOF:
                        break
                    reply = self._handle(agent, message)
                    if reply is not None:
                        await call.write(reply)
            except asyncio.CancelledError:
                await channel.close(None)
                raise
            except grpc.aio.AioRpcError as exc:
                agent.errors += 1
                agent.last_error = f"{exc.code().name}: {(exc.details() or '')[:120]}"
            finally:
                with contextlib.suppress(Exception):
                    await channel.close(None)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 5.0)

    def _handle(self, agent: _Agent, message: Any) -> Any:
        from portagent.v1 import agent_pb2, fleet_pb2

        now = time.monotonic()
        kind = message.WhichOneof("message")
        reply = None
        if kind == "snapshot":
            state = fleet_pb2.HostState.FromString(message.snapshot.state)
            if state.generation < agent.held:
                return fleet_pb2.ConnectRequest(refusal=fleet_pb2.Refusal(
                    generation=state.generation, code="FAILED_PRECONDITION",
                    reason="STALE_GENERATION", message="older than the generation held"))
            agent.held = state.generation
            ids = {agent_pb2.Grant.FromString(g.grant).grant_id for g in state.grants}
            agent.grants = {g: agent.grants.get(g, now) for g in ids}
            for grant_id in ids:
                self._wake(agent, grant_id, agent.grants[grant_id])
            reply = fleet_pb2.ConnectRequest(ack=fleet_pb2.Ack(generation=agent.held))
        elif kind == "change":
            change = message.change
            if change.generation <= agent.held:
                return None  # a duplicate
            if change.generation > agent.held + 1:
                return fleet_pb2.ConnectRequest(snapshot_request=fleet_pb2.SnapshotRequest(
                    reason="GENERATION_GAP"))
            agent.held = change.generation
            if change.WhichOneof("change") == "grant":
                grant_id = agent_pb2.Grant.FromString(change.grant.grant).grant_id
                agent.grants[grant_id] = now
                self._wake(agent, grant_id, now)
            else:
                revoked = agent_pb2.Revocation.FromString(change.revocation.revocation)
                agent.grants.pop(revoked.grant_id, None)
            reply = fleet_pb2.ConnectRequest(ack=fleet_pb2.Ack(generation=agent.held))
        if agent.held >= agent.expect and not agent.converged.is_set():
            agent.converged_at = now
            agent.converged.set()
        return reply

    @staticmethod
    def _wake(agent: _Agent, grant_id: str, t: float) -> None:
        for wanted, future in agent.waiters:
            if wanted == grant_id and not future.done():
                future.set_result(t)

    # -- the JSON-lines loop --

    def reply(self, payload: dict[str, Any]) -> None:
        with self.write_lock:
            sys.stdout.write(json.dumps(payload) + "\n")
            sys.stdout.flush()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, None)

        threading.Thread(target=read_stdin, daemon=True).start()
        pending: set[asyncio.Task[None]] = set()
        while (line := await lines.get()) is not None:
            request = json.loads(line)
            if request.get("op") == "quit":
                break
            task = asyncio.create_task(self._dispatch(request))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await self.op_disconnect()

    async def _dispatch(self, request: dict[str, Any]) -> None:
        rid = request.pop("id")
        op = request.pop("op")
        try:
            result = await getattr(self, f"op_{op}")(**request)
            self.reply({"id": rid, **result})
        except Exception as exc:  # reported to the controller, which raises it
            self.reply({"id": rid, "error": f"{type(exc).__name__}: {exc}"})


def _worker_main() -> None:
    # Every stream is a socket: the worker needs more descriptors than the default.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_Worker().serve())


# --- the controller's side ------------------------------------------------------------------


class SimWorker:
    """One worker process; requests may overlap (replies are matched by id)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.fleet_sim", "worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, start_new_session=True)
        self.lock = threading.Lock()
        self.futures: dict[int, Future[dict[str, Any]]] = {}
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            reply = json.loads(line)
            with self.lock:
                future = self.futures.pop(reply.pop("id"), None)
            if future is not None:
                future.set_result(reply)
        with self.lock:
            for future in self.futures.values():
                future.set_exception(RuntimeError("fleet sim worker exited"))
            self.futures.clear()

    def submit(self, op: str, **args: Any) -> Future[dict[str, Any]]:
        assert self.proc.stdin is not None
        future: Future[dict[str, Any]] = Future()
        with self.lock:
            self.next_id += 1
            self.futures[self.next_id] = future
            self.proc.stdin.write((json.dumps({"id": self.next_id, "op": op, **args}) + "\n")
                                  .encode())
            self.proc.stdin.flush()
        return future

    def call(self, op: str, wait_s: float = 600.0, **args: Any) -> dict[str, Any]:
        reply = self.submit(op, **args).result(wait_s)
        if "error" in reply:
            raise RuntimeError(f"fleet sim worker: {reply['error']}")
        return reply

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.submit("quit")

    def close(self, grace: float = 15.0) -> None:
        self.quit()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class FleetSim:
    """`hosts` simulated agents spread over `processes` workers."""

    def __init__(self, hosts: Sequence[str], processes: int,
                 env: dict[str, str] | None = None) -> None:
        self.hosts = list(hosts)
        self.workers = [SimWorker(env) for _ in range(processes)]
        self.owner: dict[str, SimWorker] = {}
        self.slices: list[list[str]] = [self.hosts[i::processes] for i in range(processes)]
        for worker, part in zip(self.workers, self.slices, strict=True):
            for host in part:
                self.owner[host] = worker

    def setup(self, address: str, server_name: str, ca: Path, cert_dir: Path) -> None:
        futures = [w.submit("setup", address=address, server_name=server_name, ca=str(ca),
                            cert_dir=str(cert_dir), hosts=part)
                   for w, part in zip(self.workers, self.slices, strict=True)]
        for f in futures:
            self._check(f.result(300))

    def connect(self, *, forget: bool = False, min_generation: int = 0,
                timeout: float = 180.0, delay: float = 0.5, max_dialing: int = 0) -> SimSummary:
        """Every agent dials at the same moment (now + delay); returns when all streams are
        open and every agent converged (see op_connect), or at `timeout`."""
        start_at = time.monotonic() + delay
        futures = [w.submit("connect", start_at=start_at, forget=forget,
                            min_generation=min_generation, timeout=timeout,
                            max_dialing=max_dialing)
                   for w in self.workers]
        replies = [self._check(f.result(timeout + 60)) for f in futures]
        return SimSummary.of(start_at, replies)

    def disconnect(self) -> None:
        futures = [w.submit("disconnect") for w in self.workers]
        for f in futures:
            self._check(f.result(120))

    def wait_grant(self, host: str, grant_id: str, timeout: float = 10.0) -> float | None:
        reply = self.owner[host].call("wait_grant", wait_s=timeout + 10, host=host,
                                      grant_id=grant_id, timeout=timeout)
        t = reply.get("t")
        return float(t) if t is not None else None

    def converged(self, generation: int = 1) -> list[str]:
        """Hosts whose simulated agent holds at least `generation`."""
        held, _ = self.held()
        return sorted(h for h, g in held.items() if g >= generation)

    def held(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        held: dict[str, int] = {}
        grants: dict[str, list[str]] = {}
        for w in self.workers:
            reply = w.call("held", wait_s=60)
            held.update(reply["held"])
            grants.update(reply["grants"])
        return held, grants

    def stats(self) -> list[dict[str, Any]]:
        return [w.call("stats", wait_s=60) for w in self.workers]

    def close(self) -> None:
        """Ask every worker to end its streams and exit; kill what is left after 20 s."""
        for w in self.workers:
            w.quit()
        deadline = time.monotonic() + 20
        for w in self.workers:
            w.close(grace=max(0.1, deadline - time.monotonic()))

    @staticmethod
    def _check(reply: dict[str, Any]) -> dict[str, Any]:
        if "error" in reply:
            raise RuntimeError(f"fleet sim worker: {reply['error']}")
        return reply


@dataclass
class SimSummary:
    agents: int
    connected: int
    waiting: int
    attempts: int
    errors: int
    last_errors: list[str]
    connect_s: list[float]  # from the common start
    converged_s: list[float]

    @classmethod
    def of(cls, start_at: float, replies: list[dict[str, Any]]) -> SimSummary:
        # Each worker measured from its own t0 (>= start_at): shift to the common start.
        connect = sorted(x + r["t0"] - start_at for r in replies for x in r["connect_s"])
        conv = sorted(x + r["t0"] - start_at for r in replies for x in r["converged_s"])
        return cls(agents=sum(r["agents"] for r in replies),
                   connected=sum(r["connected"] for r in replies),
                   waiting=sum(r["waiting"] for r in replies),
                   attempts=sum(r["attempts"] for r in replies),
                   errors=sum(r["errors"] for r in replies),
                   last_errors=sorted({e for r in replies for e in r["last_errors"]})[:5],
                   connect_s=connect, converged_s=conv)

    def describe(self) -> str:
        converged = (f", {len(self.converged_s)} converged (last "
                     f"{max(self.converged_s, default=float('nan')):.2f} s), "
                     f"{self.waiting} still waiting" if self.converged_s or self.waiting else "")
        return (f"{self.connected}/{self.agents} streams open{converged} (p50 "
                f"{percentile(self.connect_s, 50):.2f} s, last {max(self.connect_s, default=0):.2f}"
                f" s), {self.attempts} attempts, {self.errors} errors {self.last_errors}")


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        _worker_main()
    else:
        print("usage: python -m bench.fleet_sim worker (started by bench.broker_fleet)",
              file=sys.stderr)
        sys.exit(2)
