"""The engine: owns desired state, the kernel table and the store, from one thread.

API threads (gRPC, admin socket) submit commands and wait on a future. The writer
thread drains every pending command, verifies them, writes the store in one
transaction, applies one kernel batch, and only then commits the store: a refused
or failed command changes nothing. The same loop garbage-collects expired grants,
repairs tampering and re-asserts the table on a slow timer (level-triggered).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import heapq
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Protocol

from portagent.agent.adapters.journal import EventLog, Priority
from portagent.agent.events import EventHub, EventKind
from portagent.agent.grant_table import GrantTable, due_time, element_keys, mark_keys
from portagent.agent.model import (
    Element,
    ElementKey,
    Flow,
    Grant,
    GrantRecord,
    GrantState,
    MarkElement,
)
from portagent.agent.plan import (
    REFRESH_TOLERANCE,
    MarkKey,
    Plan,
    apply_mark_plan,
    apply_plan,
    desired_elements,
    desired_marks,
    plan_changes,
)
from portagent.agent.render import KernelState, Layout
from portagent.agent.settings import Settings
from portagent.agent.store import BadRow, Store, StoredGrant, StoreError
from portagent.agent.verify import Revocation, Verifier, audit_fields
from portagent.wire.errors import (
    EnforcementError,
    GrantConflict,
    GrantDenied,
    GrantNotFound,
    GrantNotInWindow,
    PortagentError,
)

# Ended grants remembered for late connection events (a dict keeps insertion order).
MAX_ENDED_REMEMBERED = 10_000
# After lost ruleset notifications, re-read the kernel no more often than this.
LOST_EVENTS_RECHECK = 5.0
# Upper bound on the delay from rendering an element to the kernel inserting it.
INSERT_DELAY_BASE = 0.005
INSERT_DELAY_PER_ELEMENT = 20e-6
# After a batch this large, hand freed heap back to the OS (RSS, not correctness).
TRIM_AFTER_BATCH = 1_000
# Commands coalesced into one kernel transaction at most.
MAX_BATCH = 100_000
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


_EVENT_KINDS = {
    "apply": EventKind.GRANT_APPLIED,
    "expire": EventKind.GRANT_EXPIRED,
    "revoke": EventKind.GRANT_REVOKED,
}


def _shifted(plan: Plan, late: float) -> Plan:
    """`plan` with every added element's expiry moved `late` seconds later: what the
    kernel may really hold after a late commit."""
    return replace(
        plan,
        add=tuple(replace(e, expire_time=e.expire_time + late) for e in plan.add),
        replace=tuple(
            (old, replace(new, expire_time=new.expire_time + late)) for old, new in plan.replace
        ),
        marks_add=tuple(replace(m, expire_time=m.expire_time + late) for m in plan.marks_add),
    )


def release_free_memory() -> None:
    """Return freed heap to the OS after a large batch: glibc keeps it otherwise, and
    a 100k-grant request leaves hundreds of MB of freed request objects behind."""
    gc.collect()
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


@dataclass(frozen=True)
class SignedInput:
    payload: bytes
    signature: bytes
    key_id: str


@dataclass
class _Command:
    kind: str  # "apply" | "revoke" | "revoke_local"
    future: Future[GrantRecord | None]
    signed: SignedInput | None = None
    grant_id: str = ""
    actor: str = ""


@dataclass
class _Pending:
    """Outcome of one batch before the kernel accepted it."""

    inserts: list[GrantRecord] = field(default_factory=list)
    revokes: list[tuple[GrantRecord, Revocation | None, str]] = field(default_factory=list)
    revoked_ids: list[tuple[str, float]] = field(default_factory=list)
    results: list[tuple[_Command, GrantRecord | None]] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        settings: Settings,
        firewall: Firewall,
        store: Store,
        events: EventLog,
        clock: Callable[[], float] = time.time,
        watchdog: Callable[[], None] | None = None,
        connections: ConnectionTable | None = None,
        hub: EventHub | None = None,
    ) -> None:
        self._settings = settings
        self._verifier = Verifier(settings.host_id, settings.trusted_keys, settings.policy)
        self._firewall = firewall
        self._store = store
        self._events = events
        self._clock = clock
        self._watchdog = watchdog
        self._connections = connections
        self.hub = hub or EventHub(clock=clock)
        self._queue: queue.Queue[_Command] = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._full_reconcile = threading.Event()
        self._lock = threading.Lock()  # guards _table for readers on other threads
        self._table = GrantTable()
        self._revoked: dict[str, float] = {}
        self._actual: dict[ElementKey, Element] = {}
        self._maps: frozenset[tuple[int, int]] = frozenset()
        self._actual_marks: dict[MarkKey, MarkElement] = {}
        self._listing_uncertainty = 0.0
        self._limits: frozenset[int] = frozenset()
        # Connection statistics per grant handle: (first seen, last seen).
        self._seen: dict[int, tuple[float, float]] = {}
        self._ended: dict[int, GrantRecord] = {}
        self._layout_dirty = True
        self._thread: threading.Thread | None = None
        # Held by whichever thread writes (kernel, store, table): see _lead().
        self._writer = threading.Lock()
        self._started = False
        self.last_reconcile: float = 0.0
        self._last_lost_check = 0.0
        self._own_commits_lock = threading.Lock()
        self._own_commits_pending = 0
        self._lost_pending = False
        self.stall_check: Callable[[], bool] = lambda: False
        # True while a conntrack event listener feeds on_connection_event without
        # having lost events, so the grants that ever had a connection are known.
        self.connection_events_complete: Callable[[], bool] = lambda: False
        # True while the ruleset watcher reports foreign changes (see _periodic_reconcile).
        self.tamper_watch_active = False
        # Revoked ids by the time they may be forgotten (a heap: no scan per loop).
        self._revoked_due: list[tuple[float, str]] = []
        # Store writes that failed (disk full, read-only) and are retried: expiry and
        # repair never wait for the disk. Grant ids to delete / to mark expired.
        self._debt_delete: set[str] = set()
        self._debt_expired: set[str] = set()
        self._debt_forget_revoked = False
        self._last_store_error_log = -STORE_ERROR_LOG_INTERVAL
        self._store_errors_unlogged = 0
        # Grants issued before this time may have been revoked in a lost state.
        self._epoch = 0.0
        # Elements (and handle-set entries) committed late: re-asserted once.
        self._late_keys: set[ElementKey] = set()
        self._late_marks: set[MarkKey] = set()
        self._reasserting = False

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Load the store and converge the kernel once (synchronously), then run the loop."""
        self._epoch = self._store.epoch
        self._load_grants()
        self._revoked = self._store.revoked_ids()
        self._revoked_due = [(t, g) for g, t in self._revoked.items()]
        heapq.heapify(self._revoked_due)
        self._reconcile_full()
        self._started = True
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def _load_grants(self) -> None:
        """Every stored row is verified again (signature over its bytes, canonical parse,
        host): the file is not trusted. A row that fails is quarantined and never
        enforced; one bad row never stops the agent."""
        now = self._clock()
        bad: list[tuple[str, bytes, bytes, str, str]] = []
        for row in self._store.load():
            if isinstance(row, BadRow):
                bad.append((row.grant_id, row.grant_bytes, row.signature, row.key_id, row.problem))
                continue
            try:
                grant = self._verify_stored(row)
                if grant.grant_id != row.grant_id:
                    raise EnforcementError(
                        f"grant_id: the row says {row.grant_id[:MAX_LOGGED_VALUE]!r}, the signed "
                        f"grant {grant.grant_id!r}",
                        reason="STORED_ID_MISMATCH",
                    )
                if row.handle in self._table.by_handle:
                    raise EnforcementError(
                        f"handle {row.handle} is used twice", reason="STORED_HANDLE_REUSED"
                    )
            except PortagentError as exc:
                bad.append(
                    (row.grant_id, row.grant_bytes, row.signature, row.key_id,
                     f"{exc.reason}: {exc.message}")
                )
                continue
            record = GrantRecord(
                grant=grant,
                handle=row.handle,
                grant_bytes=row.grant_bytes,
                signature=b"",  # stays on disk: memory holds only what is served
                state=GrantState(row.state),
                apply_time=row.apply_time,
                revoke_time=row.revoke_time,
            )
            self._table.put(record, self._due(record))
        if not bad:
            return
        for grant_id, _, _, _, problem in bad:
            self._events.emit(
                "quarantine",
                f"stored grant {grant_id[:MAX_LOGGED_VALUE]!r} does not verify; not enforced, "
                f"moved to quarantine: {problem[:MAX_LOGGED_MESSAGE]}",
                Priority.ALERT,
                GRANT_ID=grant_id[:MAX_LOGGED_VALUE],
                REASON=problem.partition(":")[0][:MAX_LOGGED_VALUE],
                STATE_FILE=str(self._store.path),
            )
        try:
            with self._store.transaction():
                self._store.quarantine(bad, now)
        except StoreError as exc:
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

    def stop(self) -> None:
        """Stop the loop. Kernel elements stay: they expire on their own (fail-safe)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        while True:
            try:
                command = self._queue.get_nowait()
            except queue.Empty:
                break
            command.future.set_exception(
                EnforcementError("agent is shutting down", reason="SHUTTING_DOWN")
            )

    def update_settings(self, settings: Settings) -> None:
        """Reload: new trust and policy for new grants; active grants stay as they are."""
        with self._lock:
            self._settings = settings
            self._verifier = Verifier(settings.host_id, settings.trusted_keys, settings.policy)
        self._layout_dirty = True
        self.request_full_reconcile()

    # ---- API (any thread) ------------------------------------------------------------

    def apply_grant(self, signed: SignedInput, timeout: float = 30.0) -> GrantRecord:
        record = self._submit(_Command("apply", Future(), signed=signed), timeout)
        assert record is not None
        return record

    def apply_grants(
        self, batch: list[SignedInput], timeout: float = 300.0
    ) -> list[GrantRecord | PortagentError]:
        """Apply many grants in one kernel transaction; one result (or refusal) per input."""
        if self._stopping.is_set():
            raise EnforcementError("agent is shutting down", reason="SHUTTING_DOWN")
        commands = [_Command("apply", Future(), signed=signed) for signed in batch]
        for command in commands:
            self._queue.put(command)
        self._lead()
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

    def revoke_grant(self, signed: SignedInput, timeout: float = 30.0) -> GrantRecord | None:
        return self._submit(_Command("revoke", Future(), signed=signed), timeout)

    def revoke_local(self, grant_id: str, actor: str, timeout: float = 30.0) -> GrantRecord:
        record = self._submit(
            _Command("revoke_local", Future(), grant_id=grant_id, actor=actor), timeout
        )
        assert record is not None
        return record

    def get(self, grant_id: str) -> GrantRecord:
        with self._lock:
            record = self._table.get(grant_id)
        if record is None:
            raise GrantNotFound(f"grant_id: no grant {grant_id!r} on this host")
        return self._with_state(record, self._clock())

    def list_grants(self) -> list[GrantRecord]:
        with self._lock:
            records = list(self._table.by_id.values())
        now = self._clock()
        return sorted((self._with_state(r, now) for r in records), key=lambda r: r.grant.grant_id)

    def request_full_reconcile(self) -> None:
        self._full_reconcile.set()
        self._wake.set()

    def on_ruleset_commit(self, pid: int, process: str) -> None:
        """A ruleset generation was committed (NEWGEN). Ours are counted out; any other
        is tampering. The kernel reports the committing *thread* id in the init pid
        namespace, which a daemon in a container cannot compare with its own pids, so
        we count our own commits instead: each one we start is expected back once."""
        with self._own_commits_lock:
            if self._own_commits_pending > 0:
                self._own_commits_pending -= 1
                return
        self.on_foreign_change(pid, process)

    def on_foreign_change(self, pid: int, process: str) -> None:
        self._events.emit(
            "tamper",
            f"ruleset changed by {process} (pid {pid}); reconciling",
            Priority.ALERT,
            CHANGED_BY_PID=pid,
            CHANGED_BY=process,
        )
        self._layout_dirty = True
        self.request_full_reconcile()

    def on_events_lost(self) -> None:
        """Ruleset notifications overflowed (usually our own large batch): verify the
        kernel, at most once every few seconds."""
        with self._own_commits_lock:
            self._own_commits_pending = 0  # lost NEWGENs would skew the count
        now = time.monotonic()
        if now - self._last_lost_check < LOST_EVENTS_RECHECK:
            self._lost_pending = True
            return
        self._last_lost_check = now
        self.request_full_reconcile()

    def kernel_element_count(self) -> int:
        """How many elements our model of the kernel holds (for sizing a listing)."""
        return len(self._actual)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def settings(self) -> Settings:
        return self._settings

    @staticmethod
    def _with_state(record: GrantRecord, now: float) -> GrantRecord:
        if record.state is GrantState.ACTIVE and record.grant.expire_time <= now:
            return replace(record, state=GrantState.EXPIRED)
        return record

    def _submit(self, command: _Command, timeout: float) -> GrantRecord | None:
        if self._stopping.is_set():
            raise EnforcementError("agent is shutting down", reason="SHUTTING_DOWN")
        self._queue.put(command)
        self._lead()
        return command.future.result(timeout=timeout)

    def _lead(self) -> None:
        """Process the queue on the caller's thread when no one else is writing.

        Handing every request to the engine thread costs two thread wake-ups (~1 ms
        each on a idle VM); an idle engine instead lets the caller do the work itself.
        The writer lock keeps a single writer at any time, so the libnftables context
        and the SQLite connection are never used concurrently (they are not
        thread-safe), only from different threads in turn. When the lock is taken,
        the holder or the engine thread (woken here) takes our command with the rest.
        """
        if self._writer.acquire(blocking=False):
            try:
                if self._started and not self._stopping.is_set():
                    self._process_queue()
            finally:
                self._writer.release()
            if self._queue.empty():
                return
        self._wake.set()

    # ---- writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        next_full = self._clock() + self._settings.reconcile_interval
        while not self._stopping.is_set():
            self._wake.wait(timeout=self._sleep_for(next_full))
            self._wake.clear()
            if self._stopping.is_set():
                break
            failed = False
            self._writer.acquire()
            try:
                # Each step on its own: a failing one (a full disk under expiry, say)
                # must not keep the others, repair above all, from running.
                for step in (self._process_queue, self._expire, self._flush_store_debt):
                    failed = self._run_step(step) or failed
                if self._lost_pending and (
                    time.monotonic() - self._last_lost_check >= LOST_EVENTS_RECHECK
                ):
                    self._lost_pending = False
                    self._last_lost_check = time.monotonic()
                    self._full_reconcile.set()
                if self._full_reconcile.is_set():
                    self._full_reconcile.clear()
                    failed = self._run_step(self._reconcile_full) or failed
                    next_full = self._clock() + self._settings.reconcile_interval
                elif self._clock() >= next_full:
                    failed = self._run_step(self._periodic_reconcile) or failed
                    next_full = self._clock() + self._settings.reconcile_interval
                failed = self._run_step(self._reassert_late) or failed
            finally:
                self._writer.release()
            if failed:
                time.sleep(0.2)  # outside the writer lock: callers are not held up
            if self._watchdog is not None and not self.stall_check():
                self._watchdog()

    def _run_step(self, step: Callable[[], None]) -> bool:
        """Run one step of the loop; True when it failed (then a full reconcile follows)."""
        try:
            step()
        except Exception as exc:
            self._events.emit(
                "error", f"{step.__name__.strip('_')} failed: {exc}", Priority.ERR
            )
            self._full_reconcile.set()
            return True
        return False

    def _process_queue(self) -> None:
        commands = self._drain()
        if commands:
            self._process(commands)
            if len(commands) >= TRIM_AFTER_BATCH:
                del commands
                release_free_memory()
        self._reassert_late()

    def _sleep_for(self, next_full: float) -> float:
        now = self._clock()
        with self._lock:
            due = self._table.next_due()
        wake_at = next_full if due is None else min(next_full, due)
        # Wake at least every 2 s so watchdog pings keep flowing.
        return max(0.0, min(wake_at - now, 2.0))

    def _drain(self) -> list[_Command]:
        commands: list[_Command] = []
        while len(commands) < MAX_BATCH:
            try:
                commands.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return commands

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

    def _process_batch(self, commands: list[_Command]) -> None:
        now = self._clock()
        pending = _Pending()
        staged: dict[str, GrantRecord] = {}  # grant id -> record as it will be after commit
        for command in commands:
            try:
                result = self._stage(command, now, staged, pending)
            except PortagentError as exc:
                self._refused(command, exc)
                command.future.set_exception(exc)
                continue
            pending.results.append((command, result))
        if not (pending.inserts or pending.revokes or pending.revoked_ids):
            for command, result in pending.results:
                command.future.set_result(result)
            return
        try:
            self._commit(pending, staged, now)
        except PortagentError as exc:
            for command, _ in pending.results:
                self._refused(command, exc)
                command.future.set_exception(exc)
            return
        for command, result in pending.results:
            command.future.set_result(result)

    def _stage(
        self, command: _Command, now: float, staged: dict[str, GrantRecord], pending: _Pending
    ) -> GrantRecord | None:
        if command.kind == "apply":
            assert command.signed is not None
            signed = command.signed
            grant = self._verifier.verify_grant(
                signed.payload, signed.signature, signed.key_id, now
            )
            try:
                return self._stage_apply(grant, signed, now, staged, pending)
            except PortagentError as exc:
                exc.verified_fields = audit_fields(grant)
                raise
        if command.kind == "revoke":
            assert command.signed is not None
            signed = command.signed
            revocation = self._verifier.verify_revocation(
                signed.payload, signed.signature, signed.key_id, now
            )
            return self._stage_revoke(
                revocation.grant_id, now, staged, pending, revocation, "broker", must_exist=False
            )
        return self._stage_revoke(
            command.grant_id, now, staged, pending, None, command.actor, must_exist=True
        )

    def _stage_apply(
        self,
        grant: Grant,
        signed: SignedInput,
        now: float,
        staged: dict[str, GrantRecord],
        pending: _Pending,
    ) -> GrantRecord:
        """A verified grant against what this agent knows: revoked ids, idempotent
        re-delivery, the store epoch."""
        if grant.grant_id in self._revoked:
            raise GrantNotInWindow(
                f"grant_id: {grant.grant_id!r} was revoked; it never reopens",
                reason="GRANT_REVOKED",
            )
        known = staged.get(grant.grant_id) or self._table.get(grant.grant_id)
        if known is not None:
            if known.grant_bytes != signed.payload:
                raise GrantConflict(
                    f"grant_id: {grant.grant_id!r} is already known with different content"
                )
            if known.state is GrantState.REVOKED:
                raise GrantNotInWindow(
                    f"grant_id: {grant.grant_id!r} was revoked; it never reopens",
                    reason="GRANT_REVOKED",
                )
            return known  # idempotent re-delivery
        issued = grant.issue_time or grant.not_before
        if issued < self._epoch:
            # It may have been revoked in a state that was lost: only a grant issued
            # after this state began can be told apart from a replay.
            raise GrantNotInWindow(
                f"issue_time: grant was issued at {issued:.3f}, before this agent's state "
                f"began at {self._epoch:.3f}; the broker must issue it again",
                reason="GRANT_PREDATES_STATE",
            )
        record = GrantRecord(
            grant=grant,
            handle=0,
            grant_bytes=signed.payload,
            signature=signed.signature,
            state=GrantState.ACTIVE,
            apply_time=now,
        )
        staged[grant.grant_id] = record
        pending.inserts.append(record)
        return record

    def _stage_revoke(
        self,
        grant_id: str,
        now: float,
        staged: dict[str, GrantRecord],
        pending: _Pending,
        revocation: Revocation | None,
        actor: str,
        must_exist: bool,
    ) -> GrantRecord | None:
        known = staged.get(grant_id) or self._table.get(grant_id)
        policy = self._settings.policy
        if known is None:
            if must_exist:
                raise GrantNotFound(f"grant_id: no grant {grant_id!r} on this host")
            # Revoked before delivery: remember the id until any grant with it would have
            # expired anyway.
            issued = revocation.issue_time if revocation else now
            pending.revoked_ids.append(
                (grant_id, max(issued, now) + policy.max_ttl + 2 * policy.clock_skew)
            )
            return None
        if known.state is GrantState.REVOKED:
            return known
        revoked = replace(known, state=GrantState.REVOKED, revoke_time=now)
        staged[grant_id] = revoked
        pending.revokes.append((revoked, revocation, actor))
        pending.revoked_ids.append((grant_id, known.grant.expire_time + policy.clock_skew))
        return revoked

    def _commit(self, pending: _Pending, staged: dict[str, GrantRecord], now: float) -> None:
        store = self._store
        kernel_changed = False
        try:
            with store.transaction():
                self._write_store_debt()
                for index, record in enumerate(pending.inserts):
                    with_handle = replace(record, handle=store.next_handle())
                    pending.inserts[index] = with_handle
                    staged[record.grant.grant_id] = with_handle
                    grant = record.grant
                    store.insert(
                        grant_id=grant.grant_id,
                        handle=with_handle.handle,
                        grant_bytes=record.grant_bytes,
                        signature=record.signature,
                        key_id=grant.key_id,
                        expire_time=grant.expire_time,
                        state=record.state.value,
                        apply_time=record.apply_time,
                    )
                for record, _, _ in pending.revokes:
                    store.mark_revoked(record.grant.grant_id, now)
                for grant_id, forget_after in pending.revoked_ids:
                    store.remember_revoked(grant_id, forget_after)
                # Kernel last, inside the store transaction: if nftables refuses (one
                # atomic batch), the store rolls back and nothing changed anywhere.
                self._converge_grants(list(staged.values()), now)
                kernel_changed = True
            # COMMIT happened on leaving the block; only now is the change real.
        except PortagentError:
            raise  # the kernel refused the batch: it changed nothing, the store rolled back
        except Exception as exc:
            if kernel_changed:
                self._revert_kernel(list(staged.values()), exc)
            raise EnforcementError(f"could not persist the change: {exc}") from exc
        self._clear_store_debt()
        with self._lock:
            for record in staged.values():
                # The signature lives in the store; memory holds only what is served.
                self._table.put(replace(record, signature=b""), self._due(record))
            for grant_id, forget_after in pending.revoked_ids:
                self._revoked[grant_id] = forget_after
                heapq.heappush(self._revoked_due, (forget_after, grant_id))
        for record in pending.inserts:
            self._log_grant("apply", "grant applied", Priority.NOTICE, record)
        self._cut_connections([record.handle for record, _, _ in pending.revokes])
        for record, revocation, actor in pending.revokes:
            self._log_grant(
                "revoke",
                f"grant revoked by {actor}",
                Priority.NOTICE,
                record,
                REASON=revocation.reason if revocation else None,
                ACTOR=actor,
            )
        # Fix the results so callers see handles and final records.
        by_id = {r.grant.grant_id: r for r in pending.inserts}
        pending.results = [
            (c, by_id.get(r.grant.grant_id, r) if r else r) for c, r in pending.results
        ]

    def _due(self, record: GrantRecord) -> float:
        policy = self._settings.policy
        return due_time(record, policy.keep_established_max, policy.clock_skew)

    def _converge_grants(self, changed: list[GrantRecord], now: float) -> None:
        """Plan only the keys and handle-set entries of `changed` grants (new or changed
        state, standing in for what the table holds) against our model of the kernel,
        and apply one batch. Cost follows the size of the change, not the number of
        grants."""
        self._converge(
            {key for record in changed for key in element_keys(record)},
            {k for record in changed for k in mark_keys(record)},
            now,
            {r.handle: r for r in changed},
        )

    def _converge(
        self,
        keys: set[ElementKey],
        marks_touched: set[MarkKey],
        now: float,
        overlay: dict[int, GrantRecord],
    ) -> None:
        """Make these keys and handle-set entries of the kernel what the table (with
        `overlay` standing in for some grants) wants, in one batch."""
        desired = self._table.desired_for(keys, now, overlay)
        actual = {k: self._actual[k] for k in keys if k in self._actual}
        records = [
            record
            for handle in {h for _, h in marks_touched}
            if (record := overlay.get(handle) or self._table.by_handle.get(handle)) is not None
        ]
        keep_max = self._settings.policy.keep_established_max
        marks = {
            k: m for k, m in desired_marks(records, now, keep_max).items() if k in marks_touched
        }
        actual_marks = {k: self._actual_marks[k] for k in marks_touched if k in self._actual_marks}
        self._apply(plan_changes(desired, actual, now, marks, actual_marks), now)

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

    def _write_store_debt(self) -> None:
        """Inside a store transaction: the writes expiry could not make earlier."""
        if self._debt_delete:
            self._store.delete(sorted(self._debt_delete))
        if self._debt_expired:
            self._store.mark_expired(sorted(self._debt_expired))
        if self._debt_forget_revoked:
            self._store.forget_revoked_before(self._clock())

    def _clear_store_debt(self) -> None:
        self._debt_delete.clear()
        self._debt_expired.clear()
        self._debt_forget_revoked = False

    def _flush_store_debt(self) -> None:
        """Record expiries in the store. Enforcement never waits for this: when the disk
        is full or read-only, the writes stay owed and are retried every tick."""
        if not (self._debt_delete or self._debt_expired or self._debt_forget_revoked):
            return
        try:
            with self._store.transaction():
                self._write_store_debt()
        except StoreError as exc:
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
        self._clear_store_debt()

    def _reassert_late(self) -> None:
        """Re-add, with timeouts from now, what a late commit may have left to outlive its
        grant. Once: a re-assert that is late again leaves it to explicit expiry."""
        if not (self._late_keys or self._late_marks):
            return
        keys, marks = self._late_keys, self._late_marks
        self._late_keys, self._late_marks = set(), set()
        self._reasserting = True
        try:
            self._converge(keys, marks, self._clock(), {})
        finally:
            self._reasserting = False

    def _converge_all(self, now: float) -> None:
        """Plan every grant against our whole model of the kernel (full reconcile)."""
        with self._lock:
            records = list(self._table.by_id.values())
        desired = desired_elements(records, now)
        marks = desired_marks(records, now, self._settings.policy.keep_established_max)
        plan = plan_changes(
            desired,
            self._actual,
            now,
            marks,
            self._actual_marks,
            tolerance=max(REFRESH_TOLERANCE, self._listing_uncertainty),
        )
        self._apply(plan, now)

    def _apply(self, plan: Plan, now: float) -> None:
        maps = self._maps | plan.maps
        limits = self._limits | plan.limits
        layout = None
        if maps != self._maps or limits != self._limits or self._layout_dirty:
            layout = Layout(
                self._settings.policy.guarded,
                self._settings.refuse_action,
                frozenset(maps),
                frozenset(limits),
            )
        if plan.is_empty and layout is None:
            return
        with self._own_commits_lock:
            self._own_commits_pending += 1
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
            with self._own_commits_lock:
                self._own_commits_pending -= 1  # a refused batch commits nothing
            raise
        late = self._clock() - render_now
        if late > LATE_COMMIT_TOLERANCE:
            # The process stalled (or the kernel was slow) between computing timeouts
            # and the commit: the kernel may hold these up to `late` past their grants.
            # The model says so (so expiry deletes them explicitly), and they are
            # re-asserted with correct timeouts once the table is up to date.
            plan = _shifted(plan, late)
            if not self._reasserting:
                self._late_keys.update(e.key for e in plan.add)
                self._late_keys.update(new.key for _, new in plan.replace)
                self._late_marks.update((m.set_name, m.handle) for m in plan.marks_add)
        apply_plan(self._actual, plan)
        apply_mark_plan(self._actual_marks, plan)
        self._maps = frozenset(maps)
        self._limits = frozenset(limits)
        self._layout_dirty = False

    def _periodic_reconcile(self) -> None:
        """The slow safety-net timer. With tamper detection working, every foreign
        change already triggers a full reconcile, so the timer only re-asserts the
        table's structure (cheap, atomic); without it, it lists the table (expensive
        at 100k elements) and converges everything."""
        if not self.tamper_watch_active:
            self._reconcile_full()
            return
        self._layout_dirty = True
        self._apply(Plan(), self._clock())
        self.last_reconcile = self._clock()

    def _reconcile_full(self) -> None:
        """Read the kernel, then converge with the layout re-asserted."""
        now = self._clock()
        expected = max(len(self._actual), len(self._table))
        state = self._firewall.read_state(now, expected=expected)
        self._actual = state.elements
        self._actual_marks = state.marks
        self._listing_uncertainty = state.uncertainty
        self._maps = frozenset(state.maps) if state.present else frozenset()
        # Limit rules are rebuilt from what is wanted plus what the kernel still holds.
        self._limits = frozenset()
        self._layout_dirty = True
        self._converge_all(now)
        self.last_reconcile = self._clock()

    def _expire(self) -> None:
        """Grants whose time is up: drop them from the table, delete what the kernel may
        still hold of them, cut their connections (unless they keep them), log them, and
        record it in the store last. Nothing here waits for the disk: a failed store
        write is owed and retried (_flush_store_debt)."""
        now = self._clock()
        with self._lock:
            due = self._table.pop_due(now)
        ended = [r for r in due if r.state is GrantState.ACTIVE and r.grant.expire_time <= now]
        kept = [replace(r, state=GrantState.EXPIRED) for r in ended if r.grant.keep_established]
        forget = [r for r in ended if not r.grant.keep_established]
        forget += [r for r in due if r.state is not GrantState.ACTIVE and self._due(r) <= now]
        handled = {r.grant.grant_id for r in ended} | {r.grant.grant_id for r in forget}
        not_yet = [r for r in due if r.grant.grant_id not in handled]
        if ended or forget:
            with self._lock:
                for record in forget:
                    self._table.remove(record.grant.grant_id)
                    self._remember_ended(record)
                for record in kept:
                    self._table.put(record, self._due(record))
            for record in forget:
                self._debt_expired.discard(record.grant.grant_id)
                self._debt_delete.add(record.grant.grant_id)
            self._debt_expired.update(r.grant.grant_id for r in kept)
            for record in ended:
                self._log_grant(
                    "expire",
                    "grant expired",
                    Priority.INFO,
                    replace(record, state=GrantState.EXPIRED),
                    KEEP_ESTABLISHED=record.grant.keep_established,
                )
            # Normally the kernel dropped these elements at their timeouts already and
            # this plans nothing; after a late commit our model says the kernel may
            # still hold them, and they are deleted here, explicitly.
            self._converge(
                {key for record in forget + kept for key in element_keys(record)},
                {k for record in forget + kept for k in mark_keys(record)},
                now,
                {},
            )
            self._cut_connections([r.handle for r in forget if r.state is not GrantState.REVOKED])
            for record in forget:
                self._seen.pop(record.handle, None)
                # What the kernel dropped by itself leaves our model of it too.
                for key in element_keys(record):
                    element = self._actual.get(key)
                    if element is not None and element.expire_time <= now:
                        del self._actual[key]
                for mark_key in mark_keys(record):
                    mark = self._actual_marks.get(mark_key)
                    if mark is not None and mark.expire_time <= now:
                        del self._actual_marks[mark_key]
        with self._lock:
            for record in not_yet:  # popped early (e.g. a state change moved its time)
                self._table.put(record, self._due(record))
        stale_ids = []
        while self._revoked_due and self._revoked_due[0][0] < now:
            _, grant_id = heapq.heappop(self._revoked_due)
            if self._revoked.get(grant_id, now) < now:
                stale_ids.append(grant_id)
        if stale_ids:
            for grant_id in stale_ids:
                self._revoked.pop(grant_id, None)
            self._debt_forget_revoked = True
        self._flush_store_debt()

    def _cut_connections(self, handles: list[int]) -> None:
        """Flush the conntrack entries of these grants. Their packets are already dropped
        (no element matches); this clears the entries so nothing lingers as 'live'."""
        if self.connection_events_complete():
            # A flush walks the whole conntrack table (milliseconds even when empty):
            # only grants that ever had a connection need one. Their packets are
            # dropped either way; the flush only clears what would linger as "live".
            handles = [h for h in handles if h in self._seen]
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
                REASON=exc.reason,
            )

    # ---- connections -----------------------------------------------------------------

    def on_connection_event(self, kind: str, flow: Flow) -> None:
        """A conntrack NEW/DESTROY event (from the conntrack events thread)."""
        with self._lock:
            record = self._table.by_handle.get(flow.mark) or self._ended.get(flow.mark)
        if record is None:
            return  # not one of ours
        now = self._clock()
        first, _ = self._seen.get(flow.mark, (now, now))
        self._seen[flow.mark] = (first, now)
        grant = record.grant
        opened = kind == "new"
        self.hub.publish(
            EventKind.CONNECTION_OPENED if opened else EventKind.CONNECTION_CLOSED,
            grant_id=grant.grant_id,
            subject=grant.subject,
            flow=flow,
        )
        direction = "opened" if opened else "closed"
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
            f"connection {direction}: {grant.grant_id} {flow.protocol} "
            f"[{flow.src}]:{flow.sport} -> [{flow.dst}]:{flow.dport}",
            Priority.INFO,
            GRANT_ID=grant.grant_id,
            SUBJECT=grant.subject,
            PROTOCOL=flow.protocol,
            SOURCE=flow.src,
            SOURCE_PORT=flow.sport,
            PORT=flow.dport,
            **counters,
        )

    def _remember_ended(self, record: GrantRecord) -> None:
        """Keep a forgotten grant's identity for the DESTROY events of its connections,
        which arrive after it left the store (the cut itself causes them)."""
        self._ended[record.handle] = record
        while len(self._ended) > MAX_ENDED_REMEMBERED:
            self._ended.pop(next(iter(self._ended)))

    def seen(self, handle: int) -> tuple[float, float] | None:
        """(first, last) time a connection of this grant was seen opening or closing."""
        return self._seen.get(handle)

    # ---- logging ---------------------------------------------------------------------

    def _log_grant(
        self, action: str, message: str, priority: Priority, record: GrantRecord, **extra: object
    ) -> None:
        grant = record.grant
        kind = _EVENT_KINDS.get(action)
        if kind is not None:
            reason = extra.get("REASON")
            self.hub.publish(
                kind,
                grant_id=grant.grant_id,
                subject=grant.subject,
                reason=str(reason) if reason else "",
            )
        self._events.emit(
            action,
            f"{message}: {grant.grant_id} {grant.subject} -> {grant.ports}/{grant.protocol.value}",
            priority,
            **audit_fields(grant),
            EXPIRE_TIME=f"{grant.expire_time:.3f}",
            HANDLE=record.handle,
            **extra,
        )

    def _refused(self, command: _Command, error: PortagentError) -> None:
        # Unverified bytes are never parsed (only a trusted key's signature lets bytes
        # reach the protobuf parser): the record names them by digest and size.
        fields: dict[str, object] = {"REASON": error.reason, **error.verified_fields}
        if command.signed is not None:
            fields["KEY_ID"] = command.signed.key_id[:MAX_LOGGED_VALUE]
            fields["PAYLOAD_SHA256"] = hashlib.sha256(command.signed.payload).hexdigest()
            fields["PAYLOAD_BYTES"] = len(command.signed.payload)
        if command.grant_id:
            fields["GRANT_ID"] = command.grant_id[:MAX_LOGGED_VALUE]
        self.hub.publish(
            EventKind.GRANT_REFUSED,
            grant_id=str(fields.get("GRANT_ID", "")),
            subject=str(fields.get("SUBJECT", "")),
            reason=error.reason,
        )
        self._events.emit(
            "refuse",
            f"{command.kind} refused: {error.message[:MAX_LOGGED_MESSAGE]}",
            Priority.WARNING,
            **fields,
        )
