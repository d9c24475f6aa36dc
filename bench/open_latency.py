"""Scenario 1, open latency: from the grant request leaving the client to the first SYN
accepted, for portagent and its peers.

Method, the same for every system: the client worker in the client namespace probes the
guarded port (a fresh non-blocking connect every ~0.5 ms; the server refuses with a TCP
reset, so a refused attempt costs ~0.1 ms) while the controller issues the grant. The
latency is (start of the first successful connect) − (moment the request left):
- command-line clients (portagent-broker, fail2ban-client, firewall-cmd): t0 is taken just
  before the process is spawned, so interpreter start-up is included, as a user sees it;
- fwknop: the SPA packet is built beforehand (untimed) and the worker takes t0 right
  before `sendto`;
- portagent's direct gRPC client: a long-lived process with an open mTLS channel takes t0
  right before the call.
A random 20–220 ms pause precedes each trial (fwknopd polls on a 100 ms loop), and after
each trial the grant is withdrawn and the port is checked closed again (untimed).

The floor: a bare mutual-TLS gRPC echo (bench.echo) in the server namespace, with the
agent's own certificate, called from the same kind of long-lived client process after the
same pause with a request of a signed grant's size; t0 before the call, t1 at the reply.
What portagent's gRPC path has above it is the agent's own time.

Runs are interleaved: run 1 of every system, then run 2 of every system, ..., so that a
change in the machine's load over the scenario touches all systems alike.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench import env
from bench.context import Context
from bench.stats import Summary, Table, fmt, fmt_summary, percentile

PORT = 5022


class OpenSystem(Protocol):
    name: str

    def start(self) -> None: ...

    def trial(self, client: env.Worker, pause: float) -> tuple[float, float | None]:
        """One grant; returns (latency s, command duration s or None)."""
        ...

    def reset(self, client: env.Worker) -> None: ...

    def stop(self) -> None: ...


def probe_closed(client: env.Worker) -> None:
    reply = client.call("probe", host=env.SERVER_IP, port=PORT, deadline_s=10, expect="closed")
    if not reply["ok"]:
        raise RuntimeError("port did not close after the grant was withdrawn")


def command_trial(client: env.Worker, argv: list[str], pause: float,
                  environ: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Probe while running `argv`; returns (latency, command duration, its stdout)."""
    time.sleep(pause)
    client.send("probe", host=env.SERVER_IP, port=PORT, deadline_s=10)
    # Let the worker start its loop before the clock starts (it answers nothing until done).
    time.sleep(0.002)
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=environ or env.child_env(),
                          timeout=30)
    t1 = time.monotonic()
    reply = client.receive(timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {proc.stderr.strip()[-500:]}")
    if not reply["ok"]:
        raise RuntimeError(f"{argv[0]}: port never opened")
    return reply["t"] - t0, t1 - t0, proc.stdout


@dataclass
class FwknopSystem:
    topo: env.Topology
    name: str = "fwknop SPA (fwknopd, pcap on veth, iptables-nft)"
    peer: Any = None

    def start(self) -> None:
        from bench.peers.fwknop import SPA_PORT, Fwknop

        self.spa_port = SPA_PORT
        self.peer = Fwknop(self.topo, PORT)
        self.peer.start()

    def trial(self, client: env.Worker, pause: float) -> tuple[float, float | None]:
        packet = self.peer.spa_packet(env.CLIENT_IP, env.SERVER_IP)
        time.sleep(pause)
        reply = client.call("send_then_probe", timeout=30, host=env.SERVER_IP,
                            udp_port=self.spa_port, payload=packet, port=PORT, deadline_s=10)
        if not reply["ok"]:
            raise RuntimeError(f"fwknop: port never opened; {self.peer.log_tail()}")
        return reply["t"] - reply["t0"], None

    def reset(self, client: env.Worker) -> None:
        self.peer.reset()
        probe_closed(client)

    def stop(self) -> None:
        self.peer.stop()


@dataclass
class Fail2banSystem:
    topo: env.Topology
    name: str = "fail2ban-client set JAIL banip (nftables action, inverted)"
    peer: Any = None

    def start(self) -> None:
        from bench.peers.fail2ban import Fail2ban

        self.peer = Fail2ban(self.topo, PORT)
        self.peer.start()

    def trial(self, client: env.Worker, pause: float) -> tuple[float, float | None]:
        latency, command, _ = command_trial(client, self.peer.command(env.CLIENT_IP), pause)
        return latency, command

    def reset(self, client: env.Worker) -> None:
        self.peer.unban(env.CLIENT_IP)
        probe_closed(client)

    def stop(self) -> None:
        self.peer.stop()


@dataclass
class FirewalldSystem:
    topo: env.Topology
    name: str = "firewall-cmd --add-rich-rule --timeout (firewalld, private D-Bus)"
    peer: Any = None

    def start(self) -> None:
        from bench.peers.firewalld import Firewalld

        self.peer = Firewalld(self.topo, PORT)
        self.peer.start()

    def trial(self, client: env.Worker, pause: float) -> tuple[float, float | None]:
        latency, command, _ = command_trial(client, self.peer.command(env.CLIENT_IP), pause,
                                            self.peer.env)
        return latency, command

    def reset(self, client: env.Worker) -> None:
        self.peer.revoke(env.CLIENT_IP)
        probe_closed(client)

    def stop(self) -> None:
        self.peer.stop()


ECHO_PORT = 50052


class EchoFloor:
    """The bare mTLS gRPC echo (the floor), set up like the portagent gRPC system."""

    name = "bare mTLS gRPC echo (floor: same TLS, pause and request size)"
    guards_port = False  # no firewall: nothing to find closed before a trial

    def __init__(self, topo: env.Topology) -> None:
        from bench.peers.portagent import Portagent

        self.topo = topo
        self.agent = Portagent(topo)  # only for `portagent-broker init`'s certificates
        self.pa: env.Worker | None = None

    def start(self) -> None:
        from bench.peers.portagent import HOST_ID

        self.agent.setup()
        dev = self.agent.dev
        address = f"{env.SERVER_IP}:{ECHO_PORT}"
        self.topo.spawn(self.topo.server,
                        [env.PYTHON, "-m", "bench.echo", address, str(dev / "agent.pem"),
                         str(dev / "agent.key"), str(dev / "ca.pem")],
                        what="echo server", log=self.agent.dir / "echo.log",
                        env=env.child_env())
        self.pa = self.topo.worker(self.topo.client)
        # Waits for the server (channel ready), then one warm-up call.
        self.pa.call("pa_echo_init", timeout=60, broker_toml=str(self.agent.broker_toml),
                     host=HOST_ID, address=address)

    def trial(self, client: env.Worker, pause: float) -> tuple[float, float | None]:
        del client
        assert self.pa is not None
        time.sleep(pause)
        reply = self.pa.call("pa_echo", timeout=30, source=env.CLIENT_IP, port=f"{PORT}/tcp",
                             ttl=600.0)
        return reply["t1"] - reply["t0"], None

    def reset(self, client: env.Worker) -> None:
        del client  # nothing was opened

    def stop(self) -> None:
        if self.pa is not None:
            self.pa.close()


@dataclass
class Result:
    name: str
    runs: list[list[float]] = field(default_factory=list)
    command: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def pooled(self) -> list[float]:
        return [x for run in self.runs for x in run]


def measure_run(ctx: Context, factory: Callable[[env.Topology], OpenSystem],
                result: Result) -> None:
    """One run of one system: fresh namespaces and daemon, ctx.trials / repeats trials."""
    per_run = max(1, -(-ctx.trials // ctx.repeats))
    with env.topology() as topo:
        system = factory(topo)
        result.name = system.name
        server = topo.worker(topo.server)
        client = topo.worker(topo.client)
        server.call("listen", address=env.SERVER_IP, tcp=[PORT])
        system.start()
        try:
            if getattr(system, "guards_port", True):
                probe_closed(client)
            latencies: list[float] = []
            for _ in range(per_run):
                latency, command = system.trial(client, ctx.pause())
                latencies.append(latency)
                if command is not None:
                    result.command.append(command)
                system.reset(client)
            result.runs.append(latencies)
        finally:
            system.stop()
            client.close()
            server.close()
            env.CLEANUP.run_all()


def systems(ctx: Context) -> list[Callable[[env.Topology], OpenSystem]]:
    from bench.peers import portagent

    chosen: list[Callable[[env.Topology], OpenSystem]] = []
    if "portagent" in ctx.peers:
        chosen += portagent.open_systems()
        chosen.append(EchoFloor)
    if "fwknop" in ctx.peers:
        chosen.append(FwknopSystem)
    if "fail2ban" in ctx.peers:
        chosen.append(Fail2banSystem)
    if "firewalld" in ctx.peers:
        chosen.append(FirewalldSystem)
    return chosen


def _name(factory: Callable[[env.Topology], OpenSystem]) -> str:
    return str(getattr(factory, "name", None) or getattr(factory, "__name__", "?"))


def run(ctx: Context) -> None:
    from bench.peers.portagent import PortagentGrpc

    chosen = systems(ctx)
    results = [Result(name=_name(f)) for f in chosen]
    for repeat in range(ctx.repeats):
        for factory, result in zip(chosen, results, strict=True):
            if result.error:
                continue  # failed in an earlier run: the others go on
            try:
                measure_run(ctx, factory, result)
            except Exception as exc:  # one peer failing must not lose the others' results
                print(f"bench: open latency for {result.name} failed: {exc}")
                result.error = str(exc)
                result.name = f"{_name(factory)} (failed)"
            print(f"  open latency run {repeat + 1}/{ctx.repeats}: {result.name}: done",
                  flush=True)
    reference = next((r for r in results if r.name == PortagentGrpc.name and r.runs), None)
    ref_p50 = percentile(reference.pooled, 50) if reference else float("nan")
    table = Table("1. Open latency: grant request → first SYN accepted",
                  ["System", "Trials", "p50 (ms)", "p99 (ms)", "min–max (ms)",
                   "run medians (ms)", "Command exits (p50 ms)", "p50 ÷ portagent gRPC p50"])
    for r in results:
        if not r.runs:
            table.add(r.name, 0, "failed", "", "", "", "", r.error[:120])
            continue
        pooled = [x * 1000 for x in r.pooled]
        medians = Summary([percentile([x * 1000 for x in run], 50) for run in r.runs])
        cmd = fmt(percentile([x * 1000 for x in r.command], 50)) if r.command else "–"
        ratio = percentile(pooled, 50) / (ref_p50 * 1000)
        vs = (f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.2f}×") if (
            reference and r is not reference) else "–"
        table.add(r.name, len(pooled), fmt(percentile(pooled, 50)), fmt(percentile(pooled, 99)),
                  f"{fmt(min(pooled))}–{fmt(max(pooled))}", fmt_summary(medians), cmd, vs)
    table.notes += [
        f"{ctx.repeats} runs (fresh namespaces and daemon each) × "
        f"{max(1, -(-ctx.trials // ctx.repeats))} trials, runs interleaved across systems "
        "(run 1 of each, then run 2 of each, ...); percentiles over all trials pooled; "
        "'run medians' is the median (min–max) of the per-run medians.",
        "Probe resolution ≈ 0.5 ms (one refused connect attempt every ~0.5 ms).",
        "'Command exits': when the CLI process exited, or the gRPC call returned.",
        "fail2ban's action is inverted (blocktype=accept + final reject in its chain): "
        "`banip` is timed as a grant. firewalld's zone target rejects; the rich rule accepts.",
    ]
    ctx.tables.append(table)
    ctx.raw["open_latency"] = {r.name: {"runs": r.runs, "command": r.command, "error": r.error}
                               for r in results}
    if reference:
        _against_floor(ctx, reference, results)


def _against_floor(ctx: Context, reference: Result, results: list[Result]) -> None:
    """portagent's direct gRPC path against the echo floor and fwknop, p50 and p99."""
    echo = next((r for r in results if r.name == EchoFloor.name and r.runs), None)
    fw = next((r for r in results if r.name.startswith("fwknop") and r.runs), None)
    table = Table("1b. portagent direct gRPC against the floor (bare mTLS echo) and fwknop",
                  ["Percentile", "portagent gRPC (ms)", "echo (ms)", "portagent ÷ echo",
                   "fwknop (ms)", "fwknop ÷ portagent"])
    figures: dict[int, tuple[float, float, float]] = {}
    for q in (50, 99):
        mine = percentile(reference.pooled, q) * 1000
        floor = percentile(echo.pooled, q) * 1000 if echo else float("nan")
        theirs = percentile(fw.pooled, q) * 1000 if fw else float("nan")
        figures[q] = (mine, floor, theirs)
        table.add(f"p{q}", fmt(mine), fmt(floor), f"{mine / floor:.2f}×" if echo else "n/a",
                  fmt(theirs), f"{theirs / mine:.0f}×" if fw else "n/a")
    table.notes += [
        "Same trials as table 1. The echo is the floor: the same mutual TLS (the agent's "
        "API certificate, the broker's client certificate), the same namespaces, the same "
        "random pause before each call and a request the size of ApplyGrant's; it does no "
        "work. What portagent has above it is the agent's own time.",
    ]
    ctx.tables.append(table)
    mine50, floor50, fw50 = figures[50]
    mine99 = figures[99][0]
    if echo:
        ratio = mine50 / floor50
        ctx.target("Open latency p50, portagent gRPC ÷ bare mTLS gRPC echo",
                   "≤ 1.5× (goal ≤ 1.2×)",
                   f"{ratio:.2f}× ({fmt(mine50)} vs {fmt(floor50)} ms)", ratio <= 1.5)
    if fw:
        speedup = fw50 / mine50
        ctx.target("Open latency p50, fwknop ÷ portagent gRPC", "≥ 40× (goal ≥ 50×)",
                   f"{speedup:.0f}× ({fmt(fw50)} vs {fmt(mine50)} ms)", speedup >= 40)
    ctx.target("Open latency p99, portagent direct gRPC", "≤ 5 ms (goal ≤ 3 ms)",
               f"{fmt(mine99)} ms", mine99 <= 5.0)
