"""gRPC API limits over a real (loopback, plaintext) gRPC server with the engine on a
fake kernel: the wire pre-scan, clipped statuses, the stream cap and health."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portagent.agent.api.grpc_server import (
    _BATCH,
    _ONE_SIGNED,
    MAX_BATCH_SIZE,
    MAX_DETAIL_CHARS,
    AgentServicer,
    HealthServicer,
    StreamLimiter,
    WireError,
    add_services,
    scan,
)
from portagent.agent.engine import Engine
from portagent.agent.settings import ApiSettings, Policy, Settings
from portagent.agent.store import Store
from portagent.health.v1 import health_pb2, health_pb2_grpc
from portagent.testing.fakes import FakeClock, FakeFirewall, memory_log
from portagent.testing.grants import TestSigner
from portagent.v1 import agent_pb2 as pb
from portagent.v1 import agent_pb2_grpc
from portagent.wire.ports import parse_port_spec

STREAMS = 2


class Api:
    def __init__(self, state_dir: Path) -> None:
        self.signer = TestSigner()
        self.clock = FakeClock()
        config = Settings(
            host_id="host-a",
            api=ApiSettings("127.0.0.1:0", Path("ca"), Path("c"), Path("k")),
            trusted_keys=(self.signer.trusted,),
            policy=Policy(guarded=(parse_port_spec("5432/tcp"),), max_ttl=3600.0),
            state_dir=state_dir,
            reconcile_interval=3600.0,
        )
        self.log, events = memory_log()
        self.store = Store(config.store_path)
        self.engine = Engine(config, FakeFirewall(self.clock), self.store, events, clock=self.clock)
        self.engine.start()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=STREAMS + 6))
        add_services(
            self.server,
            AgentServicer(self.engine, None, StreamLimiter(STREAMS, STREAMS)),
            HealthServicer(lambda: True),
            unary_limit=2,
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait(5)
        self.engine.stop()
        self.store.close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = Api(tmp_path)
    yield a
    a.close()


def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code(), caught.value.details()


def test_a_batch_of_empty_entries_is_refused_before_parsing(api: Api) -> None:
    raw = b"\x0a\x00" * (MAX_BATCH_SIZE + 1)
    method = api.channel.unary_unary(
        "/portagent.v1.AgentService/BatchApplyGrants",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    code, details = status_of(lambda: method(raw, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("BATCH_TOO_LARGE: BatchApplyGrantsRequest: at most 10000")
    assert api.engine.list_grants() == []


@pytest.mark.parametrize(
    ("raw", "code", "reason"),
    [
        (b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"),
        (b"\x0a\x05ab", grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"),
        (b"\x0b\x0c", grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"),  # groups
        (b"\x10\x01" * 40, grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"),
        (
            b"\x0a\x82\x80\x01" + b"\x00" * 16386,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "REQUEST_TOO_LARGE",
        ),
    ],
)
def test_garbage_gets_a_specific_status(
    api: Api, raw: bytes, code: grpc.StatusCode, reason: str
) -> None:
    method = api.channel.unary_unary(
        "/portagent.v1.AgentService/ApplyGrant",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    got, details = status_of(lambda: method(raw, timeout=10))
    assert (got, details.split(":")[0]) == (code, reason), details


def test_huge_echoed_values_are_clipped(api: Api) -> None:
    signed = api.signer.signed_grant_pb(api.clock.now)
    signed.key_id = "k" * 15_000  # just under the per-message limit: reaches the engine
    code, details = status_of(
        lambda: api.stub.ApplyGrant(pb.ApplyGrantRequest(signed_grant=signed), timeout=10)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert len(details) <= MAX_DETAIL_CHARS
    code, details = status_of(
        lambda: api.stub.GetGrant(pb.GetGrantRequest(grant_id="g" * 3000), timeout=10)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("INVALID_GRANT_ID") and len(details) <= MAX_DETAIL_CHARS
    code, details = status_of(
        lambda: api.stub.GetGrant(pb.GetGrantRequest(grant_id="g" * 200_000), timeout=10)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("REQUEST_TOO_LARGE")


def test_streams_are_capped_and_health_still_answers(api: Api) -> None:
    streams = [api.stub.WatchEvents(pb.WatchEventsRequest(), timeout=30) for _ in range(STREAMS)]
    try:
        # Each stream is running once it has delivered the applied grant's event.
        api.stub.ApplyGrant(
            pb.ApplyGrantRequest(signed_grant=api.signer.signed_grant_pb(api.clock.now)),
            timeout=10,
        )
        for stream in streams:
            assert next(stream).kind == pb.EVENT_KIND_GRANT_APPLIED
        extra = api.stub.WatchEvents(pb.WatchEventsRequest(), timeout=10)
        code, details = status_of(lambda: next(extra))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.startswith("TOO_MANY_STREAMS")
        reply = api.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert len(list(api.stub.ListGrants(pb.ListGrantsRequest(), timeout=10).grants)) == 1
    finally:
        for stream in streams:
            stream.cancel()
    # A cancelled stream gives its slot back.
    for _ in range(50):
        again = api.stub.WatchEvents(pb.WatchEventsRequest(after_sequence=0), timeout=10)
        try:
            assert next(again).kind == pb.EVENT_KIND_GRANT_APPLIED
            again.cancel()
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            threading.Event().wait(0.1)
    else:
        pytest.fail("stream slots were not released")


def test_stream_limiter_counts_total_and_per_peer() -> None:
    limiter = StreamLimiter(total=3, per_peer=2)
    assert limiter.acquire("a") is None and limiter.acquire("a") is None
    assert "per client" in (limiter.acquire("a") or "")
    assert limiter.acquire("b") is None
    assert "at most 3" in (limiter.acquire("c") or "")
    limiter.release("a")
    assert limiter.acquire("c") is None
    assert limiter.open_streams() == 3


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=400))
def test_scan_only_ever_refuses_with_wire_error(data: bytes) -> None:
    for shape in (_ONE_SIGNED, _BATCH):
        try:
            scan(data, shape, "M")
        except WireError as exc:
            assert exc.reason in {"MALFORMED_REQUEST", "REQUEST_TOO_LARGE", "BATCH_TOO_LARGE"}
            continue
        # What the scan lets through, protobuf parses (or refuses) without trouble.
        with contextlib.suppress(Exception):  # protobuf's refusal: see _deserializer
            pb.BatchApplyGrantsRequest.FromString(data)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.builds(
            pb.SignedGrant,
            grant=st.binary(max_size=3000),
            signature=st.binary(max_size=64),
            key_id=st.text(max_size=64),
        ),
        max_size=20,
    )
)
def test_scan_accepts_every_well_formed_batch(entries: list[pb.SignedGrant]) -> None:
    scan(pb.BatchApplyGrantsRequest(signed_grants=entries).SerializeToString(), _BATCH, "M")
