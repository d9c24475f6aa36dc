"""The fleet client: the agent dials out to the broker and keeps one mTLS stream open
(FleetService.Connect, proto/portagent/v1/fleet.proto; ADR 0007).

It runs on its own threads and only ever calls the engine the way the API does (one
command group per message, bounded waits), so a slow, absent or hostile broker never
blocks enforcement, expiry or the daemon's shutdown:

- one stream at a time, to the [broker] addresses in turn (fleet_sync.Dialer);
- Hello{host id, generation and digest held, version, labels, trusted key ids};
- a snapshot is opened (one signature over the whole set, host, digest: Verifier),
  checked against the generation held (fleet_sync.FleetSync), converged to in one
  kernel transaction (Engine.converge_to), then the generation is stored and acked;
- a change at held + 1 goes through the engine's apply/revoke paths and is acked; a
  gap asks for a snapshot;
- usage of the grants whose figures changed, at most once a second.

Whatever the broker sends, the worst it can do is what a trusted key signed: every
grant is verified by the engine as if it came through the API. Any unexpected
exception ends the stream (logged) and the client reconnects.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import grpc

from portagent.agent import __version__
from portagent.agent.adapters.journal import EventLog, Priority
from portagent.agent.engine import Engine, SignedInput, release_free_memory
from portagent.agent.fleet_sync import (
    STABLE_AFTER,
    Action,
    Decision,
    Dialer,
    FleetSync,
    UsageFigures,
    usage_changes,
    usage_interval,
)
from portagent.agent.model import GrantState
from portagent.agent.settings import BrokerSettings, Settings
from portagent.agent.usage import NO_USAGE, UsageReader
from portagent.v1 import fleet_pb2
from portagent.wire.errors import (
    EnforcementError,
    GrantNotFound,
    GrantNotInWindow,
    InvalidGrant,
    PortagentError,
)
from portagent.wire.hoststate import MAX_FLEET_MESSAGE_BYTES
from portagent.wire.timestamps import seconds_of, timestamp

# A snapshot this large is followed by handing freed memory back to the OS.
LARGE_SNAPSHOT_GRANTS = 1_000

CONNECT_METHOD = "/portagent.v1.FleetService/Connect"
# TCP + TLS must be up within this, or the next address is tried.
CONNECT_TIMEOUT = 10.0
# Client keepalive: gRPC servers by default refuse pings more often than every 5
# minutes on a stream that sends no data (GOAWAY "too_many_pings"); just above that
# still notices a broker host that vanished without a reset.
KEEPALIVE_MS = 330_000
KEEPALIVE_TIMEOUT_MS = 20_000
# Messages waiting to be sent on one stream; usage reports are dropped when full, and a
# stream whose broker does not read its acks for ACK_PUT_TIMEOUT is dropped.
OUTBOX_SIZE = 1024
ACK_PUT_TIMEOUT = 30.0
# An unreachable broker is logged once, then at most this often.
UNREACHABLE_LOG_INTERVAL = 300.0
STOP_JOIN_TIMEOUT = 5.0
MAX_LOGGED_MESSAGE = 512


class _Call(Protocol):
    """The stream call as this module uses it (grpc's Call is not typed)."""

    def cancel(self) -> bool: ...
    def __iter__(self) -> Iterator[fleet_pb2.ConnectResponse]: ...


class StreamBroken(Exception):
    """End this stream and reconnect (logged by the caller)."""


class _Outbox:
    """The agent's messages for one stream. gRPC consumes `messages()` on its own
    thread; close() ends it."""

    _CLOSE = object()

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=OUTBOX_SIZE)
        self._closed = threading.Event()

    def put(self, message: fleet_pb2.ConnectRequest) -> None:
        """Queue a message that must go out (Hello, Ack, Refusal, SnapshotRequest)."""
        if self._closed.is_set():
            raise StreamBroken("the stream is closed")
        try:
            self._queue.put(message, timeout=ACK_PUT_TIMEOUT)
        except queue.Full:
            raise StreamBroken(
                f"the broker read none of {OUTBOX_SIZE} queued messages in {ACK_PUT_TIMEOUT:.0f}s"
            ) from None

    def offer(self, message: fleet_pb2.ConnectRequest) -> bool:
        """Queue a message that may be dropped (usage: the next report supersedes it)."""
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            return False
        return True

    def close(self) -> None:
        self._closed.set()
        # When full, messages() still sees the flag within half a second.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(self._CLOSE)

    def messages(self) -> Iterator[fleet_pb2.ConnectRequest]:
        while not self._closed.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is self._CLOSE:
                return
            assert isinstance(item, fleet_pb2.ConnectRequest)
            yield item


@dataclass
class _Session:
    address: str
    sync: FleetSync
    outbox: _Outbox
    got_message: bool = False


def _refusal(generation: int, error: PortagentError, grant_id: str = "") -> fleet_pb2.Refusal:
    return fleet_pb2.Refusal(
        generation=generation,
        grant_id=grant_id,
        code=error.status.value,
        reason=error.reason,
        message=error.message[:MAX_LOGGED_MESSAGE],
    )


def _signed(grant: object) -> SignedInput:
    return SignedInput(grant.grant, grant.signature, grant.key_id)  # type: ignore[attr-defined]


class FleetClient:
    """One dial-out stream to the broker, on its own thread. start() returns at once
    (a start never waits for the broker); stop() returns within a bounded time."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        events: EventLog,
        usage: UsageReader | None = None,
    ) -> None:
        if settings.broker is None:
            raise ValueError("no [broker] section: nothing to dial")
        self._broker: BrokerSettings = settings.broker
        self._host_id = settings.host_id
        self._engine = engine
        self._events = events
        self._usage = usage
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._call: _Call | None = None
        self._channel: grpc.Channel | None = None
        self._outbox: _Outbox | None = None
        self._thread: threading.Thread | None = None
        self._last_unreachable_log = -UNREACHABLE_LOG_INTERVAL
        self._was_connected = False
        self.connected_address: str | None = None

    @property
    def broker(self) -> BrokerSettings:
        return self._broker

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-client", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_JOIN_TIMEOUT) -> None:
        """End the stream and the thread; waits at most `timeout` (a converge in flight
        is answered by the engine, or failed by its own shutdown)."""
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        dialer = Dialer(self._broker.addresses, self._broker.reconnect_max)
        while not self._stop.is_set():
            address, delay = dialer.next()
            if delay and self._stop.wait(delay):
                break
            started = time.monotonic()
            session: _Session | None = None
            try:
                session = self._open(address)
                if session is not None:
                    self._serve(session)
            except StreamBroken as exc:
                if not self._stop.is_set():
                    self._lost(address, str(exc))
            except grpc.RpcError as exc:
                if not self._stop.is_set():
                    self._lost(address, _rpc_text(exc))
            except Exception as exc:
                # Never let the client take the daemon down: log, reconnect.
                self._events.emit(
                    "error",
                    f"broker {address}: fleet client error ({type(exc).__name__}: "
                    f"{str(exc)[:MAX_LOGGED_MESSAGE]}); reconnecting",
                    Priority.ERR,
                    BROKER=address,
                )
            finally:
                self._close_call()
            if self._stop.is_set():
                break
            lasted = time.monotonic() - started
            if session is not None and (session.got_message or lasted >= STABLE_AFTER):
                dialer.connected()
            dialer.failed()

    # ---- one stream ------------------------------------------------------------------

    def _credentials(self) -> grpc.ChannelCredentials:
        broker = self._broker
        # Read at every connect: a renewed certificate is used without a restart.
        return grpc.ssl_channel_credentials(
            root_certificates=broker.ca_file.read_bytes(),
            private_key=broker.key_file.read_bytes(),
            certificate_chain=broker.cert_file.read_bytes(),
        )

    def _options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", MAX_FLEET_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_FLEET_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.enable_retries", 0),
            ("grpc.primary_user_agent", f"portagentd/{__version__}"),
        ]
        if self._broker.server_name:
            options.append(("grpc.ssl_target_name_override", self._broker.server_name))
        return options

    def _open(self, address: str) -> _Session | None:
        """Connect and send the Hello; None when the broker is not reachable now."""
        try:
            credentials = self._credentials()
        except OSError as exc:
            self._unreachable(address, f"cannot read the [broker] certificates ({exc})")
            return None
        channel = grpc.secure_channel(address, credentials, options=self._options())
        ready = grpc.channel_ready_future(channel)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not self._stop.is_set():
            try:
                ready.result(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                break
            except grpc.FutureTimeoutError:
                if time.monotonic() >= deadline:
                    ready.cancel()
                    channel.close()
                    self._unreachable(address, f"no TLS connection in {CONNECT_TIMEOUT:.0f}s")
                    return None
        else:
            ready.cancel()
            channel.close()
            return None
        generation, digest = self._engine.broker_state()
        session = _Session(address, FleetSync(generation, digest), _Outbox())
        session.outbox.put(
            fleet_pb2.ConnectRequest(
                hello=fleet_pb2.Hello(
                    host_id=self._host_id,
                    generation=generation,
                    digest=digest,
                    agent_version=__version__,
                    labels=dict(self._broker.labels),
                    trusted_key_ids=list(self._engine.trusted_key_ids()),
                )
            )
        )
        connect = channel.stream_stream(
            CONNECT_METHOD,
            request_serializer=fleet_pb2.ConnectRequest.SerializeToString,
            response_deserializer=fleet_pb2.ConnectResponse.FromString,
        )
        call = cast(_Call, connect(session.outbox.messages()))
        with self._lock:
            self._call = call
            self._channel = channel
            self._outbox = session.outbox
        if self._stop.is_set():
            call.cancel()
        self.connected_address = address
        self._was_connected = True
        self._events.emit(
            "broker",
            f"connected to the broker at {address} (holding generation {generation})",
            Priority.NOTICE,
            BROKER=address,
            GENERATION=generation,
        )
        return session

    def _serve(self, session: _Session) -> None:
        with self._lock:
            call = self._call
        assert call is not None
        done = threading.Event()
        reporter = threading.Thread(
            target=self._report_usage, args=(session.outbox, done), name="fleet-usage", daemon=True
        )
        reporter.start()
        try:
            for response in call:
                session.got_message = True
                if self._handle(session, response) >= LARGE_SNAPSHOT_GRANTS:
                    # A 100k-grant snapshot leaves its message (~25 MB), its parse and
                    # the request objects built from it: drop them and hand the freed
                    # heap back now, not when the next message replaces this one.
                    del response
                    release_free_memory()
        finally:
            done.set()
            session.outbox.close()
            reporter.join(timeout=STOP_JOIN_TIMEOUT)
        if not self._stop.is_set():
            raise StreamBroken("the broker ended the stream")

    def _close_call(self) -> None:
        with self._lock:
            call, self._call = self._call, None
            channel, outbox = self._channel, self._outbox
            self._channel = None
            self._outbox = None
        if outbox is not None:
            outbox.close()
        if call is not None:
            call.cancel()
        if channel is not None:
            channel.close()
        self.connected_address = None

    def _unreachable(self, address: str, why: str) -> None:
        now = time.monotonic()
        if self._was_connected or now - self._last_unreachable_log >= UNREACHABLE_LOG_INTERVAL:
            self._last_unreachable_log = now
            self._was_connected = False
            self._events.emit(
                "broker",
                f"broker at {address} unreachable ({why}); enforcing what is held, retrying",
                Priority.WARNING,
                BROKER=address,
            )

    def _lost(self, address: str, why: str) -> None:
        self._events.emit(
            "broker",
            f"lost the stream to the broker at {address} ({why[:MAX_LOGGED_MESSAGE]}); "
            "enforcing what is held, reconnecting",
            Priority.WARNING,
            BROKER=address,
        )

    # ---- messages --------------------------------------------------------------------

    def _handle(self, session: _Session, response: fleet_pb2.ConnectResponse) -> int:
        """Act on one message; returns how many grants a snapshot carried (else 0)."""
        kind = response.WhichOneof("message")
        if kind == "snapshot":
            return self._on_snapshot(session, response.snapshot)
        if kind == "change":
            self._on_change(session, response.change)
        else:
            self._events.emit(
                "broker",
                f"broker at {session.address} sent a message of no known kind; ignored",
                Priority.WARNING,
                BROKER=session.address,
            )
        return 0

    def _on_snapshot(self, session: _Session, signed: fleet_pb2.SignedHostState) -> int:
        """Converge to a snapshot; returns how many grants it carried (0 if unopened)."""
        try:
            state = self._engine.open_host_state(signed)
        except PortagentError as exc:
            # Unverified: named by digest and size, never parsed.
            self._refuse(
                session,
                0,
                exc,
                KEY_ID=signed.key_id[:128],
                PAYLOAD_SHA256=hashlib.sha256(signed.state).hexdigest(),
                PAYLOAD_BYTES=len(signed.state),
            )
            return 0
        generation = state.generation
        # Each read of a bytes field builds a new bytes object: read every grant once.
        signed_grants = [_signed(g) for g in state.grants]
        payloads = [g.payload for g in signed_grants]
        decision = session.sync.on_snapshot(
            generation, state.digest, lambda: not self._engine.holds_all(payloads)
        )
        if decision.action is Action.REFUSE:
            self._refuse_decision(session, generation, decision)
            return len(payloads)
        try:
            result = self._engine.converge_to(
                signed_grants, issue_time=seconds_of(state.issue_time)
            )
        except EnforcementError as exc:  # shutting down
            raise StreamBroken(f"snapshot {generation} not enforced: {exc.message}") from None
        refused = 0
        for outcome in result.applied:
            if isinstance(outcome, EnforcementError):
                # The batch itself failed (kernel, disk, shutdown): nothing to ack.
                raise StreamBroken(f"snapshot {generation} not enforced: {outcome.message}")
            if isinstance(outcome, PortagentError):
                refused += 1
                grant_id = str(outcome.verified_fields.get("GRANT_ID", ""))
                session.outbox.put(
                    fleet_pb2.ConnectRequest(refusal=_refusal(generation, outcome, grant_id))
                )
        revoked = revoked_failed = 0
        for grant_id, outcome in result.revoked:
            if isinstance(outcome, EnforcementError):
                raise StreamBroken(f"snapshot {generation} not enforced: {outcome.message}")
            if isinstance(outcome, GrantNotFound):
                continue  # gone meanwhile (expired): nothing left to revoke
            if isinstance(outcome, PortagentError):
                revoked_failed += 1
                session.outbox.put(
                    fleet_pb2.ConnectRequest(refusal=_refusal(generation, outcome, grant_id))
                )
            else:
                revoked += 1
        # Every grant of the snapshot active and nothing else left active: the enforced
        # set is the snapshot's, whose digest was checked when it was opened (hashing
        # 100k grants again would delay the ack).
        exact = (
            revoked_failed == 0
            and all(
                not isinstance(r, PortagentError) and r.state is GrantState.ACTIVE
                for r in result.applied
            )
            and self._engine.active_count() == len(result.applied)
        )
        self._enforced(
            session, generation, snapshot=signed, digest=state.digest if exact else None
        )
        self._events.emit(
            "converge",
            f"converged to broker generation {generation}: {len(payloads)} grants in the "
            f"snapshot, {refused} refused, {revoked} revoked as not in it",
            Priority.NOTICE,
            BROKER=session.address,
            GENERATION=generation,
            GRANTS=len(payloads),
            REFUSED=refused,
            REVOKED=revoked,
        )
        return len(payloads)

    def _on_change(self, session: _Session, change: fleet_pb2.Change) -> None:
        generation = change.generation
        decision = session.sync.on_change(generation)
        if decision.action is Action.IGNORE:
            return
        if decision.action is Action.REQUEST_SNAPSHOT:
            self._events.emit(
                "broker",
                f"{decision.message}; asking the broker for a snapshot",
                Priority.NOTICE,
                BROKER=session.address,
                GENERATION=generation,
                HELD_GENERATION=session.sync.generation,
                REASON_CODE=decision.reason,
            )
            session.outbox.put(
                fleet_pb2.ConnectRequest(
                    snapshot_request=fleet_pb2.SnapshotRequest(reason=decision.reason)
                )
            )
            return
        kind = change.WhichOneof("change")
        try:
            if kind == "grant":
                self._engine.apply_grant(_signed(change.grant))
            elif kind == "revocation":
                revocation = change.revocation
                self._engine.revoke_grant(
                    SignedInput(revocation.revocation, revocation.signature, revocation.key_id)
                )
            else:
                raise InvalidGrant(
                    f"change {generation}: carries neither a grant nor a revocation",
                    reason="INVALID_CHANGE",
                )
        except EnforcementError as exc:
            raise StreamBroken(f"change {generation} not enforced: {exc.message}") from None
        except PortagentError as exc:
            # Reported and acknowledged: asking for a snapshot would be refused again, in
            # a loop (ADR 0007). The engine logged the refusal.
            grant_id = str(exc.verified_fields.get("GRANT_ID", ""))
            session.outbox.put(
                fleet_pb2.ConnectRequest(refusal=_refusal(generation, exc, grant_id))
            )
        self._enforced(session, generation, snapshot=None)

    def _enforced(
        self,
        session: _Session,
        generation: int,
        *,
        snapshot: fleet_pb2.SignedHostState | None,
        digest: bytes | None = None,
    ) -> None:
        if digest is None:
            digest = self._engine.enforced_digest()
        session.sync.enforced(generation, digest, snapshot=snapshot is not None)
        # Acknowledged first: the kernel holds it already, and the record may lag what is
        # enforced (a restart before it is written asks for the generation again).
        session.outbox.put(fleet_pb2.ConnectRequest(ack=fleet_pb2.Ack(generation=generation)))
        try:
            self._engine.set_broker_state(generation, digest, snapshot=snapshot)
        except Exception as exc:
            # Enforced but not recorded: a restart asks for it again (idempotent).
            self._events.emit(
                "error",
                f"could not record broker generation {generation} ({exc})",
                Priority.ERR,
            )

    def _refuse_decision(self, session: _Session, generation: int, decision: Decision) -> None:
        error = GrantNotInWindow(decision.message, reason=decision.reason)
        self._refuse(session, generation, error, HELD_GENERATION=session.sync.generation)

    def _refuse(
        self, session: _Session, generation: int, error: PortagentError, **fields: object
    ) -> None:
        self._events.emit(
            "refuse",
            f"broker snapshot refused: {error.message[:MAX_LOGGED_MESSAGE]}",
            Priority.WARNING,
            REASON_CODE=error.reason,
            BROKER=session.address,
            GENERATION=generation or None,
            **fields,
        )
        session.outbox.put(fleet_pb2.ConnectRequest(refusal=_refusal(generation, error)))

    # ---- usage -----------------------------------------------------------------------

    def _report_usage(self, outbox: _Outbox, done: threading.Event) -> None:
        """Every second (slower when reading the table is slow): the grants whose
        connections/packets/bytes changed since the last report."""
        sent: dict[str, UsageFigures] = {}
        wait = usage_interval(0.0)
        failed_before = False
        while not done.wait(wait):
            if self._usage is None:
                return
            try:
                records = [r for r in self._engine.list_grants() if r.state is GrantState.ACTIVE]
                if not records:
                    sent.clear()
                    continue
                started = time.monotonic()
                figures = self._usage.usage([r.handle for r in records])
                wait = usage_interval(time.monotonic() - started)
            except Exception as exc:
                if not failed_before:
                    self._events.emit(
                        "error", f"usage for the broker unavailable: {exc}", Priority.WARNING
                    )
                failed_before = True
                continue
            current = {}
            for record in records:
                usage = figures.get(record.handle)
                grant_id = record.grant.grant_id
                # An idle grant never reported has nothing to report (usage_changes
                # would skip it): no figures object for each of 100k idle grants.
                if usage is None or (usage is NO_USAGE and grant_id not in sent):
                    continue
                current[grant_id] = UsageFigures(
                    usage.connections, usage.packets, usage.bytes, usage.last_seen
                )
            changed = usage_changes(sent, current)
            sent = {k: v for k, v in sent.items() if k in current}
            if not changed:
                continue
            report = fleet_pb2.UsageReport(report_time=timestamp(time.time()))
            for grant_id, f in sorted(changed.items()):
                entry = report.grants.add(
                    grant_id=grant_id,
                    connections=min(f.connections, 2**32 - 1),
                    packets=f.packets,
                    bytes=f.bytes,
                )
                if f.last_seen:
                    entry.last_seen_time.CopyFrom(timestamp(f.last_seen))
            if outbox.offer(fleet_pb2.ConnectRequest(usage_report=report)):
                sent.update(changed)


def _rpc_text(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else ""
    name = code.name if code is not None else "UNKNOWN"
    return f"{name}: {details or ''}"[:MAX_LOGGED_MESSAGE]
