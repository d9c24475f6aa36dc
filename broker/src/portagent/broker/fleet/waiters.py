"""Waiting, in the API, for what another part of the service does: an agent applying a
host generation (its ack, recorded by the hub) or an access request changing state
(an approval in another API call).

The fast path is in memory: the hub calls `acked(host_id, generation)` right after it
records an ack, and the routes call `changed(request_id)` after they change a request,
so a waiter wakes without a sleep or a database round trip. An ack recorded by another
replica (or a request decided there) is only in the database: `wait_applied` re-reads
the host's acked generation every RECHECK seconds, and request waiters wake at least
that often so their caller re-reads the request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

RECHECK = 0.5
MAX_ACKED_HOSTS = 100_000  # one int per host that acked while this process ran


class Waiters:
    """Per-process wake-ups; every method but the `async` ones is safe from any thread."""

    def __init__(
        self,
        acked_generation: Callable[[str], Awaitable[int | None]],
        *,
        recheck: float = RECHECK,
    ) -> None:
        # acked_generation(host_id): what the store says the host acknowledged (None:
        # no such host), read only when the in-memory ack does not answer.
        self._read_acked = acked_generation
        self._recheck = recheck
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._acked: dict[str, int] = {}
        self._ack_waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}
        self._request_waiters: dict[str, list[asyncio.Future[None]]] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the waiters run on (set by the first `wait_*` call otherwise)."""
        self._loop = loop

    # --- notifications (any thread) ------------------------------------------------------

    def acked(self, host_id: str, generation: int) -> None:
        with self._lock:
            if generation <= self._acked.get(host_id, 0):
                return
            if host_id not in self._acked and len(self._acked) >= MAX_ACKED_HOSTS:
                self._acked.pop(next(iter(self._acked)))
            self._acked[host_id] = generation
        self._on_loop(self._wake_acked, host_id, generation)

    def changed(self, request_id: str) -> None:
        self._on_loop(self._wake_request, request_id)

    def _on_loop(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # nobody has waited yet: nobody to wake
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _wake_acked(self, host_id: str, generation: int) -> None:
        waiting = self._ack_waiters.get(host_id)
        if not waiting:
            return
        keep = []
        for wanted, future in waiting:
            if wanted <= generation:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((wanted, future))
        if keep:
            self._ack_waiters[host_id] = keep
        else:
            del self._ack_waiters[host_id]

    def _wake_request(self, request_id: str) -> None:
        for future in self._request_waiters.pop(request_id, []):
            if not future.done():
                future.set_result(None)

    # --- waiting (on the loop) -----------------------------------------------------------

    def known_acked(self, host_id: str) -> int:
        with self._lock:
            return self._acked.get(host_id, 0)

    async def wait_applied(self, host_id: str, generation: int, timeout: float) -> bool:
        """True as soon as the host acknowledged `generation` (or later); False when
        `timeout` seconds passed first."""
        if self.known_acked(host_id) >= generation:
            return True
        loop = asyncio.get_running_loop()
        self._loop = loop
        deadline = loop.time() + max(0.0, timeout)
        future: asyncio.Future[None] = loop.create_future()
        entry = (generation, future)
        self._ack_waiters.setdefault(host_id, []).append(entry)
        try:
            # An ack may have landed between the check above and registering.
            if self.known_acked(host_id) >= generation:
                return True
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(asyncio.shield(future), min(self._recheck, remaining))
                    return True
                except TimeoutError:
                    pass
                # Another replica may hold this host's stream: its ack is in the store.
                stored = await self._read_acked(host_id)
                if stored is not None and stored >= generation:
                    self.acked(host_id, stored)
                    return True
        finally:
            waiting = self._ack_waiters.get(host_id)
            if waiting is not None and entry in waiting:
                waiting.remove(entry)
                if not waiting:
                    del self._ack_waiters[host_id]
            if not future.done():
                future.cancel()

    async def wait_changed(self, request_id: str, timeout: float) -> bool:
        """Wait until `changed(request_id)` or at most min(timeout, RECHECK) seconds
        (the caller re-reads the request either way: another replica may have changed
        it). True when woken by a change in this process."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        timeout = min(self._recheck, max(0.0, timeout))
        if timeout <= 0:
            return False
        future: asyncio.Future[None] = loop.create_future()
        self._request_waiters.setdefault(request_id, []).append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiting = self._request_waiters.get(request_id)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._request_waiters[request_id]
            if not future.done():
                future.cancel()
