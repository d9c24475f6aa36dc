"""Change notifications: "host X's set changed" reaching the delivery hub of every
replica that may hold X's stream.

* In-process (`ChangeBus.publish`): the API handler publishes after the store call
  returned, i.e. after the change committed. With SQLite this is the whole bus (one
  process owns the file).
* PostgreSQL (`PgListener`): the store sends `pg_notify('portagent_changes', host_id)`
  inside the change's transaction, so every replica hears of a change exactly when it
  commits. One LISTEN connection per replica; it reconnects with backoff, and after
  every (re)connect all connected hosts count as changed: a notification sent while
  the connection was down is lost, and a spurious re-check costs one cheap query.

Subscribers are plain callables run on the event loop; they must not block (the hub
only marks the host dirty and wakes its delivery task).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

CHANNEL = "portagent_changes"
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 10.0
# A host id is at most 253 characters; anything else on the channel is not ours.
MAX_PAYLOAD = 253

Listener = Callable[[str], None]
ResyncListener = Callable[[], None]
Log = Callable[..., None]


class ChangeBus:
    """Fan-out of host ids to subscribers, on the event loop."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._resync: list[ResyncListener] = []

    def subscribe(self, listener: Listener, resync: ResyncListener | None = None) -> None:
        self._listeners.append(listener)
        if resync is not None:
            self._resync.append(resync)

    def publish(self, host_id: str) -> None:
        for listener in self._listeners:
            listener(host_id)

    def resync(self) -> None:
        """Every host may have changed (a notification may have been missed)."""
        for listener in self._resync:
            listener()


class PgListener:
    """LISTEN portagent_changes on its own connection and publish what arrives."""

    def __init__(self, conninfo: str, bus: ChangeBus, log: Log) -> None:
        # FleetStore.listen_conninfo: the store's own URL, as libpq reads it.
        self._conninfo = conninfo
        self._bus = bus
        self._log = log
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Until cancelled: connect, LISTEN, publish; on any failure back off and retry."""
        import psycopg  # only replicas on PostgreSQL need it

        delay = BACKOFF_FIRST
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=10,
                    # A peer that vanished without a FIN is noticed in ~25 s.
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                )
            except (psycopg.Error, OSError) as exc:
                self._log("bus_connect_failed", error=str(exc).strip()[:200], retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(BACKOFF_MAX, delay * 2) * random.uniform(0.8, 1.2)  # noqa: S311
                continue
            try:
                await conn.execute(f"LISTEN {CHANNEL}")
                self.connected.set()
                self._log("bus_listening", channel=CHANNEL)
                delay = BACKOFF_FIRST
                self._bus.resync()
                async for notify in conn.notifies():
                    payload = notify.payload
                    if notify.channel == CHANNEL and 0 < len(payload) <= MAX_PAYLOAD:
                        self._bus.publish(payload)
            except (psycopg.Error, OSError) as exc:
                self._log("bus_lost", error=str(exc).strip()[:200])
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await conn.close()
            await asyncio.sleep(delay)
            delay = min(BACKOFF_MAX, delay * 2)
