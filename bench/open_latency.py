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


@dataclass
class Result:
    name: str
    runs: list[list[float]] = field(default_factory=list)
    command: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def pooled(self) -> list[float]:
        return [x for run in self.runs for x in run]


def measure(ctx: Context, factory: Callable[[env.Topology], OpenSystem]) -> Result:
    per_run = max(1, -(-ctx.trials // ctx.repeats))
    result = Result(name="?")
    for _ in range(ctx.repeats):
        with env.topology() as topo:
            system = factory(topo)
            result.name = system.name
            server = topo.worker(topo.server)
            client = topo.worker(topo.client)
            server.call("listen", address=env.SERVER_IP, tcp=[PORT])
            system.start()
            try:
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
    return result


def systems(ctx: Context) -> list[Callable[[env.Topology], OpenSystem]]:
    from bench.peers import portagent

    chosen: list[Callable[[env.Topology], OpenSystem]] = []
    if "portagent" in ctx.peers:
        chosen += portagent.open_systems()
    if "fwknop" in ctx.peers:
        chosen.append(FwknopSystem)
    if "fail2ban" in ctx.peers:
        chosen.append(Fail2banSystem)
    if "firewalld" in ctx.peers:
        chosen.append(FirewalldSystem)
    return chosen


def run(ctx: Context) -> None:
    results: list[Result] = []
    for factory in systems(ctx):
        try:
            results.append(measure(ctx, factory))
        except Exception as exc:  # one peer failing must not lose the others' results
            name = getattr(factory, "name", None) or getattr(factory, "__name__", "?")
            print(f"bench: open latency for {name} failed: {exc}")
            results.append(Result(name=f"{name} (failed)", error=str(exc)))
        print(f"  open latency: {results[-1].name}: done", flush=True)
    reference = next((r for r in results if r.name.startswith("portagent") and r.runs), None)
    ref_p50 = percentile(reference.pooled, 50) if reference else float("nan")
    table = Table("1. Open latency: grant request → first SYN accepted",
                  ["System", "Trials", "p50 (ms)", "p99 (ms)", "min–max (ms)",
                   "run medians (ms)", "Command exits (p50 ms)", "p50 vs portagent gRPC"])
    for r in results:
        if not r.runs:
            table.add(r.name, 0, "failed", "", "", "", "", r.error[:120])
            continue
        pooled = [x * 1000 for x in r.pooled]
        medians = Summary([percentile([x * 1000 for x in run], 50) for run in r.runs])
        cmd = fmt(percentile([x * 1000 for x in r.command], 50)) if r.command else "–"
        vs = (f"{percentile(pooled, 50) / (ref_p50 * 1000):.0f}× slower"
              if reference and r is not reference else "–")
        table.add(r.name, len(pooled), fmt(percentile(pooled, 50)), fmt(percentile(pooled, 99)),
                  f"{fmt(min(pooled))}–{fmt(max(pooled))}", fmt_summary(medians), cmd, vs)
    table.notes += [
        f"{ctx.repeats} runs (fresh namespaces and daemon each) × "
        f"{max(1, -(-ctx.trials // ctx.repeats))} trials; percentiles over all trials pooled; "
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
        p50 = ref_p50 * 1000
        ctx.target("Open latency p50, portagent direct gRPC client", "≤ 2 ms", f"{fmt(p50)} ms",
                   p50 <= 2.0)
        fw = next((r for r in results if r.name.startswith("fwknop") and r.runs), None)
        if fw:
            speedup = percentile(fw.pooled, 50) / ref_p50
            ctx.target("Open latency vs fwknop (p50)", "≥ 50× faster", f"{speedup:.0f}×",
                       speedup >= 50)
