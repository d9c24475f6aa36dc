"""The engine: owns desired state, the kernel table and the store, one writer at a time.

API threads (gRPC, admin socket) submit commands and wait on a future. Whoever holds
the writer lock (the engine thread, or an API thread when the engine is idle: see
writer.py) drains every pending command and then decides and does, in that order:

- decide (pure): staging.stage() verifies each request and applies the agent's rules
  (revoked ids, idempotency, the store epoch) into Decisions;
- do (thin, here): write the store rows in one transaction, apply one kernel batch,
  COMMIT, then update the table and answer. A refused or failed command changes
  nothing (ADR 0006: a failed COMMIT takes the kernel change back).

The same loop expires grants (expiry.plan_expiry decides, _expire does), pays store
writes the disk refused earlier, repairs tampering and re-asserts the table on a slow
timer (level-triggered). Every grant follows one state machine (lifecycle.py); what
we believe the kernel holds is the KernelModel.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

from portagent.agent.adapters.journal import EventLog, Priority
from portagent.agent.connection_log import ConnectionLog, ConnectionSummary
from portagent.agent.events import EventHub, EventKind
from portagent.agent.expiry import ExpiryPlan, plan_expiry
from portagent.agent.grant_table import GrantTable, RevokedIds, element_keys, mark_keys
from portagent.agent.kernel_model import KernelModel
from portagent.agent.lifecycle import due_time, state_at
from portagent.agent.model import ElementKey, Flow, Grant, GrantRecord, GrantState
from portagent.agent.plan import MarkKey, Plan, desired_elements, desired_marks, plan_changes
from portagent.agent.render import KernelState, Layout
from portagent.agent.settings import Settings
from portagent.agent.staging import (
    Changed,
    CommandKind,
    Decisions,
    Refused,
    Request,
    RevokeNote,
    SignedInput,
    Unchanged,
    stage,
)
from portagent.agent.store import BadRow, NewRow, Store, StoredGrant, StoreError
from portagent.agent.verify import Verifier, audit_fields
from portagent.agent.writer import Writer
from portagent.v1 import fleet_pb2
from portagent.wire.endpoint import endpoint
from portagent.wire.errors import (
    EnforcementError,
    GrantDenied,
    GrantNotFound,
    PortagentError,
)
from portagent.wire.hoststate import state_digest

__all__ = [
    "CommandKind",
    "ConnectionTable",
    "ConvergeResult",
    "Engine",
    "Firewall",
    "Observers",
    "SignedInput",
]

# Ended grants remembered for late connection events (a dict keeps insertion order).
MAX_ENDED_REMEMBERED = 10_000
# After lost ruleset notifications, re-read the kernel no more often than this.
LOST_EVENTS_RECHECK = 5.0
# Upper bound on the delay from rendering an element to the kernel inserting it.
INSERT_DELAY_BASE = 0.005
INSERT_DELAY_PER_ELEMENT = 20e-6
# A batch changing more grants than this writes their records after answering.
LOG_INLINE_MAX = 256
# After a batch this large, hand freed heap back to the OS (RSS, not correctness).
TRIM_AFTER_BATCH = 1_000
# A commit that ends this much later than the time its timeouts were computed from
# (a stalled process, a slow kernel) may leave elements that outlive their grants by
# that much: they are re-asserted with correct timeouts at once, and deleted
# explicitly at expiry. Below it, the overshoot is the documented bound.
LATE_COMMIT_TOLERANCE = 0.02
# The state file failing (disk full, read-only) is logged at most this often.
STORE_ERROR_LOG_INTERVAL = 60.0
# What a refusal record keeps of values the client chose.
MAX_LOGGED_VALUE = 128
MAX_LOGGED_MESSAGE = 1024


_HUB_KINDS = {
    "apply": EventKind.GRANT_APPLIED,
    "expire": EventKind.GRANT_EXPIRED,
    "revoke": EventKind.GRANT_REVOKED,
}


# Batches of at least this many commands run with the cyclic collector paused.
GC_PAUSE_BATCH = 10_000


# mallopt's M_MMAP_THRESHOLD, and the value glibc starts with (128 KiB).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def pin_mmap_threshold() -> bool:
    """Keep glibc serving every allocation of 128 KiB or more by its own mmap, returned
    to the OS when freed. By default glibc raises that threshold to the largest block
    freed (up to 32 MiB): after one 20 MB snapshot message, the next such buffers come
    from heap arenas where a long-lived neighbour keeps their pages (measured: 270 ->
    250 MB settled at 100k grants; 91 -> 83 MB at 10k). False where it is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Return freed heap to the OS after a large batch: glibc keeps it otherwise, and
    a 100k-grant request leaves hundreds of MB of freed request objects behind. What
    survives is frozen out of the cyclic collector: at 100k grants each full collection
    walks a million objects (~0.5 s) that are freed by reference counting anyway."""
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ConnectionTable(Protocol):
    """Conntrack: which grant handles (ct marks) have live connections, and cutting them."""

    def count_by_mark(self) -> dict[int, int]: ...
    def flush_mark(self, mark: int, *, count: bool = True) -> int: ...


class Firewall(Protocol):
    """The kernel side: applies one plan atomically, or raises and changes nothing."""

    def apply_plan(self, plan: Plan, now: float, layout: Layout | None) -> None: ...
    def read_state(self, now: float, *, expected: int = 0) -> KernelState: ...


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Observers:
    """The watchers that feed the engine events through its methods (so they start
    after it exists), as the engine needs to know them at construction."""

    # The ruleset watcher reports foreign changes: the periodic timer then only
    # re-asserts the structure instead of listing the whole table.
    tamper_watch_active: bool = False
    # True while a conntrack event listener feeds on_connection_event without having
    # lost events, so the grants that ever had a connection are known.
    connection_events_complete: Callable[[], bool] = _never


@dataclass(frozen=True)
class ConvergeResult:
    """What converging to a broker snapshot did: one result per grant of the set (in
    order), and the grants revoked because the set no longer holds them."""

    applied: list[GrantRecord | PortagentError]
    revoked: list[tuple[str, GrantRecord | PortagentError]]


def default_verifier(settings: Settings) -> Verifier:
    return Verifier(settings.host_id, settings.trusted_keys, settings.policy)


class _Latch:
    """Counts the answers a caller waits for: one for a single command, one per grant
    for a snapshot's group (one event for 100k answers instead of 100k futures)."""

    __slots__ = ("_event", "_left", "_lock", "shared")

    def __init__(self, count: int = 1) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._left = count
        # A group's latch is counted down once per batch (_Settled), not once per answer.
        self.shared = count > 1
        if count <= 0:
            self._event.set()

    def count_down(self, count: int = 1) -> None:
        with self._lock:
            self._left -= count
            if self._left <= 0:
                self._event.set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


class _Answer:
    """What one command answers: a record (None: a revocation of an unknown id) or an
    error, set once by the writer; `result()` waits for the command's latch."""

    __slots__ = ("_done", "_error", "_latch", "_value")

    def __init__(self, latch: _Latch | None = None) -> None:
        self._latch = latch or _Latch()
        self._done = False
        self._value: GrantRecord | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done

    def set_result(self, value: GrantRecord | None) -> None:
        if self.settle(value, None):
            self._latch.count_down()

    def set_exception(self, error: BaseException) -> None:
        if self.settle(None, error):
            self._latch.count_down()

    @property
    def latch(self) -> _Latch:
        return self._latch

    def settle(self, value: GrantRecord | None, error: BaseException | None) -> bool:
        """Set the answer without counting the latch down (the caller does); False when
        it was already set."""
        if self._done:
            return False
        self._value, self._error, self._done = value, error, True
        return True

    def result(self, timeout: float) -> GrantRecord | None:
        if not self._done:
            self._latch.wait(timeout)
        if not self._done:
            raise TimeoutError(f"no answer in {timeout:.0f}s")
        if self._error is not None:
            raise self._error
        return self._value


class _Settled:
    """Answers of one batch: a caller waiting alone is released at once, a group's
    latch once at the end (`release`) — 100k answers of a snapshot cost one lock and
    one wake-up instead of 100k."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[_Latch, int] = {}

    def result(self, answer: _Answer, value: GrantRecord | None) -> None:
        if answer.settle(value, None):
            self._count(answer.latch)

    def exception(self, answer: _Answer, error: BaseException) -> None:
        if answer.settle(None, error):
            self._count(answer.latch)

    def _count(self, latch: _Latch) -> None:
        if latch.shared:
            self._counts[latch] = self._counts.get(latch, 0) + 1
        else:
            latch.count_down()

    def release(self) -> None:
        for latch, count in self._counts.items():
            latch.count_down(count)
        self._counts.clear()


@dataclass(frozen=True, slots=True)
class _Command:
    request: Request
    future: _Answer = field(default_factory=_Answer)

    @property
    def kind(self) -> CommandKind:
        return self.request.kind


class _OwnCommits:
    """Ruleset generations we committed, each expected back once as a NEWGEN (counted
    on the writer, taken on the ruleset watcher's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = 0

    def started(self) -> None:
        with self._lock:
            self._pending += 1

    def refused(self) -> None:
        with self._lock:
            self._pending -= 1  # a refused batch commits nothing

    def take(self) -> bool:
        """True if this NEWGEN is one of ours."""
        with self._lock:
            if self._pending > 0:
                self._pending -= 1
                return True
            return False

    def reset(self) -> None:
        with self._lock:
            self._pending = 0


class _SeenConnections:
    """(first, last) time a connection of each grant handle was seen: written by the
    conntrack events thread, read by the writer and the usage reader."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[float, float]] = {}

    def saw(self, handle: int, now: float) -> None:
        with self._lock:
            first, _ = self._seen.get(handle, (now, now))
            self._seen[handle] = (first, now)

    def get(self, handle: int) -> tuple[float, float] | None:
        with self._lock:
            return self._seen.get(handle)

    def only_seen(self, handles: list[int]) -> list[int]:
        with self._lock:
            return [h for h in handles if h in self._seen]

    def forget(self, handles: list[int]) -> None:
        with self._lock:
            for handle in handles:
                self._seen.pop(handle, None)


@dataclass
class _StoreDebt:
    """Store writes expiry could not make (disk full, read-only), retried every tick
    and at the start of the next commit: expiry and repair never wait for the disk."""

    delete: set[str] = field(default_factory=set)
    expired: set[str] = field(default_factory=set)
    forget_revoked: bool = False

    def __bool__(self) -> bool:
        return bool(self.delete or self.expired or self.forget_revoked)

    def owe(self, plan: ExpiryPlan) -> None:
        for record in plan.forgotten:
            self.expired.discard(record.grant.grant_id)
            self.delete.add(record.grant.grant_id)
        self.expired.update(r.grant.grant_id for r in plan.kept)
        self.forget_revoked = self.forget_revoked or bool(plan.forgotten_revoked_ids)

    def write(self, store: Store, now: float) -> None:
        """Inside a store transaction."""
        if self.delete:
            store.delete(sorted(self.delete))
        if self.expired:
            store.mark_expired(sorted(self.expired))
        if self.forget_revoked:
            store.forget_revoked_before(now)

    def clear(self) -> None:
        self.delete.clear()
        self.expired.clear()
        self.forget_revoked = False


class Engine:
    def __init__(
        self,
        settings: Settings,
        firewall: Firewall,
        store: Store,
        events: EventLog | None = None,
        *,
        clock: Callable[[], float] = time.time,
        verifier_for: Callable[[Settings], Verifier] = default_verifier,
        connections: ConnectionTable | None = None,
        hub: EventHub | None = None,
        watchdog: Callable[[], None] | None = None,
        observers: Observers | None = None,
    ) -> None:
        """The firewall and the store have no default on purpose: the daemon opens the
        store before it touches the kernel, and a default nftables firewall would let a
        test that forgot one change the host's ruleset. `events` defaults to the
        journal, `connections` to none (no conntrack: nothing to cut), `verifier_for`
        builds the verifier from settings (again on every reload)."""
        self._settings = settings
        self._verifier_for = verifier_for
        self._verifier = verifier_for(settings)
        self._firewall = firewall
        self._store = store
        self._events = events if events is not None else EventLog()
        self._clock = clock
        self._connections = connections
        self._observers = observers or Observers()
        self.hub = hub or EventHub(clock=clock)
        self._writer: Writer[_Command] = Writer(
            self._process_commands, self._tick, self._sleep_for, watchdog
        )
        self._full_reconcile = threading.Event()
        # One thread, so records keep their order: large batches log after answering.
        self._audit = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        self._lock = threading.Lock()  # guards _table and _ended for readers elsewhere
        self._table = GrantTable()
        self._revoked = RevokedIds()
        self._kernel = KernelModel()
        self._seen = _SeenConnections()
        self._connection_log = ConnectionLog()
        self._ended: dict[int, GrantRecord] = {}
        self._own_commits = _OwnCommits()
        self._debt = _StoreDebt()
        self._last_store_error_log = -STORE_ERROR_LOG_INTERVAL
        self._store_errors_unlogged = 0
        self._last_lost_check = 0.0
        self._lost_pending = False
        self._next_full = 0.0
        self._reasserting = False
        # Grants issued before this time may have been revoked in a lost state.
        self._epoch = 0.0
        self.last_reconcile: float = 0.0
        # For the metrics (read from the scrape thread; written by the one writer).
        self.reconcile_runs: dict[str, int] = {"full": 0, "structure": 0}
        self.repairs = 0  # full reconciles that found the kernel not as planned
        self.store_errors = 0  # state-file writes that failed

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Load the store and converge the kernel once (synchronously), then run the loop.

        The kernel is listed on a thread while the store loads and its rows are parsed:
        a 100k dump is mostly kernel time (the GIL is free), so the two overlap. Only
        reading: nothing is written to the kernel before the whole store has loaded."""
        self._epoch = self._store.epoch
        listed: list[tuple[float, KernelState] | BaseException] = []

        def read() -> None:
            now = self._clock()
            try:
                listed.append((now, self._firewall.read_state(now)))
            except BaseException as exc:  # handed to the starting thread
                listed.append(exc)

        # A 100k start allocates millions of objects and frees almost none: the cyclic
        # collector would walk the growing heap again and again (half the start's CPU).
        # Reference counting still frees everything meanwhile.
        collecting = gc.isenabled()
        gc.disable()
        try:
            reader = threading.Thread(target=read, name="kernel-listing", daemon=True)
            reader.start()
            try:
                self._load_grants()
                self._revoked = RevokedIds(self._store.revoked_ids())
            finally:
                # Never return (or fail) while the listing still uses the firewall's socket.
                reader.join()
            (result,) = listed
            if isinstance(result, BaseException):
                raise result
            self._reconcile_full(result)
        finally:
            if collecting:
                if len(self._table) >= 10_000:
                    # What the load built lives as long as the engine: moved out of the
                    # collector's sight, else the first collection after gc.enable()
                    # walks all of it (~1M objects, 0.2 s at 100k, before READY).
                    # Small tables (tests) are left alone.
                    gc.freeze()
                gc.enable()
        self._next_full = self._clock() + self._settings.reconcile_interval
        self._writer.start()

    def stop(self) -> None:
        """Stop the loop. Kernel elements stay: they expire on their own (fail-safe)."""
        for command in self._writer.stop():
            command.future.set_exception(
                EnforcementError("agent is shutting down", reason="SHUTTING_DOWN")
            )
        # Records of large batches still being written are not lost on a clean stop.
        self._audit.shutdown(wait=True)

    def update_settings(self, settings: Settings) -> None:
        """Reload: new trust and policy for new grants; active grants stay as they are."""
        with self._lock:
            self._settings = settings
            self._verifier = self._verifier_for(settings)
        self._kernel.layout_dirty = True
        self.request_full_reconcile()

    def _load_grants(self) -> None:
        """Every stored row is verified again (a trusted signature over its bytes,
        canonical parse, host): the file is not trusted. The signature is the row's own,
        or the stored broker snapshot's when that snapshot verifies and carries exactly
        these bytes (one check for 100k rows). A row that fails is quarantined and never
        enforced; one bad row never stops the agent."""
        now = self._clock()
        covered = self._stored_snapshot_grants()
        bad: list[tuple[str, bytes, bytes, str, str]] = []
        # Bound once: the loop runs 100k times at every start.
        parse_covered = self._verifier.parse_covered_grant
        by_handle, put, due = self._table.by_handle, self._table.put, self._due
        states = {state.value: state for state in GrantState}
        for row in self._store.load():
            if isinstance(row, BadRow):
                bad.append((row.grant_id, row.grant_bytes, row.signature, row.key_id, row.problem))
                continue
            try:
                if row.grant_bytes in covered:
                    grant = parse_covered(row.grant_bytes, row.key_id)
                else:
                    grant = self._verify_stored(row)
                if grant.grant_id != row.grant_id:
                    raise EnforcementError(
                        f"grant_id: the row says {row.grant_id[:MAX_LOGGED_VALUE]!r}, the signed "
                        f"grant {grant.grant_id!r}",
                        reason="STORED_ID_MISMATCH",
                    )
                if row.handle in by_handle:
                    raise EnforcementError(
                        f"handle {row.handle} is used twice", reason="STORED_HANDLE_REUSED"
                    )
            except PortagentError as exc:
                bad.append(
                    (
                        row.grant_id,
                        row.grant_bytes,
                        row.signature,
                        row.key_id,
                        f"{exc.reason}: {exc.message}",
                    )
                )
                continue
            record = GrantRecord(
                grant=grant,
                handle=row.handle,
                grant_bytes=row.grant_bytes,
                signature=b"",  # stays on disk: memory holds only what is served
                state=states[row.state],  # one of them: the store checked
                apply_time=row.apply_time,
                revoke_time=row.revoke_time,
            )
            put(record, due(record))
        if bad:
            self._quarantine(bad, now)

    def _stored_snapshot_grants(self) -> frozenset[bytes]:
        """The grant bytes of the stored broker snapshot, if it still verifies (trusted key
        now, this host, digest); else none, and every row is checked on its own."""
        stored = self._store.broker_snapshot()
        if stored is None:
            return frozenset()
        state_bytes, signature, key_id = stored
        signed = fleet_pb2.SignedHostState(state=state_bytes, signature=signature, key_id=key_id)
        try:
            state = self._verifier.open_host_state(signed)
        except PortagentError as exc:
            self._events.emit(
                "error",
                f"the stored broker snapshot does not verify ({exc.message[:MAX_LOGGED_MESSAGE]}); "
                "every stored grant is checked on its own signature",
                Priority.WARNING,
                REASON_CODE=exc.reason,
                STATE_FILE=str(self._store.path),
            )
            return frozenset()
        return frozenset(g.grant for g in state.grants)

    def _quarantine(self, bad: list[tuple[str, bytes, bytes, str, str]], now: float) -> None:
        for grant_id, _, _, _, problem in bad:
            self._events.emit(
                "quarantine",
                f"stored grant {grant_id[:MAX_LOGGED_VALUE]!r} does not verify; not enforced, "
                f"moved to quarantine: {problem[:MAX_LOGGED_MESSAGE]}",
                Priority.ALERT,
                GRANT_ID=grant_id[:MAX_LOGGED_VALUE],
                REASON_CODE=problem.partition(":")[0][:MAX_LOGGED_VALUE],
                STATE_FILE=str(self._store.path),
            )
        try:
            with self._store.transaction():
                self._store.quarantine(bad, now)
        except StoreError as exc:
            self.store_errors += 1
            self._events.emit(
                "error",
                f"could not move {len(bad)} bad rows to quarantine ({exc}); they stay "
                "unenforced and are checked again at the next start",
                Priority.ERR,
            )

    def _verify_stored(self, row: StoredGrant) -> Grant:
        verify = self._verifier.verify_stored_grant
        if row.key_id:
            return verify(row.grant_bytes, row.signature, row.key_id)
        # Rows written by 0.1.0 name no key: one of the trusted keys must have signed.
        error: PortagentError = GrantDenied(
            "key_id: no trusted key signed this stored grant", reason="UNKNOWN_KEY"
        )
        for key in self._settings.trusted_keys:
            try:
                return verify(row.grant_bytes, row.signature, key.key_id)
            except PortagentError as exc:
                error = exc
        raise error

    # ---- API (any thread) ------------------------------------------------------------

    def apply_grant(self, signed: SignedInput, timeout: float = 30.0) -> GrantRecord:
        self._refuse_if_stopping()
        record = self._submit(self._signature_checked(CommandKind.APPLY, signed), timeout)
        assert record is not None
        return record

    def _signature_checked(self, kind: CommandKind, signed: SignedInput) -> Request:
        """An APPLY or REVOKE whose signature is checked here, on the caller's thread,
        before it is queued: the Ed25519 check releases the GIL, so concurrent callers
        check in parallel and the writer, which every request waits for, does not hand
        the GIL away (and wait to get it back) once per request. The writer parses and
        checks the rest; all of it again if a reload replaced the verifier meanwhile."""
        with self._lock:
            verifier = self._verifier
        check = (
            verifier.check_grant_signature
            if kind is CommandKind.APPLY
            else verifier.check_revocation_signature
        )
        error: PortagentError | None = None
        try:
            check(signed.payload, signed.signature, signed.key_id)
        except PortagentError as exc:
            error = exc  # refused by the writer, with its record, in order
        except Exception:
            return Request(kind, signed=signed)  # a bug: the writer checks and answers
        return Request(kind, signed=signed, signature_checked_by=verifier, signature_error=error)

    def apply_grants(
        self, batch: list[SignedInput], timeout: float = 300.0
    ) -> list[GrantRecord | PortagentError]:
        """Apply many grants in one kernel transaction; one result (or refusal) per input."""
        self._refuse_if_stopping()
        latch = _Latch(len(batch))
        commands = [
            _Command(self._signature_checked(CommandKind.APPLY, signed), _Answer(latch))
            for signed in batch
        ]
        for command in commands:
            self._writer.put(command)
        self._writer.lead()
        results: list[GrantRecord | PortagentError] = []
        for command in commands:
            try:
                record = command.future.result(timeout=timeout)
            except PortagentError as exc:
                results.append(exc)
                continue
            assert record is not None
            results.append(record)
        return results

    def converge_to(
        self,
        grants: list[SignedInput],
        *,
        issue_time: float,
        actor: str = "broker",
        timeout: float = 300.0,
    ) -> ConvergeResult:
        """Make the enforced set exactly `grants` (a broker snapshot, opened: its one
        signature covers every grant's bytes) in ONE kernel transaction: APPLY each grant
        (canonical bytes, a trusted key id, host, policy, window — not its own signature
        again) and REVOKE_LOCAL by `actor` every active grant not in the set, queued as
        one group so no drain splits them.

        A snapshot issued (`issue_time`, the broker's clock, within the clock skew)
        after this state began vouches that its grants are current, so they are not
        refused as GRANT_PREDATES_STATE: that is how an agent whose state was lost
        gets back grants issued before."""
        self._refuse_if_stopping()
        wanted = {signed.payload for signed in grants}
        now = self._clock()
        with self._lock:
            records = list(self._table.by_id.values())
            skew = self._settings.policy.clock_skew
        vouched = issue_time >= self._epoch - skew
        stale = sorted(
            r.grant.grant_id
            for r in records
            if state_at(r, now) is GrantState.ACTIVE and r.grant_bytes not in wanted
        )
        latch = _Latch(len(grants) + len(stale))
        applies = [
            _Command(
                Request(CommandKind.APPLY, signed=signed, vouched=vouched, covered=True),
                _Answer(latch),
            )
            for signed in grants
        ]
        revokes = [
            _Command(
                Request(CommandKind.REVOKE_LOCAL, grant_id=grant_id, actor=actor), _Answer(latch)
            )
            for grant_id in stale
        ]
        self._writer.put_group(applies + revokes)
        self._writer.lead()
        return ConvergeResult(
            [self._result(command, timeout) for command in applies],
            [(c.request.grant_id, self._result(c, timeout)) for c in revokes],
        )

    @staticmethod
    def _result(command: _Command, timeout: float) -> GrantRecord | PortagentError:
        try:
            record = command.future.result(timeout=timeout)
        except PortagentError as exc:
            return exc
        except TimeoutError:
            return EnforcementError(
                f"no answer from the engine in {timeout:.0f}s", reason="ENGINE_TIMEOUT"
            )
        if record is None:  # a revocation of a grant that vanished meanwhile
            return GrantNotFound(f"grant_id: no grant {command.request.grant_id!r} on this host")
        return record

    def open_host_state(self, signed: fleet_pb2.SignedHostState) -> fleet_pb2.HostState:
        """A broker snapshot checked against the keys trusted now (Verifier)."""
        with self._lock:
            verifier = self._verifier
        return verifier.open_host_state(signed)

    def trusted_key_ids(self) -> tuple[str, ...]:
        with self._lock:
            return self._verifier.key_ids

    def enforced_digest(self) -> bytes:
        """state_digest of the active grants: what the Hello and the store call the
        digest of the set this agent enforces."""
        now = self._clock()
        with self._lock:
            records = list(self._table.by_id.values())
        return state_digest(r.grant_bytes for r in records if state_at(r, now) is GrantState.ACTIVE)

    def active_count(self) -> int:
        """How many grants are active now (what enforced_digest covers)."""
        now = self._clock()
        with self._lock:
            records = list(self._table.by_id.values())
        return sum(1 for r in records if state_at(r, now) is GrantState.ACTIVE)

    def holds_all(self, payloads: list[bytes]) -> bool:
        """True when every one of these grants (signed bytes) is one the agent holds, in
        any state."""
        with self._lock:
            known = {r.grant_bytes for r in self._table.by_id.values()}
        return all(p in known for p in payloads)

    def broker_state(self, timeout: float = 30.0) -> tuple[int, bytes]:
        """The broker (generation, digest) recorded in the store."""
        return self._writer.exclusive(self._store.broker_state, timeout)

    def set_broker_state(
        self,
        generation: int,
        digest: bytes,
        timeout: float = 30.0,
        *,
        snapshot: fleet_pb2.SignedHostState | None = None,
    ) -> None:
        """Record the broker generation now enforced, and the snapshot that brought it
        (kept as signed, for the next start). The store is the writer's: this runs under
        the writer lock, after the kernel commit it follows."""

        def record() -> None:
            if snapshot is not None:
                self._store.set_broker_snapshot(snapshot.state, snapshot.signature, snapshot.key_id)
            self._store.set_broker_state(generation, digest)

        self._writer.exclusive(record, timeout)

    def revoke_grant(self, signed: SignedInput, timeout: float = 30.0) -> GrantRecord | None:
        self._refuse_if_stopping()
        return self._submit(self._signature_checked(CommandKind.REVOKE, signed), timeout)

    def revoke_local(self, grant_id: str, actor: str, timeout: float = 30.0) -> GrantRecord:
        request = Request(CommandKind.REVOKE_LOCAL, grant_id=grant_id, actor=actor)
        record = self._submit(request, timeout)
        assert record is not None
        return record

    def get(self, grant_id: str) -> GrantRecord:
        with self._lock:
            record = self._table.get(grant_id)
        if record is None:
            raise GrantNotFound(f"grant_id: no grant {grant_id!r} on this host")
        return self._as_shown(record, self._clock())

    def list_grants(self) -> list[GrantRecord]:
        with self._lock:
            records = list(self._table.by_id.values())
        now = self._clock()
        return sorted((self._as_shown(r, now) for r in records), key=lambda r: r.grant.grant_id)

    def request_full_reconcile(self) -> None:
        self._full_reconcile.set()
        self._writer.wake()

    def on_ruleset_commit(self, pid: int, process: str) -> None:
        """A ruleset generation was committed (NEWGEN). Ours are counted out; any other
        is tampering. The kernel reports the committing *thread* id in the init pid
        namespace, which a daemon in a container cannot compare with its own pids, so
        we count our own commits instead: each one we start is expected back once."""
        if not self._own_commits.take():
            self.on_foreign_change(pid, process)

    def expect_own_commit(self) -> None:
        """One more ruleset generation of ours is on its way (a plan the firewall
        commits in two transactions): not tampering when it arrives."""
        self._own_commits.started()

    def on_foreign_change(self, pid: int, process: str) -> None:
        self._events.emit(
            "tamper",
            f"ruleset changed by {process} (pid {pid}); reconciling",
            Priority.ALERT,
            CHANGED_BY_PID=pid,
            CHANGED_BY=process,
        )
        self._kernel.layout_dirty = True
        self.request_full_reconcile()

    def on_events_lost(self) -> None:
        """Ruleset notifications overflowed (usually our own large batch): verify the
        kernel, at most once every few seconds."""
        self._own_commits.reset()  # lost NEWGENs would skew the count
        now = time.monotonic()
        if now - self._last_lost_check < LOST_EVENTS_RECHECK:
            self._lost_pending = True
            return
        self._last_lost_check = now
        self.request_full_reconcile()

    def grant_counts(self) -> dict[GrantState, int]:
        """How many grants the engine holds in each state (kept counts, no walk)."""
        with self._lock:
            return dict(self._table.counts)

    def grant_states(self, handles: list[int]) -> dict[int, GrantState]:
        """The state of each of these handles that is a grant the engine holds."""
        with self._lock:
            by_handle = self._table.by_handle
            return {h: r.state for h in handles if (r := by_handle.get(h)) is not None}

    def kernel_element_count(self) -> int:
        """How many elements our model of the kernel holds (for sizing a listing)."""
        return len(self._kernel)

    def seen(self, handle: int) -> tuple[float, float] | None:
        """(first, last) time a connection of this grant was seen opening or closing."""
        return self._seen.get(handle)

    @property
    def stopping(self) -> bool:
        return self._writer.stopping

    @property
    def settings(self) -> Settings:
        return self._settings

    @staticmethod
    def _as_shown(record: GrantRecord, now: float) -> GrantRecord:
        state = state_at(record, now)
        return record if state is record.state else replace(record, state=state)

    def _refuse_if_stopping(self) -> None:
        if self._writer.stopping:
            raise EnforcementError("agent is shutting down", reason="SHUTTING_DOWN")

    def _submit(self, request: Request, timeout: float) -> GrantRecord | None:
        self._refuse_if_stopping()
        command = _Command(request)
        self._writer.put(command)
        self._writer.lead()
        return command.future.result(timeout=timeout)

    # ---- the writer's loop -----------------------------------------------------------

    def _tick(self) -> bool:
        """One pass of the loop, under the writer lock; True when a step failed."""
        failed = False
        # Each step on its own: a failing one (a full disk under expiry, say) must not
        # keep the others, repair above all, from running.
        for step in (self._process_queue, self._expire, self._flush_store_debt):
            failed = self._run_step(step) or failed
        if self._lost_pending and time.monotonic() - self._last_lost_check >= LOST_EVENTS_RECHECK:
            self._lost_pending = False
            self._last_lost_check = time.monotonic()
            self._full_reconcile.set()
        if self._full_reconcile.is_set():
            self._full_reconcile.clear()
            failed = self._run_step(self._reconcile_full) or failed
            self._next_full = self._clock() + self._settings.reconcile_interval
        elif self._clock() >= self._next_full:
            failed = self._run_step(self._periodic_reconcile) or failed
            self._next_full = self._clock() + self._settings.reconcile_interval
        self._emit_summaries(self._connection_log.due(self._clock()))
        return self._run_step(self._reassert_late) or failed

    def _run_step(self, step: Callable[[], None]) -> bool:
        """Run one step of the loop; True when it failed (then a full reconcile follows)."""
        try:
            step()
        except Exception as exc:
            self._events.emit("error", f"{step.__name__.strip('_')} failed: {exc}", Priority.ERR)
            self._full_reconcile.set()
            return True
        return False

    def _sleep_for(self) -> float:
        with self._lock:
            due = self._table.next_due()
        wake_at = self._next_full if due is None else min(self._next_full, due)
        wake_at = min(wake_at, self._connection_log.next_due())  # connection summaries
        return wake_at - self._clock()

    def _process_queue(self) -> None:
        self._process_commands(self._writer.drain())

    def _process_commands(self, commands: list[_Command]) -> None:
        if commands:
            self._process(commands)
            if len(commands) >= TRIM_AFTER_BATCH:
                # Off the answer's path, after the batch's records (one audit thread):
                # by then the caller has dropped its request objects too.
                self._after_answer(release_free_memory)
        self._reassert_late()

    def _process(self, commands: list[_Command]) -> None:
        try:
            self._process_batch(commands)
        except Exception as exc:
            # A bug, not a refusal: no caller may be left waiting on its future.
            error = EnforcementError(f"internal error: {exc}", reason="INTERNAL")
            for command in commands:
                if not command.future.done():
                    command.future.set_exception(error)
            raise

    # ---- a batch: decide, then do ----------------------------------------------------

    def _process_batch(self, commands: list[_Command]) -> None:
        settled = _Settled()
        # A large batch allocates millions of objects that live on or die by reference
        # counting; the cyclic collector would walk the growing heap again and again
        # (~15 % of a 100k snapshot). What survives is frozen after the batch
        # (release_free_memory), so re-enabling costs no full walk later.
        paused = len(commands) >= GC_PAUSE_BATCH and gc.isenabled()
        if paused:
            gc.disable()
        try:
            self._decide_and_do(commands, settled)
        finally:
            settled.release()  # also on a bug: _process answers the rest
            if paused:
                gc.enable()

    def _decide_and_do(self, commands: list[_Command], settled: _Settled) -> None:
        now = self._clock()
        policy = self._settings.policy
        decisions = stage(
            [c.request for c in commands],
            now,
            verifier=self._verifier,
            known=self._table.get,
            revoked=self._revoked,
            epoch=self._epoch,
            policy=policy,
        )
        for command, answer in zip(commands, decisions.answers, strict=True):
            if isinstance(answer, Refused):
                self._refused(command, answer.error)
                settled.exception(command.future, answer.error)
        answered = [
            (c, a)
            for c, a in zip(commands, decisions.answers, strict=True)
            if not isinstance(a, Refused)
        ]
        handles: dict[str, int] = {}
        committed: dict[str, GrantRecord] = {}
        if decisions.changes_anything:
            try:
                handles, committed = self._commit(decisions, now)
            except PortagentError as exc:
                for command, _ in answered:
                    self._refused(command, exc)
                    settled.exception(command.future, exc)
                return
        drafts = decisions.drafts
        for command, answer in answered:
            if isinstance(answer, Changed):
                draft = answer.draft
                grant_id = draft.grant.grant_id
                # The grant as the batch left it is the committed record; an earlier
                # request's answer (applied, then revoked in the same batch) is its own.
                record = committed.get(grant_id) if drafts.get(grant_id) is draft else None
                settled.result(command.future, record or draft.record(handles))
            else:
                assert isinstance(answer, Unchanged)
                settled.result(command.future, answer.record)

    def _commit(
        self, decisions: Decisions, now: float
    ) -> tuple[dict[str, int], dict[str, GrantRecord]]:
        """Handles, one kernel batch, then the store rows in one transaction; then the
        table, logs and cuts. Returns the handles the store gave the new grants and the
        committed records by grant id."""
        store = self._store
        handles: dict[str, int] = {}
        changed: list[GrantRecord] = []
        keys_by_handle: dict[int, list[ElementKey]] = {}
        kernel_changed = False
        try:
            if decisions.inserts:
                # Read only: the store's one writer is this thread, so the handles stay
                # free until the transaction below records them.
                handles = dict(
                    zip(
                        decisions.inserts,
                        store.free_handles(len(decisions.inserts)),
                        strict=True,
                    )
                )
            # The signature stays in the store: memory holds only what is served. The
            # bytes are copied here, late: the received ones lie among the request's
            # objects (signatures, key ids, wrappers, requests) that die with the batch,
            # and a survivor on each of their memory pages keeps the pages from going
            # back to the OS (-21 MB at 100k grants, ADR 0009).
            changed = [
                GrantRecord(
                    d.grant,
                    d.handle if d.handle is not None else handles[d.grant.grant_id],
                    bytes(memoryview(d.grant_bytes)),
                    b"",
                    d.state,
                    d.apply_time,
                    d.revoke_time,
                )
                for d in decisions.drafts.values()
            ]
            # The kernel first, then the store (BEGIN .. COMMIT): a port opens without
            # waiting for the disk. If nftables refuses (one atomic batch), nothing
            # changed anywhere; if the store then fails (BEGIN, a row, COMMIT), the
            # kernel change is taken back (_revert_kernel): the kernel ends as committed.
            keys_by_handle = self._converge_records(changed, now)
            kernel_changed = True
            with store.transaction():
                self._debt.write(store, self._clock())
                if decisions.inserts:
                    store.claim_handles(list(handles.values()))
                    store.insert_many(
                        NewRow(
                            d.grant.grant_id,
                            handles[d.grant.grant_id],
                            d.grant_bytes,
                            d.signature,
                            d.grant.key_id,
                            d.grant.expire_time,
                            d.apply_time,
                        )
                        for d in (decisions.drafts[grant_id] for grant_id in decisions.inserts)
                    )
                store.mark_revoked_many([note.grant_id for note in decisions.revokes], now)
                store.remember_revoked_many(decisions.revoked_ids)
            # COMMIT happened on leaving the block; only now is the change real.
        except PortagentError as exc:
            if kernel_changed:  # not the kernel's refusal: something after it failed
                self.store_errors += 1
                self._revert_kernel(changed, exc)
            raise  # the kernel refused the batch: it changed nothing
        except Exception as exc:
            self.store_errors += 1
            if kernel_changed:
                self._revert_kernel(changed, exc)
            raise EnforcementError(f"could not persist the change: {exc}") from exc
        self._debt.clear()
        by_id = {r.grant.grant_id: r for r in changed}
        with self._lock:
            for record in changed:
                self._table.put(record, self._due(record), keys_by_handle.get(record.handle))
            for grant_id, forget_after in decisions.revoked_ids:
                self._revoked.remember(grant_id, forget_after)
        applied = [by_id[grant_id] for grant_id in decisions.inserts]
        revoked = [(by_id[note.grant_id], note) for note in decisions.revokes]
        self._cut_connections([record.handle for record, _ in revoked])
        if len(applied) + len(revoked) > LOG_INLINE_MAX:
            # A snapshot of 100k grants: one record each is the audit trail, and writing
            # them costs seconds; they follow the answer, in order, on their own thread.
            self._after_answer(lambda: self._log_changes(applied, revoked))
        else:
            self._log_changes(applied, revoked)
        return handles, by_id

    def _after_answer(self, work: Callable[[], None]) -> None:
        """Run `work` on the audit thread; inline once stop() shut it down (a batch that
        ends while the engine stops still writes its records)."""
        try:
            self._audit.submit(work)
        except RuntimeError:
            work()

    def _log_changes(
        self, applied: list[GrantRecord], revoked: list[tuple[GrantRecord, RevokeNote]]
    ) -> None:
        for record in applied:
            self._log_grant("apply", "grant applied", Priority.NOTICE, record)
        for record, note in revoked:
            self._log_grant(
                "revoke",
                f"grant revoked by {note.actor}",
                Priority.NOTICE,
                record,
                REVOKE_REASON=note.revocation.reason if note.revocation else None,
                ACTOR=note.actor,
            )
            self._emit_summaries(self._connection_log.end(record.handle, self._clock()))

    def _due(self, record: GrantRecord) -> float:
        policy = self._settings.policy
        return due_time(record, policy.keep_established_max, policy.clock_skew)

    def _revert_kernel(self, changed: list[GrantRecord], cause: BaseException) -> None:
        """The kernel took a change the store then failed to commit: put those keys back
        to what the table (the committed state) wants, at once. If even that fails, a
        full reconcile follows on the engine thread."""
        try:
            self._converge(
                {key for record in changed for key in element_keys(record)},
                {k for record in changed for k in mark_keys(record)},
                self._clock(),
                {},
            )
        except Exception as exc:
            self._events.emit(
                "error",
                f"could not take back an uncommitted change ({exc}); reconciling",
                Priority.ALERT,
            )
            self.request_full_reconcile()
            return
        self._events.emit(
            "error",
            f"store commit failed ({str(cause)[:MAX_LOGGED_MESSAGE]}); kernel change taken back",
            Priority.ERR,
            STATE_FILE=str(self._store.path),
        )

    # ---- expiry: decide, then do -----------------------------------------------------

    def _expire(self) -> None:
        """Grants whose time is up: plan_expiry decides; here we drop them from the
        table, delete what the kernel may still hold of them, cut their connections,
        log them, and record it in the store last. Nothing here waits for the disk: a
        failed store write is owed and retried (_flush_store_debt)."""
        now = self._clock()
        policy = self._settings.policy
        with self._lock:
            due = self._table.pop_due(now)
        plan = plan_expiry(
            due,
            now,
            policy.keep_established_max,
            policy.clock_skew,
            self._revoked.pop_due(now),
        )
        if plan.changes_grants:
            with self._lock:
                for record in plan.forgotten:
                    self._table.remove(record.grant.grant_id)
                    self._remember_ended(record)
                for record in plan.kept:
                    self._table.put(record, self._due(record))
            for record in plan.expired:
                self._log_grant(
                    "expire",
                    "grant expired",
                    Priority.INFO,
                    record,
                    KEEP_ESTABLISHED=record.grant.keep_established,
                )
            # Normally the kernel dropped these elements at their timeouts already and
            # this plans nothing; after a late commit our model says the kernel may
            # still hold them, and they are deleted here, explicitly.
            keys, marks = plan.touched_elements, plan.touched_marks
            self._converge(keys, marks, now, {})
            self._cut_connections(list(plan.cut))
            for record in plan.forgotten:
                self._emit_summaries(self._connection_log.end(record.handle, now))
            self._seen.forget([r.handle for r in plan.forgotten])
            forgotten_keys = {k for r in plan.forgotten for k in element_keys(r)}
            forgotten_marks = {k for r in plan.forgotten for k in mark_keys(r)}
            self._kernel.forget_dropped(forgotten_keys, forgotten_marks, now)
        self._debt.owe(plan)
        with self._lock:
            for record in plan.requeued:  # popped early (a state change moved its time)
                self._table.put(record, self._due(record))
        self._flush_store_debt()

    def _flush_store_debt(self) -> None:
        """Record expiries in the store. Enforcement never waits for this: when the disk
        is full or read-only, the writes stay owed and are retried every tick."""
        if not self._debt:
            return
        try:
            with self._store.transaction():
                self._debt.write(self._store, self._clock())
        except StoreError as exc:
            self.store_errors += 1
            self._store_errors_unlogged += 1
            now = time.monotonic()
            if now - self._last_store_error_log >= STORE_ERROR_LOG_INTERVAL:
                self._last_store_error_log = now
                self._events.emit(
                    "error",
                    f"cannot record expiries in the state file ({exc}); enforcement goes "
                    f"on, retrying ({self._store_errors_unlogged} failed writes)",
                    Priority.ERR,
                    STATE_FILE=str(self._store.path),
                )
                self._store_errors_unlogged = 0
            return
        self._debt.clear()

    def _cut_connections(self, handles: list[int]) -> None:
        """Flush the conntrack entries of these grants. Their packets are already dropped
        (no element matches); this clears the entries so nothing lingers as 'live'."""
        if self._observers.connection_events_complete():
            # A flush walks the whole conntrack table (milliseconds even when empty):
            # only grants that ever had a connection need one. Their packets are
            # dropped either way; the flush only clears what would linger as "live".
            handles = self._seen.only_seen(handles)
        if not handles or self._connections is None:
            return
        try:
            in_use = self._connections.count_by_mark() if len(handles) > 1 else None
            for handle in handles:
                if in_use is None or handle in in_use:
                    self._connections.flush_mark(handle, count=False)
        except PortagentError as exc:
            self._events.emit(
                "error",
                f"could not flush connections: {exc.message}",
                Priority.ERR,
                REASON_CODE=exc.reason,
            )

    # ---- the kernel ------------------------------------------------------------------

    def _reassert_late(self) -> None:
        """Re-add, with timeouts from now, what a late commit may have left to outlive its
        grant. Once: a re-assert that is late again leaves it to explicit expiry."""
        late = self._kernel.take_late()
        if not late:
            return
        self._reasserting = True
        try:
            self._converge(late.elements, late.marks, self._clock(), {})
        finally:
            self._reasserting = False

    def _converge_records(
        self, changed: list[GrantRecord], now: float
    ) -> dict[int, list[ElementKey]]:
        """Plan only the keys and handle-set entries of `changed` grants (new or changed
        state, standing in for what the table holds) against our model of the kernel,
        and apply one batch. Cost follows the size of the change, not the number of
        grants. Returns each changed grant's element keys (by handle), computed once."""
        keys_by_handle = {record.handle: element_keys(record) for record in changed}
        keys: set[ElementKey] = set()
        for record_keys in keys_by_handle.values():
            keys.update(record_keys)
        self._converge(
            keys,
            {k for record in changed for k in mark_keys(record)},
            now,
            {r.handle: r for r in changed},
            keys_by_handle,
        )
        return keys_by_handle

    def _converge(
        self,
        keys: set[ElementKey],
        marks_touched: set[MarkKey],
        now: float,
        overlay: dict[int, GrantRecord],
        overlay_keys: dict[int, list[ElementKey]] | None = None,
    ) -> None:
        """Make these keys and handle-set entries of the kernel what the table (with
        `overlay` standing in for some grants) wants, in one batch."""
        desired = self._table.desired_for(keys, now, overlay, overlay_keys)
        records = [
            record
            for handle in {h for _, h in marks_touched}
            if (record := overlay.get(handle) or self._table.by_handle.get(handle)) is not None
        ]
        keep_max = self._settings.policy.keep_established_max
        marks = {
            k: m for k, m in desired_marks(records, now, keep_max).items() if k in marks_touched
        }
        plan = plan_changes(
            desired,
            self._kernel.elements_for(keys),
            now,
            marks,
            self._kernel.marks_for(marks_touched),
        )
        self._apply(plan, now)

    def _converge_all(self, now: float) -> None:
        """Plan every grant against our whole model of the kernel (full reconcile)."""
        with self._lock:
            records = list(self._table.by_id.values())
        desired = desired_elements(records, now)
        marks = desired_marks(records, now, self._settings.policy.keep_established_max)
        plan = plan_changes(
            desired,
            self._kernel.elements,
            now,
            marks,
            self._kernel.marks,
            tolerance=self._kernel.tolerance,
        )
        if not plan.is_empty:
            self.repairs += 1
        self._apply(plan, now)

    def _apply(self, plan: Plan, now: float) -> None:
        """Send one plan to the kernel and record in the model what it now holds."""
        layout = self._kernel.layout_for(plan, self._settings)
        if plan.is_empty and layout is None:
            return
        self._own_commits.started()
        # A kernel timeout runs from when the kernel inserts the element, not from when
        # we planned: verifying a big batch takes seconds, and rendering, parsing and
        # sending it takes ~10 us per element. Timeouts are computed from a clock read
        # now, pushed ahead by a bound on that delay, so no element outlives its grant
        # (access closes a moment early rather than late).
        changed = len(plan.add) + len(plan.replace) + len(plan.marks_add)
        render_now = (
            max(now, self._clock()) + INSERT_DELAY_BASE + changed * INSERT_DELAY_PER_ELEMENT
        )
        try:
            self._firewall.apply_plan(plan, render_now, layout)
        except BaseException:
            self._own_commits.refused()
            raise
        # A commit later than the tolerance (the process stalled, the kernel was slow)
        # may leave elements up to `late` past their grants: the model says so (so
        # expiry deletes them explicitly), and they are re-asserted with correct
        # timeouts once the table is up to date.
        late = self._clock() - render_now
        self._kernel.committed(
            plan,
            layout,
            late if late > LATE_COMMIT_TOLERANCE else 0.0,
            track=not self._reasserting,
        )

    def _periodic_reconcile(self) -> None:
        """The slow safety-net timer. With tamper detection working, every foreign
        change already triggers a full reconcile, so the timer only re-asserts the
        table's structure (cheap, atomic); without it, it lists the table (expensive
        at 100k elements) and converges everything."""
        if not self._observers.tamper_watch_active:
            self._reconcile_full()
            return
        self._kernel.layout_dirty = True
        self._apply(Plan(), self._clock())
        self.last_reconcile = self._clock()
        self.reconcile_runs["structure"] += 1

    def _reconcile_full(self, listing: tuple[float, KernelState] | None = None) -> None:
        """Read the kernel (or take `listing`: (the time read before it, the listing)),
        then converge with the layout re-asserted."""
        if listing is None:
            now = self._clock()
            expected = max(len(self._kernel), len(self._table))
            state = self._firewall.read_state(now, expected=expected)
        else:
            state = listing[1]
        self._kernel.adopt(state)
        # Our own commits give timeouts up to the insert margin short of their grants
        # (2 s in a 100k batch), the kernel rounds them down to a jiffy (<= 10 ms), and
        # the listing reads them short by up to its own uncertainty: an element that
        # reads short by no more than the sum is what we wrote, and refreshing it would
        # only move the margin (68k of 100k replaced at every restart). Longer than the
        # grant, or shorter by more, is still replaced.
        own_margin = INSERT_DELAY_BASE + INSERT_DELAY_PER_ELEMENT * (
            len(state.elements) + len(state.marks)
        )
        self._kernel.listing_uncertainty = state.uncertainty + own_margin + 0.01
        # Expiries in the listing are absolute: planning uses the time now, after it.
        self._converge_all(self._clock())
        self.last_reconcile = self._clock()
        self.reconcile_runs["full"] += 1

    # ---- connections -----------------------------------------------------------------

    def on_connection_event(self, kind: str, flow: Flow) -> None:
        """A conntrack NEW/DESTROY event (from the conntrack events thread)."""
        with self._lock:
            record = self._table.by_handle.get(flow.mark)
            ended = record is None
            if ended:
                record = self._ended.get(flow.mark)
        if record is None:
            return  # not one of ours
        self._seen.saw(flow.mark, self._clock())
        grant = record.grant
        opened = kind == "new"
        self.hub.publish(
            EventKind.CONNECTION_OPENED if opened else EventKind.CONNECTION_CLOSED,
            grant_id=grant.grant_id,
            subject=grant.subject,
            flow=flow,
        )
        mode = self._settings.log_connections
        if mode == "off":
            return
        individual = True
        summaries: list[ConnectionSummary] = []
        if mode == "summary":
            individual, summaries = self._connection_log.note(
                record, opened, flow, self._clock(), ended=ended
            )
        if individual:
            self._log_connection(record, opened, flow)
        self._emit_summaries(summaries)

    def _log_connection(self, record: GrantRecord, opened: bool, flow: Flow) -> None:
        grant = record.grant
        direction = "opened" if opened else "closed"
        peer, local = endpoint(flow.src, flow.sport), endpoint(flow.dst, flow.dport)
        counters: dict[str, object] = {}
        if not opened:
            counters = {
                "PACKETS_IN": flow.packets_orig,
                "BYTES_IN": flow.bytes_orig,
                "PACKETS_OUT": flow.packets_reply,
                "BYTES_OUT": flow.bytes_reply,
            }
        self._events.emit(
            f"connection_{direction}",
            f"connection {direction}: {grant.grant_id} {flow.protocol} {peer} -> {local}",
            Priority.INFO,
            GRANT_ID=grant.grant_id,
            SUBJECT=grant.subject,
            KEY_ID=grant.key_id,
            PROTOCOL=flow.protocol,
            PEER=peer,
            LOCAL=local,
            SOURCE_ADDRESS=flow.src,
            PORT=flow.dport,
            **counters,
        )

    def _emit_summaries(self, summaries: list[ConnectionSummary]) -> None:
        for s in summaries:
            grant = s.record.grant
            self._events.emit(
                "connection_summary",
                f"connections of grant {grant.grant_id} in {s.until - s.since:.0f} s: "
                f"{s.opened} opened ({s.suppressed} not logged one by one), {s.closed} "
                f"closed, {s.bytes_in} bytes in and {s.bytes_out} out"
                + (" (final)" if s.final else ""),
                Priority.INFO,
                GRANT_ID=grant.grant_id,
                SUBJECT=grant.subject,
                KEY_ID=grant.key_id,
                PROTOCOL=grant.protocol.value,
                PORT=str(grant.ports),
                CONNECTIONS_OPENED=s.opened,
                CONNECTIONS_CLOSED=s.closed,
                CONNECTIONS_SUPPRESSED=s.suppressed,
                RECORDS_SUPPRESSED=s.unlogged,
                PACKETS_IN=s.packets_in,
                BYTES_IN=s.bytes_in,
                PACKETS_OUT=s.packets_out,
                BYTES_OUT=s.bytes_out,
                PERIOD_START=f"{s.since:.3f}",
                PERIOD_END=f"{s.until:.3f}",
                FINAL=s.final,
            )

    def _remember_ended(self, record: GrantRecord) -> None:
        """Keep a forgotten grant's identity for the DESTROY events of its connections,
        which arrive after it left the store (the cut itself causes them). Under _lock."""
        self._ended[record.handle] = record
        while len(self._ended) > MAX_ENDED_REMEMBERED:
            self._ended.pop(next(iter(self._ended)))

    # ---- logging ---------------------------------------------------------------------

    def _log_grant(
        self, action: str, message: str, priority: Priority, record: GrantRecord, **extra: object
    ) -> None:
        grant = record.grant
        kind = _HUB_KINDS.get(action)
        if kind is not None:
            reason = extra.get("REVOKE_REASON")
            self.hub.publish(
                kind,
                grant_id=grant.grant_id,
                subject=grant.subject,
                reason=str(reason) if reason else "",
            )
        why = f", reason {grant.reason!r}" if grant.reason else ""
        self._events.emit(
            action,
            f"{message}: {grant.grant_id} {grant.subject} -> "
            f"{grant.ports}/{grant.protocol.value}{why}",
            priority,
            **audit_fields(grant),
            EXPIRE_TIME=f"{grant.expire_time:.3f}",
            HANDLE=record.handle,
            **extra,
        )

    def _refused(self, command: _Command, error: PortagentError) -> None:
        # Unverified bytes are never parsed (only a trusted key's signature lets bytes
        # reach the protobuf parser): the record names them by digest and size.
        fields: dict[str, object] = {"REASON_CODE": error.reason, **error.verified_fields}
        request = command.request
        if request.signed is not None:
            fields["KEY_ID"] = request.signed.key_id[:MAX_LOGGED_VALUE]
            fields["PAYLOAD_SHA256"] = hashlib.sha256(request.signed.payload).hexdigest()
            fields["PAYLOAD_BYTES"] = len(request.signed.payload)
        if request.grant_id:
            fields["GRANT_ID"] = request.grant_id[:MAX_LOGGED_VALUE]
        self.hub.publish(
            EventKind.GRANT_REFUSED,
            grant_id=str(fields.get("GRANT_ID", "")),
            subject=str(fields.get("SUBJECT", "")),
            reason=error.reason,
        )
        self._events.emit(
            "refuse",
            f"{command.kind.value} refused: {error.message[:MAX_LOGGED_MESSAGE]}",
            Priority.WARNING,
            **fields,
        )
