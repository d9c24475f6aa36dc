"""Worker operations that drive a real portagentd through the broker's own modules.

Loaded by bench.worker in the client namespace for ops named `pa_*`. It uses
`portagent.broker.signing.Signer` to sign and `portagent.broker.client.AgentClient`
(mutual TLS gRPC) to deliver, exactly as `portagent-broker` does, but from a long-lived
process with an open channel.
"""

from __future__ import annotations

import ipaddress
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


OPS = {
    "pa_init": pa_init,
    "pa_grant": pa_grant,
    "pa_grant_then_probe": pa_grant_then_probe,
    "pa_revoke": pa_revoke,
    "pa_presign": pa_presign,
    "pa_bulk": pa_bulk,
    "pa_load": pa_load,
}
