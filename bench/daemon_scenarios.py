"""Scenarios that drive the real portagentd: 2 bulk, 4 expiry precision, 5 sustained load,
6 restart. Each run gets fresh namespaces, a fresh `portagent-broker init` and a fresh daemon.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from bench import env
from bench.context import Context
from bench.peers.portagent import Portagent
from bench.stats import Summary, Table, fmt, fmt_summary

UDP_PORT = 5023
BULK_CONCURRENCY = 64
# Delivery stops after this long; the table then shows how many grants were applied.
BULK_LIMIT = 300.0
BULK_LIMIT_QUICK = 60.0


def _bulk_once(ctx: Context, size: int) -> dict[str, Any]:
    with env.topology() as topo:
        agent = Portagent(topo)
        agent.setup()
        agent.start()
        idle_rss = agent.rss_mb()
        pa = agent.client_worker()
        presign = pa.call("pa_presign", timeout=900, count=size, ttl=3600.0)
        limit = BULK_LIMIT_QUICK if ctx.quick else BULK_LIMIT
        reply = pa.call("pa_bulk", timeout=limit + 120, concurrency=BULK_CONCURRENCY,
                        max_seconds=limit)
        time.sleep(1.0)
        rss = agent.rss_mb()
        elements = agent.element_count()
        pa.close()
        agent.stop()
        return {"size": size, "elapsed": reply["elapsed"], "applied": reply["applied"],
                "errors": reply["errors"], "first_errors": reply["first_errors"],
                "rss_idle": idle_rss, "rss_after": rss, "elements": elements,
                "presign_s": presign["elapsed"]}


def bulk(ctx: Context) -> None:
    sizes = [1_000, 5_000] if ctx.quick else [1_000, 10_000, 100_000]
    results: dict[int, list[dict[str, Any]]] = {}
    for repeat in range(ctx.repeats):
        for size in sizes:
            if size >= 100_000 and repeat > 0:
                continue  # the largest size runs once: minutes per run
            results.setdefault(size, []).append(_bulk_once(ctx, size))
            r = results[size][-1]
            print(f"  bulk {size}: {r['elapsed']:.2f} s, {r['applied']} applied, "
                  f"{r['errors']} errors, rss {r['rss_after']:.0f} MB", flush=True)
    table = Table("2. Bulk: N grants delivered at once → all enforced",
                  ["Grants", "Time to all enforced (s)", "Grants/s", "Applied / in kernel",
                   "Errors", "RSS idle (MB)", "RSS after (MB)"])
    for size in sizes:
        runs = results[size]
        elapsed = Summary([r["elapsed"] for r in runs])
        rate = Summary([r["applied"] / r["elapsed"] for r in runs if r["elapsed"]])
        table.add(f"{size:,}", fmt_summary(elapsed), fmt_summary(rate),
                  f"{min(r['applied'] for r in runs):,} / {min(r['elements'] for r in runs):,}",
                  sum(r["errors"] for r in runs),
                  fmt_summary(Summary([r["rss_idle"] for r in runs])),
                  fmt_summary(Summary([r["rss_after"] for r in runs])))
    table.notes += [
        "Grants are delivered with BatchApplyGrants (one request per 50k grants); the agent "
        "verifies each grant's Ed25519 signature and policy and enforces all of a request in "
        "one kernel transaction. Grants are signed beforehand (broker-side work, untimed). "
        "'Time to all enforced' ends with the answer: the agent answers only after the "
        "kernel commit. The largest size runs once.",
        "'in kernel' counts map elements in `nft list table inet portagent` afterwards.",
    ]
    ctx.tables.append(table)
    ctx.raw["bulk"] = results
    top = sizes[-1]
    t = Summary([r["elapsed"] for r in results[top]]).median
    applied = min(r["applied"] for r in results[top])
    complete = applied == top
    ctx.target(f"{top:,} grants enforced", "≤ 1 s",
               f"{fmt(t)} s" if complete else f"only {applied:,} of {top:,} in {fmt(t)} s (cap)",
               t <= 1.0 if top == 100_000 else None)
    idle = Summary([r["rss_idle"] for runs in results.values() for r in runs]).median
    ctx.target("RSS idle", "≤ 60 MB", f"{fmt(idle)} MB", idle <= 60)
    after = Summary([r["rss_after"] for r in results[top]]).median
    ctx.target(f"RSS at {top:,} grants", "≤ 200 MB",
               f"{fmt(after)} MB" + ("" if complete else f" with only {applied:,} loaded"),
               (after <= 200 if complete else False if after > 200 else None)
               if top == 100_000 else None)


def _expiry_once(ctx: Context, kill: bool) -> dict[str, Any]:
    ttl = 3.0
    rate = 2000.0
    with env.topology() as topo:
        agent = Portagent(topo)
        agent.setup()
        agent.start()
        server = topo.worker(topo.server)
        server.call("listen", address=env.SERVER_IP, udp=[UDP_PORT])
        client = topo.worker(topo.client)
        pa = agent.client_worker()
        granted = pa.call("pa_grant", source=env.CLIENT_IP, port=f"{UDP_PORT}/udp", ttl=ttl)
        expire = granted["expire_time"]
        if kill:
            agent.stop(signal.SIGKILL)
        remaining = expire - time.time()
        stream = client.call("udp_stream", timeout=60, host=env.SERVER_IP, port=UDP_PORT,
                             rate_pps=rate, seconds=remaining + 1.0, stream=1)
        time.sleep(0.2)
        counts = server.call("counts")["streams"].get("1")
        pa.close()
        agent.stop()
        send_times: list[float] = stream["send_times"]
        if not counts:
            return {"lag": float("nan"), "received": 0}
        last = counts["max_seq"]
        first_refused = send_times[last + 1] if last + 1 < len(send_times) else float("nan")
        # Packets before the last received one that were lost: should be 0.
        lost_before = last + 1 - counts["count"]
        gaps = [[send_times[a] - expire, send_times[b] - expire] for a, b in counts["gaps"]]
        return {"lag": first_refused - expire, "received": counts["count"],
                "lost_before_expiry": lost_before, "interval": 1.0 / rate,
                "gaps_rel_expiry_s": gaps}


def expiry(ctx: Context) -> None:
    table = Table("4. Expiry precision: expire_time → first refused packet",
                  ["Agent", "Lag median (ms)", "min–max (ms)", "Runs", "Lost before expiry"])
    worst = 0.0
    for kill in (False, True):
        runs = [_expiry_once(ctx, kill) for _ in range(2 if ctx.quick else max(3, ctx.repeats))]
        lags = [r["lag"] * 1000 for r in runs]
        worst = max(worst, *(abs(x) for x in lags))
        table.add("killed (SIGKILL) before expiry" if kill else "alive",
                  fmt(Summary(lags).median), f"{fmt(min(lags))}–{fmt(max(lags))}", len(runs),
                  sum(r.get("lost_before_expiry", 0) for r in runs))
        ctx.raw.setdefault("expiry", {})["killed" if kill else "alive"] = runs
    table.notes += [
        "A granted UDP flow (2,000 packets/s, sequence-numbered, wall-clock stamped) runs "
        "across the grant's expire_time (TTL 3 s); lag = send time of the first packet "
        "that never arrived − expire_time (resolution 0.5 ms; negative = closed early).",
    ]
    ctx.tables.append(table)
    ctx.target("Expiry lag (alive and killed, worst)", "≤ 100 ms", f"{fmt(worst)} ms",
               worst <= 100)


def sustained(ctx: Context) -> None:
    clients = 50
    seconds = 10.0 if ctx.quick else 60.0
    runs: list[dict[str, Any]] = []
    for _ in range(1 if ctx.quick else max(1, ctx.repeats - 1)):
        with env.topology() as topo:
            agent = Portagent(topo)
            agent.setup()
            agent.start()
            pa = agent.client_worker()
            cpu_before = agent.cpu_seconds()
            reply = pa.call("pa_load", timeout=seconds + 900, clients=clients, seconds=seconds,
                            presign_per_client=int(seconds * 40))
            reply["agent_cpu_s"] = agent.cpu_seconds() - cpu_before
            reply["rss_after"] = agent.rss_mb()
            runs.append(reply)
            pa.close()
            agent.stop()
        print(f"  sustained: {reply['rpcs'] / reply['elapsed']:.0f} RPC/s, "
              f"p99 {reply['p99'] * 1000:.1f} ms, {reply['errors']} errors", flush=True)
    table = Table(f"5. Sustained load: {clients} concurrent clients, grant + revoke, "
                  f"{seconds:.0f} s",
                  ["RPCs/s", "first → last window (RPCs/s)", "grant+revoke cycles/s",
                   "p50 (ms)", "p99 (ms)", "max (ms)",
                   "Errors", "RSS after (MB)", "CPU agent / client (% of 1 vCPU)"])
    rpcs = Summary([r["rpcs"] / r["elapsed"] for r in runs])
    window = runs[0]["window_s"]
    table.add(fmt_summary(rpcs),
              f"{fmt(Summary([r['windows'][0] / window for r in runs]).median)} → "
              f"{fmt(Summary([r['windows'][-1] / window for r in runs]).median)}",
              fmt_summary(Summary([r["cycles"] / r["elapsed"] for r in runs])),
              fmt_summary(Summary([r["p50"] * 1000 for r in runs])),
              fmt_summary(Summary([r["p99"] * 1000 for r in runs])),
              fmt_summary(Summary([r["max"] * 1000 for r in runs])),
              sum(r["errors"] for r in runs),
              fmt_summary(Summary([r["rss_after"] for r in runs])),
              f"{Summary([100 * r['agent_cpu_s'] / r['elapsed'] for r in runs]).median:.0f} % / "
              f"{Summary([100 * r['client_cpu_s'] / r['elapsed'] for r in runs]).median:.0f} %")
    first_errors = [e for r in runs for e in r["first_errors"]][:2]
    table.notes += [
        f"{clients} threads in one client process, each with its own mTLS channel, loop "
        "ApplyGrant then RevokeGrant (a distinct grant each time, signed ahead); an op = "
        "one RPC; latency per RPC. Client and agent share the machine's 2 vCPUs. Windows: "
        f"{runs[0]['window_s']:.0f} s at the start and at the end of the run.",
    ] + ([f"First errors: {first_errors}"] if first_errors else [])
    ctx.tables.append(table)
    ctx.raw["sustained"] = runs
    p99 = Summary([r["p99"] * 1000 for r in runs]).median
    errors = sum(r["errors"] for r in runs)
    ctx.target("Sustained ops/s (RPCs)", "≥ 1,000/s", f"{fmt(rpcs.median)}/s",
               rpcs.median >= 1000)
    ctx.target("Sustained p99", "≤ 20 ms", f"{fmt(p99)} ms", p99 <= 20)
    ctx.target("Sustained errors", "0", str(errors), errors == 0)


def _restart_once(ctx: Context, size: int) -> dict[str, Any]:
    rate = 1000.0
    with env.topology() as topo:
        agent = Portagent(topo)
        agent.setup()
        agent.start()
        server = topo.worker(topo.server)
        server.call("listen", address=env.SERVER_IP, udp=[UDP_PORT])
        client = topo.worker(topo.client)
        pa = agent.client_worker()
        if size:
            pa.call("pa_presign", timeout=900, count=size, ttl=3600.0)
            limit = BULK_LIMIT_QUICK if ctx.quick else BULK_LIMIT
            bulk_reply = pa.call("pa_bulk", timeout=limit + 300, concurrency=BULK_CONCURRENCY,
                                 max_seconds=limit)
            loaded = bulk_reply["applied"]
        else:
            loaded = 0
        pa.call("pa_grant", source=env.CLIENT_IP, port=f"{UDP_PORT}/udp", ttl=3600.0)
        rss_before = agent.rss_mb()
        # The flow starts before the stop and ends after the new daemon is ready.
        client.send("udp_stream", host=env.SERVER_IP, port=UDP_PORT, rate_pps=rate,
                    seconds=60.0 if size >= 100_000 else 20.0, stream=2)
        time.sleep(1.0)
        stop_started = time.monotonic()
        agent.stop(signal.SIGTERM, timeout=60)
        stopped = time.monotonic()
        ready_s = agent.start(timeout=300)
        ready_at = time.monotonic()
        stream = client.receive(timeout=400)
        time.sleep(0.3)
        counts = server.call("counts")["streams"].get("2", {"count": 0})
        rss_after = agent.rss_mb()
        pa.close()
        agent.stop()
        sent = stream["sent"]
        flow_ok = stream["send_times"][-1] - stream["send_times"][0]
        return {"size": size, "loaded": loaded, "stop_s": stopped - stop_started,
                "ready_s": ready_s, "sent": sent, "received": counts["count"],
                "lost": sent - counts["count"], "rss_before": rss_before,
                "rss_after_restart": rss_after,
                "flow_covered_restart": flow_ok > (ready_at - stop_started)}


def restart(ctx: Context) -> None:
    sizes = [0, 5_000] if ctx.quick else [0, 100_000]
    table = Table("6. Restart: start → READY=1, and packets lost by a granted flow",
                  ["Active grants", "Stop (SIGTERM) (s)", "Start → ready (s)",
                   "Flow packets sent", "Lost", "RSS after restart (MB)"])
    results: dict[int, list[dict[str, Any]]] = {}
    for size in sizes:
        for _ in range(1 if ctx.quick or size >= 100_000 else ctx.repeats):
            r = _restart_once(ctx, size)
            results.setdefault(size, []).append(r)
            print(f"  restart {size}: ready {r['ready_s']:.2f} s, lost {r['lost']}", flush=True)
        runs = results[size]
        table.add(f"{size:,}" + ("" if all(r["loaded"] == size for r in runs) else
                                 f" ({min(r['loaded'] for r in runs):,} loaded)"),
                  fmt_summary(Summary([r["stop_s"] for r in runs])),
                  fmt_summary(Summary([r["ready_s"] for r in runs])),
                  sum(r["sent"] for r in runs), sum(r["lost"] for r in runs),
                  fmt_summary(Summary([r["rss_after_restart"] for r in runs])))
    table.notes += [
        "A granted UDP flow at 1,000 packets/s runs from 1 s before SIGTERM until well after "
        "READY=1 (systemd notify protocol, socket of ours); lost = sent − received. "
        "Grants were loaded as in scenario 2 (delivery capped at "
        f"{BULK_LIMIT_QUICK if ctx.quick else BULK_LIMIT:.0f} s; the row says how many loaded).",
    ]
    ctx.tables.append(table)
    ctx.raw["restart"] = results
    top = sizes[-1]
    ready = Summary([r["ready_s"] for r in results[top]]).median
    loaded = min(r["loaded"] for r in results[top])
    lost = sum(r["lost"] for runs in results.values() for r in runs)
    ctx.target(f"Restart with {top:,} grants: start → ready", "≤ 2 s",
               f"{fmt(ready)} s" + ("" if loaded == top else f" with only {loaded:,} loaded"),
               (ready <= 2 if loaded == top else False if ready > 2 else None)
               if top == 100_000 else None)
    ctx.target("Packets lost by a granted flow across restarts", "0", str(lost), lost == 0)
