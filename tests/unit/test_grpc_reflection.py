"""gRPC server reflection on the agent's API over a real (loopback, plaintext) gRPC
server: what it lists and describes, its stream cap and request pre-scan, and a start
without grpcio-reflection installed (Debian bookworm's case)."""

from __future__ import annotations

import queue
import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from portagent.agent.api.grpc_server import HealthServicer, add_reflection
from portagent.health.v1 import health_pb2, health_pb2_grpc

SERVICES = ["portagent.v1.AgentService", "grpc.health.v1.Health"]
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


class Server:
    def __init__(self, limit: int = 2, reflection: bool = True) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=limit + 4))
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(lambda: True), self.server)
        self.enabled = add_reflection(self.server, SERVICES, limit) if reflection else False
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait(5)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(limit=2)
    yield s
    s.close()


def test_lists_our_services_and_describes_them_from_the_default_pool(server: Server) -> None:
    assert server.enabled
    database = ProtoReflectionDescriptorDatabase(server.channel)
    assert sorted(database.get_services()) == sorted([*SERVICES, REFLECTION])
    # The file that defines the service, as the generated module registered it.
    proto = database.FindFileContainingSymbol("portagent.v1.AgentService")
    assert proto.name == "portagent/v1/agent.proto"
    (service,) = [s for s in proto.service if s.name == "AgentService"]
    assert "ApplyGrant" in [m.name for m in service.method]
    health = database.FindFileContainingSymbol("grpc.health.v1.Health")
    assert isinstance(health, descriptor_pb2.FileDescriptorProto)
    assert health.package == "grpc.health.v1"


def test_an_unknown_symbol_is_an_error_response_not_a_failure(server: Server) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Thing")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def _raw_stream(server: Server) -> Any:
    return server.channel.stream_stream(
        f"/{REFLECTION}/ServerReflectionInfo",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )


def test_an_oversized_request_is_refused_before_parsing(server: Server) -> None:
    # file_containing_symbol (field 4) of 5000 bytes: over the 4 KiB small-request cap.
    raw = b"\x22\x88\x27" + b"a" * 5000
    with pytest.raises(grpc.RpcError) as caught:
        list(_raw_stream(server)(iter([raw]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details().startswith("REQUEST_TOO_LARGE:")


def test_at_most_limit_streams_at_once_then_busy(server: Server) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    list_services = reflection_pb2.ServerReflectionRequest(list_services="")
    held: list[Any] = []
    stops: list[Any] = []
    try:
        for _ in range(2):
            # A stream stays open (and holds its slot) until its requests end.
            requests: queue.Queue[Any] = queue.Queue()
            requests.put(list_services)

            def feed(q: queue.Queue[Any] = requests) -> Iterator[Any]:
                while (item := q.get(timeout=30)) is not None:
                    yield item

            call = stub.ServerReflectionInfo(feed(), timeout=30)
            next(call)  # answered: the stream holds a slot now
            held.append(call)
            stops.append(requests)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ServerReflectionInfo(iter([list_services]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details().startswith("BUSY: at most 2 reflection streams")
    finally:
        for q in stops:
            q.put(None)
        for call in held:
            list(call)
    # The slots are free again once the streams end.
    (response,) = list(stub.ServerReflectionInfo(iter([list_services]), timeout=10))
    assert response.HasField("list_services_response")


def test_without_grpcio_reflection_the_server_starts_and_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes `import` raise ImportError, as on Debian bookworm.
    for name in [n for n in sys.modules if n.startswith("grpc_reflection")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "grpc_reflection", None)
    s = Server()
    try:
        assert s.enabled is False
        health = health_pb2_grpc.HealthStub(s.channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        s.close()
