"""Worker operations that drive a real portagentd through the broker's own modules.

Loaded by bench.worker in the client namespace for ops named `pa_*`. It uses
`portagent.broker.signing.Signer` to sign and `portagent.broker.client.AgentClient`
(mutual TLS gRPC) to deliver, exactly as `portagent-broker` does, but from a long-lived
process with an open channel.
"""

from __future__ import annotations

import ipaddress
import random
import threading
import time
from pathlib import Path
from typing import Any

from bench import worker
from bench.stats import percentile
from portagent.broker.client import AgentClient, AgentError, TlsFiles
from portagent.broker.settings import load_broker_settings_file
from portagent.broker.signing import Signer, grant_request
from portagent.v1 import agent_pb2 as pb

_STATE: dict[str, Any] = {}
_FILLER_BASE = int(ipaddress.IPv4Address("198.19.0.0"))


def _settings() -> Any:
    return _STATE["settings"]


def _new_client() -> AgentClient:
    s = _settings()
    entry = s.hosts[_STATE["host"]]
    tls = TlsFiles.load(s.ca_file, s.cert_file, s.key_file)
    return AgentClient(entry.address, tls, server_name=entry.server_name, timeout=60.0)


def _sign(source: str, port: str, ttl: float) -> pb.SignedGrant:
    request = grant_request(host_id=_STATE["host"], subject="bench", sources=[source],
                            port=port, ttl=ttl)
    signer: Signer = _STATE["signer"]
    return signer.sign_grant(request, now=time.time())


def _grant_id(signed: pb.SignedGrant) -> str:
    return str(pb.Grant.FromString(signed.grant).grant_id)


def pa_init(broker_toml: str, host: str) -> dict[str, Any]:
    settings = load_broker_settings_file(Path(broker_toml))
    # The direct path signs here; `init` always writes [signing] (only [api]-only
    # broker.toml files may omit it, and those never reach the bench).
    assert settings.signing_key_file is not None, "broker.toml has no [signing] key_file"
    _STATE.update(settings=settings, host=host,
                  signer=Signer.from_file(settings.signing_key_file, settings.signing_key_id))
    _STATE["client"] = _new_client()
    # Warm the channel up (TLS handshake, HTTP/2 settings) outside any measurement.
    list(_STATE["client"].list())
    return {"ok": True}


def pa_grant(source: str, port: str, ttl: float) -> dict[str, Any]:
    signed = _sign(source, port, ttl)
    t0 = time.monotonic()
    _STATE["client"].apply(signed)
    grant = pb.Grant.FromString(signed.grant)
    return {"grant_id": grant.grant_id, "t0": t0, "t1": time.monotonic(),
            "expire_time": grant.expire_time.seconds + grant.expire_time.nanos / 1e9}


def pa_grant_then_probe(source: str, port: str, ttl: float, host: str, probe_port: int,
                        deadline_s: float) -> dict[str, Any]:
    """Sign (untimed: the request is ready), then t0, ApplyGrant, and probe from t0 on.

    The probe runs in a second thread so that the first accepted SYN is seen even if it
    lands before the RPC's answer does."""
    signed = _sign(source, port, ttl)
    result: dict[str, Any] = {}
    start = threading.Event()

    def probing() -> None:
        start.wait()
        result.update(worker.probe(host, probe_port, deadline_s))

    thread = threading.Thread(target=probing)
    thread.start()
    t0 = time.monotonic()
    start.set()
    _STATE["client"].apply(signed)
    t1 = time.monotonic()
    thread.join(deadline_s + 5)
    return {**result, "t0": t0, "rpc_done": t1, "grant_id": _grant_id(signed)}


def pa_revoke(grant_id: str) -> dict[str, Any]:
    signer: Signer = _STATE["signer"]
    signed = signer.sign_revocation(grant_id=grant_id, host_id=_STATE["host"], now=time.time())
    _STATE["client"].revoke(signed)
    return {"ok": True}


def filler_grant(i: int, ttl: float) -> pb.SignedGrant:
    """Grant number i of a bulk set: a distinct /32 source (198.19/16) and port."""
    address = ipaddress.IPv4Address(_FILLER_BASE + (i % 65536))
    port = 5024 + (i // 65536) % 8
    return _sign(str(address), f"{port}/tcp", ttl)


def pa_presign(count: int, ttl: float, offset: int = 0) -> dict[str, Any]:
    started = time.monotonic()
    _STATE["presigned"] = [filler_grant(offset + i, ttl) for i in range(count)]
    return {"count": count, "elapsed": time.monotonic() - started}


def pa_bulk(concurrency: int, max_seconds: float) -> dict[str, Any]:
    """Deliver the presigned grants with BatchApplyGrants (one request per 50k grants:
    each is verified on its own, all that pass go into one kernel transaction).

    `concurrency` and `max_seconds` are kept for the call signature; a batch is one
    request and is not cut short."""
    del concurrency, max_seconds
    grants: list[pb.SignedGrant] = _STATE.pop("presigned")
    client = _new_client()
    client.timeout = 600.0
    started = time.monotonic()
    try:
        results = client.apply_batch(grants)
    finally:
        client.close()
    elapsed = time.monotonic() - started
    errors = [f"{r.error_reason}: {r.error_message}"[:200] for r in results if r.error_code]
    return {"applied": len(results) - len(errors), "errors": len(errors),
            "first_errors": errors[:3], "elapsed": elapsed, "t_start": started}


def pa_load(clients: int, seconds: float, presign_per_client: int) -> dict[str, Any]:
    """`clients` threads, each with its own mTLS channel, doing grant then revoke in a loop.

    Grants and revocations are signed ahead (broker-side work, not the agent's); a thread
    that runs out signs inline. Latency is per RPC."""
    ttl = 600.0
    per_client: list[list[pb.SignedGrant]] = []
    base = 0
    for _ in range(clients):
        per_client.append([filler_grant(base + i, ttl) for i in range(presign_per_client)])
        base += presign_per_client
    channels = [_new_client() for _ in range(clients)]
    for channel in channels:
        list(channel.list())
    latencies: list[list[float]] = [[] for _ in range(clients)]
    finished: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    cycles = [0] * clients
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]
    signer: Signer = _STATE["signer"]

    def loop(n: int) -> None:
        client = channels[n]
        mine = per_client[n]
        index = 0
        barrier.wait()
        while time.monotonic() < stop_at[0]:
            if index < len(mine):
                signed = mine[index]
            else:
                signed = filler_grant(base + n * 1_000_000 + index, ttl)
            index += 1
            grant_id = _grant_id(signed)
            revocation = signer.sign_revocation(grant_id=grant_id, host_id=_STATE["host"],
                                                now=time.time())
            try:
                t = time.monotonic()
                client.apply(signed)
                done = time.monotonic()
                latencies[n].append(done - t)
                finished[n].append(done)
                t = time.monotonic()
                client.revoke(revocation)
                done = time.monotonic()
                latencies[n].append(done - t)
                finished[n].append(done)
                cycles[n] += 1
            except AgentError as exc:
                errors.append(str(exc)[:200])

    cpu_before = time.process_time()
    threads = [threading.Thread(target=loop, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.monotonic() + seconds
    barrier.wait()
    started = time.monotonic()
    for thread in threads:
        thread.join(seconds + 120)
    elapsed = time.monotonic() - started
    client_cpu = time.process_time() - cpu_before
    for channel in channels:
        channel.close()
    flat = [x for per in latencies for x in per]
    # Throughput per window: does the rate hold over the run?
    window_s = min(10.0, seconds / 2)
    windows = [0] * max(1, int(seconds // window_s))
    for per in finished:
        for t_done in per:
            slot = int((t_done - started) // window_s)
            if 0 <= slot < len(windows):
                windows[slot] += 1
    return {"rpcs": len(flat), "cycles": sum(cycles), "elapsed": elapsed,
            "errors": len(errors), "first_errors": errors[:3], "client_cpu_s": client_cpu,
            "windows": windows, "window_s": window_s,
            "p50": percentile(flat, 50), "p99": percentile(flat, 99),
            "max": max(flat) if flat else 0.0}


def pa_paced(clients: int, rate: float, seconds: float, seed: int,
             late_limit: float = 60.0) -> dict[str, Any]:
    """Open loop: `clients` threads, each with its own mTLS channel, together offer `rate`
    RPCs/s (grant, then revoke of that grant, alternating) for `seconds`.

    Each client has its own fixed schedule (rate/clients per second, a random start
    offset within one interval); an RPC is sent at its scheduled time or, if the client is
    behind, at once, and its latency is counted from the SCHEDULED time: a stalled agent
    shows up as latency instead of as fewer requests (no coordinated omission). A client
    more than `late_limit` s behind stops; what it did not send is reported."""
    ttl = 600.0
    per_client_rate = rate / clients
    interval = 1.0 / per_client_rate
    n_ops = int(seconds * per_client_rate) + 1
    n_grants = (n_ops + 1) // 2
    signer: Signer = _STATE["signer"]
    plans: list[list[tuple[pb.SignedGrant, pb.SignedRevocation]]] = []
    for n in range(clients):
        grants = [filler_grant(2_000_000 + n * n_grants + i, ttl) for i in range(n_grants)]
        plans.append([(g, signer.sign_revocation(grant_id=_grant_id(g), host_id=_STATE["host"],
                                                 now=time.time())) for g in grants])
    rand = random.Random(seed)
    offsets = [rand.uniform(0.0, interval) for _ in range(clients)]
    channels = [_new_client() for _ in range(clients)]
    for channel in channels:
        list(channel.list())
    latencies: list[list[float]] = [[] for _ in range(clients)]
    service: list[list[float]] = [[] for _ in range(clients)]
    finished: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    unsent = [0] * clients
    barrier = threading.Barrier(clients + 1)
    start_at = [0.0]

    def loop(n: int) -> None:
        client = channels[n]
        plan = plans[n]
        barrier.wait()
        end = start_at[0] + seconds
        for k in range(n_ops):
            scheduled = start_at[0] + offsets[n] + k * interval
            if scheduled >= end:
                break
            now = time.monotonic()
            if now - scheduled > late_limit:
                unsent[n] = sum(1 for j in range(k, n_ops)
                                if start_at[0] + offsets[n] + j * interval < end)
                break
            if scheduled > now:
                time.sleep(scheduled - now)
            grant, revocation = plan[k // 2]
            sent = time.monotonic()
            try:
                if k % 2 == 0:
                    client.apply(grant)
                else:
                    client.revoke(revocation)
            except AgentError as exc:
                errors.append(str(exc)[:200])
                continue
            done = time.monotonic()
            latencies[n].append(done - scheduled)
            service[n].append(done - sent)
            finished[n].append(done)

    cpu_before = time.process_time()
    threads = [threading.Thread(target=loop, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    # Scheduled times start a little after the barrier so no client begins behind.
    start_at[0] = time.monotonic() + 0.2
    barrier.wait()
    for thread in threads:
        thread.join(seconds + late_limit + 120)
    client_cpu = time.process_time() - cpu_before
    for channel in channels:
        channel.close()
    flat = [x for per in latencies for x in per]
    flat_service = [x for per in service for x in per]
    done_times = [t for per in finished for t in per]
    elapsed = (max(done_times) - start_at[0]) if done_times else seconds
    return {"offered_per_s": rate, "rpcs": len(flat), "elapsed": max(elapsed, seconds),
            "errors": len(errors), "first_errors": errors[:3], "unsent": sum(unsent),
            "client_cpu_s": client_cpu,
            "p50": percentile(flat, 50), "p99": percentile(flat, 99),
            "max": max(flat) if flat else 0.0,
            "service_p50": percentile(flat_service, 50),
            "service_p99": percentile(flat_service, 99)}


# ---- scenario 2/6: a signed snapshot over the agent's broker stream (bench.snapshot_ops) ---


def pa_snap_broker(address: str, pki_dir: str) -> dict[str, Any]:
    """Start the scripted broker in this worker (before the agent, which dials it)."""
    from bench import snapshot_ops

    return snapshot_ops.start_broker(address, pki_dir)


def pa_snap_wait_hello(after_stream: int, limit_s: float) -> dict[str, Any]:
    from bench import snapshot_ops

    return snapshot_ops.broker().wait_hello(after_stream, limit_s)


def pa_snap_prepare(count: int, ttl: float, generation: int,
                    extra: list[list[str]]) -> dict[str, Any]:
    """Sign `count` filler grants plus one per [source, port] in `extra`, then the
    HostState over all of them (broker-side work: untimed)."""
    from bench import snapshot_ops

    settings = _settings()
    signer: Signer = _STATE["signer"]
    extras = [_sign(source, port, ttl) for source, port in extra]
    grants, sign_s = snapshot_ops.sign_grants(count, lambda i: filler_grant(i, ttl), extras)
    key = snapshot_ops.load_key(settings.signing_key_file)
    reply = snapshot_ops.broker().prepare(grants, key, signer.key_id, _STATE["host"],
                                          generation)
    return {**reply, "sign_grants_s": sign_s, "extra_ids": [_grant_id(g) for g in extras]}


def pa_snap_deliver(limit_s: float) -> dict[str, Any]:
    from bench import snapshot_ops

    return snapshot_ops.broker().deliver(limit_s)


# ---- scenario 1's floor: the bare mTLS gRPC echo (bench.echo) ------------------------------


def pa_echo_init(broker_toml: str, host: str, address: str) -> dict[str, Any]:
    """Open a channel to the echo server with the broker's client certificate, as
    pa_init does to the agent; warm it up outside any measurement."""
    from bench.echo import EchoClient

    settings = load_broker_settings_file(Path(broker_toml))
    assert settings.signing_key_file is not None, "broker.toml has no [signing] key_file"
    _STATE.update(settings=settings, host=host,
                  signer=Signer.from_file(settings.signing_key_file, settings.signing_key_id))
    s = _settings()
    tls = TlsFiles.load(s.ca_file, s.cert_file, s.key_file)
    client = EchoClient(address, tls.ca, tls.cert, tls.key, s.hosts[host].server_name)
    client.wait_ready(30.0)
    _STATE["echo"] = client
    payload = pb.ApplyGrantRequest(signed_grant=_sign("198.18.0.2", "5022/tcp", 600.0))
    client.echo(payload.SerializeToString())
    return {"ok": True, "request_bytes": payload.ByteSize()}


def pa_echo(source: str, port: str, ttl: float) -> dict[str, Any]:
    """One echo of a freshly signed ApplyGrantRequest's bytes: the same work before t0
    as pa_grant_then_probe (sign, serialize), then call → reply."""
    from bench.echo import EchoClient

    client: EchoClient = _STATE["echo"]
    payload = pb.ApplyGrantRequest(signed_grant=_sign(source, port, ttl)).SerializeToString()
    t0, t1 = client.echo(payload)
    return {"t0": t0, "t1": t1, "bytes": len(payload)}


OPS = {
    "pa_init": pa_init,
    "pa_grant": pa_grant,
    "pa_grant_then_probe": pa_grant_then_probe,
    "pa_revoke": pa_revoke,
    "pa_presign": pa_presign,
    "pa_bulk": pa_bulk,
    "pa_load": pa_load,
    "pa_paced": pa_paced,
    "pa_snap_broker": pa_snap_broker,
    "pa_snap_wait_hello": pa_snap_wait_hello,
    "pa_snap_prepare": pa_snap_prepare,
    "pa_snap_deliver": pa_snap_deliver,
    "pa_echo_init": pa_echo_init,
    "pa_echo": pa_echo,
}
