"""gRPC API limits over a real (loopback, plaintext) gRPC server with the engine on a
fake kernel: the wire pre-scan, clipped statuses, the stream cap and health; and the
structured refusal details (google.rpc.Status + ErrorInfo) as the broker client reads them."""

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

from google.rpc import error_details_pb2, status_pb2
from portagent.agent.api.grpc_server import (
    _BATCH,
    _ONE_SIGNED,
    MAX_BATCH_SIZE,
    MAX_DETAIL_CHARS,
    MAX_REASON_CHARS,
    AgentServicer,
    HealthServicer,
    StreamLimiter,
    WireError,
    abort,
    add_services,
    clip,
    rich_status,
    scan,
)
from portagent.agent.engine import Engine
from portagent.agent.settings import ApiSettings, Policy, Settings
from portagent.agent.store import Store
from portagent.broker.client import (
    AgentRefusedError,
    AgentUnreachableError,
    _map_error,
    error_info,
)
from portagent.health.v1 import health_pb2, health_pb2_grpc
from portagent.testing.fakes import FakeClock, FakeFirewall, memory_log
from portagent.testing.grants import TestSigner
from portagent.v1 import agent_pb2 as pb
from portagent.v1 import agent_pb2_grpc
from portagent.wire.errors import ERROR_DOMAIN, STATUS_DETAILS_KEY
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


# ---- structured refusal details (AIP-193) ------------------------------------------------


def refusal_of(call: object) -> tuple[grpc.RpcError, error_details_pb2.ErrorInfo]:
    """The RpcError a call raises and the one ErrorInfo its status trailer carries,
    decoded here with the protobuf types alone (as any AIP-193 client would)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    error = caught.value
    trailers = [v for k, v in error.trailing_metadata() or () if k == STATUS_DETAILS_KEY]
    assert len(trailers) == 1, error.trailing_metadata()
    status = status_pb2.Status.FromString(trailers[0])
    assert status.code == error.code().value[0]
    assert status.message == error.details()
    assert len(status.details) == 1
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == ERROR_DOMAIN
    # The human text keeps its "REASON: message" form, with the same reason.
    assert error.details().startswith(f"{info.reason}: ")
    return error, info


def test_every_kind_of_refusal_carries_its_reason_as_error_info(api: Api) -> None:
    raw = api.channel.unary_unary(
        "/portagent.v1.AgentService/ApplyGrant",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    stranger = TestSigner(key_id="stranger").signed_grant_pb(api.clock.now)
    cases: list[tuple[object, grpc.StatusCode, str, str]] = [
        # the wire pre-scan
        (
            lambda: raw(b"\xff\xff\xff", timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MALFORMED_REQUEST",
            "",
        ),
        # the servicer's own checks, naming the field
        (
            lambda: api.stub.GetGrant(pb.GetGrantRequest(grant_id="a b"), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_GRANT_ID",
            "grant_id",
        ),
        (
            lambda: api.stub.ListGrants(pb.ListGrantsRequest(page_size=-1), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_SIZE",
            "page_size",
        ),
        (
            lambda: api.stub.ListGrants(pb.ListGrantsRequest(page_token="!"), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
            "page_token",
        ),
        # domain errors from verification and the engine
        (
            lambda: api.stub.ApplyGrant(pb.ApplyGrantRequest(signed_grant=stranger), timeout=10),
            grpc.StatusCode.PERMISSION_DENIED,
            "UNKNOWN_KEY",
            "",
        ),
        (
            lambda: api.stub.GetGrant(pb.GetGrantRequest(grant_id="g-none"), timeout=10),
            grpc.StatusCode.NOT_FOUND,
            "GRANT_NOT_FOUND",
            "",
        ),
        # health
        (
            lambda: api.health.Check(health_pb2.HealthCheckRequest(service="x"), timeout=10),
            grpc.StatusCode.NOT_FOUND,
            "SERVICE_UNKNOWN",
            "service",
        ),
    ]
    for call, code, reason, field in cases:
        error, info = refusal_of(call)
        assert (error.code(), info.reason) == (code, reason), error.details()
        assert info.metadata.get("field", "") == field, (reason, dict(info.metadata))
        # The broker reads the same reason, from the trailer.
        mapped = _map_error("agent", error, 10)
        assert isinstance(mapped, AgentRefusedError)
        assert (mapped.code, mapped.reason, mapped.field) == (code.name, reason, field)
        assert mapped.details == error.details()
    assert api.engine.list_grants() == []


def _abort_server(handler: object) -> tuple[grpc.Server, grpc.Channel]:
    """A loopback server whose one method runs `handler(context)`."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    method = grpc.unary_unary_rpc_method_handler(
        lambda request, context: handler(context),  # type: ignore[operator]
        request_deserializer=lambda b: b,
        response_serializer=lambda b: b,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"M": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, grpc.insecure_channel(f"127.0.0.1:{port}")


def _call(handler: object) -> grpc.RpcError:
    server, channel = _abort_server(handler)
    try:
        method = channel.unary_unary("/t.T/M", lambda b: b, lambda b: b)
        with pytest.raises(grpc.RpcError) as caught:
            method(b"", timeout=10)
        return caught.value
    finally:
        channel.close()
        server.stop(0).wait(5)


@pytest.mark.parametrize("unit", ["x", "é", "😀", "\u202e"])
def test_the_largest_refusal_still_reaches_the_client(unit: str) -> None:
    # Clipped to 1 KiB of UTF-8: gRPC percent-encodes non-ASCII text in grpc-message and
    # the trailer repeats it; unclipped, the client would see a metadata error instead.
    error = _call(
        lambda context: abort(
            context, grpc.StatusCode.PERMISSION_DENIED, "R" * 500, unit * 20_000, field=unit * 500
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(error.details()) <= MAX_DETAIL_CHARS
    assert len(error.details().encode()) <= MAX_DETAIL_CHARS
    mapped = _map_error("agent", error, 10)
    assert isinstance(mapped, AgentRefusedError) and mapped.reason == "R" * 63 + "…"


def _trailer(code: grpc.StatusCode, reason: str, domain: str = ERROR_DOMAIN) -> bytes:
    status = status_pb2.Status(code=code.value[0], message="m")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain))
    return status.SerializeToString()


def _plain(code: grpc.StatusCode, text: str, trailer: bytes | None = None) -> object:
    def handler(context: grpc.ServicerContext) -> None:
        if trailer is not None:
            context.set_trailing_metadata(((STATUS_DETAILS_KEY, trailer),))
        context.abort(code, text)

    return handler


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        # The reason comes from ErrorInfo, never from the text.
        (_plain(DENIED, "NOT_PARSED: text only"), ""),
        (_plain(DENIED, "text", _trailer(DENIED, "FROM_INFO")), "FROM_INFO"),
        # A trailer that is not the agent speaking is ignored: another domain, a code
        # that differs from the call's (grpcio-status refuses those too), garbage bytes.
        (_plain(DENIED, "X: t", _trailer(DENIED, "FOREIGN", domain="example.com")), ""),
        (_plain(DENIED, "X: t", _trailer(grpc.StatusCode.NOT_FOUND, "WRONG_CODE")), ""),
        (_plain(DENIED, "X: t", b"\xff\xff\xff"), ""),
    ],
)
def test_the_broker_reads_the_reason_only_from_error_info(handler: object, reason: str) -> None:
    mapped = _map_error("agent", _call(handler), 10)
    assert isinstance(mapped, AgentRefusedError)
    assert mapped.reason == reason


def test_unavailable_is_the_agent_only_with_its_error_info() -> None:
    # gRPC's own UNAVAILABLE (transport, TLS) carries no ErrorInfo: unreachable, even
    # when its text happens to look like a reason.
    lookalike = _map_error("agent", _call(_plain(UNAVAILABLE, "ENFORCEMENT_FAILED: x")), 10)
    assert isinstance(lookalike, AgentUnreachableError)
    refused = _map_error(
        "agent",
        _call(lambda context: abort(context, UNAVAILABLE, "ENFORCEMENT_FAILED", "nft said no")),
        10,
    )
    assert isinstance(refused, AgentRefusedError)
    assert (refused.code, refused.reason) == ("UNAVAILABLE", "ENFORCEMENT_FAILED")


@settings(max_examples=500, deadline=None)
@given(
    reason=st.text(max_size=100),
    message=st.text(max_size=3000),
    field=st.none() | st.text(max_size=300),
)
def test_rich_status_is_bounded_and_round_trips(
    reason: str, message: str, field: str | None
) -> None:
    detail, raw = rich_status(DENIED, reason, message, field)
    assert len(detail.encode()) <= MAX_DETAIL_CHARS
    status = status_pb2.Status.FromString(raw)
    assert (status.code, status.message) == (DENIED.value[0], detail)
    info = error_info(DENIED, [(STATUS_DETAILS_KEY, raw)])
    if not reason:
        assert info is None  # an empty reason is no reason
        return
    assert info is not None and info.reason == clip(reason, MAX_REASON_CHARS)
    assert info.metadata.get("field", "") == (clip(field) if field else "")
