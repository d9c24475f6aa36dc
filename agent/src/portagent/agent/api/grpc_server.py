"""The broker-facing gRPC API (mutual TLS). The one place that imports grpc on the agent.

Domain errors become gRPC statuses here and nowhere else: the status code comes
from the error's canonical status, and every refusal carries its UPPER_SNAKE reason
as structured detail (AIP-193): a google.rpc.Status in the `grpc-status-details-bin`
trailer holding an ErrorInfo{reason, domain, metadata{field}}, which clients read
instead of parsing prose. The human text "REASON: message" stays the status message.

Resource limits (every one refuses at once with a specific status, never queues):
- requests: gRPC refuses any message over MAX_RECEIVE_BYTES before we see it; our
  own deserializers then walk the protobuf wire format (no allocation per field) and
  refuse a request whose field count or entry sizes do not fit its method *before*
  protobuf builds any object, so peak memory per request stays a small multiple of
  its size (a batch of millions of empty entries is never materialised);
- streams (WatchEvents) hold a worker thread each: at most MAX_STREAMS at once and
  MAX_STREAMS_PER_PEER per client identity (its mTLS certificate);
- unary calls that wait for the engine: at most MAX_UNARY at once;
- the worker pool is larger than both caps together, so Health.Check (and the
  refusals themselves) always find a free worker;
- status details are clipped (MAX_DETAIL_CHARS characters and as many UTF-8 bytes;
  echoed values to MAX_ECHO_CHARS), so a status with its rich trailer always fits
  gRPC's metadata limit and reaches the client.
"""

from __future__ import annotations

import base64
import importlib.util
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from google.rpc import error_details_pb2, status_pb2
from portagent.agent.codec import STATE_TO_PB, event_to_pb, status_to_pb
from portagent.agent.engine import Engine, SignedInput
from portagent.agent.model import GrantRecord
from portagent.agent.settings import ApiSettings
from portagent.agent.usage import GrantUsage, UsageReader
from portagent.health.v1 import health_pb2, health_pb2_grpc
from portagent.v1 import agent_pb2 as pb
from portagent.v1 import agent_pb2_grpc
from portagent.wire.envelope import GRANT_ID_PATTERN
from portagent.wire.errors import ERROR_DOMAIN, STATUS_DETAILS_KEY, PortagentError, Status

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# A batch is verified and committed as one kernel transaction; bigger sets belong in
# a signed snapshot (one signature), not in one request of separately signed grants.
MAX_BATCH_SIZE = 10_000
# One SignedGrant/SignedRevocation: the largest valid grant (256-char subject, 1024-char
# reason, 64 IPv6 sources, all in 4-byte UTF-8 at worst) is under 8 KiB; 16 KiB leaves room.
MAX_SIGNED_BYTES = 16 * 1024
# The whole BatchApplyGrants request: typical grants are ~250 bytes, so 10,000 fit in
# ~3 MiB; a client with bigger grants sends smaller batches. gRPC's Python layer holds
# about three copies of a received message, so this also bounds a request's peak memory.
MAX_RECEIVE_BYTES = 8 * 1024 * 1024
# Requests that carry no signed message (ids, page tokens, sequence numbers).
MAX_SMALL_REQUEST_BYTES = 4 * 1024
# Fields any message may carry (known ones repeated, or unknown ones); protobuf keeps
# unknown fields, so without this a small request could still hold millions of them.
MAX_FIELDS = 32
MAX_STREAMS = 8
MAX_STREAMS_PER_PEER = 4
MAX_UNARY = 64
# Workers beyond both caps: Health.Check and immediate refusals always find one.
SPARE_WORKERS = 8
# Server reflection streams (grpcurl, buf curl) hold a worker each while open.
MAX_REFLECTION_STREAMS = 2
MAX_DETAIL_CHARS = 1024
MAX_ECHO_CHARS = 128
MAX_REASON_CHARS = 64


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to `limit` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _code(status: Status) -> grpc.StatusCode:
    # By name, so a status added to errors.Status maps without an edit here.
    return getattr(grpc.StatusCode, status.value, grpc.StatusCode.INTERNAL)


def _detail(reason: str, message: str) -> str:
    # Messages from deeper layers may echo client input of any length; clip the whole
    # detail here, the one place every error becomes a status. Bytes count too: gRPC
    # percent-encodes non-ASCII in grpc-message (3 bytes each), and the trailer repeats
    # the text, so 1024 four-byte characters would overflow the client's metadata limit.
    detail = clip(f"{reason}: {message}", MAX_DETAIL_CHARS)
    encoded = detail.encode()
    if len(encoded) <= MAX_DETAIL_CHARS:
        return detail
    # Cut on a character boundary (a partial last character is dropped), then mark it.
    return encoded[: MAX_DETAIL_CHARS - len("…".encode())].decode(errors="ignore") + "…"


def rich_status(
    code: grpc.StatusCode, reason: str, message: str, field: str | None = None
) -> tuple[str, bytes]:
    """The status text ("REASON: message", clipped) and the serialized google.rpc.Status
    with one ErrorInfo that travels in the STATUS_DETAILS_KEY trailer."""
    reason = clip(reason, MAX_REASON_CHARS)
    detail = _detail(reason, message)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    if field:
        info.metadata["field"] = clip(field, MAX_ECHO_CHARS)
    status = status_pb2.Status(code=code.value[0], message=detail)
    status.details.add().Pack(info)
    return detail, status.SerializeToString()


def abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    reason: str,
    message: str,
    *,
    field: str | None = None,
) -> NoReturn:
    """End the RPC with `code`, the text "REASON: message" and its ErrorInfo trailer."""
    detail, details_bin = rich_status(code, reason, message, field)
    # abort() sends whatever trailing metadata is set when it ends the call.
    context.set_trailing_metadata(((STATUS_DETAILS_KEY, details_bin),))
    context.abort(code, detail)
    raise AssertionError("unreachable")  # context.abort always raises


def _call(context: grpc.ServicerContext, body: Callable[[], T]) -> T:
    try:
        return body()
    except PortagentError as exc:
        abort(context, _code(exc.status), exc.reason, exc.message, field=exc.field)
    except TimeoutError:
        abort(context, grpc.StatusCode.UNAVAILABLE, "BUSY", "the agent did not answer in time")


def _signed(message: pb.SignedGrant | pb.SignedRevocation, payload: bytes) -> SignedInput:
    return SignedInput(payload=payload, signature=message.signature, key_id=message.key_id)


# ---- request size checks before protobuf parses anything -----------------------------


class WireError(ValueError):
    """A request refused by the wire-format pre-scan, with the gRPC code to answer."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Shape:
    """Limits for one message: its size, its field count, and nested messages' shapes.

    `repeated` is the one field allowed more than MAX_FIELDS times (a batch's entries),
    up to `max_repeated`."""

    max_bytes: int
    nested: tuple[tuple[int, Shape], ...] = ()
    repeated: int = 0
    max_repeated: int = 0


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def scan(data: bytes, shape: Shape, name: str, start: int = 0, end: int | None = None) -> None:
    """Walk the protobuf wire format of data[start:end] against `shape`.

    Visits each field once and allocates nothing per field, so its cost is bounded by
    the field caps whatever the input. Raises WireError naming the offending field."""
    end = len(data) if end is None else end
    if end - start > shape.max_bytes:
        raise WireError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "REQUEST_TOO_LARGE",
            f"{name}: {end - start} bytes, at most {shape.max_bytes}",
        )
    nested = shape.nested
    only = shape.repeated
    fields = repeated = 0
    pos = start
    try:
        while pos < end:
            # One-byte varints (every key and length below 128) without a call: this
            # runs on every request, before anything else.
            key = data[pos]
            if key < 0x80:
                pos += 1
            else:
                key, pos = _varint(data, pos, end)
            number, wire_type = key >> 3, key & 7
            if number == 0:
                raise ValueError("field number 0")
            if only and number == only:
                repeated += 1
                if repeated > shape.max_repeated:
                    raise WireError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "BATCH_TOO_LARGE",
                        f"{name}: at most {shape.max_repeated} entries per request",
                    )
            else:
                fields += 1
                if fields > MAX_FIELDS:
                    raise WireError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "MALFORMED_REQUEST",
                        f"{name}: more than {MAX_FIELDS} fields",
                    )
            if wire_type == 2:
                length = data[pos] if pos < end else 0x80
                if length < 0x80:
                    pos += 1
                else:
                    length, pos = _varint(data, pos, end)
                if length > end - pos:
                    raise ValueError("length runs past the end")
                for inner, inner_shape in nested:
                    if inner == number:
                        scan(data, inner_shape, f"{name}.{number}", pos, pos + length)
                        break
                pos += length
            elif wire_type == 0:
                _, pos = _varint(data, pos, end)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            else:
                raise ValueError(f"wire type {wire_type}")  # groups: not in our protos
            if pos > end:
                raise ValueError("field runs past the end")
    except WireError:
        raise
    except ValueError as exc:
        raise WireError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "MALFORMED_REQUEST",
            f"{name}: not a valid protobuf message ({exc})",
        ) from None


_SIGNED = Shape(MAX_SIGNED_BYTES)
_SMALL = Shape(MAX_SMALL_REQUEST_BYTES)
# Nested message fields are checked with their own shape (field 1 = the signed message).
_ONE_SIGNED = Shape(MAX_SIGNED_BYTES + 64, nested=((1, _SIGNED),))
_BATCH = Shape(
    MAX_RECEIVE_BYTES, nested=((1, _SIGNED),), repeated=1, max_repeated=MAX_BATCH_SIZE
)


@dataclass(frozen=True)
class Refused:
    """What a deserializer returns instead of raising: gRPC would answer a raise with
    INTERNAL "Exception deserializing request!". The handler turns it into a status."""

    error: WireError


def _deserializer(message: Any, shape: Shape) -> Callable[[bytes], Any]:
    name = message.DESCRIPTOR.name

    def deserialize(data: bytes) -> Any:
        try:
            scan(data, shape, name)
            return message.FromString(data)
        except WireError as exc:
            return Refused(exc)
        except Exception:  # the protobuf parser's own refusal (DecodeError & co)
            return Refused(
                WireError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "MALFORMED_REQUEST",
                    f"{name}: not a valid protobuf message",
                )
            )

    return deserialize


def _check(request: Any, context: grpc.ServicerContext) -> None:
    if isinstance(request, Refused):
        abort(context, request.error.code, request.error.reason, request.error.message)


# ---- concurrency caps ------------------------------------------------------------------


class StreamLimiter:
    """At most `total` open streams, `per_peer` of them per client identity."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def acquire(self, peer: str) -> str | None:
        """None when granted, else why not (the caller answers RESOURCE_EXHAUSTED with
        reason TOO_MANY_STREAMS)."""
        with self._lock:
            if sum(self._open.values()) >= self.total:
                return f"the agent serves at most {self.total} streams"
            if self._open.get(peer, 0) >= self.per_peer:
                return f"at most {self.per_peer} streams per client"
            self._open[peer] = self._open.get(peer, 0) + 1
            return None

    def release(self, peer: str) -> None:
        with self._lock:
            left = self._open.get(peer, 0) - 1
            if left > 0:
                self._open[peer] = left
            else:
                self._open.pop(peer, None)

    def open_streams(self) -> int:
        with self._lock:
            return sum(self._open.values())


def peer_identity(context: grpc.ServicerContext) -> str:
    """The client's mTLS certificate identity (every address it connects from shares
    one cap); its address without the port when unauthenticated (tests)."""
    identities = context.peer_identities()
    if identities:
        return b"|".join(identities).decode(errors="replace")
    address = context.peer()
    return address.rsplit(":", 1)[0] if address else "?"


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        engine: Engine,
        usage: UsageReader | None = None,
        streams: StreamLimiter | None = None,
        observe_apply: Callable[[float, bool], None] | None = None,
    ) -> None:
        self._engine = engine
        self._usage = usage
        self._streams = streams or StreamLimiter(MAX_STREAMS, MAX_STREAMS_PER_PEER)
        # (seconds, answered OK) of each ApplyGrant: the metrics' latency histogram.
        self._observe_apply = observe_apply

    def _usage_of(self, records: list[GrantRecord], *, with_flows: bool) -> dict[int, GrantUsage]:
        if self._usage is None or not records:
            return {}
        return self._usage.usage([r.handle for r in records], with_flows=with_flows)

    def ApplyGrant(
        self,
        request: pb.ApplyGrantRequest,
        context: grpc.ServicerContext,
    ) -> pb.ApplyGrantResponse:
        if self._observe_apply is None:
            return self._apply(request, context)
        started = time.perf_counter()
        ok = False
        try:
            response = self._apply(request, context)
            ok = True
            return response
        finally:
            self._observe_apply(time.perf_counter() - started, ok)

    def _apply(
        self, request: pb.ApplyGrantRequest, context: grpc.ServicerContext
    ) -> pb.ApplyGrantResponse:
        signed = request.signed_grant
        record = _call(context, lambda: self._engine.apply_grant(_signed(signed, signed.grant)))
        return pb.ApplyGrantResponse(status=status_to_pb(record))

    def BatchApplyGrants(
        self, request: pb.BatchApplyGrantsRequest, context: grpc.ServicerContext
    ) -> pb.BatchApplyGrantsResponse:
        if len(request.signed_grants) > MAX_BATCH_SIZE:  # the pre-scan refuses it first
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "BATCH_TOO_LARGE",
                f"at most {MAX_BATCH_SIZE} grants per batch",
                field="signed_grants",
            )
        batch = [_signed(s, s.grant) for s in request.signed_grants]
        outcomes = _call(context, lambda: self._engine.apply_grants(batch))
        response = pb.BatchApplyGrantsResponse()
        for outcome in outcomes:
            result = response.results.add()
            if isinstance(outcome, PortagentError):
                result.error_code = _code(outcome.status).name
                result.error_reason = clip(outcome.reason, 64)
                # Up to 10,000 of these in one response: keep each short.
                result.error_message = clip(outcome.message, 256)
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
        if not GRANT_ID_PATTERN.fullmatch(request.grant_id):
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_GRANT_ID",
                f"grant_id: {clip(request.grant_id)!r} is not 1-64 of [A-Za-z0-9._-]",
                field="grant_id",
            )
        record = _call(context, lambda: self._engine.get(request.grant_id))
        return status_to_pb(record, self._usage_of([record], with_flows=True).get(record.handle))

    def ListGrants(
        self,
        request: pb.ListGrantsRequest,
        context: grpc.ServicerContext,
    ) -> pb.ListGrantsResponse:
        if request.page_size < 0:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_PAGE_SIZE",
                "page_size must not be negative",
                field="page_size",
            )
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = ""
        if request.page_token:
            try:
                # validate=True: urlsafe_b64decode would silently drop foreign characters.
                after = base64.b64decode(
                    request.page_token.encode(), altchars=b"-_", validate=True
                ).decode()
            except (ValueError, UnicodeDecodeError):
                after = ""
            if not GRANT_ID_PATTERN.fullmatch(after):
                abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "INVALID_PAGE_TOKEN",
                    "page_token is not one this agent issued",
                    field="page_token",
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
        # Checked here, before the generator: a refused stream never holds a worker.
        peer = peer_identity(context)
        refusal = self._streams.acquire(peer)
        if refusal is not None:
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS", refusal)
        once = threading.Lock()

        def release() -> None:
            # Once, from whichever comes first: the generator ending or the RPC ending
            # (a stream cancelled before its first message never runs the generator).
            if once.acquire(blocking=False):
                self._streams.release(peer)

        if not context.add_callback(release):
            release()
            abort(context, grpc.StatusCode.CANCELLED, "CANCELLED", "the stream ended")
        return self._watch(request.after_sequence, context, release)

    def _watch(
        self, after: int, context: grpc.ServicerContext, release: Callable[[], None]
    ) -> Iterator[pb.Event]:
        self._engine.hub.watch_started("grpc")
        try:
            while context.is_active() and not self._engine.stopping:
                for event in self._engine.hub.wait(after, timeout=1.0):
                    yield event_to_pb(event)
                    after = event.sequence
        finally:
            self._engine.hub.watch_ended("grpc")
            release()


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
            abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                "SERVICE_UNKNOWN",
                f"unknown service {clip(request.service)!r}",
                field="service",
            )
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        yield health_pb2.HealthCheckResponse(status=self._status(request.service))


class Gate:
    """At most `limit` holders at once; `enter` never waits. A counter under a plain
    lock: threading.BoundedSemaphore does the same through a Python-level Condition,
    several times the cost, on every call."""

    __slots__ = ("_held", "_limit", "_lock")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        """Take a slot; False (taking nothing) when all `limit` are held."""
        with self._lock:
            if self._held >= self._limit:
                return False
            self._held += 1
            return True

    def leave(self) -> None:
        with self._lock:
            if self._held <= 0:
                raise ValueError("Gate.leave without enter")
            self._held -= 1

    @property
    def held(self) -> int:
        return self._held


def _guarded(
    behavior: Callable[[Any, grpc.ServicerContext], Any], gate: Gate | None
) -> Callable[[Any, grpc.ServicerContext], Any]:
    """The handler gRPC calls: answers a pre-scan refusal, then holds a slot of `gate`
    (refusing at once when none is free) while the method runs."""

    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        _check(request, context)
        if gate is None:
            return behavior(request, context)
        if not gate.enter():
            abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "BUSY",
                "too many concurrent requests; retry shortly",
            )
        try:
            return behavior(request, context)
        finally:
            gate.leave()

    return handler


def _unary(
    behavior: Callable[[Any, grpc.ServicerContext], Any],
    request: Any,
    response: Any,
    shape: Shape,
    gate: Gate | None,
) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        _guarded(behavior, gate),
        request_deserializer=_deserializer(request, shape),
        response_serializer=response.SerializeToString,
    )


def add_services(
    server: grpc.Server,
    agent: AgentServicer,
    health: HealthServicer,
    *,
    unary_limit: int = MAX_UNARY,
    batch_limit: int = 2,
) -> None:
    """Register both services with our size-checking deserializers and caps (the
    generated add_*_to_server helpers would parse any request with FromString)."""
    unary = Gate(unary_limit)
    # A batch holds up to MAX_RECEIVE_BYTES and 10,000 parsed grants until it is done.
    batches = Gate(batch_limit)

    def batch(request: Any, context: grpc.ServicerContext) -> Any:
        return _guarded(agent.BatchApplyGrants, batches)(request, context)

    handlers = {
        "ApplyGrant": _unary(
            agent.ApplyGrant, pb.ApplyGrantRequest, pb.ApplyGrantResponse, _ONE_SIGNED, unary
        ),
        "BatchApplyGrants": _unary(
            batch, pb.BatchApplyGrantsRequest, pb.BatchApplyGrantsResponse, _BATCH, unary
        ),
        "RevokeGrant": _unary(
            agent.RevokeGrant, pb.RevokeGrantRequest, pb.RevokeGrantResponse, _ONE_SIGNED, unary
        ),
        "GetGrant": _unary(agent.GetGrant, pb.GetGrantRequest, pb.GrantStatus, _SMALL, unary),
        "ListGrants": _unary(
            agent.ListGrants, pb.ListGrantsRequest, pb.ListGrantsResponse, _SMALL, unary
        ),
        # Streams have their own cap (StreamLimiter) and must not take unary slots.
        "WatchEvents": grpc.unary_stream_rpc_method_handler(
            _guarded(agent.WatchEvents, None),
            request_deserializer=_deserializer(pb.WatchEventsRequest, _SMALL),
            response_serializer=pb.Event.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("portagent.v1.AgentService", handlers),)
    )
    check = health_pb2.HealthCheckRequest
    reply = health_pb2.HealthCheckResponse
    health_handlers = {
        # Never gated: health must answer while everything else is busy.
        "Check": _unary(health.Check, check, reply, _SMALL, None),
        "Watch": grpc.unary_stream_rpc_method_handler(
            _guarded(health.Watch, None),
            request_deserializer=_deserializer(check, _SMALL),
            response_serializer=reply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("grpc.health.v1.Health", health_handlers),)
    )


# grpc_reflection.v1alpha.reflection.SERVICE_NAME, the wire name (a test pins it).
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"


def add_reflection(
    server: grpc.Server, services: list[str], limit: int = MAX_REFLECTION_STREAMS
) -> bool:
    """Serve gRPC server reflection (grpc.reflection.v1alpha) for `services` when the
    grpcio-reflection package is installed; False when it is not (Debian bookworm has
    no python3-grpcio-reflection: the agent then runs without it).

    The descriptors come from protobuf's default pool, where the generated modules
    imported above registered them. Each stream holds a worker while open: at most
    `limit` at once, and every request is size-checked before it is parsed, like ours.
    grpc_reflection (and protobuf's descriptor_pb2 with it, ~0.7 MB of an idle agent's
    RSS) is imported by the first reflection request, not at start: only the route
    is registered up front."""
    if importlib.util.find_spec("grpc_reflection") is None:
        return False
    gate = Gate(limit)
    loaded: list[tuple[Any, Callable[[bytes], Any]]] = []
    lock = threading.Lock()

    def load() -> tuple[Any, Callable[[bytes], Any]]:
        """(the servicer, the checked request parser), made once."""
        with lock:
            if not loaded:
                from grpc_reflection.v1alpha import reflection, reflection_pb2

                # Any: grpc-stubs types ServerReflectionInfo as returning None; it is
                # a generator.
                servicer: Any = reflection.ReflectionServicer([*services, REFLECTION_SERVICE])
                request = reflection_pb2.ServerReflectionRequest
                loaded.append((servicer, _deserializer(request, _SMALL)))
            return loaded[0]

    def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            _check(request, context)
            yield request

    def info(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        if not gate.enter():
            abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "BUSY",
                f"at most {limit} reflection streams at once; retry shortly",
            )
        try:
            try:
                servicer = load()[0]
            except ImportError as exc:  # installed but broken: say so, serve the rest
                abort(context, grpc.StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED", f"reflection: {exc}")
            yield from servicer.ServerReflectionInfo(checked(requests, context), context)
        finally:
            gate.leave()

    handler = grpc.stream_stream_rpc_method_handler(
        info,
        request_deserializer=lambda data: load()[1](data),
        response_serializer=lambda response: response.SerializeToString(),
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(
            REFLECTION_SERVICE, {"ServerReflectionInfo": handler}
        ),)
    )
    return True


def start_server(
    engine: Engine,
    api: ApiSettings,
    is_healthy: Callable[[], bool],
    usage: UsageReader | None = None,
    observe_apply: Callable[[float, bool], None] | None = None,
) -> grpc.Server:
    """Bind the mTLS listener; raises RuntimeError when the address cannot be bound.
    `observe_apply` gets each ApplyGrant's duration and outcome (metrics)."""
    credentials = grpc.ssl_server_credentials(
        [(api.key_file.read_bytes(), api.cert_file.read_bytes())],
        root_certificates=api.ca_file.read_bytes(),
        require_client_auth=True,
    )
    workers = MAX_STREAMS + MAX_UNARY + MAX_REFLECTION_STREAMS + SPARE_WORKERS
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # Metadata of any size from a client is refused by gRPC itself.
            ("grpc.max_metadata_size", 16 * 1024),
        ],
        # Beyond this many RPCs in flight (running or queued for a worker) gRPC answers
        # RESOURCE_EXHAUSTED at once instead of queueing without bound.
        maximum_concurrent_rpcs=4 * workers,
    )
    add_services(
        server,
        AgentServicer(
            engine, usage, StreamLimiter(MAX_STREAMS, MAX_STREAMS_PER_PEER), observe_apply
        ),
        HealthServicer(is_healthy),
    )
    # Behind the same mTLS as the rest: only clients with a certificate of our CA list.
    add_reflection(server, ["portagent.v1.AgentService", "grpc.health.v1.Health"])
    if server.add_secure_port(api.listen, credentials) == 0:
        raise RuntimeError(f"api.listen: cannot bind {api.listen}")
    server.start()
    return server
