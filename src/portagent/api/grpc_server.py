"""The broker-facing gRPC API (mutual TLS). The one place that imports grpc on the agent.

Domain errors become gRPC statuses here and nowhere else: the status code comes
from the error's canonical status, and the details start with its UPPER_SNAKE
reason so a client can act on it without parsing prose.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TypeVar

import grpc

from portagent.codec import STATE_TO_PB, event_to_pb, status_to_pb
from portagent.engine import Engine, SignedInput
from portagent.errors import PortagentError, Status
from portagent.health.v1 import health_pb2, health_pb2_grpc
from portagent.model import GrantRecord
from portagent.settings import ApiSettings
from portagent.usage import GrantUsage, UsageReader
from portagent.v1 import agent_pb2 as pb
from portagent.v1 import agent_pb2_grpc

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_BATCH_SIZE = 100_000

_CODES = {
    Status.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Status.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Status.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Status.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Status.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Status.INTERNAL: grpc.StatusCode.INTERNAL,
}


def _call(context: grpc.ServicerContext, body: Callable[[], T]) -> T:
    try:
        return body()
    except PortagentError as exc:
        context.abort(_CODES[exc.status], f"{exc.reason}: {exc.message}")
    except TimeoutError:
        context.abort(grpc.StatusCode.UNAVAILABLE, "BUSY: the agent did not answer in time")
    raise AssertionError("unreachable")  # context.abort always raises


def _signed(message: pb.SignedGrant | pb.SignedRevocation, payload: bytes) -> SignedInput:
    return SignedInput(payload=payload, signature=message.signature, key_id=message.key_id)


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine, usage: UsageReader | None = None) -> None:
        self._engine = engine
        self._usage = usage

    def _usage_of(self, records: list[GrantRecord], *, with_flows: bool) -> dict[int, GrantUsage]:
        if self._usage is None or not records:
            return {}
        return self._usage.usage([r.handle for r in records], with_flows=with_flows)

    def ApplyGrant(
        self,
        request: pb.ApplyGrantRequest,
        context: grpc.ServicerContext,
    ) -> pb.ApplyGrantResponse:
        signed = request.signed_grant
        record = _call(context, lambda: self._engine.apply_grant(_signed(signed, signed.grant)))
        return pb.ApplyGrantResponse(status=status_to_pb(record))

    def BatchApplyGrants(
        self, request: pb.BatchApplyGrantsRequest, context: grpc.ServicerContext
    ) -> pb.BatchApplyGrantsResponse:
        if len(request.signed_grants) > MAX_BATCH_SIZE:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"BATCH_TOO_LARGE: at most {MAX_BATCH_SIZE} grants per batch",
            )
        batch = [_signed(s, s.grant) for s in request.signed_grants]
        outcomes = _call(context, lambda: self._engine.apply_grants(batch))
        response = pb.BatchApplyGrantsResponse()
        for outcome in outcomes:
            result = response.results.add()
            if isinstance(outcome, PortagentError):
                result.error_code = _CODES[outcome.status].name
                result.error_reason = outcome.reason
                result.error_message = outcome.message
            else:
                result.grant_id = outcome.grant.grant_id
                result.state = STATE_TO_PB[outcome.state]
        return response

    def RevokeGrant(
        self,
        request: pb.RevokeGrantRequest,
        context: grpc.ServicerContext,
    ) -> pb.RevokeGrantResponse:
        signed = request.signed_revocation
        record = _call(
            context, lambda: self._engine.revoke_grant(_signed(signed, signed.revocation))
        )
        response = pb.RevokeGrantResponse()
        if record is not None:
            response.status.CopyFrom(status_to_pb(record))
        return response

    def GetGrant(
        self,
        request: pb.GetGrantRequest,
        context: grpc.ServicerContext,
    ) -> pb.GrantStatus:
        record = _call(context, lambda: self._engine.get(request.grant_id))
        return status_to_pb(record, self._usage_of([record], with_flows=True).get(record.handle))

    def ListGrants(
        self,
        request: pb.ListGrantsRequest,
        context: grpc.ServicerContext,
    ) -> pb.ListGrantsResponse:
        if request.page_size < 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_PAGE_SIZE: page_size must not be negative",
            )
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = ""
        if request.page_token:
            try:
                after = base64.urlsafe_b64decode(request.page_token.encode()).decode()
            except (ValueError, UnicodeDecodeError):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "INVALID_PAGE_TOKEN: page_token is not one this agent issued",
                )
        records = [r for r in self._engine.list_grants() if r.grant.grant_id > after]
        page = records[:size]
        usage = self._usage_of(page, with_flows=False)
        response = pb.ListGrantsResponse(
            grants=[status_to_pb(r, usage.get(r.handle)) for r in page]
        )
        if len(records) > size:
            last = page[-1].grant.grant_id
            response.next_page_token = base64.urlsafe_b64encode(last.encode()).decode()
        return response

    def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Event]:
        after = request.after_sequence
        while context.is_active() and not self._engine.stopping:
            for event in self._engine.hub.wait(after, timeout=1.0):
                yield event_to_pb(event)
                after = event.sequence


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """SERVING while the engine has reconciled recently."""

    SERVICES = ("", "portagent.v1.AgentService")

    def __init__(self, is_healthy: Callable[[], bool]) -> None:
        self._is_healthy = is_healthy

    def _status(self, service: str) -> int:
        if service not in self.SERVICES:
            return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        if self._is_healthy():
            return int(health_pb2.HealthCheckResponse.SERVING)
        return int(health_pb2.HealthCheckResponse.NOT_SERVING)

    def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
    ) -> health_pb2.HealthCheckResponse:
        status = self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        yield health_pb2.HealthCheckResponse(status=self._status(request.service))


def start_server(
    engine: Engine,
    api: ApiSettings,
    is_healthy: Callable[[], bool],
    usage: UsageReader | None = None,
) -> grpc.Server:
    """Bind the mTLS listener; raises RuntimeError when the address cannot be bound."""
    credentials = grpc.ssl_server_credentials(
        [(api.key_file.read_bytes(), api.cert_file.read_bytes())],
        root_certificates=api.ca_file.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc"),
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(engine, usage), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(is_healthy), server)
    if server.add_secure_port(api.listen, credentials) == 0:
        raise RuntimeError(f"api.listen: cannot bind {api.listen}")
    server.start()
    return server
