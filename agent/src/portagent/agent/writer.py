"""One writer at a time: a queue of commands, the writer lock and the engine thread.

libnftables contexts and SQLite connections are not thread-safe, so everything that
writes (kernel, store, the engine's table) runs under one lock. The engine thread
holds it for each tick of its loop; a caller thread may take it too (`lead`) when no
one holds it, and then drains the queue itself: one writer at a time, not always the
same thread. Whoever writes drains *every* pending command, so concurrent requests
are coalesced into one transaction.

The pending commands are a deque (one C-level append/popleft each, no Condition):
callers never block on it, and it holds at most what the API's caps let in (one entry
per waiting caller, a snapshot's group as one entry).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

C = TypeVar("C")
R = TypeVar("R")

# Commands coalesced into one kernel transaction at most.
MAX_BATCH = 100_000
# After a failing tick, pause this long outside the lock (callers are not held up).
FAILURE_PAUSE = 0.2
# Wake at least this often, so watchdog pings keep flowing.
MAX_SLEEP = 2.0
# At most one heartbeat (a WATCHDOG=1 datagram to systemd) this often: under load the
# loop passes thousands of times a second, and each ping costs a syscall here and a
# wake-up of PID 1. Far below any usable WatchdogSec (the loop wakes every MAX_SLEEP).
HEARTBEAT_SPACING = 0.25


class Writer(Generic[C]):
    def __init__(
        self,
        process: Callable[[list[C]], None],
        tick: Callable[[], bool],
        sleep_for: Callable[[], float],
        heartbeat: Callable[[], None] | None = None,
        *,
        name: str = "engine",
    ) -> None:
        """`process(commands)` handles a drained batch, maybe empty (under the lock);
        `tick()` is one pass of the loop (under the lock; it drains the queue too),
        True when a step failed; `sleep_for()` how long the loop may sleep;
        `heartbeat()` runs after each pass (the watchdog ping: only a loop that works
        pings)."""
        self._process = process
        self._tick = tick
        self._sleep_for = sleep_for
        self._heartbeat = heartbeat
        self._name = name
        # An entry is one command, or a group that must be drained whole (put_group).
        self._queue: _Pending[C | _Group[C]] = _Pending()
        # A group that did not fit the last drain: first in the next one.
        self._carry: _Group[C] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_heartbeat = float("-inf")

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> list[C]:
        """Stop the loop; returns the commands no one will process."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        left: list[C] = []
        if self._carry is not None:
            left += self._carry.commands
            self._carry = None
        while True:
            try:
                entry = self._queue.popleft()
            except IndexError:
                return left
            left += entry.commands if isinstance(entry, _Group) else [entry]

    def wake(self) -> None:
        self._wake.set()

    def put(self, command: C) -> None:
        self._queue.append(command)

    def put_group(self, commands: list[C]) -> None:
        """Queue commands that one drain takes together (one kernel transaction), whatever
        else is pending: a snapshot's applies and revocations are never split. A group
        larger than MAX_BATCH is drained alone."""
        if commands:
            self._queue.append(_Group(list(commands)))

    def exclusive(self, action: Callable[[], R], timeout: float = 30.0) -> R:
        """Run `action` while holding the writer lock (what only the writer may touch:
        the store's connection). TimeoutError when the lock is not free in `timeout`."""
        if not self._lock.acquire(timeout=timeout):
            raise TimeoutError(f"the {self._name} writer stayed busy for {timeout:.0f}s")
        try:
            return action()
        finally:
            self._lock.release()

    def drain(self) -> list[C]:
        """The pending commands, up to MAX_BATCH, groups whole (the writer calls this,
        under the lock)."""
        commands: list[C] = []
        if self._carry is not None:
            commands += self._carry.commands
            self._carry = None
        pending = self._queue
        while len(commands) < MAX_BATCH:
            try:
                entry = pending.popleft()
            except IndexError:
                break
            if not isinstance(entry, _Group):
                commands.append(entry)
            elif not commands or len(commands) + len(entry.commands) <= MAX_BATCH:
                commands += entry.commands
            else:
                self._carry = entry  # whole, in the next drain
                break
        return commands

    def lead(self) -> None:
        """Process the queue on the caller's thread when no one else is writing.

        Handing every request to the engine thread costs two thread wake-ups (~1 ms
        each on an idle VM); an idle writer instead lets the caller do the work itself.
        When the lock is taken, the holder or the engine thread (woken here) takes our
        commands with the rest.
        """
        if self._lock.acquire(blocking=False):
            try:
                if self._thread is not None and not self._stopping.is_set():
                    self._process(self.drain())
            finally:
                self._lock.release()
            if not self._queue and self._carry is None:
                return
        if not self._wake.is_set():  # many callers pile up under load: one set is enough
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=max(0.0, min(self._sleep_for(), MAX_SLEEP)))
            self._wake.clear()
            if self._stopping.is_set():
                break
            with self._lock:
                failed = self._tick()
            if failed:
                time.sleep(FAILURE_PAUSE)
            if self._heartbeat is not None:
                now = time.monotonic()
                if now - self._last_heartbeat >= HEARTBEAT_SPACING:
                    self._last_heartbeat = now
                    self._heartbeat()


class _Pending(deque[C]):
    """The writer's pending entries: a deque (thread-safe append/popleft), with the two
    questions tests and callers ask of a queue."""

    def empty(self) -> bool:
        return not self

    def qsize(self) -> int:
        return len(self)


class _Group(Generic[C]):
    """Commands queued as one entry so that no drain splits them."""

    __slots__ = ("commands",)

    def __init__(self, commands: list[C]) -> None:
        self.commands = commands
