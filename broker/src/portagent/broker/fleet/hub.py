"""The delivery hub: `FleetService.Connect` (grpc.aio) and the push of each host's
changes to the one stream this replica holds for it.

Per stream:
* the host id comes from the client certificate (its DNS SANs; the CN only when the
  certificate has no SAN) and must equal `Hello.host_id`; a host not in the inventory
  is refused (PERMISSION_DENIED) and the refusal audited;
* one stream per host: a newer stream replaces the older one (the older is cancelled);
* everything sent goes through one delivery task per stream, started on demand and
  gone when there is nothing to send, so 10,000 idle streams cost 10,000 suspended
  handlers and nothing else, and writes to one stream never interleave;
* what is sent is decided from `sent_generation` (what this stream has been given):
  the changes after it in order, or a signed snapshot when the log no longer holds
  them (or the agent asked, or on resume a grant in the gap is no longer active);
* notifications are coalesced per host: a burst of changes to one host while its
  delivery runs costs one more `changes_since`, not one per change.

Inbound messages are raw bytes parsed here once (so a malformed one gets
INVALID_ARGUMENT with a message, not the library's INTERNAL), at most
MAX_INBOUND_BYTES each (gRPC's receive limit) and at most RATE_PER_SECOND on average.
Store calls are blocking: they run in a bounded thread pool, never on the loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import grpc
import grpc.aio
from cryptography import x509
from cryptography.x509.oid import NameOID
from google.protobuf.message import DecodeError
from grpc.aio import EOF  # type: ignore[attr-defined]  # not in grpc-stubs

from portagent.broker.fleet.keyring import KeyRing
from portagent.broker.fleet.metrics import BrokerMetrics, DeliveryTimer
from portagent.broker.fleet.model import (
    Change,
    ChangeKind,
    FleetError,
    GrantState,
    StoreError,
    UsageRow,
)
from portagent.broker.fleet.store import FleetStore
from portagent.broker.settings import HOST_ID_PATTERN
from portagent.v1 import agent_pb2, fleet_pb2
from portagent.wire.envelope import GRANT_ID_PATTERN
from portagent.wire.hoststate import MAX_FLEET_MESSAGE_BYTES
from portagent.wire.timestamps import seconds_of

SERVICE = "portagent.v1.FleetService"
STORE_THREADS = 4  # per pool: writers and delivery readers
# Nothing an agent sends is large: a UsageReport of every grant of a busy host is the
# biggest, and 1 MiB holds ~10,000 entries.
MAX_INBOUND_BYTES = 1024 * 1024
MAX_USAGE_ROWS = 10_000
HELLO_TIMEOUT = 15.0
DELIVERY_ATTEMPTS = 5
DELIVERY_RETRY_DELAY = 0.5
# Token bucket per stream: an agent sends usage at most once a second, acks per change.
RATE_PER_SECOND = 50.0
RATE_BURST = 500.0
MAX_LABELS = 64
MAX_TRUSTED_KEY_IDS = 16
MAX_SHORT_TEXT = 128
MAX_MESSAGE_TEXT = 1024
# SQL BIGINT is signed: a counter beyond it is clamped rather than refused.
MAX_COUNTER = 2**63 - 1
_MIN_TIME, _MAX_TIME = 0.0, 253_402_300_799.0

# Keepalive: ping an idle agent every 20 s, drop it when no answer within 10 s (a dead
# agent is noticed in ~30 s); agents may ping every 10 s.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_INBOUND_BYTES),
    ("grpc.max_send_message_length", MAX_FLEET_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.max_concurrent_streams", 100),
]

Log = Callable[..., None]
T = TypeVar("T")


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Bucket:
    tokens: float = RATE_BURST
    stamp: float = field(default_factory=time.monotonic)

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(RATE_BURST, self.tokens + (now - self.stamp) * RATE_PER_SECOND)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(eq=False)
class _Stream:
    host_id: str
    context: grpc.aio.ServicerContext[bytes, bytes]
    task: asyncio.Task[Any] | None
    trusted_key_ids: tuple[str, ...]
    sent_generation: int
    resuming: bool = True  # the first pass answers the Hello (see _push)
    want_snapshot: bool = False
    dirty: bool = False
    delivering: asyncio.Task[None] | None = None
    replaced: bool = False
    bucket: _Bucket = field(default_factory=_Bucket)
    timer: DeliveryTimer = field(default_factory=DeliveryTimer)


def certificate_names(pem: bytes) -> list[str]:
    """The host ids a client certificate may speak for: its DNS SANs, or its CN when
    it has no SAN extension. IP SANs never name a host."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [str(name).lower() for name in san.value.get_values_for_type(x509.DNSName)]


def _printable(text: str, limit: int) -> bool:
    return len(text) <= limit and text.isprintable()


def _label_ok(key: str, value: str) -> bool:
    return (
        0 < len(key) <= 63
        and key[0].isascii()
        and (key[0].islower() or key[0].isdigit())
        and all(c.isascii() and (c.islower() or c.isdigit() or c in "._/-") for c in key)
        and _printable(value, 253)
    )


def _check_hello(hello: fleet_pb2.Hello, names: list[str]) -> None:
    if not HOST_ID_PATTERN.fullmatch(hello.host_id):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "hello.host_id: not 1-253 of [A-Za-z0-9._-]")
    if hello.host_id.lower() not in names:
        raise _Abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"hello.host_id: {hello.host_id!r} is not named by the client certificate",
        )
    if len(hello.digest) not in (0, 32):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "hello.digest: expected 32 bytes (SHA-256)")
    if not _printable(hello.agent_version, MAX_SHORT_TEXT):
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT, "hello.agent_version: too long or not printable"
        )
    if len(hello.labels) > MAX_LABELS:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"hello.labels: at most {MAX_LABELS}")
    for key, value in hello.labels.items():
        if not _label_ok(key, value):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hello.labels: {key[:64]!r} is not [a-z0-9][a-z0-9._/-]{{0,62}} with a "
                "printable value of at most 253 characters",
            )
    if len(hello.trusted_key_ids) > MAX_TRUSTED_KEY_IDS:
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"hello.trusted_key_ids: at most {MAX_TRUSTED_KEY_IDS}",
        )
    for key_id in hello.trusted_key_ids:
        if not key_id or not _printable(key_id, MAX_SHORT_TEXT):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "hello.trusted_key_ids: bad key id")


def _time_or_none(message: Any, name: str) -> float | None:
    if not message.HasField(name):
        return None
    value = seconds_of(getattr(message, name))
    if not (math.isfinite(value) and _MIN_TIME <= value <= _MAX_TIME):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"usage_report.{name}: out of range")
    return value


def usage_rows(report: fleet_pb2.UsageReport) -> list[UsageRow]:
    """The report's rows, validated (bounded count, grant ids), or _Abort."""
    if len(report.grants) > MAX_USAGE_ROWS:
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"usage_report.grants: at most {MAX_USAGE_ROWS}"
        )
    rows: dict[str, UsageRow] = {}
    for entry in report.grants:
        if not GRANT_ID_PATTERN.fullmatch(entry.grant_id):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "usage_report.grants.grant_id: not 1-64 of [A-Za-z0-9._-]",
            )
        rows[entry.grant_id] = UsageRow(
            grant_id=entry.grant_id,
            connections=entry.connections,
            packets=min(entry.packets, MAX_COUNTER),
            bytes=min(entry.bytes, MAX_COUNTER),
            last_seen=_time_or_none(entry, "last_seen_time"),
        )
    return list(rows.values())


def change_message(change: Change) -> bytes:
    message = fleet_pb2.ConnectResponse()
    message.change.generation = change.generation
    if change.kind is ChangeKind.GRANT:
        message.change.grant.CopyFrom(
            agent_pb2.SignedGrant(
                grant=change.payload, signature=change.signature, key_id=change.key_id
            )
        )
    else:
        message.change.revocation.CopyFrom(
            agent_pb2.SignedRevocation(
                revocation=change.payload, signature=change.signature, key_id=change.key_id
            )
        )
    data: bytes = message.SerializeToString()
    return data


class Hub:
    """FleetService.Connect and the per-host delivery of this replica."""

    def __init__(
        self,
        store: FleetStore,
        keyring: KeyRing,
        log: Log,
        *,
        threads: int = STORE_THREADS,
        clock: Callable[[], float] = time.time,
        on_ack: Callable[[str, int], None] | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics if metrics is not None else BrokerMetrics(process=False)
        # Told (host id, generation) after an ack is recorded: the API's waiters answer
        # "applied" from it without reading the store.
        self._on_ack = on_ack
        self.keyring = keyring  # replaced on SIGHUP; read once per snapshot
        self._log = log
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fleet-write")
        self._read_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fleet-read")
        self._streams: dict[str, _Stream] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # --- wiring -----------------------------------------------------------------------------

    def rpc_handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        # No deserializer: requests arrive as bytes and are parsed in `_parse`, so a
        # malformed message is answered with INVALID_ARGUMENT and a message.
        handler = grpc.stream_stream_rpc_method_handler(self._connect)
        return grpc.method_handlers_generic_handler(SERVICE, {"Connect": handler})

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def connected_hosts(self) -> list[str]:
        return list(self._streams)

    async def run_db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store write (connect, ack, usage, audit) in the writers' pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, partial(fn, *args, **kwargs))

    async def run_read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A delivery read (changes, snapshot) in its own pool: during a reconnect storm
        thousands of connect records queue for the writers, and a new grant's delivery
        must not wait behind them (SQLite WAL and PostgreSQL readers never block on
        the writer)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_pool, partial(fn, *args, **kwargs))

    def notify(self, host_id: str) -> None:
        """A change for `host_id` committed (bus subscriber; never blocks)."""
        stream = self._streams.get(host_id)
        if stream is not None:
            self._kick(stream)

    def resync(self) -> None:
        """Every host may have changed: re-check every stream (bus reconnected)."""
        for stream in list(self._streams.values()):
            self._kick(stream)

    def drop(self, host_id: str) -> None:
        """End the stream of a host removed from the inventory."""
        stream = self._streams.get(host_id)
        if stream is not None and stream.task is not None:
            stream.task.cancel()

    async def close(self) -> None:
        for stream in list(self._streams.values()):
            if stream.task is not None:
                stream.task.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=3.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._read_pool.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Any, what: str) -> None:
        """Bookkeeping that must not hold up the stream (delivery and disconnect
        records); a failure is logged, never lost as "exception never retrieved"."""

        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                self._log("bookkeeping_failed", what=what, error=repr(exc)[:300])

        task = asyncio.get_running_loop().create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- the stream ---------------------------------------------------------------------------

    async def _connect(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        stream: _Stream | None = None
        try:
            names = self._peer_names(context)
            first = await asyncio.wait_for(self._read(context), HELLO_TIMEOUT)
            if first is None or first.WhichOneof("message") != "hello":
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a hello")
            hello = first.hello
            if hello.host_id.lower() not in names and HOST_ID_PATTERN.fullmatch(hello.host_id):
                await self._refuse(hello.host_id, "CERTIFICATE_MISMATCH", names)
            _check_hello(hello, names)
            stream = await self._open(hello, context)
            while True:
                message = await self._read(context)
                if message is None:
                    return
                if not stream.bucket.take():
                    raise _Abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"more than {RATE_PER_SECOND:g} messages a second",
                    )
                await self._handle(stream, message)
        except _Abort as exc:
            self.metrics.streams_refused.labels(code=exc.code.name).inc()
            self._log(
                "stream_refused",
                host_id=stream.host_id if stream else "",
                peer=context.peer(),
                code=exc.code.name,
                message=exc.message,
            )
            await context.abort(exc.code, exc.message)
        except StoreError as exc:
            self._log("stream_store_error", peer=context.peer(), error=str(exc)[:300])
            self.metrics.streams_refused.labels(code=grpc.StatusCode.UNAVAILABLE.name).inc()
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the broker's database is unavailable; retry later"
            )
        except TimeoutError:
            self.metrics.streams_refused.labels(code=grpc.StatusCode.DEADLINE_EXCEEDED.name).inc()
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no hello within {HELLO_TIMEOUT:g}s"
            )
        except asyncio.CancelledError:
            if stream is not None and stream.replaced:
                # Replaced by a newer stream of the same host: say so instead of CANCELLED.
                await context.abort(grpc.StatusCode.ABORTED, "replaced by a newer stream")
            raise
        finally:
            if stream is not None:
                self._close(stream)

    def _peer_names(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> list[str]:
        pem = context.auth_context().get("x509_pem_cert")
        if not pem:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        try:
            return certificate_names(next(iter(pem)))
        except ValueError:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "unreadable client certificate") from None

    async def _read(
        self, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> fleet_pb2.ConnectRequest | None:
        data = await context.read()
        if data is EOF:
            return None
        if not isinstance(data, bytes) or len(data) > MAX_INBOUND_BYTES:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"message larger than {MAX_INBOUND_BYTES} bytes"
            )
        message = fleet_pb2.ConnectRequest()
        try:
            message.ParseFromString(data)
        except (DecodeError, RuntimeError) as exc:  # RuntimeError: recursion limit
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed ConnectRequest: {exc}"
            ) from None
        if message.WhichOneof("message") is None:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "ConnectRequest: no known message "
                "(hello, ack, snapshot_request, usage_report, refusal)",
            )
        return message

    async def _refuse(self, host_id: str, reason: str, names: list[str]) -> None:
        await self.run_db(
            self.store.audit_event,
            actor=f"agent:{host_id}",
            action="refuse",
            host_id=host_id,
            reason=reason,
            detail={"certificate_names": names[:8]},
            now=self._clock(),
        )
        raise _Abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"host {host_id!r} is not in the broker's inventory"
            if reason == "UNKNOWN_HOST"
            else f"hello.host_id: {host_id!r} is not named by the client certificate",
        )

    async def _open(
        self, hello: fleet_pb2.Hello, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> _Stream:
        host_id = hello.host_id
        try:
            await self.run_db(
                self.store.agent_connected,
                host_id,
                agent_version=hello.agent_version,
                agent_labels=dict(hello.labels),
                trusted_key_ids=list(hello.trusted_key_ids),
                generation=hello.generation,
                now=self._clock(),
            )
        except FleetError as exc:
            if exc.reason == "UNKNOWN_HOST" or exc.status == "NOT_FOUND":
                await self._refuse(host_id, "UNKNOWN_HOST", [host_id])
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{exc.field or 'hello'}: {exc.message}"
            ) from None
        stream = _Stream(
            host_id=host_id,
            context=context,
            task=asyncio.current_task(),
            trusted_key_ids=tuple(hello.trusted_key_ids),
            sent_generation=hello.generation,
        )
        older = self._streams.get(host_id)
        self._streams[host_id] = stream
        self.metrics.agent_connects.inc()
        self.metrics.agents_connected.set(len(self._streams))
        if older is not None:
            older.replaced = True
            if older.task is not None:
                older.task.cancel()
        self._log(
            "agent_connected", host_id=host_id, generation=hello.generation, peer=context.peer()
        )
        self._kick(stream)
        return stream

    def _close(self, stream: _Stream) -> None:
        if stream.delivering is not None:
            stream.delivering.cancel()
        if self._streams.get(stream.host_id) is stream:
            del self._streams[stream.host_id]
            self.metrics.agents_connected.set(len(self._streams))
            self._log("agent_disconnected", host_id=stream.host_id)
            self._spawn(
                self.run_db(self.store.agent_disconnected, stream.host_id, now=self._clock()),
                "disconnect",
            )

    async def _handle(self, stream: _Stream, message: fleet_pb2.ConnectRequest) -> None:
        try:
            await self._handle_one(stream, message)
        except StoreError as exc:
            # An ack or a usage report not recorded is superseded by the next one; the
            # agent's stream is worth more than one row.
            self._log("record_failed", host_id=stream.host_id, error=str(exc)[:300])

    async def _handle_one(self, stream: _Stream, message: fleet_pb2.ConnectRequest) -> None:
        kind = message.WhichOneof("message")
        now = self._clock()
        if kind == "ack":
            await self.run_db(
                self.store.record_ack, stream.host_id, message.ack.generation, now=now
            )
            # Capped at what this stream was sent: an ack claiming more says nothing
            # about a grant made after it.
            acked = min(message.ack.generation, stream.sent_generation)
            self.metrics.acks.inc()
            for latency in stream.timer.acked(acked, self._clock()):
                self.metrics.delivery_latency.observe(latency)
            if self._on_ack is not None:
                self._on_ack(stream.host_id, acked)
        elif kind == "snapshot_request":
            reason = message.snapshot_request.reason
            if not _printable(reason, MAX_SHORT_TEXT):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "snapshot_request.reason: too long")
            self._log("snapshot_requested", host_id=stream.host_id, reason=reason)
            stream.want_snapshot = True
            self._kick(stream)
        elif kind == "usage_report":
            rows = usage_rows(message.usage_report)
            if rows:
                await self.run_db(self.store.record_usage, stream.host_id, rows, now=now)
        elif kind == "refusal":
            self.metrics.agent_refusals.inc()
            refusal = message.refusal
            if refusal.grant_id and not GRANT_ID_PATTERN.fullmatch(refusal.grant_id):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "refusal.grant_id: not 1-64 of [A-Za-z0-9._-]"
                )
            for name, text, limit in (
                ("code", refusal.code, MAX_SHORT_TEXT),
                ("reason", refusal.reason, MAX_SHORT_TEXT),
                ("message", refusal.message, MAX_MESSAGE_TEXT),
            ):
                if not _printable(text, limit):
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"refusal.{name}: printable, at most {limit} characters",
                    )
            self._log(
                "agent_refused",
                host_id=stream.host_id,
                generation=refusal.generation,
                grant_id=refusal.grant_id,
                reason=refusal.reason,
            )
            await self.run_db(
                self.store.record_refusal,
                stream.host_id,
                generation=refusal.generation,
                grant_id=refusal.grant_id,
                code=refusal.code,
                reason=refusal.reason,
                message=refusal.message,
                now=now,
            )
        else:  # a second hello
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "hello: only as the first message")

    # --- delivery -----------------------------------------------------------------------------

    def _kick(self, stream: _Stream) -> None:
        stream.dirty = True
        if stream.delivering is None or stream.delivering.done():
            stream.delivering = asyncio.get_running_loop().create_task(self._deliver(stream))

    async def _deliver(self, stream: _Stream) -> None:
        failures = 0
        try:
            while stream.dirty:
                stream.dirty = False
                try:
                    await self._push(stream)
                    failures = 0
                except StoreError as exc:
                    # The database is busy or down for a moment: try again (the stream
                    # stays; ending it would only add a reconnect to the load).
                    failures += 1
                    if failures > DELIVERY_ATTEMPTS:
                        raise
                    self._log("delivery_retry", host_id=stream.host_id, error=str(exc)[:300])
                    stream.dirty = True
                    await asyncio.sleep(DELIVERY_RETRY_DELAY * failures)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream is useless now: end it, the agent reconnects
            self._log("delivery_failed", host_id=stream.host_id, error=repr(exc)[:300])
            if stream.task is not None:
                stream.task.cancel()

    async def _push(self, stream: _Stream) -> None:
        host_id = stream.host_id
        resuming, stream.resuming = stream.resuming, False
        if stream.want_snapshot or (resuming and stream.sent_generation == 0):
            # Asked for, or an agent that holds nothing from this broker: the whole set
            # in one signature (and anything it holds from elsewhere goes).
            reason = "requested" if stream.want_snapshot else "initial"
            stream.want_snapshot = False
            await self._send_snapshot(stream, reason)
            return
        changes = await self.run_read(self.store.changes_since, host_id, stream.sent_generation)
        if changes is None or (resuming and not await self.run_read(self._all_active, changes)):
            await self._send_snapshot(stream, "resync")
            return
        if resuming and not changes:
            host = await self.run_read(self.store.get_host, host_id)
            if host is not None and host.generation < stream.sent_generation:
                # The agent holds a generation this broker never reached (its database
                # was reset): the snapshot is refused by the agent and logged there.
                await self._send_snapshot(stream, "resync")
            return
        for change in changes:
            if change.generation <= stream.sent_generation:
                continue
            await stream.context.write(change_message(change))
            stream.sent_generation = change.generation
            self.metrics.changes_sent.labels(kind=change.kind.value).inc()
            stream.timer.sent(change.generation, change.created_at)
            self._spawn(
                self.run_db(
                    self.store.record_delivery,
                    host_id,
                    generation=change.generation,
                    kind=change.kind.value,
                    now=self._clock(),
                ),
                "deliver",
            )

    def _all_active(self, changes: list[Change]) -> bool:
        """On resume, are the grants the gap would re-send still active? (Else a
        snapshot is cheaper than sending a grant the agent then refuses as expired.)"""
        now = self._clock()
        for change in changes:
            if change.kind is ChangeKind.GRANT:
                grant = self.store.get_grant(change.grant_id)
                if grant is None or grant.state_at(now) is not GrantState.ACTIVE:
                    return False
        return True

    def _build_snapshot(self, host_id: str, trusted: tuple[str, ...]) -> tuple[int, bytes]:
        now = self._clock()
        generation, rows = self.store.host_state(host_id, now=now)
        signed = self.keyring.sign_host_state(
            trusted,
            host_id=host_id,
            generation=generation,
            grants=[
                agent_pb2.SignedGrant(grant=r.grant_bytes, signature=r.signature, key_id=r.key_id)
                for r in rows
            ],
            now=now,
        )
        data: bytes = fleet_pb2.ConnectResponse(snapshot=signed).SerializeToString()
        return generation, data

    async def _send_snapshot(self, stream: _Stream, reason: str) -> None:
        generation, data = await self.run_read(
            self._build_snapshot, stream.host_id, stream.trusted_key_ids
        )
        if generation == 0:
            return  # nothing ever changed for this host: a state starts at generation 1
        await stream.context.write(data)
        stream.sent_generation = max(stream.sent_generation, generation)
        self.metrics.snapshots_sent.labels(reason=reason).inc()
        self._spawn(
            self.run_db(
                self.store.record_delivery,
                stream.host_id,
                generation=generation,
                kind="snapshot",
                now=self._clock(),
            ),
            "deliver",
        )
