"""The real daemon's gRPC limits under hostile load, from the client namespace with the
lab's mTLS certificates: streams never starve health or grants, oversized requests are
refused with a specific status (and bounded memory), huge echoed values still reach
the client as a status."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from portagent.agent.api.grpc_server import MAX_STREAMS_PER_PEER
from portagent.testing.lab import API_PORT, Lab

pytestmark = pytest.mark.root

PORT = 8080

# Runs in the client namespace: python -c CLIENT ADDR CA CERT KEY MODE
CLIENT = r"""
import sys, grpc
from pathlib import Path
from portagent.v1 import agent_pb2 as pb, agent_pb2_grpc
from portagent.health.v1 import health_pb2, health_pb2_grpc
addr, ca, cert, key, mode = sys.argv[1:6]
creds = grpc.ssl_channel_credentials(Path(ca).read_bytes(), Path(key).read_bytes(),
                                     Path(cert).read_bytes())
options = [("grpc.max_send_message_length", 128 << 20)]

def status(fn):
    try:
        fn()
        return "OK"
    except grpc.RpcError as exc:
        return f"{exc.code().name} {len(exc.details() or '')} {(exc.details() or '')[:60]}"

if mode == "streams":
    n = int(sys.argv[6])
    channels = [grpc.secure_channel(addr, creds, options=options) for _ in range(n)]
    streams = [agent_pb2_grpc.AgentServiceStub(c).WatchEvents(
        pb.WatchEventsRequest(after_sequence=2**63), timeout=60) for c in channels]
    # A stream that is open delivers nothing yet; a refused one ends at once.
    import time
    time.sleep(3)
    results = []
    for s in streams:
        done = s.done()
        results.append(status(lambda: next(s)) if done else "OPEN")
    print("|".join(results), flush=True)
    sys.stdin.readline()
    for s in streams:
        s.cancel()
    sys.exit(0)

channel = grpc.secure_channel(addr, creds, options=options)
stub = agent_pb2_grpc.AgentServiceStub(channel)
if mode == "health":
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
elif mode in ("batch60", "batch7"):
    size = (60 if mode == "batch60" else 7) << 20
    raw = channel.unary_unary("/portagent.v1.AgentService/BatchApplyGrants",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
    print(status(lambda: raw(b"\x0a\x00" * (size // 2), timeout=60)))
elif mode == "keyid":
    size = int(sys.argv[6])
    signed = pb.SignedGrant(grant=b"\x0a\x01g", signature=b"s" * 64, key_id="k" * size)
    print(status(lambda: stub.ApplyGrant(pb.ApplyGrantRequest(signed_grant=signed), timeout=10)))
elif mode == "grantid":
    size = int(sys.argv[6])
    print(status(lambda: stub.GetGrant(pb.GetGrantRequest(grant_id="g" * size), timeout=10)))
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(tmp_path, [f"{PORT}/tcp"], prefix="pt-api", tcp_ports=[PORT]) as lab:
        yield lab


def client_argv(lab: Lab, mode: str, *extra: str) -> list[str]:
    return [
        "ip",
        "netns",
        "exec",
        lab.net.client,
        sys.executable,
        "-c",
        CLIENT,
        f"{lab.net.server_ip}:{API_PORT}",
        str(lab.dir / "ca.pem"),
        str(lab.dir / "broker.pem"),
        str(lab.dir / "broker.key"),
        mode,
        *extra,
    ]


def client(lab: Lab, mode: str, *extra: str) -> str:
    result = subprocess.run(
        client_argv(lab, mode, *extra), capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def peak_memory_kib(lab: Lab) -> int:
    for line in Path(f"/proc/{lab.agent_pid()}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_streams_never_starve_health_or_grants(lab: Lab) -> None:
    wanted = MAX_STREAMS_PER_PEER + 2
    holder = subprocess.Popen(
        client_argv(lab, "streams", str(wanted)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        states = holder.stdout.readline().strip().split("|")
        assert states.count("OPEN") == MAX_STREAMS_PER_PEER, states
        refused = [s for s in states if s != "OPEN"]
        assert all(
            s.startswith("RESOURCE_EXHAUSTED") and "TOO_MANY_STREAMS" in s for s in refused
        ), refused
        # With every stream slot taken, health and a real grant still answer.
        assert client(lab, "health") == "SERVING"
        grant_id = lab.grant(port=f"{PORT}/tcp", ttl="30s")
        assert lab.can_connect(PORT)
        assert [g["grant_id"] for g in lab.list_json()] == [grant_id]
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(5)
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()


def test_oversized_batches_are_refused_with_bounded_memory(lab: Lab) -> None:
    before = peak_memory_kib(lab)
    assert client(lab, "batch60").startswith("RESOURCE_EXHAUSTED")
    middle = peak_memory_kib(lab)
    reply = client(lab, "batch7")
    assert reply.startswith("INVALID_ARGUMENT") and "BATCH_TOO_LARGE" in reply, reply
    after = peak_memory_kib(lab)
    print(f"VmHWM KiB: before {before}, after 60 MiB batch {middle}, after 7 MiB {after}")
    # Refused by size and count before parsing: the request bytes, not GBs of objects.
    assert after - before < 64 * 1024
    assert client(lab, "health") == "SERVING"
    assert lab.agent is not None and lab.agent.poll() is None


def test_huge_echoed_values_reach_the_client_as_a_status(lab: Lab) -> None:
    for mode, size, code in (
        ("keyid", 4 << 20, "RESOURCE_EXHAUSTED"),
        ("keyid", 15_000, "PERMISSION_DENIED"),
        ("grantid", 200_000, "RESOURCE_EXHAUSTED"),
        ("grantid", 3000, "INVALID_ARGUMENT"),
    ):
        reply = client(lab, mode, str(size))
        assert reply.startswith(code + " "), (mode, size, reply)
        assert int(reply.split()[1]) <= 1024
    assert client(lab, "health") == "SERVING"
    assert lab.list_json() == []
