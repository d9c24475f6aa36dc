"""Scenario 3, packet path: new-connection rate and UDP packet rate through a guarded port
with 0 … 100k active grants, portagent's hash-map layout against one rule per grant.

Both layouts are loaded with `nft -f` into the server namespace (no daemon involved: the
packet path is the kernel's). The load generator is one Python process in the client
namespace (sequential connect + RST close; UDP send loop); the receiver is one Python
process in the server namespace. Python caps the absolute rates; the ratio to the 0-grant
rate is the figure of merit. Runs for each size are interleaved across repeats.
"""

from __future__ import annotations

import time

from bench import env
from bench.context import Context
from bench.peers import naive
from bench.stats import Summary, Table, fmt_summary

LAYOUTS = {
    "portagent (hash map)": naive.portagent_layout,
    "per-rule (one rule per grant)": naive.per_rule_layout,
}


def _measure(topo: env.Topology, client: env.Worker, server: env.Worker, seconds: float,
             ) -> tuple[float, float, int]:
    topo.flush_conntrack()
    tcp = client.call("connect_rate", host=env.SERVER_IP, port=naive.TCP_PORT,
                      count=200_000, max_seconds=seconds)
    server.call("reset_counts")
    udp = client.call("udp_send", host=env.SERVER_IP, port=naive.UDP_PORT, count=2_000_000,
                      max_seconds=seconds)
    time.sleep(0.2)
    received = server.call("counts")["udp_total"]
    return (tcp["completed"] / tcp["elapsed"], received / udp["elapsed"], tcp["failed"])


def run(ctx: Context) -> None:
    sizes = [0, 1_000, 10_000] if ctx.quick else [0, 1_000, 10_000, 100_000]
    seconds = 1.0 if ctx.quick else 3.0
    # The most noise-sensitive scenario: two more runs than the others in a full run.
    runs = ctx.repeats if ctx.quick else ctx.repeats + 2
    flows = [(env.CLIENT_IP, "tcp", naive.TCP_PORT), (env.CLIENT_IP, "udp", naive.UDP_PORT)]
    conn: dict[tuple[str, int], list[float]] = {}
    pps: dict[tuple[str, int], list[float]] = {}
    load: dict[tuple[str, int], list[float]] = {}
    failures = 0
    baseline_conn: list[float] = []
    baseline_pps: list[float] = []
    with env.topology() as topo:
        server = topo.worker(topo.server)
        client = topo.worker(topo.client)
        server.call("listen", address=env.SERVER_IP, tcp=[naive.TCP_PORT],
                    udp=[naive.UDP_PORT])
        for _ in range(runs):
            topo.flush_ruleset()
            c, p, _f = _measure(topo, client, server, seconds)
            baseline_conn.append(c)
            baseline_pps.append(p)
            for size in sizes:
                all_grants = naive.grants(size, flows)
                for name, render in LAYOUTS.items():
                    topo.flush_ruleset()
                    text = render(all_grants)
                    started = time.monotonic()
                    topo.nft(text)
                    load.setdefault((name, size), []).append(time.monotonic() - started)
                    c, p, f = _measure(topo, client, server, seconds)
                    failures += f
                    conn.setdefault((name, size), []).append(c)
                    pps.setdefault((name, size), []).append(p)
            topo.flush_ruleset()
        server.close()
        client.close()

    table = Table("3. Packet path: rates through a guarded port vs active grants",
                  ["Layout", "Grants", "TCP connections/s", "vs 0 grants", "UDP packets/s",
                   "vs 0 grants", "Load time (nft -f)"])
    table.add("no firewall (reference)", "–", fmt_summary(Summary(baseline_conn)), "",
              fmt_summary(Summary(baseline_pps)), "", "")
    for name in LAYOUTS:
        zero_conn = Summary(conn[(name, 0)]).median
        zero_pps = Summary(pps[(name, 0)]).median
        for size in sizes:
            c_runs = Summary(conn[(name, size)])
            p_runs = Summary(pps[(name, size)])
            table.add(name, f"{size:,}", fmt_summary(c_runs),
                      f"{100 * c_runs.median / zero_conn:.0f} %",
                      fmt_summary(p_runs), f"{100 * p_runs.median / zero_pps:.0f} %",
                      fmt_summary(Summary(load[(name, size)]), "s"))
    table.notes += [
        f"Median (min–max) of {runs} runs of {seconds:.0f} s each; sizes interleaved "
        "within each run. One Python client process (sequential connect, RST close) and one "
        "Python receiver: absolute rates are Python's, the ratio to 0 grants is the point.",
        "Both layouts check every packet to a guarded port (no `ct state established` "
        "short cut) and stamp the grant handle into ct mark. The measured flow's grant sits "
        "in the middle of the per-rule chain (average case).",
        f"Connection failures during the runs: {failures}.",
    ]
    ctx.tables.append(table)
    top = sizes[-1]

    def kept(layout: str) -> float:
        return Summary(conn[(layout, top)]).median / Summary(conn[(layout, 0)]).median

    ratio_conn = kept("portagent (hash map)")
    ctx.target(f"Connection rate at {top:,} grants vs 0", "≥ 95 %",
               f"{100 * ratio_conn:.0f} % (per-rule: "
               f"{100 * kept('per-rule (one rule per grant)'):.1f} %)",
               ratio_conn >= 0.95 if top == 100_000 else None)
    ctx.raw["packet_path"] = {"conn": {f"{k[0]}|{k[1]}": v for k, v in conn.items()},
                              "pps": {f"{k[0]}|{k[1]}": v for k, v in pps.items()},
                              "load_s": {f"{k[0]}|{k[1]}": v for k, v in load.items()},
                              "baseline_conn": baseline_conn, "baseline_pps": baseline_pps}
